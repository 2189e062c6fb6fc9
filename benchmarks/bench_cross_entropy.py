"""Cross-entropy over a large vocabulary (GB/s) and the fused LM head + loss (TFLOP/s and
peak memory): llmkern (Triton, CUDA) vs eager F.cross_entropy, torch.compile and Liger-Kernel.
Issue 4's case: 16384 tokens x vocab 50304 x hidden 768, bf16.

    python benchmarks/bench_cross_entropy.py [--quick] [--modes fwd] [--providers llmkern,torch] [--out DIR]

Any `llmkern bench` option works here; results go to benchmarks/results/ by default.
"""
from llmkern.bench.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("cross_entropy,linear_cross_entropy", __file__))
