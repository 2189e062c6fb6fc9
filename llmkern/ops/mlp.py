"""linear_gelu and the GPT-2 MLP: functional API, input checks and backend choice."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmkern import reference
from llmkern.backends import (KERNEL_DTYPES, Backend, OpBackends, dtype_reason,
                              interpreter_bf16_reason)
from llmkern.ops import cuda_ext
from llmkern.ops._checks import (ANY_FLOAT, autocast_inputs, check_same_device, check_same_dtype,
                                 check_tensor, describe)

# cuBLASLt (the cuda backend) is expected to be the fastest GEMM, Triton the portable one.
AUTO_ORDER = ("cuda", "triton")


def _empty(like: Tensor) -> Tensor:
    """Stands for an absent output (no bias)."""
    return like.new_empty(0)


def _cuda_serves(x, **_):
    # All operands share x's dtype (checked before the choice).
    return dtype_reason(x, KERNEL_DTYPES, "x")


def _triton_serves(x, **_):
    # The GEMMs run bf16 operands through tl.dot, which the CPU interpreter gets wrong.
    return dtype_reason(x, KERNEL_DTYPES, "x") or interpreter_bf16_reason(x)


# ---- linear_gelu: y = gelu_tanh(x W^T + b) ---------------------------------------------------

@torch.library.custom_op("llmkern::linear_gelu_fwd", mutates_args=())
def linear_gelu_fwd(x2d: Tensor, weight: Tensor, bias: Optional[Tensor],
                    backend: str, store_pre: bool = True) -> tuple[Tensor, Tensor]:
    """(y, pre): pre = x W^T + b is what the backward needs (gelu' is recomputed from it);
    empty when not ``store_pre`` (no gradient wanted: one M x N write less)."""
    return LINEAR_GELU.run("fwd", backend, x2d, weight, bias, store_pre)


@linear_gelu_fwd.register_fake
def _(x2d, weight, bias, backend, store_pre=True):
    y = x2d.new_empty((x2d.shape[0], weight.shape[0]))
    return y, torch.empty_like(y) if store_pre else _empty(x2d)


def _triton_linear_gelu_fwd(x2d, weight, bias, store_pre):
    from llmkern.kernels.matmul import linear

    if not store_pre:
        return linear(x2d, weight, bias, activation="gelu"), _empty(x2d)
    return linear(x2d, weight, bias, activation="gelu", store_pre=True)


def _cuda_linear_gelu_fwd(x2d, weight, bias, store_pre):
    y, pre = cuda_ext.call("linear_gelu_fwd", x2d, weight, bias)
    return y, pre if store_pre else _empty(x2d)


def _triton_linear_gelu_bwd(dy, x2d, weight, pre, has_bias):
    from llmkern.kernels.matmul import gelu_backward, gemm

    # d(pre) formed once (one read of dy and pre, one write) rather than in the loads of both
    # GEMMs, which would evaluate gelu' once per tile of their output columns and keep them
    # off the persistent kernel.
    dpre = gelu_backward(dy, pre)
    db = x2d.new_empty(weight.shape[0], dtype=torch.float32) if has_bias else None
    dweight = gemm(dpre.t(), x2d, rowsum_out=db, out_dtype=weight.dtype)
    dx = gemm(dpre, weight)
    return dx, dweight, db.to(weight.dtype) if has_bias else _empty(x2d)


LINEAR_GELU = OpBackends("linear_gelu", (
    Backend("triton", serves=_triton_serves,
            impl={"fwd": _triton_linear_gelu_fwd, "bwd": _triton_linear_gelu_bwd}),
    Backend("cuda", serves=_cuda_serves,
            impl={"fwd": _cuda_linear_gelu_fwd,
                  "bwd": lambda *a: tuple(cuda_ext.call("linear_gelu_bwd", *a))}),
), auto_order=AUTO_ORDER)


@torch.library.custom_op("llmkern::linear_gelu_bwd", mutates_args=())
def linear_gelu_bwd(dy2d: Tensor, x2d: Tensor, weight: Tensor, pre: Tensor, has_bias: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return LINEAR_GELU.run("bwd", backend, dy2d, x2d, weight, pre, has_bias)


@linear_gelu_bwd.register_fake
def _(dy2d, x2d, weight, pre, has_bias, backend):
    db = weight.new_empty(weight.shape[0]) if has_bias else _empty(x2d)
    return x2d.new_empty(x2d.shape), torch.empty_like(weight), db


def _linear_gelu_setup(ctx, inputs, output):
    x2d, weight, bias, backend = inputs[:4]
    ctx.store_pre = inputs[4] if len(inputs) > 4 else True
    ctx.save_for_backward(x2d, weight, output[1])
    ctx.has_bias, ctx.backend = bias is not None, backend


def _linear_gelu_backward(ctx, dy, _dpre):
    x2d, weight, pre = ctx.saved_tensors
    if not ctx.store_pre:
        raise RuntimeError("llmkern.linear_gelu_fwd: a gradient was asked of a call made with "
                           "store_pre=False (no pre-activation saved); pass store_pre=True")
    dx, dw, db = linear_gelu_bwd(dy, x2d, weight, pre, ctx.has_bias, ctx.backend)
    return dx, dw, db if ctx.has_bias else None, None, None


linear_gelu_fwd.register_autograd(_linear_gelu_backward, setup_context=_linear_gelu_setup)


# ---- mlp: out = gelu_tanh(x W_fc^T + b_fc) W_proj^T + b_proj ----------------------------------

@torch.library.custom_op("llmkern::mlp_fwd", mutates_args=())
def mlp_fwd(x2d: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], proj_weight: Tensor,
            proj_bias: Optional[Tensor], residual: Optional[Tensor], recompute: bool,
            backend: str) -> tuple[Tensor, Tensor]:
    """(out, pre); out includes ``residual`` when given (added in the projection GEMM's
    epilogue); pre (the fc pre-activation, all the backward needs besides x) is empty when
    ``recompute`` (the backward recomputes it with one GEMM)."""
    return MLP.run("fwd", backend, x2d, fc_weight, fc_bias, proj_weight, proj_bias, residual,
                   recompute)


@mlp_fwd.register_fake
def _(x2d, fc_weight, fc_bias, proj_weight, proj_bias, residual, recompute, backend):
    pre = _empty(x2d) if recompute else x2d.new_empty((x2d.shape[0], fc_weight.shape[0]))
    return x2d.new_empty((x2d.shape[0], proj_weight.shape[0])), pre


def _triton_mlp_fwd(x2d, fc_weight, fc_bias, proj_weight, proj_bias, residual, recompute):
    from llmkern.kernels.matmul import linear

    if recompute:
        h, pre = linear(x2d, fc_weight, fc_bias, activation="gelu"), _empty(x2d)
    else:
        h, pre = linear(x2d, fc_weight, fc_bias, activation="gelu", store_pre=True)
    return linear(h, proj_weight, proj_bias, residual=residual), pre


def _cuda_mlp_fwd(x2d, fc_weight, fc_bias, proj_weight, proj_bias, residual, recompute):
    h, pre = cuda_ext.call("linear_gelu_fwd", x2d, fc_weight, fc_bias)
    out = cuda_ext.call("linear_fwd", h, proj_weight, proj_bias)
    if residual is not None:
        out = out.add_(residual)
    return out, _empty(x2d) if recompute else pre


def _triton_mlp_bwd(dout, x2d, fc_weight, fc_bias, proj_weight, pre, has_proj_bias, recompute):
    from llmkern.kernels.matmul import gemm, linear

    if recompute:
        pre = linear(x2d, fc_weight, fc_bias)
    f32 = torch.float32
    dproj_b = x2d.new_empty(proj_weight.shape[0], dtype=f32) if has_proj_bias else None
    dfc_b = x2d.new_empty(fc_weight.shape[0], dtype=f32) if fc_bias is not None else None
    # d(pre) = (dout W_proj) * gelu'(pre) in the epilogue of the GEMM that produces it, which
    # also writes h = gelu(pre) from the same sigmoid: GELU and GELU' once per element. The
    # alternative, gelu(pre) recomputed in the B loads of the dW_proj GEMM, evaluates it once
    # per tile row of dW_proj (C_out / BLOCK_M times per element) and keeps that GEMM on the
    # prologue tiles; h costs one (tokens x H) write, and the backward holds pre, h and dpre,
    # no more than eager's saved h and pre plus its dh and dpre.
    h = torch.empty_like(pre)
    dpre = gemm(dout, proj_weight, gelu_grad_pre=pre, act_out=h)
    # dW_proj = dout^T h; db_proj = the row sums of dout^T in the same GEMM.
    dproj_w = gemm(dout.t(), h, rowsum_out=dproj_b, out_dtype=proj_weight.dtype)
    del h
    dfc_w = gemm(dpre.t(), x2d, rowsum_out=dfc_b, out_dtype=fc_weight.dtype)
    dx = gemm(dpre, fc_weight)
    return (dx, dfc_w, dfc_b.to(fc_weight.dtype) if dfc_b is not None else _empty(x2d),
            dproj_w, dproj_b.to(proj_weight.dtype) if dproj_b is not None else _empty(x2d))


def _cuda_mlp_bwd(dout, x2d, fc_weight, fc_bias, proj_weight, pre, has_proj_bias, recompute):
    if recompute:
        _, pre = cuda_ext.call("linear_gelu_fwd", x2d, fc_weight, fc_bias)
    h = torch.nn.functional.gelu(pre, approximate="tanh")
    dh, dproj_w, dproj_b = cuda_ext.call("linear_bwd", dout, h, proj_weight, has_proj_bias)
    dx, dfc_w, dfc_b = cuda_ext.call("linear_gelu_bwd", dh, x2d, fc_weight, pre, fc_bias is not None)
    return dx, dfc_w, dfc_b, dproj_w, dproj_b


MLP = OpBackends("mlp", (
    Backend("triton", serves=_triton_serves, impl={"fwd": _triton_mlp_fwd, "bwd": _triton_mlp_bwd}),
    Backend("cuda", serves=_cuda_serves, impl={"fwd": _cuda_mlp_fwd, "bwd": _cuda_mlp_bwd}),
), auto_order=AUTO_ORDER)


@torch.library.custom_op("llmkern::mlp_bwd", mutates_args=())
def mlp_bwd(dout2d: Tensor, x2d: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor],
            proj_weight: Tensor, pre: Tensor, has_proj_bias: bool, recompute: bool,
            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias); absent biases give empty tensors."""
    return MLP.run("bwd", backend, dout2d, x2d, fc_weight, fc_bias, proj_weight, pre,
                   has_proj_bias, recompute)


@mlp_bwd.register_fake
def _(dout2d, x2d, fc_weight, fc_bias, proj_weight, pre, has_proj_bias, recompute, backend):
    def bias_grad(has, w):
        return w.new_empty(w.shape[0]) if has else _empty(x2d)

    return (x2d.new_empty(x2d.shape), torch.empty_like(fc_weight),
            bias_grad(fc_bias is not None, fc_weight), torch.empty_like(proj_weight),
            bias_grad(has_proj_bias, proj_weight))


def _mlp_setup(ctx, inputs, output):
    x2d, fc_weight, fc_bias, proj_weight, proj_bias, residual, recompute, backend = inputs
    ctx.save_for_backward(x2d, fc_weight, fc_bias, proj_weight, output[1])
    ctx.has_proj_bias, ctx.recompute, ctx.backend = proj_bias is not None, recompute, backend
    ctx.has_residual = residual is not None


def _mlp_backward(ctx, dout, _dpre):
    x2d, fc_weight, fc_bias, proj_weight, pre = ctx.saved_tensors
    dx, dfc_w, dfc_b, dproj_w, dproj_b = mlp_bwd(dout, x2d, fc_weight, fc_bias, proj_weight, pre,
                                                 ctx.has_proj_bias, ctx.recompute, ctx.backend)
    return (dx, dfc_w, dfc_b if fc_bias is not None else None, dproj_w,
            dproj_b if ctx.has_proj_bias else None, dout if ctx.has_residual else None, None, None)


mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# ---- functional API ------------------------------------------------------------------------

def _check_weight(op: str, name: str, w: Tensor, in_features: int, what: str) -> None:
    check_tensor(name, w, op, ndim=2, dtypes=ANY_FLOAT)
    if w.shape[1] != in_features:
        raise ValueError(f"llmkern.{op}: {name} must have shape (out_features, {in_features}) "
                         f"(nn.Linear layout) to match {what}, got {describe(w)}")


def _check_bias(op: str, name: str, b: Optional[Tensor], out_features: int, weight_name: str) -> None:
    if b is None:
        return
    check_tensor(name, b, op, ndim=1, dtypes=ANY_FLOAT)
    if b.shape[0] != out_features:
        raise ValueError(f"llmkern.{op}: {name} must have shape ({out_features},) to match "
                         f"{weight_name}.shape[0], got {describe(b)}")


def _wants_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd will ask for a backward of a call on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """``gelu_tanh(x @ weight.T + bias)``: x (..., K), weight (N, K) as nn.Linear, bias (N,) or None."""
    op = "linear_gelu"
    check_tensor("x", x, op, dtypes=ANY_FLOAT)
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check_weight(op, "weight", weight, x.shape[-1], f"the last dim of x ({describe(x)})")
    _check_bias(op, "bias", bias, weight.shape[0], "weight")
    check_same_device(op, x=x, weight=weight, bias=bias)
    check_same_dtype(op, x=x, weight=weight, bias=bias)
    chosen = LINEAR_GELU.choose(x.device, backend, x=x)
    if chosen == "torch":
        return reference.linear_gelu(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    y, _ = linear_gelu_fwd(x2d, weight, bias, chosen, _wants_grad(x, weight, bias))
    return y.view(*x.shape[:-1], weight.shape[0])


def mlp(x: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], proj_weight: Tensor,
        proj_bias: Optional[Tensor], recompute: bool = False, backend: Optional[str] = None,
        residual: Optional[Tensor] = None) -> Tensor:
    """The GPT-2 MLP ``c_proj(gelu_tanh(c_fc(x)))`` with nn.Linear-layout weights.

    x (..., C); fc_weight (H, C); fc_bias (H,) or None; proj_weight (C_out, H); proj_bias
    (C_out,) or None. ``recompute=True`` keeps only x for the backward and recomputes the
    hidden pre-activation there (one more GEMM, (tokens x H) less activation memory).
    ``residual`` (..., C_out): returns ``residual + mlp(x)``, the add fused into the projection
    GEMM's epilogue (a GPT block's ``x + mlp(ln(x))``).
    """
    op = "mlp"
    check_tensor("x", x, op, dtypes=ANY_FLOAT)
    x, fc_weight, fc_bias, proj_weight, proj_bias, residual = autocast_inputs(
        x, fc_weight, fc_bias, proj_weight, proj_bias, residual)
    _check_weight(op, "fc_weight", fc_weight, x.shape[-1], f"the last dim of x ({describe(x)})")
    _check_bias(op, "fc_bias", fc_bias, fc_weight.shape[0], "fc_weight")
    _check_weight(op, "proj_weight", proj_weight, fc_weight.shape[0],
                  f"fc_weight.shape[0] (hidden size {fc_weight.shape[0]})")
    _check_bias(op, "proj_bias", proj_bias, proj_weight.shape[0], "proj_weight")
    if residual is not None:
        check_tensor("residual", residual, op, dtypes=ANY_FLOAT)
        expected = (*x.shape[:-1], proj_weight.shape[0])
        if tuple(residual.shape) != expected:
            raise ValueError(f"llmkern.{op}: residual must have shape {expected} (the output's), got "
                             f"{describe(residual)}")
    check_same_device(op, x=x, fc_weight=fc_weight, fc_bias=fc_bias, proj_weight=proj_weight,
                      proj_bias=proj_bias, residual=residual)
    check_same_dtype(op, x=x, fc_weight=fc_weight, fc_bias=fc_bias, proj_weight=proj_weight,
                     proj_bias=proj_bias, residual=residual)
    chosen = MLP.choose(x.device, backend, x=x)
    if chosen == "torch":
        out = reference.mlp(x, fc_weight, fc_bias, proj_weight, proj_bias)
        return out if residual is None else out + residual
    x2d = x.reshape(-1, x.shape[-1])
    res2d = residual.reshape(-1, residual.shape[-1]) if residual is not None else None
    # No gradient wanted: nothing to keep for a backward, which is what recompute keeps.
    keep_nothing = bool(recompute) or not _wants_grad(x, fc_weight, fc_bias, proj_weight, proj_bias,
                                                      residual)
    out, _ = mlp_fwd(x2d, fc_weight, fc_bias, proj_weight, proj_bias, res2d, keep_nothing, chosen)
    return out.view(*x.shape[:-1], proj_weight.shape[0])
