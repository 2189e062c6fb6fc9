"""Rotary embeddings: forward and gradients against float64, layouts, positions, op registration."""
import pytest
import torch

import llmkern
from llmkern.ops.rotary import rotary_reference
from llmkern.testing import assert_close_to_ref
from conftest import DEVICE, DTYPES, HAS_GPU

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _angles(table, half, batch=None, dtype=torch.float32):
    """cos/sin tables with GPT-NeoX frequencies; per-row (batch, table, half) when batch is set."""
    inv = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    pos = torch.arange(table, dtype=torch.float64)
    if batch is not None:  # a different offset per row
        pos = pos[None, :] + 3 * torch.arange(batch, dtype=torch.float64)[:, None]
    freqs = pos[..., None] * inv
    return freqs.cos().to(DEVICE, dtype), freqs.sin().to(DEVICE, dtype)


def _same_dtype(q, k, cos, sin, position_ids, interleaved):
    """PyTorch in the inputs' dtype, as Hugging Face computes it (the tolerance rule's baseline)."""
    def rot(x, c, s):
        r = 2 * c.shape[-1]
        xr = x[..., :r]
        if interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            y = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), -1).flatten(-2)
        else:
            x1, x2 = xr.chunk(2, -1)
            y = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
        return torch.cat((y, x[..., r:]), -1)

    seq = q.shape[-2]
    if position_ids is None:
        c, s = cos[..., :seq, :], sin[..., :seq, :]
    elif cos.dim() == 2:
        c, s = cos[position_ids], sin[position_ids]
    else:
        rows = torch.arange(cos.shape[0], device=cos.device)[:, None]
        c, s = cos[rows, position_ids], sin[rows, position_ids]
    c, s = c.unsqueeze(-3).to(q.dtype), s.unsqueeze(-3).to(q.dtype)
    return rot(q, c, s), rot(k, c, s)


def check_rotary(q, k, cos, sin, position_ids=None, interleaved=False, backend=None):
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def run(fn, q, k, cos, sin):
        q, k = (t.detach().clone().requires_grad_() for t in (q, k))
        oq, ok = fn(q, k, cos, sin, position_ids, interleaved)
        gq, gk = torch.autograd.grad((oq, ok), (q, k), (dq.to(oq.dtype), dk.to(ok.dtype)))
        return [oq.detach(), ok.detach(), gq, gk]

    out = run(lambda *a: llmkern.rotary(*a, backend=backend), q, k, cos, sin)
    same = run(_same_dtype, q, k, cos, sin)
    ref = run(rotary_reference, q.double(), k.double(), cos.double(), sin.double())
    for name, o, s, r in zip(("q", "k", "dq", "dk"), out, same, ref):
        assert o.dtype == q.dtype, f"{name}: dtype {o.dtype} != {q.dtype}"
        assert_close_to_ref(o, r, s, ATOL[q.dtype], name)


# (batch, q heads, k heads, seq, head_dim, rotary half): primes, GQA, MQA, partial rotary.
SHAPES = [(1, 1, 1, 1, 2, 1), (2, 4, 2, 17, 64, 32), (1, 6, 1, 127, 32, 16),
          (3, 3, 3, 5, 80, 16), (2, 2, 1, 9, 96, 40)]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rotary(backend, dtype, shape, interleaved):
    b, hq, hk, s, d, half = shape
    q = torch.randn(b, hq, s, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, hk, s, d, device=DEVICE, dtype=dtype)
    cos, sin = _angles(s + 4, half)
    check_rotary(q, k, cos, sin, interleaved=interleaved, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_row_positions_and_tables(backend, dtype):
    """Ragged rows: (B, S) positions into a shared table, and per-row (B, T, R/2) tables."""
    q = torch.randn(3, 4, 11, 64, device=DEVICE, dtype=dtype)
    k = torch.randn(3, 2, 11, 64, device=DEVICE, dtype=dtype)
    pos = torch.stack([torch.arange(11) + 5, torch.randint(0, 30, (11,)), torch.arange(11)]).to(DEVICE)
    cos, sin = _angles(30, 32)
    check_rotary(q, k, cos, sin, pos, backend=backend)
    check_rotary(q, k, cos, sin, pos[1], interleaved=True, backend=backend)  # (S,) positions
    cos3, sin3 = _angles(30, 32, batch=3)
    check_rotary(q, k, cos3, sin3, backend=backend)
    check_rotary(q, k, cos3, sin3, pos.int(), backend=backend)
    check_rotary(q, k, cos3[:1], sin3[:1], backend=backend)  # batch-1 table broadcasts


def test_strided_inputs_and_hf_angles(backend):
    """(B, S, H, D) projections viewed as (B, H, S, D), and HF's duplicated (B, S, D) angles."""
    q = torch.randn(2, 13, 4, 64, device=DEVICE).transpose(1, 2)
    k = torch.randn(2, 13, 2, 64, device=DEVICE).transpose(1, 2)
    cos, sin = _angles(13, 32, batch=2)
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    check_rotary(q, k, full_cos[..., :32], full_sin[..., :32], backend=backend)
    q_nc = torch.randn(2, 4, 13, 128, device=DEVICE)[..., ::2]  # last dim not contiguous
    check_rotary(q_nc, k, cos, sin, backend=backend)


def test_matches_transformers_apply_rotary_pos_emb(backend):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q = torch.randn(2, 4, 10, 64, device=DEVICE)
    k = torch.randn(2, 2, 10, 64, device=DEVICE)
    cos, sin = _angles(10, 32, batch=2)
    hq, hk = llama.apply_rotary_pos_emb(q, k, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))
    oq, ok = llmkern.rotary(q, k, cos, sin, backend=backend)
    torch.testing.assert_close(oq, hq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ok, hk, atol=1e-5, rtol=1e-5)


