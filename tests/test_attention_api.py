"""The attention API around the kernels: scaled_dot_product_attention against PyTorch's SDPA,
varlen_attention against a per-sequence reference (forward and backward), bad inputs, opcheck
of the torch.library ops, and torch.compile(fullgraph=True) without graph breaks."""
import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern import reference
from llmkern.testing import assert_close_to_ref
from conftest import DEVICE, HAS_GPU, KERNEL_BACKENDS

triton_only = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="no Triton backend here")
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3}
GRAD_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def rand(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def grads_of(fn, ins, dout):
    out = fn(*ins)
    return [out] + list(torch.autograd.grad(out, ins, dout))


# ---- scaled_dot_product_attention ----------------------------------------------------------

SDPA_CASES = {
    "causal-sq<sk": (2, 2, 2, 13, 29, dict(is_causal=True)),
    "causal-sq>sk": (1, 2, 2, 29, 13, dict(is_causal=True)),
    "causal-gqa": (1, 4, 2, 21, 21, dict(is_causal=True, enable_gqa=True, scale=0.3)),
    "bool-mask": (2, 2, 2, 17, 23, dict(mask="bool")),
    "float-mask-gqa": (1, 4, 1, 19, 26, dict(mask="float", enable_gqa=True)),
}


SDPA_PARAMS = [("causal-sq<sk", torch.float32), ("causal-sq<sk", torch.float16),
               ("causal-sq>sk", torch.float16), ("causal-gqa", torch.float32),
               ("bool-mask", torch.float16), ("float-mask-gqa", torch.float32)]


@triton_only
@pytest.mark.parametrize("case,dtype", SDPA_PARAMS, ids=[f"{c}-{str(d)[6:]}" for c, d in SDPA_PARAMS])
def test_sdpa_matches_pytorch(case, dtype):
    b, h, hkv, sq, sk, kw = SDPA_CASES[case]
    kw = dict(kw)
    if kw.get("mask") == "bool":
        kw["attn_mask"] = torch.rand(b, 1, sq, sk, device=DEVICE) > 0.25
    elif kw.get("mask") == "float":
        kw["attn_mask"] = torch.randn(sq, sk, device=DEVICE, dtype=dtype)
    kw.pop("mask", None)
    ins = [rand(b, h, sq, 16, dtype=dtype), rand(b, hkv, sk, 16, dtype=dtype),
           rand(b, hkv, sk, 16, dtype=dtype)]
    dout = torch.randn(b, h, sq, 16, device=DEVICE, dtype=dtype)

    def ours(q, k, v):
        return llmkern.scaled_dot_product_attention(q, k, v, backend="triton", **kw)

    def theirs(dt):
        mask = kw.get("attn_mask")
        kw2 = dict(kw, attn_mask=mask.to(dt) if mask is not None and mask.is_floating_point() else mask)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw2)

    got = grads_of(ours, ins, dout)
    want = grads_of(theirs(torch.float64), [t.detach().double().requires_grad_() for t in ins],
                    dout.double())
    same = grads_of(theirs(dtype), [t.detach().requires_grad_() for t in ins], dout)
    for name, g, w, s in zip(("out", "dq", "dk", "dv"), got, want, same):
        assert_close_to_ref(g, w, s, (ATOL if name == "out" else GRAD_ATOL)[dtype], name)


def test_sdpa_torch_backend_and_unbatched_inputs():
    q, k, v = rand(3, 7, 16, grad=False), rand(3, 11, 16, grad=False), rand(3, 11, 16, grad=False)
    out = llmkern.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(), is_causal=True)
    want = F.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(), is_causal=True)
    torch.testing.assert_close(out, want)


# ---- varlen ------------------------------------------------------------------------------

def per_sequence_reference(q, k, v, cu_q, cu_k, **kw):
    outs = []
    for b in range(cu_q.numel() - 1):
        qs = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1).unsqueeze(0)
        ks = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1).unsqueeze(0)
        outs.append(reference.attention(qs, ks, vs, **kw)[0].transpose(0, 1))
    return torch.cat(outs)


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window=(6, 1), softcap=3.0)],
                         ids=["causal", "window-softcap"])
