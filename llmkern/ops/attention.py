"""Flash attention: torch.library ops, autograd, backend choice and the functional API.

Ops (one autograd path for every variant; features are op arguments):
  llmkern::attention_fwd(q, k, v, attn_mask, scale, causal, window_left, window_right, softcap,
                         dropout_p, seed, allow_tf32, backend, deterministic=True) -> (out, lse)
  llmkern::attention_bwd(dout, q, k, v, out, lse, dlse, attn_mask, ...) -> (dq, dk, dv)
  ``seed`` is a Tensor (an int64 scalar on the CPU, None without dropout), so a seed drawn under
  torch.compile stays in the graph and a new seed is a new input, not a recompile.
  llmkern::varlen_attention_fwd / varlen_attention_bwd: packed (total, H, D) sequences.
``softcap`` 0.0 means none; ``window_*`` None means unbounded; ``window_right`` may be negative
internally (PyTorch's top-left causal alignment when Sq < Sk is such a window).
``deterministic`` reaches the backward (the forward op carries it for autograd): True keeps
gradients bit-identical run to run; False lets sm_90 run the 5-GEMM backward with atomic dQ
(``llmkern.kernels.attention_hopper.backward_kernel`` is the table of which kernel serves).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from llmkern import reference
from llmkern.backends import (CHOICES, KERNEL_DTYPES, Backend, OpBackends, cuda_capability,
                              dtype_reason, interpreter_bf16_reason)
from llmkern.ops import cuda_ext
from llmkern.ops._checks import check_tensor, describe
from llmkern.ops.attention_checks import (MAX_HEAD_DIM, check_mask, check_offsets_shape,
                                          check_offsets_values, check_qkv, check_scalars,
                                          check_window)
from llmkern.ops.decode_attention import MAX_DECODE_ROWS, attention_with_kvcache_fwd

# ---- backends: what each kernel serves -----------------------------------------------------
# ``serves`` gets the call as keywords: q, window (bool), softcap, attn_mask, dropout_p and
# lse_grad (a gradient will flow through lse). Entries take (q, k, v, attn_mask, opts) and
# (dout, q, k, v, out, lse, dlse, attn_mask, opts), opts an AttentionOptions; varlen entries
# take a VarlenOffsets in place of attn_mask.

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128)
CUDA_MIN_ARCH = (8, 0)  # mma.sync on bf16 and cp.async need sm_80


def _triton_serves(q: Tensor, **_) -> Optional[str]:
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} is over the triton kernels' maximum {MAX_HEAD_DIM}"
    return dtype_reason(q, KERNEL_DTYPES, "q") or interpreter_bf16_reason(q)


def _cuda_serves(q: Tensor, window=False, softcap=None, attn_mask=None, dropout_p=0.0,
                 lse_grad=False, **_) -> Optional[str]:
    extra = [what for what, used in (("window", window), ("softcap", softcap is not None),
                                     ("attn_mask", attn_mask is not None),
                                     ("dropout", dropout_p > 0.0)) if used]
    if extra:
        return f"the cuda attention kernel has no {', '.join(extra)} support"
    reason = dtype_reason(q, CUDA_DTYPES, "q")
    if reason:
        return reason
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"the cuda attention kernel supports head_dim {CUDA_HEAD_DIMS}, got {q.shape[-1]}"
    if lse_grad:
        return "the cuda attention kernel cannot take a gradient through lse"
    if q.is_cuda and cuda_capability(q.device) < CUDA_MIN_ARCH:
        return "the cuda attention kernel needs an sm_80 or newer GPU"
    return None


def _cuda_fwd(q, k, v, attn_mask, opts):
    return cuda_ext.call("attention_fwd", q, k, v, opts.scale, opts.causal)


def _cuda_bwd(dout, q, k, v, out, lse, dlse, attn_mask, opts):
    if dlse is not None:
        raise RuntimeError("llmkern::attention_bwd: the cuda backend cannot take a gradient "
                           "through lse")
    return cuda_ext.call("attention_bwd", dout, q, k, v, out, lse, opts.scale, opts.causal)


# Both passes go through the Hopper module, which picks its TMA kernels (the forward on sm_90
# for the calls it serves; both wherever LLMKERN_ATTENTION_KERNEL=hopper) or the portable ones.
_HOPPER = "llmkern.kernels.attention_hopper:"
_BACKENDS = (
    Backend("triton", serves=_triton_serves,
            impl={"fwd": _HOPPER + "attention_fwd", "bwd": _HOPPER + "attention_bwd"}),
    Backend("cuda", serves=_cuda_serves, impl={"fwd": _cuda_fwd, "bwd": _cuda_bwd}),
)
ATTENTION = OpBackends("attention", _BACKENDS, auto_order=("triton", "cuda"))
SDPA = OpBackends("scaled_dot_product_attention", _BACKENDS, auto_order=("triton", "cuda"))
VARLEN = OpBackends("varlen_attention", (
    Backend("triton", serves=_triton_serves,
            impl={"fwd": _HOPPER + "varlen_attention_fwd", "bwd": _HOPPER + "varlen_attention_bwd"}),
), auto_order=("triton",))


def _options(scale, causal, window_left, window_right, softcap, dropout_p=0.0, seed=None,
             allow_tf32=False, deterministic=True):
    """The op's scalar arguments as the launchers' options record."""
    from llmkern.kernels.attention_options import AttentionOptions

    # The seed tensor becomes the Python int the kernels take inside the op, opaque to dynamo.
    return AttentionOptions(scale, causal, window_left, window_right, softcap, dropout_p,
                            0 if seed is None else int(seed), allow_tf32, deterministic)


def _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    from llmkern.kernels.attention_options import VarlenOffsets

    return VarlenOffsets(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


# ---- ops ---------------------------------------------------------------------------------

@torch.library.custom_op("llmkern::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], scale: float,
                  causal: bool, window_left: Optional[int], window_right: Optional[int],
                  softcap: float, dropout_p: float, seed: Optional[Tensor], allow_tf32: bool,
                  backend: str, deterministic: bool = True) -> tuple[Tensor, Tensor]:
    opts = _options(scale, causal, window_left, window_right, softcap, dropout_p, seed, allow_tf32,
                    deterministic)
    return ATTENTION.run("fwd", backend, q, k, v, attn_mask, opts)


@attention_fwd.register_fake
def _(q, k, v, attn_mask, scale, causal, window_left, window_right, softcap, dropout_p, seed,
      allow_tf32, backend, deterministic=True):
    b, h, sq, _ = q.shape
    out = q.new_empty(b, h, sq, v.shape[-1])
    return out, q.new_empty(b, h, sq, dtype=torch.float32)


@torch.library.custom_op("llmkern::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  dlse: Optional[Tensor], attn_mask: Optional[Tensor], scale: float, causal: bool,
                  window_left: Optional[int], window_right: Optional[int], softcap: float,
                  dropout_p: float, seed: Optional[Tensor], allow_tf32: bool,
                  backend: str, deterministic: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    opts = _options(scale, causal, window_left, window_right, softcap, dropout_p, seed, allow_tf32,
                    deterministic)
    return ATTENTION.run("bwd", backend, dout, q, k, v, out, lse, dlse, attn_mask, opts)


def _contiguous_grads(q, k, v):
    """Every backend returns contiguous gradients, whatever the inputs' strides (empty_like would
    keep a transposed view's strides, and a compiled graph would then view them wrongly)."""
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, attn_mask, scale, causal, window_left, window_right, softcap,
      dropout_p, seed, allow_tf32, backend, deterministic=True):
    return _contiguous_grads(q, k, v)


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
                         softcap: float, allow_tf32: bool, backend: str,
                         deterministic: bool = True) -> tuple[Tensor, Tensor]:
    return VARLEN.run("fwd", backend, q, k, v,
                      _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                      _options(scale, causal, window_left, window_right, softcap,
                               allow_tf32=allow_tf32, deterministic=deterministic))


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, window_left,
      window_right, softcap, allow_tf32, backend, deterministic=True):
    total, h, _ = q.shape
    return q.new_empty(total, h, v.shape[-1]), q.new_empty(h, total, dtype=torch.float32)


