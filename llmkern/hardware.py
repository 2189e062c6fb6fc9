"""Performance facts in one place: GPU datasheet peaks, the measured ceilings of a machine
(device copy bandwidth, large-matmul rate) and the training FLOPs of a GPT.

The model, the trainer and the benchmarks all read these, so MFU and "fraction of peak" mean
the same thing everywhere:

* MFU (model FLOPs utilization) is achieved training FLOP/s over the **datasheet** dense
  bf16/fp16 tensor-core peak of a known GPU (``GPU_PEAK_TFLOPS``), as it is usually quoted.
  Where no datasheet peak is known (a CPU, an unlisted GPU, fp32 training) there is no MFU:
  a peak measured with a few small matmuls understates what the device does on a whole
  training step, which is how MFU above 100% used to show on CPUs.
* "Fraction of peak" in the benchmarks is relative to the ceilings measured in the same run
  (``measure_copy_gbps``, ``measure_matmul_tflops``), which exist on any device.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peaks with fp32 accumulation, TFLOP/s, from the
# vendors' datasheets (SXM parts unless named). Matched in order as substrings of the upper-cased
# device name, so the more specific names come first ("H100 PCIE" before "H100", "A10G" and
# "A100" before "A10"). bf16 is missing on V100 and T4, so they are listed for fp16 only.
GPU_PEAK_TFLOPS = (
    ("GH200", 989.5), ("H200", 989.5), ("H100 PCIE", 756.0), ("H100 NVL", 835.5),
    ("H100", 989.5), ("H800", 989.5), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1),
    ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)
FP16_ONLY_PEAK_TFLOPS = (("V100", 125.0), ("T4", 65.0))


def datasheet_peak_tflops(device_name: str, dtype: torch.dtype = torch.bfloat16) -> Optional[float]:
    """The datasheet dense peak (TFLOP/s) of a GPU named ``device_name`` in half precision;
    None for fp32, CPUs and GPUs not in the table."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    upper = device_name.upper()
    table = GPU_PEAK_TFLOPS + (FP16_ONLY_PEAK_TFLOPS if dtype == torch.float16 else ())
    for key, value in table:
        if key in upper:
            return value
    return None


def datasheet_peak_flops(device, dtype: torch.dtype = torch.bfloat16) -> Optional[float]:
    """The FLOP/s MFU is relative to on ``device`` (datasheet, dense), or None where unknown."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    tflops = datasheet_peak_tflops(torch.cuda.get_device_name(device), dtype)
    return tflops * 1e12 if tflops else None


def gpt_flops_per_token(n_params: int, n_layer: int, attn_width: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a GPT: 6N + 12 L W T (PaLM, appendix B).

    ``n_params`` excludes the position embeddings; ``attn_width`` is heads x head_dim (the
    embedding width for a plain GPT); ``seq_len`` the context each token attends over.
    """
    return 6.0 * n_params + 12.0 * n_layer * attn_width * seq_len


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: Optional[float]) -> Optional[float]:
    """Achieved training FLOP/s over ``peak_flops``; None when the peak is unknown."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_s / peak_flops


def _median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds per call after two warm-up calls (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def measure_copy_gbps(device, nbytes: Optional[int] = None, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.

    Default size: 1 GiB on a GPU (far past the L2), 32 MiB on a CPU.
    """
    device = torch.device(device)
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**25)
    src = torch.randn(nbytes // 4, device=device)  # random data, never zeros
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device, dtype: Optional[torch.dtype] = None, n: Optional[int] = None,
                          reps: int = 10) -> tuple:
    """(TFLOP/s, what) of an n x n x n matmul on random inputs: the median of ``reps`` timed
    products after warm-up. Default: 8192^3 in bf16 on a GPU, 1024^3 in fp32 on a CPU."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    n = n or (8192 if gpu else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _median_ms(lambda: torch.matmul(a, b), device, reps)
    what = f"{n}x{n}x{n} {str(dtype).replace('torch.', '')} matmul"
    return 2.0 * n**3 / (ms * 1e-3) / 1e12, what


_measured: dict = {}


def peak_flops(device, dtype: torch.dtype = torch.bfloat16) -> Optional[float]:
    """A device's peak FLOP/s: the datasheet figure of a known GPU in half precision, else a
    large matmul measured once per (device, dtype) (CPU: fp32). Use ``datasheet_peak_flops``
    for MFU; this one is a ceiling that exists on every device."""
    device = torch.device(device)
    known = datasheet_peak_flops(device, dtype)
    if known:
        return known
    key = (str(device), dtype)
    if key not in _measured:
        try:
            tflops, _ = measure_matmul_tflops(device, None if device.type == "cpu" else dtype)
            _measured[key] = tflops * 1e12
        except RuntimeError:  # out of memory, dtype unsupported on this device
            _measured[key] = None
    return _measured[key]
