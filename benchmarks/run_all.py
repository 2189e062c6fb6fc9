"""Run the whole benchmark suite: each op script in its own process, then the summary table.

    python benchmarks/run_all.py [--quick] [--only attention,mlp] [--timeout 900] [--out DIR] [...]

One process per script, so a kernel that crashes the CUDA context (an illegal address) or hangs
costs only its own figures: the other scripts still run and the summary says what is missing.
Options this runner does not know are passed to every script (see `llmkern bench --help`).
Results: DIR (default benchmarks/results) gets <device>.csv (appended), <device>.json (the
latest run of each op) and <device>_<op>.png.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["bench_layer_norm", "bench_softmax", "bench_attention", "bench_mlp",
           "bench_cross_entropy", "bench_train"]


def _short(name: str) -> str:
    return name[len("bench_"):]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None,
                        help=f"comma list of scripts to run ({', '.join(map(_short, SCRIPTS))})")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("BENCH_SCRIPT_TIMEOUT", 1200)),
                        help="seconds per script before it is stopped (default 1200)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args, passthrough = parser.parse_known_args(argv)
    chosen = SCRIPTS
    if args.only:
        wanted = {s.strip().removeprefix("bench_") for s in args.only.split(",") if s.strip()}
        unknown = wanted - {_short(s) for s in SCRIPTS}
        if unknown:
            parser.error(f"unknown script(s) {sorted(unknown)}; choose from {[_short(s) for s in SCRIPTS]}")
        chosen = [s for s in SCRIPTS if _short(s) in wanted]
    os.makedirs(args.out, exist_ok=True)
    statuses = []
    for script in chosen:
        cmd = [sys.executable, os.path.join(HERE, script + ".py"), "--out", args.out, *passthrough]
        print(f"\n##### {script}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        try:
            code = subprocess.run(cmd, timeout=args.timeout).returncode
            status = "ok" if code == 0 else f"FAILED (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"TIMED OUT after {args.timeout:.0f} s"
        statuses.append(f"{script}: {status} ({time.time() - start:.0f} s)")
        print(f"##### {statuses[-1]}", flush=True)
    print("\n" + "\n".join(statuses))
    summaries = sorted(glob.glob(os.path.join(args.out, "*.json")), key=os.path.getmtime)
    summaries = [s for s in summaries if not os.path.basename(s).startswith("pytest-benchmark")]
    if summaries:
        from llmkern.bench.cli import main as bench_main

        print()
        bench_main(["--summary", summaries[-1]])
    return 0 if all(": ok" in s for s in statuses) else 1


if __name__ == "__main__":
    raise SystemExit(main())
