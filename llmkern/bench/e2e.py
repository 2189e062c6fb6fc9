"""End to end: a GPT-2 training step (tokens/s, MFU, peak memory) for llmkern's backends against
the same model in eager PyTorch (backend 'torch': the references, SDPA for attention) and under
torch.compile; and greedy decoding tokens/s over a static KV cache for llmkern (eager and
compiled with CUDA graphs) against Hugging Face ``generate`` and a gpt-fast-style compiled loop
over plain PyTorch, all with the same weights."""
from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn.functional as F

from llmkern.bench.core import (Provider, RunConfig, Unsupported, _speedups, provider_rows,
                                select_providers, short_reason)
from llmkern.bench.providers import _compile_available, _llmkern_available
from llmkern.bench.timing import synchronize, time_fn
from llmkern.hardware import mfu

GPT2_124M = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
GPT2_350M = dict(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024)
TINY = dict(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=64)


def _setup(cfg: RunConfig) -> tuple:
    """(label, model kwargs, batch, seq)."""
    if cfg.device.type == "cuda":
        return ("124M", GPT2_124M, 8 if cfg.quick else 16, 1024)
    return ("tiny", TINY, 2, 64)


def _train_providers() -> list:
    return ([Provider(f"llmkern-{b}", None, "subject", _llmkern_available(b)) for b in ("triton", "cuda")]
            + [Provider("torch", None, "reference"),
               Provider("torch.compile", None, "reference", _compile_available)])


def _hf_available(cfg: RunConfig) -> Optional[str]:
    try:
        import transformers  # noqa: F401
    except Exception as exc:
        return f"transformers is not installed ({short_reason(exc)})"
    return None


def _compiled_available(name: str):
    """Compiling runs on a CPU's quick run only when asked for by its full name."""
    def check(cfg: RunConfig) -> Optional[str]:
        return None if name in (cfg.providers or ()) else _compile_available(cfg)
    return check


def decode_providers() -> list:
    """llmkern's generator loop eager and compiled; HF generate; the gpt-fast-style loop."""
    return [Provider("llmkern", None, "subject"),
            Provider("llmkern-compiled", None, "subject", _compiled_available("llmkern-compiled")),
            Provider("hf-generate", None, "reference", _hf_available),
            Provider("gpt-fast", None, "reference", _compiled_available("gpt-fast"))]


def sampling_providers() -> list:
    """The grpo sampling case's (``llmkern.bench.e2e_align``): the stage's row-seeded sampler and
    the plain generator."""
    return [Provider("grpo-sampler", None, "subject"), Provider("generator", None, "reference")]


def e2e_providers() -> list:
    """Every provider of the end-to-end cases (the names ``--providers`` accepts)."""
    return _train_providers() + decode_providers() + sampling_providers()


