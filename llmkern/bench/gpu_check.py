"""The Python half of ``benchmarks/gpu_check.sh``: the environment report, the canned results of a
dry run, the merged junit XML and the summary printed last (at most about 60 lines).

    python -m llmkern.bench.gpu_check env WORKDIR         # device, versions, measured ceilings
    python -m llmkern.bench.gpu_check canned WORKDIR      # dry run: results JSON of made-up rows
    python -m llmkern.bench.gpu_check junit WORKDIR FILE  # the stages' junit files as one
    python -m llmkern.bench.gpu_check summary WORKDIR     # the summary, from what WORKDIR holds

WORKDIR holds ``stages.tsv`` (name, status, seconds, budget, note: one stage a line, written by
the script), ``env.json``, ``junit_<stage>.xml`` and ``results/*.json`` (``llmkern bench``).
"""
from __future__ import annotations

import glob
import json
import os
import platform
import sys
import xml.etree.ElementTree as ET

from llmkern.bench.output import _fmt

MAX_FAILURES = 8
CANNED_DEVICE = "DRY RUN (canned figures, no GPU)"


def _env(work: str) -> int:
    import torch

    import llmkern
    from llmkern.bench.env import device_name, git_commit
    from llmkern.hardware import datasheet_peak_tflops, measure_copy_gbps, measure_matmul_tflops

    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "absent"
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    name = device_name(device)
    info = {"device": name, "commit": git_commit(), "gpu": gpu,
            "versions": {"llmkern": llmkern.__version__, "torch": torch.__version__,
                         "triton": triton_version, "cuda": torch.version.cuda or "none",
                         "python": platform.python_version()}}
    if gpu:
        cap = torch.cuda.get_device_capability()
        info["capability"] = f"sm_{cap[0]}{cap[1]}"
        info["datasheet_tflops"] = datasheet_peak_tflops(name)
    info["copy_gbps"] = measure_copy_gbps(device)
    info["matmul_tflops"], info["matmul_what"] = measure_matmul_tflops(device)
    with open(os.path.join(work, "env.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    print(_env_lines(info, ""), flush=True)
    return 0


def _env_lines(info: dict, dry: str) -> str:
    v = info.get("versions", {})
    cap = f" ({info['capability']})" if info.get("capability") else ""
    sheet = f", datasheet {info['datasheet_tflops']:g}" if info.get("datasheet_tflops") else ""
    return "\n".join([
        f"device: {info.get('device', '?')}{cap}{dry}",
        f"versions: llmkern {v.get('llmkern', '?')}, torch {v.get('torch', '?')}, triton "
        f"{v.get('triton', '?')}, CUDA {v.get('cuda', '?')}, Python {v.get('python', '?')}",
        f"measured: copy {_fmt(info.get('copy_gbps'))} GB/s, {info.get('matmul_what', 'matmul')} "
        f"{_fmt(info.get('matmul_tflops'))} TFLOP/s{sheet}"])


def _canned(work: str) -> int:
    """A results JSON whose rows make every kind of target line (met, MISSED, n/a) show."""
    from llmkern.bench.targets import TARGETS

    params = {"D": 128, "S": 8192, "causal": False, "M": 4096, "N": 4096, "K": 4096,
              "tokens": 16384, "vocab": 50304, "hidden": 768}
    rows = {}

    def row(op, provider, mode):
        return rows.setdefault((op, provider, mode), {
            "op": op, "case": "canned", "params": params, "mode": mode, "provider": provider,
            "status": "ok", "metric": "x", "dtype": "bfloat16", "role": "subject",
            "value": 1.0, "speedups": {}, "extra": {}, "peak_mem_mb": 1.0})

    for i, t in enumerate(TARGETS):
        if i % 7 == 6:
            continue  # no figure: shows as n/a
        figure = t.threshold * (0.8 if (i % 4 == 3) != t.at_most else 1.2)  # every 4th missed
        r = row(t.op, t.provider, t.mode)
        if t.unit == "of peak":
            r["frac_peak"] = figure
        elif t.unit == "MFU":
            r["extra"]["mfu"] = figure
        elif t.unit == "TFLOP/s":
            r["value"] = figure
        elif t.unit == "of eager":  # peak memory over the eager row's
            r["peak_mem_mb"] = figure
            row(t.op, "torch", t.mode)
        elif "Triton kernel" in t.name:  # value over the Triton row's value
            r["value"] = figure * row(t.op, "llmkern-triton", t.mode)["value"]
        elif "best SDPA" in t.name:
            r["speedups"].update({"sdpa-flash": figure, "sdpa-cudnn": figure * 1.5})
        else:
            ref = ("torch.compile" if "torch.compile" in t.name else
                   "cublas-gemm" if "cuBLAS" in t.name else "torch")
            r["speedups"][ref] = figure
    ops = {}
    for r in rows.values():
        ops.setdefault(r["op"], {"rows": [], "skipped": {}, "quick": True})["rows"].append(r)
    summary = {"meta": {"device": CANNED_DEVICE, "commit": "canned", "quick": True}, "ops": ops}
    os.makedirs(os.path.join(work, "results"), exist_ok=True)
    with open(os.path.join(work, "results", "canned.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f)
    print(f"canned results: {len(rows)} rows for {len(ops)} ops (dry run)")
    return 0


def _junit_files(work: str) -> list:
    return sorted(glob.glob(os.path.join(work, "junit_*.xml")))


def _merge_junit(work: str, dest: str) -> int:
    root = ET.Element("testsuites")
    for path in _junit_files(work):
        try:
            tree = ET.parse(path).getroot()
        except (ET.ParseError, OSError):
            continue
        stage = os.path.basename(path)[len("junit_"):-len(".xml")]
        for suite in ([tree] if tree.tag == "testsuite" else list(tree)):
            suite.set("name", f"gpu-check {stage}")
            root.append(suite)
    ET.ElementTree(root).write(dest, encoding="utf-8", xml_declaration=True)
    return 0


def junit_counts(path: str) -> tuple:
    """({passed, failed, skipped}, [first line of each failure]) of one junit file."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return counts, failures
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            msg = (bad.get("message") or bad.text or "").strip().splitlines()
            where = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name', '')}"
            failures.append(f"{where}: {msg[0] if msg else '?'}"[:150])
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failures


def _stages(work: str) -> list:
    out = []
    try:
        with open(os.path.join(work, "stages.tsv"), encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4:
                    out.append(parts + [""] * (5 - len(parts)))
    except OSError:
        pass
    return out


def summary_text(work: str) -> str:
    from llmkern.bench.targets import evaluate

    try:
        with open(os.path.join(work, "env.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = {}
    results = sorted(glob.glob(os.path.join(work, "results", "*.json")), key=os.path.getmtime)
    bench = {}
    if results:
        with open(results[-1], encoding="utf-8") as f:
            bench = json.load(f)
    dry = bench.get("meta", {}).get("device") == CANNED_DEVICE
    lines = [f"llmkern GPU check  commit {info.get('commit', '?')}"
             + ("  -- DRY RUN: no GPU here; stages marked 'needs GPU' did not run" if dry else ""),
             _env_lines(info, ""), "", "stages (status, seconds / budget, detail):"]
    failures = []
    for name, status, secs, budget, note in _stages(work):
        detail = note
        junit = os.path.join(work, f"junit_{name}.xml")
        counts, fails = junit_counts(junit) if os.path.exists(junit) else ({}, [])
        if sum(counts.values()):
            detail = (f"{counts['passed']} passed, {counts['failed']} failed, "
                      f"{counts['skipped']} skipped" + (f"; {note}" if note else ""))
            failures += [f"[{name}] {f}" for f in fails]
        lines.append(f"  {name:<12} {status:<7} {secs:>4} / {budget:<4} {detail}"[:160])
    rows = [r for op in bench.get("ops", {}).values() for r in op.get("rows", [])]
    skipped = {n: op.get("skipped") or {} for n, op in bench.get("ops", {}).items()}
    lines += ["", "targets (benchmarks/TARGETS.md; quick cases, the worst must meet them)"
              + (" -- CANNED figures" if dry else "") + ":"]
    if not bench:
        lines.append("  no benchmark results (the bench stage did not run or wrote nothing)")
    else:
        for e in evaluate(rows, skipped=skipped):
            if e["status"] == "n/a":
                figure = "n/a: " + e["reason"][:60]
            else:
                unit = e["unit"]
                figure = (f"{e['worst']:.3g}x" if unit == "x" else f"{e['worst']:.0%} {unit}"
                          if unit.startswith("of") or unit == "MFU" else f"{e['worst']:.3g} {unit}")
            lines.append(f"  {e['status']:<6} {e['target']} [{e['required']}]: {figure}"[:160])
    if failures:
        lines += ["", f"failures (first {min(len(failures), MAX_FAILURES)} of {len(failures)}):"]
        lines += [f"  {f}" for f in failures[:MAX_FAILURES]]
    lines += ["", "files: summary.txt, gpu_check_logs.tar.gz (logs, CSV, JSON, PNG), junit.xml"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) < 2 or argv[0] not in ("env", "canned", "junit", "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    what, work = argv[0], argv[1]
    if what == "env":
        return _env(work)
    if what == "canned":
        return _canned(work)
    if what == "junit":
        return _merge_junit(work, argv[2])
    print(summary_text(work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
