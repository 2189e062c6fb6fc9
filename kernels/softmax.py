"""Softmax over the last dim with a fused scale and optional causal mask (Triton).

Rows are those of a (..., Sq, Sk) tensor flattened to (rows, Sk); with ``causal`` row r is
query r % Sq and sees keys j <= r % Sq + Sk - Sq (bottom-right aligned); without it the kernel
gets Sq = 1, which makes every key visible. A row that sees no
key is all zeros. Rows up to ``MAX_BLOCK`` live in registers, read once and written once (short
rows several to a program); longer rows use an online (running max) pass and a write pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import as_rows, row_block, warps_for_block

MAX_BLOCK = 16384
# Elements a program holds: short rows are packed BLOCK_M (at most MAX_ROWS) to a program.
TILE = 4096
MAX_ROWS = 16
LOG2E = 1.4426950408889634


@triton.jit
def _softmax_fwd_kernel(X, Y, stride_x, stride_y, M, N, SQ, scale_log2e,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WHOLE_ROW: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    if WHOLE_ROW:  # BLOCK_M rows per program
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        last = (rows % SQ) + N - SQ  # the last key each row sees; N - 1 when not causal (SQ = 1)
        in_row = (rows < M)[:, None] & (cols < N)[None, :]
        visible = in_row & (cols[None, :] <= last[:, None])
        # Loaded under the row mask, not the causal one: a per-element mask forbids vector loads.
        s = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=in_row,
                    other=float("-inf")).to(tl.float32) * scale_log2e
        s = tl.where(visible, s, float("-inf"))
        m = tl.max(s, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)  # a row that sees no key: avoid -inf - -inf
        e = tl.where(visible, tl.exp2(s - m[:, None]), 0.0)
        inv = 1.0 / tl.maximum(tl.sum(e, axis=1), 1e-30)
        tl.store(Y + rows[:, None] * stride_y + cols[None, :],
                 (e * inv[:, None]).to(Y.dtype.element_ty), mask=in_row)
    else:
        # Per-lane running max and sum, merged at the end (one read of the row).
        row = tl.program_id(0).to(tl.int64)
        X += row * stride_x
        Y += row * stride_y
        last = (row % SQ) + N - SQ
        m_lane = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        d_lane = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            visible = (start + cols < N) & (start + cols <= last)
            s = tl.load(X + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)
            s = tl.where(visible, s * scale_log2e, float("-inf"))
            m_new = tl.maximum(m_lane, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            d_lane = d_lane * tl.exp2(m_lane - m_safe) + tl.exp2(s - m_safe)
            m_lane = m_new
        m = tl.max(m_lane, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        denom = tl.sum(d_lane * tl.exp2(m_lane - m_safe), axis=0)
        inv = 1.0 / tl.maximum(denom, 1e-30)
        for start in range(0, N, BLOCK_N):
            in_row = start + cols < N
            visible = in_row & (start + cols <= last)
            s = tl.load(X + start + cols, mask=in_row, other=0.0).to(tl.float32) * scale_log2e
            y = tl.where(visible, tl.exp2(s - m_safe) * inv, 0.0)
            tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=in_row)


@triton.jit
def _softmax_bwd_kernel(DY, Y, DX, stride_dy, stride_y, stride_dx, M, N, scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WHOLE_ROW: tl.constexpr):
    """dx = scale * y * (dy - sum(y * dy)); masked entries have y = 0 and so dx = 0."""
    cols = tl.arange(0, BLOCK_N)
    if WHOLE_ROW:  # BLOCK_M rows per program
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        y, dy = y.to(tl.float32), dy.to(tl.float32)
        dot = tl.sum(y * dy, axis=1)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :],
                 (scale * y * (dy - dot[:, None])).to(DX.dtype.element_ty), mask=mask)
    else:
        row = tl.program_id(0).to(tl.int64)
        DY += row * stride_dy
        Y += row * stride_y
        DX += row * stride_dx
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            y = tl.load(Y + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += y * tl.load(DY + start + cols, mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(acc, axis=0)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            y = tl.load(Y + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + start + cols, (scale * y * (dy - dot)).to(DX.dtype.element_ty), mask=mask)


def _grid(m: int, block: int, whole: bool) -> tuple[int, int]:
    """(BLOCK_M, programs): short rows go several to a program (about ``TILE`` elements)."""
    block_m = max(1, min(MAX_ROWS, TILE // block)) if whole else 1
    return block_m, triton.cdiv(m, block_m)


def softmax_fwd(x: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    x2 = as_rows(x)
    m, n = x2.shape
    sq = x.shape[-2] if causal else 1
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block, whole = row_block(n, MAX_BLOCK)
    block_m, programs = _grid(m, block, whole)
    _softmax_fwd_kernel[(programs,)](x2, y, x2.stride(0), y.stride(0), m, n, sq, scale * LOG2E,
                                     BLOCK_M=block_m, BLOCK_N=block, WHOLE_ROW=whole,
                                     num_warps=warps_for_block(block_m * block))
    return y.view(x.shape)


def softmax_bwd(dy: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    dy2, y2 = as_rows(dy), as_rows(y)
    m, n = y2.shape
    dx = torch.empty((m, n), dtype=y.dtype, device=y.device)
    block, whole = row_block(n, MAX_BLOCK)
    block_m, programs = _grid(m, block, whole)
    _softmax_bwd_kernel[(programs,)](dy2, y2, dx, dy2.stride(0), y2.stride(0), dx.stride(0), m,
                                     n, scale, BLOCK_M=block_m, BLOCK_N=block, WHOLE_ROW=whole,
                                     num_warps=warps_for_block(block_m * block))
    return dx.view(y.shape)


def aot_configs():
    """Every compile the launchers above can ask for (fp32 and bf16; fp16 compiles like bf16).
    Row strides are typed i32 (16-divisible, as the JIT sees rows of a multiple of 16), so the
    compile shows the vector accesses of a real launch."""
    from llmkern.testing import AOTConfig

    from ._utils import row_blocks

    for dt in ("fp32", "bf16"):
        for block, whole in row_blocks(MAX_BLOCK):
            bm = max(1, min(MAX_ROWS, TILE // block)) if whole else 1
            yield AOTConfig(_softmax_fwd_kernel,
                            dict(X=f"*{dt}", Y=f"*{dt}", stride_x="i32", stride_y="i32",
                                 M="i32", N="i32", SQ="i32", scale_log2e="fp32"),
                            dict(BLOCK_M=bm, BLOCK_N=block, WHOLE_ROW=whole),
                            warps_for_block(bm * block), name=f"softmax_fwd-{dt}-{bm}x{block}")
            yield AOTConfig(_softmax_bwd_kernel,
                            dict(DY=f"*{dt}", Y=f"*{dt}", DX=f"*{dt}", stride_dy="i32",
                                 stride_y="i32", stride_dx="i32", M="i32", N="i32",
                                 scale="fp32"),
                            dict(BLOCK_M=bm, BLOCK_N=block, WHOLE_ROW=whole),
                            warps_for_block(bm * block), name=f"softmax_bwd-{dt}-{bm}x{block}")
