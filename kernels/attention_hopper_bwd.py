"""Flash-attention backward for Hopper (sm_90), Triton: 5 GEMMs in one pass, deterministic.

One program per (key block, kv head, sequence) recomputes S^T = K Q^T and P^T for the query
blocks that see its keys, over every query head of its GQA group, and runs the five products
S^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q and dQ_part = dS K: dK/dV stay in registers
(one owner, no atomics), dQ is accumulated in fp32 in global memory inside the same pass.

Deterministic dQ, by ordered accumulation: each (sequence, query head, query block) has a
counter. Every program walks all query blocks of its sequence in the same order, and for each
waits until the counter equals its key-block index, adds its dQ part (a plain load and store,
nothing else writes that tile meanwhile), then increments the counter; blocks that do not see
the tile only pass the counter on. So dQ sums its parts in key-block order on every run,
bit-identical, and no program waits on a later one (key blocks are the grid's fastest axis,
dispatched first), which rules out deadlock. K, V, Q and dO are read through tensor
descriptors (TMA); Q/dO as (heads, rows, head_dim) so that one descriptor serves a group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import _sequence_bounds, _tanh, _visible_range, block_d
from .attention_options import AttentionOptions, AttentionShape


@triton.jit
def _hopper_bwd_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, DQAcc, Sem, CuQ, CuK,
                       sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                       sdkb, sdkh, sdks, sdvb, sdvh, sdvs, sab, sah, sas, slb, slh, sls,
                       H, GROUP, seqlen_q, seqlen_k, n_mblocks, left, right, qk_in, qk_out,
                       scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
                       HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                       PREC: tl.constexpr):
    n_idx = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
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
    for it in range(0, GROUP * m_blocks):
        g = it // m_blocks
        m = it - g * m_blocks
        h = hk * GROUP + g
        h64 = h.to(tl.int64)
        start_m = m * BLOCK_M
        sem = Sem + (b64 * H + h64) * n_mblocks + m
        rows = start_m + offs_m
        dq_ptrs = (DQAcc + b64 * sab + h64 * sah + q_start * sas + rows[:, None] * sas
                   + offs_d[None, :])
        dq_mask = (rows[:, None] < len_q) & (offs_d[None, :] < HEAD_DIM)
        sees = live & (start_m + BLOCK_M > lo) & (start_m < hi)
        if sees:
            q = desc_q.load([h, start_m, 0]).reshape([BLOCK_M, BLOCK_D])
            do = desc_do.load([h, start_m, 0]).reshape([BLOCK_M, BLOCK_D])
            # Rows past the end or that saw no key get lse = +inf, hence P = 0.
            lse = tl.load(Lse + b64 * slb + h64 * slh + q_start * sls + rows * sls,
                          mask=rows < len_q, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            delta = tl.load(Delta + b64 * slb + h64 * slh + q_start * sls + rows * sls,
                            mask=rows < len_q, other=0.0)
            qk_t = tl.dot(k, tl.trans(q), input_precision=PREC)  # GEMM 1: S^T
            t = qk_t
            if SOFTCAP:
                t = _tanh(qk_t * qk_in)
            diag = cols[:, None] - rows[None, :] - shift
            ok = (cols[:, None] < len_k) & (rows[None, :] < len_q)
            if HAS_RIGHT:
                ok = ok & (diag <= right)
            if HAS_LEFT:
                ok = ok & (diag >= -left)
            p_t = tl.where(ok, tl.exp2(t * qk_out - lse[None, :]), 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)  # GEMM 2: dV
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)  # GEMM 3: dP^T
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - t * t)
            ds_t = ds_t.to(q.dtype)
            dk = tl.dot(ds_t, q, dk, input_precision=PREC)  # GEMM 4: dK
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PREC)  # GEMM 5: this block's dQ part
            while tl.atomic_add(sem, 0, sem="acquire") < n_idx:
                pass
            tl.debug_barrier()
            acc = tl.load(dq_ptrs, mask=dq_mask, other=0.0, cache_modifier=".cg")
            tl.store(dq_ptrs, acc + dq * scale, mask=dq_mask)
        else:
            while tl.atomic_add(sem, 0, sem="acquire") < n_idx:
                pass
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
    """(dq, dk, dv) for TMA-ready inputs (see ``attention_hopper.hopper_reason``), either layout."""
    from .attention import _preprocess
    from .attention_hopper import ensure_allocator

    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    _preprocess(out, dout, dlse.contiguous().float() if dlse is not None else None, delta, shape)
    d = q.shape[-1]
    bd = block_d(d)
    bm, bn, warps, stages = _launch_config(bd)
    n_mblocks = triton.cdiv(shape.seqlen_q, bm)
    sem = torch.zeros(shape.batch * shape.heads * n_mblocks, dtype=torch.int32, device=q.device)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    wl, wr, has_l, has_r = opts.window_args()
    qk_in, qk_out, cap = opts.score_args()
    cu_q, cu_k = shape.offsets(lse)
    ensure_allocator(q.device)
    _hopper_bwd_kernel[(triton.cdiv(shape.seqlen_k, bn), shape.kv_heads, shape.batch)](
        q, k, v, dout, lse, delta, dk, dv, dq_acc, sem, cu_q, cu_k, *shape.strides(q),
        *shape.strides(k), *shape.strides(v), *shape.strides(dout), *shape.strides(dk),
        *shape.strides(dv), *shape.strides(dq_acc), *shape.lse_strides(lse), shape.heads,
        shape.group, shape.seqlen_q, shape.seqlen_k, n_mblocks, wl, wr, qk_in, qk_out, opts.scale,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IS_VARLEN=shape.varlen is not None,
        HAS_LEFT=has_l, HAS_RIGHT=has_r, SOFTCAP=cap, PREC=opts.precision(q.dtype),
        num_warps=warps, num_stages=stages)
    return dq_acc.to(q.dtype), dk, dv


HOPPER_BWD_BLOCK_DS = (64, 128, 256)


def aot_configs(arch: int = 90, dtypes=("fp16",)):
    """Every ``bwd_config`` entry at its largest head dim with every feature on (a causal
    sliding window and a softcap); sm_90 only, fp16 standing for bf16 too."""
    from llmkern.testing import AOTConfig

    if arch != 90:
        return
    for bd in HOPPER_BWD_BLOCK_DS:
        bm, bn, warps, stages = bwd_config(bd)
        for dt in dtypes:
            types = {}
            for p in _hopper_bwd_kernel.params:
                if p.is_constexpr:
                    continue
                n = p.name
                if n in ("Lse", "Delta", "DQAcc"):
                    types[n] = "*fp32"
                elif n in ("CuQ", "CuK", "Sem"):
                    types[n] = "*i32"
                elif n in ("qk_in", "qk_out", "scale"):
                    types[n] = "fp32"
                elif n in ("Q", "K", "V", "DOut", "DK", "DV"):
                    types[n] = f"*{dt}"
                else:
                    types[n] = "i32"
            yield AOTConfig(_hopper_bwd_kernel, types, dict(
                HEAD_DIM=bd, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IS_VARLEN=False, HAS_LEFT=True,
                HAS_RIGHT=True, SOFTCAP=True, PREC="ieee"), warps, stages,
                name=f"hopper_bwd-{dt}-d{bd}-{bm}x{bn}-w{warps}s{stages}", ones=("sls",))
