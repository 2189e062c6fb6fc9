"""The GEMM alone (vs cuBLAS), linear+bias+GELU and the GPT-2 MLP, TFLOP/s: llmkern (Triton,
CUDA) vs torch eager, torch.compile and the bare cuBLAS GEMMs. GPU cases: 4096^3, 8192^3 and
GPT-2 124M / 1.5B shapes at 8192 and 16384 tokens, bf16 (issue 4).

    python benchmarks/bench_mlp.py [--quick] [--modes fwd] [--providers llmkern,torch] [--out DIR]

Any `llmkern bench` option works here; results go to benchmarks/results/ by default.
"""
from llmkern.bench.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("gemm,linear_gelu,mlp", __file__))
