"""Flash attention launchers (Triton): tensors in, tensors out, no autograd.

Kernels live in ``attention_fwd.py`` / ``attention_bwd.py`` and the shared pieces (tile ranges,
score modifiers, dropout, tile configs) in ``attention_common.py``. Batched tensors are
(B, H, S, D) with any strides whose last one is 1; varlen tensors are packed (total, H, D).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .attention_bwd import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel
from .attention_common import LOG2E, block_d, config, device_arch, dkdv_parts
from .attention_fwd import _attn_fwd_kernel, _dropout_mask_kernel

PREPROCESS_BLOCK_M = 32


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _window_args(causal: bool, left: Optional[int], right: Optional[int]):
    """(left, right, HAS_LEFT, HAS_RIGHT) with causal folded into the right bound."""
    if causal:
        right = 0 if right is None else min(right, 0)
    return (left or 0, right or 0, left is not None, right is not None)


def _score_args(scale: float, softcap: float):
    """(qk_in, qk_out, SOFTCAP): s2 = qk * qk_out, or tanh(qk * qk_in) * qk_out with a softcap."""
    if softcap > 0.0:
        return scale / softcap, softcap * LOG2E, True
    return 1.0, scale * LOG2E, False


def _mask_args(attn_mask: Optional[torch.Tensor], q: torch.Tensor, sk: int):
    """(mask tensor, its 4 strides, MASK_KIND): expanded to (B, H, Sq, Sk) with stride-0 broadcasts."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), 0
    b, h, sq = q.shape[:3]
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(b, h, sq, sk)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
        return mask, mask.stride(), 1
    return mask, mask.stride(), 2


def _prec(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def _check_dropout_range(sq: int, sk: int, dropout_p: float) -> None:
    if dropout_p > 0.0 and sq * sk >= 2**31:
        raise ValueError(f"llmkern attention: dropout needs Sq * Sk < 2**31 (the counter of the "
                         f"in-kernel RNG), got Sq={sq}, Sk={sk}")


def _fwd(q, k, v, out, lse, mask, mask_strides, mask_kind, cu_q, cu_k, q_strides, k_strides,
         v_strides, o_strides, l_strides, grid_rows, batch, heads, group, sq, sk, scale, causal,
         left, right, softcap, dropout_p, seed, allow_tf32, varlen):
    d = q.shape[-1]
    bd = block_d(d)
    heavy = mask_kind != 0 or softcap > 0.0 or dropout_p > 0.0
    bm, bn, warps, stages = config("fwd", bd, q.dtype == torch.float32, device_arch(q.device), heavy)
    wl, wr, has_l, has_r = _window_args(causal, left, right)
    qk_in, qk_out, cap = _score_args(scale, softcap)
    grid = (triton.cdiv(grid_rows, bm), heads, batch)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, mask, cu_q, cu_k, *q_strides, *k_strides, *v_strides, *o_strides,
        *l_strides, *mask_strides, heads, group, sq, sk, wl, wr, qk_in, qk_out, dropout_p, seed,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IS_VARLEN=varlen, HAS_LEFT=has_l,
        HAS_RIGHT=has_r, SOFTCAP=cap, MASK_KIND=mask_kind, DROPOUT=dropout_p > 0.0,
        PREC=_prec(q.dtype, allow_tf32), num_warps=warps, num_stages=stages)


