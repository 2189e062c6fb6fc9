"""Input checks of the attention functions: clear errors naming the argument, its shape and
dtype, and what was expected, before any backend is chosen (so every backend refuses alike)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from llmkern.ops._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor, describe

MAX_HEAD_DIM = 256
# float64 runs on the torch reference (no kernel serves it), as PyTorch's SDPA accepts it.
ATTENTION_DTYPES = FLOAT_DTYPES + (torch.float64,)


def check_qkv(op: str, names, q, k, v, rank: int, allow_empty: bool = False,
              max_head_dim: Optional[int] = MAX_HEAD_DIM) -> None:
    """Shapes (B, H, S, D) (rank 4) or (total, H, D) (rank 3); dtypes, devices, heads, head_dim."""
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        check_tensor(name, t, op, ndim=rank, dtypes=ATTENTION_DTYPES, allow_empty=allow_empty)
    check_same_device(op, **{nq: q, nk: k, nv: v})
    check_same_dtype(op, **{nq: q, nk: k, nv: v})
    hd = 1  # the heads dim: (B, H, S, D) and (total, H, D) both have it at index 1
    if rank == 4 and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"llmkern.{op}: batch sizes differ: {nq} {describe(q)}, {nk} {describe(k)}, "
                         f"{nv} {describe(v)}")
    if k.shape != v.shape:
        raise ValueError(f"llmkern.{op}: {nk} and {nv} must have the same shape, got {nk} "
                         f"{describe(k)} and {nv} {describe(v)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"llmkern.{op}: head_dim of {nq} ({describe(q)}) and {nk} ({describe(k)}) "
                         f"must match")
    if max_head_dim is not None and q.shape[-1] > max_head_dim:
        raise ValueError(f"llmkern.{op}: head_dim {q.shape[-1]} of {nq} ({describe(q)}) exceeds the "
                         f"supported maximum {max_head_dim}")
    hq, hkv = q.shape[hd], k.shape[hd]
    if (hq % hkv != 0) if hkv else hq != 0:
        raise ValueError(f"llmkern.{op}: the {hq} heads of {nq} ({describe(q)}) must be a "
                         f"multiple of the {hkv} heads of {nk} ({describe(k)})")


def check_mask(op: str, attn_mask: Optional[Tensor], q: Tensor, k: Tensor, name="attn_mask"):
    if attn_mask is None:
        return
    check_tensor(name, attn_mask, op, dtypes=(torch.bool,) + ATTENTION_DTYPES, allow_empty=True)
    check_same_device(op, q=q, **{name: attn_mask})
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    ok = attn_mask.dim() <= 4 and all(
        m in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target)))
    if not ok:
        raise ValueError(f"llmkern.{op}: {name} ({describe(attn_mask)}) does not broadcast to "
                         f"(batch, heads, Sq, Sk) = {target}")
    if attn_mask.requires_grad and torch.is_grad_enabled():
        # The kernels do not produce d(attn_mask); refusing on every backend keeps them alike.
        raise ValueError(f"llmkern.{op}: {name} ({describe(attn_mask)}) requires grad, but no "
                         f"llmkern backend computes a gradient for {name}; pass "
                         f"{name}.detach() or use torch.nn.functional.scaled_dot_product_attention")


def check_window(op: str, window) -> tuple[Optional[int], Optional[int]]:
    if window is None:
        return None, None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"llmkern.{op}: window must be None or a pair (left, right), got {window!r}")
    for side, w in zip(("left", "right"), window):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ValueError(f"llmkern.{op}: window {side} must be None or an int >= 0, got {w!r}")
    return window[0], window[1]


def check_scalars(op: str, scale, softcap, dropout_p=0.0) -> None:
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"llmkern.{op}: scale must be a finite number or None, got {scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0
                                    and math.isfinite(softcap)):
        raise ValueError(f"llmkern.{op}: softcap must be a finite number > 0 or None, got {softcap!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"llmkern.{op}: dropout_p must be in [0, 1), got {dropout_p!r}")


def check_offsets_shape(op: str, q: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                        max_seqlen_q, max_seqlen_k) -> None:
    """What can be checked without reading the offsets: dtype, rank, device, length, max_seqlen."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, op, ndim=1, dtypes=(torch.int32, torch.int64))
        check_same_device(op, q=q, **{name: cu})
        if cu.shape[0] < 2:
            raise ValueError(f"llmkern.{op}: {name} must hold B + 1 >= 2 offsets, got {describe(cu)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"llmkern.{op}: cu_seqlens_q ({describe(cu_seqlens_q)}) and cu_seqlens_k "
                         f"({describe(cu_seqlens_k)}) must have the same length")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"llmkern.{op}: {name} must be an int >= 1, got {m!r}")


def check_offsets_values(op: str, q: Tensor, k: Tensor, cu_seqlens_q: Tensor,
                         cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int) -> None:
    """The offsets' values: each starts at 0, never decreases, ends at the row count of its
    tensors, and no sequence is longer than its max_seqlen. Kernels index memory by these
    offsets, so a wrong one reads and writes out of bounds. Reads both offset tensors to the
    host in one copy: one device -> host synchronization."""
    host = torch.stack([cu_seqlens_q.long(), cu_seqlens_k.long()]).cpu()
    checks = (("cu_seqlens_q", host[0], "q", q, "max_seqlen_q", max_seqlen_q),
              ("cu_seqlens_k", host[1], "k", k, "max_seqlen_k", max_seqlen_k))
    for name, cu, t_name, t, max_name, max_len in checks:
        if cu[0] != 0:
            raise ValueError(f"llmkern.{op}: {name}[0] must be 0, got {int(cu[0])}")
        lens = cu[1:] - cu[:-1]
        bad = (lens < 0).nonzero()
        if bad.numel():
            i = int(bad[0]) + 1
            raise ValueError(f"llmkern.{op}: {name} must be non-decreasing, but {name}[{i}] = "
                             f"{int(cu[i])} < {name}[{i - 1}] = {int(cu[i - 1])}")
        last = cu.shape[0] - 1
        if cu[last] != t.shape[0]:
            raise ValueError(f"llmkern.{op}: {name}[{last}] = {int(cu[last])} must equal the "
                             f"{t.shape[0]} rows of {t_name} ({describe(t)})")
        longest = int(lens.argmax())
        if lens[longest] > max_len:
            raise ValueError(f"llmkern.{op}: {max_name}={max_len} is shorter than sequence "
                             f"{longest} ({name}[{longest + 1}] - {name}[{longest}] = "
                             f"{int(lens[longest])} rows)")
