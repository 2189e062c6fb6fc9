"""LayerNorm and RMSNorm over the last dim, optionally fused with the residual add (Triton).

One kernel family serves both norms (``IS_RMS`` drops the mean and the bias). With a residual
the forward reads x and r, writes h = x + r (the new residual stream, rounded to x's dtype as an
eager add would be) and normalizes h; the backward adds the gradient of h to dx, which is then
the gradient of both x and r. Statistics are fp32.

Rows up to ``FWD_MAX_BLOCK`` / ``BWD_MAX_BLOCK`` elements are read once: a program takes
``BLOCK_M`` rows at a time (several for short rows, so a program moves about ``TILE`` elements)
and loads the weight and bias once, outside its row loop. Longer rows loop over chunks.
Weight/bias gradients are deterministic: each backward program sums its own rows into a
private fp32 partial row, and the partials are summed afterwards (no float atomics). The
one-pass backward, whose programs walk row groups, loads the next group's x and dy before
reducing the current one (tiles of up to ``PREFETCH_MAX_TILE`` elements): software pipelining by
hand, kept in that order by Triton 3.6 and 3.8 alike (the PTX loop body holds only the next
group's loads, issued ahead of its shuffles), where ``tl.range(num_stages=2)`` would stage the
loads through shared memory (cp.async) with an extra copy. The forward runs one tile per program
(many programs in flight) and has no row loop to pipeline; nor has the long-row column kernel
registers to spare for a second chunk.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import LOOP_BLOCK, as_rows, persistent_programs, row_block, row_blocks, warps_for_block

FWD_MAX_BLOCK = 16384
BWD_MAX_BLOCK = 16384
# Elements a program holds per step: short rows are packed BLOCK_M to a tile of this size.
TILE = 4096
MAX_ROWS = 16
# Wider rows keep the backward's weight/bias sums in memory rather than in registers.
REG_PARTIALS_MAX_BLOCK = 8192
# Columns per program of the long-row backward (rows are split over programs as well).
BWD_COL_BLOCK = 1024
# Widest tile (BLOCK_M * BLOCK_N) whose backward loads the next row group ahead: a second
# 8192-element tile spills (1024-thread programs, 64 registers a thread).
PREFETCH_MAX_TILE = 4096


def bwd_max_block(element_size: int) -> int:
    """Widest row of the one-pass backward: fp32 rows of 16384 spill (x, dy, x_hat at 32
    registers each per thread), so fp32 stops at 8192 and the wider rows take the two-kernel
    path."""
    return BWD_MAX_BLOCK if element_size <= 2 else BWD_MAX_BLOCK // 2


def tile_warps(block_m: int, block_n: int) -> int:
    """Warps of a whole-row program: ``warps_for_block``, but at most 16 for the widest rows,
    whose 1024-thread programs would be capped at 64 registers a thread and spill."""
    warps = warps_for_block(block_m * block_n)
    return min(warps, 16) if block_n > REG_PARTIALS_MAX_BLOCK else warps


def rows_per_tile(block_n: int) -> int:
    """BLOCK_M for rows of ``block_n`` columns: 1 for long rows, up to ``MAX_ROWS`` for short."""
    return max(1, min(MAX_ROWS, TILE // block_n))


@triton.jit
def _load_rows(X, R, H, rows, cols, mask, stride_x, stride_r, stride_h,
               HAS_RES: tl.constexpr, STORE_H: tl.constexpr):
    """x (or h = x + r, stored when ``STORE_H``) of a (rows, cols) tile, in fp32."""
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + rows * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
        if STORE_H:
            tl.store(H + rows * stride_h + cols, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _norm_fwd_kernel(X, R, H, Y, W, B, Mean, Rstd, stride_x, stride_r, stride_y, M, N, eps,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whole rows, BLOCK_M of them per program. H and Y are fresh (rows, N) with stride_y."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row_ok = rows < M
    mask = row_ok[:, None] & col_ok[None, :]
    x = _load_rows(X, R, H, rows[:, None], cols[None, :], mask, stride_x, stride_r, stride_y,
                   HAS_RES, True)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    if not IS_RMS:
        mean = tl.sum(x, axis=1) / N
        x = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if not IS_RMS:
        tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _norm_fwd_loop_kernel(X, R, H, Y, W, B, Mean, Rstd, stride_x, stride_r, stride_y, N, eps,
                          IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows longer than one block: statistics passes, then the output pass, over chunks."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    R += row * stride_r
    H += row * stride_y
    Y += row * stride_y
    cols = tl.arange(0, BLOCK_N)
    mean = 0.0
    if not IS_RMS:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            acc += _load_rows(X, R, H, 0, start + cols, start + cols < N, 0, 0, 0, HAS_RES, True)
        mean = tl.sum(acc, axis=0) / N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        # h is rebuilt from x and r (the same rounding) rather than read back mid-kernel.
        x = _load_rows(X, R, H, 0, start + cols, mask, 0, 0, 0, HAS_RES, IS_RMS)
        x = tl.where(mask, x - mean, 0.0)
        acc += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        y = (_load_rows(X, R, H, 0, start + cols, mask, 0, 0, 0, HAS_RES, False) - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not IS_RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _dx_chunk(xhat, wdy, rstd, c1, c2, IS_RMS: tl.constexpr):
    """dx = rstd * (w*dy - (x_hat * c1 + c2)), with c1 = mean(x_hat*w*dy), c2 = mean(w*dy)."""
    if IS_RMS:
        return (wdy - xhat * c1) * rstd
    return (wdy - (xhat * c1 + c2)) * rstd


@triton.jit
def _load_group(X, DY, Mean, Rstd, rows, cols, row_ok, col_ok, stride_x, stride_dy,
                IS_RMS: tl.constexpr):
    """x, dy (their dtype), mean and rstd (fp32) of a (rows, cols) group; zeros where masked."""
    mask = row_ok[:, None] & col_ok[None, :]
    mean = tl.zeros(rows.shape, dtype=tl.float32)
    if not IS_RMS:
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    return x, dy, mean, rstd


@triton.jit
def _norm_bwd_kernel(X, DY, DH, DX, W, Mean, Rstd, DW_part, DB_part,
                     stride_x, stride_dy, stride_dh, stride_dx, M, N, rows_per_program,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PARTIALS_IN_MEMORY: tl.constexpr, PREFETCH: tl.constexpr):
    """Whole rows in one pass: each program walks its ``rows_per_program`` rows (a multiple of
    BLOCK_M) BLOCK_M at a time, with the weight loaded once; dx (+ dh) and partial dw/db."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    if HAS_W and not PARTIALS_IN_MEMORY:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first_row = pid.to(tl.int64) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, M)
    # Software pipelining by hand (PREFETCH): the next row group's x, dy and statistics are
    # loaded before this group's reductions, so their latency hides behind the arithmetic. Tiles
    # of over PREFETCH_MAX_TILE elements have no registers for a second one (they would spill).
    rows = first_row + tl.arange(0, BLOCK_M)
    x_n, dy_n, mean_n, rstd_n = _load_group(X, DY, Mean, Rstd, rows, cols, rows < last_row, col_ok,
                                            stride_x, stride_dy, IS_RMS)
    for start in range(first_row, last_row, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < last_row
        mask = row_ok[:, None] & col_ok[None, :]
        if not PREFETCH:
            x, dy, mean, rstd = _load_group(X, DY, Mean, Rstd, rows, cols, row_ok, col_ok,
                                            stride_x, stride_dy, IS_RMS)
        else:
            x, dy, mean, rstd = x_n, dy_n, mean_n, rstd_n
            nxt = rows + BLOCK_M
            x_n, dy_n, mean_n, rstd_n = _load_group(X, DY, Mean, Rstd, nxt, cols, nxt < last_row,
                                                    col_ok, stride_x, stride_dy, IS_RMS)
        dy = dy.to(tl.float32)
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W and PARTIALS_IN_MEMORY:  # from L1/L2 each row: no registers to spare
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        if PARTIALS_IN_MEMORY:
            # The program's own zeroed partial rows (L2-resident) hold the sums: a long row
            # leaves no registers for two fp32 accumulators of its width. Done before dx so
            # that dy is dead by then.
            if HAS_W:
                p = DW_part + pid * N + cols
                tl.store(p, tl.load(p, mask=col_ok, other=0.0) + tl.sum(dy * xhat, axis=0),
                         mask=col_ok)
            if HAS_B:
                p = DB_part + pid * N + cols
                tl.store(p, tl.load(p, mask=col_ok, other=0.0) + tl.sum(dy, axis=0), mask=col_ok)
            # x, dy and w again (from L1/L2) rather than kept live across the sums
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
            xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            wdy = dy.to(tl.float32)
            if HAS_W:
                wdy = wdy * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        dx = _dx_chunk(xhat, wdy, rstd[:, None], c1[:, None], c2[:, None], IS_RMS)
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        if not PARTIALS_IN_MEMORY:
            if HAS_W:
                dw += tl.sum(dy * xhat, axis=0)
            if HAS_B:
                db += tl.sum(dy, axis=0)
    if not PARTIALS_IN_MEMORY:
        if HAS_W:
            tl.store(DW_part + pid * N + cols, dw, mask=col_ok)
        if HAS_B:
            tl.store(DB_part + pid * N + cols, db, mask=col_ok)


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
def _norm_bwd_cols_kernel(X, DY, DH, DX, W, Mean, Rstd, C1, C2, DW_part, DB_part,
                          stride_x, stride_dy, stride_dh, stride_dx, M, N, rows_per_program,
                          IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          HAS_DH: tl.constexpr, BLOCK_N: tl.constexpr):
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
        if HAS_DH:
            dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
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
             eps: float, rms: bool, residual: Optional[torch.Tensor] = None):
    """Returns (y shaped like x, mean (rows,) fp32 or None for RMS, rstd (rows,) fp32, h):
    ``h`` = x + residual shaped like x (what y normalizes), or None without a residual."""
    x2 = as_rows(x)
    m, n = x2.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    mean = None if rms else torch.empty(m, dtype=torch.float32, device=x.device)
    has_res = residual is not None
    r2 = as_rows(residual) if has_res else x2
    h = torch.empty((m, n), dtype=x.dtype, device=x.device) if has_res else None
    block, whole = row_block(n, FWD_MAX_BLOCK)
    flags = dict(IS_RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=has_res)
    # Without a residual, r and h are never touched: x and y stand in for them.
    args = (x2, r2, h if has_res else y, y, weight, bias, mean, rstd, x2.stride(0), r2.stride(0),
            y.stride(0))
    if whole:
        block_m = rows_per_tile(block)
        _norm_fwd_kernel[(triton.cdiv(m, block_m),)](
            *args, m, n, eps, BLOCK_M=block_m, BLOCK_N=block,
            num_warps=tile_warps(block_m, block), **flags)
    else:
        _norm_fwd_loop_kernel[(m,)](*args, n, eps, BLOCK_N=block,
                                    num_warps=warps_for_block(block), **flags)
    return y.view(x.shape), mean, rstd, (h.view(x.shape) if has_res else None)


def norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], has_bias: bool,
             mean: Optional[torch.Tensor], rstd: torch.Tensor, rms: bool,
             dh: Optional[torch.Tensor] = None):
    """Returns (dx shaped like x, dweight fp32 or None, dbias fp32 or None). ``x`` is what the
    forward normalized (h with a residual); ``dh``, the gradient of h, is added to dx."""
    x2, dy2 = as_rows(x), as_rows(dy)
    m, n = x2.shape
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    has_dh = dh is not None
    dh2 = as_rows(dh) if has_dh else dy2
    block, whole = row_block(n, bwd_max_block(x.element_size()))
    block_m = rows_per_tile(block) if whole else 1
    programs = min(persistent_programs(x.device, per_sm=2), triton.cdiv(m, block_m))
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    programs = triton.cdiv(m, rows_per_program)
    has_w = weight is not None
    in_memory = whole and block > REG_PARTIALS_MAX_BLOCK
    alloc = torch.zeros if in_memory else torch.empty
    dw_part = alloc((programs, n), dtype=torch.float32, device=x.device) if has_w else None
    db_part = alloc((programs, n), dtype=torch.float32, device=x.device) if has_bias else None
    flags = dict(IS_RMS=rms, HAS_W=has_w, HAS_B=has_bias, HAS_DH=has_dh)
    strides = (x2.stride(0), dy2.stride(0), dh2.stride(0), dx.stride(0))
    if whole:
        _norm_bwd_kernel[(programs,)](
            x2, dy2, dh2, dx, weight, mean, rstd, dw_part, db_part, *strides, m, n,
            rows_per_program, BLOCK_M=block_m, BLOCK_N=block, PARTIALS_IN_MEMORY=in_memory,
            PREFETCH=block_m * block <= PREFETCH_MAX_TILE, num_warps=tile_warps(block_m, block),
            **flags)
    else:
        c1 = torch.empty(m, dtype=torch.float32, device=x.device)
        c2 = torch.empty(m, dtype=torch.float32, device=x.device)
        _norm_bwd_row_sums_kernel[(m,)](
            x2, dy2, weight, mean, rstd, c1, c2, x2.stride(0), dy2.stride(0), n,
            IS_RMS=rms, HAS_W=has_w, BLOCK_N=block, num_warps=warps_for_block(block))
        _norm_bwd_cols_kernel[(programs, triton.cdiv(n, BWD_COL_BLOCK))](
            x2, dy2, dh2, dx, weight, mean, rstd, c1, c2, dw_part, db_part, *strides, m, n,
            rows_per_program, BLOCK_N=BWD_COL_BLOCK, num_warps=warps_for_block(BWD_COL_BLOCK),
            **flags)
    dw = dw_part.sum(0) if has_w else None
    db = db_part.sum(0) if has_bias else None
    return dx.view(x.shape), dw, db


