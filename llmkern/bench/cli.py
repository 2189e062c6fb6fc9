"""`llmkern bench`: run the benchmark suite (or part of it) and write the results.

    llmkern bench --quick                  # one small case per op (the README's main command)
    llmkern bench --ops attention          # one op, every case
    llmkern bench --summary benchmarks/results/nvidia-h100-80gb-hbm3.json   # targets table only
    llmkern bench --targets                # the performance targets (benchmarks/TARGETS.md)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import torch

from llmkern.bench import (core, e2e, e2e_align, ops_attention, ops_decode, ops_linear, ops_llama,
                           ops_loss, ops_norm)
from llmkern.bench.env import device_name, device_slug, git_commit, measure_peaks, versions
from llmkern.bench.flops import MODES
from llmkern.bench.output import (CPU_BANNER, append_csv, csv_rows, format_table, plot_op,
                                  update_json)
from llmkern.bench.targets import markdown_text, summary_text, targets_markdown
from llmkern.cli import CLIError

SPECS = (ops_norm.SPECS + ops_attention.SPECS + ops_decode.SPECS + ops_linear.SPECS
         + ops_loss.SPECS + ops_llama.SPECS + e2e.SPECS + e2e_align.SPECS)
BY_NAME = {s.name: s for s in SPECS}
GROUPS = {"all": list(BY_NAME), "norms": ["layer_norm", "rms_norm"],
          "linear": ["gemm", "linear_gelu", "mlp"],
          "loss": ["cross_entropy", "linear_cross_entropy", "linear_logprobs"],
          "llama": ["rotary", "swiglu_mlp", "llama_step"],
          "e2e": ["train_gpt2", "generate_gpt2", "grpo_sampling"]}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="one small case per op, shorter timings")
    p.add_argument("--ops", default="all",
                   help=f"comma list of ops or groups ({', '.join(list(BY_NAME) + list(GROUPS))})")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd, bwd, fwd+bwd")
    p.add_argument("--providers", default=None,
                   help="comma list of providers or prefixes (llmkern, llmkern-triton, llmkern-cuda, "
                        "torch, torch.compile, sdpa, sdpa-flash, cublas-gemm, liger); default all")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="input dtype (default bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--out", default=None,
                   help="results folder (default benchmarks/results if it exists here, else "
                        "./llmkern-bench-results)")
    p.add_argument("--no-save", action="store_true", help="print only: no CSV, JSON or PNG")
    p.add_argument("--no-plot", action="store_true", help="no PNG plots")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None, help="timed milliseconds per measurement")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: its default)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU runs: torch threads (default 1 with --quick: tiny ops only lose to "
                        "thread wake-ups, badly so on a loaded machine)")
    p.add_argument("--list", action="store_true", help="list ops, cases and providers, then exit")
    p.add_argument("--targets", action="store_true",
                   help="print the performance targets as a Markdown table, then exit")
    p.add_argument("--summary", default=None, metavar="JSON",
                   help="print the figures and the targets table of a results JSON, then exit")
    p.add_argument("--markdown", action="store_true",
                   help="with --summary: print the README's Markdown tables and plot links instead")
    p.add_argument("--stages", default=None, metavar="FILE",
                   help="with --summary: a text file of stage results to print above the table")


def _resolve_ops(text: str) -> list:
    names = []
    for item in _csv(text):
        if item in GROUPS:
            names += GROUPS[item]
        elif item in BY_NAME:
            names.append(item)
        else:
            raise CLIError(f"--ops: unknown op {item!r}; choose from "
                           f"{', '.join(list(BY_NAME) + list(GROUPS))}")
    return list(dict.fromkeys(names))


def _config(args) -> core.RunConfig:
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA device is available")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    modes = tuple(m for m in _csv(args.modes))
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise CLIError(f"--modes: unknown mode(s) {bad}; choose from {MODES}")
    default_rep = (50.0 if args.quick else 100.0) if gpu else (10.0 if args.quick else 40.0)
    return core.RunConfig(
        device=device, quick=args.quick, modes=modes,
        providers=tuple(_csv(args.providers)) if args.providers else None,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else (25.0 if gpu else 2.0),
        rep_ms=args.rep_ms if args.rep_ms is not None else default_rep,
        compile_mode=args.compile_mode)


def _provider_names(specs) -> list:
    names = []
    for spec in specs:
        if hasattr(spec, "all_providers"):
            providers = spec.all_providers()
        else:
            providers = e2e.e2e_providers() if e2e.is_e2e(spec) else spec.providers
        names += [p.name for p in providers]
    return list(dict.fromkeys(names))


def _check_providers(cfg: core.RunConfig, specs) -> None:
    """Every name in --providers must select some provider of the chosen ops."""
    if cfg.providers is None:
        return
    names = _provider_names(specs)
    if not cfg.providers:
        raise CLIError("--providers: empty list")
    for want in cfg.providers:
        if not any(n == want or n.startswith(want + "-") for n in names):
            raise CLIError(f"--providers: {want!r} names no provider of the chosen ops; "
                           f"choose from {', '.join(names)} (or a prefix such as llmkern, sdpa)")


def _results_dir(args) -> str:
    """The results folder, created and checked writable before anything runs."""
    if args.out:
        out = args.out
    else:
        here = os.path.join(os.getcwd(), "benchmarks", "results")
        out = here if os.path.isdir(here) else os.path.join(os.getcwd(), "llmkern-bench-results")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out}: exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return out


def _list(specs, cfg) -> int:
    for spec in specs:
        print(f"{spec.name}: {spec.description} [{spec.metric}]")
        if e2e.is_e2e(spec):
            continue
        active, skipped = core.select_providers(spec.providers, cfg)
        print("  providers: " + ", ".join(p.name for p in active))
        for name, reason in skipped.items():
            print(f"  not run: {name}: {reason}")
        for case in spec.cases(cfg):
            print(f"  case: {case.label} ({str(case.dtype).replace('torch.', '')}; "
                  f"{', '.join(m for m in case.modes if m in cfg.modes)})")
    return 0


def _print_summary(path: str, stages_file: Optional[str], markdown: bool = False) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError) as exc:
        raise CLIError(f"--summary {path}: cannot read it ({exc})") from None
    stages = None
    if stages_file:
        try:
            with open(stages_file, encoding="utf-8") as f:
                stages = [line.rstrip() for line in f if line.strip()]
        except OSError as exc:
            raise CLIError(f"--stages {stages_file}: cannot read it ({exc.strerror or exc})") from None
    print(markdown_text(summary) if markdown else summary_text(summary, stages))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.targets:
        print(targets_markdown())
        return 0
    if args.summary:
        return _print_summary(args.summary, args.stages, args.markdown)
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    specs = [BY_NAME[n] for n in _resolve_ops(args.ops)]
    cfg = _config(args)
    _check_providers(cfg, specs)
    if args.list:
        return _list(specs, cfg)
    out_dir = None if args.no_save else _results_dir(args)
    gpu = cfg.device.type == "cuda"
    threads = args.threads or (1 if args.quick and not gpu else None)
    if threads:
        torch.set_num_threads(threads)
    name = device_name(cfg.device)
    print(f"llmkern bench on {name}" + ("" if gpu else f" -- {CPU_BANNER}"), flush=True)
    peaks = measure_peaks(cfg.device, quick=args.quick)
    print(f"measured peaks: copy {peaks.copy_gbps or 0:.0f} GB/s, {peaks.matmul_what} "
          f"{peaks.matmul_tflops or 0:.3g} TFLOP/s" + "".join(f"; {n}" for n in peaks.notes), flush=True)
    meta = {"device": name, "slug": device_slug(cfg.device), "commit": git_commit(),
            "versions": versions(), "peaks": peaks.as_dict(), "cpu_figures": not gpu,
            "quick": args.quick, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    csv_path = os.path.join(out_dir or ".", f"{meta['slug']}.csv")
    json_path = os.path.join(out_dir or ".", f"{meta['slug']}.json")

    total = sum(s.steps(cfg) if e2e.is_e2e(s) else core.count_steps(s, cfg) for s in specs)
    try:
        from tqdm.auto import tqdm
        progress = tqdm(total=total, desc="llmkern bench", unit="run", leave=False, disable=None)
        write = tqdm.write
    except Exception:  # tqdm is a dependency, but the suite must not die for a progress bar
        progress, write = None, print
    summary = None
    try:
        for spec in specs:
            if progress is not None:
                progress.set_postfix_str(spec.name)
            rows, skipped = (spec.run(cfg, peaks, progress) if e2e.is_e2e(spec)
                             else core.run_op(spec, cfg, peaks, progress))
            peak = peaks.for_metric(spec.metric)
            note = f"{spec.metric}; measured peak {peak:.4g}" if peak else spec.metric
            title = f"== {spec.name}: {spec.description}" + ("" if gpu else f" ({CPU_BANNER})")
            write(format_table(rows, title, note, skipped) + "\n")
            if out_dir and rows:
                append_csv(csv_path, csv_rows(rows, meta))
                summary = update_json(json_path, meta, {spec.name: {
                    "rows": [r.as_dict() for r in rows], "skipped": skipped, "metric": spec.metric,
                    "description": spec.description, "commit": meta["commit"],
                    "timestamp": meta["timestamp"], "quick": args.quick}})
                if not args.no_plot:
                    plot_op(os.path.join(out_dir, f"{meta['slug']}_{spec.name}.png"), spec.name, rows,
                            f"{spec.name} on {name} ({meta['commit']}, {meta['timestamp'][:10]})"
                            + ("" if gpu else f" - {CPU_BANNER}"))
    finally:
        if progress is not None:
            progress.close()
    if summary is not None:
        print(summary_text(summary) if gpu else
              "the performance targets are GPU targets: not checked on a CPU run", flush=True)
        print(f"\nresults: {csv_path} (appended), {json_path}"
              + ("" if args.no_plot else f", {meta['slug']}_<op>.png"))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from llmkern.cli import run_command

    return run_command(sys.modules[__name__], argv, "bench")
