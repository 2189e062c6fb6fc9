"""Cross-entropy over a large vocabulary (GB/s) and the fused LM head + loss (TFLOP/s and
peak memory): llmkern (Triton, CUDA) vs eager F.cross_entropy, torch.compile and Liger-Kernel.
Issue 4's case: 16384 tokens x vocab 50304 x hidden 768, bf16.

    python benchmarks/bench_cross_entropy.py [--quick] [--modes fwd] [--providers llmkern,torch] [--out DIR]

Any `llmkern bench` option works here; results go to benchmarks/results/ by default.
"""
import os
import sys

from llmkern.bench.cli import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

OPS = "cross_entropy,linear_cross_entropy"

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args = ["--out", RESULTS, *args]
    raise SystemExit(main(["--ops", OPS, *args]))
