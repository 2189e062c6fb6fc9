"""Loading the CUDA C++ extension ``llmkern._C`` (built by setup.py, or just in time)."""
from __future__ import annotations

from typing import Optional

_module = None
_error: Optional[str] = None

try:
    from llmkern import _C as _module  # type: ignore[attr-defined]
except Exception as exc:  # absent (CPU install, LLMKERN_SKIP_CUDA_BUILD=1) or failed to load
    _error = f"the CUDA extension llmkern._C is not available ({type(exc).__name__}: {exc})"


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


def unsupported(op: str, **info) -> Optional[str]:
    """Why the cuda backend cannot serve this call of ``op`` (None when it can)."""
    if _error is not None:
        return _error
    if not hasattr(_module, "supports"):
        return None
    return _module.supports(op, info) or None
