"""Benchmark machinery behind `llmkern bench` and the scripts in benchmarks/."""
