"""Split-KV decode attention (flash-decoding, Triton): few query rows against a long KV cache.

Decoding reads the whole cache for one to a few query rows per sequence, so the work is memory
bound and a (sequence, head) grid leaves most SMs idle. Here:
  * the query heads that share a kv head are stacked into one tile of rows (GQA: row r is query
    head ``kv_head * GROUP + r // SEQ_Q``, query ``r % SEQ_Q``), so each K/V tile is loaded once
    for the whole group and ``tl.dot`` gets at least 16 rows;
  * the keys are split over ``num_splits`` programs per (sequence, kv head); each writes its
    normalized partial output and lse in fp32; a second kernel merges the partials by lse in a
    fixed order (deterministic). With one split the first kernel writes the result directly.
Per-row cache lengths come from a tensor (ragged batches); a paged cache maps key j of sequence
b to block ``block_table[b, j // PAGE]``, row ``j % PAGE``. Causal and window are aligned
bottom-right per sequence: query i of Sq sees keys j <= i + len - Sq.

Rotary embeddings can be fused in (as flash-attention's kvcache path does): the append kernel
rotates the new keys at their positions ``lens[b] + t`` while it writes them into the cache, and
the split kernel rotates q as it loads it, so neither makes an extra pass over q or k.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import persistent_programs
from .attention_common import _interpret, _tanh, block_d

MAX_ROWS_PER_TILE = 64  # group * Sq rows beyond this are tiled over more programs
MAX_SPLITS = 128
SPLITS_PER_SM = 2


@triton.jit
def _kv_rows(K, b64, hk64, cols, col_ok, BT, sbt, skb, skh, sks, PAGE: tl.constexpr,
             PAGED: tl.constexpr):
    """Row addresses (one per key index in ``cols``) of kv head hk64 of sequence b64."""
    if PAGED:
        blk = tl.load(BT + b64 * sbt + cols // PAGE, mask=col_ok, other=0).to(tl.int64)
        return K + blk * skb + hk64 * skh + (cols % PAGE).to(tl.int64) * sks
    return K + b64 * skb + hk64 * skh + cols.to(tl.int64) * sks


@triton.jit
def _rotate_interleaved(x, pos, COS, SIN, scs, R2):
    """Pairs (2i, 2i + 1): the tile split into its even and odd columns and joined back."""
    x1, x2 = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], x.shape[1] // 2, 2)))
    half = tl.arange(0, x.shape[1] // 2)
    angle = pos[:, None] * scs + half[None, :]
    c = tl.load(COS + angle, mask=(half < R2)[None, :], other=1.0).to(tl.float32)
    s = tl.load(SIN + angle, mask=(half < R2)[None, :], other=0.0).to(tl.float32)
    y = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)
    return tl.reshape(y, (x.shape[0], x.shape[1])).to(x.dtype)


@triton.jit
def _rotate_gather(x, pos, offs_d, COS, SIN, scs, R2, INTERLEAVED: tl.constexpr):
    """Each column's partner (d +- R2 half-split, d ^ 1 interleaved) gathered along the row of
    the tile."""
    if INTERLEAVED:
        first = offs_d % 2 == 0
        pair = offs_d // 2
        partner = offs_d ^ 1
    else:
        first = offs_d < R2
        pair = tl.where(first, offs_d, offs_d - R2)
        partner = tl.where(first, offs_d + R2, offs_d - R2)
    rot = (offs_d < 2 * R2)[None, :]
    angle = pos[:, None] * scs + pair[None, :]
    c = tl.load(COS + angle, mask=rot, other=1.0).to(tl.float32)
    s = tl.load(SIN + angle, mask=rot, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    xp = tl.gather(xf, tl.broadcast_to(partner[None, :], x.shape), 1)
    return (xf * c + xp * tl.where(first, -s, s)).to(x.dtype)


@triton.jit
def _rotate_rows(x, pos, offs_d, COS, SIN, scs, R2, ROTARY: tl.constexpr):
    """x (rows x BLOCK_D) rotated at positions ``pos`` (one per row, each a valid table row),
    in fp32, returned in x's dtype; columns past the rotary dim pass through. The pairs come
    from the tile itself (no second load): ROTARY 1 half-split, 2 interleaved. Both forms are
    exact; interleaved tiles narrower than 256 columns take the split form, which ptxas
    allocates without spills there (the gather form spills at 32x128 under triton 3.6, the
    split form at 32x256; the ahead-of-time compiles check every shipped tile)."""
    if ROTARY == 2 and x.shape[1] < 256:
        y = _rotate_interleaved(x, pos, COS, SIN, scs, R2)
    else:
        y = _rotate_gather(x, pos, offs_d, COS, SIN, scs, R2, ROTARY == 2)
    return y


@triton.jit
def _append_kv_kernel(Knew, Vnew, KC, VC, Lens, BT, COS, SIN,
                      snb, snh, sns, swb, swh, sws, skb, skh, sks, svb, svh, svs, sbt, scs,
                      SEQ_NEW, HKV, R2, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_D: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr,
                      ROTARY: tl.constexpr):
    """One program per (new key t of sequence b, block of kv heads): k rotated at position
    lens[b] + t and v, written into the caches at that position."""
    pid = tl.program_id(0).to(tl.int64)
    b64 = pid // SEQ_NEW
    t = pid % SEQ_NEW
    pos = tl.load(Lens + b64).to(tl.int64) + t
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < HKV
    heads = heads.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = h_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    if PAGED:
        blk = tl.load(BT + b64 * sbt + pos // PAGE).to(tl.int64)
        row, slot = blk, pos % PAGE
    else:
        row, slot = b64, pos
    k_rows = Knew + b64 * snb + heads * snh + t * sns
    k = tl.load(k_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    if ROTARY > 0:
        k = _rotate_rows(k, pos + heads * 0, offs_d, COS, SIN, scs, R2, ROTARY)
    tl.store(KC + row * skb + heads[:, None] * skh + slot * sks + offs_d[None, :],
             k.to(KC.dtype.element_ty), mask=mask)
    v = tl.load(Vnew + b64 * swb + heads[:, None] * swh + t * sws + offs_d[None, :], mask=mask,
                other=0.0)
    tl.store(VC + row * svb + heads[:, None] * svh + slot * svs + offs_d[None, :],
             v.to(VC.dtype.element_ty), mask=mask)


@triton.jit
def _decode_split_kernel(Q, K, V, Out, Lse, Lens, BT, COS, SIN,
                         sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                         sob, soh, sos, sop, slb, slh, sls, slp, sbt, scs,
                         GROUP, SEQ_Q, extra_len, chunk, left, right, qk_in, qk_out, R2, rot_step,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                         ROTARY: tl.constexpr, PREC: tl.constexpr):
    """One program per (split, (kv head, row tile), sequence): the partial output and lse of its
    rows over keys [split * chunk, (split + 1) * chunk). With ROTARY, query i is rotated at
    position lens[b] + i * rot_step as it is loaded."""
    split = tl.program_id(0)
    hk = tl.program_id(1) // tl.cdiv(GROUP * SEQ_Q, BLOCK_M)
    m0 = (tl.program_id(1) % tl.cdiv(GROUP * SEQ_Q, BLOCK_M)) * BLOCK_M
    b64 = tl.program_id(2).to(tl.int64)
    hk64 = hk.to(tl.int64)
    len_k = tl.load(Lens + b64).to(tl.int32) + extra_len
    shift = len_k - SEQ_Q

    r = m0 + tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * SEQ_Q
    qi = r % SEQ_Q
    h64 = (hk * GROUP + r // SEQ_Q).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    q_rows = Q + b64 * sqb + h64 * sqh + qi.to(tl.int64) * sqs
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
    if ROTARY > 0:
        q_pos = (len_k - extra_len + qi * rot_step).to(tl.int64)
        q = _rotate_rows(q, q_pos, offs_d, COS, SIN, scs, R2, ROTARY)

    # Keys this program's rows can see: [lo, hi) within the split's chunk.
    hi = len_k
    if HAS_RIGHT:
        hi = tl.minimum(hi, tl.max(tl.where(row_ok, qi, 0), 0) + shift + right + 1)
    lo = split * 0
    if HAS_LEFT:
        lo = tl.maximum(tl.min(tl.where(row_ok, qi, SEQ_Q), 0) + shift - left, 0)
    start = tl.maximum(split * chunk, (lo // BLOCK_N) * BLOCK_N)
    stop = tl.minimum((split + 1) * chunk, hi)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < stop
        kv_mask = col_ok[:, None] & d_ok
        k = tl.load(_kv_rows(K, b64, hk64, cols, col_ok, BT, sbt, skb, skh, sks, PAGE, PAGED)[:, None]
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if SOFTCAP:
            s2 = _tanh(qk * qk_in) * qk_out
        else:
            s2 = qk * qk_out
        ok = col_ok[None, :]
        diag = cols[None, :] - qi[:, None] - shift
        if HAS_RIGHT:
            ok = ok & (diag <= right)
        if HAS_LEFT:
            ok = ok & (diag >= -left)
        s2 = tl.where(ok, s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: avoid -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s2 - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_kv_rows(V, b64, hk64, cols, col_ok, BT, sbt, svb, svh, svs, PAGE, PAGED)[:, None]
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    empty = l_i == 0.0  # no visible key in this split: zeros and lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    qi64 = qi.to(tl.int64)
    o_ptrs = (Out + b64 * sob + h64[:, None] * soh + qi64[:, None] * sos + split * sop
              + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    tl.store(Lse + b64 * slb + h64 * slh + qi64 * sls + split * slp, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(Part, PartLse, Out, Lse, num_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per query row: out = sum_s exp(lse_s - lse) * out_s, lse = logsumexp(lse_s).
    Partials are contiguous (rows, splits, HEAD_DIM); the sums run in a fixed order."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(PartLse + row * num_splits + offs_s, mask=offs_s < num_splits,
                    other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(lse_s - m_use), 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):  # one split at a time: few registers, a fixed order
        w = tl.exp(tl.load(PartLse + row * num_splits + s) - m_use)
        part = tl.load(Part + (row * num_splits + s) * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM,
                       other=0.0)
        acc += part * w
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)
    tl.store(Out + row * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(Lse + row, tl.where(empty, float("-inf"), m_use + tl.log(tl.where(empty, 1.0, total))))


# ---- launch configuration ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Options of one decode call. ``window_*`` None means unbounded (causal folds into the
    right bound); ``softcap`` 0.0 means none; ``num_splits`` 0 chooses from the occupancy."""
    scale: float
    causal: bool = True
    window_left: Optional[int] = None
    window_right: Optional[int] = None
    softcap: float = 0.0
    num_splits: int = 0
    rotary_interleaved: bool = False  # the layout of the rotary tables, when the call has them


