"""Attention dropout on the Triton kernels: counter-based RNG keyed by the seed, so the same seed
gives the same output and gradients, another seed differs, the kept fraction is about 1 - p,
and given the kernel's own keep-mask the result matches the float64 reference exactly; under
torch.compile(fullgraph=True) the seed is drawn in the graph (the same torch.manual_seed stream as
eager) and a tensor seed is a graph input, not a recompile."""
import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.testing import assert_close_to_ref
from conftest import DEVICE, KERNEL_BACKENDS

pytestmark = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="no Triton backend here")


def make_qkv(b, h, hkv, sq, sk, d, dtype=torch.float32):
    shapes = ((b, h, sq, d), (b, hkv, sk, d), (b, hkv, sk, d))
    return [torch.randn(s, device=DEVICE, dtype=dtype, requires_grad=True) for s in shapes]


def run(q, k, v, dout, **kw):
    out = llmkern.attention(q, k, v, backend="triton", **kw)
    return [out] + list(torch.autograd.grad(out, (q, k, v), dout))


def test_same_seed_same_result_other_seed_differs():
    q, k, v = make_qkv(1, 2, 1, 21, 35, 16)
    dout = torch.randn(1, 2, 21, 16, device=DEVICE)
    first = run(q, k, v, dout, dropout_p=0.25, seed=1234, causal=True)
    again = run(q, k, v, dout, dropout_p=0.25, seed=1234, causal=True)
    other = run(q, k, v, dout, dropout_p=0.25, seed=99, causal=True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_torch_manual_seed_reproduces_the_drawn_seed():
    q, k, v = make_qkv(1, 2, 2, 17, 17, 16)
    torch.manual_seed(7)
    a = llmkern.attention(q, k, v, dropout_p=0.5, backend="triton")
    b = llmkern.attention(q, k, v, dropout_p=0.5, backend="triton")
    torch.manual_seed(7)
    c = llmkern.attention(q, k, v, dropout_p=0.5, backend="triton")
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_kept_fraction_is_about_one_minus_p():
    from llmkern.kernels.attention import dropout_keep_mask

    for p in (0.1, 0.5):
        keep = dropout_keep_mask(2, 3, 64, 96, p, seed=3, device=DEVICE)
        assert keep.dtype == torch.bool and keep.shape == (2, 3, 64, 96)
        frac = keep.float().mean().item()
        assert abs(frac - (1 - p)) < 0.02, (p, frac)
        # Heads and batches draw different numbers.
        assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window=(5, 2), softcap=4.0)],
                         ids=["causal-gqa", "window-softcap"])
def test_matches_reference_with_the_kernels_keep_mask(dtype, kw):
    from llmkern.kernels.attention import dropout_keep_mask

    b, h, hkv, sq, sk, d, p, seed = 2, 2, 1, 23, 38, 16, 0.3, 11
    q, k, v = make_qkv(b, h, hkv, sq, sk, d, dtype)
    dout = torch.randn(b, h, sq, d, device=DEVICE, dtype=dtype)
    got = run(q, k, v, dout, dropout_p=p, seed=seed, **kw)
    keep = dropout_keep_mask(b, h, sq, sk, p, seed, device=DEVICE)

    def ref(dt):
        ins = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out = reference.attention(*ins, dropout_p=p, dropout_mask=keep, **kw)
        return [out] + list(torch.autograd.grad(out, ins, dout.to(dt)))

    want, same = ref(torch.float64), ref(dtype)
    atol = 2e-5 if dtype == torch.float32 else 1e-2
    for name, g, w, s in zip(("out", "dq", "dk", "dv"), got, want, same):
        assert_close_to_ref(g, w, s, atol, name)


def test_dropout_on_the_torch_backend_is_reproducible_by_seed():
    q, k, v = make_qkv(1, 2, 2, 9, 11, 16)
    a = llmkern.attention(q.cpu(), k.cpu(), v.cpu(), dropout_p=0.4, seed=5, backend="torch")
    b = llmkern.attention(q.cpu(), k.cpu(), v.cpu(), dropout_p=0.4, seed=5, backend="torch")
    assert torch.equal(a, b)


class _DropoutBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x, seed=None):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 16).permute(2, 0, 3, 1, 4)
        y = llmkern.attention(q, k, v, causal=True, dropout_p=0.1, backend="triton", seed=seed)
        return y.transpose(1, 2).reshape(b, s, 32)


def _fwd_bwd(model, x, seed=None):
    x = x.detach().requires_grad_()
    out = model(x, seed)
    weights = torch.arange(out.numel(), dtype=out.dtype, device=out.device).view_as(out).cos()
    (out * weights).sum().backward()
    return out.detach(), x.grad


def test_torch_compile_fullgraph_draws_the_seed_from_torchs_generator():
    # seed=None: the seed is drawn in the graph (no .item(), no graph break) from the same
    # generator stream as eager, so torch.manual_seed gives the eager output and gradients.
    model = _DropoutBlock().to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 11, 32, device=DEVICE)
    for manual_seed in (100, 101):  # the first call traces, the second runs the cached graph
        torch.manual_seed(manual_seed)
        got_out, got_dx = _fwd_bwd(compiled, x)
        torch.manual_seed(manual_seed)
        want_out, want_dx = _fwd_bwd(model, x)
        torch.testing.assert_close(got_out, want_out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got_dx, want_dx, atol=1e-5, rtol=1e-5)
    # Each call draws a fresh seed: without re-seeding, the next output differs.
    assert not torch.equal(_fwd_bwd(compiled, x)[0], got_out)


def test_seed_draw_is_in_the_graph_without_item():
    # Without fullgraph dynamo does not capture Tensor.item(): an .item() in the functional layer
    # would split the graph there. The seed must reach the op as a tensor: one graph, no break.
    model = _DropoutBlock().to(DEVICE)
    x = torch.randn(2, 11, 32, device=DEVICE)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, \
        explained.break_reasons
    code = explained.graphs[0].code
    assert "randint" in code and ".item()" not in code and "_local_scalar_dense" not in code


def test_torch_compile_tensor_seed_is_an_input_not_a_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _DropoutBlock().to(DEVICE)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(2, 11, 32, device=DEVICE)
    outs = {}
    for s in (3, 4, 5, 3):
        got_out, got_dx = _fwd_bwd(compiled, x, torch.tensor(s))
        want_out, want_dx = _fwd_bwd(model, x, s)
        torch.testing.assert_close(got_out, want_out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got_dx, want_dx, atol=1e-5, rtol=1e-5)
        outs.setdefault(s, got_out)
    assert counter.frame_count == 1
    assert torch.equal(outs[3], _fwd_bwd(compiled, x, torch.tensor(3))[0])
    assert not torch.equal(outs[3], outs[4])
