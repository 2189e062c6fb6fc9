"""Decode attention: one query row per sequence against a long KV cache (GQA 32/8, head_dim 128).

Memory bound: the K/V cache is read once, so the rate is GB/s of K/V (+ q and out) against the
measured copy bandwidth. llmkern's split-KV kernel (``attention_with_kvcache``, provider
llmkern-triton), the same call through ``llmkern.attention`` under ``auto`` (routed to it), the
prefill kernel named by ``backend='triton'``, and SDPA's backends (with ``enable_gqa``), at
Sk 4k/32k/128k, batch 1/16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import llmkern
from llmkern.bench.core import Case, OpSpec, Provider, RunConfig, Unsupported
from llmkern.bench.flops import io_bytes
from llmkern.bench.providers import (SDPA_BACKENDS, _llmkern_available, _sdpa_backend,
                                     default_dtype, randn)
from llmkern.ops.decode_attention import attention_with_kvcache

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _grid(cfg: RunConfig) -> list:
    """(batch, Sk) pairs."""
    if cfg.device.type == "cuda":
        if cfg.quick:  # one case per target
            return [(1, 32768), (16, 32768)]
        return [(b, s) for b in (1, 16) for s in (4096, 32768, 131072)]
    return [(1, 256)] if cfg.quick else [(1, 256), (2, 300)]


def _cases(cfg: RunConfig) -> list:
    dtype = default_dtype(cfg)
    cuda = cfg.device.type == "cuda"
    h, hkv, d = (HEADS, KV_HEADS, HEAD_DIM) if cuda else (4, 2, 32)
    elt = torch.empty((), dtype=dtype).element_size()
    cases = []
    for batch, sk in _grid(cfg):
        def make(device, requires_grad, b=batch, s=sk):
            return {"q": randn((b, h, 1, d), device, dtype), "k": randn((b, hkv, s, d), device, dtype),
                    "v": randn((b, hkv, s, d), device, dtype)}

        reads = 2 * batch * hkv * sk * d + batch * h * d  # K and V once, q
        cases.append(Case(f"B={batch} H={h}/{hkv} Sq=1 Sk={sk} D={d}",
                          {"B": batch, "H": h, "Hkv": hkv, "Sk": sk, "D": d}, dtype, make,
                          lambda mode, r=reads, w=batch * h * d, e=elt: io_bytes(r, w, e),
                          modes=("fwd",)))
    return cases


def _provider(name: str, call) -> Provider:
    return Provider(name, lambda case, cfg: call, role="subject",
                    available=_llmkern_available("triton"))


def _split_kv(i):
    return attention_with_kvcache(i["q"], i["k"], i["v"], backend="triton")


def _auto(i):
    return llmkern.attention(i["q"], i["k"], i["v"], causal=True, backend="auto")


def _prefill(i):
    return llmkern.attention(i["q"], i["k"], i["v"], causal=True, backend="triton")


def _sdpa(attr: str) -> Provider:
    def build(case: Case, cfg: RunConfig):
        from torch.nn.attention import sdpa_kernel

        if cfg.device.type != "cuda" and attr != "MATH":
            raise Unsupported(f"SDPA's {attr.lower()} backend needs a CUDA device")
        backend = _sdpa_backend(attr)

        def fn(i):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(i["q"], i["k"], i["v"], enable_gqa=True)
        return fn

    name = dict((a, n) for n, a in SDPA_BACKENDS).get(attr, "sdpa-math")
    return Provider(name, build, role="reference")


def _oracle(i, case):
    # Sq = 1 sees every key: causal or not is the same; fp32 through SDPA's default dispatch
    return F.scaled_dot_product_attention(i["q"].float(), i["k"].float(), i["v"].float(),
                                          enable_gqa=True)


DECODE = OpSpec(
    "decode_attention", "GB/s", _cases,
    [_provider("llmkern-triton", _split_kv), _provider("llmkern-auto", _auto),
     _provider("llmkern-prefill", _prefill)] + [_sdpa(a) for _, a in SDPA_BACKENDS],
    oracle=_oracle, description="decode attention (B, H, 1, D) against a (B, Hkv, Sk, D) cache")

SPECS = [DECODE]
