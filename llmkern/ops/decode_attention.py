"""Attention against a KV cache for decoding, like flash-attention's ``flash_attn_with_kvcache``.

Ops (forward only, for inference):
  llmkern::attention_with_kvcache_fwd(q, k_cache, v_cache, cache_seqlens, block_table, new_keys,
      scale, causal, window_left, window_right, softcap, num_splits, backend,
      rotary_cos=None, rotary_sin=None, rotary_interleaved=False) -> (out, lse)
attends over ``cache_seqlens + new_keys`` keys per row with the split-KV Triton kernel
(kernels/decode_attention.py), rotating q as it loads it when given rotary tables; it mutates
nothing. ``llmkern::kvcache_append_rotary(k_cache!, v_cache!, k, v, cache_seqlens, block_table,
cos, sin, interleaved, backend)`` writes k rotated, and v, into the caches in one launch.
The functional ``attention_with_kvcache`` first writes k/v (when given) into the caches in
place: with plain indexing, which torch.compile traces as the mutation it is, or with the
append op when rotary tables are given. The torch reference serves every other call, float64
included.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from llmkern import reference
from llmkern.backends import (KERNEL_DTYPES, Backend, OpBackends, dtype_reason,
                              interpreter_bf16_reason)
from llmkern.ops._checks import (ANY_FLOAT, check_same_device, check_same_dtype, check_tensor,
                                 describe)
from llmkern.ops.attention_checks import (ATTENTION_DTYPES, MAX_HEAD_DIM, check_scalars,
                                          check_window)
from llmkern.ops.rotary import rotate_reference

OP = "attention_with_kvcache"
MAX_DECODE_ROWS = 16  # query rows per sequence the split-KV kernel takes


def _triton_serves(q: Tensor, **_) -> Optional[str]:
    if q.shape[2] > MAX_DECODE_ROWS:
        return (f"the split-KV decode kernel takes at most {MAX_DECODE_ROWS} query rows per "
                f"sequence, got q {describe(q)}")
    return dtype_reason(q, KERNEL_DTYPES, "q") or interpreter_bf16_reason(q)


# The entry takes (q, k_cache, v_cache, lens, block_table, extra_len, DecodeOptions).
DECODE = OpBackends(OP, [
    Backend("triton", serves=_triton_serves,
            impl={"fwd": "llmkern.kernels.decode_attention:decode_attention_fwd",
                  "append": "llmkern.kernels.decode_attention:append_kv_fwd"}),
], auto_order=("triton",))


def append_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
              block_table: Optional[Tensor]) -> None:
    """Write k/v (B, Hkv, Sn, D) into the caches at positions cache_seqlens[b] + t, in place."""
    b, hkv, sn, d = k.shape
    pos = cache_seqlens.long()[:, None] + torch.arange(sn, device=k.device)  # (B, Sn)
    if block_table is None:
        rows, off = torch.arange(b, device=k.device)[:, None].expand(b, sn), pos
    else:
        page = k_cache.shape[2]
        rows, off = torch.gather(block_table.long(), 1, pos // page), pos % page
    rows, off = rows.reshape(-1), off.reshape(-1)
    # Indices split by a slice put the indexed dim first: (B * Sn, Hkv, D).
    k_cache[rows, :, off] = k.transpose(1, 2).reshape(b * sn, hkv, d).to(k_cache.dtype)
    v_cache[rows, :, off] = v.transpose(1, 2).reshape(b * sn, hkv, d).to(v_cache.dtype)


def rotary_positions(cache_seqlens: Tensor, sq: int, causal_or_local: bool) -> Tensor:
    """(B, Sq) table rows of the queries: ``cache_seqlens[b] + i`` for causal or windowed
    calls, ``cache_seqlens[b]`` for every query otherwise (as flash-attention rotates them)."""
    steps = torch.arange(sq, device=cache_seqlens.device) * int(causal_or_local)
    return cache_seqlens.long()[:, None] + steps


def contiguous_cache(cache: Tensor, block_table: Optional[Tensor]) -> Tensor:
    """The (B, Hkv, max_blocks * page, D) view of a paged cache (a copy); a dense one as is.
    Table entries past a row's length may be anything: they are clamped, their keys unseen."""
    if block_table is None:
        return cache
    blocks = block_table.long().clamp(0, cache.shape[0] - 1)
    b, nb = blocks.shape
    _, hkv, page, d = cache.shape
    return cache[blocks].permute(0, 2, 1, 3, 4).reshape(b, hkv, nb * page, d)


