"""Shared pieces of the flash-attention kernels: program prologue (sequence bounds, 64-bit
bases), tile ranges, score modifiers, dropout, configs.

Scores live in the log2 domain inside the kernels: s2 = log2(e) * s where s is the scaled
(and soft-capped, masked) score, so the softmax uses exp2. The visible keys of query i are
i + shift - left <= j <= i + shift + right with shift = Sk - Sq (bottom-right alignment); causal
is folded into ``right`` (min(right, 0)) by the launcher.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _sequence_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(q_start, k_start, len_q, len_k) of sequence ``b``: its row offsets in the packed tensors
    and its lengths from cu_seqlens (IS_VARLEN), else 0 and the dense seqlen_q/seqlen_k.
    Starts are int64 and lengths int32 on both paths."""
    if IS_VARLEN:
        q_start = tl.load(CuQ + b).to(tl.int64)
        k_start = tl.load(CuK + b).to(tl.int64)
        len_q = (tl.load(CuQ + b + 1) - q_start).to(tl.int32)
        len_k = (tl.load(CuK + b + 1) - k_start).to(tl.int32)
    else:
        q_start = tl.zeros([], dtype=tl.int64)
        k_start = tl.zeros([], dtype=tl.int64)
        len_q = seqlen_q + tl.zeros([], dtype=tl.int32)
        len_k = seqlen_k + tl.zeros([], dtype=tl.int32)
    return q_start, k_start, len_q, len_k


