"""End to end: the grpo stage's sampling against the plain generator, per decoded token.

The grpo stage samples each completion with its own seed (``llmkern.align.sample_completions``:
each token inverts the row's CDF at a number hashed from its seed and position) so that a step
samples the same whatever the number of processes. This case measures what that costs: at the
same batch (prompts x group size, ragged prompts as the stage has them), the same new tokens and
the same model (fp32 weights under bf16 autocast on a GPU, as the training loop holds and runs
them), the stage's sampling call exactly as the stage makes it against ``llmkern.generate``
sampling with one torch.Generator. GPT-2 124M shapes (random weights) on a GPU, a tiny model on
a CPU.
"""
from __future__ import annotations

import torch

from llmkern.bench.core import RunConfig, _speedups, provider_rows, select_providers
from llmkern.bench.e2e import GPT2_124M, TINY, _autocast, _make_model, sampling_providers
from llmkern.bench.timing import time_fn

EOS = 0  # a token id ending a completion, as the tokenizer's EOS does in the stage


class GRPOSampling:
    """ms per decoding step (one token per row) of the grpo sampler and of the plain generator,
    the prefill subtracted (a run of n tokens minus a run of 1, over n - 1); the value is tokens/s
    (rows x steps per second) and each grpo row's ``extra`` holds its time over the generator's."""
    name, metric = "grpo_sampling", "tokens/s"
    description = "grpo stage's row-seeded sampling vs the plain generator, same batch and model"

    def _cases(self, cfg: RunConfig) -> list:
        """(label, model kwargs, prompts, group size, longest prompt, new tokens)."""
        if cfg.device.type == "cuda":
            return ([("124M", GPT2_124M, 8, 8, 128, 64 if cfg.quick else 128)]
                    + ([] if cfg.quick else [("124M", GPT2_124M, 32, 8, 128, 128)]))
        return [("tiny", TINY, 2, 2, 8, 8)]

    def steps(self, cfg: RunConfig) -> int:
        return len(self._cases(cfg)) * len(sampling_providers())

    def run(self, cfg: RunConfig, peaks, progress=None) -> tuple:
        gpu = cfg.device.type == "cuda"
        providers, skipped = select_providers(sampling_providers(), cfg)
        rows = []
        for label, kwargs, n_prompts, group, prompt, new in self._cases(cfg):
            batch = n_prompts * group
            case = f"{label} prompts={n_prompts} G={group} prompt<={prompt} new={new}"
            params = dict(kwargs, model=label, prompts=n_prompts, group=group, batch=batch,
                          prompt=prompt, new=new)
            case_rows = provider_rows(
                self, case, params, "bf16-autocast" if gpu else "float32", "decode", providers,
                cfg, progress, lambda row, name: self._measure(row, name, kwargs, n_prompts, group,
                                                               prompt, new, cfg))
            _speedups(case_rows)
            ref = next((r for r in case_rows if r.provider == "generator" and r.status == "ok"), None)
            for r in case_rows:
                if r.role == "subject" and r.status == "ok" and ref is not None:
                    r.extra["vs_generator"] = r.ms / ref.ms
            rows += case_rows
        return rows, skipped

    def _measure(self, row, provider, kwargs, n_prompts, group, prompt, new, cfg):
        from llmkern.align import row_seeds, sample_completions
        from llmkern.generate import generate

        device = cfg.device
        model = _make_model("auto", kwargs, cfg)
        gen = torch.Generator().manual_seed(1)
        lens = torch.randint(prompt // 2, prompt + 1, (n_prompts,), generator=gen).tolist()
        # each prompt group times, in the stage's order (no EOS inside a prompt)
        prompts = [torch.randint(1, kwargs["vocab_size"], (n,), generator=gen).tolist() for n in lens]
        rows = [p for p in prompts for _ in range(group)]
        seeds = row_seeds(range(n_prompts), group)
        sampler = torch.Generator(device).manual_seed(2)
        counted = {}

        def run(n):
            with _autocast(cfg):
                if provider == "grpo-sampler":
                    out = sample_completions(model, rows, n, 1.0, EOS, seeds)
                else:
                    out = [s[len(p):] for s, p in zip(
                        generate(model, rows, n, temperature=1.0, eos_id=EOS, generator=sampler),
                        rows)]
            counted[n] = max(len(c) for c in out)
            return out

        gpu = device.type == "cuda"
        rep = 1500.0 if gpu else (40.0 if cfg.quick else 200.0)
        full = time_fn(lambda: run(new), device, rep / 10, rep)
        first = time_fn(lambda: run(1), device, rep / 20, rep / 4)
        if counted[new] != new:
            raise RuntimeError(f"every row ended at EOS after {counted[new]} of {new} tokens")
        per_step = (full.median - first.median) / (new - 1)
        if not per_step > 0:
            raise RuntimeError("decoding time not measurable (prefill dominated)")
        scale = per_step / full.median
        row.ms, row.ms_q20, row.ms_q80 = per_step, full.q20 * scale, full.q80 * scale
        row.value = len(rows) * 1e3 / per_step
        row.extra = {"prefill_ms": first.median, "total_ms": full.median, "ms_per_step": per_step}
        del model


SPECS = [GRPOSampling()]