@torch.library.custom_op("llmkern::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         dlse: Optional[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool,
                         window_left: Optional[int], window_right: Optional[int], softcap: float,
                         allow_tf32: bool, backend: str,
                         deterministic: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    return VARLEN.run("bwd", backend, dout, q, k, v, out, lse, dlse,
                      _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                      _options(scale, causal, window_left, window_right, softcap,
                               allow_tf32=allow_tf32, deterministic=deterministic))


@varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      scale, causal, window_left, window_right, softcap, allow_tf32, backend, deterministic=True):
    return _contiguous_grads(q, k, v)


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


# ---- dropout seeds ------------------------------------------------------------------------

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


def _check_backend_name(backend: Optional[str]) -> None:
    if backend is not None and backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")


def _torch_dropout_mask(q, k, dropout_p, seed):
    """The torch backend's reproducible keep-mask for a seed (its own generator, not the kernel's)."""
    g = torch.Generator(device=q.device).manual_seed(seed)
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.rand(shape, generator=g, device=q.device) >= dropout_p


# ---- functional API ----------------------------------------------------------------------

DECODE_MIN_KEYS = 256  # from here on a few query rows leave most SMs idle without split-KV


def _decode_shaped(q, k, v, backend, attn_mask, dropout_p) -> bool:
    """Calls ``auto`` sends to the split-KV decode kernel: few query rows, many keys, CUDA,
    no mask or dropout, no gradient (that kernel is forward only)."""
    from llmkern.backends import get_backend

    return ((backend or get_backend()) == "auto" and q.is_cuda and q.shape[2] <= MAX_DECODE_ROWS
            and k.shape[2] >= DECODE_MIN_KEYS and attn_mask is None and dropout_p == 0.0
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))))