def reference_kvcache(q, k_cache, v_cache, lens, block_table, scale, causal, window, softcap):
    """(out, lse) in plain PyTorch: the keys of row b are its first ``lens[b]`` cache entries."""
    k = contiguous_cache(k_cache, block_table)
    v = contiguous_cache(v_cache, block_table)
    sq = q.shape[2]
    mask = reference.visible_keys(sq, k.shape[2], causal, window, q.device,
                                  len_q=torch.full_like(lens, sq), len_k=lens)
    return reference.attention(q, k, v, scale=scale, softcap=softcap, attn_mask=mask,
                               return_lse=True)


@torch.library.custom_op("llmkern::attention_with_kvcache_fwd", mutates_args=())
def attention_with_kvcache_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                               block_table: Optional[Tensor], new_keys: int, scale: float,
                               causal: bool, window_left: Optional[int],
                               window_right: Optional[int], softcap: float, num_splits: int,
                               backend: str, rotary_cos: Optional[Tensor] = None,
                               rotary_sin: Optional[Tensor] = None,
                               rotary_interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Row b attends over its first ``cache_seqlens[b] + new_keys`` cache entries; with rotary
    tables, q is rotated at its positions (:func:`rotary_positions`) as the kernel loads it."""
    from llmkern.kernels.decode_attention import DecodeOptions

    opts = DecodeOptions(scale, causal, window_left, window_right, softcap, num_splits,
                         rotary_interleaved)
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    bt = block_table.contiguous() if block_table is not None else None
    rotary = None if rotary_cos is None else (rotary_cos, rotary_sin)
    return DECODE.run("fwd", backend, q, k_cache, v_cache, cache_seqlens.contiguous(), bt,
                      new_keys, opts, None, None, rotary)


@attention_with_kvcache_fwd.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, new_keys, scale, causal, window_left,
      window_right, softcap, num_splits, backend, rotary_cos=None, rotary_sin=None,
      rotary_interleaved=False):
    return (q.new_empty(q.shape[:3] + (v_cache.shape[-1],)),
            q.new_empty(q.shape[:3], dtype=torch.float32))


@torch.library.custom_op("llmkern::kvcache_append_rotary", mutates_args=("k_cache", "v_cache"))
def kvcache_append_rotary(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor,
                          cache_seqlens: Tensor, block_table: Optional[Tensor], cos: Tensor,
                          sin: Tensor, interleaved: bool, backend: str) -> None:
    """k rotated at positions ``cache_seqlens[b] + t``, and v, written into the caches."""
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    bt = block_table.contiguous() if block_table is not None else None
    DECODE.run("append", backend, k_cache, v_cache, k, v, cache_seqlens.contiguous(), bt, cos,
               sin, interleaved)


@kvcache_append_rotary.register_fake
def _(k_cache, v_cache, k, v, cache_seqlens, block_table, cos, sin, interleaved, backend):
    return None


# ---- input checks --------------------------------------------------------------------------

def _check_caches(q, k_cache, v_cache, block_table) -> int:
    """Ranks, dtypes, devices, heads and head_dim of q and the caches; returns max_len."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, OP, ndim=4, dtypes=ATTENTION_DTYPES)
    check_same_device(OP, q=q, k_cache=k_cache, v_cache=v_cache)
    check_same_dtype(OP, q=q, k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"llmkern.{OP}: k_cache ({describe(k_cache)}) and v_cache "
                         f"({describe(v_cache)}) must have the same shape")
    b, h, _, d = q.shape
    hkv = k_cache.shape[1]
    if k_cache.shape[3] != d:
        raise ValueError(f"llmkern.{OP}: head_dim of q ({describe(q)}) and k_cache "
                         f"({describe(k_cache)}) must match")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"llmkern.{OP}: head_dim {d} of q ({describe(q)}) exceeds the supported "
                         f"maximum {MAX_HEAD_DIM}")
    if h % hkv:
        raise ValueError(f"llmkern.{OP}: the {h} heads of q ({describe(q)}) must be a multiple of "
                         f"the {hkv} heads of k_cache ({describe(k_cache)})")
    if block_table is None:
        if k_cache.shape[0] != b:
            raise ValueError(f"llmkern.{OP}: k_cache ({describe(k_cache)}) must have q's batch "
                             f"size {b} (q {describe(q)}); a paged cache needs block_table")
        return k_cache.shape[2]
    check_tensor("block_table", block_table, OP, ndim=2, dtypes=(torch.int32,))
    check_same_device(OP, q=q, block_table=block_table)
    if block_table.shape[0] != b:
        raise ValueError(f"llmkern.{OP}: block_table ({describe(block_table)}) must be "
                         f"(batch={b}, max_blocks) int32 to match q ({describe(q)})")
    return block_table.shape[1] * k_cache.shape[2]


