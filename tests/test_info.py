"""``llmkern info``: its self-check runs every op in every dtype each backend serves, against
float64, and says FAIL for a wrong result and why for a dtype a backend does not serve."""
import os
import subprocess
import sys

import pytest
import torch

import llmkern
from llmkern import backends, info

OPS = ("layer_norm", "rms_norm", "softmax", "linear_gelu", "mlp", "cross_entropy",
       "linear_cross_entropy", "attention", "rotary", "swiglu_mlp", "linear_logprobs",
       "attention_kvcache")


def test_info_command_prints_versions_and_self_check():
    env = dict(os.environ, TRITON_INTERPRET="0")  # the torch rows only: interpreter time
    out = subprocess.run([sys.executable, "-m", "llmkern", "info"], capture_output=True, text=True,
                         check=True, env=env).stdout
    assert f"torch        {torch.__version__}" in out
    assert "device cpu" in out
    assert "FAIL" not in out and "ERROR" not in out
    for op in OPS:
        assert any(line.split()[:1] == [op] and "fp32 ok" in line and "fp16 ok" in line
                   and "bf16 ok" in line for line in out.splitlines()), op


def _call_and_inputs(name):
    (_, make_inputs, call), = [c for c in info._self_checks() if c[0] == name]
    return call, make_inputs(torch.Generator().manual_seed(0))


def test_self_check_covers_every_op_in_every_dtype():
    rows = info.self_check(torch.device("cpu"), "torch").splitlines()
    assert [row.split()[0] for row in rows] == list(OPS)
    for row in rows:
        assert [part.split()[:2] for part in row.split(None, 1)[1].split(", ")] == [
            ["fp32", "ok"], ["fp16", "ok"], ["bf16", "ok"]], row


def test_self_check_flags_a_wrong_result():
    call, inputs = _call_and_inputs("layer_norm")

    def off_by_a_little(*args, backend):
        out = call(*args, backend=backend)
        return out if backend is None else out * 1.01

    assert info.check_one(off_by_a_little, inputs, torch.device("cpu"), "torch",
                          torch.float32).startswith("FAIL 1.0e-02")
    assert info.check_one(off_by_a_little, inputs, torch.device("cpu"), "torch",
                          torch.bfloat16).startswith("ok")


@pytest.mark.skipif(not backends.triton_interpret(), reason="the Triton CPU interpreter only")
def test_self_check_says_why_a_dtype_is_not_served():
    call, inputs = _call_and_inputs("mlp")
    assert info.check_one(call, inputs, torch.device("cpu"), "triton", torch.bfloat16) == (
        "not served (bf16 matmuls are wrong in the Triton CPU interpreter)")
    assert info.check_one(call, inputs, torch.device("cpu"), "triton",
                          torch.float16).startswith("ok")
    assert "triton" in llmkern.available_backends("cpu")
