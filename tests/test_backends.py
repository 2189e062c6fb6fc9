"""Backend choice: available_backends, set_backend, use_backend, LLMKERN_BACKEND, auto fallback."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import llmkern
from llmkern import backends
from conftest import DEVICE, HAS_GPU


def test_torch_is_always_available():
    assert "torch" in llmkern.available_backends("cpu")
    assert set(llmkern.available_backends()) <= {"torch", "triton", "cuda"}


def test_triton_on_cpu_tensors_follows_the_interpreter_flag():
    expected = backends.triton_interpret()
    assert ("triton" in llmkern.available_backends("cpu")) == expected


def test_cuda_backend_never_serves_cpu_tensors():
    assert "cuda" not in llmkern.available_backends("cpu")
    reason = backends.backend_unavailable("cuda", torch.device("cpu"))
    assert "needs CUDA tensors" in reason


def test_set_backend_and_use_backend_restore():
    before = llmkern.get_backend()
    with llmkern.use_backend("torch"):
        assert llmkern.get_backend() == "torch"
        with llmkern.use_backend("auto"):
            assert llmkern.get_backend() == "auto"
        assert llmkern.get_backend() == "torch"
    assert llmkern.get_backend() == before
    try:
        llmkern.set_backend("torch")
        assert llmkern.get_backend() == "torch"
    finally:
        llmkern.set_backend(before)
    with pytest.raises(ValueError, match="backend must be one of"):
        llmkern.set_backend("tpu")


def test_use_backend_restores_after_an_exception():
    before = llmkern.get_backend()
    with pytest.raises(KeyError):
        with llmkern.use_backend("torch"):
            raise KeyError("boom")
    assert llmkern.get_backend() == before


def test_auto_serves_cpu_tensors_with_torch():
    x = torch.randn(3, 8)
    choice = backends.select("layer_norm", x.device, "auto", lambda name: None)
    assert choice == "torch"


def test_named_backend_that_cannot_serve_raises_with_reason():
    with pytest.raises(RuntimeError, match="backend 'triton' cannot serve this call: no fp64"):
        backends.select("op", torch.device("cpu" if not HAS_GPU else "cuda"), "triton",
                        lambda name: "no fp64" if name == "triton" else None)


def test_per_call_backend_overrides_context(backend):
    x = torch.randn(4, 16, device="cuda" if HAS_GPU else "cpu")
    with llmkern.use_backend("torch"):
        # asking for the kernel backend by name runs it even inside a torch context
        y = llmkern.layer_norm(x, backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (16,)), atol=1e-5, rtol=1e-5)


def test_auto_falls_back_with_one_warning_on_gpu_tensors():
    device = torch.device("cuda")  # select() only looks at the device type: no GPU needed
    backends._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert backends.select("demo", device, "auto", lambda n: "unsupported feature",
                                   auto_order=("triton",)) == "torch"
    assert len([w for w in caught if "falling back" in str(w.message)]) == 1


def test_environment_variable_sets_the_default():
    code = "import llmkern; print(llmkern.get_backend())"
    env = dict(os.environ, LLMKERN_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["LLMKERN_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "LLMKERN_BACKEND must be one of" in bad.stderr


def test_bad_environment_backend_is_one_cli_line():
    env = dict(os.environ, LLMKERN_BACKEND="bogus")
    out = subprocess.run([sys.executable, "-m", "llmkern", "info"], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "llmkern info: error: LLMKERN_BACKEND must be one of ('auto', 'torch', 'triton', 'cuda'), "
        "got 'bogus'"]


def _demo_backends(serves=None):
    return backends.OpBackends("demo", (
        backends.Backend("triton", serves=serves, impl={"fwd": lambda x: x + 1,
                                                       "lazy": "math:sqrt"}),
    ), auto_order=("triton",))


def test_declaration_named_backend_that_cannot_serve_raises_with_its_reason():
    ops = _demo_backends(serves=lambda x: "x is odd" if x % 2 else None)
    if backends.backend_unavailable("triton", DEVICE) is not None:
        pytest.skip("triton cannot run here")
    assert ops.choose(DEVICE, "triton", x=2) == "triton"
    with pytest.raises(RuntimeError, match="llmkern.demo: backend 'triton' cannot serve this "
                                           "call: x is odd"):
        ops.choose(DEVICE, "triton", x=3)
    assert ops.reason("cuda", x=2) == "llmkern.demo has no cuda kernel"
    assert ops.choose(torch.device("cpu"), "auto", x=2) == "torch"


def test_declaration_auto_skips_a_backend_that_cannot_serve_with_one_warning():
    ops = _demo_backends(serves=lambda x: "x is odd" if x % 2 else None)
    backends._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert ops.choose(torch.device("cuda"), "auto", x=3) == "torch"
    if backends.backend_unavailable("triton", torch.device("cuda")) is None:
        assert len([w for w in caught if "x is odd" in str(w.message)]) == 1


def test_declaration_runs_entries_and_resolves_lazy_ones():
    ops = _demo_backends()
    assert ops.run("fwd", "triton", 1) == 2
    assert ops.run("lazy", "triton", 9.0) == 3.0
    with pytest.raises(ValueError, match="backend must be one of \\['triton'\\], got 'cuda'"):
        ops.run("fwd", "cuda", 1)
    with pytest.raises(ValueError, match="no entry 'bwd'"):
        ops.run("bwd", "triton", 1)


def test_declaration_rejects_undeclared_names():
    with pytest.raises(ValueError, match="auto_order names undeclared backends \\['cuda'\\]"):
        backends.OpBackends("demo", (backends.Backend("triton", impl={}),), auto_order=("triton", "cuda"))
    with pytest.raises(ValueError, match="'triton' or 'cuda', got 'torch'"):
        backends.Backend("torch", impl={})


def test_interpreter_bf16_reason_names_the_interpreter_only_when_it_runs_the_kernel():
    bf16 = torch.ones(2, dtype=torch.bfloat16)
    reason = backends.interpreter_bf16_reason(None, torch.ones(2), bf16)
    if backends.triton_interpret():
        assert reason == "bf16 matmuls are wrong in the Triton CPU interpreter"
    else:
        assert reason is None
    assert backends.interpreter_bf16_reason(torch.ones(2), bf16.half()) is None


def test_dtype_reason_names_the_argument_and_the_supported_dtypes():
    reason = backends.dtype_reason(torch.ones(2, dtype=torch.float64), backends.KERNEL_DTYPES, "x")
    assert reason == "x has dtype float64 (supported: float16, bfloat16, float32)"
    assert backends.dtype_reason(None, backends.KERNEL_DTYPES, "x") is None
