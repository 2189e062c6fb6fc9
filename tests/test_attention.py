"""llmkern.attention on the Triton kernels: every feature and the main combinations against a
float64 reference with the tolerance rule, forward, lse and dq/dk/dv; rows that see no key;
gradients through lse; backward determinism; non-contiguous inputs.

On CPU the kernels run through the Triton interpreter, whose tiles are small (see
kernels/attention_common.config) so that these short sequences span several tiles.
"""
import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.testing import assert_close_to_ref, max_error
from conftest import DEVICE, HAS_GPU, KERNEL_BACKENDS

pytestmark = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="no Triton backend here")

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
GRAD_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def make_qkv(b, h, hkv, sq, sk, d, dtype, requires_grad=True):
    q = torch.randn(b, h, sq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, hkv, sk, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, hkv, sk, d, device=DEVICE, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def leaves(ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def check_against_reference(q, k, v, ref_kwargs=None, grads=True, lse=True, **kwargs):
    """The kernel (backend='triton') vs float64 and same-dtype references: out, lse, dq, dk, dv."""
    dtype = q.dtype
    ref_kwargs = dict(kwargs, **(ref_kwargs or {}))
    ref_kwargs.pop("deterministic", None)  # the references have one backward
    out, out_lse = llmkern.attention(q, k, v, backend="triton", return_lse=True, **kwargs)
    assert out.shape == q.shape[:3] + (v.shape[-1],) and out.dtype == dtype
    assert out_lse.shape == q.shape[:3] and out_lse.dtype == torch.float32
    ins64, ins = leaves((q, k, v), torch.float64), leaves((q, k, v))
    ref, ref_lse = reference.attention(*ins64, return_lse=True, **ref_kwargs)
    same, _ = reference.attention(*ins, return_lse=True, **ref_kwargs)
    assert_close_to_ref(out, ref, same, ATOL[dtype], "out")
    if lse:
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(out_lse), finite), "lse: -inf rows differ"
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        assert max_error(out_lse[finite], ref_lse[finite]) <= tol, "lse"
    if not grads:
        return out
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, ins64, dout.double())
    base = torch.autograd.grad(same, ins, dout)
    for name, g, w, b_ in zip(("dq", "dk", "dv"), got, want, base):
        assert g.shape == w.shape and g.dtype == dtype
        assert_close_to_ref(g, w, b_, GRAD_ATOL[dtype], name)
    return out


# (B, H, Hkv, Sq, Sk, D, kwargs): every feature, and the combinations users run.
CASES = {
    "plain": (2, 2, 2, 37, 37, 64, {}),
    "causal": (1, 2, 2, 50, 50, 40, dict(causal=True)),
    "causal-sq<sk-gqa": (2, 4, 2, 23, 61, 16, dict(causal=True)),
    "causal-sq>sk-empty-rows": (1, 3, 1, 61, 23, 16, dict(causal=True)),
    "decode-sq1-mqa": (2, 4, 1, 1, 70, 64, dict(causal=True)),
    "window": (1, 2, 2, 45, 45, 16, dict(window=(7, 3))),
    "window-right-only": (1, 2, 1, 29, 41, 40, dict(window=(None, 5))),
    "window-left-causal": (1, 2, 2, 30, 50, 16, dict(causal=True, window=(8, None))),
    "softcap": (1, 2, 2, 33, 47, 64, dict(softcap=5.0, scale=0.5)),
    "bool-mask-broadcast": (2, 2, 2, 31, 43, 16, dict(mask=("bool", (2, 1, 31, 43)))),
    "float-mask-2d": (1, 4, 2, 29, 37, 40, dict(mask=("float", (29, 37)))),
    "float-mask-heads-causal-softcap-gqa": (2, 4, 2, 41, 33, 16,
                                            dict(mask=("float", (1, 4, 1, 33)), causal=True,
                                                 softcap=3.0)),
    "bool-mask-window-sq1": (1, 2, 1, 1, 53, 16, dict(mask=("bool", (53,)), window=(20, 0))),
}


def _build_kwargs(kw, b, h, sq, sk, dtype):
    kw = dict(kw)
    if "mask" in kw:
        kind, shape = kw.pop("mask")
        if kind == "bool":
            mask = torch.rand(shape, device=DEVICE) > 0.3
        else:
            mask = torch.randn(shape, device=DEVICE, dtype=dtype)
        kw["attn_mask"] = mask
    return kw


# fp32 and fp16 for every case except a few single-feature ones, which alternate (time budget).
ONE_DTYPE = {"window-right-only": torch.float16, "bool-mask-broadcast": torch.float32,
             "decode-sq1-mqa": torch.float16, "bool-mask-window-sq1": torch.float32,
             "causal": torch.float16}
FEATURE_CASES = [(c, dt) for c in CASES for dt in (torch.float32, torch.float16)
                 if ONE_DTYPE.get(c, dt) == dt]


