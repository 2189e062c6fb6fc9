"""LM-head loss options (bias, class weights, z-loss, lse) over the fused linear cross-entropy:
loss and gradients against float64 full-logit references."""
import pytest
import torch

from llmkern.ops.lm_head_loss import lm_head_loss, lm_head_loss_reference
from conftest import DEVICE


def _inputs(n=13, c=24, v=37, bias=True, dtype=torch.float32):
    h = torch.randn(n, c, device=DEVICE, dtype=dtype)
    w = torch.randn(v, c, device=DEVICE, dtype=dtype) / c ** 0.5
    b = torch.randn(v, device=DEVICE, dtype=dtype) if bias else None
    t = torch.randint(0, v, (n,), device=DEVICE)
    t[::4] = -100
    return h, w, b, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [dict(bias=True), dict(bias=True, lse_square_scale=1e-2),
                                  dict(bias=False, class_weight=True, lse_square_scale=0.1),
                                  dict(bias=True, label_smoothing=0.1, lse_square_scale=1e-3),
                                  dict(bias=True, softcap=2.0, lse_square_scale=1e-2),
                                  dict(bias=False, softcap=1.5, label_smoothing=0.2)])
def test_options_match_full_logits(backend, reduction, opts):
    opts = dict(opts)
    h, w, b, t = _inputs(bias=opts.pop("bias"))
    if opts.pop("class_weight", False):
        opts["class_weight"] = torch.rand(w.shape[0], device=DEVICE) + 0.5
    params = [x for x in (h, w, b) if x is not None]
    leaves = [x.detach().clone().requires_grad_() for x in params]
    lb = leaves[2] if b is not None else None
    loss, z, lse = lm_head_loss(leaves[0], leaves[1], t, lb, reduction=reduction,
                                return_z_loss=True, return_lse=True, backend=backend, **opts)
    ref_leaves = [x.detach().double().requires_grad_() for x in params]
    rb = ref_leaves[2] if b is not None else None
    ropts = {k: (v.double() if torch.is_tensor(v) else v) for k, v in opts.items()}
    r_loss, r_z, r_lse = lm_head_loss_reference(ref_leaves[0], ref_leaves[1], t, rb,
                                                reduction=reduction, **ropts)
    for name, a, r in (("loss", loss, r_loss), ("z_loss", z, r_z), ("lse", lse, r_lse)):
        torch.testing.assert_close(a.double(), r.double(), atol=1e-5, rtol=1e-5, msg=name)
    gy = torch.randn_like(r_loss)
    grads = torch.autograd.grad(loss, leaves, gy.float())
    grads_ref = torch.autograd.grad(r_loss, ref_leaves, gy)
    for name, g, r in zip(("dhidden", "dweight", "dbias"), grads, grads_ref):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5, msg=name)


def test_softcap_runs_in_chunks(backend, monkeypatch):
    """Several checkpointed chunks (one row of logits each here) give the same loss and grads."""
    from llmkern.ops import lm_head_loss as mod

    h, w, b, t = _inputs()
    h.requires_grad_()
    one = lm_head_loss(h, w, t, b, softcap=3.0)
    g_one = torch.autograd.grad(one, h)[0]
    monkeypatch.setattr(mod, "SOFTCAP_CHUNK_ELEMENTS", w.shape[0])
    many = lm_head_loss(h, w, t, b, softcap=3.0)
    torch.testing.assert_close(many, one)
    torch.testing.assert_close(torch.autograd.grad(many, h)[0], g_one)


def test_every_row_ignored_gives_zero(backend):
    h, w, b, t = _inputs()
    t.fill_(-100)
    loss, z = lm_head_loss(h, w, t, b, lse_square_scale=0.1, backend=backend,
                           class_weight=torch.ones(w.shape[0], device=DEVICE), return_z_loss=True)
    assert loss.item() == 0.0 and z.item() == 0.0


def test_bad_options():
    h, w, b, t = _inputs()
    with pytest.raises(ValueError, match=r"bias must have shape \(37,\)"):
        lm_head_loss(h, w, t, b[:5])
    with pytest.raises(ValueError, match="class_weight must have shape"):
        lm_head_loss(h, w, t, class_weight=torch.ones(3))
    with pytest.raises(ValueError, match="lse_square_scale must be >= 0"):
        lm_head_loss(h, w, t, lse_square_scale=-1.0)
    with pytest.raises(ValueError, match="softcap must be None or > 0"):
        lm_head_loss(h, w, t, softcap=0.0)
    with pytest.raises(ValueError, match="class_weight with label_smoothing"):
        lm_head_loss(h, w, t, class_weight=torch.ones(37), label_smoothing=0.1)


def test_linear_cross_entropy_takes_the_options(backend):
    import llmkern

    h, w, b, t = _inputs()
    cw = torch.rand(w.shape[0], device=DEVICE) + 0.5
    got = llmkern.linear_cross_entropy(h, w, t, bias=b, class_weight=cw, lse_square_scale=1e-2,
                                       return_z_loss=True, return_lse=True, backend=backend)
    expect = lm_head_loss(h, w, t, b, class_weight=cw, lse_square_scale=1e-2, return_z_loss=True,
                          return_lse=True, backend=backend)
    for a, e in zip(got, expect):
        torch.testing.assert_close(a, e)
    capped = llmkern.linear_cross_entropy(h, w, t, softcap=2.0, backend=backend)
    torch.testing.assert_close(capped, lm_head_loss_reference(h, w, t, softcap=2.0)[0])
