"""End to end: a GPT-2 training step (tokens/s, MFU, peak memory) and per-token generation
latency with the KV cache, for llmkern's backends against the same model in eager PyTorch
(backend 'torch': the references, SDPA for attention) and under torch.compile."""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from llmkern.bench.core import (Provider, Row, RunConfig, Unsupported, _speedups, select_providers,
                                short_reason)
from llmkern.bench.providers import _compile_available, _llmkern_available
from llmkern.bench.timing import free_memory, synchronize, time_fn
from llmkern.hardware import mfu

GPT2_124M = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
TINY = dict(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=64)


def _setup(cfg: RunConfig) -> tuple:
    """(label, model kwargs, batch, seq)."""
    if cfg.device.type == "cuda":
        return ("124M", GPT2_124M, 8 if cfg.quick else 16, 1024)
    return ("tiny", TINY, 2, 64)


def e2e_providers() -> list:
    return ([Provider(f"llmkern-{b}", None, "subject", _llmkern_available(b)) for b in ("triton", "cuda")]
            + [Provider("torch", None, "reference"),
               Provider("torch.compile", None, "reference", _compile_available)])


def _backend(provider: str) -> str:
    return {"llmkern-triton": "triton", "llmkern-cuda": "cuda"}.get(provider, "torch")


def _make_model(provider: str, kwargs: dict, cfg: RunConfig):
    try:
        from llmkern.model import GPT, GPTConfig
    except Exception as exc:
        raise Unsupported(f"llmkern.model is not in this build ({short_reason(exc)})")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**kwargs, backend=_backend(provider))).to(cfg.device)
    return model


def _autocast(cfg: RunConfig):
    if cfg.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _mfu_peak(peaks) -> Optional[float]:
    """FLOP/s that MFU is relative to: the datasheet dense bf16 peak of a known GPU, as MFU is
    usually quoted (``llmkern.hardware``); None elsewhere, so no MFU is shown there."""
    return peaks.datasheet_tflops * 1e12 if peaks is not None and peaks.datasheet_tflops else None


class TrainStep:
    name, metric, description = "train_gpt2", "tokens/s", "GPT-2 training step: fwd + bwd + AdamW"

    def steps(self, cfg: RunConfig) -> int:
        return len(e2e_providers())

    def run(self, cfg: RunConfig, peaks, progress=None) -> tuple:
        label, kwargs, batch, seq = _setup(cfg)
        case = f"{label} B={batch} T={seq}"
        params = dict(kwargs, batch=batch, seq=seq)
        rows = []
        providers, skipped = select_providers(e2e_providers(), cfg)
        for provider in providers:
            row = Row(self.name, case, params, "bf16-autocast" if cfg.device.type == "cuda" else "float32",
                      "step", provider.name, provider.role, metric=self.metric)
            try:
                self._measure(row, provider.name, kwargs, batch, seq, cfg, peaks)
            except Exception as exc:
                row.status, row.reason = "n/a", short_reason(exc)
            free_memory(cfg.device)
            rows.append(row)
            if progress is not None:
                progress.update(1)
        _speedups(rows)
        return rows, skipped

    def _measure(self, row, provider, kwargs, batch, seq, cfg, peaks):
        device = cfg.device
        model = _make_model(provider, kwargs, cfg)
        flops_per_token = model.flops_per_token(seq)
        opt = model.configure_optimizers(0.1, 6e-4, device_type=device.type)
        step_model = torch.compile(model) if provider == "torch.compile" else model
        data = [(torch.randint(0, kwargs["vocab_size"], (batch, seq), device=device),
                 torch.randint(0, kwargs["vocab_size"], (batch, seq), device=device)) for _ in range(2)]
        counter = itertools.count()

        def step():
            x, y = data[next(counter) % len(data)]
            with _autocast(cfg):
                _, loss = step_model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        loss = step()  # compiles where it must; a NaN loss means something is broken
        if not torch.isfinite(loss.detach()).item():
            raise RuntimeError(f"non-finite loss {loss.item()} on the first step")
        gpu = device.type == "cuda"
        warm, rep = (300.0, 2000.0) if gpu else ((0.0, 60.0) if cfg.quick else (50.0, 300.0))
        timing = time_fn(step, device, warm, rep)
        if gpu:
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            synchronize(device)
            row.peak_mem_mb = torch.cuda.max_memory_allocated(device) / 2**20  # model + optimizer too
        tokens_per_s = batch * seq / (timing.median * 1e-3)
        achieved = flops_per_token * tokens_per_s
        row.ms, row.ms_q20, row.ms_q80, row.value = timing.median, timing.q20, timing.q80, tokens_per_s
        if peaks is not None and peaks.matmul_tflops:
            row.frac_peak = achieved / (peaks.matmul_tflops * 1e12)
        row.extra = {"tflops": achieved / 1e12,
                     "mfu": mfu(flops_per_token, tokens_per_s, _mfu_peak(peaks)),
                     "flops_per_token": flops_per_token,
                     "tokens_per_step": batch * seq}
        del model, opt, step_model, data


