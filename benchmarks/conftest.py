"""pytest-benchmark setup for `pytest benchmarks/ --benchmark-only`.

The cases are those of `llmkern bench`: the quick ones by default, every case with
LLMKERN_BENCH_FULL=1. LLMKERN_BENCH_PROVIDERS (comma list, e.g. "llmkern,torch") and
LLMKERN_BENCH_DEVICE (cuda | cpu) narrow the run.
"""
import os

import pytest
import torch


def bench_config():
    from llmkern.bench.core import RunConfig
    from llmkern.bench.flops import MODES

    device = os.environ.get("LLMKERN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    providers = os.environ.get("LLMKERN_BENCH_PROVIDERS")
    return RunConfig(device=torch.device(device),
                     quick=os.environ.get("LLMKERN_BENCH_FULL", "0") in ("", "0"), modes=MODES,
                     providers=tuple(p.strip() for p in providers.split(",")) if providers else None)


@pytest.fixture(scope="session")
def bench_cfg():
    cfg = bench_config()
    if cfg.device.type == "cpu" and cfg.quick:
        torch.set_num_threads(1)  # as `llmkern bench --quick`: tiny ops lose to thread wake-ups
    return cfg
