"""LayerNorm and RMSNorm: torch.library ops, autograd, backend choice, functional API."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmkern import reference
from llmkern.backends import KERNEL_DTYPES, Backend, OpBackends, dtype_reason
from llmkern.ops import cuda_ext
from llmkern.ops._checks import (ANY_FLOAT, check_same_device, check_tensor, check_vector,
                                 describe)


def _cuda_norm_fwd(x, weight, bias, eps, rms, residual=None):
    if rms:
        y, rstd = cuda_ext.call("rms_norm_fwd", x, weight, eps)
        return y, None, rstd, None
    return (*cuda_ext.call("layer_norm_fwd", x, weight, bias, eps), None)


def _cuda_norm_bwd(dy, x, weight, has_bias, mean, rstd, rms, dh=None):
    if rms:
        dx, dw = cuda_ext.call("rms_norm_bwd", dy, x, weight, rstd)
        return dx, dw, None
    return cuda_ext.call("layer_norm_bwd", dy, x, weight, has_bias, mean, rstd)


def _kernel_serves(x, weight=None, bias=None, residual=None):
    """Both kernels: fp16/bf16/fp32 x; weight and bias in any of those (fp32 inside the kernel,
    no tl.dot, so bf16 is exact under the Triton interpreter too)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        reason = dtype_reason(t, KERNEL_DTYPES, name)
        if reason:
            return reason
    return None


def _cuda_serves(x, weight=None, bias=None, residual=None):
    if residual is not None:
        return "the CUDA norm kernels have no fused residual add (residual= is given)"
    return _kernel_serves(x, weight, bias)


# ``impl`` entries take (x, weight, bias, eps, rms, residual) -> (y, mean, rstd, h or None) and
# (dy, x, weight, has_bias, mean, rstd, rms, dh) -> (dx, dweight, dbias); with a residual, ``x``
# of the backward is h = x + residual and ``dh`` (the gradient of h) is added to dx.
_BACKENDS = (
    Backend("triton", serves=_kernel_serves,
            impl={"fwd": "llmkern.kernels.layer_norm:norm_fwd",
                  "bwd": "llmkern.kernels.layer_norm:norm_bwd"}),
    Backend("cuda", serves=_cuda_serves, impl={"fwd": _cuda_norm_fwd, "bwd": _cuda_norm_bwd}),
)
LAYER_NORM = OpBackends("layer_norm", _BACKENDS, auto_order=("triton", "cuda"))
RMS_NORM = OpBackends("rms_norm", _BACKENDS, auto_order=("triton", "cuda"))


def _norm_fwd_impl(x, weight, bias, eps, backend, rms, residual):
    y, mean, rstd, h = LAYER_NORM.run("fwd", backend, x, weight, bias, eps, rms, residual)
    return y, mean, rstd, (h if h is not None else x.new_empty(0))


def _norm_bwd_impl(dy, x, weight, has_bias, mean, rstd, backend, rms, dh):
    return LAYER_NORM.run("bwd", backend, dy, x, weight, has_bias, mean, rstd, rms, dh)


def _param_grad(g: Optional[Tensor], param: Optional[Tensor], x: Tensor) -> Tensor:
    """A parameter's gradient in its dtype; an empty tensor stands for an absent parameter."""
    return g.to(param.dtype) if param is not None else x.new_empty(0)


def _fake_h(x: Tensor, residual: Optional[Tensor]) -> Tensor:
    """The new residual stream's fake: like x, or empty without a residual."""
    if residual is None:
        return x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- LayerNorm ---------------------------------------------------------------------------

@torch.library.custom_op("llmkern::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   backend: str, residual: Optional[Tensor] = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, rstd, h): h = x + residual, the tensor y normalizes (empty without residual)."""
    y, mean, rstd, h = _norm_fwd_impl(x, weight, bias, eps, backend, False, residual)
    return y, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1]), h


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, backend, residual=None):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone(),
            _fake_h(x, residual))


@torch.library.custom_op("llmkern::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, backend: str,
                   dh: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _norm_bwd_impl(dy, x, weight, bias is not None, mean.reshape(-1),
                                rstd.reshape(-1), backend, False, dh)
    return dx, _param_grad(dw, weight, x), _param_grad(db, bias, x)


@layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, backend, dh=None):
    def grad_like(p):
        return torch.empty_like(p) if p is not None else x.new_empty(0)

    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_like(weight), grad_like(bias)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, eps, backend, residual = (inputs + (None,))[:6]
    _, mean, rstd, h = output
    ctx.has_residual = residual is not None
    # The backward differentiates the norm at what it normalized: h with a residual.
    ctx.save_for_backward(h if ctx.has_residual else x, weight, bias, mean, rstd)
    ctx.backend = backend


