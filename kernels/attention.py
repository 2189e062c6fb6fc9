"""Flash attention launchers (Triton): tensors in, tensors out, no autograd.

Kernels live in ``attention_fwd.py`` / ``attention_bwd.py`` and the shared pieces (tile ranges,
score modifiers, dropout, tile configs) in ``attention_common.py``. Batched tensors are
(B, H, S, D) with any strides whose last one is 1; varlen tensors are packed (total, H, D).
Launchers take the call's options as one ``AttentionOptions`` record (and varlen offsets as a
``VarlenOffsets``); the launches inside read an ``AttentionShape`` and a ``MaskArg``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .attention_bwd import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel
from .attention_common import block_d, config, device_arch, dkdv_parts
from .attention_fwd import _attn_fwd_kernel, _dropout_mask_kernel
from .attention_options import AttentionOptions, AttentionShape, MaskArg, VarlenOffsets

PREPROCESS_BLOCK_M = 32


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_dropout_range(sq: int, sk: int, dropout_p: float) -> None:
    if dropout_p > 0.0 and sq * sk >= 2**31:
        raise ValueError(f"llmkern attention: dropout needs Sq * Sk < 2**31 (the counter of the "
                         f"in-kernel RNG), got Sq={sq}, Sk={sk}")


def _fwd(q, k, v, out, lse, shape: AttentionShape, mask: MaskArg, opts: AttentionOptions):
    """The forward launch: writes out and lse for every row of ``shape``."""
    d = q.shape[-1]
    bd = block_d(d)
    bm, bn, warps, stages = config("fwd", bd, q.dtype == torch.float32, device_arch(q.device),
                                   opts.heavy(mask))
    wl, wr, has_l, has_r = opts.window_args()
    qk_in, qk_out, cap = opts.score_args()
    cu_q, cu_k = shape.offsets(lse)
    grid = (triton.cdiv(shape.seqlen_q, bm), shape.heads, shape.batch)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, q if mask.tensor is None else mask.tensor, cu_q, cu_k,
        *shape.strides(q), *shape.strides(k), *shape.strides(v), *shape.strides(out),
        *shape.lse_strides(lse), *mask.strides, shape.heads, shape.group, shape.seqlen_q,
        shape.seqlen_k, wl, wr, qk_in, qk_out, opts.dropout_p, opts.seed,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IS_VARLEN=shape.varlen is not None,
        HAS_LEFT=has_l, HAS_RIGHT=has_r, SOFTCAP=cap, MASK_KIND=mask.kind,
        DROPOUT=opts.dropout_p > 0.0, PREC=opts.precision(q.dtype), num_warps=warps,
        num_stages=stages)


def _preprocess(out, dout, dlse, delta, shape: AttentionShape):
    """delta = rowsum(dO * O) - dlse, in lse's layout."""
    d = out.shape[-1]
    # Packed rows are one flat run per head; dense rows are Sq per (batch, head).
    rows, batch = (out.shape[0], 1) if shape.varlen is not None else (shape.seqlen_q, shape.batch)
    _bwd_preprocess_kernel[(triton.cdiv(rows, PREPROCESS_BLOCK_M), shape.heads, batch)](
        out, dout, dlse if dlse is not None else delta, delta, *shape.strides(out),
        *shape.strides(dout), *shape.lse_strides(delta), shape.heads, rows, HEAD_DIM=d,
        BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_D=block_d(d), HAS_DLSE=dlse is not None, num_warps=4)


def _bwd(q, k, v, dout, lse, delta, dq, dk, dv, shape: AttentionShape, mask: MaskArg,
         opts: AttentionOptions):
    """The backward launches after ``_preprocess``: dK/dV per kv head, then dQ."""
    d = q.shape[-1]
    bd = block_d(d)
    fp32 = q.dtype == torch.float32
    arch = device_arch(q.device)
    heavy = opts.heavy(mask)
    wl, wr, has_l, has_r = opts.window_args()
    qk_in, qk_out, cap = opts.score_args()
    cu_q, cu_k = shape.offsets(lse)
    mask_t = q if mask.tensor is None else mask.tensor
    common = dict(HEAD_DIM=d, BLOCK_D=bd, IS_VARLEN=shape.varlen is not None, HAS_LEFT=has_l,
                  HAS_RIGHT=has_r, SOFTCAP=cap, MASK_KIND=mask.kind, DROPOUT=opts.dropout_p > 0.0,
                  PREC=opts.precision(q.dtype))
    scalars = (shape.heads, shape.group, shape.seqlen_q, shape.seqlen_k, wl, wr, qk_in, qk_out,
               opts.scale, opts.dropout_p, opts.seed)
    qkv_strides = (*shape.strides(q), *shape.strides(k), *shape.strides(v), *shape.strides(dout))
    lse_strides = shape.lse_strides(lse)
    bm, bn, warps, stages = config("bwd_dkdv", bd, fp32, arch, heavy)
    for part in dkdv_parts(bd, fp32):
        _bwd_dkdv_kernel[(triton.cdiv(shape.seqlen_k, bn), shape.kv_heads, shape.batch)](
            q, k, v, dout, lse, delta, dk, dv, mask_t, cu_q, cu_k, *qkv_strides,
            *shape.strides(dk), *shape.strides(dv), *lse_strides, *mask.strides, *scalars,
            BLOCK_M=bm, BLOCK_N=bn, PART=part, num_warps=warps, num_stages=stages, **common)
    bm, bn, warps, stages = config("bwd_dq", bd, fp32, arch, heavy)
    _bwd_dq_kernel[(triton.cdiv(shape.seqlen_q, bm), shape.heads, shape.batch)](
        q, k, v, dout, lse, delta, dq, mask_t, cu_q, cu_k, *qkv_strides, *shape.strides(dq),
        *lse_strides, *mask.strides, *scalars,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)


