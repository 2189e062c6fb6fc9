"""Flash attention: torch.library ops, autograd, backend choice and the functional API.

Ops (one autograd path for every variant; features are op arguments):
  llmkern::attention_fwd(q, k, v, attn_mask, scale, causal, window_left, window_right, softcap,
                         dropout_p, seed, allow_tf32, backend) -> (out, lse)
  llmkern::attention_bwd(dout, q, k, v, out, lse, dlse, attn_mask, ...) -> (dq, dk, dv)
  ``seed`` is a Tensor (an int64 scalar on the CPU, None without dropout), so a seed drawn under
  torch.compile stays in the graph and a new seed is a new input, not a recompile.
  llmkern::varlen_attention_fwd / varlen_attention_bwd: packed (total, H, D) sequences.
``softcap`` 0.0 means none; ``window_*`` None means unbounded; ``window_right`` may be negative
internally (PyTorch's top-left causal alignment when Sq < Sk is such a window).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from llmkern import reference
from llmkern.backends import select
from llmkern.ops import cuda_ext
from llmkern.ops._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor, describe

MAX_HEAD_DIM = 256
CUDA_HEAD_DIMS = (64, 128)


# ---- ops ---------------------------------------------------------------------------------

@torch.library.custom_op("llmkern::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], scale: float,
                  causal: bool, window_left: Optional[int], window_right: Optional[int],
                  softcap: float, dropout_p: float, seed: Optional[Tensor], allow_tf32: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from llmkern.kernels.attention import attention_fwd as triton_fwd

        return triton_fwd(q, k, v, attn_mask, _options(scale, causal, window_left, window_right,
                                                       softcap, dropout_p, seed, allow_tf32))
    if backend == "cuda":
        return cuda_ext.call("attention_fwd", q, k, v, scale, causal)
    raise ValueError(f"llmkern::attention_fwd: backend must be 'triton' or 'cuda', got {backend!r}")


@attention_fwd.register_fake
def _(q, k, v, attn_mask, scale, causal, window_left, window_right, softcap, dropout_p, seed,
      allow_tf32, backend):
    b, h, sq, _ = q.shape
    out = q.new_empty(b, h, sq, v.shape[-1])
    return out, q.new_empty(b, h, sq, dtype=torch.float32)


@torch.library.custom_op("llmkern::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  dlse: Optional[Tensor], attn_mask: Optional[Tensor], scale: float, causal: bool,
                  window_left: Optional[int], window_right: Optional[int], softcap: float,
                  dropout_p: float, seed: Optional[Tensor], allow_tf32: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from llmkern.kernels.attention import attention_bwd as triton_bwd

        return triton_bwd(dout, q, k, v, out, lse, dlse, attn_mask,
                          _options(scale, causal, window_left, window_right, softcap, dropout_p,
                                   seed, allow_tf32))
    if backend == "cuda":
        if dlse is not None:
            raise RuntimeError("llmkern::attention_bwd: the cuda backend cannot take a gradient "
                               "through lse")
        return cuda_ext.call("attention_bwd", dout, q, k, v, out, lse, scale, causal)
    raise ValueError(f"llmkern::attention_bwd: backend must be 'triton' or 'cuda', got {backend!r}")


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, attn_mask, scale, causal, window_left, window_right, softcap,
      dropout_p, seed, allow_tf32, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _options(scale, causal, window_left, window_right, softcap, dropout_p=0.0, seed=None,
             allow_tf32=False):
    """The op's scalar arguments as the Triton launchers' options record."""
    from llmkern.kernels.attention_common import AttentionOptions

    # The seed tensor becomes the Python int the kernels take inside the op, opaque to dynamo.
    return AttentionOptions(scale, causal, window_left, window_right, softcap, dropout_p,
                            0 if seed is None else int(seed), allow_tf32)


def _arg_names(op) -> tuple[str, ...]:
    return tuple(a.name for a in op._schema.arguments)


def _bind(op, inputs) -> dict:
    """The inputs of a call of ``op`` by argument name, so that the autograd setup and the
    backward never depend on argument positions."""
    return dict(zip(_arg_names(op), inputs))


def _grads(op, **grads) -> tuple:
    """One gradient per input of ``op`` (None for those not named)."""
    return tuple(grads.get(name) for name in _arg_names(op))


_FWD_SAVED = ("q", "k", "v", "attn_mask", "seed")  # tensors the backward reads


def _fwd_setup(ctx, inputs, output):
    args = _bind(torch.ops.llmkern.attention_fwd.default, inputs)
    ctx.save_for_backward(*(args.pop(name) for name in _FWD_SAVED), *output)
    ctx.options = args  # the scalar options (scale, causal, window, ..., backend) by name


def _fwd_backward(ctx, dout, dlse):
    q, k, v, attn_mask, seed, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout.contiguous(), q, k, v, out, lse, dlse, attn_mask, seed=seed,
                               **ctx.options)
    return _grads(torch.ops.llmkern.attention_fwd.default, q=dq, k=dk, v=dv)


attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


@torch.library.custom_op("llmkern::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                         cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                         causal: bool, window_left: Optional[int], window_right: Optional[int],
                         softcap: float, allow_tf32: bool, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from llmkern.kernels.attention import varlen_attention_fwd as triton_fwd

        from llmkern.kernels.attention_common import VarlenOffsets

        return triton_fwd(q, k, v, VarlenOffsets(cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                 max_seqlen_k),
                          _options(scale, causal, window_left, window_right, softcap,
                                   allow_tf32=allow_tf32))
    raise ValueError(f"llmkern::varlen_attention_fwd: backend must be 'triton', got {backend!r}")


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, window_left,
      window_right, softcap, allow_tf32, backend):
    total, h, _ = q.shape
    return q.new_empty(total, h, v.shape[-1]), q.new_empty(h, total, dtype=torch.float32)


@torch.library.custom_op("llmkern::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         dlse: Optional[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool,
                         window_left: Optional[int], window_right: Optional[int], softcap: float,
                         allow_tf32: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from llmkern.kernels.attention import varlen_attention_bwd as triton_bwd

        from llmkern.kernels.attention_common import VarlenOffsets

        return triton_bwd(dout, q, k, v, out, lse, dlse,
                          VarlenOffsets(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                          _options(scale, causal, window_left, window_right, softcap,
                                   allow_tf32=allow_tf32))
    raise ValueError(f"llmkern::varlen_attention_bwd: backend must be 'triton', got {backend!r}")


@varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      scale, causal, window_left, window_right, softcap, allow_tf32, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_VARLEN_SAVED = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")


def _varlen_setup(ctx, inputs, output):
    args = _bind(torch.ops.llmkern.varlen_attention_fwd.default, inputs)
    ctx.save_for_backward(*(args.pop(name) for name in _VARLEN_SAVED), *output)
    ctx.options = args


def _varlen_backward(ctx, dout, dlse):
    q, k, v, cu_q, cu_k, out, lse = ctx.saved_tensors
    dq, dk, dv = varlen_attention_bwd(dout.contiguous(), q, k, v, out, lse, dlse, cu_q, cu_k,
                                      **ctx.options)
    return _grads(torch.ops.llmkern.varlen_attention_fwd.default, q=dq, k=dk, v=dv)


varlen_attention_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


# ---- input checks ------------------------------------------------------------------------

def _check_qkv(op: str, names, q, k, v, rank: int) -> None:
    """Shapes (B, H, S, D) (rank 4) or (total, H, D) (rank 3); dtypes, devices, heads, head_dim."""
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        check_tensor(name, t, op, ndim=rank)
    check_same_device(op, **{nq: q, nk: k, nv: v})
    check_same_dtype(op, **{nq: q, nk: k, nv: v})
    hd = 1  # the heads dim: (B, H, S, D) and (total, H, D) both have it at index 1
    if rank == 4 and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"llmkern.{op}: batch sizes differ: {nq} {describe(q)}, {nk} {describe(k)}, "
                         f"{nv} {describe(v)}")
    if k.shape != v.shape:
        raise ValueError(f"llmkern.{op}: {nk} and {nv} must have the same shape, got {nk} "
                         f"{describe(k)} and {nv} {describe(v)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"llmkern.{op}: head_dim of {nq} ({describe(q)}) and {nk} ({describe(k)}) "
                         f"must match")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"llmkern.{op}: head_dim {q.shape[-1]} of {nq} ({describe(q)}) exceeds the "
                         f"supported maximum {MAX_HEAD_DIM}")
    if q.shape[hd] % k.shape[hd] != 0:
        raise ValueError(f"llmkern.{op}: the {q.shape[hd]} heads of {nq} ({describe(q)}) must be a "
                         f"multiple of the {k.shape[hd]} heads of {nk} ({describe(k)})")


def _check_mask(op: str, attn_mask: Optional[Tensor], q: Tensor, k: Tensor, name="attn_mask"):
    if attn_mask is None:
        return
    check_tensor(name, attn_mask, op, dtypes=(torch.bool,) + FLOAT_DTYPES)
    check_same_device(op, q=q, **{name: attn_mask})
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    ok = attn_mask.dim() <= 4 and all(
        m in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target)))
    if not ok:
        raise ValueError(f"llmkern.{op}: {name} ({describe(attn_mask)}) does not broadcast to "
                         f"(batch, heads, Sq, Sk) = {target}")


def _check_window(op: str, window) -> tuple[Optional[int], Optional[int]]:
    if window is None:
        return None, None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"llmkern.{op}: window must be None or a pair (left, right), got {window!r}")
    for side, w in zip(("left", "right"), window):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ValueError(f"llmkern.{op}: window {side} must be None or an int >= 0, got {w!r}")
    return window[0], window[1]


def _check_scalars(op: str, scale, softcap, dropout_p=0.0) -> None:
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"llmkern.{op}: scale must be a finite number or None, got {scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0
                                    and math.isfinite(softcap)):
        raise ValueError(f"llmkern.{op}: softcap must be a finite number > 0 or None, got {softcap!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"llmkern.{op}: dropout_p must be in [0, 1), got {dropout_p!r}")


def _draw_seed(seed) -> Tensor:
    """The dropout seed as an int64 scalar tensor on the CPU: the caller's (an int or a
    one-element integer tensor), else one drawn from torch's default generator. The draw is a
    traceable op (no ``.item()``), so torch.compile(fullgraph=True) keeps it in the graph and
    ``torch.manual_seed`` reproduces it, compiled or eager."""
    if seed is None:
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
            raise ValueError(f"llmkern.attention: a seed tensor must hold one integer, got "
                             f"{describe(seed)}")
        return seed.detach().to(device="cpu", dtype=torch.int64).reshape(())
    return torch.tensor(seed if isinstance(seed, int) else int(seed), dtype=torch.int64)


def _torch_dropout_mask(q, k, dropout_p, seed):
    """The torch backend's reproducible keep-mask for a seed (its own generator, not the kernel's)."""
    g = torch.Generator(device=q.device).manual_seed(seed)
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.rand(shape, generator=g, device=q.device) >= dropout_p


# ---- functional API ----------------------------------------------------------------------

def _attention(op, q, k, v, causal, scale, left, right, softcap, attn_mask, dropout_p, return_lse,
               backend, seed, allow_tf32):
    """Checked arguments in; backend choice and the call. ``right`` may be negative here."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = _draw_seed(seed) if dropout_p > 0.0 else None

    def unsupported(name: str) -> Optional[str]:
        if name == "cuda":
            extra = [what for what, used in (("window", left is not None or right is not None),
                                             ("softcap", softcap is not None),
                                             ("attn_mask", attn_mask is not None),
                                             ("dropout", dropout_p > 0.0)) if used]
            if extra:
                return f"the cuda attention kernel has no {', '.join(extra)} support"
            if q.shape[-1] not in CUDA_HEAD_DIMS:
                return f"the cuda attention kernel supports head_dim {CUDA_HEAD_DIMS}, got {q.shape[-1]}"
            if q.dtype not in (torch.float16, torch.bfloat16):
                return f"the cuda attention kernel supports fp16/bf16, got {q.dtype}"
            if return_lse and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                return "the cuda attention kernel cannot take a gradient through lse"
            return cuda_ext.unsupported("attention", q=q, k=k, v=v, causal=causal)
        return None

    chosen = select(op, q.device, backend, unsupported)
    if chosen == "torch":
        window = None if left is None and right is None else (left, right)
        mask = _torch_dropout_mask(q, k, dropout_p, int(seed)) if dropout_p > 0.0 else None
        return reference.attention(q, k, v, causal=causal, scale=scale, window=window,
                                   softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p,
                                   return_lse=return_lse, dropout_mask=mask)
    out, lse = attention_fwd(q, k, v, attn_mask, scale, bool(causal), left, right,
                             float(softcap or 0.0), float(dropout_p), seed, bool(allow_tf32), chosen)
    return (out, lse) if return_lse else out


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
              window=None, softcap: Optional[float] = None, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, return_lse: bool = False, backend: Optional[str] = None,
              seed=None, deterministic: bool = True, allow_tf32: bool = False):
    """Flash attention over q (B, H, Sq, D) and k/v (B, Hkv, Sk, D), H % Hkv == 0 (GQA/MQA).

    ``causal`` and ``window=(left, right)`` are aligned bottom-right (query i sees keys
    j <= i + Sk - Sq); ``softcap=c`` maps scores s to c * tanh(s / c); ``attn_mask`` is boolean
    (True = attend) or additive, broadcastable to (B, H, Sq, Sk). Dropout uses a counter-based
    RNG keyed by ``seed``: an int or a one-element integer tensor (a tensor seed is an input under
    torch.compile, not a constant to recompile for), drawn from torch's default generator when
    None, so ``torch.manual_seed`` reproduces it, compiled or not. The backward is always
    deterministic (``deterministic=False`` is accepted and gives the same kernels). fp32 inputs
    compute at fp32 accuracy unless ``allow_tf32``. With ``return_lse`` returns (out, lse), lse
    fp32 (B, H, Sq); a row that sees no key gives zeros and lse = -inf. Gradients flow to q, k,
    v (and through lse); not to ``attn_mask``.
    """
    op = "attention"
    _check_qkv(op, ("q", "k", "v"), q, k, v, rank=4)
    _check_mask(op, attn_mask, q, k)
    left, right = _check_window(op, window)
    _check_scalars(op, scale, softcap, dropout_p)
    return _attention(op, q, k, v, bool(causal), scale, left, right, softcap, attn_mask,
                      float(dropout_p), return_lse, backend, seed, allow_tf32)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, backend: Optional[str] = None) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with PyTorch's semantics exactly.

    ``is_causal`` is top-left aligned (query i sees keys j <= i); key/value with fewer heads
    need ``enable_gqa=True``. Rank-3 inputs (H, S, D) are accepted like SDPA's.
    """
    op = "scaled_dot_product_attention"
    names = ("query", "key", "value")
    unbatched = isinstance(query, Tensor) and query.dim() == 3
    if unbatched:
        for name, t in zip(names, (query, key, value)):
            check_tensor(name, t, op, ndim=3)
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    _check_qkv(op, names, query, key, value, rank=4)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"llmkern.{op}: query has {query.shape[1]} heads but key has "
                         f"{key.shape[1]} ({describe(query)}, {describe(key)}); pass enable_gqa=True")
    if is_causal and attn_mask is not None:
        raise ValueError(f"llmkern.{op}: attn_mask ({describe(attn_mask)}) must be None when "
                         f"is_causal=True, as in torch.nn.functional.scaled_dot_product_attention")
    _check_mask(op, attn_mask, query, key)
    _check_scalars(op, scale, None, dropout_p)
    sq, sk = query.shape[2], key.shape[2]
    # Top-left causal is the bottom-right diagonal shifted by Sq - Sk: a window's right bound.
    causal = bool(is_causal) and sq == sk
    right = sq - sk if is_causal and sq != sk else None
    out = _attention(op, query, key, value, causal, scale, None, right, None, attn_mask,
                     float(dropout_p), False, backend, None, False)
    return out.squeeze(0) if unbatched else out


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                     scale: Optional[float] = None, window=None, softcap: Optional[float] = None,
                     backend: Optional[str] = None, allow_tf32: bool = False) -> Tensor:
    """Packed sequences like ``flash_attn_varlen_func``: q (total_q, H, D), k/v (total_k, Hkv, D).

    Sequence b holds rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (int32/int64, length B + 1);
    causal/window are aligned bottom-right per sequence. Returns (total_q, H, D).
    """
    op = "varlen_attention"
    _check_qkv(op, ("q", "k", "v"), q, k, v, rank=3)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, op, ndim=1, dtypes=(torch.int32, torch.int64))
        check_same_device(op, q=q, **{name: cu})
        if cu.shape[0] < 2:
            raise ValueError(f"llmkern.{op}: {name} must hold B + 1 >= 2 offsets, got {describe(cu)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"llmkern.{op}: cu_seqlens_q ({describe(cu_seqlens_q)}) and cu_seqlens_k "
                         f"({describe(cu_seqlens_k)}) must have the same length")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"llmkern.{op}: {name} must be an int >= 1, got {m!r}")
    left, right = _check_window(op, window)
    _check_scalars(op, scale, softcap)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    def unsupported(name: str) -> Optional[str]:
        if name == "cuda":
            return "the cuda backend has no varlen attention kernel"
        return None

    chosen = select(op, q.device, backend, unsupported)
    if chosen == "torch":
        window = None if left is None and right is None else (left, right)
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, causal=causal, scale=scale, window=window,
                                          softcap=softcap)
    out, _ = varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                  int(max_seqlen_k), scale, bool(causal), left, right,
                                  float(softcap or 0.0), bool(allow_tf32), chosen)
    return out