def aot_configs():
    """Every compile the launchers above can ask for (fp32 and bf16; fp16 compiles like bf16).

    Row strides are typed i32 and so taken as 16-divisible, as the JIT sees the strides of rows
    whose width is a multiple of 16 (every model width): the compile then shows the vector
    loads a real launch gets.
    """
    from llmkern.testing import AOTConfig

    for dt in ("fp32", "bf16"):
        for rms in (False, True):
            for res in (False, True):
                flags = dict(IS_RMS=rms, HAS_W=True, HAS_B=not rms)
                tag = f"{'rms' if rms else 'ln'}{'-res' if res else ''}-{dt}"
                io = {"X": f"*{dt}", "W": f"*{dt}", "Mean": "*fp32", "Rstd": "*fp32"}
                fwd = dict(io, R=f"*{dt}", H=f"*{dt}", Y=f"*{dt}", B=f"*{dt}", stride_x="i32",
                           stride_r="i32", stride_y="i32", N="i32", eps="fp32")
                bwd = dict(io, DY=f"*{dt}", DH=f"*{dt}", DX=f"*{dt}", DW_part="*fp32",
                           DB_part="*fp32", stride_x="i32", stride_dy="i32", stride_dh="i32",
                           stride_dx="i32", M="i32", N="i32", rows_per_program="i32")
                for block, whole in row_blocks(FWD_MAX_BLOCK):
                    bm = rows_per_tile(block) if whole else 1
                    if whole:
                        one_pass_bwd = block <= bwd_max_block(4 if dt == "fp32" else 2)
                        yield AOTConfig(_norm_fwd_kernel, dict(fwd, M="i32"),
                                        dict(flags, HAS_RES=res, BLOCK_M=bm, BLOCK_N=block),
                                        tile_warps(bm, block),
                                        name=f"norm_fwd-{tag}-{bm}x{block}")
                        if one_pass_bwd:
                            yield AOTConfig(_norm_bwd_kernel, bwd,
                                            dict(flags, HAS_DH=res, BLOCK_M=bm, BLOCK_N=block,
                                                 PARTIALS_IN_MEMORY=block > REG_PARTIALS_MAX_BLOCK,
                                                 PREFETCH=bm * block <= PREFETCH_MAX_TILE),
                                            tile_warps(bm, block),
                                            name=f"norm_bwd-{tag}-{bm}x{block}")
                    else:
                        yield AOTConfig(_norm_fwd_loop_kernel, fwd,
                                        dict(flags, HAS_RES=res, BLOCK_N=block),
                                        warps_for_block(block), name=f"norm_fwd_loop-{tag}")
                yield AOTConfig(_norm_bwd_cols_kernel, dict(bwd, C1="*fp32", C2="*fp32"),
                                dict(flags, HAS_DH=res, BLOCK_N=BWD_COL_BLOCK),
                                warps_for_block(BWD_COL_BLOCK), name=f"norm_bwd_cols-{tag}")
            yield AOTConfig(_norm_bwd_row_sums_kernel,
                            dict(io, DY=f"*{dt}", C1="*fp32", C2="*fp32", stride_x="i32",
                                 stride_dy="i32", N="i32"),
                            dict(IS_RMS=rms, HAS_W=True, BLOCK_N=LOOP_BLOCK),
                            warps_for_block(LOOP_BLOCK), name=f"norm_bwd_row_sums-{tag}")
