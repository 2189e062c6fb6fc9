"""Losses: cross-entropy over a large vocabulary (GB/s), the fused LM head + loss and the fused
LM head + per-token log-probs of the alignment stages (TFLOP/s, and above all peak memory: the
targets are <= 25% of eager at 16384 tokens x 50304 x 768).

Modes are fwd and fwd+bwd only: fused losses (llmkern's, Liger's) compute the gradient during
the forward, so a backward timed alone would measure a copy and report nonsense rates. 'fwd' is
the training forward (inputs require grad), so a fused loss shows its gradient work there; its
work count is that of a plain forward, which understates such a kernel's rate, never flatters it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import llmkern
from llmkern import reference
from llmkern.bench.core import Case, OpSpec, RunConfig, Unsupported
from llmkern.bench.flops import cross_entropy_bytes, gemm_flops
from llmkern.bench.providers import (compile_provider, default_dtype, liger_provider,
                                     llmkern_providers, randn, torch_provider)

GPT2_VOCAB = 50304
LOSS_MODES = ("fwd", "fwd+bwd")


def _targets(tokens: int, vocab: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, (tokens,), device=device)


# ---- cross-entropy -----------------------------------------------------------------------

def _ce_shapes(cfg: RunConfig) -> list:
    if cfg.device.type == "cuda":
        return [(8192, GPT2_VOCAB)] if cfg.quick else [(8192, GPT2_VOCAB), (16384, GPT2_VOCAB),
                                                       (8192, 128256)]
    return [(64, 1000)] if cfg.quick else [(64, 1000), (130, 4099)]


def _ce_cases(cfg: RunConfig) -> list:
    dtype = default_dtype(cfg)
    elt = torch.empty((), dtype=dtype).element_size()
    cases = []
    for tokens, vocab in _ce_shapes(cfg):
        def make(device, requires_grad, t=tokens, v=vocab):
            return {"logits": randn((t, v), device, dtype, requires_grad, 2.0),
                    "target": _targets(t, v, device)}
        cases.append(Case(f"tokens={tokens} vocab={vocab}", {"tokens": tokens, "vocab": vocab},
                          dtype, make, lambda mode, t=tokens, v=vocab: cross_entropy_bytes(t, v, elt, mode),
                          modes=LOSS_MODES))
    return cases


def _ce_eager(case, cfg):
    # fp32 math, as autocast runs cross_entropy for half logits
    return lambda i: F.cross_entropy(i["logits"].float(), i["target"])


CROSS_ENTROPY = OpSpec(
    "cross_entropy", "GB/s", _ce_cases,
    llmkern_providers(lambda i, case, b: llmkern.cross_entropy(i["logits"], i["target"], backend=b))
    + [torch_provider(_ce_eager), compile_provider(_ce_eager),
       liger_provider("liger_kernel.transformers.functional.liger_cross_entropy",
                      lambda fn, i, case: fn(i["logits"], i["target"]))],
    oracle=lambda i, case: reference.cross_entropy(i["logits"].float(), i["target"]),
    description="mean cross-entropy of (tokens, vocab) logits")


# ---- fused linear + cross-entropy ---------------------------------------------------------

def _lce_shapes(cfg: RunConfig) -> list:
    """(tokens, hidden, vocab): the memory target's case first, then GPT-2 1.5B's head."""
    if cfg.device.type == "cuda":
        return [(16384, 768, GPT2_VOCAB)] if cfg.quick else [(16384, 768, GPT2_VOCAB),
                                                             (8192, 1600, GPT2_VOCAB)]
    return [(64, 32, 1000)] if cfg.quick else [(64, 32, 1000), (130, 48, 4099)]


def _lce_cases(cfg: RunConfig) -> list:
    dtype = default_dtype(cfg)
    cases = []
    for tokens, hidden, vocab in _lce_shapes(cfg):
        def make(device, requires_grad, t=tokens, h=hidden, v=vocab):
            return {"hidden": randn((t, h), device, dtype, requires_grad),
                    "lm_weight": randn((v, h), device, dtype, requires_grad, 1.0 / math.sqrt(h)),
                    "target": _targets(t, v, device)}
        cases.append(Case(f"tokens={tokens} hidden={hidden} vocab={vocab}",
                          {"tokens": tokens, "hidden": hidden, "vocab": vocab}, dtype, make,
                          lambda mode, t=tokens, h=hidden, v=vocab: gemm_flops(t, v, h, mode),
                          modes=LOSS_MODES))
    return cases


def _lce_eager(case, cfg):
    return lambda i: F.cross_entropy(F.linear(i["hidden"], i["lm_weight"]).float(), i["target"])


LINEAR_CROSS_ENTROPY = OpSpec(
    "linear_cross_entropy", "TFLOP/s", _lce_cases,
    llmkern_providers(lambda i, case, b: llmkern.linear_cross_entropy(i["hidden"], i["lm_weight"],
                                                                     i["target"], backend=b))
    + [torch_provider(_lce_eager), compile_provider(_lce_eager),
       liger_provider("liger_kernel.transformers.functional.liger_fused_linear_cross_entropy",
                      lambda fn, i, case: fn(i["hidden"], i["lm_weight"], i["target"]))],
    oracle=lambda i, case: reference.linear_cross_entropy(i["hidden"].float(), i["lm_weight"].float(),
                                                          i["target"]),
    description="LM head + mean cross-entropy, F.cross_entropy(hidden @ W^T, target) in eager")


# ---- fused linear + per-token log-probs ---------------------------------------------------

LOGPROBS_TEMPERATURE = 1.0  # the sampling temperature the policy losses divide by; 1 lets Liger match


def _llp_eager(case, cfg):
    """What eager policy-loss code does: fp32 logits over the whole vocabulary, scaled by the
    temperature, log-softmax, gather; the timed loss is the sum of the log-probs."""
    t = case.params["temperature"]

    def fn(i):
        logits = F.linear(i["hidden"], i["lm_weight"]).float() / t
        return torch.log_softmax(logits, -1).gather(-1, i["target"][:, None]).sum()
    return fn


def _llp_cases(cfg: RunConfig) -> list:
    cases = _lce_cases(cfg)
    for case in cases:
        case.params = dict(case.params, temperature=LOGPROBS_TEMPERATURE)
    return cases


def _llp_liger(fn, i, case):
    # Liger has no per-token log-prob op; at temperature 1 the summed cross-entropy of its fused
    # LM-head loss is minus the same sum
    if case.params["temperature"] != 1.0:
        raise Unsupported("Liger's fused linear cross-entropy has no temperature")
    return -fn(i["hidden"], i["lm_weight"], i["target"], reduction="sum")


def _llp_oracle(i, case):
    logits = F.linear(i["hidden"].float(), i["lm_weight"].float()) / case.params["temperature"]
    return torch.log_softmax(logits, -1).gather(-1, i["target"][:, None]).sum()


LINEAR_LOGPROBS = OpSpec(
    "linear_logprobs", "TFLOP/s", _llp_cases,
    llmkern_providers(lambda i, case, b: llmkern.linear_logprobs(
        i["hidden"], i["lm_weight"], i["target"], temperature=case.params["temperature"],
        backend=b).sum())
    + [torch_provider(_llp_eager), compile_provider(_llp_eager),
       liger_provider("liger_kernel.transformers.functional.liger_fused_linear_cross_entropy",
                      _llp_liger)],
    oracle=_llp_oracle,
    description="LM head + per-token log-probs, summed; log_softmax(hidden @ W^T / T).gather(target) "
                "in fp32 in eager")

SPECS = [CROSS_ENTROPY, LINEAR_CROSS_ENTROPY, LINEAR_LOGPROBS]
