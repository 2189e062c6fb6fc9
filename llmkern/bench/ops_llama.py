"""Llama-family ops: rotary embeddings (GB/s), the SwiGLU MLP (TFLOP/s), and a training step of a
Hugging Face Llama patched with llmkern (tokens/s and peak memory).

Shapes are Llama-3-8B's: q 32 heads and k 8 heads of 128 dims, hidden 4096 -> 14336, at 8192
tokens. The training step is a small random Llama (4 layers, hidden 2048, GQA, Llama-3's
vocabulary) on 8192 tokens per batch in bf16, as eager HF (SDPA attention), HF with
``llmkern.integrations.transformers.patch()`` and HF with Liger-Kernel's patch.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
import torch.nn.functional as F

import llmkern
from llmkern.bench.core import (Case, OpSpec, Provider, RunConfig, Unsupported, _speedups,
                                provider_rows, rel_error, select_providers, short_reason)
from llmkern.bench.flops import gemm_flops, io_bytes
from llmkern.bench.providers import (_llmkern_available, compile_provider, default_dtype,
                                     liger_provider, llmkern_providers, randn, torch_provider)
from llmkern.bench.timing import peak_memory_mb, synchronize, time_fn

# ---- rotary ------------------------------------------------------------------------------


def _rotary_shapes(cfg: RunConfig) -> list:
    """(batch, seq, q heads, k heads, head_dim)."""
    if cfg.device.type == "cuda":
        return [(1, 8192, 32, 8, 128)]
    return [(1, 64, 4, 2, 32)] if cfg.quick else [(1, 64, 4, 2, 32), (2, 37, 6, 2, 40)]


def rotary_bytes(b, s, hq, hk, d, element_size: int, mode: str) -> float:
    """q and k read once and written once per pass (the tables once, fp32). The harness times
    one output tensor, so each provider's forward ends in one concatenation of q and k, whose
    traffic is counted too (its backward is free: views)."""
    qk = b * s * (hq + hk) * d
    tables = 2 * s * (d // 2) * 4
    one_pass = io_bytes(qk, qk, element_size) + tables
    cat = io_bytes(qk, qk, element_size)
    return {"fwd": one_pass + cat, "bwd": one_pass, "fwd+bwd": 2 * one_pass + cat}[mode]


def _rotary_cases(cfg: RunConfig) -> list:
    dtype = default_dtype(cfg)
    cases = []
    for b, s, hq, hk, d in _rotary_shapes(cfg):
        def make(device, requires_grad, b=b, s=s, hq=hq, hk=hk, d=d):
            inv = 500000.0 ** (-torch.arange(d // 2, device=device, dtype=torch.float64) / (d // 2))
            angles = torch.arange(s, device=device, dtype=torch.float64)[:, None] * inv
            cos, sin = angles.cos().float(), angles.sin().float()
            # Hugging Face's (batch, seq, head_dim) tables, duplicated halves, in the model dtype
            return {"q": randn((b, hq, s, d), device, dtype, requires_grad),
                    "k": randn((b, hk, s, d), device, dtype, requires_grad),
                    "cos": cos, "sin": sin,
                    "cos_hf": torch.cat((cos, cos), -1)[None].to(dtype),
                    "sin_hf": torch.cat((sin, sin), -1)[None].to(dtype)}
        elt = torch.empty((), dtype=dtype).element_size()
        cases.append(Case(f"B={b} S={s} Hq={hq} Hk={hk} D={d}",
                          {"B": b, "S": s, "Hq": hq, "Hk": hk, "D": d}, dtype, make,
                          lambda mode, b=b, s=s, hq=hq, hk=hk, d=d, e=elt:
                          rotary_bytes(b, s, hq, hk, d, e, mode)))
    return cases


def _pack(q, k):
    return torch.cat((q.reshape(-1), k.reshape(-1)))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary_eager(case, cfg):
    """Hugging Face Llama's ``apply_rotary_pos_emb`` (rotate_half), tables unsqueezed at heads."""
    def fn(i):
        cos, sin = i["cos_hf"].unsqueeze(1), i["sin_hf"].unsqueeze(1)
        q, k = i["q"], i["k"]
        return _pack(q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin)
    return fn


def _rotary_liger(fn, i, case):
    return _pack(*fn(i["q"], i["k"], i["cos_hf"], i["sin_hf"]))


def _rotary_oracle(i, case):
    from llmkern.ops.rotary import rotary_reference

    q, k = rotary_reference(i["q"].float(), i["k"].float(), i["cos"], i["sin"])
    return _pack(q, k)


ROTARY = OpSpec(
    "rotary", "GB/s", _rotary_cases,
    llmkern_providers(lambda i, case, b: _pack(*llmkern.rotary(i["q"], i["k"], i["cos"], i["sin"],
                                                               backend=b)))
    + [torch_provider(_rotary_eager), compile_provider(_rotary_eager),
       liger_provider("liger_kernel.transformers.rope.liger_rotary_pos_emb", _rotary_liger)],
    oracle=_rotary_oracle,
    description="rotary embedding of q and k (half-split, as Llama), then one concatenation")