def test_angle_gradients_use_the_reference(backend):
    q = torch.randn(1, 2, 7, 16, device=DEVICE)
    k = torch.randn(1, 2, 7, 16, device=DEVICE)
    cos, sin = (t.requires_grad_() for t in _angles(7, 8))
    oq, ok = llmkern.rotary(q, k, cos, sin, backend=backend)
    (oq.sum() + ok.sum()).backward()
    rq, rk = rotary_reference(q, k, cos.detach(), sin.detach())
    torch.testing.assert_close(oq, rq)
    assert cos.grad is not None and sin.grad is not None and cos.grad.abs().sum() > 0


def test_double_backward(backend):
    q = torch.randn(1, 2, 5, 16, device=DEVICE, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 5, 16, device=DEVICE, dtype=torch.float64, requires_grad=True)
    cos, sin = _angles(5, 8, dtype=torch.float64)

    def fn(q, k):
        return llmkern.rotary(q.float(), k.float(), cos.float(), sin.float(), backend=backend)

    def ref(q, k):
        return rotary_reference(q, k, cos, sin)

    gq = torch.autograd.grad(fn(q, k)[0].pow(2).sum(), q, create_graph=True)[0]
    gq_ref = torch.autograd.grad(ref(q, k)[0].pow(2).sum(), q, create_graph=True)[0]
    torch.testing.assert_close(gq.double(), gq_ref, atol=1e-5, rtol=1e-5)
    hq = torch.autograd.grad(gq.sum(), q)[0]
    hq_ref = torch.autograd.grad(gq_ref.sum(), q)[0]
    torch.testing.assert_close(hq.double(), hq_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_opcheck(backend, interleaved):
    q = torch.randn(2, 4, 9, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 9, 32, device=DEVICE, requires_grad=True)
    cos, sin = _angles(12, 12)
    pos = torch.randint(0, 12, (2, 9), device=DEVICE)
    for p in (None, pos):
        torch.library.opcheck(torch.ops.llmkern.rotary_fwd.default,
                              (q, k, cos, sin, p, interleaved, backend))
        torch.library.opcheck(torch.ops.llmkern.rotary_bwd.default,
                              (q, k, cos, sin, p, interleaved, backend))


def test_torch_compile_fullgraph(backend):
    cos, sin = _angles(16, 8)
    proj = torch.nn.Linear(32, 3 * 32).to(DEVICE)

    def f(x, pos):
        q, k, v = proj(x).view(2, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
        q, k = llmkern.rotary(q, k, cos, sin, pos, backend=backend)
        return (q * k).sum(-1)

    x = torch.randn(2, 16, 32, device=DEVICE, requires_grad=True)
    pos = torch.arange(16, device=DEVICE).expand(2, 16)
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
    out = compiled(x, pos)
    out.sum().backward()
    torch.testing.assert_close(out, f(x, pos), atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    q = torch.randn(2, 4, 8, 32)
    k = torch.randn(2, 2, 8, 32)
    cos, sin = _angles(8, 16)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        llmkern.rotary(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="share batch, seq and head_dim"):
        llmkern.rotary(q, k[..., :16], cos, sin)
    with pytest.raises(TypeError, match="one dtype"):
        llmkern.rotary(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="at most head_dim / 2 = 16"):
        llmkern.rotary(q, k, *_angles(8, 17))
    with pytest.raises(ValueError, match="a row for each of the 8 positions"):
        llmkern.rotary(q, k, cos[:5], sin[:5])
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 8\)"):
        llmkern.rotary(q, k, cos, sin, torch.arange(8) + 1)
    with pytest.raises(ValueError, match=r"position_ids must have shape \(8,\) or \(2, 8\)"):
        llmkern.rotary(q, k, cos, sin, torch.arange(7))
    with pytest.raises(TypeError, match="position_ids has unsupported dtype"):
        llmkern.rotary(q, k, cos, sin, torch.arange(8.0))
    with pytest.raises(ValueError, match="one shape"):
        llmkern.rotary(q, k, cos, sin[:, :8])
    with pytest.raises(ValueError, match="batch 1 or 2"):
        llmkern.rotary(q, k, *_angles(8, 16, batch=3))


def test_kernels_compile_ahead_of_time_without_spills():
    from llmkern.testing import aot_reports

    reports = aot_reports("llmkern.kernels.rotary")
    assert reports and not [p for r in reports for p in r.problems()]
