"""linear_logprobs: per-token log-probs and entropies against log_softmax + gather in float64
(odd sizes, chunks that do not divide the tokens, ignore_index, temperature), gradients under
the tolerance rule, errors, op registration and compile."""
import pytest
import torch

import llmkern
from llmkern.ops.logprobs import reference_linear_logprobs
from llmkern.testing import assert_close_to_ref
from conftest import DEVICE, DTYPES, HAS_GPU

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _target(shape, vocab, ignore_every=4, ignore_index=-100):
    t = torch.randint(0, vocab, shape, device=DEVICE)
    t.view(-1)[::ignore_every] = ignore_index
    return t


def _run(fn, tensors, g_logp, g_ent):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    total = (outs[0] * g_logp).sum() + ((outs[1] * g_ent).sum() if len(outs) > 1 else 0)
    return [o.detach() for o in outs], torch.autograd.grad(total, leaves)


def check(kernel_fn, ref_fn, tensors, names, entropy):
    dtype = tensors[0].dtype
    shape = ref_fn(*[t.double() for t in tensors])
    shape = (shape[0] if entropy else shape).shape
    g_logp = torch.rand(shape, device=DEVICE) + 0.5  # non-unit upstream gradients
    g_ent = torch.randn(shape, device=DEVICE)
    outs, grads = _run(kernel_fn, tensors, g_logp, g_ent)
    outs_t, grads_t = _run(ref_fn, tensors, g_logp, g_ent)
    outs_64, grads_64 = _run(ref_fn, [t.double() for t in tensors], g_logp.double(), g_ent.double())
    for name, o, ot, o64 in zip(("logp", "entropy"), outs, outs_t, outs_64):
        assert o.dtype == torch.float32, f"{name} is float32"
        # per-token values (no mean to average rounding out): the dtype's atol, as for gradients
        assert_close_to_ref(o, o64, ot, ATOL[dtype] * max(1.0, o64.abs().max().item()), name)
    for name, gk, gt, g64 in zip(names, grads, grads_t, grads_64):
        assert gk.dtype == dtype
        assert_close_to_ref(gk, g64, gt, ATOL[dtype] * max(1.0, g64.abs().max().item()), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,vocab,temperature,chunk,entropy", [
    (37, 1000, 1.0, 16, False), (17, 127, 0.7, 5, True), (1, 300, 1.3, None, True)])
def test_linear_logprobs(backend, dtype, tokens, vocab, temperature, chunk, entropy):
    hidden = torch.randn(tokens, 64, device=DEVICE, dtype=dtype)
    weight = torch.randn(vocab, 64, device=DEVICE, dtype=dtype) * 0.125
    target = _target((tokens,), vocab, ignore_every=5)

    def ref(h, w):
        return reference_linear_logprobs(h, w, target, temperature, -100, entropy)

    check(lambda h, w: llmkern.linear_logprobs(h, w, target, temperature, return_entropy=entropy,
                                               backend=backend, chunk_size=chunk),
          ref, [hidden, weight], ["dhidden", "dweight"], entropy)


def test_reference_matches_log_softmax_gather():
    h, w = torch.randn(2, 9, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    t = _target((2, 9), 50, ignore_every=4, ignore_index=7)
    logp, ent = llmkern.linear_logprobs(h, w, t, temperature=2.0, ignore_index=7,
                                        return_entropy=True, backend="torch")
    full = torch.log_softmax(h @ w.T / 2.0, -1)
    keep = t != 7
    expect = full.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp[keep], expect[keep])
    torch.testing.assert_close(ent[keep], -(full.exp() * full).sum(-1)[keep])
    assert (logp[~keep] == 0).all() and (ent[~keep] == 0).all()


def test_3d_strided_hidden_int32_target_and_real_ignore_index(backend):
    """(2, 7, 32) hidden as a view of a wider buffer, int32 targets, a real class as ignore_index."""
    base = torch.randn(2, 7, 40, device=DEVICE)
    w = torch.randn(90, 32, device=DEVICE) * 0.2
    t = _target((2, 7), 90, ignore_every=3, ignore_index=5).int()
    check(lambda b, w: llmkern.linear_logprobs(b[..., :32], w, t, ignore_index=5,
                                               return_entropy=True, backend=backend, chunk_size=4),
          lambda b, w: reference_linear_logprobs(b[..., :32], w, t, 1.0, 5, True),
          [base, w], ["dbase", "dweight"], True)