def test_varlen_matches_per_sequence_reference(kw, dtype):
    lens_q, lens_k = [5, 37, 1, 20], [9, 30, 17, 20]
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    h, hkv, d = 4, 2, 16
    ins = [rand(sum(lens_q), h, d, dtype=dtype), rand(sum(lens_k), hkv, d, dtype=dtype),
           rand(sum(lens_k), hkv, d, dtype=dtype)]
    dout = torch.randn(sum(lens_q), h, d, device=DEVICE, dtype=dtype)

    def ours(q, k, v):
        return llmkern.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                        backend="triton", **kw)

    def ref(q, k, v):
        return per_sequence_reference(q, k, v, cu_q, cu_k, **kw)

    got = grads_of(ours, ins, dout)
    want = grads_of(ref, [t.detach().double().requires_grad_() for t in ins], dout.double())
    same = grads_of(ref, [t.detach().requires_grad_() for t in ins], dout)
    for name, g, w, s in zip(("out", "dq", "dk", "dv"), got, want, same):
        assert_close_to_ref(g, w, s, (ATOL if name == "out" else GRAD_ATOL)[dtype], name)
    # The torch backend (padding reference) agrees too.
    torch_out = llmkern.varlen_attention(*[t.detach() for t in ins], cu_q, cu_k, max(lens_q),
                                         max(lens_k), backend="torch", **kw)
    assert_close_to_ref(got[0], want[0], torch_out, ATOL[dtype], "torch backend")


# ---- varlen offsets are validated before any backend reads them ---------------------------

ALL_BACKENDS = ["torch"] + KERNEL_BACKENDS
BAD_OFFSETS = {  # q has 8 rows, k/v 9: (cu_q, cu_k, max_q, max_k, message)
    "q-past-the-end": ([0, 3, 20], [0, 3, 9], 17, 8, r"cu_seqlens_q\[2\] = 20 must equal the 8 rows of q"),
    "q-short-of-the-end": ([0, 3, 7], [0, 3, 9], 8, 8, r"cu_seqlens_q\[2\] = 7 must equal the 8 rows"),
    "k-past-the-end": ([0, 3, 8], [0, 3, 10], 8, 8, r"cu_seqlens_k\[2\] = 10 must equal the 9 rows of k"),
    "q-nonzero-start": ([2, 3, 8], [0, 3, 9], 8, 8, r"cu_seqlens_q\[0\] must be 0, got 2"),
    "k-decreasing": ([0, 5, 6, 8], [0, 6, 4, 9], 8, 8,
                     r"cu_seqlens_k must be non-decreasing, but cu_seqlens_k\[2\] = 4 < cu_seqlens_k\[1\] = 6"),
    "q-negative": ([0, -4, 8], [0, 3, 9], 12, 8, r"cu_seqlens_q\[1\] = -4 < cu_seqlens_q\[0\] = 0"),
    "max-q-too-small": ([0, 3, 8], [0, 3, 9], 4, 8, r"max_seqlen_q=4 is shorter than sequence 1 .* 5 rows"),
    "max-k-too-small": ([0, 7, 8], [0, 7, 9], 8, 6, r"max_seqlen_k=6 is shorter than sequence 0 .* 7 rows"),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", list(BAD_OFFSETS))
def test_varlen_rejects_bad_offsets_on_every_backend(case, index_dtype, backend):
    cu_q, cu_k, max_q, max_k, message = BAD_OFFSETS[case]
    q, k, v = rand(8, 2, 16, grad=False), rand(9, 2, 16, grad=False), rand(9, 2, 16, grad=False)
    cu_q, cu_k = (torch.tensor(c, dtype=index_dtype, device=DEVICE) for c in (cu_q, cu_k))
    with pytest.raises(ValueError, match=message):
        llmkern.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend=backend)


def test_varlen_check_false_skips_the_offset_validation():
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 3, 8])  # valid offsets over the first 8 of 10 rows
    with pytest.raises(ValueError, match="must equal the 10 rows of q"):
        llmkern.varlen_attention(q, q, q, cu, cu, 5, 5, backend="torch")
    out = llmkern.varlen_attention(q, q, q, cu, cu, 5, 5, backend="torch", check=False)
    assert out.shape == (8, 2, 16)


# ---- scaled_dot_product_attention where PyTorch accepts the input ---------------------------

@pytest.mark.parametrize("shape_q,shape_k", [
    ((0, 2, 5, 16), (0, 2, 7, 16)), ((2, 0, 5, 16), (2, 0, 7, 16)), ((2, 2, 0, 16), (2, 2, 7, 16)),
    ((2, 2, 5, 16), (2, 2, 0, 16)), ((2, 4, 0, 16), (2, 2, 7, 16))],
    ids=["B=0", "H=0", "Sq=0", "Sk=0", "Sq=0-gqa"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sdpa_empty_inputs_match_pytorch(shape_q, shape_k, backend):
    q = torch.randn(shape_q, device=DEVICE, requires_grad=True)
    k = torch.randn(shape_k, device=DEVICE, requires_grad=True)
    v = torch.randn(shape_k, device=DEVICE, requires_grad=True)
    gqa = shape_q[1] != shape_k[1]
    out = llmkern.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, backend=backend)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or g.shape == t.shape for g, t in zip(grads, (q, k, v)))


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(mask=True), dict(dropout_p=0.0)],
                         ids=["causal", "float-mask", "plain"])
