"""Per-token log-prob and entropy over the last dim (Triton), and their gradient, one program
per row: the entropy path of ``llmkern.linear_logprobs`` (the log-prob-only path is the
cross-entropy kernel's).

The first walk over the row (blocks of BLOCK_V, fp32) keeps, per lane, the running max m, the
rescaled sum s = sum exp(x - m) and t = sum exp(x - m) * x; then lse = M + log S and the entropy
H = lse - T / S. With a gradient the second walk writes, over the logits when asked,
``scale * (g * (onehot(target) - p) - e * p * (x - lse + H))`` for the row weights g (of logp)
and e (of H): the gradient of ``g * logp + e * H``. Ignored rows get 0 everywhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import warps_for_block
from .cross_entropy import block_v, shipped_blocks


@triton.jit
def _logprobs_entropy_kernel(Logits, Grad, Target, Logp, Ent, DLogp, DEnt, stride_l, stride_g,
                             V, ignore_index, grad_scale,
                             WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    Logits += row * stride_l
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(Target + row).to(tl.int64)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    t = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(Logits + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        keep = tl.exp(m - m_safe)
        w = tl.exp(x - m_safe)
        s = s * keep + w
        t = t * keep + w * tl.where(mask, x, 0.0)  # masked lanes: 0 * 0, not 0 * -inf
        m = m_new
    m_row = tl.max(m, axis=0)
    m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    lane = tl.exp(tl.where(m == float("-inf"), float("-inf"), m - m_row_safe))
    s_row = tl.sum(s * lane, axis=0)
    lse = m_row_safe + tl.log(s_row)
    ent = lse - tl.sum(t * lane, axis=0) / s_row
    x_t = tl.load(Logits + tl.where(in_range, target, 0)).to(tl.float32)
    logp = tl.where(in_range, x_t - lse, float("nan"))
    tl.store(Logp + row, tl.where(ignored, 0.0, logp))
    tl.store(Ent + row, tl.where(ignored, 0.0, ent))
    if WRITE_GRAD:
        Grad += row * stride_g
        g = tl.where(ignored, 0.0, tl.load(DLogp + row).to(tl.float32)) * grad_scale
        e = tl.where(ignored, 0.0, tl.load(DEnt + row).to(tl.float32)) * grad_scale
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(Logits + start + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            d = g * (tl.where(start + cols == target, 1.0, 0.0) - p) - e * p * (x - lse + ent)
            tl.store(Grad + start + cols, d.to(Grad.dtype.element_ty), mask=mask)


def logprobs_entropy(logits2d: torch.Tensor, target: torch.Tensor, ignore_index: int,
                     logp: torch.Tensor, entropy: torch.Tensor,
                     dlogp: Optional[torch.Tensor] = None, dentropy: Optional[torch.Tensor] = None,
                     grad_scale: float = 1.0, grad_out: Optional[torch.Tensor] = None,
                     block: Optional[int] = None) -> None:
    """logp and entropy (fp32, (rows,)) of logits2d (rows, V) with a unit last stride, into
    ``logp``/``entropy``; with ``grad_out`` (may be ``logits2d`` itself) also the gradient for
    the per-row weights ``dlogp``/``dentropy`` (fp32, contiguous), times ``grad_scale``."""
    rows, vocab = logits2d.shape
    blk = block or block_v(vocab)
    write = grad_out is not None
    _logprobs_entropy_kernel[(rows,)](
        logits2d, grad_out if write else logits2d, target, logp, entropy,
        dlogp if write else logp, dentropy if write else entropy,
        logits2d.stride(0), grad_out.stride(0) if write else 0, vocab, ignore_index,
        float(grad_scale), WRITE_GRAD=write, BLOCK_V=blk, num_warps=warps_for_block(blk))


def aot_configs(dtypes=("bf16", "fp32")):
    """Every BLOCK_V the launcher can pick, in the gradient mode (a superset of the forward)."""
    from llmkern.testing import AOTConfig

    for dt in dtypes:
        types = dict(Logits=f"*{dt}", Grad=f"*{dt}", Target="*i64", Logp="*fp32", Ent="*fp32",
                     DLogp="*fp32", DEnt="*fp32", stride_l="i32", stride_g="i32", V="i32",
                     ignore_index="i32", grad_scale="fp32")
        for blk in shipped_blocks():
            yield AOTConfig(_logprobs_entropy_kernel, types, dict(WRITE_GRAD=True, BLOCK_V=blk),
                            warps_for_block(blk), name=f"logprobs_entropy-grad-{dt}-{blk}")
