"""Softmax over the last dim with fused scale and causal mask: op, autograd, functional API."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmkern import reference
from llmkern.backends import KERNEL_DTYPES, Backend, OpBackends, dtype_reason
from llmkern.ops import cuda_ext
from llmkern.ops._checks import ANY_FLOAT, check_finite, check_tensor


def _kernel_serves(x, **_):
    # Both kernels compute in fp32 without tl.dot: bf16 is exact under the interpreter too.
    return dtype_reason(x, KERNEL_DTYPES, "x")


SOFTMAX = OpBackends("softmax", (
    Backend("triton", serves=_kernel_serves,
            impl={"fwd": "llmkern.kernels.softmax:softmax_fwd",
                  "bwd": "llmkern.kernels.softmax:softmax_bwd"}),
    Backend("cuda", serves=_kernel_serves,
            impl={"fwd": lambda x, scale, causal: cuda_ext.call("softmax_fwd", x, scale, causal),
                  "bwd": lambda dy, y, scale: cuda_ext.call("softmax_bwd", dy, y, scale)}),
), auto_order=("triton", "cuda"))


@torch.library.custom_op("llmkern::softmax_fwd", mutates_args=())
def softmax_fwd(x: Tensor, scale: float, causal: bool, backend: str) -> Tensor:
    return SOFTMAX.run("fwd", backend, x, scale, causal)


@softmax_fwd.register_fake
def _(x, scale, causal, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("llmkern::softmax_bwd", mutates_args=())
def softmax_bwd(dy: Tensor, y: Tensor, scale: float, backend: str) -> Tensor:
    return SOFTMAX.run("bwd", backend, dy, y, scale)


@softmax_bwd.register_fake
def _(dy, y, scale, backend):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    _, scale, _, backend = inputs
    ctx.save_for_backward(output)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return softmax_bwd(dy, y, ctx.scale, ctx.backend), None, None, None


softmax_fwd.register_autograd(_backward, setup_context=_setup)


def softmax(x: Tensor, scale: float = 1.0, causal: bool = False,
            backend: Optional[str] = None) -> Tensor:
    """softmax(scale * x) over the last dim; ``causal`` masks (..., Sq, Sk) bottom-right.

    A row that sees no key (causal with Sq > Sk) or whose scores are all -inf is all zeros on
    every backend (as attention), not NaN. ``scale`` must be finite (ValueError otherwise).
    float64 is served by the torch reference.
    """
    check_tensor("x", x, "softmax", dtypes=ANY_FLOAT)
    scale = check_finite("scale", scale, "softmax")
    if causal and x.dim() < 2:
        raise ValueError(f"llmkern.softmax: causal=True needs x of shape (..., Sq, Sk), got shape "
                         f"{tuple(x.shape)}")

    chosen = SOFTMAX.choose(x.device, backend, x=x, causal=causal)
    if chosen == "torch":
        return reference.softmax(x, scale, causal)
    return softmax_fwd(x, scale, bool(causal), chosen)
