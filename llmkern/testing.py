"""Test utilities: the tolerance rule and ahead-of-time Triton compile reports.

Usable without a GPU: ``aot_compile`` builds a Triton kernel for an sm_80/sm_90 target on a
CPU machine and runs ptxas on the result to read registers, spills and shared memory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Iterable, Optional

import torch

# Shared memory a block may use (bytes): A100 (sm_80) and H100/H200 (sm_90).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, in float64; NaN or inf anywhere makes it inf."""
    diff = (a.double() - b.double()).abs()
    if not torch.isfinite(diff).all():
        return float("inf")
    return diff.max().item() if diff.numel() else 0.0


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor,
                        atol: float, name: str = "output") -> None:
    """The flash-attention rule: err(out, ref64) <= 2 * err(torch_out, ref64) + atol.

    ``torch_out`` is PyTorch on the same inputs in the same dtype as ``out``; ``ref64`` is the
    float64 reference. Shapes must match exactly.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    err, base = max_error(out, ref64), max_error(torch_out, ref64)
    assert err <= 2 * base + atol, (f"{name}: error {err:.3e} exceeds 2 * torch error {base:.3e} "
                                    f"+ atol {atol:.1e}")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a float tensor with NaN in place, so that a kernel which skips a write is caught."""
    return t.fill_(float("nan"))


@dataclasses.dataclass
class AOTReport:
    name: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    uses_wgmma: bool
    uses_tma: bool = False  # cp.async.bulk.tensor: tiles moved by the copy engine
    uses_setmaxnreg: bool = False  # register reallocation between warp-specialized roles

    def problems(self) -> list[str]:
        """What is wrong with this compile for its target: spills, too much shared memory."""
        found = []
        if self.spill_bytes:
            found.append(f"{self.name} sm_{self.arch}: {self.spill_bytes} bytes of register spills")
        if self.shared_bytes > SHARED_MEMORY_LIMIT[self.arch]:
            found.append(f"{self.name} sm_{self.arch}: {self.shared_bytes} bytes of shared memory "
                         f"> limit {SHARED_MEMORY_LIMIT[self.arch]}")
        return found


def runtime_types(kernel, named: dict, default: str = "i32") -> dict:
    """The runtime (non-constexpr) arguments of ``kernel`` typed for :class:`AOTConfig`: as
    ``named`` says (names the kernel lacks are ignored), ``default`` for the rest (sizes and
    strides)."""
    return {p.name: named.get(p.name, default) for p in kernel.params if not p.is_constexpr}


def triton_signature(kernel, **types) -> dict:
    """Signature of ``kernel`` for ASTSource: ``types`` for runtime args, 'constexpr' for the rest."""
    sig = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:
            raise KeyError(f"triton_signature: no type given for argument {name!r} of {kernel.__name__}")
    return sig


def aot_compile(kernel, types: dict, constexprs: dict, ones=(), arch: int = 90,
                num_warps: int = 4, num_stages: int = 3, name: Optional[str] = None) -> AOTReport:
    """Compile a ``@triton.jit`` kernel for sm_``arch`` without a GPU and report on it.

    ``types`` gives the runtime arguments' types ("*fp16", "i32", "fp32", ...). The compile is
    specialized the way Triton's JIT specializes a launch: pointers and ints are taken as
    16-divisible (``tt.divisibility``) and the int arguments named in ``ones`` (unit strides)
    become the constant 1. Without that, loads stay scalar (no vectorization, cp.async or TMA)
    and registers and shared memory would not be those of a real launch.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nvidia
    from triton.compiler import ASTSource

    runtime = {k: v for k, v in types.items() if k not in ones}
    signature = triton_signature(kernel, **runtime, **{k: "i32" for k in ones})
    consts = dict(constexprs)
    for k in ones:
        signature[k] = "constexpr"
        consts[k] = 1
    arg_names = [p.name for p in kernel.params]
    attrs = {(arg_names.index(k),): [["tt.divisibility", 16]]
             for k, t in runtime.items() if t.startswith("*") or t == "i32"}
    compiled = triton.compile(ASTSource(kernel, signature, consts, attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        result = subprocess.run([nvidia.get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name,
                                 "-o", "/dev/null"], capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return AOTReport(name=name or kernel.__name__, arch=arch,
                     registers=int(regs.group(1)) if regs else 0,
                     spill_bytes=sum(spills), shared_bytes=int(compiled.metadata.shared),
                     uses_wgmma="wgmma" in ptx, uses_tma="cp.async.bulk.tensor" in ptx,
                     uses_setmaxnreg="setmaxnreg" in ptx)


@dataclasses.dataclass
class AOTConfig:
    """One compile a launcher can ask for: kernel, argument types, constexprs, launch options,
    and the int arguments that are 1 at launch (``ones``, e.g. unit strides)."""
    kernel: object
    types: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    name: str = ""
    ones: tuple = ()


_AOT_SCRIPT = """
import dataclasses, importlib, inspect, json, sys
from llmkern.testing import aot_compile
module, arch, prefix, kwargs = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
configs = importlib.import_module(module).aot_configs
if "arch" in inspect.signature(configs).parameters:
    kwargs["arch"] = arch
reports = []
for cfg in configs(**kwargs):
    if cfg.name.startswith(prefix):
        r = aot_compile(cfg.kernel, cfg.types, cfg.constexprs, cfg.ones, arch, cfg.num_warps,
                        cfg.num_stages, name=cfg.name or cfg.kernel.__name__)
        reports.append(dataclasses.asdict(r))
print(json.dumps(reports))
"""


def aot_reports(module: str, archs: Iterable[int] = (80, 90), prefix: str = "",
                **config_kwargs) -> list[AOTReport]:
    """Compile every config of ``module.aot_configs(**config_kwargs)`` (those whose name starts
    with ``prefix``) for each arch, one process per arch, in parallel.

    ``aot_configs`` receives ``arch=`` too when it takes it. The compiles run in subprocesses
    without TRITON_INTERPRET, since under the interpreter ``@triton.jit`` gives functions that
    cannot be compiled.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    kwargs = json.dumps(config_kwargs)
    procs = [subprocess.Popen([sys.executable, "-c", _AOT_SCRIPT, module, str(arch), prefix, kwargs],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in archs]
    reports = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"ahead-of-time compile of {module} failed:\n{err[-4000:]}")
        reports += [AOTReport(**r) for r in json.loads(out.strip().splitlines()[-1])]
    return reports
