"""``llmkern info``: versions, devices, backends per device, and a one-line self-check each."""
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


def _self_checks() -> list[tuple[str, Callable, Callable, float]]:
    """(name, llmkern call taking backend=, reference call, tolerance) on small fp32 inputs."""
    def norm_inputs(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(8, 96, generator=g).to(device)
        w = torch.randn(96, generator=g).to(device)
        return x, w

    checks = [
        ("layer_norm", lambda d, b: llmkern.layer_norm(*norm_inputs(d), backend=b),
         lambda d: reference.layer_norm(*[t.double() for t in norm_inputs(d)]), 1e-4),
        ("softmax", lambda d, b: llmkern.softmax(norm_inputs(d)[0], 0.5, True, backend=b),
         lambda d: reference.softmax(norm_inputs(d)[0].double(), 0.5, True), 1e-5),
    ]
    if hasattr(llmkern, "attention"):
        def qkv(device):
            g = torch.Generator(device="cpu").manual_seed(1)
            return [torch.randn(1, 2, 16, 32, generator=g).to(device) for _ in range(3)]

        checks.append(("attention", lambda d, b: llmkern.attention(*qkv(d), causal=True, backend=b),
                       lambda d: reference.attention(*[t.double() for t in qkv(d)], causal=True), 1e-3))
    return checks


def self_check(device: torch.device, backend: str) -> str:
    """One line: each op's max error against float64 on this device and backend, or the failure."""
    parts = []
    for name, run, ref, tol in _self_checks():
        try:
            err = (run(device, backend).double() - ref(device)).abs().max().item()
            parts.append(f"{name} {'ok' if err <= tol else 'FAIL'} ({err:.1e})")
        except Exception as exc:  # the line reports it; info itself must not crash
            parts.append(f"{name} n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
    return ", ".join(parts)


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
            status = self_check(device, name) if check else "available"
            lines.append(f"  {name:<7} {status}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-check", action="store_true", help="skip the correctness self-check")


def run(args: argparse.Namespace) -> int:
    print(report(check=not args.no_check))
    return 0


def main(argv=None) -> int:
    from llmkern.cli import run_command

    return run_command(sys.modules[__name__], argv)