def test_sdpa_float64_matches_pytorch(kw):
    q, k, v = (rand(2, 2, s, 16, dtype=torch.float64) for s in (7, 9, 9))
    mask = torch.randn(7, 9, device=DEVICE, dtype=torch.float64) if kw.pop("mask", False) else None
    dout = torch.randn(2, 2, 7, 16, device=DEVICE, dtype=torch.float64)
    got = grads_of(lambda *t: llmkern.scaled_dot_product_attention(*t, attn_mask=mask, **kw),
                   [q, k, v], dout)
    want = grads_of(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask, **kw),
                    [t.detach().requires_grad_() for t in (q, k, v)], dout)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w)


@triton_only
def test_named_triton_backend_refuses_what_it_cannot_serve():
    q = rand(1, 2, 5, 16, dtype=torch.float64, grad=False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot serve .*float64"):
        llmkern.scaled_dot_product_attention(q, q, q, backend="triton")
    q = rand(1, 2, 5, 272, grad=False)  # over the kernels' head_dim: the reference serves auto
    with pytest.raises(RuntimeError, match="backend 'triton' cannot serve .*head_dim 272"):
        llmkern.scaled_dot_product_attention(q, q, q, backend="triton")
    torch.testing.assert_close(llmkern.scaled_dot_product_attention(q.cpu(), q.cpu(), q.cpu()),
                               F.scaled_dot_product_attention(q.cpu(), q.cpu(), q.cpu()))


@triton_only
@pytest.mark.skipif(HAS_GPU, reason="checks the Triton CPU interpreter")
def test_bf16_in_the_interpreter_is_refused_by_name_and_left_to_the_reference_by_auto():
    q = rand(1, 2, 5, 16, dtype=torch.bfloat16, grad=False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot serve .*interpreter"):
        llmkern.attention(q, q, q, backend="triton")
    t = rand(5, 2, 16, dtype=torch.bfloat16, grad=False)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot serve .*interpreter"):
        llmkern.varlen_attention(t, t, t, cu, cu, 3, 3, backend="triton")
    torch.testing.assert_close(llmkern.attention(q, q, q), reference.attention(q, q, q))


def test_hf_model_in_float64_runs_with_llmkern_attention():
    transformers = pytest.importorskip("transformers")
    import llmkern.integrations.transformers as lkt

    lkt.register()
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(2, 97, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding, so the attention gets a mask too
    logits = {}
    for impl in ("llmkern", "sdpa"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(ids, attention_mask=mask).logits
    assert logits["llmkern"].dtype == torch.float64
    torch.testing.assert_close(logits["llmkern"], logits["sdpa"])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("fn", ["sdpa", "attention"])
def test_attn_mask_requiring_grad_is_refused_on_every_backend(fn, backend):
    q, k, v = (rand(1, 2, 5, 16, grad=False) for _ in range(3))
    mask = torch.randn(5, 5, device=DEVICE, requires_grad=True)
    call = llmkern.scaled_dot_product_attention if fn == "sdpa" else llmkern.attention
    with pytest.raises(ValueError, match="attn_mask .* requires grad"):
        call(q, k, v, attn_mask=mask, backend=backend)
    with torch.no_grad():  # no gradient wanted: nothing to refuse
        call(q, k, v, attn_mask=mask, backend=backend)
    call(q, k, v, attn_mask=mask.detach(), backend=backend)


# ---- bad inputs --------------------------------------------------------------------------

def _qkv(b=1, h=2, hkv=2, sq=4, sk=4, d=16, dtype=torch.float32):
    return (torch.randn(b, h, sq, d, dtype=dtype), torch.randn(b, hkv, sk, d, dtype=dtype),
            torch.randn(b, hkv, sk, d, dtype=dtype))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: ((torch.randn(2, 4, 16),) + _qkv()[1:], {}), ValueError, "q must have 4 dimensions"),
    (lambda: (_qkv(d=272), {}), ValueError, "head_dim 272 .* exceeds"),
    (lambda: (_qkv(h=3, hkv=2), {}), ValueError, "multiple of the 2 heads of k"),
    (lambda: ((_qkv()[0].half(),) + _qkv()[1:], {}), TypeError, "k has dtype torch.float32 but q"),
    (lambda: ((_qkv()[0].int(),) + _qkv()[1:], {}), TypeError, "q has unsupported dtype"),
    (lambda: ((_qkv()[0],) + tuple(t.to("meta") for t in _qkv()[1:]), {}), ValueError,
     "k is on meta"),
    (lambda: (_qkv(), dict(attn_mask=torch.ones(3, 4, dtype=torch.bool))), ValueError,
     "attn_mask .* does not broadcast"),
    (lambda: (_qkv(), dict(attn_mask=torch.ones(4, 4, dtype=torch.int32))), TypeError, "attn_mask"),
    (lambda: (_qkv(), dict(window=(-1, 0))), ValueError, "window left"),
    (lambda: (_qkv(), dict(window=3)), ValueError, "window must be"),
    (lambda: (_qkv(), dict(softcap=0.0)), ValueError, "softcap"),
    (lambda: (_qkv(), dict(dropout_p=1.0)), ValueError, "dropout_p"),
    (lambda: (_qkv(sq=0), {}), ValueError, "q is empty"),
    (lambda: ((_qkv()[0][:, :, :, :8],) + _qkv()[1:], {}), ValueError, "head_dim of q"),
    (lambda: ((_qkv(b=2)[0],) + _qkv()[1:], {}), ValueError, "batch sizes differ"),
])
def test_attention_bad_inputs_raise_clear_errors(make, exc, match):
    (q, k, v), kw = make()
    with pytest.raises(exc, match=match):
        llmkern.attention(q, k, v, **kw)


def test_sdpa_and_varlen_bad_inputs():
    q, k, v = _qkv(h=4, hkv=2)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        llmkern.scaled_dot_product_attention(q, k, v)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="attn_mask .* must be None when is_causal"):
        llmkern.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 4), is_causal=True)
    with pytest.raises(ValueError, match="query must have 3 or 4|query must have 4"):
        llmkern.scaled_dot_product_attention(q[0, 0], k, v)
    t = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        llmkern.varlen_attention(t[None], t, t, cu, cu, 6, 6)
    with pytest.raises(TypeError, match="cu_seqlens_q has unsupported dtype"):
        llmkern.varlen_attention(t, t, t, cu.float(), cu, 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_k must be an int >= 1"):
        llmkern.varlen_attention(t, t, t, cu, cu, 6, 0)
    with pytest.raises(ValueError, match="cu_seqlens_q .* must have the same length"):
        llmkern.varlen_attention(t, t, t, cu, cu[:2], 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k must have 1 dimensions"):
        llmkern.varlen_attention(t, t, t, cu, cu[None], 6, 6)


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU behaviour of a named GPU backend")
def test_named_cuda_backend_on_cpu_raises():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve"):
        llmkern.attention(q, k, v, backend="cuda")


# ---- torch.library ops -------------------------------------------------------------------

@triton_only
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_opcheck_attention_ops(dropout_p, deterministic):
    q, k, v = rand(1, 2, 9, 16), rand(1, 1, 13, 16), rand(1, 1, 13, 16)
    mask = torch.randn(9, 13, device=DEVICE)
    # The seed is an int64 scalar tensor on the CPU (None without dropout).
    seed = torch.tensor(1234, dtype=torch.int64) if dropout_p > 0.0 else None
    args = (q, k, v, mask, 0.25, True, 4, None, 2.0, dropout_p, seed, False, "triton",
            deterministic)
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default, args)
    out, lse = torch.ops.llmkern.attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(),
                lse.detach(), torch.randn_like(lse), mask, 0.25, True, 4, None, 2.0, dropout_p,
                seed, False, "triton", deterministic)
    torch.library.opcheck(torch.ops.llmkern.attention_bwd.default, bwd_args)