def _layer_norm_backward(ctx, dy, _dmean, _drstd, dh):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dh = dh if ctx.has_residual else None
    dx, dw, db = layer_norm_bwd(dy, x, weight, bias, mean, rstd, ctx.backend, dh)
    return (dx, dw if weight is not None else None, db if bias is not None else None, None, None,
            dx if ctx.has_residual else None)


layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# ---- RMSNorm -----------------------------------------------------------------------------

@torch.library.custom_op("llmkern::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float, backend: str,
                 residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, rstd, h): h = x + residual, the tensor y normalizes (empty without residual)."""
    y, _, rstd, h = _norm_fwd_impl(x, weight, None, eps, backend, True, residual)
    return y, rstd.view(x.shape[:-1]), h


@rms_norm_fwd.register_fake
def _(x, weight, eps, backend, residual=None):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=torch.float32), _fake_h(x, residual))


@torch.library.custom_op("llmkern::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor,
                 backend: str, dh: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    dx, dw, _ = _norm_bwd_impl(dy, x, weight, False, None, rstd.reshape(-1), backend, True, dh)
    return dx, _param_grad(dw, weight, x)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, backend, dh=None):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight) if weight is not None else x.new_empty(0))


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps, backend, residual = (inputs + (None,))[:5]
    ctx.has_residual = residual is not None
    ctx.save_for_backward(output[2] if ctx.has_residual else x, weight, output[1])
    ctx.backend = backend


def _rms_norm_backward(ctx, dy, _drstd, dh):
    x, weight, rstd = ctx.saved_tensors
    dh = dh if ctx.has_residual else None
    dx, dw = rms_norm_bwd(dy, x, weight, rstd, ctx.backend, dh)
    return dx, dw if weight is not None else None, None, None, dx if ctx.has_residual else None


rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


# ---- functional API ----------------------------------------------------------------------

def _check_norm_inputs(op: str, x, weight, bias, eps, residual=None) -> None:
    check_tensor("x", x, op, dtypes=ANY_FLOAT)
    if x.dim() == 0:
        raise ValueError(f"llmkern.{op}: x must have at least 1 dimension (the normalized last "
                         f"dim), got a 0-d tensor (shape (), dtype {x.dtype}, device {x.device})")
    n = x.shape[-1]
    check_vector("weight", weight, n, op, f"the last dim of x ({tuple(x.shape)})",
                 dtypes=ANY_FLOAT)
    check_vector("bias", bias, n, op, f"the last dim of x ({tuple(x.shape)})", dtypes=ANY_FLOAT)
    if residual is not None:
        check_tensor("residual", residual, op, dtypes=ANY_FLOAT)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"llmkern.{op}: residual must have the shape and dtype of x "
                             f"({tuple(x.shape)}, {x.dtype}), got {describe(residual)}")
    check_same_device(op, x=x, weight=weight, bias=bias, residual=residual)
    if not eps > 0:
        raise ValueError(f"llmkern.{op}: eps must be > 0 (else a constant row divides by zero), "
                         f"got {eps}")


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, backend: Optional[str] = None,
               residual: Optional[Tensor] = None):
    """LayerNorm over the last dim of ``x``; ``weight``/``bias`` of shape (x.shape[-1],) or None.

    ``weight``/``bias`` may have another float dtype than ``x`` (fp32 parameters with bf16
    activations): every backend applies them in fp32 and returns ``x``'s dtype. float64 is
    served by the torch reference.

    With ``residual`` (shape and dtype of ``x``) returns ``(layer_norm(h), h)`` with
    ``h = x + residual``, the new residual stream of a pre-norm block, in one kernel; gradients
    of both outputs flow to ``x`` and ``residual``.
    """
    _check_norm_inputs("layer_norm", x, weight, bias, eps, residual)
    chosen = LAYER_NORM.choose(x.device, backend, x=x, weight=weight, bias=bias, residual=residual)
    if chosen == "torch":
        return reference.layer_norm(x, weight, bias, eps, residual=residual)
    y, _, _, h = layer_norm_fwd(x, weight, bias, float(eps), chosen, residual)
    return y if residual is None else (y, h)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6,
             backend: Optional[str] = None, residual: Optional[Tensor] = None):
    """RMSNorm over the last dim of ``x``; ``weight`` of shape (x.shape[-1],) or None.

    ``weight`` may have another float dtype than ``x``; the output has ``x``'s dtype on every
    backend (as :func:`layer_norm`). ``residual`` works as in :func:`layer_norm`: returns
    ``(rms_norm(x + residual), x + residual)``.
    """
    _check_norm_inputs("rms_norm", x, weight, None, eps, residual)
    chosen = RMS_NORM.choose(x.device, backend, x=x, weight=weight, residual=residual)
    if chosen == "torch":
        return reference.rms_norm(x, weight, eps, residual=residual)
    y, _, h = rms_norm_fwd(x, weight, float(eps), chosen, residual)
    return y if residual is None else (y, h)
