"""Cross-entropy over the last dim (Triton): loss, lse and the gradient, one program per row.

Statistics are fp32, online over the row (running max and rescaled sum): one exponential per
element (``exp2`` with log2(e) folded into an FMA) and one per block for the rescale. A row of
up to ``WHOLE_MAX_V`` classes (8192 in fp32) is read once and kept in registers: the
forward+gradient launch then writes ``dloss * (softmax - (1 - eps) * onehot(target) - eps / V)``
from those values (the exponentials reused, one read and one write of the logits). Longer rows
are walked in blocks of ``MAX_BLOCK_V`` (vocabularies up to 256k and beyond), and the gradient
walk reads them again.
The gradient may be written over the logits themselves (``grad_out=logits``) when the caller no
longer needs them: each block is read before it is overwritten by the same program.
Per-row loss: ``lse - (1 - eps) * x[target] - eps * mean(x)``; 0 on ignore_index rows; NaN for
a target outside [0, V) (the functional layer rejects those before the kernel when it checks).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import as_rows, warps_for_block

MAX_BLOCK_V = 4096
MIN_BLOCK_V = 128
# Rows up to this many classes (half as many in fp32) are held whole in registers (read once).
WHOLE_MAX_V = 16384


@triton.jit
def _grad_walk(Logits, Grad, cols, V, target, lse, dloss, base, smoothing, BLOCK_V: tl.constexpr):
    """dloss * (softmax - (1 - eps) * onehot - eps / V) over the row in blocks, from the lse."""
    lse2 = lse * 1.4426950408889634
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(Logits + start + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp2(x * 1.4426950408889634 - lse2) - base - tl.where(
            start + cols == target, 1.0 - smoothing, 0.0)
        tl.store(Grad + start + cols, (dloss * g).to(Grad.dtype.element_ty), mask=mask)


@triton.jit
def _ce_kernel(Logits, Grad, Target, Loss, Lse, DLoss, stride_l, stride_g, stride_dloss, V,
               ignore_index, smoothing,
               HAS_LSE: tl.constexpr, WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr,
               BLOCK_V: tl.constexpr, WHOLE_ROW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    Logits += row * stride_l
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(Target + row).to(tl.int64)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)
    sum_x = 0.0
    if HAS_LSE:
        lse = tl.load(Lse + row)
    elif WHOLE_ROW:
        mask = cols < V
        x = tl.load(Logits + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        m2 = tl.where(m == float("-inf"), 0.0, m) * 1.4426950408889634
        e = tl.exp2(x * 1.4426950408889634 - m2)  # 0 on the masked lanes
        s = tl.sum(e, axis=0)
        lse = (m2 + tl.log2(s)) * 0.6931471805599453
        sum_x = tl.sum(tl.where(mask, x, 0.0), axis=0)
        tl.store(Lse + row, lse)
    else:
        m = float("-inf")
        s = 0.0
        acc_x = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(Logits + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # rows that saw only -inf so far keep s = 0 (avoid -inf - -inf = NaN)
            m2 = tl.where(m_new == float("-inf"), 0.0, m_new) * 1.4426950408889634
            s = s * tl.exp2(m * 1.4426950408889634 - m2) + tl.sum(
                tl.exp2(x * 1.4426950408889634 - m2), axis=0)
            m = m_new
            acc_x += tl.where(mask, x, 0.0)
        m2 = tl.where(m == float("-inf"), 0.0, m) * 1.4426950408889634
        lse = (m2 + tl.log2(s)) * 0.6931471805599453
        sum_x = tl.sum(acc_x, axis=0)
        tl.store(Lse + row, lse)
    if WRITE_LOSS:
        x_t = tl.load(Logits + tl.where(in_range, target, 0)).to(tl.float32)
        loss = lse - (1.0 - smoothing) * x_t - smoothing * (sum_x / V)
        loss = tl.where(in_range, loss, float("nan"))
        tl.store(Loss + row, tl.where(ignored, 0.0, loss))
    if WRITE_GRAD:
        Grad += row * stride_g
        dloss = tl.load(DLoss + row * stride_dloss).to(tl.float32)
        dloss = tl.where(ignored, 0.0, dloss)
        base = smoothing / V
        if WHOLE_ROW:
            if HAS_LSE:
                _grad_walk(Logits, Grad, cols, V, target, lse, dloss, base, smoothing, BLOCK_V)
            else:  # from the exponentials in registers: no second read, no second exp
                g = e * (1.0 / s) - base - tl.where(cols == target, 1.0 - smoothing, 0.0)
                tl.store(Grad + cols, (dloss * g).to(Grad.dtype.element_ty), mask=cols < V)
        else:
            _grad_walk(Logits, Grad, cols, V, target, lse, dloss, base, smoothing, BLOCK_V)


def whole_max_v(element_size: int) -> int:
    """The widest row held in registers: fp32 rows stop at half of it (they spill beyond)."""
    return WHOLE_MAX_V if element_size <= 2 else WHOLE_MAX_V // 2


def row_block(vocab: int, element_size: int = 2) -> tuple[int, bool]:
    """(BLOCK_V, whole_row) of this kernel: the whole row up to ``whole_max_v``, else loops
    of MAX_BLOCK_V."""
    block = max(triton.next_power_of_2(vocab), MIN_BLOCK_V)
    return (block, True) if block <= whole_max_v(element_size) else (MAX_BLOCK_V, False)


def block_v(vocab: int) -> int:
    """A row walk's block (the log-probs kernel's): the whole row up to MAX_BLOCK_V, else loops
    of MAX_BLOCK_V. The cross-entropy launcher itself uses ``row_block``."""
    return min(max(triton.next_power_of_2(vocab), MIN_BLOCK_V), MAX_BLOCK_V)


def shipped_blocks() -> list[int]:
    """Every BLOCK_V that ``block_v`` can return."""
    out, b = [], MIN_BLOCK_V
    while b <= MAX_BLOCK_V:
        out.append(b)
        b *= 2
    return out


def _launch(logits2d, target, ignore_index, smoothing, *, loss=None, lse=None, has_lse=False,
            grad=None, dloss=None, block: Optional[int] = None):
    rows, vocab = logits2d.shape
    if block:  # a caller's block: whole when it holds the row
        blk, whole = block, block >= vocab
    else:
        blk, whole = row_block(vocab, logits2d.element_size())
    dummy = lse
    _ce_kernel[(rows,)](
        logits2d, grad if grad is not None else logits2d, target,
        loss if loss is not None else dummy, lse, dloss if dloss is not None else dummy,
        logits2d.stride(0), grad.stride(0) if grad is not None else 0,
        (dloss.stride(0) if dloss.dim() else 0) if dloss is not None else 0,
        vocab, ignore_index, smoothing,
        HAS_LSE=has_lse, WRITE_LOSS=loss is not None, WRITE_GRAD=grad is not None, BLOCK_V=blk,
        WHOLE_ROW=whole, num_warps=warps_for_block(blk))


def cross_entropy_fwd(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                      smoothing: float, block: Optional[int] = None):
    """Per-row loss (fp32, 0 on ignored rows) and lse (fp32) of logits (..., V)."""
    x = as_rows(logits)
    rows = x.shape[0]
    loss = torch.empty(rows, device=x.device, dtype=torch.float32)
    lse = torch.empty(rows, device=x.device, dtype=torch.float32)
    _launch(x, target.reshape(-1), ignore_index, smoothing, loss=loss, lse=lse, block=block)
    return loss, lse


def cross_entropy_bwd(dloss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                      lse: torch.Tensor, ignore_index: int, smoothing: float,
                      block: Optional[int] = None) -> torch.Tensor:
    """dlogits (logits' dtype, contiguous (rows, V)) from the per-row dloss and the saved lse."""
    x = as_rows(logits)
    grad = torch.empty((x.shape[0], x.shape[1]), device=x.device, dtype=x.dtype)
    _launch(x, target.reshape(-1), ignore_index, smoothing, lse=lse.reshape(-1).contiguous(),
            has_lse=True, grad=grad, dloss=dloss.reshape(-1).float().contiguous(), block=block)
    return grad


def cross_entropy_fwd_grad(logits2d: torch.Tensor, target: torch.Tensor, ignore_index: int,
                           smoothing: float, dloss: Optional[torch.Tensor],
                           grad_out: Optional[torch.Tensor], loss: torch.Tensor, lse: torch.Tensor,
                           block: Optional[int] = None):
    """Loss and lse into ``loss``/``lse`` and, when ``grad_out`` is given, the gradient in the
    same launch; ``grad_out`` may be ``logits2d`` itself (in place).

    dloss: float32, either one value per row or a single value (0-dim) for every row.
    """
    _launch(logits2d, target, ignore_index, smoothing, loss=loss, lse=lse, grad=grad_out,
            dloss=dloss, block=block)


def aot_configs(dtypes=("bf16", "fp32")):
    """Every (BLOCK_V, whole row) with its warps the launchers can pick, compiled in the fused
    forward+gradient mode: the forward-only and backward-only launches run a subset of its
    code (no gradient / no lse computation), so they hold no more registers or shared memory.
    Row strides are typed i32 (16-divisible, as the JIT sees rows of a multiple of 16 classes:
    every padded vocabulary), so the compile shows the vector accesses of a real launch."""
    from llmkern.testing import AOTConfig

    for dt in dtypes:
        types = dict(Logits=f"*{dt}", Grad=f"*{dt}", Target="*i64", Loss="*fp32", Lse="*fp32",
                     DLoss="*fp32", stride_l="i32", stride_g="i32", stride_dloss="i32", V="i32",
                     ignore_index="i32", smoothing="fp32")
        blocks, b = [], MIN_BLOCK_V
        while b <= whole_max_v(4 if dt == "fp32" else 2):
            blocks.append((b, True))
            b *= 2
        for blk, whole in blocks + [(MAX_BLOCK_V, False)]:
            yield AOTConfig(_ce_kernel, types,
                            dict(HAS_LSE=False, WRITE_LOSS=True, WRITE_GRAD=True, BLOCK_V=blk,
                                 WHOLE_ROW=whole),
                            warps_for_block(blk),
                            name=f"cross_entropy-fwd_grad-{dt}-{blk}{'' if whole else '-loop'}")