def attention_fwd(q, k, v, attn_mask, scale: float, causal: bool, left, right, softcap: float,
                  dropout_p: float, seed: int, allow_tf32: bool):
    """(out (B, H, Sq, D) contiguous, lse (B, H, Sq) fp32) for q (B, H, Sq, D), k/v (B, Hkv, Sk, D)."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    _check_dropout_range(sq, sk, dropout_p)
    out = torch.empty(b, h, sq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    mask, mstrides, mkind = _mask_args(attn_mask, q, sk)
    _fwd(q, k, v, out, lse, mask, mstrides, mkind, lse, lse, q.stride()[:3], k.stride()[:3],
         v.stride()[:3], out.stride()[:3], lse.stride(), sq, b, h, h // hkv, sq, sk, scale,
         causal, left, right, softcap, dropout_p, seed, allow_tf32, False)
    return out, lse


def _bwd(q, k, v, dout, lse, delta, dq, dk, dv, mask, mask_strides, mask_kind, cu_q, cu_k,
         q_strides, k_strides, v_strides, do_strides, dq_strides, dk_strides, dv_strides,
         l_strides, rows_q, rows_k, batch, heads, hkv, sq, sk, scale, causal, left, right,
         softcap, dropout_p, seed, allow_tf32, varlen):
    d = q.shape[-1]
    bd = block_d(d)
    fp32 = q.dtype == torch.float32
    arch = device_arch(q.device)
    wl, wr, has_l, has_r = _window_args(causal, left, right)
    qk_in, qk_out, cap = _score_args(scale, softcap)
    common = dict(HEAD_DIM=d, BLOCK_D=bd, IS_VARLEN=varlen, HAS_LEFT=has_l, HAS_RIGHT=has_r,
                  SOFTCAP=cap, MASK_KIND=mask_kind, DROPOUT=dropout_p > 0.0,
                  PREC=_prec(q.dtype, allow_tf32))
    scalars = (heads, heads // hkv, sq, sk, wl, wr, qk_in, qk_out, scale, dropout_p, seed)
    heavy = mask_kind != 0 or softcap > 0.0 or dropout_p > 0.0
    bm, bn, warps, stages = config("bwd_dkdv", bd, fp32, arch, heavy)
    for part in dkdv_parts(bd, fp32):
        _bwd_dkdv_kernel[(triton.cdiv(rows_k, bn), hkv, batch)](
            q, k, v, dout, lse, delta, dk, dv, mask, cu_q, cu_k, *q_strides, *k_strides,
            *v_strides, *do_strides, *dk_strides, *dv_strides, *l_strides, *mask_strides, *scalars,
            BLOCK_M=bm, BLOCK_N=bn, PART=part, num_warps=warps, num_stages=stages, **common)
    bm, bn, warps, stages = config("bwd_dq", bd, fp32, arch, heavy)
    _bwd_dq_kernel[(triton.cdiv(rows_q, bm), heads, batch)](
        q, k, v, dout, lse, delta, dq, mask, cu_q, cu_k, *q_strides, *k_strides, *v_strides,
        *do_strides, *dq_strides, *l_strides, *mask_strides, *scalars,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)


def _preprocess(out, dout, dlse, delta, o_strides, do_strides, l_strides, rows, heads, batch):
    d = out.shape[-1]
    _bwd_preprocess_kernel[(triton.cdiv(rows, PREPROCESS_BLOCK_M), heads, batch)](
        out, dout, dlse if dlse is not None else delta, delta, *o_strides, *do_strides,
        *l_strides, heads, rows, HEAD_DIM=d, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_D=block_d(d),
        HAS_DLSE=dlse is not None, num_warps=4)


def attention_bwd(dout, q, k, v, out, lse, dlse, attn_mask, scale: float, causal: bool, left,
                  right, softcap: float, dropout_p: float, seed: int, allow_tf32: bool):
    """(dq, dk, dv) in the shapes of q, k, v; dk/dv reduced over each kv head's query heads."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    dout, out = _last_contiguous(dout), _last_contiguous(out)
    lse = lse.contiguous()
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    delta = torch.empty_like(lse)
    dlse = dlse.contiguous().float() if dlse is not None else None
    _preprocess(out, dout, dlse, delta, out.stride()[:3], dout.stride()[:3], lse.stride(), sq, h, b)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    mask, mstrides, mkind = _mask_args(attn_mask, q, sk)
    _bwd(q, k, v, dout, lse, delta, dq, dk, dv, mask, mstrides, mkind, lse, lse,
         q.stride()[:3], k.stride()[:3], v.stride()[:3], dout.stride()[:3], dq.stride()[:3],
         dk.stride()[:3], dv.stride()[:3], lse.stride(), sq, sk, b, h, hkv, sq, sk, scale,
         causal, left, right, softcap, dropout_p, seed, allow_tf32, False)
    return dq, dk, dv


# ---- varlen: (total, H, D) packed sequences, sequence b = rows cu[b]:cu[b+1] ----------------

