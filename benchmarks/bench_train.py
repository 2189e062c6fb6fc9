"""End to end: GPT-2 124M training step at seq 1024 (tokens/s, MFU, peak memory) with
llmkern's backends vs the same model in eager PyTorch + SDPA and under torch.compile; and
greedy generation latency per token with the KV cache (issue 6).

    python benchmarks/bench_train.py [--quick] [--modes fwd] [--providers llmkern,torch] [--out DIR]

Any `llmkern bench` option works here; results go to benchmarks/results/ by default.
"""
from llmkern.bench.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("train_gpt2,generate_gpt2", __file__))
