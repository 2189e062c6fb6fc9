"""Flash-attention forward (Triton): tiled online softmax, lse stored in fp32.

One program per (query block, query head, sequence). It reads its kv head (GQA: h // GROUP)
and walks only the key tiles its rows can see: masked edge tiles, then the unmasked middle.
Batched tensors use strides (b, h, s); packed varlen tensors (total, H, D) get their sequence
offsets and lengths from cu_seqlens (IS_VARLEN), with a zero batch stride.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_common import (_dropout_keep, _kv_bases, _load_rows, _program_tile, _scores,
                               _tile_counts, _tile_start, _visible_range, _wide_ids)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, lo, n1, lo2, n_tiles, rows, offs_n, offs_d,
               len_q, len_k, shift, left, right, sks, svs, smm, smn, qk_in, qk_out,
               dropout_p, seed, bh,
               MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
               PREC: tl.constexpr):
    for t in range(0, n_tiles):
        cols = _tile_start(t, lo, n1, lo2, BLOCK_N, MASKED) + offs_n
        k = _load_rows(k_base, cols, len_k, sks, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        s2, t = _scores(qk, rows[:, None], cols[None, :], len_q, len_k, shift, left, right,
                        mask_base, smm, smn, qk_in, qk_out, MASKED, HAS_LEFT, HAS_RIGHT, SOFTCAP, MASK_KIND)
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        # A row with no visible key so far keeps m = -inf: use 0 to avoid -inf - -inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s2 - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, rows[:, None], cols[None, :], len_k, dropout_p), p, 0.0)
        v = _load_rows(v_base, cols, len_k, svs, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, Lse, Mask, CuQ, CuK,
                     sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                     slb, slh, sls, smb, smh, smm, smn,
                     H, GROUP, seqlen_q, seqlen_k, left, right, qk_in, qk_out, dropout_p, seed,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
                     HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
                     DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """One program per (query block, query head, sequence): Out and lse of its rows."""
    m0, h, b, q_start, k_start, len_q, len_k = _program_tile(CuQ, CuK, seqlen_q, seqlen_k, BLOCK_M,
                                                             IS_VARLEN)
    if m0 >= len_q:
        return
    b64, h64, hk64 = _wide_ids(b, h, GROUP)
    q_base = Q + b64 * sqb + h64 * sqh + q_start * sqs
    k_base, v_base = _kv_bases(K, V, b64, hk64, k_start, skb, skh, sks, svb, svh, svs)
    mask_base = Mask + b64 * smb + h64 * smh
    shift = len_k - len_q
    bh = b * H + h

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, rows, len_q, sqs, offs_d, HEAD_DIM, BLOCK_D, True)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    lo, full_lo, full_hi, hi = _visible_range(m0, len_k, shift - left, shift + right, HAS_LEFT,
                                              HAS_RIGHT, BLOCK_M, BLOCK_N)
    n1, n_edges, n_middle = _tile_counts(lo, full_lo, full_hi, hi, BLOCK_N)
    # The unmasked middle tiles, then the masked edge tiles (diagonal bands, the key bound).
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, full_lo, 0, 0,
                               n_middle, rows, offs_n, offs_d, len_q, len_k, shift, left, right,
                               sks, svs, smm, smn, qk_in, qk_out, dropout_p, seed, bh, False,
                               HEAD_DIM, BLOCK_N, BLOCK_D, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                               MASK_KIND, DROPOUT, PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, lo, n1, full_hi,
                               n_edges, rows, offs_n, offs_d, len_q, len_k, shift, left, right,
                               sks, svs, smm, smn, qk_in, qk_out, dropout_p, seed, bh, True,
                               HEAD_DIM, BLOCK_N, BLOCK_D, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                               MASK_KIND, DROPOUT, PREC)

    empty = l_i == 0.0  # the row saw no key: zeros and lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    inv = 1.0 / l_safe
    if DROPOUT:
        inv = inv / (1.0 - dropout_p)
    out = acc * inv[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = Out + b64 * sob + h64 * soh + q_start * sos + rows[:, None] * sos + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty),
             mask=(rows[:, None] < len_q) & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + b64 * slb + h64 * slh + q_start * sls + rows * sls, lse, mask=rows < len_q)


@triton.jit
def _dropout_mask_kernel(Keep, H, seqlen_q, seqlen_k, dropout_p, seed,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask the attention kernels use for (seed, p), as a (B, H, Sq, Sk) uint8 tensor."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], seqlen_k, dropout_p)
    ptrs = Keep + bh.to(tl.int64) * seqlen_q * seqlen_k + rows[:, None] * seqlen_k + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))
