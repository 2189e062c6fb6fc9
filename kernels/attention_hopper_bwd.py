"""Flash-attention backward for Hopper (sm_90), Triton: 5 GEMMs in one pass.

One program per (key block, kv head, sequence) recomputes S^T = K Q^T and P^T for the query
blocks that see its keys, over every query head of its GQA group, and runs the five products
S^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q and dQ_part = dS K: dK/dV stay in registers
(one owner, no atomics), dQ is accumulated in fp32 in global memory inside the same pass.
K, V, Q and dO are read through tensor descriptors (TMA); Q/dO as (heads, rows, head_dim) so
that one descriptor serves a group.

Pre-scaled K: the K tile is multiplied once, on load, by the factor the scores need (scale *
log2(e), or scale / softcap ahead of the tanh), so the recomputed scores go into exp2 (or tanh)
without a multiply per score. GEMM 5 reads the unscaled K, so dQ and dK take ``scale`` only.

Two ways to accumulate dQ (``ORDERED``, from the call's ``deterministic``):
- atomic (deterministic=False): each program adds its parts with fp32 atomics and walks only
  the query blocks its keys see. Fast; the summation order varies run to run.
- ordered (deterministic=True): each (sequence, query head, query block) tile has a counter,
  the number of key blocks that have passed it. Every program of a (sequence, kv head) walks the
  same list of tiles, every query block of every head of its group, in the same order. At each
  tile, key block n waits until the counter equals n, then adds its part with a plain load and
  store (nothing else writes that tile meanwhile) or, when its keys do not see the tile (causal,
  window, a key block past its varlen sequence's end), adds nothing; either way it then
  increments the counter. So every tile sums its parts in key-block order, bit-identical on
  every run.

Why the ordered scheme cannot deadlock: a program takes its (key block, kv head, sequence) from
a ticket, a global counter it increments as its first act, rather than from its program id, with
the key block fastest (ticket = n + key_blocks * (kv_head + kv_heads * sequence)). So key block
n of a (sequence, kv head) holds a later ticket than blocks 0..n-1 of the same pair, and those
took their tickets first: they are running or done, never waiting to be scheduled, whatever
order the hardware launches programs in. Key block n waits only on them (counters of its own
sequence and heads). Among the programs that have started and not finished, the one with the
smallest ticket finds every block before it done: each passed every tile of the list once, and
no later block passed any tile before it (those wait for counter == their own n, larger than
its n), so each counter it reads equals its n and it never waits. It finishes; by induction
every started program does, frees its slot, and the rest start, for any number of programs per
SM. Skipped tiles still pass the counter, and every program of a (sequence, kv head) walks the
same tiles (the list depends on the sequence's query length and the group size only), so a
counter reaches n exactly when blocks 0..n-1 have passed it. A store is visible before the
counter moves: a CTA barrier after the store, then the increment with release semantics; the
waiter reads the counter with acquire semantics, then a barrier, then the tile from L2 (``.cg``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import _sequence_bounds, _tanh, _visible_range, aot_types, block_d
from .attention_options import AttentionOptions, AttentionShape


@triton.jit
def _hopper_bwd_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, DQAcc, Sem, Ticket, CuQ, CuK,
                       sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                       sdkb, sdkh, sdks, sdvb, sdvh, sdvs, sab, sah, sas, slb, slh, sls,
                       H, GROUP, seqlen_q, seqlen_k, n_nblocks, n_mblocks, left, right, k_scale,
                       qk_out, scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
                       HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                       ORDERED: tl.constexpr, PREC: tl.constexpr):
    if ORDERED:
        pid = tl.atomic_add(Ticket, 1)  # launch order, not program id: see the header
    else:
        pid = tl.program_id(0)
    n_idx = pid % n_nblocks
    hk = (pid // n_nblocks) % (H // GROUP)
    b = pid // n_nblocks // (H // GROUP)
    q_start, k_start, len_q, len_k = _sequence_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    n0 = n_idx * BLOCK_N
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    rows_q = tl.maximum(len_q, 1)
    rows_k = tl.maximum(len_k, 1)
    desc_k = tl.make_tensor_descriptor(K + b64 * skb + hk64 * skh + k_start * sks,
                                       [rows_k, HEAD_DIM], [sks, 1], [BLOCK_N, BLOCK_D])
    desc_v = tl.make_tensor_descriptor(V + b64 * svb + hk64 * svh + k_start * svs,
                                       [rows_k, HEAD_DIM], [svs, 1], [BLOCK_N, BLOCK_D])
    desc_q = tl.make_tensor_descriptor(Q + b64 * sqb + q_start * sqs, [H, rows_q, HEAD_DIM],
                                       [sqh, sqs, 1], [1, BLOCK_M, BLOCK_D])
    desc_do = tl.make_tensor_descriptor(DOut + b64 * sdb + q_start * sds, [H, rows_q, HEAD_DIM],
                                        [sdh, sds, 1], [1, BLOCK_M, BLOCK_D])
    k = desc_k.load([n0, 0])
    v = desc_v.load([n0, 0])
    # Pre-scaled K (once per program): S^T = (c K) Q^T is the score in exp2's (or tanh's) units.
    k_s = (k * k_scale).to(k.dtype)
    shift = len_k - len_q
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Key j is seen by queries i with j - shift - right <= i <= j - shift + left.
    lo, _, _, hi = _visible_range(n0, len_q, -shift - right, -shift + left, HAS_RIGHT, HAS_LEFT,
                                  BLOCK_N, BLOCK_M)
    live = n0 < len_k
    m_blocks = tl.cdiv(len_q, BLOCK_M)
    if ORDERED:  # every tile of the sequence, to pass each counter
        m_first = m_blocks * 0
        m_count = m_blocks
    else:  # only the query blocks these keys see (lo is a multiple of BLOCK_M, hi <= len_q)
        m_first = lo // BLOCK_M
        m_count = tl.where(live, tl.cdiv(hi, BLOCK_M) - m_first, 0)
    for it in range(0, GROUP * m_count):
        g = it // m_count
        m = m_first + it - g * m_count
        h = hk * GROUP + g
        h64 = h.to(tl.int64)
        start_m = m * BLOCK_M
        rows = start_m + offs_m
        dq_ptrs = (DQAcc + b64 * sab + h64 * sah + q_start * sas + rows[:, None] * sas
                   + offs_d[None, :])
        dq_mask = (rows[:, None] < len_q) & (offs_d[None, :] < HEAD_DIM)
        sees = live & (start_m + BLOCK_M > lo) & (start_m < hi)
        sem = Sem + (b64 * H + h64) * n_mblocks + m
        if sees:
            q = desc_q.load([h, start_m, 0]).reshape([BLOCK_M, BLOCK_D])
            do = desc_do.load([h, start_m, 0]).reshape([BLOCK_M, BLOCK_D])
            # Rows past the end or that saw no key get lse = +inf, hence P = 0.
            lse = tl.load(Lse + b64 * slb + h64 * slh + q_start * sls + rows * sls,
                          mask=rows < len_q, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            delta = tl.load(Delta + b64 * slb + h64 * slh + q_start * sls + rows * sls,
                            mask=rows < len_q, other=0.0)
            s_t = tl.dot(k_s, tl.trans(q), input_precision=PREC)  # GEMM 1: S^T, pre-scaled
            if SOFTCAP:
                t = _tanh(s_t)
                s_t = t * qk_out
            diag = cols[:, None] - rows[None, :] - shift
            ok = (cols[:, None] < len_k) & (rows[None, :] < len_q)
            if HAS_RIGHT:
                ok = ok & (diag <= right)
            if HAS_LEFT:
                ok = ok & (diag >= -left)
            p_t = tl.where(ok, tl.exp2(s_t - lse[None, :]), 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)  # GEMM 2: dV
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)  # GEMM 3: dP^T
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - t * t)
            ds_t = ds_t.to(q.dtype)
            dk = tl.dot(ds_t, q, dk, input_precision=PREC)  # GEMM 4: dK
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PREC)  # GEMM 5: this block's dQ part
            if ORDERED:
                while tl.atomic_add(sem, 0, sem="acquire") < n_idx:
                    pass
                tl.debug_barrier()
                acc = tl.load(dq_ptrs, mask=dq_mask, other=0.0, cache_modifier=".cg")
                tl.store(dq_ptrs, acc + dq * scale, mask=dq_mask)
            else:
                tl.atomic_add(dq_ptrs, dq * scale, mask=dq_mask, sem="relaxed")
        elif ORDERED:  # keys that do not see this tile only pass its counter on
            while tl.atomic_add(sem, 0, sem="acquire") < n_idx:
                pass
        if ORDERED:
            tl.debug_barrier()  # every thread's part is stored before the counter moves on
            tl.atomic_add(sem, 1, sem="release")

    dmask = (cols[:, None] < len_k) & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = DK + b64 * sdkb + hk64 * sdkh + k_start * sdks + cols[:, None] * sdks + offs_d[None, :]
    dv_ptrs = DV + b64 * sdvb + hk64 * sdvh + k_start * sdvs + cols[:, None] * sdvs + offs_d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=dmask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=dmask)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per BLOCK_D on sm_90: 64-row query steps where
# the registers allow (64x64 spills at head dim 128, 64x128 at 64; head dim 256 takes 32x32,
# which has no wgmma). Each compiles without spills under triton 3.6 and 3.8 (aot_configs).
def bwd_config(bd: int) -> tuple[int, int, int, int]:
    if bd <= 64:
        return (64, 64, 8, 2)
    if bd <= 128:
        return (64, 32, 8, 2)
    return (32, 32, 8, 1)


def _launch_config(bd: int):
    from .attention_hopper import _interpret

    return (16, 32, 4, 1) if _interpret() else bwd_config(bd)


def hopper_backward(dout, q, k, v, out, lse, dlse, shape: AttentionShape, opts: AttentionOptions):
    """(dq, dk, dv) for TMA-ready inputs (see ``attention_hopper.hopper_reason``), either layout;
    dQ accumulated in key-block order when ``opts.deterministic``, else with atomics."""
    from .attention import _preprocess
    from .attention_hopper import ensure_allocator

    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    _preprocess(out, dout, dlse.contiguous().float() if dlse is not None else None, delta, shape)
    d = q.shape[-1]
    bd = block_d(d)
    bm, bn, warps, stages = _launch_config(bd)
    n_mblocks = triton.cdiv(shape.seqlen_q, bm)
    n_nblocks = triton.cdiv(shape.seqlen_k, bn)
    ordered = bool(opts.deterministic)
    # Ordered: one counter per (sequence, head, query block), then the ticket counter.
    n_sem = shape.batch * shape.heads * n_mblocks + 1 if ordered else 1
    sem = (torch.zeros if ordered else torch.empty)(n_sem, dtype=torch.int32, device=q.device)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    wl, wr, has_l, has_r = opts.window_args()
    k_scale, qk_out, cap = prescaled_k_args(opts)
    cu_q, cu_k = shape.offsets(lse)
    ensure_allocator(q.device)
    _hopper_bwd_kernel[(n_nblocks * shape.kv_heads * shape.batch,)](
        q, k, v, dout, lse, delta, dk, dv, dq_acc, sem, sem[n_sem - 1:], cu_q, cu_k,
        *shape.strides(q), *shape.strides(k), *shape.strides(v), *shape.strides(dout),
        *shape.strides(dk), *shape.strides(dv), *shape.strides(dq_acc), *shape.lse_strides(lse),
        shape.heads, shape.group, shape.seqlen_q, shape.seqlen_k, n_nblocks, n_mblocks, wl, wr,
        k_scale, qk_out, opts.scale, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        IS_VARLEN=shape.varlen is not None, HAS_LEFT=has_l, HAS_RIGHT=has_r, SOFTCAP=cap,
        ORDERED=ordered, PREC=opts.precision(q.dtype), num_warps=warps, num_stages=stages)
    return dq_acc.to(q.dtype), dk, dv


def prescaled_k_args(opts: AttentionOptions) -> tuple[float, float, bool]:
    """(k_scale, qk_out, SOFTCAP): K is multiplied by k_scale on load, so that K Q^T is the
    score in exp2's units (scale * log2 e), or tanh's argument with a softcap (scale / softcap),
    whose result qk_out = softcap * log2 e brings back to exp2's units."""
    qk_in, qk_out, cap = opts.score_args()
    return (qk_in, qk_out, True) if cap else (qk_out, 1.0, False)


HOPPER_BWD_BLOCK_DS = (64, 128, 256)


def aot_configs(arch: int = 90, dtypes=("fp16",)):
    """Every ``bwd_config`` entry at its largest head dim with every feature on (a causal
    sliding window and a softcap), ordered and atomic dQ; sm_90 only, fp16 standing for bf16."""
    from llmkern.testing import AOTConfig

    if arch != 90:
        return
    for bd in HOPPER_BWD_BLOCK_DS:
        bm, bn, warps, stages = bwd_config(bd)
        for dt in dtypes:
            types = aot_types(_hopper_bwd_kernel, dt)
            for ordered in (True, False):
                yield AOTConfig(_hopper_bwd_kernel, types, dict(
                    HEAD_DIM=bd, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IS_VARLEN=False,
                    HAS_LEFT=True, HAS_RIGHT=True, SOFTCAP=True, ORDERED=ordered, PREC="ieee"),
                    warps, stages, ones=("sls",),
                    name=f"hopper_bwd-{'ordered' if ordered else 'atomic'}-{dt}-d{bd}-{bm}x{bn}"
                         f"-w{warps}s{stages}")