def _backward(dout, q, k, v, out, lse, dlse, shape: AttentionShape, mask: MaskArg,
              opts: AttentionOptions):
    """(dq, dk, dv) for last-dim-contiguous inputs, in either layout."""
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    dlse = dlse.contiguous().float() if dlse is not None else None
    _preprocess(out, dout, dlse, delta, shape)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _bwd(q, k, v, dout, lse, delta, dq, dk, dv, shape, mask, opts)
    return dq, dk, dv


def _inputs(*ts):
    return tuple(_last_contiguous(t) for t in ts)


def attention_fwd(q, k, v, attn_mask: Optional[torch.Tensor], opts: AttentionOptions):
    """(out (B, H, Sq, D) contiguous, lse (B, H, Sq) fp32) for q (B, H, Sq, D), k/v (B, Hkv, Sk, D)."""
    q, k, v = _inputs(q, k, v)
    shape = AttentionShape.dense(q, k)
    _check_dropout_range(shape.seqlen_q, shape.seqlen_k, opts.dropout_p)
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    _fwd(q, k, v, out, lse, shape, MaskArg.of(attn_mask, shape), opts)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, dlse, attn_mask: Optional[torch.Tensor],
                  opts: AttentionOptions):
    """(dq, dk, dv) in the shapes of q, k, v; dk/dv reduced over each kv head's query heads."""
    q, k, v, dout, out = _inputs(q, k, v, dout, out)
    shape = AttentionShape.dense(q, k)
    return _backward(dout, q, k, v, out, lse, dlse, shape, MaskArg.of(attn_mask, shape), opts)


# ---- varlen: (total, H, D) packed sequences, sequence b = rows cu[b]:cu[b+1] ----------------
# The offsets are trusted here: the functional layer validates them (llmkern.varlen_attention).

def _no_dropout(opts: AttentionOptions) -> None:
    if opts.dropout_p != 0.0:
        raise ValueError(f"llmkern varlen attention: dropout is not supported, got dropout_p="
                         f"{opts.dropout_p}")


def varlen_attention_fwd(q, k, v, varlen: VarlenOffsets, opts: AttentionOptions):
    """(out (total_q, H, D), lse (H, total_q) fp32)."""
    _no_dropout(opts)
    q, k, v = _inputs(q, k, v)
    total_q, h, _ = q.shape
    out = torch.empty(total_q, h, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(h, total_q, dtype=torch.float32, device=q.device)
    _fwd(q, k, v, out, lse, AttentionShape.packed(q, k, varlen), MaskArg(), opts)
    return out, lse


def varlen_attention_bwd(dout, q, k, v, out, lse, dlse, varlen: VarlenOffsets,
                         opts: AttentionOptions):
    """(dq, dk, dv) in the shapes of the packed q, k, v."""
    _no_dropout(opts)
    q, k, v, dout, out = _inputs(q, k, v, dout, out)
    return _backward(dout, q, k, v, out, lse, dlse, AttentionShape.packed(q, k, varlen),
                     MaskArg(), opts)


def dropout_keep_mask(batch: int, heads: int, sq: int, sk: int, dropout_p: float, seed: int,
                      device) -> torch.Tensor:
    """The boolean keep-mask (B, H, Sq, Sk) the kernels draw for (seed, dropout_p)."""
    _check_dropout_range(sq, sk, dropout_p)
    keep = torch.empty(batch, heads, sq, sk, dtype=torch.uint8, device=device)
    grid = (triton.cdiv(sq, 32), triton.cdiv(sk, 32), batch * heads)
    _dropout_mask_kernel[grid](keep, heads, sq, sk, float(dropout_p), int(seed), BLOCK_M=32,
                               BLOCK_N=32)
    return keep.bool()


__all__ = ["AttentionOptions", "VarlenOffsets", "attention_fwd", "attention_bwd",
           "varlen_attention_fwd", "varlen_attention_bwd", "dropout_keep_mask"]


def aot_configs(arch: int, dtypes=("fp16", "fp32")):
    """Every config the launchers can pick on sm_``arch`` (``shipped_configs``), as compiles at
    the largest head dim that uses it: plain configs with a causal sliding window, heavy ones
    (and fp32) with every feature on (window, softcap, additive mask, dropout)."""
    from llmkern.testing import AOTConfig

    from .attention_common import aot_types, shipped_configs

    kernels = {"fwd": _attn_fwd_kernel, "bwd_dkdv": _bwd_dkdv_kernel, "bwd_dq": _bwd_dq_kernel}
    for (kind, fp32, heavy, cfg), bd in sorted(shipped_configs(arch).items()):
        for dt in dtypes:
            if (dt == "fp32") != fp32:
                continue
            kernel = kernels[kind]
            types = aot_types(kernel, dt)
            bm, bn, warps, stages = cfg
            parts = dkdv_parts(bd, fp32) if kind == "bwd_dkdv" else (None,)
            for part in parts:
                extra = {} if part is None else {"PART": part}
                yield AOTConfig(kernel, types, dict(extra,
                    HEAD_DIM=bd, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IS_VARLEN=False,
                    HAS_LEFT=True, HAS_RIGHT=True, SOFTCAP=heavy, MASK_KIND=2 if heavy else 0,
                    DROPOUT=heavy, PREC="ieee"), warps, stages,
                    name=(f"attn_{kind}-{dt}-d{bd}-{bm}x{bn}-w{warps}s{stages}-"
                          f"{'heavy' if heavy else 'plain'}" + ("" if part is None else f"-part{part}")),
                    ones=("sls",))  # lse rows are contiguous: the JIT makes that stride a constant
