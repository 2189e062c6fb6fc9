"""LayerNorm and RMSNorm over the last dim, forward and backward (Triton).

One kernel family serves both norms (``IS_RMS`` drops the mean and the bias). Statistics are
fp32. Rows up to ``FWD_MAX_BLOCK`` / ``BWD_MAX_BLOCK`` elements live in registers; longer rows
loop over chunks. Weight/bias gradients are deterministic: each program sums its own rows into
a private fp32 partial row, and the partials are summed afterwards (no float atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import LOOP_BLOCK, as_rows, persistent_programs, row_block, warps_for_block

FWD_MAX_BLOCK = 16384
BWD_MAX_BLOCK = 4096
# Columns per program of the long-row backward (rows are split over programs as well).
BWD_COL_BLOCK = 1024


@triton.jit
def _norm_fwd_kernel(X, Y, W, B, Mean, Rstd, stride_x, stride_y, N, eps,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     BLOCK_N: tl.constexpr, WHOLE_ROW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    cols = tl.arange(0, BLOCK_N)
    mean = 0.0
    if WHOLE_ROW:
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if not IS_RMS:
            mean = tl.sum(x, axis=0) / N
            x = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        y = x * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        if not IS_RMS:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                acc += tl.load(X + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)
            mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.where(mask, x - mean, 0.0)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            y = (tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not IS_RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _load_chunk(X, DY, W, cols, mask, mean, rstd, HAS_W: tl.constexpr):
    """x_hat, dy and w*dy of one chunk of a row, in fp32."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    wdy = dy
    if HAS_W:
        wdy = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return xhat, dy, wdy


@triton.jit
def _dx_chunk(xhat, wdy, rstd, c1, c2, IS_RMS: tl.constexpr):
    """dx = rstd * (w*dy - (x_hat * c1 + c2)), with c1 = mean(x_hat*w*dy), c2 = mean(w*dy)."""
    if IS_RMS:
        return (wdy - xhat * c1) * rstd
    return (wdy - (xhat * c1 + c2)) * rstd


@triton.jit
def _norm_bwd_whole_row_kernel(X, DY, DX, W, Mean, Rstd, DW_part, DB_part,
                               stride_x, stride_dy, stride_dx, M, N, rows_per_program,
                               IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first_row = pid.to(tl.int64) * rows_per_program
    for i in range(0, tl.minimum(rows_per_program, M - first_row)):
        row64 = first_row + i
        mean = 0.0
        if not IS_RMS:
            mean = tl.load(Mean + row64)
        rstd = tl.load(Rstd + row64)
        xhat, dy, wdy = _load_chunk(X + row64 * stride_x, DY + row64 * stride_dy, W, cols, mask,
                                    mean, rstd, HAS_W)
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dx = _dx_chunk(xhat, wdy, rstd, c1, c2, IS_RMS)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += dy * xhat
        if HAS_B:
            db += dy
    if HAS_W:
        tl.store(DW_part + pid * N + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB_part + pid * N + cols, db, mask=mask)


@triton.jit
def _norm_bwd_row_sums_kernel(X, DY, W, Mean, Rstd, C1, C2, stride_x, stride_dy, N,
                              IS_RMS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """Long rows, step 1: the row sums c1, c2 of the dx formula."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mean = 0.0
    if not IS_RMS:
        mean = tl.load(Mean + row)
    rstd = tl.load(Rstd + row)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        xhat, dy, wdy = _load_chunk(X + row * stride_x + start, DY + row * stride_dy + start,
                                    W + start, cols, start + cols < N, mean, rstd, HAS_W)
        acc1 += xhat * wdy
        acc2 += wdy
    tl.store(C1 + row, tl.sum(acc1, axis=0) / N)
    tl.store(C2 + row, tl.sum(acc2, axis=0) / N)


@triton.jit
def _norm_bwd_cols_kernel(X, DY, DX, W, Mean, Rstd, C1, C2, DW_part, DB_part,
                          stride_x, stride_dy, stride_dx, M, N, rows_per_program,
                          IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """Long rows, step 2: dx and the weight/bias partials of one column block, over a row group."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first_row = pid.to(tl.int64) * rows_per_program
    for i in range(0, tl.minimum(rows_per_program, M - first_row)):
        row64 = first_row + i
        mean = 0.0
        if not IS_RMS:
            mean = tl.load(Mean + row64)
        rstd = tl.load(Rstd + row64)
        xhat, dy, wdy = _load_chunk(X + row64 * stride_x, DY + row64 * stride_dy, W, cols, mask,
                                    mean, rstd, HAS_W)
        dx = _dx_chunk(xhat, wdy, rstd, tl.load(C1 + row64), tl.load(C2 + row64), IS_RMS)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += dy * xhat
        if HAS_B:
            db += dy
    if HAS_W:
        tl.store(DW_part + pid * N + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB_part + pid * N + cols, db, mask=mask)


def norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             eps: float, rms: bool):
    """Returns (y shaped like x, mean (rows,) fp32 or None for RMS, rstd (rows,) fp32)."""
    x2 = as_rows(x)
    m, n = x2.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    mean = None if rms else torch.empty(m, dtype=torch.float32, device=x.device)
    block, whole = row_block(n, FWD_MAX_BLOCK)
    _norm_fwd_kernel[(m,)](
        x2, y, weight, bias, mean, rstd, x2.stride(0), y.stride(0), n, eps,
        IS_RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_N=block, WHOLE_ROW=whole, num_warps=warps_for_block(block))
    return y.view(x.shape), mean, rstd


def norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], has_bias: bool,
             mean: Optional[torch.Tensor], rstd: torch.Tensor, rms: bool):
    """Returns (dx shaped like x, dweight fp32 or None, dbias fp32 or None)."""
    x2, dy2 = as_rows(x), as_rows(dy)
    m, n = x2.shape
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    programs = min(persistent_programs(x.device, per_sm=2), m)  # fewer partial rows to sum
    rows_per_program = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows_per_program)
    has_w = weight is not None
    dw_part = torch.empty((programs, n), dtype=torch.float32, device=x.device) if has_w else None
    db_part = torch.empty((programs, n), dtype=torch.float32, device=x.device) if has_bias else None
    block, whole = row_block(n, BWD_MAX_BLOCK)
    flags = dict(IS_RMS=rms, HAS_W=has_w, HAS_B=has_bias)
    if whole:
        _norm_bwd_whole_row_kernel[(programs,)](
            x2, dy2, dx, weight, mean, rstd, dw_part, db_part,
            x2.stride(0), dy2.stride(0), dx.stride(0), m, n, rows_per_program,
            BLOCK_N=block, num_warps=warps_for_block(block), **flags)
    else:
        c1 = torch.empty(m, dtype=torch.float32, device=x.device)
        c2 = torch.empty(m, dtype=torch.float32, device=x.device)
        _norm_bwd_row_sums_kernel[(m,)](
            x2, dy2, weight, mean, rstd, c1, c2, x2.stride(0), dy2.stride(0), n,
            IS_RMS=rms, HAS_W=has_w, BLOCK_N=block, num_warps=warps_for_block(block))
        _norm_bwd_cols_kernel[(programs, triton.cdiv(n, BWD_COL_BLOCK))](
            x2, dy2, dx, weight, mean, rstd, c1, c2, dw_part, db_part,
            x2.stride(0), dy2.stride(0), dx.stride(0), m, n, rows_per_program,
            BLOCK_N=BWD_COL_BLOCK, num_warps=warps_for_block(BWD_COL_BLOCK), **flags)
    dw = dw_part.sum(0) if has_w else None
    db = db_part.sum(0) if has_bias else None
    return dx.view(x.shape), dw, db


