"""Where the figures come from: device, versions, git commit, and the measured peaks of the run."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from llmkern.bench.timing import free_memory
from llmkern.hardware import datasheet_peak_tflops, measure_copy_gbps, measure_matmul_tflops

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: 'nvidia-h100-80gb-hbm3', or 'cpu' for any CPU."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def git_commit() -> str:
    """LLMKERN_COMMIT if set (a copy of the tree without .git), else `git rev-parse`, else 'unknown'."""
    env = os.environ.get("LLMKERN_COMMIT")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for cwd in (os.getcwd(), root):
        try:
            out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd,
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                       cwd=cwd, capture_output=True, text=True, timeout=10)
                return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
        except Exception:
            continue
    return "unknown"


def versions() -> dict:
    import llmkern

    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "absent"
    return {"llmkern": llmkern.__version__, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "none", "python": platform.python_version()}


@dataclass
class Peaks:
    """Ceilings measured in this run: device copy bandwidth and a large matmul's rate."""
    copy_gbps: Optional[float] = None
    matmul_tflops: Optional[float] = None
    matmul_what: str = ""
    datasheet_tflops: Optional[float] = None
    notes: list = field(default_factory=list)

    def for_metric(self, metric: str) -> Optional[float]:
        return {"GB/s": self.copy_gbps, "TFLOP/s": self.matmul_tflops}.get(metric)

    def as_dict(self) -> dict:
        return asdict(self)


def measure_peaks(device: torch.device, quick: bool = False) -> Peaks:
    """A large device-to-device copy (bytes read + written) and a large random matmul, measured
    by ``llmkern.hardware``.

    GPU: 1 GiB copy and an 8192^3 bf16 matmul (512 MiB and 4096^3 in quick mode). CPU: a 32 MiB
    copy and a 1024^3 fp32 matmul, enough to give the CPU figures a scale, nothing more.
    """
    gpu = device.type == "cuda"
    peaks = Peaks(datasheet_tflops=datasheet_peak_tflops(device_name(device)) if gpu else None)
    try:
        peaks.copy_gbps = measure_copy_gbps(device, (2**29 if quick else 2**30) if gpu else None)
    except Exception as exc:  # e.g. out of memory on a small card: say so, carry on
        peaks.notes.append(f"copy peak not measured: {type(exc).__name__}: {exc}")
    try:
        peaks.matmul_tflops, peaks.matmul_what = measure_matmul_tflops(
            device, n=(4096 if quick else 8192) if gpu else None)
    except Exception as exc:
        peaks.notes.append(f"matmul peak not measured: {type(exc).__name__}: {exc}")
    free_memory(device)
    return peaks
