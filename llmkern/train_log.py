"""Training metrics: a JSONL log, the same rows as CSV, and a loss-curve PNG (matplotlib if present)."""
from __future__ import annotations

import csv
import json
import os
from typing import List, Optional

COLUMNS = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s",
           # the reward / dpo / grpo stages' own (empty for the others)
           "accuracy", "margin", "chosen_logp", "rejected_logp", "reward", "kl", "completion_tokens")


class MetricsLog:
    """Rows of COLUMNS in ``<out>/metrics.jsonl`` and ``<out>/metrics.csv``.

    ``resume_step``: rows after that step (written after the checkpoint a run resumes from)
    are dropped, so the log reads as one unbroken run. Without it the log starts empty.
    """

    def __init__(self, out: str, resume_step: Optional[int] = None):
        self.jsonl = os.path.join(out, "metrics.jsonl")
        self.csv = os.path.join(out, "metrics.csv")
        self.png = os.path.join(out, "loss.png")
        self.rows: List[dict] = []
        if resume_step is not None and os.path.isfile(self.jsonl):
            with open(self.jsonl, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line torn by a crash
                    if row.get("step", 0) <= resume_step:
                        self.rows.append(row)
        self._rewrite()

    def _rewrite(self) -> None:
        with open(self.jsonl, "w", encoding="utf-8") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        with open(self.csv, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    def log(self, **row) -> None:
        row = {k: row.get(k) for k in COLUMNS}
        self.rows.append(row)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", encoding="utf-8", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore").writerow(row)

    def plot(self) -> Optional[str]:
        """Write the loss curve; None when matplotlib is not installed or there is nothing to plot."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        train = [(r["step"], r["loss"]) for r in self.rows if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in self.rows if r.get("val_loss") is not None]
        if not train and not val:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.png)
        return self.png
