"""linear_gelu and the GPT-2 MLP: functional API, input checks and backend choice."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmkern import reference
from llmkern.backends import select
from llmkern.ops import cuda_ext
from llmkern.ops._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor, describe

# cuBLASLt (the cuda backend) is expected to be the fastest GEMM, Triton the portable one.
AUTO_ORDER = ("cuda", "triton")
_KERNELS_READY = False


def _check_weight(op: str, name: str, w: Tensor, in_features: int, what: str) -> None:
    check_tensor(name, w, op, ndim=2)
    if w.shape[1] != in_features:
        raise ValueError(f"llmkern.{op}: {name} must have shape (out_features, {in_features}) "
                         f"(nn.Linear layout) to match {what}, got {describe(w)}")


def _check_bias(op: str, name: str, b: Optional[Tensor], out_features: int, weight_name: str) -> None:
    if b is None:
        return
    check_tensor(name, b, op, ndim=1)
    if b.shape[0] != out_features:
        raise ValueError(f"llmkern.{op}: {name} must have shape ({out_features},) to match "
                         f"{weight_name}.shape[0], got {describe(b)}")


def _unsupported(op: str, x: Tensor, **info):
    def unsupported(name: str) -> Optional[str]:
        if x.dtype not in FLOAT_DTYPES:
            return f"dtype {x.dtype} is not supported"
        if not _KERNELS_READY:
            return "the fused kernels of this op are being built (torch serves it meanwhile)"
        if name == "cuda":
            return cuda_ext.unsupported(op, x=x, **info)
        return None
    return unsupported


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """``gelu_tanh(x @ weight.T + bias)``: x (..., K), weight (N, K) as nn.Linear, bias (N,) or None."""
    op = "linear_gelu"
    check_tensor("x", x, op)
    _check_weight(op, "weight", weight, x.shape[-1], f"the last dim of x ({describe(x)})")
    _check_bias(op, "bias", bias, weight.shape[0], "weight")
    check_same_device(op, x=x, weight=weight, bias=bias)
    check_same_dtype(op, x=x, weight=weight, bias=bias)
    chosen = select(op, x.device, backend, _unsupported(op, x, weight=weight, bias=bias),
                    auto_order=AUTO_ORDER)
    if chosen == "torch":
        return reference.linear_gelu(x, weight, bias)
    from llmkern.ops import _mlp_ops

    return _mlp_ops.linear_gelu_op(x, weight, bias, chosen)


def mlp(x: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], proj_weight: Tensor,
        proj_bias: Optional[Tensor], recompute: bool = False, backend: Optional[str] = None) -> Tensor:
    """The GPT-2 MLP ``c_proj(gelu_tanh(c_fc(x)))`` with nn.Linear-layout weights.

    x (..., C); fc_weight (H, C); fc_bias (H,) or None; proj_weight (C_out, H); proj_bias
    (C_out,) or None. ``recompute=True`` keeps only x for the backward and recomputes the
    hidden pre-activation there (one more GEMM, (tokens x H) less activation memory).
    """
    op = "mlp"
    check_tensor("x", x, op)
    _check_weight(op, "fc_weight", fc_weight, x.shape[-1], f"the last dim of x ({describe(x)})")
    _check_bias(op, "fc_bias", fc_bias, fc_weight.shape[0], "fc_weight")
    _check_weight(op, "proj_weight", proj_weight, fc_weight.shape[0],
                  f"fc_weight.shape[0] (hidden size {fc_weight.shape[0]})")
    _check_bias(op, "proj_bias", proj_bias, proj_weight.shape[0], "proj_weight")
    check_same_device(op, x=x, fc_weight=fc_weight, fc_bias=fc_bias, proj_weight=proj_weight,
                      proj_bias=proj_bias)
    check_same_dtype(op, x=x, fc_weight=fc_weight, fc_bias=fc_bias, proj_weight=proj_weight,
                     proj_bias=proj_bias)
    chosen = select(op, x.device, backend,
                    _unsupported(op, x, fc_weight=fc_weight, proj_weight=proj_weight),
                    auto_order=AUTO_ORDER)
    if chosen == "torch":
        return reference.mlp(x, fc_weight, fc_bias, proj_weight, proj_bias)
    from llmkern.ops import _mlp_ops

    return _mlp_ops.mlp_op(x, fc_weight, fc_bias, proj_weight, proj_bias, bool(recompute), chosen)
