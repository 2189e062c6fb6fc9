"""The project's performance targets, checked against a run's rows, and the short summary.

``TARGETS`` is the table: each target is named by what it measures (op, mode, case, what it is
compared with) and holds a threshold. ``benchmarks/TARGETS.md`` renders it (``llmkern bench
--targets``). A target holds when its worst case holds: every matching row must meet it. A
target with no matching measurement is 'n/a' with the reason (provider not built, op missing,
not run). The targets are GPU targets: CPU runs show figures but check none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from llmkern.bench.output import _fmt


def _speedup(ref: str):
    return lambda r, rows: (r.get("speedups") or {}).get(ref)


def _vs_best_sdpa(r, rows):
    vals = [v for k, v in (r.get("speedups") or {}).items() if k.startswith("sdpa-") and k != "sdpa-best"]
    return min(vals) if vals else None


def _frac_peak(r, rows):
    return r.get("frac_peak")


def _value(r, rows):
    return r.get("value")


def _mfu(r, rows):
    return (r.get("extra") or {}).get("mfu")


def _ratio_to(provider: str, field: str):
    """This row's ``field`` over the same case's ``provider`` row (value or peak memory)."""
    def measure(r, rows):
        other = [o for o in rows if o["op"] == r["op"] and o["case"] == r["case"]
                 and o["mode"] == r["mode"] and o["provider"] == provider and o["status"] == "ok"]
        if not other or not other[0].get(field) or r.get(field) is None:
            return None
        return r[field] / other[0][field]
    return measure


@dataclass
class Target:
    name: str  # what it measures: op, mode, case, and what it is compared with
    op: str
    provider: str
    mode: str
    measure: Callable
    threshold: float
    where: Callable = lambda params: True
    at_most: bool = False  # True: the figure must stay at or below the threshold
    unit: str = "x"

    def requirement(self) -> str:
        figure = f"{self.threshold:g}x" if self.unit == "x" else (
            f"{self.threshold:.0%} {self.unit}" if self.unit.startswith("of") or self.unit == "MFU"
            else f"{self.threshold:g} {self.unit}")
        return ("<= " if self.at_most else ">= ") + figure


def _big_gemm(p):
    return min(p.get("M", 0), p.get("N", 0), p.get("K", 0)) >= 4096


def _lce_gpt2_case(p):
    return (p.get("tokens"), p.get("vocab"), p.get("hidden")) == (16384, 50304, 768)


def _gpt2_124m_batch1(p):
    return (p.get("model"), p.get("batch")) == ("124M", 1)


def _llama3_rotary(p):
    return (p.get("S"), p.get("Hq"), p.get("Hk"), p.get("D")) == (8192, 32, 8, 128)


def _llama3_mlp(p):
    return (p.get("tokens"), p.get("hidden"), p.get("intermediate")) == (8192, 4096, 14336)


def _llama_step_case(p):
    return p.get("model") == "4L-2048"


NORMS = ("layer_norm", "rms_norm", "softmax")
TARGETS = (
    [Target(f"{op} {mode} bf16: fraction of measured copy bandwidth", op, "llmkern-triton", mode,
            _frac_peak, 0.90, unit="of peak") for op in NORMS for mode in ("fwd", "bwd")]
    + [Target(f"{op} fwd+bwd bf16: speedup vs eager", op, "llmkern-triton", "fwd+bwd",
              _speedup("torch"), 1.5) for op in NORMS]
    + [Target(f"{op} fwd+bwd bf16: speedup vs torch.compile", op, "llmkern-triton", "fwd+bwd",
              _speedup("torch.compile"), 1.0) for op in NORMS]
    + [Target("attention fwd bf16: speedup vs the best SDPA backend (flash, efficient, cuDNN)",
              "attention", "llmkern-triton", "fwd", _vs_best_sdpa, 1.0),
       Target("attention bwd bf16: speedup vs the best SDPA backend (flash, efficient, cuDNN)",
              "attention", "llmkern-triton", "bwd", _vs_best_sdpa, 0.9),
       Target("attention fwd bf16 D=128 S=8192 non-causal: TFLOP/s (moonshot)", "attention",
              "llmkern-triton", "fwd", _value, 600.0, lambda p: (p.get("D"), p.get("S"), p.get("causal")) == (128, 8192, False),
              unit="TFLOP/s"),
       Target("GEMM fwd bf16 4096^3 and above: speedup vs cuBLAS", "gemm", "llmkern-triton", "fwd",
              _speedup("cublas-gemm"), 0.85, _big_gemm),
       Target("linear_gelu fwd bf16: speedup vs eager", "linear_gelu", "llmkern-triton", "fwd",
              _speedup("torch"), 1.2),
       Target("linear_gelu fwd bf16: speedup vs the bare cuBLAS GEMM", "linear_gelu",
              "llmkern-triton", "fwd", _speedup("cublas-gemm"), 0.95),
       Target("mlp fwd+bwd bf16: speedup vs eager", "mlp", "llmkern-triton", "fwd+bwd",
              _speedup("torch"), 1.1),
       Target("mlp fwd+bwd bf16: speedup vs torch.compile", "mlp", "llmkern-triton", "fwd+bwd",
              _speedup("torch.compile"), 1.0),
       Target("linear_cross_entropy fwd+bwd bf16 16384x50304x768: peak memory vs eager",
              "linear_cross_entropy", "llmkern-triton", "fwd+bwd", _ratio_to("torch", "peak_mem_mb"),
              0.25, _lce_gpt2_case, at_most=True, unit="of eager"),
       Target("linear_cross_entropy fwd+bwd bf16 16384x50304x768: speedup vs eager",
              "linear_cross_entropy", "llmkern-triton", "fwd+bwd", _speedup("torch"), 1.2,
              _lce_gpt2_case),
       Target("linear_logprobs fwd+bwd bf16 16384x50304x768: peak memory vs eager",
              "linear_logprobs", "llmkern-triton", "fwd+bwd", _ratio_to("torch", "peak_mem_mb"),
              0.25, _lce_gpt2_case, at_most=True, unit="of eager"),
       Target("linear_logprobs fwd+bwd bf16 16384x50304x768: speedup vs eager",
              "linear_logprobs", "llmkern-triton", "fwd+bwd", _speedup("torch"), 1.2,
              _lce_gpt2_case),
       Target("decode attention bf16 batch 1, Sk >= 32k: speedup vs the best SDPA backend",
              "decode_attention", "llmkern-triton", "fwd", _vs_best_sdpa, 1.5,
              lambda p: p.get("B") == 1 and p.get("Sk", 0) >= 32768),
       Target("decode attention bf16 batch 16: fraction of measured copy bandwidth (K/V read once)",
              "decode_attention", "llmkern-triton", "fwd", _frac_peak, 0.90,
              lambda p: p.get("B") == 16, unit="of peak")]
    + [Target(f"CUDA C++ {op} fwd bf16: fraction of measured copy bandwidth", op, "llmkern-cuda",
              "fwd", _frac_peak, 0.85, unit="of peak") for op in ("layer_norm", "softmax")]
    + [Target("CUDA C++ attention fwd bf16 D=128: speed vs llmkern's Triton kernel", "attention",
              "llmkern-cuda", "fwd", _ratio_to("llmkern-triton", "value"), 0.8,
              lambda p: p.get("D") == 128),
       Target("CUDA C++ mlp fwd bf16: speedup vs the bare cuBLAS GEMMs", "mlp", "llmkern-cuda",
              "fwd", _speedup("cublas-gemm"), 0.95),
       Target("GPT-2 124M training step bf16: MFU (datasheet peak)", "train_gpt2", "llmkern-triton",
              "step", _mfu, 0.50, unit="MFU"),
       Target("GPT-2 124M training step bf16: speedup vs eager", "train_gpt2", "llmkern-triton",
              "step", _speedup("torch"), 1.1),
       Target("GPT-2 124M training step bf16: speedup vs torch.compile", "train_gpt2",
              "llmkern-triton", "step", _speedup("torch.compile"), 1.0),
       Target("GPT-2 124M batch-1 greedy decoding bf16, compiled with CUDA graphs: speedup vs HF "
              "generate (SDPA)", "generate_gpt2", "llmkern-compiled", "decode",
              _speedup("hf-generate"), 3.0, _gpt2_124m_batch1),
       Target("GPT-2 124M batch-1 greedy decoding bf16, compiled with CUDA graphs: speedup vs the "
              "gpt-fast-style compiled loop", "generate_gpt2", "llmkern-compiled", "decode",
              _speedup("gpt-fast"), 1.0, _gpt2_124m_batch1),
       Target("GPT-2 124M GRPO sampling bf16 autocast: time per decoding step vs the plain generator",
              "grpo_sampling", "grpo-sampler", "decode", _ratio_to("generator", "ms"), 1.5,
              lambda p: p.get("model") == "124M", at_most=True)]
    + [Target(f"rotary {mode} bf16 Llama-3-8B q/k, 8k tokens: fraction of measured copy bandwidth",
              "rotary", "llmkern-triton", mode, _frac_peak, 0.90, _llama3_rotary, unit="of peak")
       for mode in ("fwd", "bwd")]
    + [Target("swiglu_mlp fwd+bwd bf16 4096->14336, 8k tokens: speedup vs eager", "swiglu_mlp",
              "llmkern-triton", "fwd+bwd", _speedup("torch"), 1.1, _llama3_mlp),
       Target("swiglu_mlp fwd+bwd bf16 4096->14336, 8k tokens: speedup vs torch.compile",
              "swiglu_mlp", "llmkern-triton", "fwd+bwd", _speedup("torch.compile"), 1.0, _llama3_mlp),
       Target("llama_step bf16 (HF Llama, 4 layers, hidden 2048, 8k tokens): speedup vs eager HF",
              "llama_step", "llmkern-triton", "step", _speedup("torch"), 1.2, _llama_step_case),
       Target("llama_step bf16 (HF Llama, 4 layers, hidden 2048, 8k tokens): peak memory vs eager HF",
              "llama_step", "llmkern-triton", "step", _ratio_to("torch", "peak_mem_mb"), 0.60,
              _llama_step_case, at_most=True, unit="of eager")]
)


def targets_markdown(targets=TARGETS) -> str:
    """The targets as the Markdown table of ``benchmarks/TARGETS.md``."""
    lines = ["| target | provider | required |", "|---|---|---|"]
    lines += [f"| {t.name} | {t.provider} | {t.requirement()} |" for t in targets]
    return "\n".join(lines)


def evaluate(rows: list, targets=TARGETS, skipped: Optional[dict] = None) -> list:
    """One dict per target: status 'met' | 'MISSED' | 'n/a', the worst figure and its case.

    ``skipped`` ({op: {provider: reason}}) explains a provider that never ran.
    """
    skipped = skipped or {}
    ran_ops = {r["op"] for r in rows}
    results = []
    for t in targets:
        mine = [r for r in rows if r["op"] == t.op and r["provider"] == t.provider
                and r["mode"] == t.mode and t.where(r.get("params") or {})]
        measured = []
        for r in mine:
            if r["status"] != "ok":
                continue
            value = t.measure(r, rows)
            if value is not None:
                measured.append((value, r["case"]))
        entry = {"target": t.name, "threshold": t.threshold, "unit": t.unit,
                 "required": t.requirement()}
        if not measured:
            reasons = [r.get("reason") for r in mine if r["status"] != "ok" and r.get("reason")]
            wrong = [r for r in mine if r["status"] == "wrong"]
            if wrong:
                why = "output WRONG: " + wrong[0]["reason"]
            elif reasons:
                why = reasons[0]
            elif t.provider in skipped.get(t.op, {}):
                why = f"{t.provider} not run: {skipped[t.op][t.provider]}"
            elif t.op not in ran_ops:
                why = f"{t.op} not benchmarked in this run"
            else:
                why = "no matching case or no reference to compare with"
            entry.update(status="n/a", worst=None, case="", reason=why)
        else:
            worst, case = (max if t.at_most else min)(measured, key=lambda x: x[0])
            ok = worst <= t.threshold if t.at_most else worst >= t.threshold
            entry.update(status="met" if ok else "MISSED", worst=worst, case=case, reason="",
                         cases=len(measured))
        results.append(entry)
    return results


PRIMARY_REF = {"attention": "sdpa-best", "gemm": "cublas-gemm"}


def headline(rows: list) -> list:
    """Per op, subject and mode: range of the figure and of the speedup over the main reference."""
    out = []
    keys = dict.fromkeys((r["op"], r["provider"], r["mode"]) for r in rows if r["role"] == "subject")
    for op, provider, mode in keys:
        mine = [r for r in rows if (r["op"], r["provider"], r["mode"]) == (op, provider, mode)]
        ok = [r for r in mine if r["status"] == "ok" and r.get("value") is not None]
        ref = PRIMARY_REF.get(op, "torch")
        if op == "attention" and ok and not any("sdpa-best" in (r.get("speedups") or {}) for r in ok):
            ref = next((k for k in (ok[0].get("speedups") or {}) if k.startswith("sdpa-")), ref)
        speed = [r["speedups"][ref] for r in ok if ref in (r.get("speedups") or {})]
        if not ok:
            first = next((r for r in mine if r.get("reason")), None)
            out.append({"op": op, "provider": provider, "mode": mode, "figure": "n/a",
                        "speedup": (first or {}).get("reason", "")[:50], "cases": 0})
            continue
        vals = [r["value"] for r in ok]
        metric = ok[0]["metric"]
        figure = f"{_fmt(min(vals))}-{_fmt(max(vals))} {metric}" if len(vals) > 1 else f"{_fmt(vals[0])} {metric}"
        spd = (f"{min(speed):.2f}-{max(speed):.2f}x vs {ref}" if len(speed) > 1 else
               f"{speed[0]:.2f}x vs {ref}") if speed else f"(no {ref})"
        out.append({"op": op, "provider": provider, "mode": mode, "figure": figure, "speedup": spd,
                    "cases": len(ok)})
    return out


def _table(header: list, body: list) -> list:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return lines


def summary_text(summary: dict, stages: Optional[list] = None) -> str:
    """The short table printed last by the GPU suite: stages, headline figures, targets."""
    meta = summary.get("meta", {})
    rows = [r for op in summary.get("ops", {}).values() for r in op.get("rows", [])]
    skipped = {name: op.get("skipped") or {} for name, op in summary.get("ops", {}).items()}
    lines = [f"llmkern benchmark summary: {meta.get('device', '?')}  commit {meta.get('commit', '?')}  "
             f"{meta.get('timestamp', '')}"]
    peaks = meta.get("peaks") or {}
    lines.append(f"measured peaks: copy {_fmt(peaks.get('copy_gbps'))} GB/s, "
                 f"{peaks.get('matmul_what', 'matmul')} {_fmt(peaks.get('matmul_tflops'))} TFLOP/s")
    if meta.get("cpu_figures"):
        lines.append("CPU figures — say nothing about GPU speed")
    quick = sorted(name for name, op in summary.get("ops", {}).items() if op.get("quick"))
    if quick:
        lines.append(f"quick runs (one or two cases each): {', '.join(quick)}")
    if stages:
        lines += ["", "stages:"] + [f"  {s}" for s in stages]
    lines += ["", "figures (llmkern rows; range over cases):"]
    lines += _table(["op", "provider", "mode", "cases", "figure", "speedup"],
                    [[h["op"], h["provider"], h["mode"], h["cases"], h["figure"], h["speedup"]]
                     for h in headline(rows)])
    lines += ["", "targets (benchmarks/TARGETS.md; the worst case must meet them):"]
    body = []
    for e in evaluate(rows, skipped=skipped):
        if e["status"] == "n/a":
            figure, note = "-", e["reason"][:90]
        else:
            unit = "" if e["unit"] == "x" else " " + e["unit"]
            figure = f"{e['worst']:.3g}{'x' if e['unit'] == 'x' else unit}"
            note = f"worst: {e['case']}"
        body.append([e["target"], e["required"], e["status"], figure, note])
    lines += _table(["target", "required", "status", "worst", "note"], body)
    return "\n".join(lines)


def markdown_text(summary: dict, image_dir: str = "benchmarks/results") -> str:
    """The README's GPU section from a results JSON: headline figures, targets and the plots."""
    meta = summary.get("meta", {})
    rows = [r for op in summary.get("ops", {}).values() for r in op.get("rows", [])]
    skipped = {name: op.get("skipped") or {} for name, op in summary.get("ops", {}).items()}
    peaks = meta.get("peaks") or {}
    lines = [f"**{meta.get('device', '?')}**, {meta.get('timestamp', '')[:10]}, commit "
             f"`{meta.get('commit', '?')}`, torch {meta.get('versions', {}).get('torch', '?')}, "
             f"triton {meta.get('versions', {}).get('triton', '?')}. Measured peaks: copy "
             f"{_fmt(peaks.get('copy_gbps'))} GB/s, {peaks.get('matmul_what', 'matmul')} "
             f"{_fmt(peaks.get('matmul_tflops'))} TFLOP/s.", "",
             "| op | provider | mode | cases | figure | speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {h['op']} | {h['provider']} | {h['mode']} | {h['cases']} | {h['figure']} | {h['speedup']} |"
              for h in headline(rows)]
    lines += ["", "| target | required | status | worst case |", "|---|---|---|---|"]
    for e in evaluate(rows, skipped=skipped):
        worst = e["reason"] if e["status"] == "n/a" else f"{e['worst']:.3g} ({e['case']})"
        lines.append(f"| {e['target']} | {e['required']} | {e['status']} | {worst.replace('|', '/')} |")
    slug = meta.get("slug", "device")
    lines.append("")
    lines += [f"![{name}]({image_dir}/{slug}_{name}.png)" for name in summary.get("ops", {})]
    return "\n".join(lines)
