"""The GPU check's test selection, and a counter of the Triton kernels that selection compiles.

A pytest plugin (``-p benchmarks.gpu_tests``) with two options:

``--gpu-select=bf16|triton|cuda``
    Keeps the tests of one GPU-check stage among the collected ones: ``bf16`` the bf16 cases of
    the Triton kernels (bf16 ``tl.dot`` cannot run in the CPU interpreter, so these have never
    run anywhere else), ``triton`` their other cases, ``cuda`` the CUDA C++ backend's cases.
    A case is bf16 when one of its parameters is ``torch.bfloat16`` or its name says bf16; it
    is a CUDA case when its ``backend`` parameter is 'cuda' or it lives in test_cuda_ops.py.
``--count-kernels=FILE``
    Records each Triton launch as the JIT would specialize it on a GPU (kernel, constexpr
    values, argument dtypes, ints equal to 1 or divisible by 16, warps and stages) and writes
    the distinct specializations to FILE as JSON. It runs under ``TRITON_INTERPRET=1`` on a
    CPU. An autotuned GEMM counts each shipped config of its kind, since the autotuner
    compiles every one of them on a GPU; bf16 cases that only a GPU collects are estimated by
    the fp16 specializations with the dtype swapped (same kernels, same constexprs).
"""
from __future__ import annotations

import json

import torch

STAGES = ("bf16", "triton", "cuda")


def pytest_addoption(parser):
    group = parser.getgroup("llmkern GPU check")
    group.addoption("--gpu-select", choices=STAGES, default=None,
                    help="keep only the tests of this GPU-check stage")
    group.addoption("--count-kernels", default=None, metavar="FILE",
                    help="write the distinct Triton kernel specializations launched to FILE")


def _params(item) -> dict:
    callspec = getattr(item, "callspec", None)
    return dict(callspec.params) if callspec is not None else {}


def is_bf16(item) -> bool:
    values = _params(item).values()
    return any(v is torch.bfloat16 for v in values) or "bf16" in item.name or "bfloat16" in item.name


def is_cuda(item) -> bool:
    return _params(item).get("backend") == "cuda" or item.fspath.basename == "test_cuda_ops.py"


def stage_of(item) -> str:
    return "cuda" if is_cuda(item) else ("bf16" if is_bf16(item) else "triton")


def pytest_collection_modifyitems(config, items):
    stage = config.getoption("--gpu-select")
    if not stage:
        return
    keep = [i for i in items if stage_of(i) == stage]
    drop = [i for i in items if stage_of(i) != stage]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


# ---- specialization counter ----------------------------------------------------------------

def _spec(value):
    """How Triton's JIT specializes one runtime argument."""
    if isinstance(value, torch.Tensor):
        return str(value.dtype).replace("torch.", "")
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "1" if value == 1 else ("i32:16" if value % 16 == 0 else "i32")
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return "None"
    return type(value).__name__


def _constexpr_names(fn) -> set:
    import inspect

    out = set()
    for name, param in inspect.signature(fn.fn).parameters.items():
        ann = param.annotation
        if "constexpr" in (ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))):
            out.add(name)
    return out


class Counter:
    def __init__(self):
        self.keys = {}  # (kernel, args, launch) -> number of GPU compiles it stands for
        self.gemm = None  # (dtype, kind) of the GEMM about to launch

    def record(self, fn, args, kwargs):
        names = list(fn.arg_names)
        constexpr = _constexpr_names(fn)
        bound = dict(zip(names, args), **kwargs)
        parts = [f"{n}={bound[n]!r}" if n in constexpr else f"{n}:{_spec(bound[n])}"
                 for n in names if n in bound]
        launch = tuple(f"{k}={kwargs[k]}" for k in ("num_warps", "num_stages") if k in kwargs)
        compiles = 1
        if fn.__name__ == "_gemm_kernel" and self.gemm is not None:
            # the autotuner compiles every shipped config: count them, not the interpreter's one
            from llmkern.kernels.matmul import shipped_configs

            configs = shipped_configs(*self.gemm)
            tuned = set(configs[0].kwargs)
            parts = [p for p in parts if p.split("=")[0] not in tuned]
            launch, compiles = (), len(configs)
        self.keys[(fn.__name__, tuple(parts), launch)] = compiles

    def dump(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump([[k[0], list(k[1]), list(k[2]), n] for k, n in self.keys.items()], f)


def summarize(paths) -> dict:
    """The union of the specializations recorded in ``paths`` (one file per pytest process)."""
    keys = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for name, parts, launch, n in json.load(f):
                keys[(name, tuple(parts), tuple(launch))] = n
    total = sum(keys.values())
    # bf16 twins of the fp16 specializations (a GPU collects bf16 cases a CPU cannot)
    half = sum(n for k, n in keys.items() if any(p.endswith(":float16") for p in k[1]))
    kernels = sorted({k[0] for k in keys})
    return {"specializations": total, "bf16_estimate": half, "with_bf16": total + half,
            "per_kernel": {name: sum(n for k, n in keys.items() if k[0] == name) for name in kernels}}


_COUNTER = None


def pytest_collection_finish(session):
    # after collection: the tests' conftest has set TRITON_INTERPRET and imported llmkern
    global _COUNTER
    if not session.config.getoption("--count-kernels", default=None) or _COUNTER is not None:
        return
    from triton.runtime.interpreter import InterpretedFunction

    import llmkern.kernels.matmul as matmul

    _COUNTER = counter = Counter()
    run = InterpretedFunction.run

    def counting_run(self, *args, grid, warmup, **kwargs):
        counter.record(self, args, kwargs)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = counting_run
    kernel_for = matmul._kernel_for

    def remembering_kernel_for(dtype, kind):
        counter.gemm = (torch.float32 if dtype == torch.float32 else torch.float16, kind)
        return kernel_for(dtype, kind)

    matmul._kernel_for = remembering_kernel_for


def pytest_unconfigure(config):
    path = config.getoption("--count-kernels", default=None)
    if path and _COUNTER is not None:
        worker = getattr(config, "workerinput", {}).get("workerid")
        _COUNTER.dump(f"{path}.{worker}" if worker else path)


if __name__ == "__main__":  # python -m benchmarks.gpu_tests FILE...: the union, as JSON
    import sys

    print(json.dumps(summarize(sys.argv[1:]), indent=1))