# ---- SwiGLU MLP --------------------------------------------------------------------------

def _mlp_shapes(cfg: RunConfig) -> list:
    """(tokens, hidden, intermediate)."""
    if cfg.device.type == "cuda":
        return [(8192, 4096, 14336)]
    return [(64, 64, 160)] if cfg.quick else [(64, 64, 160), (130, 96, 200)]


def swiglu_flops(tokens: int, hidden: int, inter: int, mode: str) -> float:
    """Three GEMMs: gate and up (hidden -> intermediate) and down; elementwise work uncounted."""
    return 2 * gemm_flops(tokens, inter, hidden, mode) + gemm_flops(tokens, hidden, inter, mode)


def _mlp_cases(cfg: RunConfig) -> list:
    dtype = default_dtype(cfg)
    cases = []
    for t, h, f in _mlp_shapes(cfg):
        def make(device, requires_grad, t=t, h=h, f=f):
            return {"x": randn((t, h), device, dtype, requires_grad),
                    "gate": randn((f, h), device, dtype, requires_grad, 1.0 / math.sqrt(h)),
                    "up": randn((f, h), device, dtype, requires_grad, 1.0 / math.sqrt(h)),
                    "down": randn((h, f), device, dtype, requires_grad, 1.0 / math.sqrt(f))}
        cases.append(Case(f"tokens={t} hidden={h} intermediate={f}",
                          {"tokens": t, "hidden": h, "intermediate": f}, dtype, make,
                          lambda mode, t=t, h=h, f=f: swiglu_flops(t, h, f, mode),
                          modes=("fwd", "fwd+bwd")))
    return cases


def _mlp_eager(case, cfg):
    return lambda i: F.linear(F.silu(F.linear(i["x"], i["gate"])) * F.linear(i["x"], i["up"]),
                              i["down"])


def _mlp_liger(fn, i, case):
    # LigerSwiGLUMLP's forward: down_proj(LigerSiLUMulFunction(gate_proj(x), up_proj(x)))
    return F.linear(fn.apply(F.linear(i["x"], i["gate"]), F.linear(i["x"], i["up"])), i["down"])


def _mlp_oracle(i, case):
    from llmkern.ops.gated_mlp import gated_mlp_reference

    return gated_mlp_reference(i["x"].float(), i["gate"].float(), i["up"].float(),
                               i["down"].float())


SWIGLU_MLP = OpSpec(
    "swiglu_mlp", "TFLOP/s", _mlp_cases,
    llmkern_providers(lambda i, case, b: llmkern.swiglu_mlp(i["x"], i["gate"], i["down"], i["up"],
                                                           backend=b))
    + [torch_provider(_mlp_eager), compile_provider(_mlp_eager),
       liger_provider("liger_kernel.ops.swiglu.LigerSiLUMulFunction", _mlp_liger)],
    oracle=_mlp_oracle,
    description="Llama MLP down(silu(gate(x)) * up(x)), no biases")


# ---- a patched Hugging Face Llama training step --------------------------------------------

LLAMA_STEP = dict(vocab_size=128256, hidden_size=2048, intermediate_size=5632,
                  num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8)
LLAMA_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def _hf_llama():
    try:
        from transformers.models.llama import modeling_llama
    except Exception as exc:
        raise Unsupported(f"transformers is not importable ({short_reason(exc)})")
    return modeling_llama


def _transformers_available(cfg: RunConfig) -> Optional[str]:
    try:
        _hf_llama()
    except Unsupported as exc:
        return str(exc)
    return None


def _liger_available(cfg: RunConfig) -> Optional[str]:
    if cfg.device.type != "cuda":
        return "Liger-Kernel needs a CUDA device"
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: F401
    except Exception as exc:
        return f"Liger-Kernel not importable ({type(exc).__name__}: {exc})"
    return _transformers_available(cfg)


def _llmkern_hf_available(cfg: RunConfig) -> Optional[str]:
    return _llmkern_available("triton")(cfg) or _transformers_available(cfg)


def step_providers() -> list:
    return [Provider("llmkern-triton", None, "subject", _llmkern_hf_available),
            Provider("torch", None, "reference", _transformers_available),
            Provider("liger", None, "reference", _liger_available)]


class _ModuleState:
    """The attributes of HF's Llama modeling module and the forwards of its classes: patch()
    and Liger swap functions there module-wide, so each row installs its own state per call."""

    def __init__(self, module):
        self.module = module
        self.names = dict(vars(module))
        self.forwards = {c: c.__dict__.get("forward") for c in vars(module).values()
                         if isinstance(c, type) and c.__module__ == module.__name__}

    def apply(self) -> None:
        vars(self.module).update(self.names)
        for cls, fwd in self.forwards.items():
            if fwd is not None:
                cls.forward = fwd


