"""LM-head loss options over the fused linear cross-entropy: an LM-head bias, class weights,
z-loss (``lse_square_scale``) and the per-row log-sum-exp, still without forming the logits.

Each option is computed from the per-row losses of ``linear_cross_entropy(reduction='none')``
and one gathered row of the weight per token: the target logit ``z_t = h . W[t] + b[t]`` gives
``lse = loss + z_t`` (with label smoothing ``eps``: ``loss + (1 - eps) z_t + eps * mean_j z_j``,
the mean logit being ``h . mean_j W[j] + mean(b)``). A bias is folded into the GEMM as one more
input feature (``[h, 1] @ [W, b].T``), which copies hidden and the weight once.

A final-logit ``softcap`` (Gemma2: ``c * tanh(z / c)``) is not in the fused kernels: it is served
chunk by chunk in PyTorch, each chunk's logits recomputed in the backward (checkpointed), so
only one chunk of logits exists at a time.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from torch.utils.checkpoint import checkpoint

from llmkern.ops._checks import ANY_FLOAT, check_finite, check_tensor, describe

OP = "linear_cross_entropy"


# Logits per softcap chunk (rows x vocab), fp32: 2^24 elements, 64 MiB.
SOFTCAP_CHUNK_ELEMENTS = 1 << 24


def _softcap_chunk(h, w, t, ignore_index, label_smoothing, softcap):
    logits = F.linear(h, w).float()
    logits = softcap * torch.tanh(logits / softcap)
    rows = F.cross_entropy(logits, t.long(), ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    return rows, logits.logsumexp(-1)


def softcap_rows(h2, w, t, ignore_index, label_smoothing, softcap):
    """(per-row losses, per-row lse) with capped logits, one checkpointed chunk at a time."""
    n = max(1, SOFTCAP_CHUNK_ELEMENTS // w.shape[0])
    parts = [checkpoint(_softcap_chunk, h2[i:i + n], w, t[i:i + n], ignore_index, label_smoothing,
                        softcap, use_reentrant=False) for i in range(0, h2.shape[0], n)]
    if not parts:
        empty = h2.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _check(hidden, lm_weight, bias, class_weight, lse_square_scale, label_smoothing, softcap):
    vocab = lm_weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, OP, ndim=1, dtypes=ANY_FLOAT)
        if bias.shape[0] != vocab or bias.dtype != lm_weight.dtype or bias.device != lm_weight.device:
            raise ValueError(f"llmkern.{OP}: bias must have shape ({vocab},) and lm_weight's dtype "
                             f"and device ({describe(lm_weight)}), got {describe(bias)}")
    if class_weight is not None:
        check_tensor("class_weight", class_weight, OP, ndim=1, dtypes=ANY_FLOAT)
        if class_weight.shape[0] != vocab or class_weight.device != hidden.device:
            raise ValueError(f"llmkern.{OP}: class_weight must have shape ({vocab},) on "
                             f"{hidden.device} (one weight per class), got {describe(class_weight)}")
        if label_smoothing:
            raise ValueError(f"llmkern.{OP}: class_weight with label_smoothing is not supported")
    if softcap is not None and not check_finite("softcap", softcap, OP) > 0:
        raise ValueError(f"llmkern.{OP}: softcap must be None or > 0, got {softcap}")
    scale = check_finite("lse_square_scale", lse_square_scale, OP)
    if scale < 0:
        raise ValueError(f"llmkern.{OP}: lse_square_scale must be >= 0, got {scale}")


def lm_head_loss(hidden: Tensor, lm_weight: Tensor, target: Tensor,
                 bias: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                 class_weight: Optional[Tensor] = None, return_z_loss: bool = False,
                 return_lse: bool = False, softcap: Optional[float] = None,
                 backend: Optional[str] = None, chunk_size: Optional[int] = None):
    """``cross_entropy(hidden @ lm_weight.T + bias, target)`` with the options of fused LM-head
    losses, never forming all the logits: hidden (..., C), lm_weight (V, C), bias (V,) or None,
    target (...).

    The per-row losses come from :func:`llmkern.linear_cross_entropy` (``backend``,
    ``chunk_size``) or, with ``softcap``, from checkpointed PyTorch chunks. Returns the loss
    (z-loss included), then the z-loss
    when ``return_z_loss`` and the per-row lse (fp32, shape ``target.shape``, 0 on ignored rows)
    when ``return_lse``. 'mean' divides the cross-entropy by the summed class weights of the
    valid rows (their count without ``class_weight``, as torch.nn.functional.cross_entropy) and
    the z-loss by the count of valid rows; 0 when every row is ignored.
    """
    _check(hidden, lm_weight, bias, class_weight, lse_square_scale, label_smoothing, softcap)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1)
    w = lm_weight
    if bias is not None:  # one more feature: [h, 1] @ [W, b].T = h @ W.T + b
        h2 = torch.cat((h2, h2.new_ones(h2.shape[0], 1)), dim=1)
        w = torch.cat((lm_weight, bias[:, None]), dim=1)
    valid = t != ignore_index
    safe_t = torch.where(valid, t, torch.zeros_like(t)).long()
    need_lse = return_lse or lse_square_scale > 0
    lse = None
    if softcap is not None:
        rows, lse = softcap_rows(h2, w, t, ignore_index, label_smoothing, float(softcap))
        lse = torch.where(valid, lse, torch.zeros_like(lse))
    else:
        from llmkern.ops.cross_entropy import linear_cross_entropy

        rows = linear_cross_entropy(h2, w, t, ignore_index, "none", label_smoothing,
                                    backend=backend, chunk_size=chunk_size)
    if need_lse and lse is None:
        z_t = (h2.float() * w[safe_t].float()).sum(-1)
        lse = rows + (1.0 - label_smoothing) * z_t
        if label_smoothing:
            lse = lse + label_smoothing * (h2.float() @ w.float().mean(0))
        lse = torch.where(valid, lse, torch.zeros_like(lse))
    ce = rows
    denom = valid.sum()
    if class_weight is not None:
        cw = torch.where(valid, class_weight.float()[safe_t], torch.zeros_like(rows))
        ce = rows * cw
        denom_ce = cw.sum()
    else:
        denom_ce = denom
    z = lse_square_scale * lse.square() if lse_square_scale > 0 else torch.zeros_like(rows)
    if reduction == "none":
        loss, z_loss = (ce + z).view(target.shape), z.view(target.shape)
    elif reduction == "sum":
        z_loss = z.sum()
        loss = ce.sum() + z_loss
    else:
        z_loss = torch.where(denom > 0, z.sum() / denom.clamp(min=1), z.new_zeros(()))
        ce_mean = torch.where(denom_ce != 0, ce.sum() / torch.where(denom_ce != 0, denom_ce,
                                                                     torch.ones_like(denom_ce)),
                              ce.new_zeros(()))
        loss = ce_mean + z_loss
    if not (return_z_loss or return_lse):
        return loss
    out = (loss,)
    if return_z_loss:
        out += (z_loss,)
    if return_lse:
        out += (lse.view(target.shape),)
    return out


def lm_head_loss_reference(hidden, lm_weight, target, bias=None, ignore_index=-100,
                           reduction="mean", label_smoothing=0.0, lse_square_scale=0.0,
                           class_weight=None, softcap=None):
    """Plain PyTorch with the full logits (the oracle of the tests): (loss, z_loss, lse)."""
    logits = F.linear(hidden, lm_weight, bias).float().reshape(-1, lm_weight.shape[0])
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    t = target.reshape(-1)
    ce = F.cross_entropy(logits, t.long(), weight=None if class_weight is None else class_weight.float(),
                         ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = t != ignore_index
    lse = torch.where(valid, logits.logsumexp(-1), torch.zeros_like(ce))
    z = lse_square_scale * lse.square()
    if reduction == "none":
        return (ce + z).view(target.shape), z.view(target.shape), lse.view(target.shape)
    if reduction == "sum":
        return ce.sum() + z.sum(), z.sum(), lse.view(target.shape)
    n = valid.sum().clamp(min=1)
    denom = n if class_weight is None else \
        class_weight.float()[torch.where(valid, t, 0).long()][valid].sum()
    return ce.sum() / denom + z.sum() / n, z.sum() / n, lse.view(target.shape)
