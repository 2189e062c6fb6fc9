"""Timing and memory measurement: device events on a GPU, a perf_counter loop on a CPU.

On CUDA, ``triton.testing.do_bench`` times each call with CUDA events, warms up first, clears the
L2 cache between calls and returns the quantiles we ask for. On a CPU a plain loop does the same
job (there is no cache to clear and nothing asynchronous to wait for).
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)  # median first, as do_bench returns them in the order asked


def quantiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Quantiles of ``values`` with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("quantiles of an empty sequence")
    ordered = sorted(float(v) for v in values)
    out = []
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        point = q * (len(ordered) - 1)
        lo, hi = math.floor(point), math.ceil(point)
        frac = point - lo
        out.append(ordered[lo] * (1.0 - frac) + ordered[hi] * frac)
    return out


@dataclass
class Timing:
    """Milliseconds per call: median and the 20% / 80% quantiles, over ``n`` timed calls."""
    median: float
    q20: float
    q80: float
    n: int = 0

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "Timing":
        med, q20, q80 = quantiles(samples_ms, QUANTILES)
        return cls(med, q20, q80, len(samples_ms))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(tensors: Optional[Sequence[torch.Tensor]]) -> None:
    for t in tensors or ():
        t.grad = None


def time_cpu(fn: Callable[[], object], warmup_ms: float = 10.0, rep_ms: float = 50.0,
             grad_to_none: Optional[Sequence[torch.Tensor]] = None,
             min_runs: int = 3, max_runs: int = 200) -> Timing:
    """Time ``fn`` with perf_counter: warm up, then repeat for about ``rep_ms`` milliseconds."""
    _clear_grads(grad_to_none)
    start = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    for _ in range(min(max_runs, max(0, int(warmup_ms / estimate_ms)))):
        _clear_grads(grad_to_none)
        fn()
    runs = max(min_runs, min(max_runs, int(rep_ms / estimate_ms)))
    samples = []
    for _ in range(runs):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing.from_samples(samples)


def time_cuda(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0,
              grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> Timing:
    """Time ``fn`` on the current CUDA device with events (triton.testing.do_bench)."""
    try:
        from triton.testing import do_bench
    except Exception:  # triton absent: the same measurement with our own events
        return _time_cuda_events(fn, warmup_ms, rep_ms, grad_to_none)
    med, q20, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                             quantiles=list(QUANTILES))
    return Timing(float(med), float(q20), float(q80))


def _time_cuda_events(fn, warmup_ms, rep_ms, grad_to_none) -> Timing:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    runs = max(3, int(rep_ms / estimate_ms))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(runs)]
    for s, e in events:
        _clear_grads(grad_to_none)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return Timing.from_samples([s.elapsed_time(e) for s, e in events])


def time_fn(fn: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float,
            grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> Timing:
    if device.type == "cuda":
        return time_cuda(fn, warmup_ms, rep_ms, grad_to_none)
    return time_cpu(fn, warmup_ms, rep_ms, grad_to_none)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak device memory allocated while ``fn`` runs, above what was allocated before (MiB).

    Inputs and anything alive before the call are excluded, so the figure is the call's own
    working memory (activations saved for backward, gradients, temporaries). None on CPU.
    """
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak / 2**20


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
