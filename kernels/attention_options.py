"""The records an attention launch takes, named by meaning rather than by position: the call's
options (``AttentionOptions``), the problem's shape, dense or packed varlen (``AttentionShape``,
``VarlenOffsets``), and the optional mask (``MaskArg``).

Every forward and backward implementation takes the same records, so another kernel family (say
TMA and warp specialization on sm_90) plugs in as one more function of (tensors, shape, mask,
options). Plain Python and torch only: the op layer builds them without importing Triton.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """The options of one attention call.

    ``window_*`` None means unbounded; ``window_right`` may be negative (PyTorch's top-left
    causal alignment when Sq < Sk is such a window). ``softcap`` 0.0 means none. ``seed`` keys
    the dropout RNG; fp32 inputs use tf32 products only with ``allow_tf32``. ``deterministic``
    asks the backward for bit-identical gradients run to run; False lets a backward that can
    accumulate with float atomics do so (``attention_hopper.backward_kernel`` says which)."""
    scale: float
    causal: bool = False
    window_left: Optional[int] = None
    window_right: Optional[int] = None
    softcap: float = 0.0
    dropout_p: float = 0.0
    seed: int = 0
    allow_tf32: bool = False
    deterministic: bool = True

    def window_args(self) -> tuple[int, int, bool, bool]:
        """(left, right, HAS_LEFT, HAS_RIGHT) with causal folded into the right bound."""
        left, right = self.window_left, self.window_right
        if self.causal:
            right = 0 if right is None else min(right, 0)
        return (left or 0, right or 0, left is not None, right is not None)

    def score_args(self) -> tuple[float, float, bool]:
        """(qk_in, qk_out, SOFTCAP): s2 = qk * qk_out, or tanh(qk * qk_in) * qk_out with a softcap."""
        if self.softcap > 0.0:
            return self.scale / self.softcap, self.softcap * LOG2E, True
        return 1.0, self.scale * LOG2E, False

    def precision(self, dtype: torch.dtype) -> str:
        return "tf32" if dtype == torch.float32 and self.allow_tf32 else "ieee"

    def heavy(self, mask: "MaskArg") -> bool:
        """Features that hold more live values per score (and get smaller tiles)."""
        return mask.kind != 0 or self.softcap > 0.0 or self.dropout_p > 0.0


@dataclasses.dataclass(frozen=True)
class VarlenOffsets:
    """Packed sequences: sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q (and of
    cu_seqlens_k for k/v); no sequence is longer than max_seqlen_q / max_seqlen_k."""
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """The launch grid's view of a call: sequences, heads, kv heads and the (longest) lengths.

    Dense tensors are (B, H, S, D) and lse (B, H, S); packed varlen tensors are (total, H, D)
    and lse (H, total), their sequence offsets coming from ``varlen``."""
    batch: int
    heads: int
    kv_heads: int
    seqlen_q: int
    seqlen_k: int
    varlen: Optional[VarlenOffsets] = None

    @classmethod
    def dense(cls, q: torch.Tensor, k: torch.Tensor) -> "AttentionShape":
        return cls(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2])

    @classmethod
    def packed(cls, q: torch.Tensor, k: torch.Tensor, varlen: VarlenOffsets) -> "AttentionShape":
        return cls(varlen.cu_seqlens_q.shape[0] - 1, q.shape[1], k.shape[1], varlen.max_seqlen_q,
                   varlen.max_seqlen_k, varlen)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, head, row) strides of q/k/v/out-like ``t``; packed: the batch offset comes
        from cu_seqlens, so its stride is 0."""
        if self.varlen is not None:
            return (0, t.stride(1), t.stride(0))
        return tuple(t.stride()[:3])

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int, int]:
        if self.varlen is not None:
            return (0, lse.stride(0), lse.stride(1))
        return tuple(lse.stride())

    def offsets(self, placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cu_seqlens_q, cu_seqlens_k), or a placeholder pointer the dense kernels never read."""
        if self.varlen is None:
            return placeholder, placeholder
        return self.varlen.cu_seqlens_q.contiguous(), self.varlen.cu_seqlens_k.contiguous()


@dataclasses.dataclass(frozen=True)
class MaskArg:
    """An attn_mask as the kernels read it: a (B, H, Sq, Sk) view with stride-0 broadcasts
    (booleans viewed as uint8), and its kind: 0 none, 1 boolean (0 = hidden), 2 additive."""
    tensor: Optional[torch.Tensor] = None
    strides: tuple[int, int, int, int] = (0, 0, 0, 0)
    kind: int = 0

    @classmethod
    def of(cls, attn_mask: Optional[torch.Tensor], shape: AttentionShape) -> "MaskArg":
        if attn_mask is None:
            return cls()
        mask = attn_mask
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.expand(shape.batch, shape.heads, shape.seqlen_q, shape.seqlen_k)
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
            return cls(mask, tuple(mask.stride()), 1)
        return cls(mask, tuple(mask.stride()), 2)
