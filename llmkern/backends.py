"""Backend choice: which implementation (torch reference, Triton, CUDA C++) serves an op call.

The choice is made in Python, in the functional layer, before the ``torch.library`` op is
called; the op receives the chosen backend as a string argument. State is kept in plain
module globals (not thread-locals) so that ``torch.compile`` can read and guard on it.

Each op file declares its kernel backends once, next to the op::

    NORM = OpBackends("layer_norm", [
        Backend("triton", serves=triton_serves,
                impl={"fwd": "llmkern.kernels.layer_norm:norm_fwd", "bwd": ...}),
        Backend("cuda", serves=cuda_serves, impl={"fwd": _cuda_fwd, "bwd": _cuda_bwd}),
    ], auto_order=("triton", "cuda"))
    chosen = NORM.choose(x.device, backend, x=x, weight=weight)   # functional layer
    NORM.run("fwd", chosen, x, weight, ...)                        # inside the torch.library op

``serves(**call)`` gets the keyword arguments given to ``choose`` and returns why the backend
cannot serve that call (dtype, shape, feature), or None. Whether a backend can run on the
device at all (triton importable, the CUDA extension loaded) is checked here, not by ``serves``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import torch

BACKENDS = ("torch", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "LLMKERN_BACKEND"


def _check_choice(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"{what} must be one of {CHOICES}, got {name!r}")
    return name


# The environment's choice is checked where it is first used, not at import: a bad value then
# fails the call that reads it with one clear error (the CLI prints it on one line) instead of
# making `import llmkern` itself fail.
_default_backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
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
    return _check_choice(_default_backend, ENV_VAR)


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
    name = _check_choice(backend, "backend") if backend is not None else get_backend()
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


# ---- per-op declarations -------------------------------------------------------------------

Reason = Optional[str]
Impl = Union[Callable, str]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_BF16 = "bf16 matmuls are wrong in the Triton CPU interpreter"


def dtype_reason(t: Optional[torch.Tensor], allowed: Iterable[torch.dtype], what: str) -> Reason:
    """Why ``t``'s dtype is not among ``allowed`` (``what`` names the argument), else None."""
    allowed = tuple(allowed)
    if t is None or t.dtype in allowed:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    return f"{what} has dtype {str(t.dtype).replace('torch.', '')} (supported: {names})"


def interpreter_bf16_reason(*tensors: Optional[torch.Tensor]) -> Reason:
    """Why a Triton kernel with bf16 ``tl.dot`` operands cannot run these tensors: the CPU
    interpreter returns garbage (~1e8) for such products instead of failing."""
    for t in tensors:
        if t is not None and t.dtype == torch.bfloat16 and t.device.type == "cpu" and _INTERPRET:
            return INTERPRETER_BF16
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: Optional[int]) -> tuple:
    return torch.cuda.get_device_capability(index)


def cuda_capability(device: torch.device) -> tuple:
    """(major, minor) of a CUDA device, cached (asked once per device)."""
    return _capability(device.index)


def _resolve(impl: Impl) -> Callable:
    if callable(impl):
        return impl
    module, _, name = impl.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Backend:
    """One kernel backend of an op.

    ``name``: 'triton' or 'cuda'. ``serves(**call)``: why it cannot serve a call, None if it
    can (None for ``serves`` itself: it serves every call it can run). ``impl``: for each entry
    point of the op (e.g. 'fwd', 'bwd'), a callable or a lazy "module:function" string, imported
    on first use so that importing llmkern never imports Triton kernels.
    """
    name: str
    impl: Mapping[str, Impl]
    serves: Optional[Callable[..., Reason]] = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.name not in BACKENDS or self.name == "torch":
            raise ValueError(f"Backend name must be 'triton' or 'cuda', got {self.name!r}")

    def reason(self, **call) -> Reason:
        return None if self.serves is None else self.serves(**call)

    def entry(self, entry: str) -> Callable:
        fn = self._cache.get(entry)
        if fn is None:
            if entry not in self.impl:
                raise ValueError(f"the {self.name} backend has no entry {entry!r} "
                                 f"(has {sorted(self.impl)})")
            fn = self._cache[entry] = _resolve(self.impl[entry])
        return fn


class OpBackends:
    """The kernel backends of one op (the torch reference is implicit) and the order ``auto``
    tries them in. ``choose`` runs in the functional layer, ``run`` inside the torch.library op."""

    def __init__(self, op: str, backends: Iterable[Backend], auto_order: tuple = ("triton", "cuda")):
        self.op = op
        self.backends = {b.name: b for b in backends}
        unknown = [n for n in auto_order if n not in self.backends]
        if unknown:
            raise ValueError(f"OpBackends({op!r}): auto_order names undeclared backends {unknown}")
        self.auto_order = tuple(auto_order)

    def reason(self, name: str, **call) -> Reason:
        """Why backend ``name`` cannot serve this call (the device aside), or None."""
        backend = self.backends.get(name)
        if backend is None:
            return f"llmkern.{self.op} has no {name} kernel"
        return backend.reason(**call)

    def choose(self, device: torch.device, backend: Optional[str], **call) -> str:
        """The backend for one call: see :func:`select`; ``call`` goes to each ``serves``."""
        return select(self.op, device, backend, lambda name: self.reason(name, **call),
                      auto_order=self.auto_order)

    def run(self, entry: str, backend: str, *args):
        """Call ``entry`` of the chosen kernel backend (never 'torch': the functional layer
        calls the reference itself)."""
        chosen = self.backends.get(backend)
        if chosen is None:
            raise ValueError(f"llmkern::{self.op}_{entry}: backend must be one of "
                             f"{sorted(self.backends)}, got {backend!r}")
        return chosen.entry(entry)(*args)
