"""Ahead-of-time compile of every shipped Triton config, for GPU targets, on a machine without one.

    python -m llmkern.bench.aot --arch 90 80

The same compile the kernel tests run (``llmkern.testing.aot_reports`` over each kernel module's
``aot_configs``), as one command, so CI can repeat it under another Triton version (the GPU
machine's) in its own environment. Prints one line per kernel module and arch, then every
problem (spills, shared memory over the limit); exits 1 when a compile fails or a problem is
found. ``--table`` also prints one row per config: registers, shared memory, spill bytes, and
whether the PTX has wgmma, TMA (cp.async.bulk.tensor) and warp specialization (setmaxnreg).
"""
from __future__ import annotations

import argparse
import sys
import time


def table(reports) -> list[str]:
    """One row per compile: config -> registers, smem, spills, wgmma, TMA, WS (setmaxnreg)."""
    width = max([len(r.name) for r in reports] + [6])
    yes = {True: "yes", False: "-"}
    rows = [f"  {'config':<{width}}  arch  regs    smem  spills  wgmma  TMA  WS"]
    for r in reports:
        rows.append(f"  {r.name:<{width}}  {r.arch:>4}  {r.registers:>4}  {r.shared_bytes:>6}  "
                    f"{r.spill_bytes:>6}  {yes[r.uses_wgmma]:>5}  {yes[r.uses_tma]:>3}  "
                    f"{yes[r.uses_setmaxnreg]:>2}")
    return rows


def kernel_modules() -> list:
    """Every module of llmkern.kernels that ships configs (defines ``aot_configs``); each one's
    ``aot_configs`` defaults cover all its shipped dtypes."""
    import importlib
    import pkgutil

    import llmkern.kernels as kernels

    names = [f"llmkern.kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__)]
    return [n for n in sorted(names) if hasattr(importlib.import_module(n), "aot_configs")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmkern.bench.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="SM versions (default 90 80)")
    modules = kernel_modules()
    p.add_argument("--modules", nargs="+", default=modules, choices=modules,
                   help="kernel modules (default: all)")
    p.add_argument("--table", action="store_true",
                   help="print each config's registers, smem, spills, wgmma, TMA and WS")
    args = p.parse_args(argv)
    import triton

    from llmkern.testing import SHARED_MEMORY_LIMIT, aot_reports

    bad = [a for a in args.arch if a not in SHARED_MEMORY_LIMIT]
    if bad:
        p.error(f"--arch: no shared-memory limit known for {bad}; choose from {sorted(SHARED_MEMORY_LIMIT)}")
    print(f"ahead-of-time compile with triton {triton.__version__} for sm_{', sm_'.join(map(str, args.arch))}")
    failed, problems = [], []
    for module in args.modules:
        t0 = time.time()
        try:  # one process per arch, in parallel
            reports = aot_reports(module, archs=tuple(args.arch))
        except Exception as exc:
            failed.append(f"{module}: {str(exc).strip()[-2000:]}")
            print(f"  {module}: FAILED to compile ({time.time() - t0:.0f} s)", flush=True)
            continue
        found = [q for r in reports for q in r.problems()]
        problems += found
        per_arch = ", ".join(f"sm_{a}: {sum(r.arch == a for r in reports)}" for a in args.arch)
        print(f"  {module}: {len(reports)} configs ({per_arch}), {len(found)} problems, "
              f"{sum(r.uses_wgmma for r in reports)} with wgmma ({time.time() - t0:.0f} s)", flush=True)
        if args.table:
            print("\n".join(table(reports)), flush=True)
    for line in problems + failed:
        print(line)
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
