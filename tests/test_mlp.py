"""linear_gelu and the GPT-2 MLP: forward and every gradient against float64, recompute,
views, errors, op registration, torch.compile, and llmkern.nn.MLP."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import llmkern
from llmkern import reference
from llmkern.testing import assert_close_to_ref
from conftest import DEVICE, DTYPES, HAS_GPU

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _scale(r):
    return max(1.0, r.abs().max().item())  # weight gradients grow with the number of rows


def _run(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    return out.detach(), torch.autograd.grad(out, wanted, dy.to(out.dtype))


def check(kernel_fn, ref_fn, tensors, names):
    dtype = tensors[0].dtype
    leaves64 = [t.double() if t is not None else None for t in tensors]
    dy = torch.randn(ref_fn(*leaves64).shape, device=DEVICE, dtype=dtype)
    out, grads = _run(kernel_fn, tensors, dy)
    out_t, grads_t = _run(ref_fn, tensors, dy)
    out_64, grads_64 = _run(ref_fn, leaves64, dy)
    assert out.dtype == dtype
    assert_close_to_ref(out, out_64, out_t, ATOL[dtype] * _scale(out_64), "out")
    present = [n for n, t in zip(names, tensors) if t is not None]
    for name, g, g_t, g_64 in zip(present, grads, grads_t, grads_64):
        assert g.dtype == g_t.dtype, f"{name}: dtype {g.dtype} != {g_t.dtype}"
        assert_close_to_ref(g, g_64, g_t, ATOL[dtype] * _scale(g_64), name)


def _params(n_in, n_out, dtype, bias=True):
    w = torch.randn(n_out, n_in, device=DEVICE, dtype=dtype) * n_in ** -0.5
    b = torch.randn(n_out, device=DEVICE, dtype=dtype) * 0.5 if bias else None
    return w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,bias", [(1, 64, 32, True), (17, 96, 257, False), (130, 200, 200, True)])
def test_linear_gelu(backend, dtype, M, K, N, bias):
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    w, b = _params(K, N, dtype, bias)
    check(lambda x, w, b: llmkern.linear_gelu(x, w, b, backend=backend), reference.linear_gelu,
          [x, w, b], ["dx", "dweight", "dbias"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recompute", [False, True])
def test_mlp(backend, dtype, recompute):
    # (2, 9, 64) tokens: 18 rows; hidden 200 (not a multiple of any block), out 64
    x = torch.randn(2, 9, 64, device=DEVICE, dtype=dtype)
    fw, fb = _params(64, 200, dtype)
    pw, pb = _params(200, 64, dtype)
    check(lambda *a: llmkern.mlp(*a, recompute=recompute, backend=backend), reference.mlp,
          [x, fw, fb, pw, pb], ["dx", "dfc_weight", "dfc_bias", "dproj_weight", "dproj_bias"])


def test_mlp_no_bias_and_views(backend):
    dtype = torch.float32
    base = torch.randn(130, 2 * 96, device=DEVICE, dtype=dtype)
    x = base[:, ::2]  # no unit stride in the last dim: copied
    fw = torch.randn(257, 96 + 5, device=DEVICE, dtype=dtype)[:, :96] * 0.1  # row stride 101
    pw, _ = _params(257, 32, dtype)
    check(lambda *a: llmkern.mlp(*a, backend=backend), reference.mlp, [x, fw, None, pw, None],
          ["dx", "dfc_weight", "dfc_bias", "dproj_weight", "dproj_bias"])


def test_mlp_fused_residual(backend):
    x = torch.randn(17, 64, device=DEVICE)
    fw, fb = _params(64, 96, torch.float32)
    pw, pb = _params(96, 64, torch.float32)
    res = torch.randn(17, 64, device=DEVICE)
    check(lambda x, fw, fb, pw, pb, r: llmkern.mlp(x, fw, fb, pw, pb, backend=backend, residual=r),
          lambda x, fw, fb, pw, pb, r: reference.mlp(x, fw, fb, pw, pb) + r, [x, fw, fb, pw, pb, res],
          ["dx", "dfc_weight", "dfc_bias", "dproj_weight", "dproj_bias", "dresidual"])
    with pytest.raises(ValueError, match=r"residual must have shape \(17, 64\)"):
        llmkern.mlp(x, fw, fb, pw, pb, residual=res[:3])


def test_mlp_recompute_saves_no_activation(backend):
    x = torch.randn(17, 64, device=DEVICE, requires_grad=True)
    fw, fb = _params(64, 256, torch.float32)
    pw, pb = _params(256, 64, torch.float32)
    for recompute, numel in ((False, 17 * 256), (True, 0)):
        out, pre = torch.ops.llmkern.mlp_fwd(x, fw, fb, pw, pb, None, recompute, backend)
        assert pre.numel() == numel


class _OpOutputs(TorchDispatchMode):
    """Records the outputs of every llmkern op that runs under it."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "llmkern":
            self.seen[func.name()] = out
        return out


