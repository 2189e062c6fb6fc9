"""Backend choice: which implementation (torch reference, Triton, CUDA C++) serves an op call.

The choice is made in Python, in the functional layer, before the ``torch.library`` op is
called; the op receives the chosen backend as a string argument. State is kept in plain
module globals (not thread-locals) so that ``torch.compile`` can read and guard on it.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "LLMKERN_BACKEND"


def _check_choice(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"{what} must be one of {CHOICES}, got {name!r}")
    return name


_default_backend = _check_choice(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)
_warned: set = set()


def triton_interpret() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_IMPORT_ERROR: Optional[str] = None
try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the platform
    _TRITON_IMPORT_ERROR = f"triton is not importable ({exc})"

_INTERPRET = triton_interpret()
_CUDA_AVAILABLE = torch.cuda.is_available()


def cuda_extension_status() -> Optional[str]:
    """None when the CUDA extension ``llmkern._C`` is loaded, else why it is not."""
    from llmkern.ops import cuda_ext

    return cuda_ext.load_error()


def backend_unavailable(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device`` at all, or None when it can."""
    if name == "torch":
        return None
    if name == "triton":
        if _TRITON_IMPORT_ERROR:
            return _TRITON_IMPORT_ERROR
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _INTERPRET:
            return None
        return (f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                f"got tensors on {device}")
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors; got tensors on {device}"
        return cuda_extension_status()
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def available_backends(device: Optional[torch.device | str] = None) -> list[str]:
    """Backends that can run on ``device`` (default: the current CUDA device if any, else CPU)."""
    if device is None:
        device = torch.device("cuda") if _CUDA_AVAILABLE else torch.device("cpu")
    device = torch.device(device)
    return [b for b in BACKENDS if backend_unavailable(b, device) is None]


def get_backend() -> str:
    """The backend in force: the innermost ``use_backend``, else ``set_backend``, else the env."""
    return _default_backend


def set_backend(name: str) -> None:
    """Set the default backend: 'auto' | 'torch' | 'triton' | 'cuda'."""
    global _default_backend
    _default_backend = _check_choice(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside the ``with`` block, then restore the previous one."""
    global _default_backend
    previous = _default_backend
    _default_backend = _check_choice(name, "backend")
    try:
        yield
    finally:
        _default_backend = previous


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def select(op: str, device: torch.device, backend: Optional[str],
           unsupported: Callable[[str], Optional[str]],
           auto_order: tuple = ("triton", "cuda")) -> str:
    """Choose the backend for one call of ``op``.

    ``unsupported(name)`` says why backend ``name`` cannot serve this particular call
    (dtype, shape, feature), or returns None. A backend named by the caller (argument, context
    or global) that cannot serve the call raises; under 'auto' the first backend of
    ``auto_order`` that can serve it wins, GPU backends skipped for a feature warn once, and
    the torch reference serves the rest (always on CPU tensors).
    """
    name = _check_choice(backend, "backend") if backend is not None else _default_backend
    if name == "torch":
        return "torch"
    if name != "auto":
        reason = backend_unavailable(name, device) or unsupported(name)
        if reason is not None:
            raise RuntimeError(f"llmkern.{op}: backend {name!r} cannot serve this call: {reason}")
        return name
    if device.type != "cuda":
        return "torch"
    for candidate in auto_order:
        if backend_unavailable(candidate, device) is not None:
            continue
        reason = unsupported(candidate)
        if reason is None:
            return candidate
        _warn_once((op, candidate, reason),
                   f"llmkern.{op}: the {candidate} backend cannot serve this call ({reason}); "
                   f"falling back")
    return "torch"
