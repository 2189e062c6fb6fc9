"""Gated MLP (SwiGLU, GeGLU): ``down(act(x @ Wg.T) * (x @ Wu.T))`` (Triton).

Forward: one GEMM computes the gate and up tiles of the same output columns from one load of
``x`` (two accumulators), stores the pre-activations ``gu = [g | u]`` (M, 2F) for the backward
and ``h = act(g) * u`` from the epilogue; the down projection is a plain GEMM. Backward: the
GEMM ``dh = dout @ Wd`` applies the gate's derivative in its epilogue (reading g and u) and
writes ``[dg | du]`` and the recomputed ``h`` (for dWd), so only ``gu`` is kept between the
passes: less than eager, which keeps g, u, act(g) and h. The remaining GEMMs are matmul.py's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkern.backends import interpreter_bf16_reason, triton_interpret

from .matmul import (INTERPRET_CONFIG, _cfg, _m_bucket, _operand, gelu_tanh, gelu_tanh_grad, gemm,
                     grouped_tile, input_precision)

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """act(g) and act'(g) in fp32."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-g))
        return g * s, s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        return gelu_tanh(g), gelu_tanh_grad(g)
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        return gelu_tanh(g)
    else:
        return g * 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))


@triton.jit
def _gated_kernel(A, BG, BU, GU, H, DGU, M, N, K, M_BUCKET,
                  stride_am, stride_ak, stride_bk, stride_bn, stride_um, stride_un,
                  stride_hm, stride_hn, stride_dm, stride_dn,
                  BWD: tl.constexpr, STORE_GU: tl.constexpr, ACT: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Forward (BWD=0): g = A @ BG, u = A @ BU on one tile of columns; stores [g | u] in GU
    # (STORE_GU) and act(g) * u in H. Backward (BWD=1): dh = A @ BG (A = dout, BG = Wd.T); reads
    # g, u from GU; stores [dg | du] in DGU and the recomputed h in H.
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    am = (rm % M).to(tl.int64)
    bn = (rn % N).to(tl.int64)
    a_ptrs = A + am[:, None] * stride_am + rk[None, :] * stride_ak
    b_off = rk[:, None] * stride_bk + bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(BG + b_off, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if not BWD:
            bu = tl.load(BU + b_off, mask=rk[:, None] < k_left, other=0.0)
            acc_u = tl.dot(a, bu, acc_u, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_off += BLOCK_K * stride_bk

    mask = (rm < M)[:, None] & (rn < N)[None, :]
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    g_ptrs = GU + rm64[:, None] * stride_um + rn64[None, :] * stride_un
    u_ptrs = g_ptrs + N * stride_un
    h_ptrs = H + rm64[:, None] * stride_hm + rn64[None, :] * stride_hn
    if BWD:
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
        act, dact = _act_and_grad(g, ACT)
        d_ptrs = DGU + rm64[:, None] * stride_dm + rn64[None, :] * stride_dn
        tl.store(d_ptrs, (acc * u * dact).to(DGU.dtype.element_ty), mask=mask)
        tl.store(d_ptrs + N * stride_dn, (acc * act).to(DGU.dtype.element_ty), mask=mask)
        tl.store(h_ptrs, (act * u).to(H.dtype.element_ty), mask=mask)
    else:
        if STORE_GU:
            tl.store(g_ptrs, acc.to(GU.dtype.element_ty), mask=mask)
            tl.store(u_ptrs, acc_u.to(GU.dtype.element_ty), mask=mask)
        # h from the stored (rounded) g and u, so that the backward recomputes the same h
        g = acc.to(GU.dtype.element_ty).to(tl.float32)
        u = acc_u.to(GU.dtype.element_ty).to(tl.float32)
        tl.store(h_ptrs, (_act(g, ACT) * u).to(H.dtype.element_ty), mask=mask)


# Two accumulators per tile in the forward, and an epilogue that reads g and u and writes three
# tiles in the backward: tiles of at most 128x64 (larger ones spill; checked ahead of time).
CONFIGS = {
    # 64x128 forward with BLOCK_K 64: with 32 it spills under triton 3.6 on sm_80
    ("half", False): [_cfg(128, 64, 64, 8, 4), _cfg(64, 64, 64, 4, 4), _cfg(64, 128, 64, 8, 3)],
    ("half", True): [_cfg(128, 64, 64, 8, 4), _cfg(64, 64, 64, 4, 3), _cfg(64, 128, 32, 8, 3)],
    ("fp32", False): [_cfg(128, 64, 16, 8, 3), _cfg(64, 64, 16, 4, 3)],
    ("fp32", True): [_cfg(128, 64, 16, 8, 3), _cfg(64, 64, 16, 4, 3)],
}


def shipped(dtype: torch.dtype, bwd: bool) -> list:
    """Every config the launcher can pick for the forward or backward gated GEMM."""
    return CONFIGS[("fp32" if dtype == torch.float32 else "half", bwd)]


_KEY = ["M_BUCKET", "N", "K"]
_TUNED = {(dt, bwd): triton.autotune(shipped(dt, bwd), key=_KEY)(_gated_kernel)
          for dt in (torch.float16, torch.float32) for bwd in (False, True)}
_INTERPRETED = triton.autotune([INTERPRET_CONFIG], key=_KEY)(_gated_kernel)


def _launch(a, bg, bu, gu, h, dgu, bwd, store_gu, act):
    reason = interpreter_bf16_reason(a, bg)
    if reason:
        raise RuntimeError(f"gated_mlp: {reason} (x: {a.dtype} {tuple(a.shape)} on {a.device})")
    M, K = a.shape
    N = bg.shape[1]
    if M == 0 or N == 0:
        return
    if K == 0:  # an empty reduction is a zero accumulator
        a, bg, bu, K = a.new_zeros((M, 1)), bg.new_zeros((1, N)), bu.new_zeros((1, N)), 1
    a, bg, bu = _operand(a), _operand(bg), _operand(bu)
    if bg.stride() != bu.stride():
        bg, bu = bg.contiguous(), bu.contiguous()
    if triton_interpret():
        kernel = _INTERPRETED
    else:
        kernel = _TUNED[(torch.float32 if a.dtype == torch.float32 else torch.float16, bwd)]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    d = dgu if dgu is not None else h
    kernel[grid](a, bg, bu, gu, h, d, M, N, K, _m_bucket(M),
                 a.stride(0), a.stride(1), bg.stride(0), bg.stride(1), gu.stride(0), gu.stride(1),
                 h.stride(0), h.stride(1), d.stride(0), d.stride(1),
                 BWD=bwd, STORE_GU=store_gu, ACT=ACTIVATIONS[act],
                 INPUT_PRECISION=input_precision(a.dtype))


def gated_mlp_fwd(x2d, gate_weight, up_weight, down_weight, activation: str, save: bool):
    """(out (M, D), gu (M, 2F) pre-activations, empty unless ``save``)."""
    M, F = x2d.shape[0], gate_weight.shape[0]
    h = torch.empty((M, F), device=x2d.device, dtype=x2d.dtype)
    gu = torch.empty((M, 2 * F) if save else (0, 2), device=x2d.device, dtype=x2d.dtype)
    gu_arg = gu if save else h
    _launch(x2d, gate_weight.t(), up_weight.t(), gu_arg, h, None, False, save, activation)
    return gemm(h, down_weight.t()), gu


def gated_mlp_bwd(dout, x2d, gate_weight, up_weight, down_weight, gu, activation: str):
    """(dx, d gate_weight, d up_weight, d down_weight) from the saved pre-activations."""
    M, F = x2d.shape[0], gate_weight.shape[0]
    dgu = torch.empty((M, 2 * F), device=x2d.device, dtype=x2d.dtype)
    h = torch.empty((M, F), device=x2d.device, dtype=x2d.dtype)
    _launch(dout, down_weight, down_weight, gu, h, dgu, True, False, activation)
    dg, du = dgu[:, :F], dgu[:, F:]
    d_down = gemm(dout.t(), h, out_dtype=down_weight.dtype)
    del h
    dx = gemm(dg, gate_weight, out_dtype=torch.float32)
    dx = gemm(du, up_weight, residual=dx, out=dx)
    d_gate = gemm(dg.t(), x2d, out_dtype=gate_weight.dtype)
    d_up = gemm(du.t(), x2d, out_dtype=up_weight.dtype)
    return dx.to(x2d.dtype), d_gate, d_up, d_down


def aot_configs(dtypes=("bf16", "fp32")):
    """Every (config, direction) compile the launcher can ask for on a GPU."""
    from llmkern.testing import AOTConfig, runtime_types

    for dt in dtypes:
        tdt = torch.float32 if dt == "fp32" else torch.bfloat16
        for bwd in (False, True):
            for i, cfg in enumerate(shipped(tdt, bwd)):
                types = runtime_types(_gated_kernel, dict.fromkeys(
                    ("A", "BG", "BU", "GU", "H", "DGU"), "*" + dt))
                # forward: x (M, K) row-major, weights.T (K, N) with unit stride on K
                ones = ("stride_ak", "stride_bk", "stride_un", "stride_hn", "stride_dn")
                if bwd:  # dout (M, K) row-major, Wd (K=D, N=F) row-major
                    ones = ("stride_ak", "stride_bn", "stride_un", "stride_hn", "stride_dn")
                blocks = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                # every config with silu; the GELU gates (more epilogue registers) on the largest
                for act, code in ACTIVATIONS.items():
                    if code and i:
                        continue
                    consts = dict(BWD=bwd, STORE_GU=not bwd, ACT=code, **cfg.kwargs,
                                  INPUT_PRECISION="ieee" if dt == "fp32" else "tf32")
                    yield AOTConfig(_gated_kernel, types, consts, cfg.num_warps, cfg.num_stages,
                                    name=f"gated-{dt}-{'bwd' if bwd else 'fwd'}-{act}-{blocks}"
                                         f"-w{cfg.num_warps}-s{cfg.num_stages}", ones=ones)
