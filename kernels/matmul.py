"""Tiled GEMM with fused prologues and epilogues (Triton), the engine of linear_gelu and mlp.

``C = A @ B`` with A (M, K) and B (K, N) given as strided views, so ``x @ W.T`` for an
nn.Linear weight W (N, K) is ``gemm(x, W.t())`` without a copy, and the backward GEMMs
(``dpre @ W``, ``dpre.T @ x``) are the same kernel on other views. Accumulation is fp32.

Epilogue (on the fp32 accumulator, before the one store): ``+ bias[n]``, store the
pre-activation, GELU(tanh) or ``* gelu'(pre)`` (the backward of GELU fused into the GEMM that
produces d(hidden)), ``+ residual`` (which may be C itself: in-place fp32 accumulation).
Prologue (on loaded tiles): the row sums of A (bias gradients, deterministic: each row's sum is
owned by the programs of the first column of tiles, no atomics). GELU and GELU' are never
evaluated in a prologue, where each element would be recomputed once per tile of output
columns: the epilogue that forms d(pre) computes both once per element (and ``gelu_backward``
does when d(pre) has no GEMM to ride).
Programs are ordered in groups of GROUP_M rows of tiles so that consecutive programs share
B tiles in L2.

``gemm`` sends calls without a prologue to the persistent TMA kernel of matmul_persistent.py on
sm_90 when their operands suit tensor descriptors (``kernel=`` or LLMKERN_GEMM_KERNEL choose
otherwise); this file's kernel serves the rest. Shared helpers live in matmul_common.py.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from llmkern.backends import interpreter_bf16_reason, triton_interpret

from .matmul_common import (_cfg, _m_bucket, _operand, arch_family, gelu_tanh,  # noqa: F401
                            gelu_tanh_and_grad, gelu_tanh_grad, grouped_tile, input_precision,
                            layout_code, prune_by_smem)

# ---- configs ------------------------------------------------------------------------------
# Bounded lists per arch family and operand dtype, autotuned per (M bucket, N, K, operand
# layout, fusion, dtypes), pruned to the device's shared memory. Kinds:
# "plain": no prologue and at most a bias (the projection GEMM, dX and dW GEMMs, a bare GEMM),
# which can afford 128x256 tiles (a heavier epilogue spills with them); "main": epilogue-fused
# GEMMs (GELU, gelu', pre-activation store, residual / in-place fp32 accumulation); "act": the
# gelu' epilogue that also writes gelu(pre) (two outputs: at most 128x64 tiles, larger ones
# spill); "prologue": GEMMs that sum the rows of their loaded A tiles (bias gradients), which
# hold more registers per K step, hence the shorter BLOCK_K. sm_90 lists favour 128-row tiles
# (one wgmma M of 64 per warpgroup) and 256-wide ones for plain GEMMs (2 consumer warpgroups
# over a 128x256 accumulator); sm_80 lists stay within its 163 KiB of shared memory.
_HALF_MAIN = [_cfg(128, 128, 64, 8, 4), _cfg(128, 64, 64, 8, 4), _cfg(64, 128, 64, 4, 4),
              _cfg(64, 64, 64, 4, 3)]
_HALF_ACT = [_cfg(128, 64, 64, 8, 4), _cfg(64, 64, 64, 4, 3)]
_HALF_PROLOGUE = [_cfg(128, 128, 32, 8, 4), _cfg(128, 64, 32, 4, 4), _cfg(64, 128, 32, 4, 4)]
_FP32_MAIN = [_cfg(128, 128, 32, 8, 3), _cfg(64, 64, 16, 4, 3)]
_FP32_ACT = [_cfg(128, 64, 16, 8, 3), _cfg(64, 64, 16, 4, 3)]
_FP32_PROLOGUE = [_cfg(128, 64, 16, 8, 3), _cfg(64, 64, 32, 8, 3)]
CONFIGS = {
    "sm90": {
        "half": {"plain": _HALF_MAIN + [_cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3)],
                 "main": _HALF_MAIN, "act": _HALF_ACT, "prologue": _HALF_PROLOGUE},
        "fp32": {"plain": _FP32_MAIN, "main": _FP32_MAIN, "act": _FP32_ACT,
                 "prologue": _FP32_PROLOGUE},
    },
    "sm80": {
        "half": {"plain": _HALF_MAIN + [_cfg(128, 256, 64, 8, 3)], "main": _HALF_MAIN,
                 "act": _HALF_ACT, "prologue": _HALF_PROLOGUE},
        "fp32": {"plain": _FP32_MAIN, "main": _FP32_MAIN, "act": _FP32_ACT,
                 "prologue": _FP32_PROLOGUE},
    },
}
KINDS = ("plain", "main", "act", "prologue")
# The CPU interpreter runs one small config (autotuning there would only multiply test time).
INTERPRET_CONFIG = _cfg(64, 64, 32, 4, 1, group=4)


def shipped_configs(dtype: torch.dtype, kind: str, arch: str = "sm90") -> list:
    """Every config the launchers can pick for ``kind`` GEMMs on inputs of ``dtype`` on a GPU of
    the ``arch`` family ('sm90' or 'sm80')."""
    return CONFIGS[arch]["fp32" if dtype == torch.float32 else "half"][kind]


# ---- kernel -------------------------------------------------------------------------------
@triton.jit
def _gemm_kernel(A, B, C, Bias, Pre, Res, RowSum, Act,
                 M, N, K, M_BUCKET, LAYOUT,
                 stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                 stride_pm, stride_pn, stride_rm, stride_rn, stride_hm, stride_hn,
                 HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, EPI: tl.constexpr,
                 STORE_ACT: tl.constexpr,
                 HAS_RES: tl.constexpr, ROWSUM_A: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    # LAYOUT: only a key for the autotuner (the strides carry the layout). EPI: 0 none, 1 gelu_tanh(acc), 2 acc * gelu_tanh'(Pre[m, n]) (and, when STORE_ACT,
    # Act = gelu_tanh(Pre) from the same sigmoid)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows/cols past the edge wrap around (loads stay in bounds without M/N masks, which keeps
    # the loads vectorized); the store is masked. 64-bit offsets: M * stride can pass 2^31.
    am = (rm % M).to(tl.int64)
    bn = (rn % N).to(tl.int64)
    a_ptrs = A + am[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if ROWSUM_A:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    m_in = rm < M
    n_in = rn < N
    mask = m_in[:, None] & n_in[None, :]
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    if ROWSUM_A:
        tl.store(RowSum + rm64, rowsum, mask=m_in & (pid_n == 0))
    if HAS_BIAS:
        acc += tl.load(Bias + rn64, mask=n_in, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        tl.store(Pre + rm64[:, None] * stride_pm + rn64[None, :] * stride_pn,
                 acc.to(Pre.dtype.element_ty), mask=mask)
    if EPI == 1:
        acc = gelu_tanh(acc)
    elif EPI == 2:
        pre = tl.load(Pre + rm64[:, None] * stride_pm + rn64[None, :] * stride_pn, mask=mask, other=0.0)
        if STORE_ACT:
            act, dact = gelu_tanh_and_grad(pre.to(tl.float32))
            tl.store(Act + rm64[:, None] * stride_hm + rn64[None, :] * stride_hn,
                     act.to(Act.dtype.element_ty), mask=mask)
            acc = acc * dact
        else:
            acc = acc * gelu_tanh_grad(pre.to(tl.float32))
    if HAS_RES:
        acc += tl.load(Res + rm64[:, None] * stride_rm + rn64[None, :] * stride_rn, mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(C + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn, acc.to(C.dtype.element_ty),
             mask=mask)


# The autotune key: shape bucket, operand layout (LAYOUT, see layout_code) and every fusion
# flag, so a forward, dX and dW GEMM of the same (M, N, K) tune apart; the autotuner adds the
# dtypes of the tensor arguments.
_KEY = ["M_BUCKET", "N", "K", "LAYOUT", "HAS_BIAS", "STORE_PRE", "EPI", "STORE_ACT", "HAS_RES",
        "ROWSUM_A"]


def tuned(configs: list, kernel=None, **kwargs):
    """The autotuner over ``configs`` with the GEMM key (restore_value: benchmarking reruns the
    kernel, and C must be restored when it accumulates in place)."""
    return triton.autotune(configs, key=_KEY, restore_value=["C"],
                           prune_configs_by={"early_config_prune": prune_by_smem},
                           **kwargs)(kernel or _gemm_kernel)


_TUNED = {(arch, dt, kind): tuned(CONFIGS[arch][dt][kind])
          for arch in CONFIGS for dt in ("half", "fp32") for kind in KINDS}
_INTERPRETED = triton.autotune([INTERPRET_CONFIG], key=_KEY)(_gemm_kernel)


def _kernel_for(dtype: torch.dtype, kind: str):
    if triton_interpret():
        return _INTERPRETED
    arch = arch_family(torch.device("cuda", torch.cuda.current_device()))
    return _TUNED[(arch, "fp32" if dtype == torch.float32 else "half", kind)]


def gemm(a: torch.Tensor, b: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
         activation: Optional[str] = None, pre_out: Optional[torch.Tensor] = None,
         gelu_grad_pre: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
         rowsum_out: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
         out_dtype: Optional[torch.dtype] = None, act_out: Optional[torch.Tensor] = None,
         kernel: Optional[str] = None) -> torch.Tensor:
    """``out = epilogue(a @ b)``; a (M, K), b (K, N) views of any strides.

    bias (N,): added to the accumulator. pre_out (M, N): receives acc + bias before the
    activation. activation: None or 'gelu' (tanh). gelu_grad_pre (M, N): multiply by
    gelu'(gelu_grad_pre) instead, and act_out (M, N), if given, receives gelu(gelu_grad_pre)
    (the activation the backward's dW GEMM needs, from the same sigmoid). residual (M, N): added last; may be ``out`` itself.
    rowsum_out (M,) float32: receives the row sums of a (on the tiled kernel).
    kernel: 'auto' (default), 'persistent' (matmul_persistent.py's TMA kernel, also under the
    interpreter; no row sums; 16-bit operands on a GPU; operands with a unit stride and
    16-byte aligned rows; a ValueError otherwise) or 'tiled' (this file's kernel). 'auto' takes
    the persistent kernel on sm_90 when it can serve the call. Without the argument,
    LLMKERN_GEMM_KERNEL chooses; there 'persistent' means wherever it can serve the call.
    """
    M, K = a.shape
    K2, N = b.shape
    if K != K2:
        raise ValueError(f"gemm: inner dims differ: a {tuple(a.shape)}, b {tuple(b.shape)}")
    if activation not in (None, "gelu"):
        raise ValueError(f"gemm: activation must be None or 'gelu', got {activation!r}")
    reason = interpreter_bf16_reason(a, b)
    if reason:  # refuse rather than return garbage
        raise RuntimeError(f"gemm: {reason} (a: {a.dtype} {tuple(a.shape)}, b: {b.dtype} "
                           f"{tuple(b.shape)} on {a.device}); use fp16/fp32 or a GPU")
    a, b = _operand(a), _operand(b)
    if out is None:
        out = torch.empty((M, N), device=a.device, dtype=out_dtype or a.dtype)
    if M == 0 or N == 0:
        return out
    if K == 0:  # empty reduction: the epilogue on a zero accumulator
        a = a.new_zeros((M, 1))
        b = b.new_zeros((1, N))
        K = 1
    epi = 1 if activation == "gelu" else 0
    if gelu_grad_pre is not None:
        epi = 2
    elif act_out is not None:
        raise ValueError("gemm: act_out (gelu of the pre-activation) needs gelu_grad_pre")
    pre = pre_out if pre_out is not None else gelu_grad_pre
    prologue = rowsum_out is not None
    choice = gemm_kernel_choice(kernel)
    if choice != "tiled" and not prologue:
        from .matmul_persistent import persistent_gemm, persistent_reason

        reason = persistent_reason(a, b)
        if reason is None and (choice == "persistent" or arch_family(a.device) == "sm90"):
            return persistent_gemm(a, b, out, bias=bias, activation=activation, pre_out=pre_out,
                                   gelu_grad_pre=gelu_grad_pre, residual=residual,
                                   act_out=act_out)
        if kernel is not None and choice == "persistent":
            raise ValueError(f"gemm: kernel='persistent' cannot serve a {tuple(a.shape)} "
                             f"{a.dtype}, b {tuple(b.shape)} {b.dtype}: {reason}")
    elif kernel is not None and choice == "persistent":
        raise ValueError("gemm: kernel='persistent' computes no row sums (rowsum_out): use "
                         "kernel='tiled' or 'auto'")
    dummy = out
    if prologue:
        kind = "prologue"
    elif act_out is not None:
        kind = "act"
    elif epi or pre_out is not None or residual is not None:
        kind = "main"
    else:
        kind = "plain"
    launch = _kernel_for(a.dtype, kind)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch[grid](
        a, b, out, bias if bias is not None else dummy, pre if pre is not None else dummy,
        residual if residual is not None else dummy,
        rowsum_out if rowsum_out is not None else dummy, act_out if act_out is not None else dummy,
        M, N, K, _m_bucket(M), layout_code(a, b),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        pre.stride(0) if pre is not None else 0, pre.stride(1) if pre is not None else 0,
        residual.stride(0) if residual is not None else 0,
        residual.stride(1) if residual is not None else 0,
        act_out.stride(0) if act_out is not None else 0,
        act_out.stride(1) if act_out is not None else 0,
        HAS_BIAS=bias is not None, STORE_PRE=pre_out is not None, EPI=epi,
        STORE_ACT=act_out is not None,
        HAS_RES=residual is not None, ROWSUM_A=rowsum_out is not None, INPUT_PRECISION=input_precision(a.dtype),
    )
    return out


KERNEL_ENV = "LLMKERN_GEMM_KERNEL"
KERNEL_CHOICES = ("auto", "persistent", "tiled")


def gemm_kernel_choice(kernel: Optional[str] = None) -> str:
    """The GEMM kernel asked for: the argument, else LLMKERN_GEMM_KERNEL, else 'auto'."""
    choice = (kernel if kernel is not None else os.environ.get(KERNEL_ENV, "auto")).strip().lower()
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"gemm: kernel (or {KERNEL_ENV}) must be one of {KERNEL_CHOICES}, "
                         f"got {choice!r}")
    return choice


def linear(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None, store_pre: bool = False,
           residual: Optional[torch.Tensor] = None):
    """``act(x2d @ weight.T + bias) (+ residual)``; returns y, or (y, pre) when store_pre."""
    M, N = x2d.shape[0], weight.shape[0]
    pre = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype) if store_pre else None
    y = gemm(x2d, weight.t(), bias=bias, activation=activation, pre_out=pre, residual=residual)
    return (y, pre) if store_pre else y


@triton.jit
def _gelu_backward_kernel(DY, Pre, Out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    pre = tl.load(Pre + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + offs, (dy * gelu_tanh_grad(pre)).to(Out.dtype.element_ty), mask=mask)


GELU_BWD_BLOCK, GELU_BWD_WARPS = 2048, 8  # 8 elements a thread: 16-byte accesses in 16-bit types


def gelu_backward(dy: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``dy * gelu'(pre)`` (tanh GELU), elementwise in fp32, in dy's dtype: d(pre) formed once,
    for GEMMs that have no epilogue to form it in (linear_gelu's backward)."""
    if dy.shape != pre.shape:
        raise ValueError(f"gelu_backward: dy {tuple(dy.shape)} and pre {tuple(pre.shape)} differ")
    reason = interpreter_bf16_reason(dy, pre)
    if reason:
        raise RuntimeError(f"gelu_backward: {reason} (dy: {dy.dtype} {tuple(dy.shape)})")
    dy, pre = dy.contiguous(), pre.contiguous()
    out = torch.empty_like(dy)
    n = dy.numel()
    if n:
        _gelu_backward_kernel[(triton.cdiv(n, GELU_BWD_BLOCK),)](
            dy, pre, out, n, BLOCK=GELU_BWD_BLOCK, num_warps=GELU_BWD_WARPS)
    return out


# ---- ahead-of-time compile list (llmkern.testing.aot_reports compiles each for sm_80 and sm_90) ------
# Each variant is a fusion the launchers use, with the operand layout of its launch: the int
# arguments listed are 1 there (unit strides), which the JIT turns into constants. Lighter
# fusions (bias only, residual, plain, row sums alone) share the main loop of one listed here
# and hold fewer registers in the epilogue/prologue.
AOT_VARIANTS = {
    "fwd_gelu_pre": ("main", dict(HAS_BIAS=True, STORE_PRE=True, EPI=1),
                     ("stride_ak", "stride_bk", "stride_cn", "stride_pn"), None),
    "epi_gelu_grad_act": ("act", dict(EPI=2, STORE_ACT=True),
                          ("stride_ak", "stride_bn", "stride_cn", "stride_pn", "stride_hn"), None),
    "acc_fp32": ("main", dict(HAS_RES=True), ("stride_am", "stride_bn", "stride_cn", "stride_rn"), "fp32"),
    "rowsum_tn": ("prologue", dict(ROWSUM_A=True), ("stride_am", "stride_bn", "stride_cn"), None),
    # plain GEMMs: only the configs that the plain kind adds (the others are compiled above
    # with heavier epilogues)
    "plain_bias_nt": ("plain", dict(HAS_BIAS=True), ("stride_ak", "stride_bk", "stride_cn"), None),
    "plain_nn": ("plain", dict(), ("stride_ak", "stride_bn", "stride_cn"), None),
}
_FLAGS_OFF = dict(HAS_BIAS=False, STORE_PRE=False, EPI=0, STORE_ACT=False, HAS_RES=False,
                  ROWSUM_A=False)


def aot_configs(dtypes=("bf16", "fp32"), arch: int = 90):
    """Every (config, fusion) compile the launchers can ask for on a GPU of ``arch`` (fp16
    compiles like bf16; fp32 with IEEE products, as by default)."""
    from llmkern.testing import AOTConfig, runtime_types

    family = "sm90" if arch == 90 else "sm80"

    kernel = _gemm_kernel
    for dt in dtypes:
        tdt = torch.float32 if dt == "fp32" else torch.bfloat16
        for variant, (kind, flags, ones, c_dt) in AOT_VARIANTS.items():
            if variant == "acc_fp32" and dt == "fp32":
                continue  # same as fwd_gelu_pre's main loop with a lighter epilogue
            configs = shipped_configs(tdt, kind, family)
            if kind == "plain":
                configs = [c for c in configs if c not in shipped_configs(tdt, "main", family)]
            for cfg in configs:
                named = dict.fromkeys(("A", "B", "C", "Bias", "Pre", "Res", "Act"), "*" + dt)
                named["RowSum"] = "*fp32"
                if c_dt:
                    named["C"] = named["Res"] = "*" + c_dt
                types = runtime_types(kernel, named)
                consts = dict(_FLAGS_OFF, **flags, **cfg.kwargs,
                              INPUT_PRECISION="ieee" if dt == "fp32" else "tf32")
                blocks = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                yield AOTConfig(kernel, types, consts, cfg.num_warps, cfg.num_stages,
                                name=f"gemm-{dt}-{variant}-{blocks}-w{cfg.num_warps}-s{cfg.num_stages}",
                                ones=tuple(ones))
        yield AOTConfig(_gelu_backward_kernel, {"DY": "*" + dt, "Pre": "*" + dt, "Out": "*" + dt,
                                                "n": "i64"}, {"BLOCK": GELU_BWD_BLOCK},
                        GELU_BWD_WARPS, 1, name=f"gelu_backward-{dt}")