def _check_new_kv(q, k_cache, k, v) -> int:
    """k/v to append: both or neither, (B, Hkv, Sn, D) in the caches' dtype; returns Sn."""
    if (k is None) != (v is None):
        raise ValueError(f"llmkern.{OP}: pass both k and v to append, or neither")
    if k is None:
        return 0
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, OP, ndim=4, dtypes=ATTENTION_DTYPES)
    check_same_device(OP, q=q, k=k, v=v)
    check_same_dtype(OP, k_cache=k_cache, k=k, v=v)
    want = (q.shape[0], k_cache.shape[1], k.shape[2], q.shape[3])
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != want:
            raise ValueError(f"llmkern.{OP}: {name} ({describe(t)}) must be (batch, kv_heads, "
                             f"Sq_new, head_dim) = {want}")
    return k.shape[2]


def _seqlens(q, cache_seqlens, max_len: int, new: int) -> Tensor:
    b = q.shape[0]
    if cache_seqlens is None:
        if new:
            raise ValueError(f"llmkern.{OP}: cache_seqlens is required to append k/v (where each "
                             f"row's new keys go)")
        return torch.full((b,), max_len, dtype=torch.int32, device=q.device)
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= max_len - new:
            raise ValueError(f"llmkern.{OP}: cache_seqlens={cache_seqlens} plus {new} new keys "
                             f"must fit the cache's max_len {max_len}")
        return torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    check_tensor("cache_seqlens", cache_seqlens, OP, ndim=1, dtypes=(torch.int32, torch.int64))
    check_same_device(OP, q=q, cache_seqlens=cache_seqlens)
    if cache_seqlens.shape[0] != b:
        raise ValueError(f"llmkern.{OP}: cache_seqlens ({describe(cache_seqlens)}) must have one "
                         f"length per batch row ({b}, from q {describe(q)})")
    return cache_seqlens


def _check_values(lens: Tensor, block_table: Optional[Tensor], max_len: int, new: int,
                  num_blocks: int, page: int) -> None:
    """The lengths (and the table entries they use) within bounds: one device -> host sync."""
    bad_len = (lens < 0) | (lens + new > max_len)
    checks = [bad_len.any()]
    if block_table is not None:
        used = torch.arange(block_table.shape[1], device=lens.device) * page < (lens + new)[:, None]
        checks.append((used & ((block_table < 0) | (block_table >= num_blocks))).any())
    flags = torch.stack(checks).tolist()
    if flags[0]:
        raise ValueError(f"llmkern.{OP}: cache_seqlens must be in [0, max_len - Sq_new] = "
                         f"[0, {max_len - new}] (max_len {max_len}, {new} new keys), got "
                         f"{lens.tolist()}")
    if len(flags) > 1 and flags[1]:
        raise ValueError(f"llmkern.{OP}: block_table ({describe(block_table)}) holds block ids "
                         f"outside [0, {num_blocks}) where the rows' keys lie")


