"""The Llama-family benchmark cases (llmkern/bench/ops_llama.py): each runs quick on a CPU, its
providers agree with the fp32 oracle (llmkern's kernels through the interpreter), a wrong
provider is flagged, and the training step compares patched and eager HF Llama with the same
weights without leaving the module-wide patches behind."""
import re
import subprocess
import sys

import pytest
import torch

from llmkern.bench import core, ops_llama
from llmkern.bench.cli import BY_NAME

CPU = torch.device("cpu")


def _quick(providers):
    return core.RunConfig(device=CPU, quick=True, providers=providers, warmup_ms=0.5, rep_ms=2.0)


@pytest.mark.parametrize("spec", [ops_llama.ROTARY, ops_llama.SWIGLU_MLP], ids=lambda s: s.name)
def test_op_cases_agree_with_the_oracle_and_flag_a_wrong_provider(spec):
    assert BY_NAME[spec.name] is spec
    eager = dict((p.name, p) for p in spec.providers)["torch"].build
    wrong = core.Provider("doubled", lambda c, cfg: lambda i: 2 * eager(c, cfg)(i))
    spec = core.OpSpec(spec.name, spec.metric, spec.cases, spec.providers + [wrong], spec.oracle)
    rows, _ = core.run_op(spec, _quick(("llmkern-triton", "torch", "doubled")), None)
    by = {(r.provider, r.mode): r for r in rows}
    modes = {r.mode for r in rows}
    assert modes == ({"fwd", "bwd", "fwd+bwd"} if spec.name == "rotary" else {"fwd", "fwd+bwd"})
    for mode in modes:
        for name in ("llmkern-triton", "torch"):
            row = by[name, mode]
            assert row.status == "ok" and row.rel_err < 1e-5 and row.value > 0, row
        assert by["doubled", mode].status == "wrong"
        assert set(by["llmkern-triton", mode].speedups) == {"torch"}  # never vs a wrong row


def test_work_counts():
    # q (1, 32, 8192, 128) and k (1, 8, ...) in bf16: read and written once, tables (fp32) once
    qk = 8192 * 40 * 128
    one = 2 * qk * 2 + 2 * 8192 * 64 * 4
    assert ops_llama.rotary_bytes(1, 8192, 32, 8, 128, 2, "bwd") == one
    assert ops_llama.rotary_bytes(1, 8192, 32, 8, 128, 2, "fwd") == one + 2 * qk * 2
    assert ops_llama.swiglu_flops(8192, 4096, 14336, "fwd") == 3 * 2 * 8192 * 4096 * 14336
    assert ops_llama.swiglu_flops(8192, 4096, 14336, "fwd+bwd") == 9 * 2 * 8192 * 4096 * 14336
    gpu = core.RunConfig(device=torch.device("cuda"), quick=True)
    (case,) = ops_llama.ROTARY.cases(gpu)
    assert case.params == {"B": 1, "S": 8192, "Hq": 32, "Hk": 8, "D": 128}
    (case,) = ops_llama.SWIGLU_MLP.cases(gpu)
    assert case.params == {"tokens": 8192, "hidden": 4096, "intermediate": 14336}


def test_llama_step_patched_and_eager_rows():
    """The patched model (Triton kernels in the interpreter) and eager HF take the same first
    loss as the fp32 oracle; the rows carry tokens/s and the speedup; HF's modeling module is
    left as it was (patch() swaps its rotary function module-wide)."""
    pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    rope, forward = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaForCausalLM.forward
    step = BY_NAME["llama_step"]
    assert isinstance(step, ops_llama.LlamaStep)
    rows, skipped = step.run(_quick(("llmkern-triton", "torch")), None)
    assert "liger" not in skipped and {r.provider for r in rows} == {"llmkern-triton", "torch"}
    for r in rows:
        assert r.status == "ok" and r.rel_err < 1e-4 and r.value > 0 and r.ms > 0, r
        assert r.params["batch"] * r.params["seq"] == r.extra["tokens_per_step"]
    mine = next(r for r in rows if r.provider == "llmkern-triton")
    assert set(mine.speedups) == {"torch"}
    assert modeling_llama.apply_rotary_pos_emb is rope
    assert modeling_llama.LlamaForCausalLM.forward is forward


def test_cli_quick_runs_the_three_ops():
    proc = subprocess.run([sys.executable, "-m", "llmkern", "bench", "--quick", "--device", "cpu",
                           "--ops", "rotary,swiglu_mlp,llama_step", "--no-save"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for op in ("rotary", "swiglu_mlp", "llama_step"):
        assert f"== {op}:" in proc.stdout
    step = proc.stdout.split("== llama_step")[1]
    assert re.search(r"step\s+torch\s+\d", step) or "transformers is not importable" in step