def _varlen_strides(t: torch.Tensor):
    return (0, t.stride(1), t.stride(0))  # (batch, head, token): the batch offset comes from cu


def varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool,
                         left, right, softcap: float, allow_tf32: bool):
    """(out (total_q, H, D), lse (H, total_q) fp32)."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    total_q, h, d = q.shape
    batch = cu_q.shape[0] - 1
    out = torch.empty(total_q, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(h, total_q, dtype=torch.float32, device=q.device)
    _fwd(q, k, v, out, lse, q, (0, 0, 0, 0), 0, cu_q.contiguous(), cu_k.contiguous(),
         _varlen_strides(q), _varlen_strides(k), _varlen_strides(v), _varlen_strides(out),
         (0, lse.stride(0), 1), max_q, batch, h, h // k.shape[1], max_q, max_k, scale, causal,
         left, right, softcap, 0.0, 0, allow_tf32, True)
    return out, lse


def varlen_attention_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q: int, max_k: int,
                         scale: float, causal: bool, left, right, softcap: float,
                         allow_tf32: bool):
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    dout, out = _last_contiguous(dout), _last_contiguous(out)
    lse = lse.contiguous()
    total_q, h, d = q.shape
    batch = cu_q.shape[0] - 1
    l_strides = (0, lse.stride(0), 1)
    delta = torch.empty_like(lse)
    dlse = dlse.contiguous().float() if dlse is not None else None
    _preprocess(out, dout, dlse, delta, _varlen_strides(out), _varlen_strides(dout), l_strides,
                total_q, h, 1)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _bwd(q, k, v, dout, lse, delta, dq, dk, dv, q, (0, 0, 0, 0), 0, cu_q.contiguous(),
         cu_k.contiguous(), _varlen_strides(q), _varlen_strides(k), _varlen_strides(v),
         _varlen_strides(dout), _varlen_strides(dq), _varlen_strides(dk), _varlen_strides(dv),
         l_strides, max_q, max_k, batch, h, k.shape[1], max_q, max_k, scale, causal, left, right,
         softcap, 0.0, 0, allow_tf32, True)
    return dq, dk, dv


def dropout_keep_mask(batch: int, heads: int, sq: int, sk: int, dropout_p: float, seed: int,
                      device) -> torch.Tensor:
    """The boolean keep-mask (B, H, Sq, Sk) the kernels draw for (seed, dropout_p)."""
    _check_dropout_range(sq, sk, dropout_p)
    keep = torch.empty(batch, heads, sq, sk, dtype=torch.uint8, device=device)
    grid = (triton.cdiv(sq, 32), triton.cdiv(sk, 32), batch * heads)
    _dropout_mask_kernel[grid](keep, heads, sq, sk, float(dropout_p), int(seed), BLOCK_M=32,
                               BLOCK_N=32)
    return keep.bool()


__all__ = ["attention_fwd", "attention_bwd", "varlen_attention_fwd", "varlen_attention_bwd",
           "dropout_keep_mask"]


def aot_configs(arch: int, dtypes=("fp16", "fp32")):
    """Every config the launchers can pick on sm_``arch`` (``shipped_configs``), as compiles at
    the largest head dim that uses it: plain configs with a causal sliding window, heavy ones
    (and fp32) with every feature on (window, softcap, additive mask, dropout)."""
    from llmkern.testing import AOTConfig

    from .attention_common import shipped_configs

    kernels = {"fwd": _attn_fwd_kernel, "bwd_dkdv": _bwd_dkdv_kernel, "bwd_dq": _bwd_dq_kernel}
    for (kind, fp32, heavy, cfg), bd in sorted(shipped_configs(arch).items()):
        for dt in dtypes:
            if (dt == "fp32") != fp32:
                continue
            kernel = kernels[kind]
            types = {}
            for p in kernel.params:
                if p.is_constexpr:
                    continue
                n = p.name
                if n in ("Lse", "Delta", "Mask"):
                    types[n] = "*fp32"
                elif n in ("CuQ", "CuK"):
                    types[n] = "*i32"
                elif n in ("qk_in", "qk_out", "scale", "dropout_p"):
                    types[n] = "fp32"
                elif n in ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV"):
                    types[n] = f"*{dt}"
                else:
                    types[n] = "i32"
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