@triton_only
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
def test_opcheck_varlen_ops(deterministic):
    cu = torch.tensor([0, 3, 11], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(11, 2, 16), rand(11, 1, 16), rand(11, 1, 16)
    args = (q, k, v, cu, cu, 8, 8, 0.25, True, None, None, 0.0, False, "triton", deterministic)
    torch.library.opcheck(torch.ops.llmkern.varlen_attention_fwd.default, args)
    out, lse = torch.ops.llmkern.varlen_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(),
                lse.detach(), None, cu, cu, 8, 8, 0.25, True, None, None, 0.0, False, "triton",
                deterministic)
    torch.library.opcheck(torch.ops.llmkern.varlen_attention_bwd.default, bwd_args)


@triton_only
def test_torch_compile_fullgraph_has_no_graph_break():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, 2, 16).permute(2, 0, 3, 1, 4)
            y = llmkern.attention(q, k, v, causal=True, backend="triton")
            z = llmkern.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
            return (y + z).transpose(1, 2).reshape(b, s, 32)

    model = Block().to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
    x = torch.randn(2, 11, 32, device=DEVICE, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiled_backward_through_transposed_views(backend):
    """(B, S, H, D) activations viewed as (B, H, S, D): the compiled graph must know the real
    layout of the gradients (a fake that kept the view's strides made the backward's view fail)."""
    def f(x):
        q = x.view(2, 8, 4, 16).transpose(1, 2)
        return llmkern.attention(q, q, q, causal=True, backend=backend).transpose(1, 2).reshape(2, 8, 64)

    x = torch.randn(2, 8, 64, device=DEVICE, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(x).square().sum(), x)
    (want,) = torch.autograd.grad(f(x).square().sum(), x)
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)