@triton.jit
def _program_tile(CuQ, CuK, seqlen_q, seqlen_k, BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(x0, head, b, q_start, k_start, len_q, len_k) of this program on a (tiles, heads, sequences)
    grid: x0 = program_id(0) * BLOCK is its first row, then ``_sequence_bounds`` of sequence b."""
    b = tl.program_id(2)
    q_start, k_start, len_q, len_k = _sequence_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    return tl.program_id(0) * BLOCK, tl.program_id(1), b, q_start, k_start, len_q, len_k


@triton.jit
def _wide_ids(b, h, GROUP):
    """(b64, h64, hk64): sequence ``b``, query head ``h`` and its kv head h // GROUP as int64, so
    that offsets into large tensors do not overflow."""
    return b.to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64)


@triton.jit
def _kv_bases(K, V, b64, hk64, k_start, skb, skh, sks, svb, svh, svs):
    """The first rows of sequence b64's keys and values in kv head hk64."""
    return K + b64 * skb + hk64 * skh + k_start * sks, V + b64 * svb + hk64 * svh + k_start * svs


@triton.jit
def _visible_range(x0, n_other, off_lo, off_hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                   BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr):
    """Items x in [x0, x0 + BLOCK_X) see y in [x + off_lo, x + off_hi] and [0, n_other).

    Returns (lo, full_lo, full_hi, hi), multiples of BLOCK_Y except hi: tiles in [lo, full_lo)
    and [full_hi, hi) need the bound masks, tiles in [full_lo, full_hi) are wholly visible to
    every x of the block (and inside [0, n_other)), so they skip the masking.
    """
    lo = x0 * 0
    hi = x0 * 0 + n_other
    if HAS_LO:
        lo = tl.maximum(x0 + off_lo, 0)
        lo = (lo // BLOCK_Y) * BLOCK_Y
    if HAS_HI:
        hi = tl.minimum(hi, x0 + BLOCK_X + off_hi)
    hi = tl.maximum(hi, lo)
    full_lo = lo
    if HAS_LO:
        full_lo = tl.cdiv(tl.maximum(x0 + BLOCK_X - 1 + off_lo, 0), BLOCK_Y) * BLOCK_Y
    full_hi = (n_other // BLOCK_Y) * BLOCK_Y
    if HAS_HI:
        full_hi = tl.minimum(full_hi, (tl.maximum(x0 + off_hi + 1, 0) // BLOCK_Y) * BLOCK_Y)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _tile_start(t, lo, n1, lo2, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """Start of tile t of a loop: the unmasked middle is lo + t * BLOCK; the masked loop walks
    both edges, n1 tiles from lo then the tiles from lo2 (one loop body instead of two)."""
    if MASKED:
        return tl.where(t < n1, lo + t * BLOCK, lo2 + (t - n1) * BLOCK)
    return lo + t * BLOCK


@triton.jit
def _tile_counts(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    """(n1, n_edges, n_middle): tiles of [lo, full_lo), of both edges, of [full_lo, full_hi)."""
    n1 = tl.cdiv(full_lo - lo, BLOCK)
    return n1, n1 + tl.cdiv(hi - full_hi, BLOCK), tl.cdiv(full_hi - full_lo, BLOCK)


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates to +-1 without NaN for large |x|.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _scores(qk, qi, kj, len_q, len_k, shift, left, right, mask_base, smm, smn, qk_in, qk_out,
            MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
            SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr):
    """(s2, t): log2-domain scores of a tile, and tanh(qk * qk_in) when SOFTCAP.

    ``qi``/``kj`` are the query/key indices broadcast to the tile's orientation ((M, 1) and
    (1, N) for a queries x keys tile, the transpose for keys x queries). Without SOFTCAP
    s2 = qk * qk_out (qk_out = scale * log2e); with it s2 = tanh(qk * qk_in) * qk_out
    (qk_in = scale / c, qk_out = c * log2e). MASK_KIND 1: boolean mask (0 = hidden), 2: additive
    mask. MASKED applies the key bound and the causal/window diagonal bands.
    """
    t = qk
    if SOFTCAP:
        t = _tanh(qk * qk_in)
        s2 = t * qk_out
    else:
        s2 = qk * qk_out
    if MASK_KIND != 0:
        inside = (qi < len_q) & (kj < len_k)
        ptrs = mask_base + qi.to(tl.int64) * smm + kj * smn  # a dense mask can pass 2**31
        if MASK_KIND == 1:
            m = tl.load(ptrs, mask=inside, other=1)
            s2 = tl.where(m != 0, s2, float("-inf"))
        else:
            m = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
            s2 = s2 + m * 1.4426950408889634
    if MASKED:
        ok = kj < len_k
        diag = kj - qi - shift
        if HAS_RIGHT:
            ok = ok & (diag <= right)
        if HAS_LEFT:
            ok = ok & (diag >= -left)
        s2 = tl.where(ok, s2, float("-inf"))
    return s2, t


@triton.jit
def _dropout_keep(seed, bh, qi, kj, len_k, dropout_p):
    """The keep-mask of a tile: Philox keyed by (seed, batch*heads + head), counter i * Sk + j
    (``qi``/``kj`` broadcast to the tile's orientation, as in ``_scores``)."""
    key = bh.to(tl.int64) * 2147483648 + seed
    offsets = qi * len_k + kj
    return tl.rand(key, offsets) >= dropout_p


@triton.jit
def _load_rows(base, rows, n_rows, stride, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """A (rows x BLOCK_D) tile, zero outside [0, n_rows) x [0, HEAD_DIM)."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


# ---- tile configurations -----------------------------------------------------------------
# One helper chooses every block size: (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages)
# per (kernel, BLOCK_D, fp32 or half, arch, heavy). ``heavy`` calls (dropout, an attn_mask or a
# softcap) hold more live values per score, so they get smaller tiles. Each entry was chosen
# by compiling it ahead of time for sm_80 and sm_90 (tests/test_attention_aot.py): no spills,
# shared memory within limits, and wgmma on sm_90 for half precision (so every product has
# 64 rows or more: BLOCK_M in fwd/dq, BLOCK_N in dk/dv). fp32 runs at fp32 accuracy (FMA
# products, no tensor cores) and needs the smallest tiles.

KINDS = ("fwd", "bwd_dkdv", "bwd_dq")
BLOCK_DS = (16, 32, 64, 128, 256)
ARCHS = (80, 90)

# sm_80 fwd at D=128 takes 128x32 tiles: 128x64 (8 warps, 2 stages) spills under triton 3.6.
_HALF = {  # (kind, heavy): {(max BLOCK_D, arch): config}; arch 0 = any
    ("fwd", False): {(128, 90): (128, 64, 8, 3), (128, 80): (128, 32, 8, 2), (256, 0): (64, 64, 8, 2)},
    ("bwd_dkdv", False): {(64, 0): (32, 128, 8, 2), (128, 90): (32, 128, 8, 2),
                          (128, 80): (64, 64, 8, 2), (256, 0): (16, 64, 8, 2)},
    ("bwd_dq", False): {(128, 90): (128, 64, 8, 2), (128, 80): (64, 64, 4, 2), (256, 0): (64, 32, 8, 2)},
    ("fwd", True): {(128, 0): (64, 32, 4, 2), (256, 0): (64, 32, 8, 2)},
    ("bwd_dkdv", True): {(128, 90): (16, 64, 8, 2), (128, 80): (32, 64, 8, 2),
                         (256, 0): (16, 64, 8, 2)},
    ("bwd_dq", True): {(128, 0): (64, 32, 4, 2), (256, 90): (64, 16, 8, 2), (256, 80): (64, 32, 8, 2)},
}
_FP32 = {
    "fwd": {(128, 0): (32, 16, 8, 1), (256, 0): (16, 16, 8, 1)},
    "bwd_dkdv": {(128, 0): (16, 32, 8, 1), (256, 0): (16, 16, 8, 1)},
    "bwd_dq": {(128, 0): (32, 16, 8, 1), (256, 0): (16, 16, 8, 1)},
}


def aot_types(kernel, dt: str) -> dict:
    """The runtime argument types of an attention kernel for its ahead-of-time compile, with
    q/k/v and their gradients in ``dt``."""
    from llmkern.testing import runtime_types

    named = dict.fromkeys(("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV"), f"*{dt}")
    named.update(dict.fromkeys(("Lse", "Delta", "Mask", "DQAcc"), "*fp32"))
    named.update(dict.fromkeys(("CuQ", "CuK", "Sem", "Ticket"), "*i32"))
    named.update(dict.fromkeys(("qk_in", "qk_out", "scale", "dropout_p", "k_scale"), "fp32"))
    return runtime_types(kernel, named)


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def config(kind: str, bd: int, fp32: bool, arch: int, heavy: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a kernel launch."""
    if _interpret():
        # The CPU interpreter: tiles small enough that short test sequences span several.
        return (16, 32, 4, 1) if kind == "bwd_dkdv" else (32, 32, 4, 1)
    return gpu_config(kind, bd, fp32, arch, heavy)


@functools.lru_cache(maxsize=None)
def gpu_config(kind: str, bd: int, fp32: bool, arch: int, heavy: bool) -> tuple[int, int, int, int]:
    if kind not in KINDS:
        raise ValueError(f"unknown attention kernel kind {kind!r}")
    table = _FP32[kind] if fp32 else _HALF[(kind, heavy)]
    for (max_bd, for_arch), cfg in sorted(table.items()):
        if bd <= max_bd and for_arch in (0, arch):
            return cfg
    raise ValueError(f"no attention config for {kind}, BLOCK_D {bd}, arch {arch}")


def dkdv_parts(bd: int, fp32: bool) -> tuple:
    """The dK/dV kernel's launches: one (PART 0) or, for half-precision head dims over 128, dV
    (PART 1) then dK (PART 2), so that one accumulator tile fits in the registers."""
    return (1, 2) if bd > 128 and not fp32 else (0,)


def device_arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def shipped_configs(arch: int):
    """{(kind, fp32, heavy, config): largest BLOCK_D using it}: every config the launchers can
    pick on ``arch``, with the head dim at which it needs the most registers and shared memory."""
    out = {}
    for kind in KINDS:
        for fp32 in (False, True):
            for heavy in ((False, True) if not fp32 else (True,)):
                for bd in BLOCK_DS:
                    key = (kind, fp32, heavy, gpu_config(kind, bd, fp32, arch, heavy))
                    out[key] = max(out.get(key, 0), bd)
    return out

