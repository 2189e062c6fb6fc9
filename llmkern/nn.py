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

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mlp(x)``, or ``residual + mlp(x)`` with the add fused into the last GEMM."""
        return llmkern.mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                           recompute=self.recompute, backend=self.backend, residual=residual)

    def extra_repr(self) -> str:
        return f"recompute={self.recompute}"


class CausalSelfAttention(nn.Module):
    """Causal self-attention: fused qkv projection ``c_attn``, ``llmkern.attention``, ``c_proj``.

    ``c_attn`` (nn.Linear, n_embd -> (n_head + 2 * n_kv_head) * head_dim) yields q, k, v in that
    order; with ``n_kv_head == n_head`` this is GPT-2's c_attn layout (transposed from Conv1D).
    ``n_kv_head < n_head`` gives GQA (MQA at 1): k/v heads are never repeated.
    ``window`` is llmkern's ``(left, right)`` (an int ``w`` means ``(w, 0)``: each query sees
    itself and the ``w`` previous tokens). ``dropout`` applies to the attention probabilities
    and the output projection while training.

    ``forward(x, past_kv=None, use_cache=False, attn_mask=None)``: x (B, T, n_embd).
    ``past_kv=(k, v)``, each (B, n_kv_head, T_past, head_dim), holds earlier positions: the T
    new queries attend to the past keys and to themselves causally (bottom-right alignment), the
    decoding step. With ``use_cache=True`` returns ``(y, (k, v))`` where k/v now include the T
    new positions (feed them back as ``past_kv``); otherwise returns y. ``attn_mask`` (boolean,
    True = attend, or additive) broadcastable to (B, n_head, T, T_past + T) is combined with the
    causal mask, e.g. for padding. ``cache``, an object with ``update(layer, k, v) -> (k, v)``
    (such as ``llmkern.model.KVCache``, preallocated), stores the new keys/values of layer
    ``layer`` and returns all of them: the alternative to ``past_kv`` for a whole model.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None,
                 bias: bool = True, dropout: float = 0.0, window=None,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_head < 1 or n_embd % n_head:
            raise ValueError(f"llmkern.nn.CausalSelfAttention: n_embd ({n_embd}) must be a multiple "
                             f"of n_head ({n_head})")
        if n_kv_head < 1 or n_head % n_kv_head:
            raise ValueError(f"llmkern.nn.CausalSelfAttention: n_head ({n_head}) must be a multiple "
                             f"of n_kv_head ({n_kv_head})")
        if isinstance(window, numbers.Integral):
            window = (int(window), 0)
        self.n_embd, self.n_head, self.n_kv_head = n_embd, n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.window = tuple(window) if window is not None else None
        self.dropout = dropout
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias, **factory)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias, **factory)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, past_kv=None, use_cache: bool = False,
                attn_mask: Optional[torch.Tensor] = None, cache=None, layer: int = 0):
        if x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"llmkern.nn.CausalSelfAttention: x must be (batch, seq, {self.n_embd}), "
                             f"got shape {tuple(x.shape)}")
        b, t, _ = x.shape
        hd, hq, hkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([hq * hd, hkv * hd, hkv * hd], dim=-1)
        # (B, T, H, D) -> (B, H, T, D) views: the last dim stays contiguous, as the kernels want.
        q = q.view(b, t, hq, hd).transpose(1, 2)
        k = k.view(b, t, hkv, hd).transpose(1, 2)
        v = v.view(b, t, hkv, hd).transpose(1, 2)
        if past_kv is not None:
            past_k, past_v = past_kv
            k = torch.cat([past_k.to(k.dtype), k], dim=2)
            v = torch.cat([past_v.to(v.dtype), v], dim=2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = llmkern.attention(q, k, v, causal=True, window=self.window, attn_mask=attn_mask,
                              dropout_p=self.dropout if self.training else 0.0,
                              backend=self.backend)
        y = self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, self.n_embd)))
        return (y, (k, v)) if use_cache else y

    def extra_repr(self) -> str:
        return (f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, "
                f"window={self.window}, dropout={self.dropout}")
