"""Flash-attention backward (Triton), deterministic: no atomics anywhere.

1. ``_bwd_preprocess_kernel``: delta = rowsum(dO * O) - dlse (fp32, lse's layout).
2. ``_bwd_dkdv_kernel``: one program per (key block, kv head, sequence); it loops over the
   query heads of its GQA group and over the query tiles that see its keys, recomputing
   P = exp(S - lse), so dK/dV are reduced per kv head without repeating K/V and without atomics.
3. ``_bwd_dq_kernel``: one program per (query block, query head, sequence) over its key tiles.
Dropout regenerates the forward's keep-mask from (seed, b*H + h, i*Sk + j).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_common import (_dropout_keep, _kv_bases, _load_rows, _program_tile, _scores,
                               _tile_counts, _tile_start, _visible_range, _wide_ids)


@triton.jit
def _bwd_preprocess_kernel(Out, DOut, DLse, Delta, sob, soh, sos, sdb, sdh, sds,
                           slb, slh, sls, H, total_rows, HEAD_DIM: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr):
    """Rows of (B, H, S) or (H, total) flattened: program (row block, head, batch)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + b * sob + h * soh, rows, total_rows, sos, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DOut + b * sdb + h * sdh, rows, total_rows, sds, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_off = b * slb + h * slh + rows * sls
    if HAS_DLSE:  # d lse / d s = p, which shifts delta: dS = P * (dP - (delta - dlse))
        delta = delta - tl.load(DLse + lse_off, mask=rows < total_rows, other=0.0)
    tl.store(Delta + lse_off, delta, mask=rows < total_rows)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_b, do_b, lse_b, delta_b, mask_b, hk, GROUP, lo, n1, lo2, n_tiles,
                cols,
                offs_m, offs_d, len_q, len_k, shift, left, right, sqh, sqs, sdh, sds, slh, sls,
                smh, smm, smn, qk_in, qk_out, dropout_p, seed, bh0,
                MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                PREC: tl.constexpr, PART: tl.constexpr):
    """Query tiles (see ``_tile_start``) of every query head of kv head ``hk``, as one flat loop (a loop
    over heads around the tile loops costs registers and spills)."""
    # Tiles are keys x queries (S^T), so P^T and dS^T are the left operands of their products
    # as they come, with no register transposes.
    kj = cols[:, None]
    for it in range(0, n_tiles * GROUP):
        g = it // n_tiles
        start_m = _tile_start(it - g * n_tiles, lo, n1, lo2, BLOCK_M, MASKED)
        h = (hk * GROUP + g).to(tl.int64)
        rows = start_m + offs_m
        qi = rows[None, :]
        q = _load_rows(q_b + h * sqh, rows, len_q, sqs, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        do = _load_rows(do_b + h * sdh, rows, len_q, sds, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        # Rows past the end or that saw no key get lse = +inf, hence P = 0.
        lse = tl.load(lse_b + h * slh + rows * sls, mask=rows < len_q, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(delta_b + h * slh + rows * sls, mask=rows < len_q, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PREC)
        s2, t = _scores(qk_t, qi, kj, len_q, len_k, shift, left, right, mask_b + h * smh, smm,
                        smn, qk_in, qk_out, MASKED, HAS_LEFT, HAS_RIGHT, SOFTCAP, MASK_KIND)
        p_t = tl.exp2(s2 - lse[None, :])
        if DROPOUT:
            keep = _dropout_keep(seed, bh0 + g, qi, kj, len_k, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
        if PART != 2:  # dV = P_drop^T dO
            if DROPOUT:
                pd_t = tl.where(keep, p_t * inv_keep, 0.0)
            else:
                pd_t = p_t
            dv = tl.dot(pd_t.to(do.dtype), do, dv, input_precision=PREC)
        if PART != 1:  # dK = dS^T Q, dS = P * (dP - delta)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
            if DROPOUT:
                dp_t = tl.where(keep, dp_t * inv_keep, 0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - t * t)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, Mask, CuQ, CuK,
                     sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                     sdkb, sdkh, sdks, sdvb, sdvh, sdvs, slb, slh, sls, smb, smh, smm, smn,
                     H, GROUP, seqlen_q, seqlen_k, left, right, qk_in, qk_out, scale, dropout_p,
                     seed, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
                     HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
                     DROPOUT: tl.constexpr, PREC: tl.constexpr, PART: tl.constexpr = 0):
    """PART 0: dK and dV; 1: dV only; 2: dK only (two launches keep the accumulators of a
    head_dim-256 tile within the registers)."""
    n0, hk, b, q_start, k_start, len_q, len_k = _program_tile(CuQ, CuK, seqlen_q, seqlen_k, BLOCK_N,
                                                              IS_VARLEN)
    if n0 >= len_k:
        return
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    k_base, v_base = _kv_bases(K, V, b64, hk64, k_start, skb, skh, sks, svb, svh, svs)
    shift = len_k - len_q
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(k_base, cols, len_k, sks, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(v_base, cols, len_k, svs, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Key j is seen by queries i with j - shift - right <= i <= j - shift + left.
    lo, full_lo, full_hi, hi = _visible_range(n0, len_q, -shift - right, -shift + left,
                                              HAS_RIGHT, HAS_LEFT, BLOCK_N, BLOCK_M)
    q_b = Q + b64 * sqb + q_start * sqs
    do_b = DOut + b64 * sdb + q_start * sds
    lse_b = Lse + b64 * slb + q_start * sls
    delta_b = Delta + b64 * slb + q_start * sls
    mask_b = Mask + b64 * smb
    bh0 = b * H + hk * GROUP
    n1, n_edges, n_middle = _tile_counts(lo, full_lo, full_hi, hi, BLOCK_M)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_b, do_b, lse_b, delta_b, mask_b, hk, GROUP, full_lo, 0, 0,
                         n_middle, cols, offs_m, offs_d, len_q, len_k, shift, left, right, sqh,
                         sqs, sdh, sds, slh, sls, smh, smm, smn, qk_in, qk_out, dropout_p, seed,
                         bh0, False, HEAD_DIM, BLOCK_M, BLOCK_D, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                         MASK_KIND, DROPOUT, PREC, PART)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_b, do_b, lse_b, delta_b, mask_b, hk, GROUP, lo, n1,
                         full_hi, n_edges, cols, offs_m, offs_d, len_q, len_k, shift, left, right,
                         sqh, sqs, sdh, sds, slh, sls, smh, smm, smn, qk_in, qk_out, dropout_p,
                         seed, bh0, True, HEAD_DIM, BLOCK_M, BLOCK_D, HAS_LEFT, HAS_RIGHT,
                         SOFTCAP, MASK_KIND, DROPOUT, PREC, PART)
    dmask = (cols[:, None] < len_k) & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = DK + b64 * sdkb + hk64 * sdkh + k_start * sdks + cols[:, None] * sdks + offs_d[None, :]
    dv_ptrs = DV + b64 * sdvb + hk64 * sdvh + k_start * sdvs + cols[:, None] * sdvs + offs_d[None, :]
    if PART != 1:
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=dmask)
    if PART != 2:
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=dmask)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, mask_base, lo, n1, lo2, n_tiles, rows,
              offs_n, offs_d,
              len_q, len_k, shift, left, right, sks, svs, smm, smn, qk_in, qk_out, dropout_p,
              seed, bh, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
              PREC: tl.constexpr):
    for t in range(0, n_tiles):
        cols = _tile_start(t, lo, n1, lo2, BLOCK_N, MASKED) + offs_n
        k = _load_rows(k_base, cols, len_k, sks, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_rows(v_base, cols, len_k, svs, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        s2, t = _scores(qk, rows[:, None], cols[None, :], len_q, len_k, shift, left, right,
                        mask_base, smm, smn, qk_in, qk_out, MASKED, HAS_LEFT, HAS_RIGHT, SOFTCAP, MASK_KIND)
        p = tl.exp2(s2 - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], len_k, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DOut, Lse, Delta, DQ, Mask, CuQ, CuK,
                   sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                   sdqb, sdqh, sdqs, slb, slh, sls, smb, smh, smm, smn,
                   H, GROUP, seqlen_q, seqlen_k, left, right, qk_in, qk_out, scale, dropout_p,
                   seed, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
                   HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
                   DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """dQ of a query block: one program per (query block, query head, sequence)."""
    m0, h, b, q_start, k_start, len_q, len_k = _program_tile(CuQ, CuK, seqlen_q, seqlen_k, BLOCK_M,
                                                             IS_VARLEN)
    if m0 >= len_q:
        return
    b64, h64, hk64 = _wide_ids(b, h, GROUP)
    shift = len_k - len_q
    bh = b * H + h
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b64 * sqb + h64 * sqh + q_start * sqs, rows, len_q, sqs, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DOut + b64 * sdb + h64 * sdh + q_start * sds, rows, len_q, sds, offs_d,
                    HEAD_DIM, BLOCK_D, True)
    lse_off = b64 * slb + h64 * slh + q_start * sls + rows * sls
    lse = tl.load(Lse + lse_off, mask=rows < len_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + lse_off, mask=rows < len_q, other=0.0)
    k_base, v_base = _kv_bases(K, V, b64, hk64, k_start, skb, skh, sks, svb, svh, svs)
    mask_base = Mask + b64 * smb + h64 * smh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _visible_range(m0, len_k, shift - left, shift + right, HAS_LEFT,
                                              HAS_RIGHT, BLOCK_M, BLOCK_N)
    n1, n_edges, n_middle = _tile_counts(lo, full_lo, full_hi, hi, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, mask_base, full_lo, 0, 0, n_middle, rows,
                   offs_n, offs_d, len_q, len_k, shift, left, right, sks, svs, smm, smn, qk_in,
                   qk_out, dropout_p, seed, bh, False, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_LEFT,
                   HAS_RIGHT, SOFTCAP, MASK_KIND, DROPOUT, PREC)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, mask_base, lo, n1, full_hi, n_edges, rows,
                   offs_n, offs_d, len_q, len_k, shift, left, right, sks, svs, smm, smn, qk_in,
                   qk_out, dropout_p, seed, bh, True, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_LEFT,
                   HAS_RIGHT, SOFTCAP, MASK_KIND, DROPOUT, PREC)
    dq_ptrs = DQ + b64 * sdqb + h64 * sdqh + q_start * sdqs + rows[:, None] * sdqs + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty),
             mask=(rows[:, None] < len_q) & (offs_d[None, :] < HEAD_DIM))
