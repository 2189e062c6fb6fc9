"""Softmax over the last dim, forward / backward / forward+backward, GB/s against the
measured copy bandwidth: llmkern (Triton, CUDA) vs torch eager and torch.compile.
GPU cases: 4096 rows x {1024, 4096, 16384}, bf16 (issue 2).

    python benchmarks/bench_softmax.py [--quick] [--modes fwd] [--providers llmkern,torch] [--out DIR]

Any `llmkern bench` option works here; results go to benchmarks/results/ by default.
"""
from llmkern.bench.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("softmax", __file__))
