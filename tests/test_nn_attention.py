"""llmkern.nn.CausalSelfAttention: forward and every gradient against an SDPA float64 reference,
GQA/MQA, sliding window, padding masks, the static k/v cache of decoding, errors, torch.compile."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.testing import assert_close_to_ref
from conftest import DEVICE, DTYPES, KERNEL_BACKENDS

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
TRITON_ATTENTION = importlib.util.find_spec("llmkern.kernels.attention") is not None


@pytest.fixture(params=["torch"] + [b for b in KERNEL_BACKENDS if b == "triton"])
def attn_backend(request):
    """The torch reference and, where it can run, the Triton attention kernel."""
    if request.param == "triton" and not TRITON_ATTENTION:
        pytest.skip("kernels/attention.py (the Triton attention kernel) is not there yet")
    return request.param


def reference_forward(m, x, attn_mask=None):
    """What CausalSelfAttention computes, from F.scaled_dot_product_attention with explicit masks,
    in the dtype of x (float64 for the reference); returns (y, k, v)."""
    dt = x.dtype
    w, b = m.c_attn.weight.to(dt), m.c_attn.bias.to(dt) if m.c_attn.bias is not None else None
    bsz, t, c = x.shape
    hd, hq, hkv = m.head_dim, m.n_head, m.n_kv_head
    q, k, v = F.linear(x, w, b).split([hq * hd, hkv * hd, hkv * hd], dim=-1)
    q = q.view(bsz, t, hq, hd).transpose(1, 2)
    k = k.view(bsz, t, hkv, hd).transpose(1, 2)
    v = v.view(bsz, t, hkv, hd).transpose(1, 2)
    sk = k.shape[2]
    i = torch.arange(t, device=x.device).view(-1, 1) + (sk - t)  # absolute query positions
    j = torch.arange(sk, device=x.device).view(1, -1)
    allowed = j <= i
    if m.window is not None:
        left, right = m.window
        if left is not None:
            allowed = allowed & (j >= i - left)
        if right is not None:
            allowed = allowed & (j <= i + right)
    if attn_mask is not None:
        allowed = allowed & attn_mask
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(hq // hkv, 1),
                                       v.repeat_interleave(hq // hkv, 1), attn_mask=allowed)
    y = y.transpose(1, 2).reshape(bsz, t, c)
    pw, pb = m.c_proj.weight.to(dt), m.c_proj.bias.to(dt) if m.c_proj.bias is not None else None
    return F.linear(y, pw, pb), k, v


def _run(fn, m, x, dy, **kw):
    """Output and the gradients of x and of every parameter of m."""
    x = x.detach().clone().requires_grad_()
    for p in m.parameters():
        p.grad = None
    y = fn(m, x, **kw)
    y = y[0] if isinstance(y, tuple) else y
    params = list(m.parameters())
    grads = torch.autograd.grad(y, [x] + params, dy.to(y.dtype))
    return y.detach(), grads


def check_module(m, x, **kw):
    dtype = x.dtype
    dy = torch.randn(x.shape, device=DEVICE, dtype=dtype)
    out, grads = _run(lambda m, x, **kw: m(x, **kw), m, x, dy, **kw)
    out_t, grads_t = _run(lambda m, x, **kw: reference_forward(m, x, **kw)[0], m, x, dy, **kw)
    m64 = type(m)(m.n_embd, m.n_head, m.n_kv_head, bias=m.c_attn.bias is not None,
                  window=m.window).to(DEVICE, torch.float64)
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    out_64, grads_64 = _run(lambda m, x, **kw: reference_forward(m, x, **kw)[0], m64, x.double(),
                            dy, **kw64)
    scale = lambda r: max(1.0, r.abs().max().item())  # noqa: E731
    assert_close_to_ref(out, out_64, out_t, ATOL[dtype] * scale(out_64), "y")
    names = ["dx"] + [f"d{n}" for n, _ in m.named_parameters()]
    for name, g, g_t, g_64 in zip(names, grads, grads_t, grads_64):
        assert g.dtype == g_t.dtype, f"{name}: dtype {g.dtype} != {g_t.dtype}"
        assert_close_to_ref(g, g_64, g_t, ATOL[dtype] * scale(g_64), name)


def _module(n_embd, n_head, n_kv_head, dtype, backend, **kw):
    return llmkern.nn.CausalSelfAttention(n_embd, n_head, n_kv_head, backend=backend, device=DEVICE,
                                          dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_kv_head", [3, 1])  # multi-head and MQA
def test_forward_backward(attn_backend, dtype, n_kv_head):
    m = _module(48, 3, n_kv_head, dtype, attn_backend)
    check_module(m, torch.randn(2, 7, 48, device=DEVICE, dtype=dtype))


def test_gqa_window_mask_and_single_token(attn_backend):
    dtype = torch.float32
    m = _module(64, 4, 2, dtype, attn_backend, bias=False, window=3)
    assert m.window == (3, 0)
    check_module(m, torch.randn(2, 11, 64, device=DEVICE, dtype=dtype))
    check_module(m, torch.randn(3, 1, 64, device=DEVICE, dtype=dtype))
    # A padding mask (left padding of 2 tokens in row 0) combined with the causal mask.
    m = _module(64, 4, 2, dtype, attn_backend)
    keep = torch.ones(2, 1, 1, 5, dtype=torch.bool, device=DEVICE)
    keep[0, ..., :2] = False
    x = torch.randn(2, 5, 64, device=DEVICE, dtype=dtype)
    y, y_ref = m(x, attn_mask=keep), reference_forward(m, x, attn_mask=keep)[0]
    # Row 0's first two queries see no key: zeros from llmkern, NaN from SDPA; compare the rest.
    torch.testing.assert_close(y[0, 2:], y_ref[0, 2:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y[1], y_ref[1], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(y).all()


def _count_decode_calls(monkeypatch):
    """Counts the calls of the split-KV decode functional that CausalSelfAttention makes."""
    calls = []
    real = llmkern.nn.attention_with_kvcache

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(llmkern.nn, "attention_with_kvcache", counting)
    return calls


@pytest.mark.parametrize("contiguous", [False, True])
def test_kv_cache_decoding(attn_backend, contiguous, monkeypatch):
    """Prefill then token-by-token decoding through the static cache gives the full-sequence
    output; the cache buffers are written in place (same storage and shape every step). A
    contiguous cache decodes with the split-KV kernel (called once per step), a masked one not."""
    calls = _count_decode_calls(monkeypatch)
    dtype = torch.float32
    m = _module(64, 4, 2, dtype, attn_backend).eval()
    x = torch.randn(2, 9, 64, device=DEVICE, dtype=dtype)
    full = m(x)
    pos = torch.arange(9, device=DEVICE).expand(2, 9)
    cache = llmkern.nn.KVCache(1, 2, 12, contiguous=contiguous)
    with torch.no_grad():  # the decode kernel is forward only
        steps = [m(x[:, :5], cache=cache, input_pos=pos[:, :5])]
        cache.advance(pos[:, :5])
        ptr, shape = cache.k[0].data_ptr(), cache.k[0].shape
        for t in range(5, 9):
            steps.append(m(x[:, t:t + 1], cache=cache, input_pos=pos[:, t:t + 1]))
            cache.advance(pos[:, t:t + 1])
    assert shape == (2, 2, 12, 16) and cache.v[0].shape == shape
    assert cache.k[0].data_ptr() == ptr and cache.k[0].shape == shape
    assert len(calls) == (4 if contiguous else 0)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("contiguous", [False, True])
def test_kv_cache_ragged_positions_and_window(attn_backend, contiguous, monkeypatch):
    """Rows at different positions (a right-padded prefill, then per-row decoding) match each
    row run alone; a window applies to the cached positions, in the split-KV kernel too."""
    calls = _count_decode_calls(monkeypatch)
    dtype = torch.float32
    m = _module(64, 4, 2, dtype, attn_backend, window=2).eval()
    lens = [6, 3]
    x = torch.randn(2, 8, 64, device=DEVICE, dtype=dtype)
    cache = llmkern.nn.KVCache(1, 2, 8, contiguous=contiguous)
    pos = torch.arange(6, device=DEVICE).expand(2, 6)
    with torch.no_grad():
        y0 = m(x[:, :6], cache=cache, input_pos=pos)  # row 1's positions 3..5 are padding
        cache.set_lengths(torch.tensor(lens, device=DEVICE))
        step_pos = torch.tensor([[6], [3]], device=DEVICE)
        y1 = m(torch.stack([x[0, 6:7], x[1, 3:4]]), cache=cache, input_pos=step_pos)
    assert len(calls) == (1 if contiguous else 0)
    for row, n in enumerate(lens):
        alone = m(torch.cat([x[row, :n], x[row, n:n + 1]])[None])  # the row's n + 1 tokens
        torch.testing.assert_close(y0[row, :n], alone[0, :n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y1[row, 0], alone[0, n], rtol=1e-4, atol=1e-5)


def test_kv_cache_gradient_through_a_cached_step(attn_backend):
    """The gradient of a cached step's input equals that of the full sequence (past fixed)."""
    m = _module(64, 4, 2, torch.float32, attn_backend).eval()
    x = torch.randn(2, 7, 64, device=DEVICE)
    cache = llmkern.nn.KVCache(1, 2, 7)
    with torch.no_grad():
        m(x[:, :4], cache=cache, input_pos=torch.arange(4, device=DEVICE).expand(2, 4))
    new = x[:, 4:].clone().requires_grad_()
    dy = torch.randn(2, 3, 64, device=DEVICE)
    y = m(new, cache=cache, input_pos=torch.arange(4, 7, device=DEVICE).expand(2, 3))
    (dx,) = torch.autograd.grad(y, new, dy)
    ref_new = x[:, 4:].clone().requires_grad_()
    y_ref = m(torch.cat([x[:, :4], ref_new], dim=1))[:, 4:]
    (dx_ref,) = torch.autograd.grad(y_ref, ref_new, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_training():
    m = _module(32, 2, None, torch.float32, "torch", dropout=0.5)
    x = torch.randn(2, 6, 32, device=DEVICE)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m.eval()(x))


def test_state_dict_and_shapes():
    m = llmkern.nn.CausalSelfAttention(64, 8, 2)
    assert set(m.state_dict()) == {"c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"}
    assert m.c_attn.weight.shape == ((8 + 2 * 2) * 8, 64) and m.c_proj.weight.shape == (64, 64)
    assert "n_kv_head=2" in repr(m)
    # With n_kv_head == n_head, c_attn is GPT-2's (q, k, v) layout.
    assert llmkern.nn.CausalSelfAttention(64, 8).c_attn.weight.shape == (3 * 64, 64)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_embd"):
        llmkern.nn.CausalSelfAttention(30, 4)
    with pytest.raises(ValueError, match="n_kv_head"):
        llmkern.nn.CausalSelfAttention(32, 4, 3)
    m = llmkern.nn.CausalSelfAttention(32, 4)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(5, 32))


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) (backend aot_eager: no C++ compiler needed) over the module."""
    torch._dynamo.reset()
    m = _module(32, 4, 2, torch.float32, None)
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-6)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert math.isfinite(y.sum().item())