class LlamaStep:
    """Training step (forward, backward, AdamW) of one random HF Llama, three ways, same
    weights and batches: tokens/s, and the step's peak memory above the weights and optimizer
    state (activations, gradients, logits) on a GPU. The loss of each row's first step is
    checked against the fp32 eager model's."""
    name, metric = "llama_step", "tokens/s"
    description = "HF Llama training step (4 layers, hidden 2048, vocab 128256): patched vs eager"

    def _setup(self, cfg: RunConfig) -> tuple:
        """(label, LlamaConfig kwargs, batch, seq)."""
        if cfg.device.type == "cuda":
            return "4L-2048", LLAMA_STEP, 4, 2048
        return "tiny", LLAMA_TINY, 2, 32

    def steps(self, cfg: RunConfig) -> int:
        return len(step_providers())

    def all_providers(self) -> list:
        """The names ``--providers`` may select here (the e2e cases' list lacks 'liger')."""
        return step_providers()

    def run(self, cfg: RunConfig, peaks, progress=None) -> tuple:
        label, kwargs, batch, seq = self._setup(cfg)
        case = f"{label} B={batch} T={seq}"
        params = dict(kwargs, model=label, batch=batch, seq=seq)
        providers, skipped = select_providers(step_providers(), cfg)
        gpu = cfg.device.type == "cuda"
        state = {}  # HF's Llama module as found, and the fp32 oracle losses: made once, lazily

        def measure(row, name):
            if not state:
                base = _ModuleState(_hf_llama())
                state.update(base=base, oracle=self._losses(cfg, kwargs, batch, seq, base))
            self._measure(row, name, kwargs, batch, seq, cfg, peaks, state["base"], state["oracle"])

        def restore():  # each provider patches HF's module its own way: undo it
            if state:
                state["base"].apply()

        rows = provider_rows(self, case, params, "bfloat16" if gpu else "float32", "step", providers,
                             cfg, progress, measure, restore)
        _speedups(rows)
        return rows, skipped

    @staticmethod
    def _batches(cfg, kwargs, batch, seq):
        g = torch.Generator().manual_seed(1)
        return [torch.randint(0, kwargs["vocab_size"], (batch, seq), generator=g).to(cfg.device)
                for _ in range(2)]

    @staticmethod
    def _model(cfg, kwargs, seq, dtype):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(**kwargs, max_position_embeddings=seq, rope_theta=500000.0,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
        return model.to(device=cfg.device, dtype=dtype).train()

    def _losses(self, cfg, kwargs, batch, seq, base) -> torch.Tensor:
        """The fp32 eager model's loss on the first batch: what every row's first step gives."""
        base.apply()
        model = self._model(cfg, kwargs, seq, torch.float32)
        ids = self._batches(cfg, kwargs, batch, seq)[0]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.detach()
        del model
        return loss

    def _measure(self, row, provider, kwargs, batch, seq, cfg, peaks, base, oracle):
        device = cfg.device
        gpu = device.type == "cuda"
        model = self._model(cfg, kwargs, seq, torch.bfloat16 if gpu else torch.float32)
        if provider == "llmkern-triton":
            from llmkern.integrations.transformers import patch

            patch(model, backend="triton")
        elif provider == "liger":
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama(model=model)
        state = _ModuleState(_hf_llama())  # this row's module-wide patches
        base.apply()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
        data = self._batches(cfg, kwargs, batch, seq)
        counter = itertools.count()

        def step(update=True):
            state.apply()
            ids = data[next(counter) % len(data)]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if update:
                opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        first = step(update=False)  # the initial weights: comparable with the oracle
        row.rel_err = rel_error(first.float().reshape(1), oracle.reshape(1).to(first.device))
        tol = 3e-2 if gpu else 1e-4
        if not row.rel_err <= tol:
            row.status = "wrong"
            row.reason = f"first loss {first.item():.4f} differs from fp32 eager's {oracle.item():.4f}"
        step()  # optimizer state allocated before timing and the memory figure
        warm, rep = (300.0, 2000.0) if gpu else ((0.0, 60.0) if cfg.quick else (20.0, 200.0))
        timing = time_fn(step, device, warm, rep)
        synchronize(device)
        row.peak_mem_mb = peak_memory_mb(step, device)
        tokens = batch * seq
        row.ms, row.ms_q20, row.ms_q80 = timing.median, timing.q20, timing.q80
        row.value = tokens / (timing.median * 1e-3)
        n_params = sum(p.numel() for p in model.parameters())
        flops = 6.0 * n_params * tokens + 6.0 * kwargs["num_hidden_layers"] * seq * \
            kwargs["hidden_size"] * tokens  # 6N per token plus causal attention
        achieved = flops / (timing.median * 1e-3)
        if peaks is not None and peaks.matmul_tflops:
            row.frac_peak = achieved / (peaks.matmul_tflops * 1e12)
        row.extra = {"tflops": achieved / 1e12, "tokens_per_step": tokens,
                     "first_loss": first.item()}
        del model, opt, data


SPECS = [ROTARY, SWIGLU_MLP, LlamaStep()]
