"""cross_entropy and linear_cross_entropy (fused LM head + loss): functional API and checks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmkern import reference
from llmkern.backends import select
from llmkern.ops import cuda_ext
from llmkern.ops._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor, describe

AUTO_ORDER = ("triton", "cuda")
REDUCTIONS = ("mean", "sum", "none")
_KERNELS_READY = False
# Checking that targets lie in [0, V) costs one device sync per call; set False to skip it
# (out-of-range targets then give a NaN loss for their row in the kernels, never a bad read).
CHECK_TARGET_RANGE = True


def _check_target(op: str, target, rows_shape: torch.Size, vocab: int, ignore_index: int,
                  other: Tensor, other_name: str) -> None:
    check_tensor("target", target, op, dtypes=(torch.int64, torch.int32),
                 allow_empty=True)
    if target.shape != rows_shape:
        raise ValueError(f"llmkern.{op}: target must have shape {tuple(rows_shape)} (the leading "
                         f"dims of {other_name}, {describe(other)}), got {describe(target)}")
    check_same_device(op, **{other_name: other, "target": target})
    if not CHECK_TARGET_RANGE or torch.compiler.is_compiling() or target.numel() == 0:
        return
    # One reduction and one sync: any target outside [0, V) that is not ignore_index.
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        first = target[bad].flatten()[0].item()
        raise ValueError(f"llmkern.{op}: target holds class index {first} outside [0, {vocab}) "
                         f"(vocab size from {other_name}.shape[-1]) that is not ignore_index "
                         f"({ignore_index})")


def _check_options(op: str, reduction: str, label_smoothing: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"llmkern.{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"llmkern.{op}: label_smoothing must be in [0, 1], got {label_smoothing}")


def _unsupported(op: str, logits_like: Tensor, **info):
    def unsupported(name: str) -> Optional[str]:
        if logits_like.dtype not in FLOAT_DTYPES:
            return f"dtype {logits_like.dtype} is not supported"
        if not _KERNELS_READY:
            return "the fused kernels of this op are being built (torch serves it meanwhile)"
        if name == "cuda":
            return cuda_ext.unsupported(op, **info)
        return None
    return unsupported


def _reference_rows(fn, target: Tensor, reduction: str, rows: Tensor, *args, **kwargs) -> Tensor:
    """The torch reference on (rows, last dim) views: F.cross_entropy wants classes in dim 1."""
    loss = fn(rows.reshape(-1, rows.shape[-1]), *args, target.reshape(-1).long(),
              reduction=reduction, **kwargs)
    return loss.view(target.shape) if reduction == "none" else loss


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """Cross-entropy of ``logits`` (..., V) against class indices ``target`` (...).

    The loss is float32 (math in fp32 for fp16/bf16 logits). 'mean' averages over the rows
    whose target is not ``ignore_index`` (0 when every row is ignored, never NaN); 'none'
    returns per-row losses of shape ``target.shape`` (0 on ignored rows). ``label_smoothing``
    as in torch.nn.functional.cross_entropy.
    """
    op = "cross_entropy"
    check_tensor("logits", logits, op, ndim=None)
    if logits.dim() < 1:
        raise ValueError(f"llmkern.{op}: logits must have at least 1 dimension (..., V), got "
                         f"{describe(logits)}")
    _check_options(op, reduction, label_smoothing)
    _check_target(op, target, logits.shape[:-1], logits.shape[-1], ignore_index, logits, "logits")
    chosen = select(op, logits.device, backend, _unsupported(op, logits, logits=logits))
    if chosen == "torch":
        return _reference_rows(reference.cross_entropy, target, reduction, logits,
                               ignore_index=ignore_index, label_smoothing=label_smoothing)
    from llmkern.ops import _ce_ops

    return _ce_ops.cross_entropy_op(logits, target, int(ignore_index), reduction,
                                    float(label_smoothing), chosen)


def linear_cross_entropy(hidden: Tensor, lm_weight: Tensor, target: Tensor, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         backend: Optional[str] = None, chunk_size: Optional[int] = None) -> Tensor:
    """``cross_entropy(hidden @ lm_weight.T, target)`` without materializing all the logits.

    hidden (..., C), lm_weight (V, C) (nn.Linear layout), target (...). Tokens are processed in
    chunks of ``chunk_size`` rows (default: chosen from V and C to bound memory); gradients for
    hidden and lm_weight are computed in the forward pass and scaled in the backward.
    """
    op = "linear_cross_entropy"
    check_tensor("hidden", hidden, op)
    check_tensor("lm_weight", lm_weight, op, ndim=2)
    if lm_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"llmkern.{op}: lm_weight must have shape (vocab, {hidden.shape[-1]}) "
                         f"(nn.Linear layout) to match the last dim of hidden ({describe(hidden)}), "
                         f"got {describe(lm_weight)}")
    check_same_device(op, hidden=hidden, lm_weight=lm_weight)
    check_same_dtype(op, hidden=hidden, lm_weight=lm_weight)
    _check_options(op, reduction, label_smoothing)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"llmkern.{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_target(op, target, hidden.shape[:-1], lm_weight.shape[0], ignore_index, hidden, "hidden")
    chosen = select(op, hidden.device, backend,
                    _unsupported(op, hidden, hidden=hidden, lm_weight=lm_weight))
    if chosen == "torch":
        return _reference_rows(reference.linear_cross_entropy, target, reduction, hidden, lm_weight,
                               ignore_index=ignore_index, label_smoothing=label_smoothing)
    from llmkern.ops import _ce_ops

    return _ce_ops.linear_cross_entropy_op(hidden, lm_weight, target, int(ignore_index), reduction,
                                           float(label_smoothing), chosen, chunk_size)