def aot_configs():
    """Every compile the launchers above can ask for (fp32 and bf16; fp16 compiles like bf16)."""
    from llmkern.testing import AOTConfig

    from ._utils import row_blocks

    for dt in ("fp32", "bf16"):
        for rms in (False, True):
            flags = dict(IS_RMS=rms, HAS_W=True, HAS_B=not rms)
            tag = f"{'rms' if rms else 'ln'}-{dt}"
            io = {"X": f"*{dt}", "W": f"*{dt}", "Mean": "*fp32", "Rstd": "*fp32"}
            for block, whole in row_blocks(FWD_MAX_BLOCK):
                yield AOTConfig(_norm_fwd_kernel,
                                dict(io, Y=f"*{dt}", B=f"*{dt}", stride_x="i64", stride_y="i64",
                                     N="i32", eps="fp32"),
                                dict(flags, BLOCK_N=block, WHOLE_ROW=whole),
                                warps_for_block(block), name=f"norm_fwd-{tag}-{block}-{whole}")
            bwd = dict(io, DY=f"*{dt}", DX=f"*{dt}", DW_part="*fp32", DB_part="*fp32",
                       stride_x="i64", stride_dy="i64", stride_dx="i64", M="i32", N="i32",
                       rows_per_program="i32")
            for block, whole in row_blocks(BWD_MAX_BLOCK):
                if whole:
                    yield AOTConfig(_norm_bwd_whole_row_kernel, bwd, dict(flags, BLOCK_N=block),
                                    warps_for_block(block), name=f"norm_bwd-{tag}-{block}")
            yield AOTConfig(_norm_bwd_row_sums_kernel,
                            dict(io, DY=f"*{dt}", C1="*fp32", C2="*fp32", stride_x="i64",
                                 stride_dy="i64", N="i32"),
                            dict(IS_RMS=rms, HAS_W=True, BLOCK_N=LOOP_BLOCK),
                            warps_for_block(LOOP_BLOCK), name=f"norm_bwd_row_sums-{tag}")
            yield AOTConfig(_norm_bwd_cols_kernel, dict(bwd, C1="*fp32", C2="*fp32"),
                            dict(flags, BLOCK_N=BWD_COL_BLOCK), warps_for_block(BWD_COL_BLOCK),
                            name=f"norm_bwd_cols-{tag}")