def _check_rotary(q, k_cache, k, cos, sin, interleaved, max_len: int, new: int,
                  causal_or_local: bool) -> None:
    """Rotary tables: both or neither, with new keys, (T, R/2) with R <= head_dim and a row for
    every position a key or query of this call can have."""
    if (cos is None) != (sin is None):
        raise ValueError(f"llmkern.{OP}: pass both rotary_cos and rotary_sin, or neither")
    if cos is None:
        return
    if k is None:
        raise ValueError(f"llmkern.{OP}: rotary_cos/rotary_sin rotate the new keys as they are "
                         f"written: pass k and v too (a cache holds keys already rotated)")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        check_tensor(name, t, OP, ndim=2, dtypes=ANY_FLOAT)
    check_same_device(OP, q=q, rotary_cos=cos, rotary_sin=sin)
    if cos.shape != sin.shape or cos.dtype != sin.dtype:
        raise ValueError(f"llmkern.{OP}: rotary_cos ({describe(cos)}) and rotary_sin "
                         f"({describe(sin)}) must have one shape and dtype")
    d = q.shape[-1]
    if 2 * cos.shape[1] > d:
        raise ValueError(f"llmkern.{OP}: rotary_cos ({describe(cos)}) must be (positions, "
                         f"rotary_dim / 2) with rotary_dim <= head_dim {d} (q {describe(q)})")
    sq = q.shape[2]
    need = max(max_len, max_len - new + 1 + (sq - 1) * int(causal_or_local))
    if cos.shape[0] < need:
        raise ValueError(f"llmkern.{OP}: rotary_cos ({describe(cos)}) needs a row for each "
                         f"position up to {need - 1} (k_cache max_len {max_len}, "
                         f"{sq} queries, {new} new keys), so at least {need} rows")
    if not isinstance(interleaved, bool):
        raise TypeError(f"llmkern.{OP}: rotary_interleaved must be a bool, got {interleaved!r}")


def _append(k_cache, v_cache, k, v, lens, block_table, cos, sin, interleaved, chosen) -> None:
    """Write k (rotated when tables are given) and v into the caches, in place."""
    with torch.no_grad():
        if cos is None:
            # Plain indexing writes, so that torch.compile sees the in-place update of the
            # caches and the attention op itself mutates nothing.
            append_kv(k_cache, v_cache, k, v, lens, block_table)
        elif chosen != "torch" and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1:
            kvcache_append_rotary(k_cache, v_cache, k, v, lens, block_table, cos, sin,
                                  interleaved, chosen)
        else:
            pos = rotary_positions(lens, k.shape[2], True)
            append_kv(k_cache, v_cache, rotate_reference(k, cos, sin, pos, interleaved), v, lens,
                      block_table)


# ---- functional API ----------------------------------------------------------------------

