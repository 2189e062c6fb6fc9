"""Persistent GEMM for Hopper (sm_90), Triton: TMA-fed tiles, a warp-specialized tile loop and a
subtiled epilogue, for the GEMMs of matmul.py that have no prologue fusion.

- One program per SM (``grid = min(SMs, tiles)``); each walks the output tiles ``pid``,
  ``pid + programs``, ... in matmul.py's grouped order (GROUP_M rows of tiles sweep the columns
  together, so the B tiles they share stay in L2), which saves the launch and tail effects of
  one program per tile and lets the next tile's loads overlap this tile's epilogue.
- A and B move through device-side tensor descriptors (TMA, ``cp.async.bulk.tensor``): either
  layout of each operand is served by a descriptor over its row-major storage (a transposed
  view is loaded as the transpose of a tile of the storage), and the copy engine zero-fills
  rows and K columns past the edge, so no masks on the loads.
- The tile loop is ``tl.range(..., warp_specialize=True)`` where the installed Triton has it: a
  producer warp issues the TMA loads while the consumer warpgroups run wgmma.
- The epilogue (bias, pre-activation store, GELU or ``* gelu'(pre)`` with ``gelu(pre)`` written
  alongside, residual / in-place fp32 accumulation) runs on halves of the accumulator when
  EPI_SPLIT is 2 (a 128x256 tile stored as two 128x128 ones: half the epilogue registers) and
  stores through pointers, so any output strides and odd N work.
Device-side descriptors need ``triton.set_allocator`` on a GPU (installed by the launcher).
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import triton
import triton.language as tl

from llmkern.backends import triton_interpret

from ._utils import persistent_programs
from .attention_hopper import ensure_allocator
from .matmul_common import (_cfg, _m_bucket, gelu_tanh, gelu_tanh_and_grad, gelu_tanh_grad,
                            grouped_tile, input_precision, layout_code, prune_by_smem)


@functools.lru_cache(maxsize=None)
def warp_specialize_supported() -> bool:
    """Whether the installed Triton's ``tl.range`` takes ``warp_specialize`` (3.4 on)."""
    return "warp_specialize" in inspect.signature(tl.range.__init__).parameters


