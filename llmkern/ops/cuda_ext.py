"""Loading the CUDA C++ extension ``llmkern._C`` (built by setup.py, or just in time).

The extension registers the ops ``torch.ops.llmkern_cuda.*`` (schemas in csrc/bindings.cpp).
It is looked for, in order: the ``llmkern._C`` module that ``pip install`` builds; then, when
``LLMKERN_CUDA_JIT=1``, a just-in-time build of the same csrc/ sources with
``torch.utils.cpp_extension.load`` (also available as :func:`build_jit`). ``load_error()``
says why the ``cuda`` backend is unavailable (``llmkern info`` prints it). What each kernel
serves (dtypes, head dims, architectures, features) is declared next to its op in llmkern/ops/.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

_module = None
_error: Optional[str] = None

JIT_ENV = "LLMKERN_CUDA_JIT"
BUILD_DIR_ENV = "LLMKERN_CUDA_BUILD_DIR"


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _build_settings():
    """The shared build settings module (llmkern_build.py next to setup.py)."""
    root = _repo_root()
    if root not in sys.path:
        sys.path.insert(0, root)
    import llmkern_build

    return llmkern_build


def build_jit(build_directory: Optional[str] = None, verbose: bool = False, archs: Optional[str] = None,
              name: str = "llmkern_cuda_jit", extra_cuda_cflags: Optional[list] = None):
    """Compile csrc/ just in time with torch.utils.cpp_extension.load and load it.

    ``archs`` overrides TORCH_CUDA_ARCH_LIST (default "8.0;9.0"). The build directory defaults
    to $LLMKERN_CUDA_BUILD_DIR, else <repo>/build/jit; ninja reuses objects whose sources did
    not change. Returns the loaded module and makes the cuda backend available.
    """
    global _module, _error
    lb = _build_settings()
    home = lb.cuda_home()
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        raise RuntimeError("llmkern: cannot build the CUDA extension: no CUDA toolkit found (set CUDA_HOME to "
                           "the toolkit root, the folder holding bin/nvcc and lib64/libcudart.so)")
    os.environ["CUDA_HOME"] = home  # torch guesses the root from nvcc/libcudart otherwise, sometimes wrongly
    import torch.utils.cpp_extension as cpp

    cpp.CUDA_HOME = home
    build_directory = build_directory or os.environ.get(BUILD_DIR_ENV) or os.path.join(_repo_root(), "build", "jit")
    os.makedirs(build_directory, exist_ok=True)
    include, _, _ = lb.cublas_dirs()
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs or lb.arch_list()
    try:
        module = cpp.load(name=name, sources=lb.sources(), extra_cflags=lb.cxx_flags(),
                          extra_cuda_cflags=lb.nvcc_flags() + list(extra_cuda_cflags or []),
                          extra_include_paths=[lb.CSRC] + include, extra_ldflags=lb.ldflags(),
                          build_directory=build_directory, verbose=verbose, with_cuda=True)
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous
    _module, _error = module, None
    return module


def _load() -> None:
    global _module, _error
    import importlib
    import importlib.util

    how = (f"build it with `pip install --no-build-isolation -e .` where torch and a CUDA toolkit are installed "
           f"(CUDA_HOME set to the toolkit root), or set {JIT_ENV}=1 to compile csrc/ just in time")
    spec = importlib.util.find_spec("llmkern._C")
    if spec is None:
        _error = f"the CUDA extension llmkern._C was not built (CPU install or LLMKERN_SKIP_CUDA_BUILD=1); {how}"
    else:
        try:
            _module = importlib.import_module("llmkern._C")
            return
        except Exception as exc:  # built against another torch/CUDA, or a missing library
            _error = (f"the CUDA extension llmkern._C ({spec.origin}) failed to load "
                      f"({type(exc).__name__}: {exc}); rebuild it: {how}")
    if os.environ.get(JIT_ENV, "0") not in ("", "0"):
        try:
            build_jit()
        except Exception as exc:
            _error = f"the just-in-time build of csrc/ ({JIT_ENV}=1) failed: {type(exc).__name__}: {exc}"


_load()


def load_error() -> Optional[str]:
    """None when the extension is loaded, else the reason it is not."""
    return _error


def module():
    """The loaded extension module; raises RuntimeError with the reason when absent."""
    if _module is None:
        raise RuntimeError(_error)
    return _module


def call(name: str, *args):
    """Run the extension's op ``llmkern_cuda::<name>`` (registered with TORCH_LIBRARY)."""
    module()
    import torch

    return getattr(torch.ops.llmkern_cuda, name)(*args)


def linear_cache_size() -> int:
    """How many cuBLASLt GEMM plans (descriptors and the heuristic's algorithm, one per shape,
    dtype, layout, epilogue and alignment) the extension holds; they live for the process."""
    return int(module().linear_cache_size())
