"""nn.Modules over the llmkern ops, state_dict-compatible with their torch.nn counterparts."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import nn

from llmkern.backends import get_backend
from llmkern.ops.attention import attention
from llmkern.ops.decode_attention import DECODE, MAX_DECODE_ROWS, attention_with_kvcache
from llmkern.ops.gated_mlp import gated_mlp
from llmkern.ops.mlp import mlp
from llmkern.ops.norm import layer_norm, rms_norm
from llmkern.ops.rotary import rotary

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

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """``layer_norm(x)``; with ``residual``, ``(layer_norm(x + residual), x + residual)`` from
        one fused kernel (the add of a pre-norm block folded into its norm)."""
        return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend,
                          residual=residual)

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

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """``rms_norm(x)``; with ``residual``, ``(rms_norm(x + residual), x + residual)`` fused."""
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm(x, self.weight, eps, backend=self.backend, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class MLP(nn.Module):
    """The GPT-2 MLP ``dropout(c_proj(gelu_tanh(c_fc(x))))`` over ``llmkern.mlp``.

    ``c_fc`` and ``c_proj`` are plain ``nn.Linear`` modules, so the state_dict (c_fc.weight,
    c_fc.bias, c_proj.weight, c_proj.bias) is that of a two-Linear GPT-2 MLP.
    ``recompute=True`` recomputes the hidden activation in the backward instead of saving it.
    ``dropout`` applies to the output while training (GPT-2's residual dropout).
    """

    def __init__(self, n_embd: int, hidden: Optional[int] = None, bias: bool = True,
                 recompute: bool = False, device=None, dtype=None, backend: Optional[str] = None,
                 dropout: float = 0.0):
        super().__init__()
        hidden = 4 * n_embd if hidden is None else hidden
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias, device=device, dtype=dtype)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.recompute = recompute
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``dropout(mlp(x))``, or ``residual + dropout(mlp(x))`` with the add fused into the last
        GEMM when no dropout is active."""
        args = (x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)
        if self.training and self.dropout.p > 0.0:
            y = self.dropout(mlp(*args, recompute=self.recompute, backend=self.backend))
            return y if residual is None else residual + y
        return mlp(*args, recompute=self.recompute, backend=self.backend, residual=residual)

    def extra_repr(self) -> str:
        return f"recompute={self.recompute}"


class SwiGLUMLP(nn.Module):
    """The gated MLP of Llama-family models, ``down_proj(act(gate_proj(x)) * up_proj(x))``, over
    ``llmkern.gated_mlp``.

    ``gate_proj``, ``up_proj`` and ``down_proj`` are bias-free ``nn.Linear`` modules, so the
    state_dict is that of Hugging Face's LlamaMLP. ``activation``: 'silu' (SwiGLU), 'gelu_tanh'
    or 'gelu' (GeGLU, as Gemma).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, device=device, dtype=dtype)
        self.activation = activation
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(x, self.gate_proj.weight, self.down_proj.weight, self.up_proj.weight,
                         self.activation, self.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class KVCache:
    """A static key/value cache: per layer, (batch, n_kv_head, max_len, head_dim) buffers
    allocated once (on the first ``update``, with the keys' dtype and device) and written in
    place at each row's own positions, so a decoding step has the same shapes every time.

    ``lengths`` (batch,) int64 holds how many positions each row has cached; rows may differ
    (ragged batches). ``reorder`` picks batch rows (beam search), ``reset`` empties it.

    ``contiguous=True`` promises that every row is a contiguous prefix: a forward at
    ``input_pos`` (B, T) writes row b at ``input_pos[b, 0] + arange(T)`` and every earlier
    position of the row is already written (as in a generator's own loop). Attention then needs
    no position mask: a first forward into the empty cache attends causally over its own keys
    only, and a decoding step (T <= 16) calls the split-KV kernel
    (:func:`llmkern.attention_with_kvcache`) with ``cache_seqlens = input_pos[:, 0]``, whose
    bottom-right causal rule equals the position mask. Without it, any ``input_pos`` works and
    queries attend over all ``max_len`` positions, masked by position.
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int, contiguous: bool = False):
        if max_len < 1 or batch_size < 1 or n_layer < 1:
            raise ValueError(f"KVCache: n_layer, batch_size and max_len must be >= 1, got "
                             f"{n_layer}, {batch_size}, {max_len}")
        self.n_layer, self.batch_size, self.max_len = n_layer, batch_size, max_len
        self.contiguous = bool(contiguous)
        self.k: list = [None] * n_layer
        self.v: list = [None] * n_layer
        self.lengths: Optional[torch.Tensor] = None
        self._host_length: Optional[int] = 0  # every row's length, when known without a sync

    @property
    def length(self) -> int:
        """The longest row's cached length (a host sync when rows were set individually)."""
        if self._host_length is not None:
            return self._host_length
        return 0 if self.lengths is None else int(self.lengths.max())

    def _lengths(self, device) -> torch.Tensor:
        if self.lengths is None:
            self.lengths = torch.zeros(self.batch_size, dtype=torch.long, device=device)
            if self.lengths.is_cuda:
                torch._dynamo.mark_static_address(self.lengths)
        return self.lengths

    def next_positions(self, t: int, device) -> torch.Tensor:
        """(batch, t) positions following each row's cached ones."""
        return self._lengths(device)[:, None] + torch.arange(t, device=device)

    def set_lengths(self, lengths: torch.Tensor, host_length: Optional[int] = None) -> None:
        """Set every row's cached length, in place (positions past it are ignored);
        ``host_length``: the common length, when all rows have it (saves a sync later)."""
        self._lengths(lengths.device).copy_(lengths)
        self._host_length = host_length

    def buffers(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """The (B, Hkv, max_len, D) buffers of layer ``layer``, allocated like k/v the first time."""
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
            if k.is_cuda:  # fixed addresses: CUDA graphs (mode="reduce-overhead") can replay
                torch._dynamo.mark_static_address(self.k[layer])
                torch._dynamo.mark_static_address(self.v[layer])
        return self.k[layer], self.v[layer]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor):
        """Write k/v (B, Hkv, T, D) at positions ``input_pos`` (B, T) of layer ``layer``; return
        the whole (B, Hkv, max_len, D) buffers."""
        self.buffers(layer, k, v)
        index = input_pos[:, None, :, None].expand(k.shape[0], k.shape[1], -1, k.shape[3])
        self.k[layer].scatter_(2, index, k.to(self.k[layer].dtype))
        self.v[layer].scatter_(2, index, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def advance(self, input_pos: torch.Tensor, host_length: Optional[int] = None) -> None:
        """After a forward at ``input_pos`` (B, T): each row's length is its last position + 1."""
        self.set_lengths(input_pos[:, -1] + 1, host_length)

    def mask(self, input_pos: torch.Tensor, window=None) -> torch.Tensor:
        """Boolean (B, 1, T, max_len): query at position p sees cached keys j <= p (and, with
        ``window=(left, right)``, p - left <= j <= p + right)."""
        j = torch.arange(self.max_len, device=input_pos.device)
        p = input_pos[:, None, :, None]
        keep = j <= p
        if window is not None:
            left, right = window
            if left is not None:
                keep = keep & (j >= p - left)
            if right is not None:
                keep = keep & (j <= p + right)
        return keep

    def reorder(self, index: torch.Tensor) -> None:
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, index.to(t.device))
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, index.to(self.lengths.device))
        self.batch_size = int(index.numel())

    def reset(self) -> None:
        if self.lengths is not None:
            self.lengths.zero_()
        self._host_length = 0


class CausalSelfAttention(nn.Module):
    """Causal self-attention: fused qkv projection ``c_attn``, ``llmkern.attention``, ``c_proj``.

    ``c_attn`` (nn.Linear, n_embd -> (n_head + 2 * n_kv_head) * head_dim) yields q, k, v in that
    order; with ``n_kv_head == n_head`` this is GPT-2's c_attn layout (transposed from Conv1D).
    ``n_kv_head < n_head`` gives GQA (MQA at 1): k/v heads are never repeated.
    ``window`` is llmkern's ``(left, right)`` (an int ``w`` means ``(w, 0)``: each query sees
    itself and the ``w`` previous tokens). ``dropout`` applies to the attention probabilities
    and the output projection while training.

    ``forward(x, attn_mask=None, cache=None, layer=0, input_pos=None)``: x (B, T, n_embd).
    Without a cache, the T queries attend causally to themselves; ``attn_mask`` (boolean,
    True = attend, or additive) broadcastable to (B, n_head, T, T) is combined with the causal
    mask, e.g. for padding. ``rope=(cos, sin)`` ((max_len, head_dim / 2) tables, as
    :func:`llmkern.rotary` takes) rotates q and k at their positions (``input_pos`` with a
    cache, else 0..T-1) before the cache write (a decoding step hands the tables to the split-KV
    op, which rotates k as it writes the cache and q as it loads it). With ``cache`` (a :class:`KVCache`), the new keys/values are written
    at ``input_pos`` (B, T) (default: after each row's cached positions) of layer ``layer``, and
    the queries attend to every cached key at a position up to their own (``attn_mask`` then
    broadcasts to (B, n_head, T, cache.max_len)). The caller advances the cache's lengths
    (``cache.advance(input_pos)``) once all layers have run.
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

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, layer: int = 0,
                input_pos: Optional[torch.Tensor] = None, rope=None) -> torch.Tensor:
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
        causal, window = True, self.window
        if cache is not None:
            if input_pos is None:
                input_pos = cache.next_positions(t, x.device)
            if tuple(input_pos.shape) != (b, t):
                raise ValueError(f"llmkern.nn.CausalSelfAttention: input_pos must be ({b}, {t}) "
                                 f"(batch, seq), got shape {tuple(input_pos.shape)}")
        fast = (cache is not None and cache.contiguous and attn_mask is None
                and not (self.training and self.dropout > 0.0) and not q.requires_grad)
        # A decoding step into a non-empty cache: the split-KV op, which also applies the rope
        # (k as it is written into the cache, q as it is loaded). A backend the decode op lacks
        # takes the masked path.
        decode = (fast and cache._host_length != 0 and t <= MAX_DECODE_ROWS
                  and (self.backend or get_backend()) in ("auto", "torch", *DECODE.backends))
        if rope is not None:
            if cache is not None and rope[0].shape[-2] < cache.max_len:
                raise ValueError(f"llmkern.nn.CausalSelfAttention: rope tables have "
                                 f"{rope[0].shape[-2]} rows, fewer than the cache's {cache.max_len} "
                                 f"positions")
            if not decode:
                # cache positions lie below max_len: no range check (a host sync per step)
                q, k = rotary(q, k, rope[0], rope[1], input_pos, backend=self.backend,
                              check=cache is None)
        if fast and cache._host_length == 0:
            # An empty cache: every row starts at position 0, so the new keys are all it sees
            # (a right-padded row's padding lies after its positions): causal attention below.
            cache.update(layer, k, v, input_pos)
        elif decode:
            kc, vc = cache.buffers(layer, k, v)
            # Rows are prefixes: row b holds input_pos[b, 0] keys, and the kernel's bottom-right
            # causal rule (and window) equals the position mask; the rope positions
            # input_pos[b, 0] + i are the ones the op rotates at.
            cos, sin = rope if rope is not None else (None, None)
            y = attention_with_kvcache(q.to(kc.dtype), kc, vc, k.to(kc.dtype), v.to(kc.dtype),
                                       cache_seqlens=input_pos[:, 0], causal=True,
                                       window=self.window, backend=self.backend, check=False,
                                       rotary_cos=cos, rotary_sin=sin)
            return self.c_proj(y.to(x.dtype).transpose(1, 2).reshape(b, t, self.n_embd))
        elif cache is not None:
            k, v = cache.update(layer, k, v, input_pos)
            # Causality and the window come from the positions: the buffer's tail is unwritten.
            keep = cache.mask(input_pos, self.window)
            if attn_mask is None:
                attn_mask = keep
            elif attn_mask.dtype == torch.bool:
                attn_mask = keep & attn_mask
            else:
                attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
            causal, window = False, None
        y = attention(q, k, v, causal=causal, window=window, attn_mask=attn_mask,
                      dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, self.n_embd)))

    def extra_repr(self) -> str:
        return (f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, "
                f"window={self.window}, dropout={self.dropout}")
