"""Plain-PyTorch references of every llmkern op.

They are the ``torch`` backend on every device and the oracle of the tests (called on float64
inputs). They compute in the input dtype the way PyTorch eager does (softmax statistics in
fp32 for half inputs), use SDPA where it serves the call, and never loop over tokens.
Semantics shared by every backend: causal and window masks are bottom-right aligned
(query i sees key j <= i + Sk - Sq), a row that sees no key gives zeros and lse = -inf.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Window = Optional[Tuple[Optional[int], Optional[int]]]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax/loss statistics dtype: fp32 for half inputs, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def visible_keys(sq: int, sk: int, causal: bool, window: Window, device=None,
                 len_q: Optional[torch.Tensor] = None, len_k: Optional[torch.Tensor] = None):
    """Boolean (Sq, Sk) mask of the keys each query may see, or None when it sees all.

    With ``len_q``/``len_k`` (per-sequence lengths, shape (B,)) the mask is (B, 1, Sq, Sk) and
    aligned per sequence, with padding keys (j >= len_k) hidden: the varlen layout.
    """
    if not causal and window is None and len_k is None:
        return None
    i = torch.arange(sq, device=device).view(-1, 1)
    j = torch.arange(sk, device=device).view(1, -1)
    if len_k is not None:
        shift = (len_k - len_q).view(-1, 1, 1, 1)
        diag = j - (i + shift)  # (B, 1, Sq, Sk)
        allowed = j < len_k.view(-1, 1, 1, 1)
    else:
        diag = j - (i + sk - sq)
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    return restrict_to_window(allowed, diag, causal, window)


def restrict_to_window(allowed: torch.Tensor, diag: torch.Tensor, causal: bool,
                       window: Window) -> torch.Tensor:
    """Narrow ``allowed`` to the causal/window band; ``diag`` is j - (i + Sk - Sq) per element."""
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    if right is not None:
        allowed = allowed & (diag <= right)
    if left is not None:
        allowed = allowed & (diag >= -left)
    return allowed


def _expand_kv_heads(k: torch.Tensor, heads: int) -> torch.Tensor:
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)


def attention(q, k, v, causal: bool = False, scale: Optional[float] = None, window: Window = None,
              softcap: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, return_lse: bool = False,
              dropout_mask: Optional[torch.Tensor] = None):
    """Attention over (B, H, Sq, D) queries and (B, Hkv, Sk, D) keys/values.

    ``dropout_mask`` (bool, broadcastable to (B, H, Sq, Sk), True = keep) replays a given
    dropout pattern; without it dropout draws from torch's generator.
    """
    sq, sk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    plain = (softcap is None and window is None and not return_lse and attn_mask is None
             and dropout_mask is None and (not causal or sq <= sk))
    if plain:
        mask = visible_keys(sq, sk, causal and sq != sk, None, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=causal and sq == sk, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    heads = q.shape[1]
    k, v = _expand_kv_heads(k, heads), _expand_kv_heads(v, heads)
    stat = _stat_dtype(q.dtype)
    s = torch.matmul(q, k.transpose(-1, -2)).to(stat) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(stat)
    allowed = visible_keys(sq, sk, causal, window, q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    p = torch.where(finite.unsqueeze(-1), p, torch.zeros_like(p))
    if dropout_p > 0.0 or dropout_mask is not None:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(p) >= dropout_p
        p = p * dropout_mask / (1.0 - dropout_p)
    out = torch.matmul(p.to(v.dtype), v)
    if return_lse:
        return out, lse.to(torch.float32) if stat != torch.float64 else lse
    return out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """PyTorch's SDPA exactly (top-left causal alignment)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                          dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     causal: bool = False, scale: Optional[float] = None, window: Window = None,
                     softcap: Optional[float] = None):
    """Packed sequences (total, H, D) with cumulative lengths, as ``flash_attn_varlen_func``.

    Pads to (B, H, max_seqlen, D), masks per sequence, and packs the result back.
    """
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()

    def pad(x, cu, lens, max_len):
        pos = torch.arange(max_len, device=x.device)
        valid = pos.view(1, -1) < lens.view(-1, 1)
        index = (cu[:-1].long().view(-1, 1) + pos.view(1, -1)).clamp(max=max(x.shape[0] - 1, 0))
        return x[index].transpose(1, 2), valid  # (B, H, max_len, D), (B, max_len)

    qp, valid_q = pad(q, cu_seqlens_q, len_q, max_seqlen_q)
    kp, _ = pad(k, cu_seqlens_k, len_k, max_seqlen_k)
    vp, _ = pad(v, cu_seqlens_k, len_k, max_seqlen_k)
    mask = visible_keys(max_seqlen_q, max_seqlen_k, causal, window, q.device, len_q, len_k)
    out = attention(qp, kp, vp, scale=scale, softcap=softcap, attn_mask=mask)
    return out.transpose(1, 2)[valid_q]


def _norm_dtype(x, *params) -> torch.dtype:
    """Parameters of another dtype than x are applied in the wider of the two (x's dtype out)."""
    dtype = x.dtype
    for p in params:
        if p is not None:
            dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, residual=None):
    """LayerNorm over the last dim; weight/bias may have another dtype, the output has x's.
    With ``residual``: ``(layer_norm(h), h)`` for ``h = x + residual``."""
    if residual is not None:
        h = x + residual
        return layer_norm(h, weight, bias, eps), h
    dtype = _norm_dtype(x, weight, bias)
    if dtype == x.dtype and all(p is None or p.dtype == dtype for p in (weight, bias)):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    cast = [None if t is None else t.to(dtype) for t in (x, weight, bias)]
    return F.layer_norm(cast[0], (x.shape[-1],), cast[1], cast[2], eps).to(x.dtype)


def rms_norm(x, weight=None, eps: float = 1e-6, residual=None):
    """RMSNorm over the last dim; weight may have another dtype, the output has x's.
    With ``residual``: ``(rms_norm(h), h)`` for ``h = x + residual``."""
    if residual is not None:
        h = x + residual
        return rms_norm(h, weight, eps), h
    dtype = _norm_dtype(x, weight)
    if weight is None or weight.dtype == x.dtype:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.to(dtype), (x.shape[-1],), weight.to(dtype), eps).to(x.dtype)


def softmax(x, scale: float = 1.0, causal: bool = False):
    """Softmax over the last dim of ``scale * x``; causal masks (..., Sq, Sk) bottom-right.

    A row that sees no key (causal with Sq > Sk) or whose scores are all -inf is all zeros, on
    every backend, as attention gives for a row that sees no key (torch.softmax gives NaN).
    """
    s = x.to(_stat_dtype(x.dtype)) * scale
    if causal:
        s = s.masked_fill(~visible_keys(x.shape[-2], x.shape[-1], True, None, x.device),
                          float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    y = e / e.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(e.dtype).tiny)
    return y.to(x.dtype)


def linear_gelu(x, weight, bias=None):
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
    return F.linear(linear_gelu(x, fc_weight, fc_bias), proj_weight, proj_bias)


def cross_entropy(logits, target, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0):
    """Cross-entropy in fp32 (float64 for float64 logits); 'mean' over non-ignored rows, 0 if none."""
    losses = F.cross_entropy(logits.to(_stat_dtype(logits.dtype)), target,
                             ignore_index=ignore_index, reduction="none",
                             label_smoothing=label_smoothing)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / (target != ignore_index).sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def linear_cross_entropy(hidden, lm_weight, target, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0):
    return cross_entropy(F.linear(hidden, lm_weight), target, ignore_index, reduction,
                         label_smoothing)
