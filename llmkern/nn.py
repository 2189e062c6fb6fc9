"""nn.Modules over the llmkern ops, state_dict-compatible with their torch.nn counterparts."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import nn

import llmkern

_Shape = Union[int, Sequence[int], torch.Size]


def _last_dim_shape(normalized_shape: _Shape, cls: str) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"llmkern.nn.{cls} normalizes the last dim only: normalized_shape must be "
                         f"an int or a 1-element shape, got {normalized_shape!r}")
    return shape


class LayerNorm(nn.Module):
    """Drop-in ``torch.nn.LayerNorm`` (same arguments and state_dict) over ``llmkern.layer_norm``."""

    def __init__(self, normalized_shape: _Shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        self.normalized_shape = _last_dim_shape(normalized_shape, "LayerNorm")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return llmkern.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class RMSNorm(nn.Module):
    """Drop-in ``torch.nn.RMSNorm`` (same arguments and state_dict) over ``llmkern.rms_norm``.

    ``eps=None`` uses ``torch.finfo(x.dtype).eps``, as torch.nn.RMSNorm does.
    """

    def __init__(self, normalized_shape: _Shape, eps: Optional[float] = None,
                 elementwise_affine: bool = True, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__()
        self.normalized_shape = _last_dim_shape(normalized_shape, "RMSNorm")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return llmkern.rms_norm(x, self.weight, eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class MLP(nn.Module):
    """The GPT-2 MLP ``c_proj(gelu_tanh(c_fc(x)))`` over ``llmkern.mlp``.

    ``c_fc`` and ``c_proj`` are plain ``nn.Linear`` modules, so the state_dict (c_fc.weight,
    c_fc.bias, c_proj.weight, c_proj.bias) is that of a two-Linear GPT-2 MLP.
    ``recompute=True`` recomputes the hidden activation in the backward instead of saving it.
    """

    def __init__(self, n_embd: int, hidden: Optional[int] = None, bias: bool = True,
                 recompute: bool = False, device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        hidden = 4 * n_embd if hidden is None else hidden
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias, device=device, dtype=dtype)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias, device=device, dtype=dtype)
        self.recompute = recompute
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return llmkern.mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                           recompute=self.recompute, backend=self.backend)

    def extra_repr(self) -> str:
        return f"recompute={self.recompute}"
