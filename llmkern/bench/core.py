"""The benchmark runner: cases x providers x modes -> rows, with n/a for whatever cannot run.

An op (``OpSpec``) has cases (shapes, dtype, fresh random inputs, work per mode) and providers
(llmkern backends and the references they are compared with). For each case the runner makes a
few input sets and cycles through them while timing, so a small problem cannot sit in the L2
cache between calls; it checks every provider's output against an fp32 oracle first, so a fast
wrong kernel is flagged rather than celebrated; and any exception (unsupported feature, compile
failure, out of memory) becomes an 'n/a' row with the reason while the run goes on.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from llmkern.bench.flops import MODES, rate
from llmkern.bench.timing import free_memory, peak_memory_mb, synchronize, time_fn

REL_TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float64: 1e-6}
ROTATE_BYTES = 256 * 2**20  # rotate input sets until they cover this much (several L2s), max 4 sets


class Unsupported(Exception):
    """A provider cannot run this case; the message is the reason shown as n/a."""


@dataclass
class Case:
    label: str                                    # e.g. "M=4096 N=1024"
    params: dict
    dtype: torch.dtype
    make_inputs: Callable[[torch.device, bool], dict]   # (device, requires_grad) -> tensors
    work: Callable[[str], float]                  # FLOPs or bytes for a mode
    modes: tuple = MODES


@dataclass
class RunConfig:
    device: torch.device
    quick: bool = False
    modes: tuple = MODES
    providers: Optional[tuple] = None             # names or prefixes; None = all
    dtype: Optional[torch.dtype] = None
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    compile_mode: Optional[str] = None

    def wants(self, name: str) -> bool:
        if self.providers is None:
            return True
        # 'llmkern' selects llmkern-triton and llmkern-cuda, 'sdpa' every SDPA backend
        return any(name == p or name.startswith(p + "-") for p in self.providers)

    def asked_for(self, name: str) -> bool:
        """True when the user named this provider (not merely 'all')."""
        return self.providers is not None and self.wants(name)


@dataclass
class Provider:
    name: str
    build: Callable[[Case, RunConfig], Callable[[dict], torch.Tensor]]  # may raise Unsupported
    role: str = "reference"                       # 'subject' (llmkern) or 'reference'
    available: Callable[[RunConfig], Optional[str]] = lambda cfg: None
    check: bool = True                            # False: a floor, not the same function (no oracle)


@dataclass
class OpSpec:
    name: str
    metric: str                                   # 'TFLOP/s' or 'GB/s'
    cases: Callable[[RunConfig], list]
    providers: list
    oracle: Callable[[dict, Case], torch.Tensor]  # fp32 (or better) output for the check
    description: str = ""


@dataclass
class Row:
    op: str
    case: str
    params: dict
    dtype: str
    mode: str
    provider: str
    role: str
    status: str = "ok"                            # 'ok' | 'n/a' | 'wrong'
    reason: str = ""
    ms: Optional[float] = None
    ms_q20: Optional[float] = None
    ms_q80: Optional[float] = None
    metric: str = ""
    value: Optional[float] = None
    frac_peak: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    rel_err: Optional[float] = None
    speedups: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def short_reason(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, Unsupported) else str(exc)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def provider_rows(spec, case: str, params: dict, dtype: str, mode: str, providers, cfg: RunConfig,
                  progress, measure: Callable, after: Optional[Callable] = None) -> list:
    """One row per provider for the end-to-end ops that time themselves: ``measure(row, name)``
    fills the row; an exception makes it n/a with the reason, and the run goes on. ``after``
    runs after each provider, whatever happened (e.g. undoing a patch)."""
    rows = []
    for provider in providers:
        row = Row(spec.name, case, params, dtype, mode, provider.name, provider.role,
                  metric=spec.metric)
        try:
            measure(row, provider.name)
        except Exception as exc:
            row.status, row.reason = "n/a", short_reason(exc)
        finally:
            if after is not None:
                after()
        free_memory(cfg.device)
        rows.append(row)
        if progress is not None:
            progress.update(1)
    return rows


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf on a shape mismatch or a NaN."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    o, r = out.detach().double(), ref.detach().double()
    if not torch.isfinite(o).all():
        return math.inf
    denom = torch.linalg.vector_norm(r).item()
    return torch.linalg.vector_norm(o - r).item() / max(denom, 1e-30)


def input_sets(case: Case, device: torch.device, requires_grad: bool) -> list:
    first = case.make_inputs(device, requires_grad)
    size = sum(t.numel() * t.element_size() for t in first.values() if isinstance(t, torch.Tensor))
    count = max(1, min(4, math.ceil(ROTATE_BYTES / max(size, 1))))
    return [first] + [case.make_inputs(device, requires_grad) for _ in range(count - 1)]


def _leaves(sets: list) -> list:
    return [t for s in sets for t in s.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def mode_callables(fn, sets, grads, mode):
    """(call, once, leaves) for one mode: ``call`` cycles through the input sets, ``once`` runs
    the first set (for the memory figure), ``leaves`` are the tensors whose .grad to reset."""
    n, counter = len(sets), itertools.count()
    leaves = _leaves(sets)
    if mode == "fwd":
        def call():
            return fn(sets[next(counter) % n])

        def once():
            return fn(sets[0])
    elif mode == "bwd":
        outs = [fn(s) for s in sets]  # the timed region is the backward alone

        def call():
            i = next(counter) % n
            torch.autograd.backward(outs[i], grads[i], retain_graph=True)

        def once():
            torch.autograd.backward(outs[0], grads[0], retain_graph=True)
    elif mode == "fwd+bwd":
        def call():
            i = next(counter) % n
            torch.autograd.backward(fn(sets[i]), grads[i])

        def once():
            torch.autograd.backward(fn(sets[0]), grads[0])
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return call, once, leaves


def _time_mode(fn, sets, grads, mode, cfg: RunConfig):
    """Time one mode cycling through the input sets; return (Timing, peak memory MiB)."""
    call, once, leaves = mode_callables(fn, sets, grads, mode)
    timing = time_fn(call, cfg.device, cfg.warmup_ms, cfg.rep_ms, grad_to_none=leaves or None)
    for t in leaves:
        t.grad = None
    mem = peak_memory_mb(once, cfg.device)
    for t in leaves:
        t.grad = None
    return timing, mem


def prepare(spec: OpSpec, case: Case, provider: Provider, cfg: RunConfig, sets: list, oracle=None):
    """Build ``provider`` for ``case`` and run it once on the first input set.

    Returns (fn, grads, rel_err); grads are the output gradients per set (None where the output
    is a scalar loss, or when no mode needs a backward). Raises whatever the provider raises.
    """
    fn = provider.build(case, cfg)
    # a fresh copy: some kernels (Liger's cross-entropy, fused losses) write into their input,
    # which must not change what the next provider is checked on
    first = {k: t.detach().clone().requires_grad_(t.requires_grad) for k, t in sets[0].items()}
    out0 = fn(first)
    synchronize(cfg.device)
    err = rel_error(out0, oracle) if oracle is not None and provider.check else None
    grads = None
    if out0.requires_grad:
        grads = [torch.randn_like(out0) if out0.dim() > 0 else None for _ in sets]
    del out0, first
    return fn, grads, err


def _speedups(rows: list) -> None:
    """Fill each llmkern row's speedup over every reference that ran the same case and mode."""
    for mode in {r.mode for r in rows}:
        same = [r for r in rows if r.mode == mode and r.status == "ok" and r.ms]
        refs = {r.provider: r.ms for r in same if r.role == "reference"}
        sdpa = [ms for name, ms in refs.items() if name.startswith("sdpa-")]
        if len(sdpa) > 1:
            refs["sdpa-best"] = min(sdpa)
        for r in same:
            if r.role == "subject":
                r.speedups = {name: ms / r.ms for name, ms in refs.items()}


