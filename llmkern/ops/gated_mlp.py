"""Gated MLPs (SwiGLU, GeGLU): torch reference, torch.library ops, autograd, functional API."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkern.backends import (KERNEL_DTYPES, Backend, OpBackends, dtype_reason,
                              interpreter_bf16_reason)
from llmkern.ops._checks import (ANY_FLOAT, autocast_inputs, check_same_device, check_same_dtype,
                                 check_tensor, describe)

OP = "gated_mlp"
# silu: SwiGLU (Llama, Mistral, Qwen2); gelu_tanh: GeGLU as Gemma ("gelu_pytorch_tanh");
# gelu: GeGLU with the exact erf GELU.
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def activate(g: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")


def gated_mlp_reference(x: Tensor, gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor,
                        activation: str = "silu") -> Tensor:
    """Plain PyTorch: ``down(act(x @ gate.T) * (x @ up.T))``, as Hugging Face's LlamaMLP."""
    return F.linear(activate(F.linear(x, gate_weight), activation) * F.linear(x, up_weight),
                    down_weight)


def _triton_serves(x, **_):
    # The GEMMs run bf16 operands through tl.dot, which the CPU interpreter gets wrong.
    return dtype_reason(x, KERNEL_DTYPES, "x") or interpreter_bf16_reason(x)


GATED_MLP = OpBackends(OP, (
    Backend("triton", serves=_triton_serves,
            impl={"fwd": "llmkern.kernels.gated_mlp:gated_mlp_fwd",
                  "bwd": "llmkern.kernels.gated_mlp:gated_mlp_bwd"}),
), auto_order=("triton",))