class Generate:
    name, metric, description = "generate_gpt2", "tokens/s", "greedy decoding with the KV cache, batch 1"

    def steps(self, cfg: RunConfig) -> int:
        return 3

    def run(self, cfg: RunConfig, peaks, progress=None) -> tuple:
        label, kwargs, _, _ = _setup(cfg)
        prompt, new = (128, 128) if cfg.device.type == "cuda" else (16, 16)
        case = f"{label} prompt={prompt} new={new} B=1"
        rows = []
        # the cache grows every step: no static graph to compile
        providers, skipped = select_providers(e2e_providers()[:3], cfg)
        for provider in providers:
            row = Row(self.name, case, dict(kwargs, prompt=prompt, new=new), "bf16-autocast"
                      if cfg.device.type == "cuda" else "float32", "decode", provider.name,
                      provider.role, metric=self.metric)
            try:
                self._measure(row, provider.name, kwargs, prompt, new, cfg)
            except Exception as exc:
                row.status, row.reason = "n/a", short_reason(exc)
            free_memory(cfg.device)
            rows.append(row)
            if progress is not None:
                progress.update(1)
        skipped.setdefault("torch.compile", "not measured for decoding (the KV cache changes "
                                            "shape every token)")
        _speedups(rows)
        return rows, skipped

    def _measure(self, row, provider, kwargs, prompt, new, cfg):
        from llmkern.model import KVCache

        device = cfg.device
        model = _make_model(provider, kwargs, cfg).eval()
        ids = torch.randint(0, kwargs["vocab_size"], (1, prompt), device=device)

        @torch.no_grad()
        def generate(n_new: int):
            cache = KVCache(model.config, 1, prompt + n_new)
            with _autocast(cfg):
                logits, _ = model(ids, cache=cache, last_only=True)
                tok = logits.argmax(-1)
                for _ in range(n_new - 1):
                    logits, _ = model(tok, cache=cache, last_only=True)
                    tok = logits.argmax(-1)
            return tok

        gpu = device.type == "cuda"
        rep = 1500.0 if gpu else (40.0 if cfg.quick else 200.0)
        full = time_fn(lambda: generate(new), device, rep / 10, rep)
        first = time_fn(lambda: generate(1), device, rep / 20, rep / 4)
        per_token = (full.median - first.median) / (new - 1)
        if not per_token > 0:
            raise RuntimeError("decoding time not measurable (prefill dominated)")
        scale = per_token / full.median
        row.ms, row.ms_q20, row.ms_q80 = per_token, full.q20 * scale, full.q80 * scale
        row.value = 1e3 / per_token
        row.extra = {"prefill_ms": first.median, "total_ms": full.median}
        del model


SPECS = [TrainStep(), Generate()]


def is_e2e(spec) -> bool:
    return isinstance(spec, (TrainStep, Generate))
