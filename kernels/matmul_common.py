"""What both GEMM kernels (matmul.py's tiled one, matmul_persistent.py's TMA one) share: the
GELU(tanh) helpers, the grouped tile order, config records, shared-memory pruning, and the
operand checks of their launchers."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).
# Constants below: sqrt(2/pi) = 0.79788456..., 2 * log2(e) = 2.88539008..., 3 * 0.044715.


@triton.jit
def gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) == x * sigmoid(2u): one exp2, no tanh (not in every Triton/libdevice).
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp2(-2.8853900817779268 * u))


@triton.jit
def gelu_tanh_grad(x):
    # d/dx [x * s], s = sigmoid(2u): s + 2 x s (1 - s) u'(x), u' = c (1 + 3 * 0.044715 x^2)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    s = 1.0 / (1.0 + tl.exp2(-2.8853900817779268 * u))
    du = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    return s + 2.0 * x * s * (1.0 - s) * du


@triton.jit
def gelu_tanh_and_grad(x):
    """(gelu(x), gelu'(x)) from one sigmoid: the activation costs one multiply more."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    s = 1.0 / (1.0 + tl.exp2(-2.8853900817779268 * u))
    du = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    return x * s, s + 2.0 * x * s * (1.0 - s) * du


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The (M tile, N tile) of program ``pid``: GROUP_M row tiles sweep the N tiles together, so
    the B tiles they share stay in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


def _cfg(bm, bn, bk, warps, stages, group=8, **extra):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, **extra},
                         num_warps=warps, num_stages=stages)


def smem_bytes(cfg: triton.Config, element_size: int) -> int:
    """Shared memory the pipelined A and B tiles of ``cfg`` take (the epilogue reuses it)."""
    kw = cfg.kwargs
    return cfg.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * element_size


def fitting(configs: list, element_size: int, limit: int) -> list:
    """The configs whose tiles fit ``limit`` bytes of shared memory (the smallest if none)."""
    kept = [c for c in configs if smem_bytes(c, element_size) <= limit]
    return kept or [min(configs, key=lambda c: smem_bytes(c, element_size))]


@functools.lru_cache(maxsize=None)
def _smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024


def prune_by_smem(configs, named_args, **kwargs):
    """``early_config_prune`` for the GEMM autotuners: drop the configs over the device's
    shared-memory limit (per block, opt-in), so one list serves every GPU of an arch family."""
    a = named_args["A"]
    if not isinstance(a, torch.Tensor) or a.device.type != "cuda":
        return configs
    return fitting(configs, a.element_size(), _smem_limit(a.device.index or 0))


def arch_family(device: torch.device) -> str:
    """'sm90' (Hopper: wgmma and TMA) or 'sm80' (every other GPU, and the interpreter)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return "sm90"
    return "sm80"


def input_precision(dtype: torch.dtype) -> str:
    """fp32 operands at fp32 accuracy unless torch allows TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _operand(t: torch.Tensor) -> torch.Tensor:
    """A 2-D operand with a unit stride on one dim (either layout is fine), else a copy."""
    if t.stride(-1) == 1 or t.stride(-2) == 1:
        return t
    return t.contiguous()


def _m_bucket(m: int) -> int:
    return triton.next_power_of_2(max(m, 16))


def layout_code(a: torch.Tensor, b: torch.Tensor) -> int:
    """Operand layout for the autotune keys: bit 0 set when A (M, K) is column-major (a
    transposed view, as dY^T in dW = dY^T X), bit 1 when B (K, N) is (W^T of an nn.Linear
    weight, as in a forward GEMM)."""
    return int(a.stride(1) != 1) | (int(b.stride(1) != 1) << 1)
