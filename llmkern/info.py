"""``llmkern info``: versions, devices, backends per device, and a self-check of every op in\nevery dtype each backend serves, against float64."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Callable, Optional

import torch

import llmkern
from llmkern import reference
from llmkern.backends import BACKENDS, backend_unavailable


def _versions() -> list[tuple[str, str]]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # pragma: no cover - platform dependent
        triton_version = f"not importable ({exc})"
    rows = [("llmkern", llmkern.__version__), ("python", platform.python_version()),
            ("torch", torch.__version__), ("triton", triton_version),
            ("torch CUDA", torch.version.cuda or "none (CPU build)")]
    if torch.backends.cudnn.is_available():
        rows.append(("cuDNN", str(torch.backends.cudnn.version())))
    return rows


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()})"


# Dtypes every backend is checked in (where it serves them), and the largest error allowed,
# relative to the float64 output's largest magnitude.
CHECK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _self_checks() -> list[tuple[str, Callable, Callable]]:
    """(name, inputs(generator) -> tuple of fp32/int CPU tensors, call(inputs, backend=...)).

    The same call runs the llmkern op (``backend=`` a backend name) and, with ``backend=None``
    on float64 copies of the inputs, the reference."""
    def ref_or(op, ref):
        return lambda *t, backend: ref(*t) if backend is None else op(*t, backend=backend)

    target = lambda g, n, v: torch.randint(0, v, (n,), generator=g)  # noqa: E731
    checks = [
        ("layer_norm", lambda g: (_randn(g, 8, 96), _randn(g, 96), _randn(g, 96)),
         ref_or(llmkern.layer_norm, reference.layer_norm)),
        ("rms_norm", lambda g: (_randn(g, 8, 96), _randn(g, 96)),
         ref_or(llmkern.rms_norm, reference.rms_norm)),
        ("softmax", lambda g: (_randn(g, 2, 8, 96),),
         ref_or(lambda x, backend: llmkern.softmax(x, 0.5, True, backend=backend),
                lambda x: reference.softmax(x, 0.5, True))),
        ("linear_gelu", lambda g: (_randn(g, 8, 32), _randn(g, 48, 32, scale=32 ** -0.5),
                                   _randn(g, 48)),
         ref_or(llmkern.linear_gelu, reference.linear_gelu)),
        ("mlp", lambda g: (_randn(g, 8, 32), _randn(g, 64, 32, scale=32 ** -0.5), _randn(g, 64),
                           _randn(g, 32, 64, scale=64 ** -0.5), _randn(g, 32)),
         ref_or(llmkern.mlp, reference.mlp)),
        ("cross_entropy", lambda g: (_randn(g, 8, 96), target(g, 8, 96)),
         ref_or(llmkern.cross_entropy, reference.cross_entropy)),
        ("linear_cross_entropy", lambda g: (_randn(g, 8, 32), _randn(g, 96, 32, scale=32 ** -0.5),
                                            target(g, 8, 96)),
         ref_or(llmkern.linear_cross_entropy, reference.linear_cross_entropy)),
    ]
    if hasattr(llmkern, "attention"):
        checks.append(("attention", lambda g: tuple(_randn(g, 1, 2, 16, 32) for _ in range(3)),
                       ref_or(lambda q, k, v, backend: llmkern.attention(q, k, v, causal=True,
                                                                          backend=backend),
                              lambda q, k, v: reference.attention(q, k, v, causal=True))))
    def torch_ref(op):  # the torch backend is the op's plain-PyTorch reference
        return ref_or(op, lambda *t: op(*t, backend="torch"))

    checks += [
        ("rotary", lambda g: (_randn(g, 1, 4, 16, 32), _randn(g, 1, 2, 16, 32),
                              _randn(g, 16, 16), _randn(g, 16, 16)),
         torch_ref(lambda q, k, c, s, backend: torch.cat(
             [t.flatten() for t in llmkern.rotary(q, k, c, s, backend=backend)]))),
        ("swiglu_mlp", lambda g: (_randn(g, 8, 32), _randn(g, 96, 32, scale=32 ** -0.5),
                                  _randn(g, 32, 48, scale=48 ** -0.5)),
         torch_ref(llmkern.swiglu_mlp)),
        ("linear_logprobs", lambda g: (_randn(g, 8, 32), _randn(g, 96, 32, scale=32 ** -0.5),
                                       target(g, 8, 96)),
         torch_ref(llmkern.linear_logprobs)),
        ("attention_kvcache", lambda g: (_randn(g, 2, 4, 1, 32), _randn(g, 2, 2, 40, 32),
                                         _randn(g, 2, 2, 40, 32),
                                         torch.tensor([40, 17], dtype=torch.int32)),
         torch_ref(lambda q, kc, vc, lens, backend: llmkern.attention_with_kvcache(
             q, kc, vc, cache_seqlens=lens, backend=backend))),
    ]
    return checks


def _cast(inputs, device, dtype):
    return tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                 for t in inputs)


def check_one(call, inputs, device: torch.device, backend: str, dtype: torch.dtype) -> str:
    """'ok 1.2e-07', 'FAIL 3.4e+08', 'not served (why)' or 'ERROR (what)' for one dtype."""
    args = _cast(inputs, device, dtype)
    try:
        out = call(*args, backend=backend)
    except RuntimeError as exc:
        if "cannot serve this call" in str(exc):
            return f"not served ({str(exc).split('cannot serve this call: ')[-1][:80]})"
        return f"ERROR ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    except Exception as exc:  # the line reports it; info itself must not crash
        return f"ERROR ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    # the reference sees the very values the kernel saw (rounded to dtype), in float64
    ref = call(*_cast(args, device, torch.float64), backend=None).double()
    err = (out.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    return f"{'ok' if err <= TOLERANCE[dtype] else 'FAIL'} {err:.1e}"


def self_check(device: torch.device, backend: str) -> str:
    """One line per op: its relative error against float64 on this device and backend, in
    every dtype of CHECK_DTYPES the backend serves (or why it does not serve one)."""
    lines = []
    for name, make_inputs, call in _self_checks():
        inputs = make_inputs(torch.Generator(device="cpu").manual_seed(0))
        parts = [f"{_SHORT[dt]} {check_one(call, inputs, device, backend, dt)}"
                 for dt in CHECK_DTYPES]
        lines.append(f"{name:<21} " + ", ".join(parts))
    return "\n".join(lines)


def _attention_kernel(device: torch.device) -> str:
    from llmkern.kernels.attention_hopper import backward_served_by, served_by

    return (f" (attention forward kernel: {served_by(device)}; backward: "
            f"{backward_served_by(device)}, with deterministic=False: "
            f"{backward_served_by(device, deterministic=False)})")


def report(check: bool = True) -> str:
    lines = ["llmkern info", ""]
    lines += [f"  {k:<12} {v}" for k, v in _versions()]
    from llmkern.ops import cuda_ext

    lines.append(f"  {'llmkern._C':<12} {cuda_ext.load_error() or 'loaded'}")
    lines += ["", f"  default backend: {llmkern.get_backend()} (LLMKERN_BACKEND / llmkern.set_backend)", ""]
    for device in _devices():
        lines.append(f"device {device}: {_device_name(device)}")
        for name in BACKENDS:
            reason: Optional[str] = backend_unavailable(name, device)
            if reason is not None:
                lines.append(f"  {name:<7} unavailable: {reason}")
                continue
            kernel = _attention_kernel(device) if name == "triton" else ""
            if not check:
                lines.append(f"  {name:<7} available{kernel}")
                continue
            lines.append(f"  {name:<7} available{kernel}; max error relative to float64:")
            lines += [f"    {row}" for row in self_check(device, name).splitlines()]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-check", action="store_true", help="skip the correctness self-check")


def run(args: argparse.Namespace) -> int:
    print(report(check=not args.no_check))
    return 0


def main(argv=None) -> int:
    from llmkern.cli import run_command

    return run_command(sys.modules[__name__], argv)
