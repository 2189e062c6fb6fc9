"""The `llmkern bench` cases through pytest-benchmark: `pytest benchmarks/ --benchmark-only`.

One test per (op, case, provider, mode). A provider that cannot run a case is skipped with the
reason, as `llmkern bench` shows it n/a. pytest-benchmark times with a host clock, so each call
is followed by a device synchronize; `llmkern bench` (CUDA events) gives the published figures,
this path is for pytest-benchmark's comparison and history tools.
"""
import pytest
import torch

from llmkern.bench import cli, core
from llmkern.bench.flops import rate
from llmkern.bench.timing import synchronize

from .conftest import bench_config


def _params():
    cfg = bench_config()
    out = []
    for spec in cli.SPECS:
        if not isinstance(spec, core.OpSpec):
            continue  # end to end: `llmkern bench --ops e2e`
        active, _ = core.select_providers(spec.providers, cfg)
        for index, case in enumerate(spec.cases(cfg)):
            for provider in active:
                for mode in case.modes:
                    out.append(pytest.param(spec, index, provider, mode,
                                            id=f"{spec.name}-{case.label}-{provider.name}-{mode}"))
    return out


@pytest.mark.parametrize("spec,index,provider,mode", _params())
def test_bench(benchmark, bench_cfg, spec, index, provider, mode):
    case = spec.cases(bench_cfg)[index]
    sets = core.input_sets(case, bench_cfg.device, mode != "fwd")
    try:
        fn, grads, _ = core.prepare(spec, case, provider, bench_cfg, sets)
        if mode != "fwd" and grads is None:
            raise core.Unsupported("the output does not require grad (no backward)")
        call, _, leaves = core.mode_callables(fn, sets, grads, mode)
    except Exception as exc:
        pytest.skip(f"n/a: {core.short_reason(exc)}")

    def timed():
        for t in leaves:
            t.grad = None
        call()
        synchronize(bench_cfg.device)

    benchmark.group = f"{spec.name} {case.label} {mode}"
    benchmark.extra_info.update(op=spec.name, case=case.label, mode=mode, provider=provider.name,
                                metric=spec.metric, work=case.work(mode),
                                dtype=str(case.dtype).replace("torch.", ""))
    benchmark(timed)
    if benchmark.stats is not None:  # None under --benchmark-disable (a plain run of each case)
        median_ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info["value"] = rate(case.work(mode), median_ms, spec.metric)
    del sets, fn, grads
    if bench_cfg.device.type == "cuda":
        torch.cuda.empty_cache()
