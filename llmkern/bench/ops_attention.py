"""Attention: llmkern against PyTorch SDPA's flash, memory-efficient and cuDNN backends.

GPU cases follow flash-attention's own benchmark: 16k tokens per batch, model
width 2048 (32 heads of 64 or 16 heads of 128), Sq = Sk from 512 to 16k, causal and not, bf16.

Rows name the kernels ``llmkern-triton`` ran (``triton_fwd_kernel``, ``triton_bwd_kernel``), and
two more providers pin the backward, so that one run compares the backward kernels on sm_90:
``llmkern-triton-5gemm`` (5 GEMMs, dQ summed in key-block order, deterministic) and
``llmkern-triton-5gemm-atomic`` (5 GEMMs, fp32 atomic dQ), both after the triton forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import llmkern
from llmkern.bench.core import Case, OpSpec, Provider, RunConfig, Unsupported
from llmkern.bench.flops import attention_flops
from llmkern.bench.providers import (_llmkern_available, default_dtype, llmkern_providers, randn,
                                     sdpa_providers, torch_provider)

TOKENS, WIDTH = 16384, 2048
MATH_MAX_SCORES = 2**30  # the eager (math) backend materialises B*H*Sq*Sk scores: cap it


def _grid(cfg: RunConfig) -> list:
    """(head_dim, seq, causal) triples."""
    if cfg.device.type == "cuda":
        if cfg.quick:
            return [(128, 8192, False), (128, 8192, True)]  # the moonshot's case, and causal
        return [(d, s, c) for d in (64, 128) for s in (512, 1024, 2048, 4096, 8192, 16384)
                for c in (False, True)]
    if cfg.quick:
        return [(32, 128, True)]
    return [(d, s, c) for d in (32, 64) for s in (64, 200) for c in (False, True)]


def _cases(cfg: RunConfig) -> list:
    from llmkern.kernels.attention_hopper import backward_kernel, served_by

    dtype = default_dtype(cfg)
    kernel = served_by(cfg.device).split()[0]  # the triton forward: hopper or flash
    major = torch.cuda.get_device_capability(cfg.device)[0] if cfg.device.type == "cuda" else None
    bwd_kernel = backward_kernel(major, deterministic=True)
    cases = []
    for head_dim, seq, causal in _grid(cfg):
        if cfg.device.type == "cuda":
            batch, heads = max(1, TOKENS // seq), WIDTH // head_dim
        else:
            batch, heads = 1, 2

        def make(device, requires_grad, b=batch, h=heads, s=seq, d=head_dim):
            return {name: randn((b, h, s, d), device, dtype, requires_grad) for name in "qkv"}

        label = f"B={batch} H={heads} S={seq} D={head_dim}{' causal' if causal else ''}"
        params = {"B": batch, "H": heads, "S": seq, "D": head_dim, "causal": causal,
                  "triton_fwd_kernel": kernel, "triton_bwd_kernel": bwd_kernel}
        cases.append(Case(label, params, dtype, make,
                          lambda mode, b=batch, h=heads, s=seq, d=head_dim, c=causal:
                          attention_flops(b, h, s, s, d, c, mode)))
    return cases


def _eager_math(case: Case, cfg: RunConfig):
    """PyTorch's math backend: the unfused reference, only where its score matrix is reasonable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    p = case.params
    scores = p["B"] * p["H"] * p["S"] * p["S"]
    if cfg.device.type == "cuda" and scores > MATH_MAX_SCORES:
        raise Unsupported(f"skipped: the math backend materialises {scores / 2**30:.1f} Gi scores "
                          f"(limit {MATH_MAX_SCORES / 2**30:.0f} Gi)")

    def fn(i):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(i["q"], i["k"], i["v"], is_causal=p["causal"])
    return fn


def _oracle(i, case):
    # fp32 through SDPA's default dispatch (memory-efficient on a GPU): never materialises S x S
    return F.scaled_dot_product_attention(i["q"].float(), i["k"].float(), i["v"].float(),
                                          is_causal=case.params["causal"])


def _llmkern(i, case, backend):
    return llmkern.attention(i["q"], i["k"], i["v"], causal=case.params["causal"], backend=backend)


class _PinnedBackward(torch.autograd.Function):
    """The triton forward, then the 5-GEMM backward whatever the selection table says."""

    @staticmethod
    def forward(ctx, q, k, v, opts):
        from llmkern.kernels.attention_hopper import attention_fwd

        out, lse = attention_fwd(q, k, v, None, opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.opts = opts
        return out

    @staticmethod
    def backward(ctx, dout):
        from llmkern.kernels.attention_hopper_bwd import hopper_backward
        from llmkern.kernels.attention_options import AttentionShape

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = hopper_backward(dout.contiguous(), q, k, v, out, lse, None,
                                     AttentionShape.dense(q, k), ctx.opts)
        return dq, dk, dv, None


def _pinned_5gemm(name: str, deterministic: bool) -> Provider:
    def build(case: Case, cfg: RunConfig):
        from llmkern.kernels.attention_hopper import hopper_reason
        from llmkern.kernels.attention_options import AttentionOptions

        if cfg.device.type == "cuda" and torch.cuda.get_device_capability(cfg.device)[0] != 9:
            raise Unsupported("the 5-GEMM backward needs an sm_90 GPU (TMA)")
        d = case.params["D"]
        opts = AttentionOptions(d ** -0.5, causal=case.params["causal"],
                                deterministic=deterministic)

        def fn(i):
            reason = hopper_reason(i["q"], i["k"], i["v"], None, opts)
            if reason:
                raise Unsupported(f"the 5-GEMM backward cannot serve this case: {reason}")
            return _PinnedBackward.apply(i["q"], i["k"], i["v"], opts)
        return fn

    return Provider(name, build, role="subject", available=_llmkern_available("triton"))


ATTENTION = OpSpec(
    "attention", "TFLOP/s", _cases,
    llmkern_providers(_llmkern)
    + [_pinned_5gemm("llmkern-triton-5gemm", True),
       _pinned_5gemm("llmkern-triton-5gemm-atomic", False)]
    + sdpa_providers() + [torch_provider(_eager_math)],
    oracle=_oracle, description="attention (B, H, S, D), Sq = Sk")

SPECS = [ATTENTION]
