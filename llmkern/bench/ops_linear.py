"""GEMM-bound ops: the bare GEMM, linear+bias+GELU, and the GPT-2 MLP (TFLOP/s).

Shapes are GPT-2 124M (768 -> 3072) and 1.5B (1600 -> 6400) at 8192 and 16384 tokens, plus
square GEMMs of 4096^3 and 8192^3 (the GEMM target's sizes). 'cublas-gemm' is the bare cuBLAS product without
any epilogue: the floor a fused epilogue should match. The bare GEMM also runs the Triton GEMM
pinned to its persistent TMA kernel (sm_90) and to its tiled one, side by side.
"""
from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F

import llmkern
from llmkern import reference
from llmkern.bench.core import Case, OpSpec, Provider, RunConfig, Unsupported
from llmkern.bench.flops import gemm_flops, mlp_flops
from llmkern.bench.providers import (_llmkern_available, compile_provider, default_dtype,
                                     llmkern_providers, randn, torch_provider)

GPT2 = {"124M": (768, 3072), "1.5B": (1600, 6400)}


def _linear_shapes(cfg: RunConfig) -> list:
    """(label, tokens, hidden, ffn)."""
    if cfg.device.type == "cuda":
        if cfg.quick:
            return [("124M", 8192, 768, 3072)]
        return [(name, t, h, f) for name, (h, f) in GPT2.items() for t in (8192, 16384)]
    if cfg.quick:
        return [("tiny", 64, 64, 256)]
    return [("tiny", 64, 64, 256), ("odd", 130, 96, 200)]


def _gemm_shapes(cfg: RunConfig) -> list:
    """(M, N, K) for x (M, K) @ W^T with W (N, K)."""
    if cfg.device.type == "cuda":
        if cfg.quick:
            return [(4096, 4096, 4096)]
        return [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 3072, 768), (16384, 768, 3072),
                (16384, 6400, 1600), (16384, 1600, 6400)]
    return [(128, 128, 128)] if cfg.quick else [(128, 128, 128), (130, 200, 96)]


def _weight(shape, device, dtype, requires_grad):
    return randn(shape, device, dtype, requires_grad, 1.0 / math.sqrt(shape[-1]))


# ---- bare GEMM ---------------------------------------------------------------------------

def _gemm_cases(cfg: RunConfig) -> list:
    dtype = default_dtype(cfg)
    cases = []
    for m, n, k in _gemm_shapes(cfg):
        def make(device, requires_grad, m=m, n=n, k=k):
            return {"x": randn((m, k), device, dtype, requires_grad),
                    "weight": _weight((n, k), device, dtype, requires_grad)}
        cases.append(Case(f"M={m} N={n} K={k}", {"M": m, "N": n, "K": k}, dtype, make,
                          lambda mode, m=m, n=n, k=k: gemm_flops(m, n, k, mode), modes=("fwd",)))
    return cases


