"""Rotary position embeddings: torch reference, torch.library ops, autograd, functional API."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmkern.backends import KERNEL_DTYPES, Backend, OpBackends, dtype_reason
from llmkern.ops._checks import ANY_FLOAT, check_same_device, check_tensor, describe

OP = "rotary"
INT_DTYPES = (torch.int32, torch.int64)


# ---- torch reference ---------------------------------------------------------------------

def _angles(t: Tensor, seq: int, position_ids: Optional[Tensor]) -> Tensor:
    """cos or sin rows for each position, broadcastable to (B, 1, S, R/2)."""
    if position_ids is None:
        rows = t[..., :seq, :]
    elif t.dim() == 2:
        rows = t[position_ids]
    else:  # (B, T, R/2) with per-row positions (B, S)
        rows = t[torch.arange(t.shape[0], device=t.device)[:, None], position_ids]
    return rows.unsqueeze(-3)


def _rotate_ref(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    r = 2 * cos.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xr, rest = x[..., :r].to(work), x[..., r:]
    c, s = cos.to(work), sin.to(work)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr.chunk(2, dim=-1)
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    yr = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    return torch.cat((yr.to(x.dtype), rest), dim=-1)


def rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                     position_ids: Optional[Tensor] = None,
                     interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch rotary embedding (math in fp32, or fp64 for fp64 inputs); same arguments
    as :func:`rotary`. Differentiable in every input, cos and sin included."""
    seq = q.shape[-2]
    c, s = _angles(cos, seq, position_ids), _angles(sin, seq, position_ids)
    return _rotate_ref(q, c, s, interleaved), _rotate_ref(k, c, s, interleaved)


def rotate_reference(x: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
                     interleaved: bool = False) -> Tensor:
    """:func:`rotary_reference` of one tensor x (B, H, S, D) (e.g. queries and keys of
    different lengths)."""
    seq = x.shape[-2]
    return _rotate_ref(x, _angles(cos, seq, position_ids), _angles(sin, seq, position_ids),
                       interleaved)


# ---- backends and torch.library ops ------------------------------------------------------

