"""Flash attention, forward / backward / forward+backward, TFLOP/s (4*B*H*Sq*Sk*D forward,
halved when causal, backward 2.5x): llmkern (Triton, CUDA) vs SDPA's flash, memory-efficient
and cuDNN backends and the math backend. GPU cases: bf16, head_dim 64 and 128, S = 512..16k at
16k tokens per batch, causal and not (issue 3).

    python benchmarks/bench_attention.py [--quick] [--modes fwd] [--providers llmkern,torch] [--out DIR]

Any `llmkern bench` option works here; results go to benchmarks/results/ by default.
"""
import os
import sys

from llmkern.bench.cli import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

OPS = "attention"

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args = ["--out", RESULTS, *args]
    raise SystemExit(main(["--ops", OPS, *args]))