def run_case(spec: OpSpec, case: Case, providers: list, cfg: RunConfig, peaks, progress=None) -> list:
    device = cfg.device
    modes = tuple(m for m in case.modes if m in cfg.modes)
    rows: list = []
    dtype_name = str(case.dtype).replace("torch.", "")
    peak = peaks.for_metric(spec.metric) if peaks is not None else None

    def row(provider, mode, **kw):
        return Row(spec.name, case.label, case.params, dtype_name, mode, provider.name,
                   provider.role, metric=spec.metric, **kw)

    def tick(k=1):
        if progress is not None:
            progress.update(k)

    # inputs need grad whenever the op has a backward at all, so that 'fwd' is always the
    # training forward (what autograd saves included), whichever modes this run asked for
    needs_grad = any(m != "fwd" for m in case.modes)
    try:
        sets = input_sets(case, device, needs_grad)
    except Exception as exc:  # the inputs alone do not fit: every provider is n/a
        reason = f"inputs could not be created: {short_reason(exc)}"
        tick(len(providers) * len(modes))
        return [row(p, m, status="n/a", reason=reason) for p in providers for m in modes]
    try:
        with torch.no_grad():
            oracle = spec.oracle(sets[0], case)
    except Exception as exc:
        oracle, oracle_note = None, f"no oracle: {short_reason(exc)}"
    else:
        oracle_note = ""
    tol = REL_TOL.get(case.dtype, 1e-2)
    for provider in providers:
        try:
            fn, grads, err = prepare(spec, case, provider, cfg, sets, oracle)
        except Exception as exc:
            rows += [row(provider, m, status="n/a", reason=short_reason(exc)) for m in modes]
            free_memory(device)
            tick(len(modes))
            continue
        status, reason = "ok", oracle_note if provider.check else "a floor: not the same function"
        if err is not None and not err <= tol:
            status, reason = "wrong", f"output differs from the fp32 oracle: rel err {err:.2e} > {tol:.0e}"
        for mode in modes:
            try:
                if mode != "fwd" and grads is None:
                    raise Unsupported("the output does not require grad (no backward)")
                timing, mem = _time_mode(fn, sets, grads, mode, cfg)
                value = rate(case.work(mode), timing.median, spec.metric)
                rows.append(row(provider, mode, status=status, reason=reason, ms=timing.median,
                                ms_q20=timing.q20, ms_q80=timing.q80, value=value,
                                frac_peak=value / peak if peak else None, peak_mem_mb=mem,
                                rel_err=err))
            except Exception as exc:
                rows.append(row(provider, mode, status="n/a", reason=short_reason(exc), rel_err=err))
                for t in _leaves(sets):
                    t.grad = None
                free_memory(device)
            tick()
        del fn, grads
        free_memory(device)
    del sets
    free_memory(device)
    _speedups(rows)
    return rows


def select_providers(providers, cfg: RunConfig) -> tuple:
    """(providers to run, {name: reason} for those skipped on this machine)."""
    active, skipped = [], {}
    for p in providers:
        if not cfg.wants(p.name):
            continue
        reason = p.available(cfg)
        if reason:
            skipped[p.name] = reason
        else:
            active.append(p)
    return active, skipped


def run_op(spec: OpSpec, cfg: RunConfig, peaks, progress=None) -> tuple:
    """Run every case of ``spec``; returns (rows, skipped providers)."""
    providers, skipped = select_providers(spec.providers, cfg)
    rows = []
    for case in spec.cases(cfg):
        rows += run_case(spec, case, providers, cfg, peaks, progress)
    return rows, skipped


def count_steps(spec: OpSpec, cfg: RunConfig) -> int:
    providers, _ = select_providers(spec.providers, cfg)
    return sum(len([m for m in c.modes if m in cfg.modes]) * len(providers) for c in spec.cases(cfg))
