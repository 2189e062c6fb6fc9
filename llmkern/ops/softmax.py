"""Softmax over the last dim with fused scale and causal mask: op, autograd, functional API."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmkern import reference
from llmkern.backends import select
from llmkern.ops import cuda_ext
from llmkern.ops._checks import check_tensor, kernel_unsupported


@torch.library.custom_op("llmkern::softmax_fwd", mutates_args=())
def softmax_fwd(x: Tensor, scale: float, causal: bool, backend: str) -> Tensor:
    if backend == "triton":
        from llmkern.kernels.softmax import softmax_fwd as triton_softmax_fwd

        return triton_softmax_fwd(x, scale, causal)
    if backend == "cuda":
        return cuda_ext.call("softmax_fwd", x, scale, causal)
    raise ValueError(f"llmkern::softmax_fwd: backend must be 'triton' or 'cuda', got {backend!r}")


@softmax_fwd.register_fake
def _(x, scale, causal, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("llmkern::softmax_bwd", mutates_args=())
def softmax_bwd(dy: Tensor, y: Tensor, scale: float, backend: str) -> Tensor:
    if backend == "triton":
        from llmkern.kernels.softmax import softmax_bwd as triton_softmax_bwd

        return triton_softmax_bwd(dy, y, scale)
    if backend == "cuda":
        return cuda_ext.call("softmax_bwd", dy, y, scale)
    raise ValueError(f"llmkern::softmax_bwd: backend must be 'triton' or 'cuda', got {backend!r}")


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

    A row that sees no key (causal with Sq > Sk) is all zeros.
    """
    check_tensor("x", x, "softmax")
    if causal and x.dim() < 2:
        raise ValueError(f"llmkern.softmax: causal=True needs x of shape (..., Sq, Sk), got shape "
                         f"{tuple(x.shape)}")

    chosen = select("softmax", x.device, backend,
                    kernel_unsupported("softmax", x, x=x, causal=causal))
    if chosen == "torch":
        return reference.softmax(x, scale, causal)
    return softmax_fwd(x, float(scale), bool(causal), chosen)
