"""Input checks shared by every op: clear errors that name the argument, shape, dtype, device."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# What the functional layer accepts where PyTorch does: float64 is served by the torch reference.
ANY_FLOAT = FLOAT_DTYPES + (torch.float64,)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, op: str, ndim: Optional[int | Iterable[int]] = None,
                 dtypes: Optional[Iterable[torch.dtype]] = FLOAT_DTYPES,
                 allow_empty: bool = False) -> None:
    """Raise TypeError/ValueError naming ``name`` when ``t`` is not a tensor of the expected kind."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"llmkern.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"llmkern.{op}: {name} must have {' or '.join(map(str, allowed))} "
                             f"dimensions, got {describe(t)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise TypeError(f"llmkern.{op}: {name} has unsupported dtype ({describe(t)}); expected one of "
                        f"{', '.join(str(d) for d in dtypes)}")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"llmkern.{op}: {name} is empty ({describe(t)}); expected at least one element")


def check_int(name: str, value, op: str) -> int:
    """An integer argument (ignore_index, chunk_size, ...): a float such as 1.5 or a bool is a
    TypeError naming ``name`` rather than a silent truncation."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"llmkern.{op}: {name} must be an int, got {value!r} "
                        f"({type(value).__name__})")
    return value.__index__()


def check_finite(name: str, value, op: str) -> float:
    """A real scalar argument that must be finite (a NaN or inf scale poisons every output)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"llmkern.{op}: {name} must be a float, got {value!r} "
                        f"({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"llmkern.{op}: {name} must be finite, got {value}")
    return value


def check_same_device(op: str, **tensors) -> None:
    """Raise ValueError when the given (non-None) tensors are not all on one device."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"llmkern.{op}: {name} is on {t.device} but {first_name} is on "
                             f"{first.device}; all inputs must be on one device")


def check_same_dtype(op: str, **tensors) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"llmkern.{op}: {name} has dtype {t.dtype} but {first_name} has "
                            f"{first.dtype}; they must match")


def check_vector(name: str, t: Optional[torch.Tensor], size: int, op: str, what: str,
                 dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> None:
    """A 1-D parameter (weight, bias) of length ``size``; ``what`` says where size comes from."""
    if t is None:
        return
    check_tensor(name, t, op, ndim=1, dtypes=dtypes)
    if t.shape[0] != size:
        raise ValueError(f"llmkern.{op}: {name} must have shape ({size},) to match {what}, "
                         f"got {describe(t)}")


def autocast_inputs(*tensors):
    """Under autocast, cast floating tensors to the autocast dtype, as autocast does for
    F.linear: the llmkern custom ops are opaque to autocast, and their kernels want matching
    half-precision inputs. Outside autocast (or for None), the tensors are returned as they are."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
