"""Rotary position embeddings (RoPE) on (batch, heads, seq, head_dim) tensors (Triton).

One launch rotates q and k; one program rotates one (batch, seq) position for a block of heads
of either, so the cos/sin row is read once and reused by every head of the block. Layouts:
half-split (pairs ``(i, i + R/2)``, as GPT-NeoX and Llama) or interleaved (pairs
``(2i, 2i + 1)``, as GPT-J). Dims past the rotary
dim ``R = 2 * cos.shape[-1]`` are copied unchanged. The backward is the same rotation by the
negated angle (``CONJ``), since a rotation's transpose is its inverse.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Heads per program: enough to amortize the cos/sin load, few enough to keep registers low.
MAX_BLOCK_H = 8
MAX_HEAD_DIM = 512


@triton.jit
def _rotary_kernel(Q, K, QO, KO, COS, SIN, POS, S, HQ, HK, D, R2, NBQ,
                   sqb, sqh, sqs, skb, skh, sks, sob, soh, sos, spb_o, sph_o, sps_o,
                   scb, scs, spb, sps,
                   CONJ: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_POS: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    # One launch for q and k: head blocks [0, NBQ) are q's, the rest k's (outputs QO, KO).
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s = row % S
    hb = tl.program_id(1)
    if hb < NBQ:
        xrow = Q + b * sqb + s * sqs
        yrow = QO + b * sob + s * sos
        sxh = sqh
        syh = soh
        h_count = HQ
        h0 = hb * BLOCK_H
    else:
        xrow = K + b * skb + s * sks
        yrow = KO + b * spb_o + s * sps_o
        sxh = skh
        syh = sph_o
        h_count = HK
        h0 = (hb - NBQ) * BLOCK_H
    heads = h0 + tl.arange(0, BLOCK_H)
    hmask = heads < h_count
    heads = heads.to(tl.int64)
    if HAS_POS:
        p = tl.load(POS + b * spb + s * sps).to(tl.int64)
    else:
        p = s
    j = tl.arange(0, BLOCK_R)
    jmask = j < R2
    c = tl.load(COS + b * scb + p * scs + j, mask=jmask, other=1.0).to(tl.float32)
    sn = tl.load(SIN + b * scb + p * scs + j, mask=jmask, other=0.0).to(tl.float32)
    if CONJ:
        sn = -sn
    if INTERLEAVED:
        i1 = 2 * j
        i2 = 2 * j + 1
    else:
        i1 = j
        i2 = j + R2
    xrow = xrow + heads[:, None] * sxh
    yrow = yrow + heads[:, None] * syh
    mask = hmask[:, None] & jmask[None, :]
    x1 = tl.load(xrow + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xrow + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c[None, :] - x2 * sn[None, :]
    y2 = x2 * c[None, :] + x1 * sn[None, :]
    tl.store(yrow + i1[None, :], y1.to(QO.dtype.element_ty), mask=mask)
    tl.store(yrow + i2[None, :], y2.to(QO.dtype.element_ty), mask=mask)
    if BLOCK_P > 0:  # partial rotary: the remaining dims pass through
        for start in range(2 * R2, D, BLOCK_P):
            cols = start + tl.arange(0, BLOCK_P)
            pmask = hmask[:, None] & (cols < D)[None, :]
            v = tl.load(xrow + cols[None, :], mask=pmask, other=0.0)
            tl.store(yrow + cols[None, :], v, mask=pmask)


def _blocks(h: int, d: int, r2: int) -> tuple[int, int, int]:
    block_h = min(MAX_BLOCK_H, triton.next_power_of_2(h))
    block_r = max(triton.next_power_of_2(r2), 2)
    rest = d - 2 * r2
    block_p = 0 if rest == 0 else max(triton.next_power_of_2(rest), 16)
    return block_h, block_r, block_p


def _rotate(q, k, cos, sin, pos: Optional[torch.Tensor], interleaved: bool, conj: bool):
    """Rotate q (B, Hq, S, D) and k (B, Hk, S, D) in one launch; cos/sin (T, R/2) or
    (B, T, R/2); pos None or (B, S)."""
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    bsz, hq, s, d = q.shape
    hk = k.shape[1]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if bsz * s * d == 0:
        return qo, ko
    r2 = cos.shape[-1]
    scb = cos.stride(0) if cos.dim() == 3 else 0
    spb, sps = (pos.stride(0), pos.stride(1)) if pos is not None else (0, 0)
    block_h, block_r, block_p = _blocks(max(hq, hk), d, r2)
    nbq = triton.cdiv(hq, block_h)
    grid = (bsz * s, nbq + triton.cdiv(hk, block_h))
    _rotary_kernel[grid](q, k, qo, ko, cos, sin, pos if pos is not None else cos, s, hq, hk, d, r2,
                         nbq, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                         k.stride(2), qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0),
                         ko.stride(1), ko.stride(2), scb, cos.stride(-2), spb, sps,
                         CONJ=conj, INTERLEAVED=interleaved, HAS_POS=pos is not None,
                         BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=4)
    return qo, ko


def rotary_fwd(q, k, cos, sin, pos, interleaved: bool):
    return _rotate(q, k, cos, sin, pos, interleaved, False)


def rotary_bwd(dq, dk, cos, sin, pos, interleaved: bool):
    return _rotate(dq, dk, cos, sin, pos, interleaved, True)


def aot_configs():
    """Every compile the launcher can ask for at common head dims (fp32 and bf16)."""
    from llmkern.testing import AOTConfig

    for dt in ("fp32", "bf16"):
        for d, r2 in ((64, 32), (128, 64), (128, 32), (256, 128)):
            for interleaved in (False, True):
                for has_pos in (False, True):
                    block_h, block_r, block_p = _blocks(MAX_BLOCK_H, d, r2)
                    types = {**{n: f"*{dt}" for n in ("Q", "K", "QO", "KO")}, "COS": "*fp32",
                             "SIN": "*fp32", "POS": "*i64",
                             **{n: "i32" for n in ("S", "HQ", "HK", "D", "R2", "NBQ")},
                             **{n: "i64" for n in ("sqb", "sqh", "sqs", "skb", "skh", "sks",
                                                   "sob", "soh", "sos", "spb_o", "sph_o",
                                                   "sps_o", "scb", "scs", "spb", "sps")}}
                    consts = dict(CONJ=False, INTERLEAVED=interleaved, HAS_POS=has_pos,
                                  BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_P=block_p)
                    yield AOTConfig(_rotary_kernel, types, consts, 4,
                                    name=f"rotary-{dt}-{d}-{r2}-{interleaved}-{has_pos}")
