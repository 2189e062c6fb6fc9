"""Benchmark machinery behind `llmkern bench` (and its pytest-benchmark view in benchmarks/).

core (cases x providers x modes -> rows, n/a handling, oracle check, speedups), timing (CUDA
events via triton.testing.do_bench, a perf_counter loop on CPU), flops (work formulas), env
(device, versions, commit, measured peaks), providers (llmkern backends, torch eager,
torch.compile, SDPA backends, Liger-Kernel), ops_* (the cases of each op), e2e (GPT-2 training
step and generation), output (table, CSV, JSON, PNG), targets (the project's
performance targets, rendered in benchmarks/TARGETS.md), cli.
"""
