"""Gated MLPs (SwiGLU, GeGLU): forward and every gradient against float64, memory kept for the
backward, the HF-compatible module, op registration, errors."""
import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.ops.gated_mlp import gated_mlp_reference
from llmkern.testing import assert_close_to_ref
from conftest import DEVICE, DTYPES, HAS_GPU

ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _weights(d, f, d_out=None, dtype=torch.float32):
    d_out = d if d_out is None else d_out
    gate_up = torch.randn(2 * f, d, device=DEVICE, dtype=dtype) / d ** 0.5
    down = torch.randn(d_out, f, device=DEVICE, dtype=dtype) / f ** 0.5
    return gate_up, down


def check_gated(x, gate_up, down, activation, backend, up=None):
    """Output and the gradients of x and every weight vs float64, with the tolerance rule."""
    tensors = [x, gate_up, down] + ([up] if up is not None else [])

    def run(fn, ts):
        leaves = [t.detach().clone().requires_grad_() for t in ts]
        out = fn(*leaves)
        return out.detach(), torch.autograd.grad(out, leaves, dy.to(out.dtype))

    def ref(x, gu, dn, u=None):
        g, u = (gu, u) if u is not None else gu.chunk(2)
        return gated_mlp_reference(x, g, u, dn, activation)

    def kernel(x, gu, dn, u=None):
        return llmkern.gated_mlp(x, gu, dn, u, activation=activation, backend=backend)

    dy = torch.randn(*x.shape[:-1], down.shape[0], device=DEVICE, dtype=x.dtype)
    out, grads = run(kernel, tensors)
    out_t, grads_t = run(ref, tensors)
    out_64, grads_64 = run(ref, [t.double() for t in tensors])
    scale = lambda r: max(1.0, r.abs().max().item())  # noqa: E731
    assert_close_to_ref(out, out_64, out_t, ATOL[x.dtype] * scale(out_64), "out")
    for name, g, g_t, g_64 in zip(("dx", "dgate_up", "ddown", "dup"), grads, grads_t, grads_64):
        assert g.dtype == x.dtype, f"{name}: dtype {g.dtype}"
        assert_close_to_ref(g, g_64, g_t, ATOL[x.dtype] * scale(g_64), name)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16, 8), (17, 48, 70), (3, 37, 64, 127)])
def test_gated_mlp(backend, dtype, shape, activation):
    *lead, d, f = shape
    x = torch.randn(*lead, d, device=DEVICE, dtype=dtype)
    gate_up, down = _weights(d, f, dtype=dtype)
    check_gated(x, gate_up, down, activation, backend)


def test_separate_weights_and_other_output_width(backend):
    """gate and up as separate (F, D) weights (read in place) and D_out != D; strided x."""
    x = torch.randn(5, 40, 2 * 33, device=DEVICE)[..., ::2]
    gate_up, down = _weights(33, 50, d_out=29)
    gate, up = gate_up.chunk(2)
    check_gated(x, gate.clone(), down, "silu", backend, up=up.clone())


def test_swiglu_and_geglu_names(backend):
    x = torch.randn(4, 32, device=DEVICE)
    gate_up, down = _weights(32, 24)
    g, u = gate_up.chunk(2)
    expect = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), down)
    torch.testing.assert_close(llmkern.swiglu_mlp(x, gate_up, down, backend=backend), expect,
                               atol=1e-5, rtol=1e-5)
    expect = F.linear(F.gelu(F.linear(x, g), approximate="tanh") * F.linear(x, u), down)
    torch.testing.assert_close(llmkern.geglu_mlp(x, gate_up, down, backend=backend), expect,
                               atol=1e-5, rtol=1e-5)
    expect = F.linear(F.gelu(F.linear(x, g)) * F.linear(x, u), down)
    torch.testing.assert_close(llmkern.geglu_mlp(x, g, down, u, approximate="none", backend=backend),
                               expect, atol=1e-5, rtol=1e-5)