@pytest.mark.parametrize("case,dtype", FEATURE_CASES,
                         ids=[f"{c}-{str(dt)[6:]}" for c, dt in FEATURE_CASES])
def test_features_match_reference(case, dtype):
    b, h, hkv, sq, sk, d, kw = CASES[case]
    q, k, v = make_qkv(b, h, hkv, sq, sk, d, dtype)
    check_against_reference(q, k, v, **_build_kwargs(kw, b, h, sq, sk, dtype))


@pytest.mark.parametrize("d,dtype", [(256, torch.float16), (96, torch.float32), (192, torch.float32)])
def test_large_and_odd_head_dims(d, dtype):
    q, k, v = make_qkv(1, 2, 1, 19, 35, d, dtype)
    check_against_reference(q, k, v, causal=True)


def test_rows_that_see_no_key_are_zero_with_zero_grads():
    # Causal with Sq > Sk: the first Sq - Sk queries see nothing; a bool mask hides row 3 fully.
    q, k, v = make_qkv(1, 2, 2, 40, 17, 16, torch.float32)
    mask = torch.ones(40, 17, dtype=torch.bool, device=DEVICE)
    mask[30] = False
    out, lse = llmkern.attention(q, k, v, causal=True, attn_mask=mask, backend="triton",
                                 return_lse=True)
    assert not torch.isnan(out).any()
    dead = torch.zeros(40, dtype=torch.bool)
    dead[:23] = True
    dead[30] = True
    assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
    assert torch.isneginf(lse[:, :, dead]).all() and torch.isfinite(lse[:, :, ~dead]).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert torch.equal(dq[:, :, dead], torch.zeros_like(dq[:, :, dead]))
    check_against_reference(q, k, v, causal=True, attn_mask=mask)


def test_everything_masked_gives_zeros_not_nan():
    q, k, v = make_qkv(1, 1, 1, 5, 9, 16, torch.float16)
    mask = torch.zeros(5, 9, dtype=torch.bool, device=DEVICE)
    out = llmkern.attention(q, k, v, attn_mask=mask, backend="triton")
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_gradient_flows_through_lse():
    q, k, v = make_qkv(1, 4, 2, 21, 34, 16, torch.float32)
    out, lse = llmkern.attention(q, k, v, causal=True, softcap=4.0, backend="triton",
                                 return_lse=True)
    w = torch.randn_like(lse)
    got = torch.autograd.grad((out * 0.5).sum() + (lse * w).sum(), (q, k, v))
    ins64 = leaves((q, k, v), torch.float64)
    ref, ref_lse = reference.attention(*ins64, causal=True, softcap=4.0, return_lse=True)
    want = torch.autograd.grad((ref * 0.5).sum() + (ref_lse * w.double()).sum(), ins64)
    for name, g, w_ in zip(("dq", "dk", "dv"), got, want):
        assert max_error(g, w_) <= 1e-4, name


def test_backward_is_deterministic():
    q, k, v = make_qkv(2, 4, 2, 45, 53, 40, torch.float16)
    mask = torch.randn(45, 53, device=DEVICE, dtype=torch.float16)

    def run():
        out = llmkern.attention(q, k, v, causal=True, attn_mask=mask, softcap=6.0,
                                backend="triton")
        return [out] + list(torch.autograd.grad(out, (q, k, v), dout))

    dout = torch.randn(2, 4, 45, 40, device=DEVICE, dtype=torch.float16)
    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    # (B, S, H, D) buffers viewed as (B, H, S, D), as models produce them; v with a strided last dim.
    b, s, h, d = 2, 27, 4, 16
    qs = torch.randn(b, s, h, d, device=DEVICE)
    ks = torch.randn(b, s + 4, 2, d, device=DEVICE)
    vs = torch.randn(b, s + 4, 2, 2 * d, device=DEVICE)
    q = qs.transpose(1, 2).requires_grad_()
    k = ks.transpose(1, 2).requires_grad_()
    v = vs[..., ::2].transpose(1, 2).requires_grad_()
    assert not q.is_contiguous() and v.stride(-1) == 2
    check_against_reference(q, k, v, causal=True)


def test_backend_selection_on_cpu_falls_back_to_torch():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32, requires_grad=False)
    out = llmkern.attention(q.cpu(), k.cpu(), v.cpu(), causal=True, backend="auto")
    torch.testing.assert_close(out, reference.attention(q.cpu(), k.cpu(), v.cpu(), causal=True))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["plain", "causal-sq<sk-gqa", "float-mask-heads-causal-softcap-gqa",
                                  "window"])
def test_bf16_on_gpu(case):
    b, h, hkv, sq, sk, d, kw = CASES[case]
    q, k, v = make_qkv(b, h, hkv, sq, sk, d, torch.bfloat16)
    check_against_reference(q, k, v, **_build_kwargs(kw, b, h, sq, sk, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_long_sequences(dtype, d):
    q, k, v = make_qkv(2, 4, 2, 1500, 1500, d, dtype)
    check_against_reference(q, k, v, causal=True)