def _backend(provider: str) -> Optional[str]:
    return {"llmkern-triton": "triton", "llmkern-cuda": "cuda", "auto": None}.get(provider, "torch")


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
        return len(_train_providers())

    def run(self, cfg: RunConfig, peaks, progress=None) -> tuple:
        label, kwargs, batch, seq = _setup(cfg)
        case = f"{label} B={batch} T={seq}"
        params = dict(kwargs, batch=batch, seq=seq)
        providers, skipped = select_providers(_train_providers(), cfg)
        rows = provider_rows(self, case, params, "bf16-autocast" if cfg.device.type == "cuda"
                             else "float32", "step", providers, cfg, progress,
                             lambda row, name: self._measure(row, name, kwargs, batch, seq, cfg, peaks))
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
    """Greedy decoding tokens/s (batch x tokens per second of the decoding steps, the prefill
    subtracted) of one model and weights, four ways: llmkern eager and compiled (CUDA graphs via
    ``mode="reduce-overhead"`` on a GPU), Hugging Face ``generate`` (SDPA attention) and a
    gpt-fast-style compiled loop over plain PyTorch with a static cache. bf16 weights on a GPU;
    on a CPU a tiny fp32 model (CPU figures)."""
    name, metric, description = "generate_gpt2", "tokens/s", "greedy decoding, static KV cache"

    def _cases(self, cfg: RunConfig) -> list:
        if cfg.device.type == "cuda":
            models = [("124M", GPT2_124M)] + ([] if cfg.quick else [("350M", GPT2_350M)])
            return [(label, kw, b, 128, 64 if cfg.quick else 128)
                    for label, kw in models for b in (1, 8, 64)]
        return [("tiny", TINY, b, 8, 8) for b in (1, 2)]

    def steps(self, cfg: RunConfig) -> int:
        return len(self._cases(cfg)) * len(decode_providers())

    def run(self, cfg: RunConfig, peaks, progress=None) -> tuple:
        gpu = cfg.device.type == "cuda"
        providers, skipped = select_providers(decode_providers(), cfg)
        rows = []
        for label, kwargs, batch, prompt, new in self._cases(cfg):
            case = f"{label} B={batch} prompt={prompt} new={new}"
            params = dict(kwargs, model=label, batch=batch, prompt=prompt, new=new)
            case_rows = provider_rows(
                self, case, params, "bfloat16" if gpu else "float32", "decode", providers, cfg,
                progress, lambda row, name: self._measure(row, name, kwargs, batch, prompt, new, cfg))
            _speedups(case_rows)  # within the case: speedups compare like with like
            rows += case_rows
        return rows, skipped

    def _measure(self, row, provider, kwargs, batch, prompt, new, cfg):
        device = cfg.device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = _make_model("auto", kwargs, cfg).to(dtype).eval()  # backend auto
        torch.manual_seed(1)
        ids = torch.randint(0, kwargs["vocab_size"], (batch, prompt), device=device)
        decode = {"llmkern": _llmkern_decoder(model, False), "llmkern-compiled":
                  _llmkern_decoder(model, True), "hf-generate": _hf_decoder(model),
                  "gpt-fast": _plain_decoder(model, True)}[provider]
        run = decode(ids, new)
        gpu = device.type == "cuda"
        rep = 1500.0 if gpu else (40.0 if cfg.quick else 200.0)
        with torch.no_grad():
            full = time_fn(lambda: run(new), device, rep / 10, rep)
            first = time_fn(lambda: run(1), device, rep / 20, rep / 4)
        per_step = (full.median - first.median) / (new - 1)
        if not per_step > 0:
            raise RuntimeError("decoding time not measurable (prefill dominated)")
        scale = per_step / full.median
        row.ms, row.ms_q20, row.ms_q80 = per_step, full.q20 * scale, full.q80 * scale
        row.value = batch * 1e3 / per_step
        row.extra = {"prefill_ms": first.median, "total_ms": full.median,
                     "ms_per_step": per_step}
        del model, run


# ---- the decoders: each ``build(ids, new)`` returns ``run(n)``, n greedy tokens per row -----

def _llmkern_decoder(model, compiled: bool):
    """llmkern's generator loop (as ``llmkern.generate`` runs it) over one reused static cache, so
    a compiled step keeps its CUDA graph across runs."""
    def build(ids, new):
        from llmkern.generate import make_decode_step
        from llmkern.model import KVCache

        b, t = ids.shape
        device = ids.device
        cache = KVCache(model.config, b, t + new, contiguous=True)
        step = make_decode_step(compiled, device)
        prefill_pos = torch.arange(t, device=device).expand(b, t)
        lens = torch.full((b,), t, dtype=torch.long, device=device)
        pos = torch.empty(b, 1, dtype=torch.long, device=device)

        def run(n):
            cache.reset()
            logits, _ = model(ids, cache=cache, input_pos=prefill_pos, last_only=True)
            cache.set_lengths(lens)
            tok = logits[:, -1].argmax(-1)
            out = [tok]
            pos.fill_(t)
            for _ in range(n - 1):
                tok = step(model, tok[:, None], pos, cache).argmax(-1)
                out.append(tok)
                pos.add_(1)
            return torch.stack(out, 1)
        return run
    return build


def _hf_decoder(model):
    """transformers' GPT2LMHeadModel (SDPA attention) holding the same weights, ``generate``."""
    def build(ids, new):
        from transformers import GPT2Config, GPT2LMHeadModel

        from llmkern.model import _CONV1D

        c = model.config
        if c.arch != "gpt2" or c.rope or c.swiglu or c.rmsnorm or (c.n_kv_head or c.n_head) != c.n_head:
            raise Unsupported("HF GPT-2 needs a GPT-2 shaped model")
        hf_cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                            n_layer=c.n_layer, n_head=c.n_head, layer_norm_epsilon=c.layer_norm_eps,
                            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                            pad_token_id=None, tie_word_embeddings=True)
        param = next(model.parameters())
        hf = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa")
        state = {k: (v.t() if k.endswith(_CONV1D) else v) for k, v in model.state_dict().items()
                 if k != "lm_head.weight"}  # Conv1D holds (in, out); the LM head is tied
        _, unexpected = hf.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"HF GPT-2 does not take weights {unexpected[:3]}")
        hf = hf.to(device=param.device, dtype=param.dtype).eval()
        mask = torch.ones_like(ids)

        def run(n):
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
            return out[:, ids.shape[1]:]
        return run
    return build