def _kernel_serves(q, k, cos, sin, **_):
    """fp16/bf16/fp32 everywhere; no tl.dot, so bf16 is exact under the interpreter too."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        reason = dtype_reason(t, KERNEL_DTYPES, name)
        if reason:
            return reason
    return None


ROTARY = OpBackends(OP, (
    Backend("triton", serves=_kernel_serves,
            impl={"fwd": "llmkern.kernels.rotary:rotary_fwd",
                  "bwd": "llmkern.kernels.rotary:rotary_bwd"}),
), auto_order=("triton",))


def _fake_pair(q, k):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format)


@torch.library.custom_op("llmkern::rotary_fwd", mutates_args=())
def rotary_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
               interleaved: bool, backend: str) -> tuple[Tensor, Tensor]:
    return ROTARY.run("fwd", backend, q, k, cos, sin, position_ids, interleaved)


@rotary_fwd.register_fake
def _(q, k, cos, sin, position_ids, interleaved, backend):
    return _fake_pair(q, k)


@torch.library.custom_op("llmkern::rotary_bwd", mutates_args=())
def rotary_bwd(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
               interleaved: bool, backend: str) -> tuple[Tensor, Tensor]:
    return ROTARY.run("bwd", backend, dq, dk, cos, sin, position_ids, interleaved)


@rotary_bwd.register_fake
def _(dq, dk, cos, sin, position_ids, interleaved, backend):
    return _fake_pair(dq, dk)


def _rotary_setup(ctx, inputs, output):
    _, _, cos, sin, position_ids, interleaved, backend = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.interleaved, ctx.backend = interleaved, backend


def _rotary_backward(ctx, dq, dk):
    cos, sin, position_ids = ctx.saved_tensors
    dq, dk = rotary_bwd(dq, dk, cos, sin, position_ids, ctx.interleaved, ctx.backend)
    return dq, dk, None, None, None, None, None


def _rotary_bwd_setup(ctx, inputs, output):
    _rotary_setup(ctx, inputs, output)


def _rotary_bwd_backward(ctx, ddq, ddk):
    # The backward is linear in (dq, dk): its own gradient is the forward rotation.
    cos, sin, position_ids = ctx.saved_tensors
    ddq, ddk = rotary_fwd(ddq, ddk, cos, sin, position_ids, ctx.interleaved, ctx.backend)
    return ddq, ddk, None, None, None, None, None


rotary_fwd.register_autograd(_rotary_backward, setup_context=_rotary_setup)
rotary_bwd.register_autograd(_rotary_bwd_backward, setup_context=_rotary_bwd_setup)


# ---- functional API ----------------------------------------------------------------------

def _check_inputs(q, k, cos, sin, position_ids, interleaved, check):
    check_tensor("q", q, OP, ndim=4, dtypes=ANY_FLOAT, allow_empty=True)
    check_tensor("k", k, OP, ndim=4, dtypes=ANY_FLOAT, allow_empty=True)
    if q.dtype != k.dtype:
        raise TypeError(f"llmkern.{OP}: q ({describe(q)}) and k ({describe(k)}) must have one dtype")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"llmkern.{OP}: q ({describe(q)}) and k ({describe(k)}) must share "
                         f"batch, seq and head_dim (layout (batch, heads, seq, head_dim))")
    check_tensor("cos", cos, OP, ndim=(2, 3), dtypes=ANY_FLOAT)
    check_tensor("sin", sin, OP, ndim=(2, 3), dtypes=ANY_FLOAT)
    if cos.shape != sin.shape:
        raise ValueError(f"llmkern.{OP}: cos ({describe(cos)}) and sin ({describe(sin)}) must "
                         f"have one shape")
    bsz, _, seq, d = q.shape
    if 2 * cos.shape[-1] > d:
        raise ValueError(f"llmkern.{OP}: cos/sin hold one angle per rotated pair, so their last "
                         f"dim must be at most head_dim / 2 = {d // 2}; got {describe(cos)}")
    if cos.dim() == 3 and cos.shape[0] not in (1, bsz):
        raise ValueError(f"llmkern.{OP}: cos/sin of shape (batch, positions, rotary_dim / 2) "
                         f"need batch 1 or {bsz} (q's batch), got {describe(cos)}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"llmkern.{OP}: interleaved must be a bool, got {interleaved!r}")
    table = cos.shape[-2]
    if position_ids is None:
        if table < seq:
            raise ValueError(f"llmkern.{OP}: without position_ids, cos/sin need a row for each "
                             f"of the {seq} positions of q ({describe(q)}), got {describe(cos)}")
    else:
        check_tensor("position_ids", position_ids, OP, ndim=(1, 2), dtypes=INT_DTYPES,
                     allow_empty=True)
        if position_ids.shape[-1] != seq or (position_ids.dim() == 2
                                             and position_ids.shape[0] not in (1, bsz)):
            raise ValueError(f"llmkern.{OP}: position_ids must have shape ({seq},) or "
                             f"({bsz}, {seq}) to match q ({describe(q)}), got "
                             f"{describe(position_ids)}")
        if check and position_ids.numel() and not torch.compiler.is_compiling():
            # Positions index memory in the kernel: out-of-range ones are refused here (one
            # host sync; skipped when compiled or with check=False).
            lo, hi = position_ids.min().item(), position_ids.max().item()
            if lo < 0 or hi >= table:
                raise ValueError(f"llmkern.{OP}: position_ids must lie in [0, {table}) (the rows "
                                 f"of cos/sin, {describe(cos)}), got values in [{lo}, {hi}]")
    check_same_device(OP, q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
           interleaved: bool = False, backend: Optional[str] = None,
           check: bool = True) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of queries and keys; returns new (q, k).

    ``q`` (B, Hq, S, D) and ``k`` (B, Hk, S, D), any head counts (GQA/MQA). ``cos``/``sin`` hold
    one angle per rotated pair: (T, R/2) tables shared by the batch, or (B, T, R/2) per row;
    the first ``R = 2 * cos.shape[-1]`` dims of each head are rotated and the rest pass through
    (partial rotary). Position ``s`` of row ``b`` uses table row ``position_ids[b, s]``
    (``position_ids`` (S,) or (B, S): ragged or packed batches), or row ``s`` without it.
    ``interleaved=False`` rotates the pairs (i, i + R/2) (GPT-NeoX, Llama); ``True`` the pairs
    (2i, 2i + 1) (GPT-J). Hugging Face's duplicated (B, S, D) cos/sin give the half-split
    angles as ``cos[..., :D // 2]``.

    Gradients flow to q and k; cos and sin that require grad are served by the torch reference
    (the kernels do not differentiate the angles). ``check=False`` skips the range check of
    ``position_ids`` (a host sync), for callers whose positions are valid by construction.
    """
    _check_inputs(q, k, cos, sin, position_ids, interleaved, check)
    bsz, seq = q.shape[0], q.shape[2]
    if cos.dim() == 3 and cos.shape[0] == 1:
        cos, sin = cos[0], sin[0]
    if position_ids is not None:
        position_ids = position_ids.expand(bsz, seq)
    chosen = ROTARY.choose(q.device, backend, q=q, k=k, cos=cos, sin=sin)
    angle_grad = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    if chosen == "torch" or angle_grad:
        return rotary_reference(q, k, cos, sin, position_ids, interleaved)
    return rotary_fwd(q, k, cos, sin, position_ids, interleaved, chosen)