def test_no_grad_forward_stores_no_pre_activation(backend):
    """Without a gradient to compute, the forward writes no M x N pre-activation."""
    x = torch.randn(17, 64, device=DEVICE)
    fw, fb = _params(64, 96, torch.float32)
    pw, pb = _params(96, 64, torch.float32)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), _OpOutputs() as ops:
            xi = x.clone().requires_grad_()
            y = llmkern.linear_gelu(xi, fw, fb, backend=backend)
            out = llmkern.mlp(xi, fw, fb, pw, pb, backend=backend)
        assert ops.seen["llmkern::linear_gelu_fwd"][1].numel() == (17 * 96 if grad else 0)
        assert ops.seen["llmkern::mlp_fwd"][1].numel() == (17 * 96 if grad else 0)
        torch.testing.assert_close(y, reference.linear_gelu(x, fw, fb), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, reference.mlp(x, fw, fb, pw, pb), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no input requires grad: same as no_grad
        y, pre = torch.ops.llmkern.linear_gelu_fwd(x, fw, fb, backend, False)
    assert pre.numel() == 0
    xi = x.clone().requires_grad_()
    y, _ = torch.ops.llmkern.linear_gelu_fwd(xi, fw, fb, backend, False)
    with pytest.raises(RuntimeError, match="store_pre=False"):
        y.sum().backward()


def test_bad_inputs():
    x = torch.randn(4, 8)
    w, b = torch.randn(16, 8), torch.randn(16)
    with pytest.raises(ValueError, match=r"weight must have shape \(out_features, 8\)"):
        llmkern.linear_gelu(x, torch.randn(16, 7), b)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        llmkern.linear_gelu(x, w, torch.randn(15))
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has torch.float32"):
        llmkern.linear_gelu(x, w.half(), None)
    with pytest.raises(TypeError, match="x has unsupported dtype"):
        llmkern.linear_gelu(x.int(), w, b)
    with pytest.raises(ValueError, match="x is empty"):
        llmkern.linear_gelu(torch.randn(0, 8), w, b)
    with pytest.raises(ValueError, match="proj_weight must have shape"):
        llmkern.mlp(x, w, b, torch.randn(8, 15), None)
    with pytest.raises(ValueError, match=r"fc_bias must have shape \(16,\)"):
        llmkern.mlp(x, w, torch.randn(3), torch.randn(8, 16), None)
    with pytest.raises(ValueError, match="fc_weight must have 2 dimensions"):
        llmkern.mlp(x, w[0], b, torch.randn(8, 16), None)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve this call"):
        llmkern.mlp(x, w, b, torch.randn(8, 16), None, backend="cuda")


@pytest.mark.gpu
def test_device_mismatch():
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        llmkern.linear_gelu(torch.randn(4, 8, device="cuda"), torch.randn(16, 8))


def test_opcheck(backend):
    x = torch.randn(5, 32, device=DEVICE, requires_grad=True)
    fw, fb = (t.requires_grad_() for t in _params(32, 48, torch.float32))
    pw, pb = (t.requires_grad_() for t in _params(48, 32, torch.float32))
    torch.library.opcheck(torch.ops.llmkern.linear_gelu_fwd.default, (x, fw, fb, backend))
    no_grad = tuple(t.detach() for t in (x, fw, fb))  # store_pre=False: no backward to check
    torch.library.opcheck(torch.ops.llmkern.linear_gelu_fwd.default, (*no_grad, backend, False))
    res = torch.randn(5, 32, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.llmkern.mlp_fwd.default, (x, fw, fb, pw, pb, res, False, backend))
    torch.library.opcheck(torch.ops.llmkern.mlp_fwd.default, (x, fw, None, pw, None, None, True, backend))


class _Block(nn.Module):
    def __init__(self, n, backend):
        super().__init__()
        self.ln = nn.LayerNorm(n)
        self.mlp = llmkern.nn.MLP(n, backend=backend)

    def forward(self, x):
        return self.mlp(self.ln(x), residual=x)


def test_torch_compile_fullgraph(backend):
    model = _Block(32, backend).to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert x.grad is not None and model.mlp.c_fc.weight.grad is not None


def test_nn_mlp_state_dict_matches_two_linears(backend):
    class GPT2MLP(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.c_fc = nn.Linear(n, 4 * n)
            self.gelu = nn.GELU(approximate="tanh")
            self.c_proj = nn.Linear(4 * n, n)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    plain = GPT2MLP(16).to(DEVICE)
    ours = llmkern.nn.MLP(16, device=DEVICE, backend=backend)
    assert list(ours.state_dict()) == ["c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"]
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(3, 16, device=DEVICE)
    torch.testing.assert_close(ours(x), plain(x), atol=1e-5, rtol=1e-5)
    assert llmkern.nn.MLP(8, hidden=24, bias=False, recompute=True).c_fc.weight.shape == (24, 8)
    assert llmkern.nn.MLP(8, bias=False).c_proj.bias is None


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [False, True])
def test_mlp_bf16_gpt2_shape(backend, recompute):
    x = torch.randn(4, 257, 768, device=DEVICE, dtype=torch.bfloat16)
    fw, fb = _params(768, 3072, torch.bfloat16)
    pw, pb = _params(3072, 768, torch.bfloat16)
    check(lambda *a: llmkern.mlp(*a, recompute=recompute, backend=backend), reference.mlp,
          [x, fw, fb, pw, pb], ["dx", "dfc_weight", "dfc_bias", "dproj_weight", "dproj_bias"])


def test_autocast_casts_inputs_like_f_linear(backend):
    """Under autocast, fp32 activations and weights run in the autocast dtype, as nn.Linear does."""
    amp_dtype = torch.bfloat16 if HAS_GPU else torch.float16  # CPU: fp16 (bf16 dots are broken in the interpreter)
    device_type = DEVICE.type
    x = torch.randn(17, 64, device=DEVICE, requires_grad=True)
    mlp = nn.Sequential(nn.Linear(64, 96), nn.GELU(approximate="tanh"), nn.Linear(96, 64)).to(DEVICE)
    with torch.autocast(device_type, dtype=amp_dtype):
        out = llmkern.mlp(x, mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias, backend=backend)
        expected = mlp(x)
        gelu = llmkern.linear_gelu(x, mlp[0].weight, mlp[0].bias, backend=backend)
    assert out.dtype == expected.dtype == gelu.dtype == amp_dtype
    ref64 = reference.mlp(x.double(), *(p.double() for p in (mlp[0].weight, mlp[0].bias,
                                                           mlp[2].weight, mlp[2].bias)))
    assert_close_to_ref(out, ref64, expected, ATOL[amp_dtype], "autocast mlp")
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and mlp[0].weight.grad.dtype == torch.float32


@pytest.mark.skipif(not llmkern.backends.triton_interpret(), reason="the Triton CPU interpreter only")
def test_triton_refuses_bf16_matmuls_under_the_interpreter():
    # tl.dot on bf16 operands returns garbage (~1e8) in the interpreter instead of failing
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w1, w2 = torch.randn(32, 16, dtype=torch.bfloat16), torch.randn(16, 32, dtype=torch.bfloat16)
    reason = "backend 'triton' cannot serve this call: bf16 matmuls are wrong in the Triton CPU interpreter"
    with pytest.raises(RuntimeError, match=reason):
        llmkern.linear_gelu(x, w1, backend="triton")
    with pytest.raises(RuntimeError, match=reason):
        llmkern.mlp(x, w1, None, w2, None, backend="triton")
    torch.testing.assert_close(llmkern.mlp(x, w1, None, w2, None),
                               reference.mlp(x, w1, None, w2, None))  # auto: the torch reference