def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                           v: Optional[Tensor] = None, cache_seqlens=None, causal: bool = True,
                           scale: Optional[float] = None, softcap: Optional[float] = None,
                           block_table: Optional[Tensor] = None, return_lse: bool = False,
                           backend: Optional[str] = None, window=None, num_splits: int = 0,
                           check: bool = True, rotary_cos: Optional[Tensor] = None,
                           rotary_sin: Optional[Tensor] = None, rotary_interleaved: bool = False):
    """Decode attention of q (B, H, Sq, D) against a KV cache, like ``flash_attn_with_kvcache``
    in llmkern's (batch, heads, seq, dim) layout.

    ``k_cache``/``v_cache`` are (B, Hkv, max_len, D), or with ``block_table`` (B, max_blocks)
    int32 a paged cache (num_blocks, Hkv, block_size, D) where key j of row b lives in block
    ``block_table[b, j // block_size]``. Row b holds ``cache_seqlens[b]`` keys (an int32/int64
    (B,) tensor or an int; None: the whole cache). ``k``/``v`` (B, Hkv, Sq_new, D), when given,
    are written into the caches in place at each row's position, and attention then covers
    ``cache_seqlens + Sq_new`` keys (``cache_seqlens`` is not advanced: the caller does that).
    ``causal`` and ``window=(left, right)`` align query i with key i + len - Sq (bottom-right);
    ``softcap=c`` maps scores s to c * tanh(s / c). Returns out (B, H, Sq, D) (and lse (B, H, Sq)
    fp32 with ``return_lse``); a row that sees no key gives zeros and lse = -inf.

    ``rotary_cos``/``rotary_sin`` ((T, rotary_dim / 2) tables, as :func:`llmkern.rotary` takes;
    rotary_dim <= head_dim, the rest of each head passing through) apply rotary embeddings
    inside the kernels, as flash-attention does: the new keys ``k`` (required then) are rotated
    at positions ``cache_seqlens[b] + i`` as they are written into the cache, and q at the same
    positions as it is loaded (causal or windowed calls; every query at ``cache_seqlens[b]``
    otherwise). ``rotary_interleaved`` picks the pairs (2i, 2i + 1) instead of (i, i + R/2).

    The Triton kernel takes up to 16 query rows per sequence and splits the keys over
    ``num_splits`` programs (0: chosen from the GPU's occupancy). ``check=True`` validates the
    lengths (and used block ids) against the cache with one device -> host sync; callers that
    guarantee them (CUDA graphs) pass ``check=False``. Forward only: no gradient flows.
    """
    max_len = _check_caches(q, k_cache, v_cache, block_table)
    new = _check_new_kv(q, k_cache, k, v)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin)):
        raise ValueError(f"llmkern.{OP} is forward only (inference), but an input requires grad "
                         f"(q {describe(q)}); call it under torch.no_grad() or use "
                         f"llmkern.attention for training")
    lens = _seqlens(q, cache_seqlens, max_len, new)
    left, right = check_window(OP, window)
    local = bool(causal) or left is not None or right is not None
    _check_rotary(q, k_cache, k, rotary_cos, rotary_sin, rotary_interleaved, max_len, new, local)
    check_scalars(OP, scale, softcap)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"llmkern.{OP}: num_splits must be an int >= 0 (0 = automatic), got "
                         f"{num_splits!r}")
    if check and isinstance(cache_seqlens, Tensor):
        page = k_cache.shape[2]
        _check_values(lens, block_table, max_len, new, k_cache.shape[0], page)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chosen = DECODE.choose(q.device, backend, q=q)
    cos, sin = rotary_cos, rotary_sin
    if cos is not None and chosen != "torch" and cos.dtype == torch.float64:
        cos, sin = cos.float(), sin.float()  # the kernels rotate in fp32
    if new:
        _append(k_cache, v_cache, k, v, lens, block_table, cos, sin, rotary_interleaved, chosen)
    if chosen == "torch":
        with torch.no_grad():
            if cos is not None:
                pos = rotary_positions(lens, q.shape[2], local)
                q = rotate_reference(q, cos, sin, pos, rotary_interleaved)
            window_arg = None if left is None and right is None else (left, right)
            out, lse = reference_kvcache(q, k_cache, v_cache, lens + new, block_table, scale,
                                         bool(causal), window_arg, softcap)
    else:
        out, lse = attention_with_kvcache_fwd(q, k_cache, v_cache, lens, block_table, new, scale,
                                              bool(causal), left, right, float(softcap or 0.0),
                                              int(num_splits), chosen, cos, sin,
                                              rotary_interleaved)
    return (out, lse) if return_lse else out
