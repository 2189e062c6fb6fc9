"""Ahead-of-time compiles that specialize arguments the way Triton's JIT does at launch.

``llmkern.testing.aot_compile`` compiles with no argument specialization; the JIT, however,
marks pointers and ints divisible by 16 (``tt.divisibility``) and turns ints equal to 1 (unit
strides) into constants. Without that, a GEMM's loads are scalar and cannot use cp.async/TMA,
so registers and shared memory would not be those of the real launch. This helper compiles
with the launch's specialization and returns the same ``AOTReport``.
"""
from __future__ import annotations

import re
import subprocess
import tempfile

from llmkern.testing import AOTReport, triton_signature


def aot_compile_specialized(kernel, types: dict, constexprs: dict, ones=(), arch: int = 90,
                            num_warps: int = 4, num_stages: int = 3, name=None) -> AOTReport:
    """Compile ``kernel`` for sm_``arch``: ``types`` for runtime args, ``ones`` the int args
    equal to 1 at launch (become constants); every other pointer/int is taken as 16-divisible."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nvidia
    from triton.compiler import ASTSource

    runtime = {k: v for k, v in types.items() if k not in ones}
    sig = triton_signature(kernel, **runtime, **{k: "i32" for k in ones})
    consts = dict(constexprs)
    for k in ones:
        sig[k] = "constexpr"
        consts[k] = 1
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]]
             for k, t in runtime.items() if t.startswith("*") or t == "i32"}
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        res = subprocess.run([nvidia.get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name, "-o",
                              "/dev/null"], capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return AOTReport(name=name or kernel.__name__, arch=arch, registers=int(regs.group(1)) if regs else 0,
                     spill_bytes=sum(spills), shared_bytes=int(compiled.metadata.shared),
                     uses_wgmma="wgmma" in ptx)


_SCRIPT = """
import dataclasses, importlib, json, sys
sys.path.insert(0, sys.argv[4])
from aot_utils import aot_compile_specialized
module, arch, dtypes = sys.argv[1], int(sys.argv[2]), tuple(sys.argv[3].split(","))
out = []
for c in importlib.import_module(module).aot_configs(dtypes):
    r = aot_compile_specialized(c.kernel, c.types, c.constexprs, getattr(c, "ones", ()), arch,
                                c.num_warps, c.num_stages, name=c.name)
    out.append(dataclasses.asdict(r))
print(json.dumps(out))
"""


def specialized_reports(module: str, dtypes: str, archs=(80, 90)) -> list:
    """Compile every item of ``module.aot_configs(dtypes)`` for each arch (one process per arch,
    without TRITON_INTERPRET: interpreted @triton.jit functions cannot be compiled)."""
    import json
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, module, str(a), dtypes, here], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in archs]
    reports = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"ahead-of-time compile of {module} failed:\n{err[-4000:]}")
        reports += [AOTReport(**r) for r in json.loads(out.strip().splitlines()[-1])]
    return reports