class _PlainGPT2(torch.nn.Module):
    """GPT-2 in plain PyTorch over ``model``'s weights with a static (layer, B, H, max_len, D)
    cache written with ``index_copy_`` at positions shared by all rows, as gpt-fast does."""

    def __init__(self, model, batch: int, max_len: int):
        super().__init__()
        c = model.config
        if c.arch != "gpt2" or c.rope or c.swiglu or c.rmsnorm or (c.n_kv_head or c.n_head) != c.n_head:
            raise Unsupported("the plain GPT-2 loop needs a GPT-2 shaped model")
        self.model, self.c = model, c
        param = next(model.parameters())
        shape = (c.n_layer, batch, c.n_head, max_len, c.n_embd // c.n_head)
        self.register_buffer("k", torch.zeros(shape, dtype=param.dtype, device=param.device))
        self.register_buffer("v", torch.zeros(shape, dtype=param.dtype, device=param.device))
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool,
                                                  device=param.device).tril())
        if param.is_cuda:
            for t in (self.k, self.v):
                torch._dynamo.mark_static_address(t)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        c, tr = self.c, self.model.transformer
        b, t = idx.shape
        hd = c.n_embd // c.n_head
        x = F.embedding(idx, tr.wte.weight) + F.embedding(input_pos, tr.wpe.weight)
        mask = self.causal[input_pos][None, None]
        for i, blk in enumerate(tr.h):
            h = F.layer_norm(x, (c.n_embd,), blk.ln_1.weight, blk.ln_1.bias, c.layer_norm_eps)
            qkv = F.linear(h, blk.attn.c_attn.weight, blk.attn.c_attn.bias)
            q, k, v = qkv.view(b, t, 3, c.n_head, hd).permute(2, 0, 3, 1, 4)
            self.k[i].index_copy_(2, input_pos, k)
            self.v[i].index_copy_(2, input_pos, v)
            y = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask)
            x = x + F.linear(y.transpose(1, 2).reshape(b, t, c.n_embd), blk.attn.c_proj.weight,
                             blk.attn.c_proj.bias)
            h = F.layer_norm(x, (c.n_embd,), blk.ln_2.weight, blk.ln_2.bias, c.layer_norm_eps)
            h = F.gelu(F.linear(h, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias), approximate="tanh")
            x = x + F.linear(h, blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)
        x = F.layer_norm(x[:, -1], (c.n_embd,), tr.ln_f.weight, tr.ln_f.bias, c.layer_norm_eps)
        return F.linear(x, tr.wte.weight).argmax(-1)


def _plain_decoder(model, compiled: bool):
    """The gpt-fast recipe: an eager prefill, then a decode step compiled with
    ``mode="reduce-overhead"`` (CUDA graphs) on a GPU, the default mode elsewhere."""
    def build(ids, new):
        b, t = ids.shape
        plain = _PlainGPT2(model, b, t + new)
        cuda = ids.is_cuda
        step = plain
        if compiled:
            step = torch.compile(plain, mode="reduce-overhead" if cuda else None, fullgraph=True)
        pos = torch.empty(1, dtype=torch.long, device=ids.device)
        prefill_pos = torch.arange(t, device=ids.device)

        def run(n):
            tok = plain(ids, prefill_pos)
            out = [tok]
            pos.fill_(t)
            for _ in range(n - 1):
                if compiled and cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                tok = step(tok[:, None], pos).clone()
                out.append(tok)
                pos.add_(1)
            return torch.stack(out, 1)
        return run
    return build


SPECS = [TrainStep(), Generate()]


def is_e2e(spec) -> bool:
    """An end-to-end case runs itself (``run``, ``steps``); an op benchmark is an OpSpec."""
    return callable(getattr(spec, "run", None)) and callable(getattr(spec, "steps", None))
