"""Shared pieces of the flash-attention kernels: program prologue (sequence bounds, 64-bit
bases), tile ranges, score modifiers, dropout, configs.

Scores live in the log2 domain inside the kernels: s2 = log2(e) * s where s is the scaled
(and soft-capped, masked) score, so the softmax uses exp2. The visible keys of query i are
i + shift - left <= j <= i + shift + right with shift = Sk - Sq (bottom-right alignment); causal
is folded into ``right`` (min(right, 0)) by the launcher.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

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

_HALF = {  # (kind, heavy): {(max BLOCK_D, arch): config}; arch 0 = any
    ("fwd", False): {(128, 90): (128, 64, 8, 3), (128, 80): (128, 64, 8, 2), (256, 0): (64, 64, 8, 2)},
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


# ---- launch records ----------------------------------------------------------------------
# What a launcher hands a kernel launch, named by meaning rather than by position: the call's
# options, the problem's shape (dense or packed varlen) and the optional mask. Every forward and
# backward implementation takes the same records, so another kernel family (say TMA and warp
# specialization on sm_90) plugs in as one more function of (tensors, shape, mask, options).

@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """The options of one attention call.

    ``window_*`` None means unbounded; ``window_right`` may be negative (PyTorch's top-left
    causal alignment when Sq < Sk is such a window). ``softcap`` 0.0 means none. ``seed`` keys
    the dropout RNG; fp32 inputs use tf32 products only with ``allow_tf32``."""
    scale: float
    causal: bool = False
    window_left: Optional[int] = None
    window_right: Optional[int] = None
    softcap: float = 0.0
    dropout_p: float = 0.0
    seed: int = 0
    allow_tf32: bool = False

    def window_args(self) -> tuple[int, int, bool, bool]:
        """(left, right, HAS_LEFT, HAS_RIGHT) with causal folded into the right bound."""
        left, right = self.window_left, self.window_right
        if self.causal:
            right = 0 if right is None else min(right, 0)
        return (left or 0, right or 0, left is not None, right is not None)

    def score_args(self) -> tuple[float, float, bool]:
        """(qk_in, qk_out, SOFTCAP): s2 = qk * qk_out, or tanh(qk * qk_in) * qk_out with a softcap."""
        if self.softcap > 0.0:
            return self.scale / self.softcap, self.softcap * LOG2E, True
        return 1.0, self.scale * LOG2E, False

    def precision(self, dtype: torch.dtype) -> str:
        return "tf32" if dtype == torch.float32 and self.allow_tf32 else "ieee"

    def heavy(self, mask: "MaskArg") -> bool:
        """Features that hold more live values per score (and get smaller tiles)."""
        return mask.kind != 0 or self.softcap > 0.0 or self.dropout_p > 0.0


@dataclasses.dataclass(frozen=True)
class VarlenOffsets:
    """Packed sequences: sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q (and of
    cu_seqlens_k for k/v); no sequence is longer than max_seqlen_q / max_seqlen_k."""
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """The launch grid's view of a call: sequences, heads, kv heads and the (longest) lengths.

    Dense tensors are (B, H, S, D) and lse (B, H, S); packed varlen tensors are (total, H, D)
    and lse (H, total), their sequence offsets coming from ``varlen``."""
    batch: int
    heads: int
    kv_heads: int
    seqlen_q: int
    seqlen_k: int
    varlen: Optional[VarlenOffsets] = None

    @classmethod
    def dense(cls, q: torch.Tensor, k: torch.Tensor) -> "AttentionShape":
        return cls(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2])

    @classmethod
    def packed(cls, q: torch.Tensor, k: torch.Tensor, varlen: VarlenOffsets) -> "AttentionShape":
        return cls(varlen.cu_seqlens_q.shape[0] - 1, q.shape[1], k.shape[1], varlen.max_seqlen_q,
                   varlen.max_seqlen_k, varlen)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, head, row) strides of q/k/v/out-like ``t``; packed: the batch offset comes
        from cu_seqlens, so its stride is 0."""
        if self.varlen is not None:
            return (0, t.stride(1), t.stride(0))
        return tuple(t.stride()[:3])

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int, int]:
        if self.varlen is not None:
            return (0, lse.stride(0), lse.stride(1))
        return tuple(lse.stride())

    def offsets(self, placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cu_seqlens_q, cu_seqlens_k), or a placeholder pointer the dense kernels never read."""
        if self.varlen is None:
            return placeholder, placeholder
        return self.varlen.cu_seqlens_q.contiguous(), self.varlen.cu_seqlens_k.contiguous()


@dataclasses.dataclass(frozen=True)
class MaskArg:
    """An attn_mask as the kernels read it: a (B, H, Sq, Sk) view with stride-0 broadcasts
    (booleans viewed as uint8), and its kind: 0 none, 1 boolean (0 = hidden), 2 additive."""
    tensor: Optional[torch.Tensor] = None
    strides: tuple[int, int, int, int] = (0, 0, 0, 0)
    kind: int = 0

    @classmethod
    def of(cls, attn_mask: Optional[torch.Tensor], shape: AttentionShape) -> "MaskArg":
        if attn_mask is None:
            return cls()
        mask = attn_mask
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.expand(shape.batch, shape.heads, shape.seqlen_q, shape.seqlen_k)
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
            return cls(mask, tuple(mask.stride()), 1)
        return cls(mask, tuple(mask.stride()), 2)
