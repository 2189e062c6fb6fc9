"""Outputs of a run: terminal table, CSV rows appended per device, JSON summary, PNG per op."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from typing import Iterable, Optional

CSV_COLUMNS = ["timestamp", "device", "op", "case", "params", "dtype", "mode", "provider", "role",
               "status", "reason", "ms", "ms_q20", "ms_q80", "metric", "value", "frac_peak",
               "peak_mem_mb", "rel_err", "speedups", "extra", "peak_copy_gbps",
               "peak_matmul_tflops", "cpu_figures", "quick", "commit", "llmkern", "torch",
               "triton", "cuda", "python"]
CPU_BANNER = "CPU figures — say nothing about GPU speed"


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def format_speedups(speedups: dict) -> str:
    order = ["torch", "torch.compile", "sdpa-best", "cublas-gemm", "liger"]
    names = [n for n in order if n in speedups] + sorted(n for n in speedups if n not in order)
    if "sdpa-best" in speedups:
        names = [n for n in names if not n.startswith("sdpa-") or n == "sdpa-best"]
    return ", ".join(f"{n} {speedups[n]:.2f}x" for n in names)


def _short(reason: str) -> str:
    """Drop the boilerplate in front of an op's own message ('RuntimeError: llmkern.x: ...')."""
    reason = re.sub(r"^(RuntimeError|ValueError|TypeError|NotImplementedError): ", "", reason)
    return re.sub(r"^llmkern\.\w+: ", "", reason)


def format_table(rows: list, title: str, peak_note: str = "", skipped: Optional[dict] = None,
                 width: int = 110) -> str:
    """Plain-text table of one op's rows (dicts or Row objects)."""
    rows = [r if isinstance(r, dict) else r.as_dict() for r in rows]
    header = ["case", "mode", "provider", "ms (q20-q80)", rows[0]["metric"] if rows else "value",
              "% peak", "mem MB", "speedup / n/a reason"]
    body = []
    for r in rows:
        if r["status"] == "n/a":
            note = "n/a: " + _short(r["reason"])
            cells = [r["case"], r["mode"], r["provider"], "n/a", "-", "-", "-", note[:width]]
        else:
            ms = f"{_fmt(r['ms'])} ({_fmt(r['ms_q20'])}-{_fmt(r['ms_q80'])})"
            frac = f"{100 * r['frac_peak']:.0f}%" if r.get("frac_peak") else "-"
            note = format_speedups(r.get("speedups") or {})
            if r["status"] == "wrong":
                note = "WRONG: " + r["reason"]
            cells = [r["case"], r["mode"], r["provider"], ms, _fmt(r["value"]), frac,
                     _fmt(r.get("peak_mem_mb")), note[:width]]
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    lines = [title + (f"   [{peak_note}]" if peak_note else "")]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    previous = None
    for cells in body:
        shown = list(cells)
        if previous is not None and cells[0] == previous:
            shown[0] = ""  # one case label per group keeps the table readable
        previous = cells[0]
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(shown, widths)).rstrip())
    for name, reason in (skipped or {}).items():
        lines.append(f"  (not run: {name}: {reason})")
    return "\n".join(lines)


def csv_rows(rows: Iterable, meta: dict) -> list:
    out = []
    stamp = meta.get("timestamp") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    peaks = meta.get("peaks") or {}
    vers = meta.get("versions") or {}
    for r in rows:
        r = r if isinstance(r, dict) else r.as_dict()
        rec = {k: r.get(k) for k in CSV_COLUMNS if k in r}
        rec.update(timestamp=stamp, device=meta.get("device", ""),
                   params=json.dumps(r.get("params", {}), sort_keys=True),
                   speedups=";".join(f"{k}={v:.4g}" for k, v in sorted((r.get("speedups") or {}).items())),
                   extra=json.dumps(r.get("extra") or {}, sort_keys=True),
                   peak_copy_gbps=peaks.get("copy_gbps"), peak_matmul_tflops=peaks.get("matmul_tflops"),
                   cpu_figures=meta.get("cpu_figures", False), quick=meta.get("quick", False),
                   commit=meta.get("commit", ""), **{k: vers.get(k, "") for k in
                                                      ("llmkern", "torch", "triton", "cuda", "python")})
        out.append(rec)
    return out


def append_csv(path: str, records: list) -> None:
    """Append to ``path``; the header is written once. An older file with other columns keeps its
    own header (missing fields stay empty, unknown ones are dropped) so history is never rewritten."""
    if not records:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    columns = CSV_COLUMNS
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="", encoding="utf-8") as f:
            columns = next(csv.reader(f), None) or CSV_COLUMNS
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", restval="")
        if not exists:
            writer.writeheader()
        writer.writerows(records)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def update_json(path: str, meta: dict, ops: dict) -> dict:
    """Merge this run's ops into the device's JSON summary (latest run of each op wins)."""
    summary = {"meta": {}, "ops": {}}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                summary = json.load(f)
        except (OSError, ValueError):
            pass
    summary.setdefault("ops", {}).update(ops)
    summary["meta"] = meta
    summary = _json_safe(summary)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return summary


def plot_op(path: str, op: str, rows: list, title: str) -> Optional[str]:
    """One PNG per op: a panel per mode, metric per case for each provider. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    rows = [r if isinstance(r, dict) else r.as_dict() for r in rows]
    ok = [r for r in rows if r["status"] in ("ok", "wrong") and r.get("value")]
    modes = [m for m in ("fwd", "bwd", "fwd+bwd", "step", "decode") if any(r["mode"] == m for r in ok)]
    if not modes:
        return None
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(max(6.0, 1.1 * len(cases)) * len(modes) ** 0.5 + 3,
                                                     4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for provider in dict.fromkeys(r["provider"] for r in ok):
            pts = {r["case"]: r["value"] for r in ok if r["mode"] == mode and r["provider"] == provider}
            if not pts:
                continue
            xs = [i for i, c in enumerate(cases) if c in pts]
            style = "-o" if provider.startswith("llmkern") else "--."
            ax.plot(xs, [pts[cases[i]] for i in xs], style, label=provider)
        ax.set_title(f"{op} {mode}")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(ok[0]["metric"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