def test_all_ignored_is_zero_not_nan(backend):
    h = torch.randn(7, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(50, 16, device=DEVICE, requires_grad=True)
    t = torch.full((7,), -100, device=DEVICE)
    logp, ent = llmkern.linear_logprobs(h, w, t, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(ent, torch.zeros_like(ent))
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_logprobs_only_gradient_when_entropy_unused(backend):
    """return_entropy=True but only logp feeds the loss: the same gradient as without entropy."""
    h = torch.randn(11, 16, device=DEVICE)
    w = torch.randn(60, 16, device=DEVICE) * 0.3
    t = _target((11,), 60)
    grads = []
    for entropy in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = llmkern.linear_logprobs(hh, ww, t, return_entropy=entropy, backend=backend)
        (out[0] if entropy else out).sum().backward()
        grads.append((hh.grad, ww.grad))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bad_inputs():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"lm_weight must have shape \(vocab, 8\)"):
        llmkern.linear_logprobs(h, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        llmkern.linear_logprobs(h, w, t[:3])
    with pytest.raises(TypeError, match="target has unsupported dtype"):
        llmkern.linear_logprobs(h, w, t.float())
    with pytest.raises(TypeError, match="lm_weight has dtype torch.float16 but hidden has torch.float32"):
        llmkern.linear_logprobs(h, w.half(), t)
    with pytest.raises(ValueError, match=r"target holds class index 12 outside \[0, 10\)"):
        llmkern.linear_logprobs(h, w, torch.tensor([0, 12, 1, 2]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        llmkern.linear_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be finite"):
        llmkern.linear_logprobs(h, w, t, temperature=float("nan"))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        llmkern.linear_logprobs(h, w, t, chunk_size=0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        llmkern.linear_logprobs(h, w, t, ignore_index=1.5)


def test_opcheck(backend):
    h = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(100, 16, device=DEVICE, requires_grad=True)
    t = _target((6,), 100, ignore_every=4)
    for entropy in (False, True):
        torch.library.opcheck(torch.ops.llmkern.linear_logprobs_fwd.default,
                              (h, w, t, 0.8, -100, entropy, 4, backend))


def test_torch_compile_fullgraph(backend):
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)
            self.head = torch.nn.Linear(16, 100, bias=False)

        def forward(self, x, target):
            logp, ent = llmkern.linear_logprobs(self.proj(x), self.head.weight, target,
                                                temperature=0.9, return_entropy=True,
                                                backend=backend)
            return -(logp.sum() + 0.1 * ent.sum())

    model = Head().to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
    x = torch.randn(2, 5, 16, device=DEVICE)
    t = _target((2, 5), 100)
    loss = compiled(x, t)
    loss.backward()
    torch.testing.assert_close(loss, model(x, t), atol=1e-4, rtol=1e-5)
    assert model.head.weight.grad is not None and model.proj.weight.grad is not None


@pytest.mark.gpu
def test_bf16_large_vocab(backend):
    """bf16 on a GPU (the interpreter cannot run bf16 GEMMs), GPT-2's padded vocabulary."""
    hidden = torch.randn(300, 128, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(50304, 128, device=DEVICE, dtype=torch.bfloat16) * 0.1
    target = _target((300,), 50304, ignore_every=7)
    check(lambda h, w: llmkern.linear_logprobs(h, w, target, 0.8, return_entropy=True,
                                               backend=backend, chunk_size=128),
          lambda h, w: reference_linear_logprobs(h, w, target, 0.8, -100, True),
          [hidden, weight], ["dhidden", "dweight"], True)


@pytest.mark.parametrize("block", [128, 256])
def test_entropy_chunk_kernels_agree_with_torch(block):
    """The Triton entropy row kernel (rows longer than its block, in place) against the torch
    chunk the cuda backend uses, both against float64 autograd: logp, entropy and gradient."""
    from llmkern.kernels.logprobs import logprobs_entropy
    from llmkern.ops.logprobs import _torch_entropy_chunk

    z = torch.randn(9, 1000, dtype=torch.float64) * 3
    t = _target((9,), 1000, ignore_every=4)
    g, e = torch.rand(9, dtype=torch.float64) + 0.5, torch.randn(9, dtype=torch.float64)
    zz = z.clone().requires_grad_()
    logp64, ent64 = reference_linear_logprobs(zz, torch.eye(1000, dtype=torch.float64), t,
                                              return_entropy=True)
    (dz64,) = torch.autograd.grad((logp64 * g).sum() + (ent64 * e).sum(), zz)
    outs = []
    if "triton" in llmkern.available_backends(DEVICE):
        lp, en = torch.empty(9), torch.empty(9)
        zk = z.float()
        logprobs_entropy(zk, t, -100, lp, en, g.float(), e.float(), 0.5, zk, block=block)
        outs.append((lp, en, zk))
    lp, en, zt = torch.empty(9), torch.empty(9), z.float()
    _torch_entropy_chunk(zt, t, -100, lp, en, g.float(), e.float(), 0.5)
    outs.append((lp, en, zt))
    for lp, en, dz in outs:
        torch.testing.assert_close(lp.double(), logp64.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(en.double(), ent64.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dz.double(), 0.5 * dz64, atol=1e-6, rtol=1e-4)


def test_aot_every_logprobs_config():
    from llmkern.testing import aot_reports

    reports = aot_reports("llmkern.kernels.logprobs", dtypes=["bf16", "fp32"])
    assert {r.arch for r in reports} == {80, 90}
    for r in reports:
        assert not r.problems(), (r.name, r.arch, r.problems())