def _triton_gemm():
    """The Triton GEMM launcher of kernels/matmul.py or kernels/mlp.py, x @ W^T, whichever exists."""
    for public in ("linear", "matmul"):
        fn = getattr(llmkern, public, None)
        if callable(fn):
            return lambda x, w: fn(x, w, backend="triton")
    for module in ("llmkern.kernels.matmul", "llmkern.kernels.mlp"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name in ("linear", "matmul_nt", "linear_fwd", "gemm", "matmul"):
            fn = getattr(mod, name, None)
            if callable(fn):
                return lambda x, w, fn=fn: fn(x, w)
    raise Unsupported("no Triton GEMM entry point in this build (llmkern.linear or "
                      "kernels/matmul.py linear/matmul)")


def _gemm_llmkern(backend: str):
    def build(case: Case, cfg: RunConfig):
        if backend == "triton":
            gemm = _triton_gemm()
            return lambda i: gemm(i["x"], i["weight"])
        from llmkern.ops import cuda_ext

        return lambda i: cuda_ext.call("linear_fwd", i["x"], i["weight"], None)
    return build


def _gemm_kernel_provider(kernel: str) -> Provider:
    """The Triton GEMM pinned to one of its kernels ('llmkern-triton' lets gemm() choose:
    the persistent TMA kernel on sm_90, the tiled one elsewhere)."""
    def build(case: Case, cfg: RunConfig):
        from llmkern.kernels.matmul import gemm

        if kernel == "persistent" and (cfg.device.type != "cuda"
                                       or torch.cuda.get_device_capability(cfg.device)[0] != 9):
            raise Unsupported("the persistent TMA GEMM is built for sm_90")
        return lambda i: gemm(i["x"], i["weight"].t(), kernel=kernel)
    return Provider(f"llmkern-triton-{kernel}", build, "subject", _llmkern_available("triton"))


GEMM = OpSpec(
    "gemm", "TFLOP/s", _gemm_cases,
    [Provider(f"llmkern-{b}", _gemm_llmkern(b), "subject", _llmkern_available(b)) for b in ("triton", "cuda")]
    + [_gemm_kernel_provider(k) for k in ("persistent", "tiled")]
    + [torch_provider(lambda case, cfg: lambda i: F.linear(i["x"], i["weight"]), name="cublas-gemm")],
    oracle=lambda i, case: F.linear(i["x"].float(), i["weight"].float()),
    description="x @ W^T (nn.Linear layout), forward only")


# ---- linear + bias + GELU ----------------------------------------------------------------

def _mlp_cases(cfg: RunConfig, with_proj: bool) -> list:
    dtype = default_dtype(cfg)
    cases = []
    for name, tokens, hidden, ffn in _linear_shapes(cfg):
        def make(device, requires_grad, t=tokens, h=hidden, f=ffn):
            inputs = {"x": randn((t, h), device, dtype, requires_grad),
                      "fc_weight": _weight((f, h), device, dtype, requires_grad),
                      "fc_bias": randn((f,), device, dtype, requires_grad, 0.1)}
            if with_proj:
                inputs["proj_weight"] = _weight((h, f), device, dtype, requires_grad)
                inputs["proj_bias"] = randn((h,), device, dtype, requires_grad, 0.1)
            return inputs

        if with_proj:
            work = (lambda mode, t=tokens, h=hidden, f=ffn: mlp_flops(t, h, f, mode))
        else:
            work = (lambda mode, t=tokens, h=hidden, f=ffn: gemm_flops(t, f, h, mode))
        cases.append(Case(f"{name} tokens={tokens} {hidden}->{ffn}",
                          {"model": name, "tokens": tokens, "hidden": hidden, "ffn": ffn},
                          dtype, make, work))
    return cases


def _lg_eager(case, cfg):
    return lambda i: F.gelu(F.linear(i["x"], i["fc_weight"], i["fc_bias"]), approximate="tanh")


LINEAR_GELU = OpSpec(
    "linear_gelu", "TFLOP/s", lambda cfg: _mlp_cases(cfg, False),
    llmkern_providers(lambda i, case, b: llmkern.linear_gelu(i["x"], i["fc_weight"], i["fc_bias"],
                                                            backend=b))
    + [torch_provider(_lg_eager), compile_provider(_lg_eager),
       torch_provider(lambda case, cfg: lambda i: F.linear(i["x"], i["fc_weight"]), name="cublas-gemm",
                      check=False)],
    oracle=lambda i, case: reference.linear_gelu(i["x"].float(), i["fc_weight"].float(),
                                                 i["fc_bias"].float()),
    description="GELU(x @ W^T + b), tanh approximation")


# ---- GPT-2 MLP ---------------------------------------------------------------------------

def _mlp_eager(case, cfg):
    return lambda i: F.linear(F.gelu(F.linear(i["x"], i["fc_weight"], i["fc_bias"]), approximate="tanh"),
                              i["proj_weight"], i["proj_bias"])


def _mlp_bare(case, cfg):
    return lambda i: F.linear(F.linear(i["x"], i["fc_weight"]), i["proj_weight"])


def _mlp_llmkern(i, case, backend):
    return llmkern.mlp(i["x"], i["fc_weight"], i["fc_bias"], i["proj_weight"], i["proj_bias"],
                       backend=backend)


MLP = OpSpec(
    "mlp", "TFLOP/s", lambda cfg: _mlp_cases(cfg, True),
    llmkern_providers(_mlp_llmkern)
    + [torch_provider(_mlp_eager), compile_provider(_mlp_eager),
       torch_provider(_mlp_bare, name="cublas-gemm", check=False)],
    oracle=lambda i, case: reference.mlp(*(i[k].float() for k in
                                           ("x", "fc_weight", "fc_bias", "proj_weight", "proj_bias"))),
    description="GPT-2 MLP: proj(GELU(fc(x)))")

SPECS = [GEMM, LINEAR_GELU, MLP]
