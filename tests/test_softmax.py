"""Softmax with fused scale and causal mask: forward, gradient, errors, op registration."""
import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.testing import assert_close_to_ref
from conftest import DEVICE, DTYPES, HAS_GPU

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (..., Sq, Sk): 1, primes, Sq > Sk (rows that see no key under causal), 1500, 4096, and a
# row longer than one block (the online/looped path).
SHAPES = [(1, 1), (2, 3, 17, 17), (5, 127), (7, 3), (2, 1500), (3, 4096), (2, 20000)]


def check_softmax(x, scale, causal, backend):
    dy = torch.randn_like(x)

    def run(fn, inp):
        leaf = inp.detach().clone().requires_grad_()
        y = fn(leaf)
        return y.detach(), torch.autograd.grad(y, leaf, dy.to(y.dtype))[0]

    y, dx = run(lambda t: llmkern.softmax(t, scale, causal, backend=backend), x)
    y_t, dx_t = run(lambda t: reference.softmax(t, scale, causal), x)
    y_64, dx_64 = run(lambda t: reference.softmax(t, scale, causal), x.double())
    assert_close_to_ref(y, y_64, y_t, ATOL[x.dtype], "y")
    assert_close_to_ref(dx, dx_64, dx_t, ATOL[x.dtype] * max(1.0, dx_64.abs().max().item()), "dx")
    return y


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax(backend, dtype, shape, causal):
    if shape[-1] > 4096 and dtype != torch.float32 and not HAS_GPU:
        pytest.skip("long rows are checked in fp32 on the interpreter (time)")
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    check_softmax(x, 0.37, causal, backend)


def test_rows_that_see_no_key_are_zero(backend):
    x = torch.randn(2, 9, 4, device=DEVICE)  # Sq=9 > Sk=4: the first 5 queries see nothing
    y = check_softmax(x, 1.0, True, backend)
    assert torch.equal(y[:, :5], torch.zeros_like(y[:, :5]))
    assert torch.allclose(y[:, 5:].sum(-1), torch.ones(2, 4, device=DEVICE))


def test_strided_rows(backend):
    x = torch.randn(6, 211, device=DEVICE, dtype=torch.float16)[:, :200]
    check_softmax(x, 2.0, False, backend)
    check_softmax(torch.randn(4, 8, 50, device=DEVICE)[:, ::2], 0.5, True, backend)


def test_large_scores_do_not_overflow(backend):
    x = torch.randn(4, 300, device=DEVICE, dtype=torch.float16) * 60  # exp(60) overflows fp16 naive math
    y = check_softmax(x, 1.0, False, backend)
    assert torch.isfinite(y).all()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="causal=True needs x of shape"):
        llmkern.softmax(torch.randn(8), causal=True)
    with pytest.raises(TypeError, match="x has unsupported dtype"):
        llmkern.softmax(torch.arange(8))
    with pytest.raises(ValueError, match="x is empty"):
        llmkern.softmax(torch.randn(3, 0))


def test_opcheck(backend):
    x = torch.randn(2, 5, 33, device=DEVICE, requires_grad=True)
    for causal in (False, True):
        torch.library.opcheck(torch.ops.llmkern.softmax_fwd.default, (x, 0.5, causal, backend))


def test_torch_compile_fullgraph(backend):
    def attn_scores(q, k):
        return llmkern.softmax(q @ k.transpose(-1, -2), scale=0.125, causal=True, backend=backend)

    compiled = torch.compile(attn_scores, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
    q = torch.randn(2, 7, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    out = compiled(q, k)
    out.square().sum().backward()
    torch.testing.assert_close(out, reference.softmax(q @ k.transpose(-1, -2), 0.125, True))


def test_every_shipped_config_compiles_for_sm80_and_sm90():
    from llmkern.testing import aot_reports

    reports = aot_reports("llmkern.kernels.softmax")
    assert {r.arch for r in reports} == {80, 90}
    assert [p for r in reports for p in r.problems()] == []


@pytest.mark.parametrize("which", ["torch", "kernel"])
def test_all_minus_inf_row_is_zeros_on_every_backend(which, backend):
    name = "torch" if which == "torch" else backend
    x = torch.randn(4, 37, device=DEVICE)
    x[1] = float("-inf")
    leaf = x.clone().requires_grad_()
    y = llmkern.softmax(leaf, 0.5, backend=name)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    torch.testing.assert_close(y[[0, 2, 3]], torch.softmax(x[[0, 2, 3]] * 0.5, -1))
    (dx,) = torch.autograd.grad(y, leaf, torch.randn_like(y))
    assert torch.isfinite(dx).all() and torch.equal(dx[1], torch.zeros_like(dx[1]))


def test_scale_must_be_a_finite_float():
    x = torch.randn(2, 8)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="llmkern.softmax: scale must be finite, got"):
            llmkern.softmax(x, bad)
    with pytest.raises(TypeError, match="scale must be a float, got '2'"):
        llmkern.softmax(x, "2")


def test_float64_is_served_by_the_torch_reference(backend):
    x = torch.randn(3, 9, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(llmkern.softmax(x, 0.5), torch.softmax(x * 0.5, -1))
    with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot serve this call: x has "
                                           f"dtype float64"):
        llmkern.softmax(x, backend=backend)


def test_bf16_kernels_are_right_under_the_interpreter_too(backend):
    # no tl.dot in the softmax kernels, so the interpreter computes bf16 correctly
    x = torch.randn(5, 67, device=DEVICE, dtype=torch.bfloat16)
    y = llmkern.softmax(x, 0.7, True, backend=backend)
    ref = reference.softmax(x.double(), 0.7, True)
    assert (y.double() - ref).abs().max() < 8e-3


@pytest.mark.parametrize("causal", [False, True])
def test_short_rows_packed_several_to_a_program(backend, causal):
    """111 rows of 20 (16 to a program, the last program partly empty), the causal diagonal
    changing from row to row inside one program."""
    x = torch.randn(3, 37, 20, device=DEVICE)
    check_softmax(x, 0.8, causal, backend)


def test_softmax_moves_rows_in_16_byte_vectors():
    """bf16 rows of 1024 and 4096 are read and written in 16-byte vectors, causal or not (the
    causal mask is applied after the load), never 2 bytes at a time."""
    from test_layer_norm import ptx_vector_counts

    names = [f"softmax_{d}-bf16-{t}" for d in ("fwd", "bwd") for t in ("4x1024", "1x4096")]
    for name, c in ptx_vector_counts("llmkern.kernels.softmax", names).items():
        assert c["ld16"] > 0 and c["st16"] > 0 and c["ld_narrow"] == 0, (name, c)