def test_backward_keeps_only_the_pre_activations(backend):
    """Saved for the backward: x, the weights and one (tokens x 2F) tensor; eager keeps more."""
    m, d, f = 64, 32, 96
    x = torch.randn(m, d, device=DEVICE, requires_grad=True)
    gate_up, down = (w.requires_grad_() for w in _weights(d, f))
    g, u = gate_up.chunk(2)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum()
        params = {(t.untyped_storage().data_ptr(), t.dtype) for t in (x, gate_up, down)}
        return sum(v for k, v in seen.items() if k not in params)

    fused = saved_bytes(lambda: llmkern.gated_mlp(x, gate_up, down, backend=backend))
    eager = saved_bytes(lambda: gated_mlp_reference(x, g, u, down))
    assert fused == m * 2 * f * 4  # the pre-activations only
    assert fused < eager


def test_no_grad_skips_the_saved_pre_activations(backend):
    x = torch.randn(6, 16, device=DEVICE)
    gate_up, down = _weights(16, 12)
    with torch.no_grad():
        out, gu = torch.ops.llmkern.gated_mlp_fwd(x, *gate_up.chunk(2), down, "silu", False, backend)
    assert gu.numel() == 0
    torch.testing.assert_close(out, gated_mlp_reference(x, *gate_up.chunk(2), down),
                               atol=1e-5, rtol=1e-5)


def test_swiglu_module_keeps_hf_state_dict(backend):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=72, hidden_act="silu")
    hf = llama.LlamaMLP(cfg).to(DEVICE)
    mod = llmkern.nn.SwiGLUMLP(32, 72, backend=backend).to(DEVICE)
    assert set(mod.state_dict()) == set(hf.state_dict())
    mod.load_state_dict(hf.state_dict())
    x = torch.randn(2, 9, 32, device=DEVICE, requires_grad=True)
    out, ref = mod(x), hf(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref.square().sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)
    for name, p in mod.named_parameters():
        torch.testing.assert_close(p.grad, hf.get_parameter(name).grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("save", [True, False])
def test_opcheck(backend, save):
    x = torch.randn(9, 16, device=DEVICE, requires_grad=save)
    gate_up, down = _weights(16, 20)
    g, u = (t.contiguous().requires_grad_(save) for t in gate_up.chunk(2))
    down.requires_grad_(save)
    torch.library.opcheck(torch.ops.llmkern.gated_mlp_fwd.default,
                          (x, g, u, down, "silu", save, backend))
    gu = torch.randn(9, 40, device=DEVICE)
    dout = torch.randn(9, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.llmkern.gated_mlp_bwd.default,
                          (dout, x.detach(), g.detach(), u.detach(), down.detach(), gu, "gelu_tanh",
                           backend))


def test_torch_compile_fullgraph(backend):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), llmkern.nn.SwiGLUMLP(16, 24, backend=backend),
                                torch.nn.Linear(16, 8)).to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
    x = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


def test_kernels_compile_ahead_of_time_without_spills():
    from llmkern.testing import aot_reports

    reports = aot_reports("llmkern.kernels.gated_mlp", dtypes=["bf16", "fp32"])
    assert {r.arch for r in reports} == {80, 90}
    assert [p for r in reports for p in r.problems()] == []


def test_bad_inputs():
    x = torch.randn(4, 16)
    gate_up, down = _weights(16, 10)
    with pytest.raises(ValueError, match=r"gate_up_weight must have shape \(2 \* F, 16\)"):
        llmkern.swiglu_mlp(x, gate_up[:-1], down)
    with pytest.raises(ValueError, match=r"down_weight must have shape \(D_out, 10\)"):
        llmkern.swiglu_mlp(x, gate_up, down[:, :9])
    with pytest.raises(ValueError, match="up_weight must have shape"):
        llmkern.swiglu_mlp(x, gate_up[:10], down, up_weight=gate_up[10:19])
    with pytest.raises(TypeError, match="down_weight has dtype torch.float16"):
        llmkern.swiglu_mlp(x, gate_up, down.half())
    with pytest.raises(ValueError, match="activation must be one of"):
        llmkern.gated_mlp(x, gate_up, down, activation="relu")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        llmkern.swiglu_mlp(x.tolist(), gate_up, down)
