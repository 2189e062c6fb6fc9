"""The CUDA C++ extension builds: every csrc/ source compiles and links with nvcc for sm_80 and
sm_90 against the installed torch, without warnings that matter, and registers every op.

Runs on a CPU machine (no GPU needed): the build goes through the same just-in-time path as
``llmkern.ops.cuda_ext.build_jit`` in a subprocess (so this process keeps its own state), with
MAX_JOBS=2. Objects are cached in build/cuda-test/ (ignored by git: a fresh checkout, as in CI,
starts empty; later runs in one checkout only rebuild what changed). Needs nvcc: CUDA_HOME
pointing at the toolkit root (the folder with bin/nvcc and lib64/libcudart.so), else
/usr/local/cuda. Op numerics are in tests/test_cuda_ops.py (GPU only).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import llmkern_build  # noqa: E402

BUILD_DIR = os.path.join(ROOT, "build", "cuda-test")
SCHEMA_OPS = ["layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd", "softmax_fwd", "softmax_bwd",
              "attention_fwd", "attention_bwd", "linear_fwd", "linear_gelu_fwd", "linear_gelu_bwd", "linear_bwd",
              "cross_entropy_fwd", "cross_entropy_bwd", "dweight_accumulate"]
# Compiler/linker lines that say "warning" but are harmless here.
WARNING_ALLOWLIST = [
    re.compile(r"No CUDA runtime is found"),  # torch's import-time guess on a machine without a GPU
    re.compile(r"TORCH_CUDA_ARCH_LIST"),
]

_HOME = llmkern_build.cuda_home()
pytestmark = pytest.mark.skipif(_HOME is None or not os.path.exists(os.path.join(_HOME, "bin", "nvcc")),
                                reason="no CUDA toolkit (set CUDA_HOME to the folder holding bin/nvcc)")

BUILD_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from llmkern.ops import cuda_ext
    m = cuda_ext.build_jit(build_directory=sys.argv[1], verbose=True, archs="8.0;9.0")
    ops = {name: str(getattr(torch.ops.llmkern_cuda, name).default._schema) for name in m.OPS}
    print("LLMKERN_BUILD_RESULT " + json.dumps({"file": m.__file__, "ops": ops,
                                               "head_dims": list(m.HEAD_DIMS),
                                               "linear_plans": m.linear_cache_size()}))
""")


def _build():
    """Builds (or incrementally rebuilds) the extension; returns (result, compiler output)."""
    os.makedirs(BUILD_DIR, exist_ok=True)
    env = dict(os.environ, CUDA_HOME=_HOME, MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
               TORCH_CUDA_ARCH_LIST="8.0;9.0")
    env.pop("LLMKERN_CUDA_JIT", None)
    proc = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, BUILD_DIR], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the CUDA extension failed to build or load:\n{output[-20000:]}"
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LLMKERN_BUILD_RESULT "))
    return json.loads(line.split(" ", 1)[1]), output


def test_build_links_without_warnings_and_registers_every_op():
    """One test (so that pytest-xdist runs one build): compile + link, warnings, schemas."""
    result, output = _build()

    # every source compiled for both archs, linked into a loadable .so with cuBLASLt
    assert os.path.exists(result["file"]) and result["file"].endswith(".so")
    ninja = open(os.path.join(BUILD_DIR, "build.ninja")).read()
    for src in llmkern_build.sources():
        assert src in ninja, f"{src} is not part of the build"
    for arch in ("compute_80,code=sm_80", "compute_90,code=sm_90"):
        assert arch in ninja, f"the build does not target {arch}"
    assert "cublasLt" in ninja

    # no compiler, ptxas (spills, local memory) or linker warnings beyond the allowlist
    bad = [ln for ln in output.splitlines()
           if not re.match(r"\s*\[\d+/\d+\] ", ln)  # ninja echoing a command line (its flags say "spill")
           and re.search(r"warning|spill|lmem", ln, re.IGNORECASE)
           and not re.search(r"\b0 bytes spill stores, 0 bytes spill loads", ln)
           and not any(p.search(ln) for p in WARNING_ALLOWLIST)]
    assert bad == [], "compiler warnings:\n" + "\n".join(bad[:50])

    # the schemas the Python ops call (the TORCH_LIBRARY block of csrc/bindings.cpp)
    ops = result["ops"]
    for name in SCHEMA_OPS:
        assert name in ops, f"llmkern_cuda::{name} is not registered"
    assert ops["attention_fwd"].startswith(
        "llmkern_cuda::attention_fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal)")
    assert "Tensor? weight" in ops["layer_norm_fwd"] and "float eps" in ops["layer_norm_fwd"]
    assert "int ignore_index, float label_smoothing" in ops["cross_entropy_bwd"]
    assert "Tensor(a!) out" in ops["dweight_accumulate"]  # writes the chunked weight gradient in place
    assert result["head_dims"] == [64, 128]
    # the cuBLASLt plan cache is bound (and empty before any GEMM ran)
    assert result["linear_plans"] == 0


def test_build_settings_find_the_toolkit_and_cublaslt():
    include, libdirs, link = llmkern_build.cublas_dirs()
    assert include and os.path.exists(os.path.join(include[0], "cublasLt.h"))
    assert libdirs and link and "cublasLt" in link[0]
    names = {os.path.basename(s) for s in llmkern_build.sources()}
    assert {"layer_norm.cu", "softmax.cu", "attention_fwd.cu", "attention_bwd.cu", "linear.cu",
            "cross_entropy.cu", "bindings.cpp"} <= names
    assert llmkern_build.DEFAULT_ARCHS == "8.0;9.0"


def test_cuda_declarations_explain_what_they_cannot_serve():
    import torch

    from llmkern.ops import cuda_ext
    from llmkern.ops.cross_entropy import CROSS_ENTROPY, LINEAR_CROSS_ENTROPY
    from llmkern.ops.mlp import LINEAR_GELU, MLP
    from llmkern.ops.norm import LAYER_NORM, RMS_NORM
    from llmkern.ops.softmax import SOFTMAX

    x = torch.empty(3, 64, dtype=torch.float16)
    for ops, arg in ((LAYER_NORM, "x"), (RMS_NORM, "x"), (SOFTMAX, "x"), (LINEAR_GELU, "x"),
                     (MLP, "x"), (CROSS_ENTROPY, "logits"), (LINEAR_CROSS_ENTROPY, "hidden")):
        assert ops.reason("cuda", **{arg: x}) is None
        assert ops.reason("cuda", **{arg: x.double()}) == (
            f"{arg} has dtype float64 (supported: float16, bfloat16, float32)")
    assert "weight has dtype float64" in LAYER_NORM.reason("cuda", x=x, weight=x[0].double())
    if cuda_ext.load_error() is not None:  # no extension here: the reason says how to get one
        assert "llmkern._C" in cuda_ext.load_error() or "just-in-time" in cuda_ext.load_error()