_HALF = {(128, 80): (32, 2), (128, 90): (64, 3), (256, 0): (32, 2)}  # (BLOCK_N, num_stages)
_FP32 = {(64, 0): (32, 2), (256, 0): (16, 1)}
ARCHS = (80, 90)
BLOCK_DS = (16, 32, 64, 128, 256)
INTERPRETER_ROWS = 16  # row tiles of 16 on the CPU, so that small tests tile the rows too


def max_rows(bd: int, fp32: bool) -> int:
    """The largest row tile for a head dim: q and the accumulator (rows x BLOCK_D, fp32) stay in
    registers, so wide heads (and fp32 operands) get fewer rows."""
    return max(16, min(MAX_ROWS_PER_TILE, (2048 if fp32 else 8192) // bd))


def block_ms(bd: int, fp32: bool) -> tuple:
    return tuple(m for m in (16, 32, 64) if m <= max_rows(bd, fp32))


@functools.lru_cache(maxsize=None)
def gpu_config(bd: int, fp32: bool, arch: int, bm: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel on a GPU."""
    # Wide tiles spread over 8 warps. The tile limits above and this rule keep every config free
    # of spills under triton 3.6 and 3.8 for sm_80 and sm_90 (the AOT tests and CI check both).
    warps = 8 if bm * bd >= 4096 and not (fp32 and bd > 128 and arch == 80) else 4
    for (max_bd, for_arch), (bn, stages) in sorted((_FP32 if fp32 else _HALF).items()):
        if bd <= max_bd and for_arch in (0, arch):
            return bn, warps, stages
    raise ValueError(f"no decode attention config for BLOCK_D {bd}, arch {arch}")


def config(bd: int, fp32: bool, arch: int, bm: int) -> tuple[int, int, int]:
    if _interpret():
        return (16, 4, 1)  # small key tiles: short test caches span several tiles and splits
    return gpu_config(bd, fp32, arch, bm)


def block_m(rows: int, bd: int, fp32: bool) -> int:
    """Rows of one tile: the group's query rows padded to a power of two >= 16 (tl.dot's
    minimum), at most ``max_rows``; more rows are tiled over more programs."""
    cap = INTERPRETER_ROWS if _interpret() else max_rows(bd, fp32)
    return min(max(16, triton.next_power_of_2(rows)), cap)


def choose_splits(device: torch.device, programs: int, key_tiles: int) -> int:
    """Enough splits to give every SM ``SPLITS_PER_SM`` programs, at most one per key tile."""
    target = persistent_programs(device, per_sm=SPLITS_PER_SM)
    return max(1, min(triton.cdiv(target, max(programs, 1)), key_tiles, MAX_SPLITS))


def _arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """How one call is launched: tile sizes, row tiles per kv head, key splits and their chunk."""
    block_d: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    row_tiles: int
    splits: int
    chunk: int


def plan(q_shape, kv_heads: int, max_len: int, fp32: bool, device, num_splits: int = 0) -> DecodePlan:
    """The launch plan of q (B, H, Sq, D) against ``kv_heads`` heads of ``max_len`` keys."""
    device = torch.device(device)
    b, h, sq, d = q_shape
    rows = (h // kv_heads) * sq
    bd = block_d(d)
    bm = block_m(rows, bd, fp32)
    bn, warps, stages = config(bd, fp32, _arch(device), bm)
    row_tiles = triton.cdiv(rows, bm)
    key_tiles = triton.cdiv(max_len, bn)
    if num_splits:  # the caller's count, but no split without a key tile
        splits = max(1, min(num_splits, key_tiles, MAX_SPLITS))
    else:
        splits = choose_splits(device, b * kv_heads * row_tiles, key_tiles)
    chunk = triton.cdiv(triton.cdiv(max_len, splits), bn) * bn
    return DecodePlan(bd, bm, bn, warps, stages, row_tiles, splits, chunk)


def _rotary_args(rotary, opts: DecodeOptions, like: torch.Tensor) -> tuple:
    """(cos, sin, row stride, R/2, ROTARY) for the kernels; placeholders without rotary."""
    if rotary is None:
        return like, like, 0, 0, 0
    cos, sin = rotary
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, cos.stride(0), cos.shape[-1], 2 if opts.rotary_interleaved else 1


def append_kv_fwd(k_cache, v_cache, k, v, lens, block_table, cos, sin, interleaved: bool) -> None:
    """Write k rotated by (cos, sin) at positions ``lens[b] + t``, and v, into the caches in
    place (one launch). k/v (B, Hkv, Sn, D), last dims contiguous; caches as in
    :func:`decode_attention_fwd`; positions and table entries are trusted."""
    b, hkv, sn, d = k.shape
    if b * sn == 0:
        return
    paged = block_table is not None
    cos, sin, scs, r2, rot = _rotary_args((cos, sin), DecodeOptions(1.0, rotary_interleaved=interleaved), k)
    block_h = min(8, triton.next_power_of_2(hkv))
    _append_kv_kernel[(b * sn, triton.cdiv(hkv, block_h))](
        k, v, k_cache, v_cache, lens, block_table if paged else lens, cos, sin,
        *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_table.stride(0) if paged else 0, scs, sn, hkv, r2, HEAD_DIM=d, BLOCK_H=block_h,
        BLOCK_D=block_d(d), PAGE=k_cache.shape[2] if paged else 1, PAGED=paged, ROTARY=rot,
        num_warps=4)


def decode_attention_fwd(q, k_cache, v_cache, lens, block_table, extra_len: int,
                         opts: DecodeOptions, out: Optional[torch.Tensor] = None,
                         lse: Optional[torch.Tensor] = None, rotary=None):
    """(out (B, H, Sq, D), lse (B, H, Sq) fp32) of q (B, H, Sq, D) against the caches.

    Caches are (B, Hkv, max_len, D), or (num_blocks, Hkv, page, D) with ``block_table``
    (B, max_blocks) int32; sequence b has ``lens[b] + extra_len`` keys. Inputs are trusted here
    (the op layer checks them); last dims must be contiguous. ``out``/``lse``, when given, are
    contiguous tensors of those shapes to write into. ``rotary=(cos, sin)`` ((T, R/2) tables)
    rotates query i at position ``lens[b] + i`` as it is loaded (causal or windowed calls;
    ``lens[b]`` for all otherwise, as flash-attention does).
    """
    b, h, sq, d = q.shape
    hkv = k_cache.shape[1]
    paged = block_table is not None
    page = k_cache.shape[2] if paged else 1
    max_len = block_table.shape[1] * page if paged else k_cache.shape[2]
    p = plan(q.shape, hkv, max_len, q.dtype == torch.float32, q.device, opts.num_splits)
    splits = p.splits
    if out is None:
        out = torch.empty(b, h, sq, d, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    if splits == 1:
        part, part_lse = out, lse
        po = (*out.stride()[:3], 0)
        pl = (*lse.stride(), 0)
    else:
        part = torch.empty(b, h, sq, splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(b, h, sq, splits, dtype=torch.float32, device=q.device)
        po, pl = part.stride()[:4], part_lse.stride()
    left, right = opts.window_left, opts.window_right
    if opts.causal:
        right = 0 if right is None else min(right, 0)
    if opts.softcap > 0.0:
        qk_in, qk_out, cap = opts.scale / opts.softcap, opts.softcap * 1.4426950408889634, True
    else:
        qk_in, qk_out, cap = 1.0, opts.scale * 1.4426950408889634, False
    bt = block_table if paged else lens
    cos, sin, scs, r2, rot = _rotary_args(rotary, opts, q)
    rot_step = 1 if opts.causal or left is not None or right is not None else 0
    _decode_split_kernel[(splits, hkv * p.row_tiles, b)](
        q, k_cache, v_cache, part, part_lse, lens, bt, cos, sin,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *po, *pl,
        block_table.stride(0) if paged else 0, scs,
        h // hkv, sq, extra_len, p.chunk, left or 0, right or 0, qk_in, qk_out, r2, rot_step,
        HEAD_DIM=d, BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_D=p.block_d, PAGE=page,
        PAGED=paged, HAS_LEFT=left is not None, HAS_RIGHT=right is not None, SOFTCAP=cap,
        ROTARY=rot, PREC="ieee", num_warps=p.num_warps, num_stages=p.num_stages)
    if splits > 1:
        _decode_merge_kernel[(b * h * sq,)](part, part_lse, out, lse, splits, HEAD_DIM=d,
                                            BLOCK_S=max(2, triton.next_power_of_2(splits)),
                                            BLOCK_D=p.block_d, num_warps=4)
    return out, lse


def aot_configs(arch: int, dtypes=("fp16", "fp32")):
    """Every split-kernel config the launcher can pick on sm_``arch``, compiled at the largest
    head dim using it, the largest row tile, paged, with window and softcap on; and the merge."""
    from llmkern.testing import AOTConfig, runtime_types

    shipped = {}
    for fp32 in (False, True):
        for bd in BLOCK_DS:
            for bm in block_ms(bd, fp32):
                key = (fp32, bm, gpu_config(bd, fp32, arch, bm))
                shipped[key] = max(shipped.get(key, 0), bd)
    for dt in dtypes:
        fp32 = dt == "fp32"
        types = runtime_types(_decode_split_kernel, {
            "Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Out": "*fp32", "Lse": "*fp32",
            "Lens": "*i32", "BT": "*i32", "qk_in": "fp32", "qk_out": "fp32", "COS": "*fp32",
            "SIN": "*fp32"})
        for (is32, bm, (bn, warps, stages)), bd in sorted(shipped.items()):
            if is32 != fp32:
                continue
            for rot in (0, 1, 2):  # rotary off, half-split, interleaved
                yield AOTConfig(_decode_split_kernel, types, dict(
                    HEAD_DIM=bd, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PAGE=16, PAGED=True,
                    HAS_LEFT=True, HAS_RIGHT=True, SOFTCAP=True, ROTARY=rot, PREC="ieee"), warps,
                    stages, name=f"decode_split-{dt}-d{bd}-{bm}x{bn}-w{warps}s{stages}"
                    + (f"-rot{rot}" if rot else ""))
        append_types = runtime_types(_append_kv_kernel, {
            "Knew": f"*{dt}", "Vnew": f"*{dt}", "KC": f"*{dt}", "VC": f"*{dt}", "Lens": "*i32",
            "BT": "*i32", "COS": "*fp32", "SIN": "*fp32"})
        for bd in (128, 256):  # interleaved takes the split form below 256 columns
            for rot in (1, 2):
                yield AOTConfig(_append_kv_kernel, append_types, dict(
                    HEAD_DIM=bd, BLOCK_H=8, BLOCK_D=bd, PAGE=16, PAGED=True, ROTARY=rot), 4, 1,
                    name=f"decode_append-{dt}-d{bd}-rot{rot}")
        merge_types = {"Part": "*fp32", "PartLse": "*fp32", "Out": f"*{dt}", "Lse": "*fp32",
                       "num_splits": "i32"}
        yield AOTConfig(_decode_merge_kernel, merge_types,
                        dict(HEAD_DIM=256, BLOCK_S=MAX_SPLITS, BLOCK_D=256), 4, 1,
                        name=f"decode_merge-{dt}-d256")
