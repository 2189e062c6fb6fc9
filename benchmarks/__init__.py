"""The pytest-benchmark view of the `llmkern bench` cases (a package only so that pytest can tell benchmarks/test_bench.py from
tests/test_bench.py when both are collected in one session)."""