@triton.jit
def _epilogue(acc, rm, rn, M, N, C, Bias, Pre, Res, Act, stride_cm, stride_cn, stride_pm,
              stride_pn, stride_rm, stride_rn, stride_hm, stride_hn,
              HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, EPI: tl.constexpr,
              STORE_ACT: tl.constexpr, HAS_RES: tl.constexpr):
    n_in = rn < N
    mask = (rm < M)[:, None] & n_in[None, :]
    rm64 = rm.to(tl.int64)[:, None]
    rn64 = rn.to(tl.int64)[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_in, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        tl.store(Pre + rm64 * stride_pm + rn64 * stride_pn, acc.to(Pre.dtype.element_ty), mask=mask)
    if EPI == 1:
        acc = gelu_tanh(acc)
    elif EPI == 2:
        pre = tl.load(Pre + rm64 * stride_pm + rn64 * stride_pn, mask=mask, other=0.0).to(tl.float32)
        if STORE_ACT:
            act, dact = gelu_tanh_and_grad(pre)
            tl.store(Act + rm64 * stride_hm + rn64 * stride_hn, act.to(Act.dtype.element_ty),
                     mask=mask)
            acc = acc * dact
        else:
            acc = acc * gelu_tanh_grad(pre)
    if HAS_RES:
        acc += tl.load(Res + rm64 * stride_rm + rn64 * stride_rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(C + rm64 * stride_cm + rn64 * stride_cn, acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _persistent_gemm_kernel(A, B, C, Bias, Pre, Res, Act, M, N, K, M_BUCKET, LAYOUT, NUM_PROGS,
                            stride_a, stride_b, stride_cm, stride_cn, stride_pm, stride_pn,
                            stride_rm, stride_rn, stride_hm, stride_hn,
                            A_T: tl.constexpr, B_T: tl.constexpr, HAS_BIAS: tl.constexpr,
                            STORE_PRE: tl.constexpr, EPI: tl.constexpr, STORE_ACT: tl.constexpr,
                            HAS_RES: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, EPI_SPLIT: tl.constexpr,
                            WARP_SPEC: tl.constexpr, FLATTEN: tl.constexpr):
    # A (M, K) is stored row-major (stride_a = its row stride) or, A_T, column-major (stored
    # as its (K, M) transpose, stride_a = that one's row stride); likewise B (K, N), whose B_T
    # storage is (N, K): the nn.Linear weight of a forward GEMM. EPI as in matmul.py.
    if A_T:
        a_desc = tl.make_tensor_descriptor(A, [K, M], [stride_a, 1], [BLOCK_K, BLOCK_M])
    else:
        a_desc = tl.make_tensor_descriptor(A, [M, K], [stride_a, 1], [BLOCK_M, BLOCK_K])
    # The B tile is loaded and multiplied as EPI_SPLIT column slabs with one accumulator each,
    # so that the epilogue works on one slab at a time (no reshape of the accumulator, which
    # the warp-specialization pass of triton 3.6 rejects).
    HALF_N: tl.constexpr = BLOCK_N // EPI_SPLIT
    if B_T:
        b_desc = tl.make_tensor_descriptor(B, [N, K], [stride_b, 1], [HALF_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(B, [K, N], [stride_b, 1], [BLOCK_K, HALF_N])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=FLATTEN,
                         warp_specialize=WARP_SPEC):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc0 = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
        if EPI_SPLIT == 2:
            acc1 = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            if A_T:
                a = a_desc.load([off_k, off_m]).T
            else:
                a = a_desc.load([off_m, off_k])
            if B_T:
                b0 = b_desc.load([off_n, off_k]).T
            else:
                b0 = b_desc.load([off_k, off_n])
            acc0 = tl.dot(a, b0, acc0, input_precision=INPUT_PRECISION)
            if EPI_SPLIT == 2:
                if B_T:
                    b1 = b_desc.load([off_n + HALF_N, off_k]).T
                else:
                    b1 = b_desc.load([off_k, off_n + HALF_N])
                acc1 = tl.dot(a, b1, acc1, input_precision=INPUT_PRECISION)
        rm = off_m + tl.arange(0, BLOCK_M)
        _epilogue(acc0, rm, off_n + tl.arange(0, HALF_N), M, N, C, Bias, Pre, Res, Act,
                  stride_cm, stride_cn, stride_pm, stride_pn, stride_rm, stride_rn,
                  stride_hm, stride_hn, HAS_BIAS, STORE_PRE, EPI, STORE_ACT, HAS_RES)
        if EPI_SPLIT == 2:
            _epilogue(acc1, rm, off_n + HALF_N + tl.arange(0, HALF_N), M, N, C, Bias, Pre, Res,
                      Act, stride_cm, stride_cn, stride_pm, stride_pn, stride_rm, stride_rn,
                      stride_hm, stride_hn, HAS_BIAS, STORE_PRE, EPI, STORE_ACT, HAS_RES)


# ---- configs ------------------------------------------------------------------------------
# sm_90, 16-bit operands; 4 warps per consumer warpgroup, as the warp-specialized loop splits
# the rows of the tile between two consumer warpgroups (wgmma M = 64 each) next to the TMA
# producer (8 warps there leave the loop unspecialized, and spill). "light": bias / GELU /
# residual epilogues and plain GEMMs, 128x256 tiles (two 128x128 accumulators, stored one after
# the other) plus 128x128 for grids smaller than the SMs; "heavy": the gelu' epilogue, which
# reads pre and may write gelu(pre) alongside, and fp32 outputs (in-place fp32 accumulation):
# a 128x256 tile spills there, so 128x128 at most.
# Each compiles for sm_90 with wgmma, TMA and setmaxnreg, no spills, under triton 3.6 and 3.8.
CONFIGS = {
    "light": [_cfg(128, 256, 64, 4, 3, EPI_SPLIT=2), _cfg(128, 128, 64, 4, 4, EPI_SPLIT=2)],
    "heavy": [_cfg(128, 128, 64, 4, 4, EPI_SPLIT=2), _cfg(128, 64, 64, 4, 4, EPI_SPLIT=1)],
}
INTERPRET_CONFIG = _cfg(32, 64, 32, 4, 1, group=2, EPI_SPLIT=2)
_KEY = ["M_BUCKET", "N", "K", "LAYOUT", "HAS_BIAS", "STORE_PRE", "EPI", "STORE_ACT", "HAS_RES"]
_TUNED = {kind: triton.autotune(cfgs, key=_KEY, restore_value=["C"],
                                prune_configs_by={"early_config_prune": prune_by_smem}
                                )(_persistent_gemm_kernel) for kind, cfgs in CONFIGS.items()}
_INTERPRETED = triton.autotune([INTERPRET_CONFIG], key=_KEY)(_persistent_gemm_kernel)


def _descriptor_reason(t: torch.Tensor, name: str) -> Optional[str]:
    size = t.element_size()
    if t.stride(1) != 1 and t.stride(0) != 1:
        return f"{name} {tuple(t.shape)} has no unit stride"
    lead = t.stride(0) if t.stride(1) == 1 else t.stride(1)
    if t.data_ptr() % 16 or (lead * size) % 16:
        return (f"{name} {tuple(t.shape)} strides {t.stride()} {t.dtype}: rows not 16-byte "
                "aligned (TMA)")
    return None


def persistent_reason(a: torch.Tensor, b: torch.Tensor) -> Optional[str]:
    """Why the persistent kernel cannot take ``a @ b``, or None."""
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32) or b.dtype != a.dtype:
        return f"dtypes {a.dtype}, {b.dtype}"
    if a.dtype == torch.float32 and a.is_cuda:
        return "fp32 has no tensor-core path here (the tiled kernel serves it)"
    if a.device.type != "cuda" and not triton_interpret():
        return f"device {a.device}"
    return _descriptor_reason(a, "a") or _descriptor_reason(b, "b")


def _kernel(heavy: bool):
    if triton_interpret():
        return _INTERPRETED
    return _TUNED["heavy" if heavy else "light"]


def persistent_gemm(a, b, out, *, bias=None, activation=None, pre_out=None, gelu_grad_pre=None,
                    residual=None, act_out=None) -> torch.Tensor:
    """matmul.gemm's epilogue fusions on the persistent kernel (the caller checked
    ``persistent_reason`` and the arguments; K >= 1, M and N >= 1)."""
    M, K = a.shape
    N = b.shape[1]
    a_t, b_t = a.stride(1) != 1, b.stride(1) != 1
    epi = 2 if gelu_grad_pre is not None else (1 if activation == "gelu" else 0)
    pre = pre_out if pre_out is not None else gelu_grad_pre
    dummy = out
    kernel = _kernel(epi == 2 or out.dtype == torch.float32)
    programs = persistent_programs(a.device, per_sm=1)  # one per SM (a few in the interpreter)
    grid = lambda meta: (min(programs, triton.cdiv(M, meta["BLOCK_M"]) *  # noqa: E731
                             triton.cdiv(N, meta["BLOCK_N"])),)
    ensure_allocator(a.device)
    ws = warp_specialize_supported()

    def strides(t):
        return (t.stride(0), t.stride(1)) if t is not None else (0, 0)

    kernel[grid](
        a, b, out, bias if bias is not None else dummy, pre if pre is not None else dummy,
        residual if residual is not None else dummy, act_out if act_out is not None else dummy,
        M, N, K, _m_bucket(M), layout_code(a, b), programs,
        a.stride(1) if a_t else a.stride(0), b.stride(1) if b_t else b.stride(0),
        *strides(out), *strides(pre), *strides(residual), *strides(act_out),
        A_T=a_t, B_T=b_t, HAS_BIAS=bias is not None, STORE_PRE=pre_out is not None, EPI=epi,
        STORE_ACT=act_out is not None, HAS_RES=residual is not None,
        INPUT_PRECISION=input_precision(a.dtype), WARP_SPEC=ws, FLATTEN=not ws,
    )
    return out


# ---- ahead-of-time compile list ----------------------------------------------------------
# (config kind, fusion flags, A_T, B_T, C and residual dtype): the launches of linear_gelu, mlp,
# the gated MLPs and the LM-head losses on sm_90.
AOT_VARIANTS = {
    "fwd_bias_gelu_pre": ("light", dict(HAS_BIAS=True, STORE_PRE=True, EPI=1), False, True, None),
    "fwd_bias_residual": ("light", dict(HAS_BIAS=True, HAS_RES=True), False, True, None),
    "dx_nn": ("light", dict(), False, False, None),
    "dw_tn": ("light", dict(), True, False, None),
    "acc_fp32_tn": ("heavy", dict(HAS_RES=True), True, False, "fp32"),
    "dpre_gelu_grad_act": ("heavy", dict(EPI=2, STORE_ACT=True), False, False, None),
}
_FLAGS_OFF = dict(HAS_BIAS=False, STORE_PRE=False, EPI=0, STORE_ACT=False, HAS_RES=False)


def aot_configs(dtypes=("bf16",), arch: int = 90):
    """Every compile the launcher can ask for on sm_90 (16-bit operands only; fp16 compiles
    like bf16). Other archs take matmul.py's kernel: nothing to compile."""
    from llmkern.testing import AOTConfig, runtime_types

    if arch != 90:
        return
    ws = warp_specialize_supported()
    for dt in dtypes:
        for variant, (kind, flags, a_t, b_t, c_dt) in AOT_VARIANTS.items():
            for cfg in CONFIGS[kind]:
                named = dict.fromkeys(("A", "B", "C", "Bias", "Pre", "Res", "Act"), "*" + dt)
                if c_dt:
                    named["C"] = named["Res"] = "*" + c_dt
                types = runtime_types(_persistent_gemm_kernel, named)
                consts = dict(_FLAGS_OFF, **flags, **cfg.kwargs, A_T=a_t, B_T=b_t,
                              INPUT_PRECISION="tf32", WARP_SPEC=ws, FLATTEN=not ws)
                blocks = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                yield AOTConfig(_persistent_gemm_kernel, types, consts, cfg.num_warps,
                                cfg.num_stages, name=f"pgemm-{dt}-{variant}-{blocks}-w{cfg.num_warps}"
                                f"-s{cfg.num_stages}", ones=("stride_cn", "stride_pn", "stride_rn",
                                                             "stride_hn"))