@torch.library.custom_op("llmkern::gated_mlp_fwd", mutates_args=())
def gated_mlp_fwd(x2d: Tensor, gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor,
                  activation: str, save: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(out, gu): gu = [x @ gate.T | x @ up.T] (M, 2F) is all the backward keeps (empty unless
    ``save``)."""
    return GATED_MLP.run("fwd", backend, x2d, gate_weight, up_weight, down_weight, activation, save)


@gated_mlp_fwd.register_fake
def _(x2d, gate_weight, up_weight, down_weight, activation, save, backend):
    m, f = x2d.shape[0], gate_weight.shape[0]
    return (x2d.new_empty((m, down_weight.shape[0])),
            x2d.new_empty((m, 2 * f) if save else (0, 2)))


@torch.library.custom_op("llmkern::gated_mlp_bwd", mutates_args=())
def gated_mlp_bwd(dout: Tensor, x2d: Tensor, gate_weight: Tensor, up_weight: Tensor,
                  down_weight: Tensor, gu: Tensor, activation: str,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return GATED_MLP.run("bwd", backend, dout, x2d, gate_weight, up_weight, down_weight, gu,
                         activation)


@gated_mlp_bwd.register_fake
def _(dout, x2d, gate_weight, up_weight, down_weight, gu, activation, backend):
    return (torch.empty_like(x2d), torch.empty_like(gate_weight), torch.empty_like(up_weight),
            torch.empty_like(down_weight))


def _setup(ctx, inputs, output):
    x2d, gate_weight, up_weight, down_weight, activation, save, backend = inputs
    if not save:  # only reachable when no input required grad at forward time
        ctx.save_for_backward(None, None, None, None, None)
    else:
        ctx.save_for_backward(x2d, gate_weight, up_weight, down_weight, output[1])
    ctx.activation, ctx.backend = activation, backend


def _backward(ctx, dout, _dgu):
    x2d, gate_weight, up_weight, down_weight, gu = ctx.saved_tensors
    if x2d is None:
        raise RuntimeError("llmkern.gated_mlp: backward through a forward run with save=False; "
                           "call it with gradients enabled")
    dx, dg, du, dd = gated_mlp_bwd(dout.contiguous(), x2d, gate_weight, up_weight, down_weight, gu,
                                   ctx.activation, ctx.backend)
    return dx, dg, du, dd, None, None, None


gated_mlp_fwd.register_autograd(_backward, setup_context=_setup)


# ---- functional API ----------------------------------------------------------------------

def _check_weight(name: str, w: Tensor, shape: tuple, what: str) -> None:
    check_tensor(name, w, OP, ndim=2, dtypes=ANY_FLOAT)
    if tuple(w.shape) != shape:
        raise ValueError(f"llmkern.{OP}: {name} must have shape {shape} ({what}), got {describe(w)}")


def gated_mlp(x: Tensor, gate_up_weight: Tensor, down_weight: Tensor,
              up_weight: Optional[Tensor] = None, activation: str = "silu",
              backend: Optional[str] = None) -> Tensor:
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with nn.Linear-layout weights, no biases.

    x (..., D). ``gate_up_weight`` (2F, D) holds the gate rows then the up rows (a merged
    ``gate_up_proj``); or pass the gate weight (F, D) there and ``up_weight`` (F, D) (separate
    ``gate_proj``/``up_proj``: read in place, never concatenated). ``down_weight`` (D_out, F).
    ``activation``: 'silu' (SwiGLU), 'gelu_tanh' or 'gelu' (GeGLU). The kernels compute gate and
    up in one GEMM from one read of x, apply the activation and product in its epilogue, and
    keep only the (tokens x 2F) pre-activations for the backward (eager keeps twice that).
    """
    check_tensor("x", x, OP, dtypes=ANY_FLOAT)
    if activation not in ACTIVATIONS:
        raise ValueError(f"llmkern.{OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    x, gate_up_weight, up_weight, down_weight = autocast_inputs(x, gate_up_weight, up_weight,
                                                                down_weight)
    d = x.shape[-1]
    check_tensor("gate_up_weight", gate_up_weight, OP, ndim=2, dtypes=ANY_FLOAT)
    if up_weight is None:
        if gate_up_weight.shape[0] % 2 or gate_up_weight.shape[1] != d:
            raise ValueError(f"llmkern.{OP}: gate_up_weight must have shape (2 * F, {d}) (gate rows "
                             f"then up rows, D = the last dim of x, {describe(x)}), got "
                             f"{describe(gate_up_weight)}")
        gate_weight, up_weight = gate_up_weight.chunk(2, dim=0)
    else:
        gate_weight = gate_up_weight
        _check_weight("gate_up_weight", gate_weight, (gate_weight.shape[0], d),
                      f"the gate weight when up_weight is given; D = the last dim of x, {describe(x)}")
        _check_weight("up_weight", up_weight, tuple(gate_weight.shape), "the gate weight's")
    f = gate_weight.shape[0]
    check_tensor("down_weight", down_weight, OP, ndim=2, dtypes=ANY_FLOAT)
    if down_weight.shape[1] != f:
        raise ValueError(f"llmkern.{OP}: down_weight must have shape (D_out, {f}) (F = the gate "
                         f"weight's rows), got {describe(down_weight)}")
    check_same_device(OP, x=x, gate_up_weight=gate_weight, up_weight=up_weight,
                      down_weight=down_weight)
    check_same_dtype(OP, x=x, gate_up_weight=gate_weight, up_weight=up_weight,
                     down_weight=down_weight)
    chosen = GATED_MLP.choose(x.device, backend, x=x)
    if chosen == "torch" or x.numel() == 0:
        return gated_mlp_reference(x, gate_weight, up_weight, down_weight, activation)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in
                                           (x, gate_weight, up_weight, down_weight))
    x2d = x.reshape(-1, d)
    out, _ = gated_mlp_fwd(x2d, gate_weight, up_weight, down_weight, activation, save, chosen)
    return out.view(*x.shape[:-1], down_weight.shape[0])


def swiglu_mlp(x: Tensor, gate_up_weight: Tensor, down_weight: Tensor,
               up_weight: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """The SwiGLU MLP of Llama, Mistral, Qwen2: :func:`gated_mlp` with ``activation='silu'``."""
    return gated_mlp(x, gate_up_weight, down_weight, up_weight, "silu", backend)


def geglu_mlp(x: Tensor, gate_up_weight: Tensor, down_weight: Tensor,
              up_weight: Optional[Tensor] = None, approximate: str = "tanh",
              backend: Optional[str] = None) -> Tensor:
    """The GeGLU MLP (Gemma: tanh GELU): :func:`gated_mlp` with a GELU gate; ``approximate``
    'tanh' or 'none' (erf), as ``torch.nn.functional.gelu``."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"llmkern.geglu_mlp: approximate must be 'tanh' or 'none', got "
                         f"{approximate!r}")
    return gated_mlp(x, gate_up_weight, down_weight, up_weight,
                     "gelu_tanh" if approximate == "tanh" else "gelu", backend)
