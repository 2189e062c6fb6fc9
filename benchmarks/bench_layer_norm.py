"""LayerNorm and RMSNorm, forward / backward / forward+backward, GB/s against the
measured copy bandwidth: llmkern (Triton, CUDA) vs torch eager, torch.compile and Liger-Kernel.
GPU cases: 4096 rows x {1024, 4096, 16384}, bf16 (issue 2).

    python benchmarks/bench_layer_norm.py [--quick] [--modes fwd] [--providers llmkern,torch] [--out DIR]

Any `llmkern bench` option works here; results go to benchmarks/results/ by default.
"""
import os
import sys

from llmkern.bench.cli import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

OPS = "layer_norm,rms_norm"

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args = ["--out", RESULTS, *args]
    raise SystemExit(main(["--ops", OPS, *args]))
