"""Build settings of the CUDA extension ``llmkern._C``, shared by setup.py and the JIT build.

One place decides the sources, the compiler flags, where cuBLASLt lives and which GPU
architectures are targeted, so that ``pip install`` and ``llmkern.ops.cuda_ext.build_jit()``
compile exactly the same thing.
"""
from __future__ import annotations

import glob
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = "8.0;9.0"


def sources() -> list[str]:
    """Every .cu and .cpp of csrc/, sorted (absolute paths)."""
    return sorted(glob.glob(os.path.join(CSRC, "*.cu")) + glob.glob(os.path.join(CSRC, "*.cpp")))


def headers() -> list[str]:
    return sorted(glob.glob(os.path.join(CSRC, "*.h")) + glob.glob(os.path.join(CSRC, "*.cuh")))


def _is_toolkit(root: str) -> bool:
    """A toolkit root holds bin/nvcc and the CUDA runtime library (what -lcudart links)."""
    return (os.path.exists(os.path.join(root, "bin", "nvcc"))
            and any(glob.glob(os.path.join(root, sub, "libcudart.so*")) for sub in ("lib64", "lib")))


def cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH when set, else the first real toolkit among
    /usr/local/cuda and the folder of nvcc (resolving symlinks and `exec` wrapper scripts such as
    /usr/local/bin/nvcc, where torch's own guess lands on /usr/local and fails to link -lcudart)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    import shutil

    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script: `exec /path/to/cuda/bin/nvcc "$@"`
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            candidates += [os.path.dirname(os.path.dirname(m)) for m in
                           __import__("re").findall(r"(/\S+/bin/nvcc)\b", head)]
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if _is_toolkit(root):
            return root
    return None


def _pip_cuda_dirs() -> list[str]:
    """Roots of pip-installed CUDA libraries (nvidia/cu13, nvidia/cublas, ...), which hold
    cuBLASLt when the toolkit itself does not."""
    roots = []
    for base in sys.path:
        nv = os.path.join(base, "nvidia")
        if os.path.isdir(nv):
            roots += sorted(glob.glob(os.path.join(nv, "cu1*"))) + [os.path.join(nv, "cublas")]
    return [r for r in roots if os.path.isdir(r)]


def cublas_dirs() -> tuple[list[str], list[str], list[str]]:
    """(include_dirs, library_dirs, link flags) that find cublasLt.h and libcublasLt."""
    home = cuda_home()
    candidates = ([home] if home else []) + _pip_cuda_dirs()
    include, libdirs, link = [], [], []
    for root in candidates:
        if not include and os.path.exists(os.path.join(root, "include", "cublasLt.h")):
            include.append(os.path.join(root, "include"))
        for sub in ("lib64", "lib"):
            d = os.path.join(root, sub)
            if libdirs or not os.path.isdir(d):
                continue
            if os.path.exists(os.path.join(d, "libcublasLt.so")):
                libdirs.append(d)
                link = ["-lcublasLt"]
            else:  # pip wheels ship only the versioned soname
                versioned = sorted(glob.glob(os.path.join(d, "libcublasLt.so.*")))
                if versioned:
                    libdirs.append(d)
                    link = ["-l:" + os.path.basename(versioned[0])]
    return include, libdirs, link


def arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS


def cxx_flags() -> list[str]:
    return ["-O3", "-std=c++20"]


def nvcc_flags() -> list[str]:
    return ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
            "--expt-relaxed-constexpr", "-Xptxas=-warn-spills", "-Xptxas=-warn-lmem-usage",
            "-diag-suppress=20012"]


def ldflags() -> list[str]:
    """Linker flags: cuBLASLt (with an rpath to where it was found)."""
    _, libdirs, link = cublas_dirs()
    return [f"-L{d}" for d in libdirs] + [f"-Wl,-rpath,{d}" for d in libdirs] + link
