"""LayerNorm and RMSNorm: torch.library ops, autograd, backend choice, functional API."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmkern import reference
from llmkern.backends import KERNEL_DTYPES, Backend, OpBackends, dtype_reason
from llmkern.ops import cuda_ext
from llmkern.ops._checks import ANY_FLOAT, check_same_device, check_tensor, check_vector


def _cuda_norm_fwd(x, weight, bias, eps, rms):
    if rms:
        y, rstd = cuda_ext.call("rms_norm_fwd", x, weight, eps)
        return y, None, rstd
    return cuda_ext.call("layer_norm_fwd", x, weight, bias, eps)


def _cuda_norm_bwd(dy, x, weight, has_bias, mean, rstd, rms):
    if rms:
        dx, dw = cuda_ext.call("rms_norm_bwd", dy, x, weight, rstd)
        return dx, dw, None
    return cuda_ext.call("layer_norm_bwd", dy, x, weight, has_bias, mean, rstd)


def _kernel_serves(x, weight=None, bias=None):
    """Both kernels: fp16/bf16/fp32 x; weight and bias in any of those (fp32 inside the kernel,
    no tl.dot, so bf16 is exact under the Triton interpreter too)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        reason = dtype_reason(t, KERNEL_DTYPES, name)
        if reason:
            return reason
    return None


# ``impl`` entries take (x, weight, bias, eps, rms) and (dy, x, weight, has_bias, mean, rstd, rms).
_BACKENDS = (
    Backend("triton", serves=_kernel_serves,
            impl={"fwd": "llmkern.kernels.layer_norm:norm_fwd",
                  "bwd": "llmkern.kernels.layer_norm:norm_bwd"}),
    Backend("cuda", serves=_kernel_serves, impl={"fwd": _cuda_norm_fwd, "bwd": _cuda_norm_bwd}),
)
LAYER_NORM = OpBackends("layer_norm", _BACKENDS, auto_order=("triton", "cuda"))
RMS_NORM = OpBackends("rms_norm", _BACKENDS, auto_order=("triton", "cuda"))


def _norm_fwd_impl(x, weight, bias, eps, backend, rms):
    return LAYER_NORM.run("fwd", backend, x, weight, bias, eps, rms)


def _norm_bwd_impl(dy, x, weight, has_bias, mean, rstd, backend, rms):
    return LAYER_NORM.run("bwd", backend, dy, x, weight, has_bias, mean, rstd, rms)


def _param_grad(g: Optional[Tensor], param: Optional[Tensor], x: Tensor) -> Tensor:
    """A parameter's gradient in its dtype; an empty tensor stands for an absent parameter."""
    return g.to(param.dtype) if param is not None else x.new_empty(0)


# ---- LayerNorm ---------------------------------------------------------------------------

@torch.library.custom_op("llmkern::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _norm_fwd_impl(x, weight, bias, eps, backend, rms=False)
    return y, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, backend):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.custom_op("llmkern::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _norm_bwd_impl(dy, x, weight, bias is not None, mean.reshape(-1),
                                rstd.reshape(-1), backend, rms=False)
    return dx, _param_grad(dw, weight, x), _param_grad(db, bias, x)


@layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, backend):
    def grad_like(p):
        return torch.empty_like(p) if p is not None else x.new_empty(0)

    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_like(weight), grad_like(bias)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.backend = backend


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd(dy, x, weight, bias, mean, rstd, ctx.backend)
    return dx, dw if weight is not None else None, db if bias is not None else None, None, None


layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# ---- RMSNorm -----------------------------------------------------------------------------

@torch.library.custom_op("llmkern::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float,
                 backend: str) -> tuple[Tensor, Tensor]:
    y, _, rstd = _norm_fwd_impl(x, weight, None, eps, backend, rms=True)
    return y, rstd.view(x.shape[:-1])


@rms_norm_fwd.register_fake
def _(x, weight, eps, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("llmkern::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor,
                 backend: str) -> tuple[Tensor, Tensor]:
    dx, dw, _ = _norm_bwd_impl(dy, x, weight, False, None, rstd.reshape(-1), backend, rms=True)
    return dx, _param_grad(dw, weight, x)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight) if weight is not None else x.new_empty(0))


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.backend = backend


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy, x, weight, rstd, ctx.backend)
    return dx, dw if weight is not None else None, None, None


rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


# ---- functional API ----------------------------------------------------------------------

def _check_norm_inputs(op: str, x, weight, bias, eps) -> None:
    check_tensor("x", x, op, dtypes=ANY_FLOAT)
    if x.dim() == 0:
        raise ValueError(f"llmkern.{op}: x must have at least 1 dimension (the normalized last "
                         f"dim), got a 0-d tensor (shape (), dtype {x.dtype}, device {x.device})")
    n = x.shape[-1]
    check_vector("weight", weight, n, op, f"the last dim of x ({tuple(x.shape)})",
                 dtypes=ANY_FLOAT)
    check_vector("bias", bias, n, op, f"the last dim of x ({tuple(x.shape)})", dtypes=ANY_FLOAT)
    check_same_device(op, x=x, weight=weight, bias=bias)
    if not eps > 0:
        raise ValueError(f"llmkern.{op}: eps must be > 0 (else a constant row divides by zero), "
                         f"got {eps}")


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, backend: Optional[str] = None) -> Tensor:
    """LayerNorm over the last dim of ``x``; ``weight``/``bias`` of shape (x.shape[-1],) or None.

    ``weight``/``bias`` may have another float dtype than ``x`` (fp32 parameters with bf16
    activations): every backend applies them in fp32 and returns ``x``'s dtype. float64 is
    served by the torch reference.
    """
    _check_norm_inputs("layer_norm", x, weight, bias, eps)
    chosen = LAYER_NORM.choose(x.device, backend, x=x, weight=weight, bias=bias)
    if chosen == "torch":
        return reference.layer_norm(x, weight, bias, eps)
    return layer_norm_fwd(x, weight, bias, float(eps), chosen)[0]


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6,
             backend: Optional[str] = None) -> Tensor:
    """RMSNorm over the last dim of ``x``; ``weight`` of shape (x.shape[-1],) or None.

    ``weight`` may have another float dtype than ``x``; the output has ``x``'s dtype on every
    backend (as :func:`layer_norm`).
    """
    _check_norm_inputs("rms_norm", x, weight, None, eps)
    chosen = RMS_NORM.choose(x.device, backend, x=x, weight=weight)
    if chosen == "torch":
        return reference.rms_norm(x, weight, eps)
    return rms_norm_fwd(x, weight, float(eps), chosen)[0]
