"""Flash attention, forward / backward / forward+backward, TFLOP/s (4*B*H*Sq*Sk*D forward,
halved when causal, backward 2.5x): llmkern (Triton, CUDA) vs SDPA's flash, memory-efficient
and cuDNN backends and the math backend. GPU cases: bf16, head_dim 64 and 128, S = 512..16k at
16k tokens per batch, causal and not (issue 3).

    python benchmarks/bench_attention.py [--quick] [--modes fwd] [--providers llmkern,torch] [--out DIR]

Any `llmkern bench` option works here; results go to benchmarks/results/ by default.
"""
from llmkern.bench.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("attention", __file__))