def _attention(table: OpBackends, q, k, v, causal, scale, left, right, softcap, attn_mask,
               dropout_p, return_lse, backend, seed, allow_tf32, deterministic=True):
    """Checked arguments in; backend choice (from ``table``) and the call. ``right`` may be
    negative here."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = _draw_seed(seed) if dropout_p > 0.0 else None
    lse_grad = return_lse and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    chosen = table.choose(q.device, backend, q=q, window=left is not None or right is not None,
                          softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p,
                          lse_grad=lse_grad)
    if chosen == "triton" and table is ATTENTION and _decode_shaped(q, k, v, backend, attn_mask,
                                                                    dropout_p):
        lens = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
        out, lse = attention_with_kvcache_fwd(q, k, v, lens, None, 0, scale, bool(causal), left,
                                              right, float(softcap or 0.0), 0, "triton")
        return (out, lse) if return_lse else out
    if chosen == "torch":
        window = None if left is None and right is None else (left, right)
        mask = _torch_dropout_mask(q, k, dropout_p, int(seed)) if dropout_p > 0.0 else None
        return reference.attention(q, k, v, causal=causal, scale=scale, window=window,
                                   softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p,
                                   return_lse=return_lse, dropout_mask=mask)
    out, lse = attention_fwd(q, k, v, attn_mask, scale, bool(causal), left, right,
                             float(softcap or 0.0), float(dropout_p), seed, bool(allow_tf32), chosen,
                             bool(deterministic))
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
    None, so ``torch.manual_seed`` reproduces it, compiled or not. The backward gives
    bit-identical gradients run to run; ``deterministic=False`` lets the triton backend on sm_90
    accumulate dQ with float atomics (faster; elsewhere the same kernels serve). fp32 inputs
    compute at fp32 accuracy unless ``allow_tf32``. With ``return_lse`` returns (out, lse), lse
    fp32 (B, H, Sq); a row that sees no key gives zeros and lse = -inf. Gradients flow to q, k,
    v (and through lse); an ``attn_mask`` that requires grad is refused (no backend computes its
    gradient). float64 inputs run on the torch reference.
    """
    op = "attention"
    check_qkv(op, ("q", "k", "v"), q, k, v, rank=4)
    check_mask(op, attn_mask, q, k)
    left, right = check_window(op, window)
    check_scalars(op, scale, softcap, dropout_p)
    return _attention(ATTENTION, q, k, v, bool(causal), scale, left, right, softcap, attn_mask,
                      float(dropout_p), return_lse, backend, seed, allow_tf32, deterministic)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, backend: Optional[str] = None,
                                 deterministic: bool = True) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with PyTorch's semantics exactly.

    ``is_causal`` is top-left aligned (query i sees keys j <= i); key/value with fewer heads
    need ``enable_gqa=True``. Rank-3 inputs (H, S, D) are accepted like SDPA's, and so are
    float64, empty inputs and any head_dim, served by the torch reference where no kernel
    serves them. An ``attn_mask`` that requires grad is refused on every backend.
    ``deterministic`` as in ``llmkern.attention``.
    """
    op = "scaled_dot_product_attention"
    names = ("query", "key", "value")
    unbatched = isinstance(query, Tensor) and query.dim() == 3
    if unbatched:
        for name, t in zip(names, (query, key, value)):
            check_tensor(name, t, op, ndim=3, dtypes=None, allow_empty=True)
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    # PyTorch accepts empty inputs and any head_dim; where no kernel serves them the torch
    # reference does.
    check_qkv(op, names, query, key, value, rank=4, allow_empty=True, max_head_dim=None)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"llmkern.{op}: query has {query.shape[1]} heads but key has "
                         f"{key.shape[1]} ({describe(query)}, {describe(key)}); pass enable_gqa=True")
    if is_causal and attn_mask is not None:
        raise ValueError(f"llmkern.{op}: attn_mask ({describe(attn_mask)}) must be None when "
                         f"is_causal=True, as in torch.nn.functional.scaled_dot_product_attention")
    check_mask(op, attn_mask, query, key)
    check_scalars(op, scale, None, dropout_p)
    if query.numel() == 0 or key.numel() == 0:
        # Nothing to launch a kernel for: an empty result, or zeros when Sk == 0, as PyTorch.
        _check_backend_name(backend)
        out = reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                     bool(is_causal), scale, enable_gqa)
        return out.squeeze(0) if unbatched else out
    sq, sk = query.shape[2], key.shape[2]
    # Top-left causal is the bottom-right diagonal shifted by Sq - Sk: a window's right bound.
    causal = bool(is_causal) and sq == sk
    right = sq - sk if is_causal and sq != sk else None
    out = _attention(SDPA, query, key, value, causal, scale, None, right, None, attn_mask,
                     float(dropout_p), False, backend, None, False, deterministic)
    return out.squeeze(0) if unbatched else out


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                     scale: Optional[float] = None, window=None, softcap: Optional[float] = None,
                     backend: Optional[str] = None, allow_tf32: bool = False,
                     check: bool = True, deterministic: bool = True) -> Tensor:
    """Packed sequences like ``flash_attn_varlen_func``: q (total_q, H, D), k/v (total_k, Hkv, D).

    Sequence b holds rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (int32/int64, length B + 1);
    causal/window are aligned bottom-right per sequence. Returns (total_q, H, D).

    The kernels index memory by the offsets, so ``check=True`` validates them first: each starts
    at 0, never decreases and ends at the row count of q (resp. k/v), and max_seqlen_q/k cover
    the longest sequence. That reads the offsets to the host (one device -> host sync, and a
    graph break under torch.compile); callers that guarantee valid offsets pass ``check=False``.
    ``deterministic`` as in ``llmkern.attention``.
    """
    op = "varlen_attention"
    check_qkv(op, ("q", "k", "v"), q, k, v, rank=3)
    check_offsets_shape(op, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if check:
        check_offsets_values(op, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    left, right = check_window(op, window)
    check_scalars(op, scale, softcap)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    chosen = VARLEN.choose(q.device, backend, q=q)
    if chosen == "torch":
        window = None if left is None and right is None else (left, right)
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, causal=causal, scale=scale, window=window,
                                          softcap=softcap)
    out, _ = varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                  int(max_seqlen_k), scale, bool(causal), left, right,
                                  float(softcap or 0.0), bool(allow_tf32), chosen,
                                  bool(deterministic))
    return out
