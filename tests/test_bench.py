"""The benchmark machinery: quantiles, work formulas, n/a handling, outputs, targets, and a CPU
smoke run of `llmkern bench --quick` (the README's main command)."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import DEVICE
from llmkern import hardware
from llmkern.bench import core, flops, output, targets, timing
from llmkern.bench.cli import BY_NAME
from llmkern.bench.env import Peaks, device_slug

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


# ---- timing ------------------------------------------------------------------------------

def test_quantiles_match_numpy_linear_interpolation():
    values = torch.rand(37).tolist()
    for qs in ([0.5, 0.2, 0.8], [0.0, 1.0], [0.33]):
        assert timing.quantiles(values, qs) == pytest.approx(np.quantile(values, qs).tolist())
    assert timing.quantiles([3.0], [0.2, 0.5, 0.8]) == [3.0, 3.0, 3.0]
    t = timing.Timing.from_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.q20, t.q80, t.n) == (3.0, pytest.approx(1.8), pytest.approx(4.2), 5)


def test_quantiles_reject_bad_input():
    with pytest.raises(ValueError, match="empty"):
        timing.quantiles([], [0.5])
    with pytest.raises(ValueError, match="quantile"):
        timing.quantiles([1.0], [1.5])


def test_cpu_timer_orders_quantiles_and_resets_grads():
    x = torch.randn(8, requires_grad=True)
    t = timing.time_cpu(lambda: (x * 2).sum().backward(), warmup_ms=1, rep_ms=5, grad_to_none=[x])
    assert 0 < t.q20 <= t.median <= t.q80 and t.n >= 3
    assert torch.equal(x.grad, torch.full_like(x, 2.0))  # reset before each call: not accumulated


# ---- work formulas -----------------------------------------------------------------------

def test_attention_flops():
    fwd = flops.attention_flops(2, 3, 5, 7, 11, False, "fwd")
    assert fwd == 4 * 2 * 3 * 5 * 7 * 11
    assert flops.attention_flops(2, 3, 5, 7, 11, True, "fwd") == fwd / 2
    assert flops.attention_flops(2, 3, 5, 7, 11, False, "bwd") == 2.5 * fwd
    assert flops.attention_flops(2, 3, 5, 7, 11, False, "fwd+bwd") == 3.5 * fwd
    with pytest.raises(ValueError, match="mode"):
        flops.attention_flops(1, 1, 1, 1, 1, False, "backward")


def test_gemm_mlp_and_byte_counts():
    assert flops.gemm_flops(3, 5, 7, "fwd") == 2 * 3 * 5 * 7
    assert flops.gemm_flops(3, 5, 7, "bwd") == 4 * 3 * 5 * 7
    assert flops.gemm_flops(3, 5, 7, "fwd+bwd") == 6 * 3 * 5 * 7
    assert flops.mlp_flops(4, 8, 32, "fwd") == 2 * (2 * 4 * 8 * 32)
    # LayerNorm (weight + bias) over 4 x 10 in bf16: fwd reads x and 2 vectors, writes y
    assert flops.rowwise_bytes(4, 10, 2, "fwd", params=2) == (40 + 20 + 40) * 2
    assert flops.rowwise_bytes(4, 10, 2, "bwd", params=0) == 3 * 40 * 2
    assert flops.rowwise_bytes(4, 10, 2, "fwd+bwd", params=0) == 4 * 40 * 2
    assert flops.cross_entropy_bytes(4, 100, 2, "fwd") == 400 * 2 + 32
    assert flops.cross_entropy_bytes(4, 100, 2, "fwd+bwd") == 800 * 2 + 32
    assert flops.rate(2e12, 1000.0, "TFLOP/s") == pytest.approx(2.0)
    assert flops.rate(3e9, 1.0, "GB/s") == pytest.approx(3000.0)


def test_hardware_facts_gpt_flops_and_datasheet_peaks():
    assert hardware.gpt_flops_per_token(100, 2, 8, 16) == 600 + 12 * 2 * 8 * 16
    peak = hardware.datasheet_peak_tflops
    assert peak("NVIDIA H200") == peak("NVIDIA H100 80GB HBM3") == 989.5
    assert peak("NVIDIA H100 PCIe") == 756.0  # the specific name wins over "H100"
    assert (peak("NVIDIA A10G"), peak("NVIDIA A10"), peak("NVIDIA A100-SXM4-80GB")) == (70.0, 125.0, 312.0)
    assert peak("NVIDIA H200", torch.float32) is None and peak("Tesla T4") is None
    assert peak("Tesla T4", torch.float16) == 65.0 and peak("Some future GPU") is None


def test_no_mfu_without_a_datasheet_peak():
    # a CPU has no datasheet peak, so no MFU (a small measured matmul made it exceed 100%)
    assert hardware.datasheet_peak_flops(CPU) is None
    assert hardware.mfu(1e9, 10.0, None) is None and hardware.mfu(1e9, 10.0, 1e11) == 0.1
    tflops, what = hardware.measure_matmul_tflops(CPU, n=64, reps=3)
    assert tflops > 0 and what == "64x64x64 float32 matmul"
    assert hardware.measure_copy_gbps(CPU, nbytes=2**16, reps=3) > 0


# ---- runner: n/a handling, oracle check, speedups ---------------------------------------

def _toy_spec(providers):
    def make(device, requires_grad):
        return {"x": torch.randn(16, 32, device=device).requires_grad_(requires_grad)}

    case = core.Case("M=16 N=32", {"M": 16, "N": 32}, torch.float32, make,
                     lambda mode: flops.rowwise_bytes(16, 32, 4, mode))
    return core.OpSpec("toy", "GB/s", lambda cfg: [case], providers,
                       oracle=lambda i, c: torch.softmax(i["x"].float(), -1))


def _unsupported(case, cfg):
    raise core.Unsupported("head_dim 32 is not supported")


def _crashes(case, cfg):
    def fn(i):
        raise RuntimeError("kernel exploded")
    return fn


def test_failing_providers_show_na_with_reason_and_the_run_goes_on():
    spec = _toy_spec([
        core.Provider("llmkern-triton", lambda c, cfg: lambda i: torch.softmax(i["x"], -1), "subject"),
        core.Provider("llmkern-cuda", _unsupported, "subject"),
        core.Provider("broken", _crashes),
        core.Provider("wrong", lambda c, cfg: lambda i: torch.softmax(2 * i["x"], -1)),
        core.Provider("gone", None, available=lambda cfg: "not installed"),
        core.Provider("torch", lambda c, cfg: lambda i: torch.softmax(i["x"], -1)),
    ])
    cfg = core.RunConfig(device=CPU, warmup_ms=0.5, rep_ms=2.0)
    rows, skipped = core.run_op(spec, cfg, Peaks(copy_gbps=10.0))
    by = {(r.provider, r.mode): r for r in rows}
    assert skipped == {"gone": "not installed"}
    assert len(rows) == 5 * 3
    for mode in flops.MODES:
        assert by["llmkern-cuda", mode].status == "n/a"
        assert by["llmkern-cuda", mode].reason == "head_dim 32 is not supported"
        assert by["broken", mode].status == "n/a" and "kernel exploded" in by["broken", mode].reason
        assert by["wrong", mode].status == "wrong" and "rel err" in by["wrong", mode].reason
        ok = by["llmkern-triton", mode]
        assert ok.status == "ok" and ok.rel_err < 1e-6 and ok.ms > 0 and ok.value > 0
        assert ok.frac_peak == pytest.approx(ok.value / 10.0)
        assert ok.ms_q20 <= ok.ms <= ok.ms_q80
        # speedups only against references that ran correctly
        assert set(ok.speedups) == {"torch"}
        assert ok.speedups["torch"] == pytest.approx(by["torch", mode].ms / ok.ms)


def test_provider_selection_by_name_and_prefix():
    cfg = core.RunConfig(device=CPU, providers=("llmkern", "sdpa"))
    assert cfg.wants("llmkern-triton") and cfg.wants("sdpa-flash")
    assert not cfg.wants("torch") and not cfg.wants("torch.compile")
    assert core.RunConfig(device=CPU, providers=("torch",)).wants("torch")
    assert not core.RunConfig(device=CPU, providers=("torch",)).wants("torch.compile")


def test_every_op_has_cpu_cases_with_positive_work():
    cfg = core.RunConfig(device=CPU, quick=True)
    for name, spec in BY_NAME.items():
        if not isinstance(spec, core.OpSpec):
            continue
        for case in spec.cases(cfg):
            inputs = case.make_inputs(CPU, False)
            floats = [t for t in inputs.values() if t.is_floating_point()]
            assert floats and all(t.abs().sum() > 0 for t in floats), name  # never zeros
            assert all(case.work(m) > 0 for m in case.modes), name


# ---- outputs -----------------------------------------------------------------------------

def _row(provider="llmkern-triton", mode="fwd", **kw):
    base = dict(op="layer_norm", case="M=4096 N=4096", params={"M": 4096, "N": 4096},
                dtype="bfloat16", mode=mode, provider=provider,
                role="subject" if provider.startswith("llmkern") else "reference",
                metric="GB/s", ms=1.0, ms_q20=0.9, ms_q80=1.1, value=100.0)
    base.update(kw)
    return core.Row(**base)


def test_csv_append_writes_the_header_once(tmp_path):
    path = str(tmp_path / "dev.csv")
    meta = {"device": "Dev", "commit": "abc", "versions": {"torch": "2.x"}, "peaks": {"copy_gbps": 1.0}}
    output.append_csv(path, output.csv_rows([_row(), _row(mode="bwd")], meta))
    output.append_csv(path, output.csv_rows([_row(status="n/a", reason="why, with a comma")], meta))
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 3 and records[0]["commit"] == "abc" and records[0]["torch"] == "2.x"
    assert records[2]["status"] == "n/a" and records[2]["reason"] == "why, with a comma"
    assert json.loads(records[0]["params"]) == {"M": 4096, "N": 4096}
    with open(path) as f:
        assert sum(line.startswith("timestamp,") for line in f) == 1


def test_csv_append_keeps_an_older_header(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("timestamp,op,ms,old_column\n2025,x,1.0,7\n")
    output.append_csv(str(path), output.csv_rows([_row()], {"device": "Dev"}))
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    assert list(records[1]) == ["timestamp", "op", "ms", "old_column"]
    assert records[1]["op"] == "layer_norm" and records[1]["old_column"] == ""


def test_json_summary_merges_ops_and_drops_nonfinite(tmp_path):
    path = str(tmp_path / "dev.json")
    output.update_json(path, {"commit": "a"}, {"softmax": {"rows": [_row(rel_err=math.inf).as_dict()]}})
    summary = output.update_json(path, {"commit": "b"}, {"attention": {"rows": []}})
    assert set(summary["ops"]) == {"softmax", "attention"} and summary["meta"]["commit"] == "b"
    with open(path) as f:
        assert json.load(f)["ops"]["softmax"]["rows"][0]["rel_err"] is None


def test_table_shows_na_reasons_and_speedups():
    rows = [_row(speedups={"torch": 1.5, "torch.compile": 1.02}),
            _row(provider="llmkern-cuda", status="n/a", reason="RuntimeError: llmkern.layer_norm: no")]
    text = output.format_table(rows, "== layer_norm", skipped={"liger": "not importable"})
    assert "torch 1.50x, torch.compile 1.02x" in text
    assert "n/a: no" in text and "not run: liger: not importable" in text


def test_device_slug_for_cpu():
    assert device_slug(CPU) == "cpu"


# ---- targets -----------------------------------------------------------------------------

def test_targets_take_the_worst_case():
    rows = [_row(mode="fwd", frac_peak=0.9, case="a"), _row(mode="fwd", frac_peak=0.8, case="b"),
            _row(op="softmax", mode="fwd", frac_peak=0.95),
            _row(op="softmax", mode="fwd+bwd", speedups={"torch": 1.6, "torch.compile": 0.9})]
    rows = [r.as_dict() for r in rows]
    result = {e["target"]: e for e in targets.evaluate(rows, skipped={"rms_norm": {"llmkern-triton": "x"}})}
    ln = result["layer_norm fwd bf16: fraction of measured copy bandwidth"]
    assert ln["status"] == "MISSED" and ln["worst"] == 0.8 and ln["case"] == "b"
    assert result["softmax fwd bf16: fraction of measured copy bandwidth"]["status"] == "met"
    assert result["softmax fwd+bwd bf16: speedup vs eager"]["status"] == "met"
    assert result["softmax fwd+bwd bf16: speedup vs torch.compile"]["status"] == "MISSED"
    assert (result["rms_norm fwd bf16: fraction of measured copy bandwidth"]["reason"]
            == "llmkern-triton not run: x")
    best_sdpa = "attention fwd bf16: speedup vs the best SDPA backend (flash, efficient, cuDNN)"
    assert "not benchmarked" in result[best_sdpa]["reason"]


def test_memory_ratio_target_is_an_upper_bound():
    case = {"tokens": 16384, "vocab": 50304, "hidden": 768}
    rows = [_row(op="linear_cross_entropy", mode="fwd+bwd", params=case, peak_mem_mb=500.0),
            _row(op="linear_cross_entropy", mode="fwd+bwd", params=case, provider="torch", peak_mem_mb=4000.0)]
    result = targets.evaluate([r.as_dict() for r in rows])
    mem = next(e for e in result if "peak memory vs eager" in e["target"])
    assert mem["status"] == "met" and mem["worst"] == pytest.approx(0.125)


# ---- the command line --------------------------------------------------------------------

def _run_cli(args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "llmkern", "bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_quick_cpu_run_writes_every_output(tmp_path):
    out = tmp_path / "results"
    proc = _run_cli(["--quick", "--device", "cpu", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU figures — say nothing about GPU speed" in proc.stdout
    with open(out / "cpu.csv", newline="") as f:
        records = list(csv.DictReader(f))
    ops = {r["op"] for r in records}
    assert ops == set(BY_NAME), ops
    assert all(r["cpu_figures"] == "True" for r in records)
    assert any(r["status"] == "ok" for r in records)
    summary = json.loads((out / "cpu.json").read_text())
    assert set(summary["ops"]) == set(BY_NAME) and summary["meta"]["cpu_figures"] is True
    assert (out / "cpu_layer_norm.png").stat().st_size > 1000
    shown = _run_cli(["--summary", str(out / "cpu.json")])
    assert shown.returncode == 0 and "targets (benchmarks/TARGETS.md" in shown.stdout


def test_e2e_decoders_agree_and_the_decode_case_compares_them():
    """The decode benchmark's loops (llmkern's generator loop, HF generate, the plain-PyTorch
    static-cache loop) give llmkern.generate's greedy tokens with the same weights, run after
    run; the CPU case measures llmkern with its speedup over HF generate."""
    from llmkern.bench import e2e
    from llmkern.generate import generate
    from llmkern.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**e2e.TINY)).eval()
    ids = torch.randint(0, e2e.TINY["vocab_size"], (2, 8))
    decoders = [e2e._llmkern_decoder(model, False), e2e._plain_decoder(model, False)]
    if e2e._hf_available(None) is None:
        decoders.append(e2e._hf_decoder(model))
    with torch.no_grad():
        want = generate(model, ids, 6, greedy=True)[:, 8:]
        for build in decoders:
            run = build(ids, 6)
            assert torch.equal(run(6), want) and torch.equal(run(2), want[:, :2])
            assert torch.equal(run(6), want)
    cfg = core.RunConfig(device=CPU, quick=True, providers=["llmkern", "hf-generate"])
    rows, skipped = e2e.Generate().run(cfg, None)
    mine = [r for r in rows if r.provider == "llmkern"]
    assert mine and all(r.status == "ok" and r.value > 0 for r in mine), rows
    if e2e._hf_available(None) is None:
        assert all(r.speedups.get("hf-generate") for r in mine)


def test_linear_logprobs_case_checks_each_provider_against_the_fp32_oracle():
    """The log-prob op's providers sum the same per-token log-probs (llmkern's fused kernel in
    the interpreter, eager fp32), fwd and fwd+bwd, and the oracle flags a wrong one."""
    from llmkern.bench import ops_loss

    spec = ops_loss.LINEAR_LOGPROBS
    assert BY_NAME["linear_logprobs"] is spec
    wrong = core.Provider("off-by-T", lambda c, cfg: lambda i: 2 * ops_loss._llp_eager(c, cfg)(i))
    spec = core.OpSpec(spec.name, spec.metric, spec.cases, spec.providers + [wrong], spec.oracle)
    cfg = core.RunConfig(device=CPU, quick=True, providers=("llmkern-triton", "torch", "off-by-T"),
                         warmup_ms=0.5, rep_ms=2.0)
    rows, _ = core.run_op(spec, cfg, None)
    by = {(r.provider, r.mode): r for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        for name in ("llmkern-triton", "torch"):
            assert by[name, mode].status == "ok" and by[name, mode].rel_err < 1e-5, by[name, mode]
        assert by["off-by-T", mode].status == "wrong"
    assert set(by["llmkern-triton", "fwd+bwd"].speedups) == {"torch"}


def test_grpo_sampling_case_times_the_stage_sampler_and_the_generator():
    from llmkern.bench import e2e, e2e_align

    spec = BY_NAME["grpo_sampling"]
    assert e2e.is_e2e(spec) and not e2e.is_e2e(BY_NAME["linear_logprobs"])
    rows, skipped = spec.run(core.RunConfig(device=CPU, quick=True), None)
    assert not skipped and {r.provider for r in rows} == {"grpo-sampler", "generator"}
    assert all(r.status == "ok" and r.value > 0 and r.mode == "decode" for r in rows), rows
    mine = next(r for r in rows if r.provider == "grpo-sampler")
    ref = next(r for r in rows if r.provider == "generator")
    assert mine.extra["vs_generator"] == pytest.approx(mine.ms / ref.ms)
    assert mine.speedups["generator"] == pytest.approx(ref.ms / mine.ms)
    assert e2e_align.GRPOSampling().steps(core.RunConfig(device=CPU)) == len(rows)


def test_list_and_bad_arguments():
    listed = _run_cli(["--list", "--device", "cpu", "--ops", "attention"])
    assert listed.returncode == 0 and "sdpa-flash" in listed.stdout and "case:" in listed.stdout
    bad = _run_cli(["--ops", "nonsense", "--device", "cpu"])
    assert bad.returncode == 2 and "unknown op 'nonsense'" in bad.stderr


def _one_line_error(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("llmkern bench: error: ") and all(w in lines[0] for w in words)


def test_unknown_provider_is_an_error_not_an_empty_table():
    _one_line_error(_run_cli(["--quick", "--device", "cpu", "--no-save", "--ops", "layer_norm",
                              "--providers", "nope"]), "--providers", "'nope'")
    # a provider of another op selects nothing here either
    _one_line_error(_run_cli(["--quick", "--device", "cpu", "--no-save", "--ops", "layer_norm",
                              "--providers", "sdpa"]), "'sdpa'")


def test_unwritable_out_is_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(_run_cli(["--quick", "--device", "cpu", "--ops", "layer_norm",
                              "--out", str(blocker / "results")]), "--out", "cannot write")
    _one_line_error(_run_cli(["--quick", "--device", "cpu", "--ops", "layer_norm",
                              "--out", str(blocker)]), "--out", "not a folder")


def test_targets_table_is_the_documented_one():
    """benchmarks/TARGETS.md holds the table `llmkern bench --targets` prints: one source."""
    with open(os.path.join(ROOT, "benchmarks", "TARGETS.md"), encoding="utf-8") as f:
        doc = f.read()
    table = targets.targets_markdown()
    assert table in doc, "benchmarks/TARGETS.md is stale: paste `llmkern bench --targets` into it"
    names = [t.name for t in targets.TARGETS]
    assert len(set(names)) == len(names)
    shown = _run_cli(["--targets"])
    assert shown.returncode == 0 and shown.stdout.strip() == table


def test_gpu_check_dry_run_leaves_a_short_summary_and_three_files(tmp_path):
    """Without a GPU, benchmarks/gpu_check.sh runs its wiring: install check, environment,
    test collection per stage, canned benchmark figures, and the summary printed last."""
    import tarfile

    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_logs.tar.gz", "junit.xml",
                                                     "summary.txt"]
    summary = (out / "summary.txt").read_text()
    lines = summary.splitlines()
    assert len(lines) <= 60 and proc.stdout.rstrip().endswith(lines[-1])
    assert "DRY RUN" in lines[0]
    for stage in ("install", "env", "build", "test-bf16", "test-triton", "test-cuda", "bench"):
        assert any(line.split()[:1] == [stage] for line in lines), stage
    assert "needs GPU" in summary and "collected, not run" in summary
    assert sum(line.lstrip().startswith(("met", "MISSED", "n/a")) for line in lines) == len(targets.TARGETS)
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "./stages.tsv" in names and "./logs/env.log" in names and "./results/canned.json" in names


def test_gpu_check_stages_split_the_tests_without_loss_or_overlap():
    files = ["tests/test_layer_norm.py", "tests/test_cuda_ops.py"]

    def collect(*extra):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p",
                               "no:cacheprovider", "-p", "benchmarks.gpu_tests", *extra, *files],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:]
        return {line for line in proc.stdout.splitlines() if "::" in line}

    everything = collect()
    stages = {s: collect("--gpu-select", s) for s in ("bf16", "triton", "cuda")}
    assert set.union(*stages.values()) == everything
    assert sum(map(len, stages.values())) == len(everything)
    assert all("test_cuda_ops.py" in t or "[cuda" in t for t in stages["cuda"])
    assert stages["bf16"] and all("bf16" in t or "bfloat16" in t or "dtype2" in t for t in stages["bf16"])


@pytest.mark.gpu
def test_quick_gpu_run_measures_llmkern_kernels(tmp_path):
    proc = _run_cli(["--quick", "--ops", "layer_norm,softmax", "--modes", "fwd,fwd+bwd",
                     "--providers", "llmkern-triton,torch", "--rep-ms", "20", "--out", str(tmp_path)],
                    timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = [r for op in summary["ops"].values() for r in op["rows"]]
    mine = [r for r in rows if r["provider"] == "llmkern-triton"]
    assert mine and all(r["status"] == "ok" for r in mine), mine
    assert all(r["peak_mem_mb"] is not None and r["speedups"].get("torch") for r in mine)
    assert summary["meta"]["peaks"]["copy_gbps"] > 100 and DEVICE.type == "cuda"
