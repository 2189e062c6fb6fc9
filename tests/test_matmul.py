"""The Triton GEMM with fused row sums/epilogues (kernels/matmul.py): every fusion against a
float64 reference, and ahead-of-time compiles of every shipped config for sm_80 and sm_90."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPES, KERNEL_BACKENDS

from llmkern.testing import aot_reports, assert_close_to_ref, poison_

needs_triton = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="triton backend unavailable")
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def check(out, ref64, torch_out, name):
    assert_close_to_ref(out, ref64, torch_out, ATOL[out.dtype] * max(1.0, ref64.abs().max().item()), name)


def gelu(t):
    return F.gelu(t, approximate="tanh")


def gelu_grad(pre):
    p = pre.detach().double().requires_grad_()
    return torch.autograd.grad(gelu(p).sum(), p)[0].to(pre.dtype) if pre.dtype != torch.float64 else \
        torch.autograd.grad(gelu(p).sum(), p)[0]


def rand(*shape, dtype, scale=1.0):
    return torch.randn(*shape, device=DEVICE, dtype=dtype) * scale


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 64, 32), (17, 96, 257), (130, 200, 200)])
def test_linear_epilogues(dtype, M, K, N):
    from llmkern.kernels.matmul import gemm

    x, w, b = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype, scale=K ** -0.5), rand(N, dtype=dtype)
    res = rand(M, N, dtype=dtype)
    pre = poison_(torch.empty(M, N, device=DEVICE, dtype=dtype))
    out = poison_(torch.empty(M, N, device=DEVICE, dtype=dtype))
    gemm(x, w.t(), bias=b, activation="gelu", pre_out=pre, residual=res, out=out)
    pre64 = F.linear(x.double(), w.double(), b.double())
    check(pre, pre64, F.linear(x, w, b), "pre")
    check(out, gelu(pre64) + res.double(), gelu(F.linear(x, w, b)) + res, "gelu + residual")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_fusions(dtype):
    """The pieces of the MLP backward: d(pre) = dy * gelu'(pre) elementwise, row sums, the gelu'
    epilogue (also writing gelu(pre))."""
    from llmkern.kernels.matmul import gelu_backward, gemm

    M, K, N = 130, 96, 257
    x = rand(M, K, dtype=dtype)
    pre, dy = rand(M, N, dtype=dtype), rand(M, N, dtype=dtype)
    dpre64 = dy.double() * gelu_grad(pre.double())
    dpre_t = dy * gelu_grad(pre)  # torch in the same dtype
    dpre = gelu_backward(dy.t(), pre.t()).t()  # strided inputs are fine
    check(dpre, dpre64, dpre_t, "d(pre) = dy * gelu'(pre)")
    rowsum = poison_(torch.empty(N, device=DEVICE, dtype=torch.float32))
    dw = gemm(dpre.t(), x, rowsum_out=rowsum)
    check(dw, dpre64.t() @ x.double(), dpre_t.t() @ x, "dW = dpre^T x")
    check(rowsum, dpre64.sum(0), dpre_t.float().sum(0), "bias grad row sums")
    with pytest.raises(ValueError, match="differ"):
        gelu_backward(dy, pre[:, 1:])
    dh = rand(M, K, dtype=dtype)
    w2 = rand(K, N, dtype=dtype, scale=N ** -0.5)  # c_proj weight (out=K, in=N)
    check(gemm(dh, w2, gelu_grad_pre=pre), (dh.double() @ w2.double()) * gelu_grad(pre.double()),
          (dh @ w2) * gelu_grad(pre), "epilogue * gelu'(pre)")
    # the same epilogue also writes h = gelu(pre) for the dW_proj GEMM
    h = poison_(torch.empty(M, N, device=DEVICE, dtype=dtype))
    check(gemm(dh, w2, gelu_grad_pre=pre, act_out=h),
          (dh.double() @ w2.double()) * gelu_grad(pre.double()), (dh @ w2) * gelu_grad(pre),
          "epilogue * gelu'(pre), writing gelu(pre)")
    check(h, gelu(pre.double()), gelu(pre), "h = gelu(pre) from the epilogue")
    with pytest.raises(ValueError, match="act_out .* needs gelu_grad_pre"):
        gemm(dh, w2, act_out=h)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp32_accumulate_in_place(dtype):
    """C += A B in fp32 with half inputs (the LM-head weight gradient of linear_cross_entropy)."""
    from llmkern.kernels.matmul import gemm

    acc = rand(70, 33, dtype=torch.float32)
    a, b = rand(19, 70, dtype=dtype), rand(19, 33, dtype=dtype)
    ref = acc.double() + a.double().t() @ b.double()
    torch_out = acc + (a.t() @ b).float()
    gemm(a.t(), b, residual=acc, out=acc)
    check(acc, ref, torch_out, "accumulate")


@needs_triton
def test_non_contiguous_operands():
    from llmkern.kernels.matmul import gemm

    x = rand(17, 200, dtype=torch.float32)[:, ::2]  # no unit stride: copied
    w = rand(64, 100, dtype=torch.float32)
    check(gemm(x, w.t()), x.double() @ w.double().t(), x @ w.t(), "strided")


# ---- the persistent TMA kernel (kernels/matmul_persistent.py), forced under the interpreter ----

def _persistent_cases(dtype):
    """(name, a, b, kwargs, reference in float64, torch in dtype) for every epilogue and layout;
    odd M and N (the descriptors' leading dims are kept 16-byte aligned)."""
    M, K, N = 37, 104, 257
    x, w, b = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype, scale=K ** -0.5), rand(N, dtype=dtype)
    res = rand(M, N, dtype=dtype)
    x64, w64, b64, res64 = x.double(), w.double(), b.double(), res.double()
    pre64 = x64 @ w64.t() + b64
    cases = [("fwd bias", x, w.t(), dict(bias=b), pre64, F.linear(x, w, b)),
             ("fwd bias gelu", x, w.t(), dict(bias=b, activation="gelu"), gelu(pre64),
              gelu(F.linear(x, w, b))),
             ("fwd bias residual", x, w.t(), dict(bias=b, residual=res), pre64 + res64,
              F.linear(x, w, b) + res)]
    n2 = 136  # B row-major (K, N): its rows must be 16-byte aligned
    wd = rand(K, n2, dtype=dtype, scale=n2 ** -0.5)  # a dX GEMM
    dy = rand(M, K, dtype=dtype)
    cases.append(("dx nn", dy, wd, {}, dy.double() @ wd.double(), dy @ wd))
    g = rand(K, 40, dtype=dtype)  # A = g^T column-major: a dW GEMM dY^T X
    xk = rand(K, n2, dtype=dtype)
    cases.append(("dw tn", g.t(), xk, {}, g.double().t() @ xk.double(), g.t() @ xk))
    v = rand(N, K, dtype=dtype)  # both operands transposed views
    cases.append(("tt", g.t(), v.t(), {}, g.double().t() @ v.double().t(), g.t() @ v.t()))
    return cases


def _skip_fp32_on_gpu(dtype):
    if dtype == torch.float32 and DEVICE.type == "cuda":
        pytest.skip("fp32 operands take the tiled kernel on a GPU (no tensor-core path)")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_persistent_kernel_epilogues_and_layouts(dtype):
    from llmkern.kernels.matmul import gemm

    _skip_fp32_on_gpu(dtype)

    for name, a, b, kw, ref64, torch_out in _persistent_cases(dtype):
        out = poison_(torch.empty(a.shape[0], b.shape[1], device=DEVICE, dtype=dtype))
        gemm(a, b, out=out, kernel="persistent", **kw)
        check(out, ref64, torch_out, f"persistent {name}")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_persistent_kernel_backward_epilogue(dtype):
    """d(pre) = (dout W) * gelu'(pre), with pre stored by the forward and gelu(pre) written."""
    from llmkern.kernels.matmul import gemm

    _skip_fp32_on_gpu(dtype)

    M, K, N = 29, 64, 136
    x, w, b = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype, scale=K ** -0.5), rand(N, dtype=dtype)
    pre = poison_(torch.empty(M, N, device=DEVICE, dtype=dtype))
    y = gemm(x, w.t(), bias=b, activation="gelu", pre_out=pre, kernel="persistent")
    pre64 = F.linear(x.double(), w.double(), b.double())
    check(pre, pre64, F.linear(x, w, b), "persistent pre")
    check(y, gelu(pre64), gelu(F.linear(x, w, b)), "persistent gelu")
    dh, wp = rand(M, 48, dtype=dtype), rand(48, N, dtype=dtype, scale=48 ** -0.5)
    h = poison_(torch.empty(M, N, device=DEVICE, dtype=dtype))
    dpre = gemm(dh, wp, gelu_grad_pre=pre, act_out=h, kernel="persistent")
    check(dpre, (dh.double() @ wp.double()) * gelu_grad(pre.double()), (dh @ wp) * gelu_grad(pre),
          "persistent * gelu'(pre)")
    check(h, gelu(pre.double()), gelu(pre), "persistent gelu(pre)")
    acc = rand(M, N, dtype=torch.float32)  # in-place fp32 accumulation
    ref = acc.double() + x.double() @ w.double().t()
    torch_out = acc + (x @ w.t()).float()
    gemm(x, w.t(), residual=acc, out=acc, kernel="persistent")
    check(acc, ref, torch_out, "persistent accumulate")


@needs_triton
def test_persistent_kernel_refuses_what_it_cannot_serve(monkeypatch):
    from llmkern.kernels.matmul import gemm

    a, b = rand(17, 33, dtype=torch.float16), rand(33, 8, dtype=torch.float16)  # rows of 66 bytes
    with pytest.raises(ValueError, match=r"kernel='persistent' cannot serve .*16-byte aligned"):
        gemm(a, b, kernel="persistent")
    with pytest.raises(ValueError, match="no row sums"):
        gemm(a[:, :32], b[:32], rowsum_out=torch.empty(a.shape[0], device=a.device),
             kernel="persistent")
    if DEVICE.type == "cuda":
        with pytest.raises(ValueError, match="fp32 has no tensor-core path"):
            gemm(a[:, :32].float(), b[:32].float(), kernel="persistent")
    with pytest.raises(ValueError, match="must be one of"):
        gemm(a, b, kernel="fast")
    # the environment's choice falls back to the tiled kernel where the persistent one cannot serve
    monkeypatch.setenv("LLMKERN_GEMM_KERNEL", "persistent")
    check(gemm(a, b), a.double() @ b.double(), a @ b, "fallback")


@pytest.mark.gpu
def test_auto_takes_the_persistent_kernel_on_sm90(monkeypatch):
    import llmkern.kernels.matmul_persistent as persistent
    from llmkern.kernels.matmul import gemm

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the persistent kernel is routed to on sm_90 only")
    calls, run = [], persistent.persistent_gemm
    monkeypatch.setattr(persistent, "persistent_gemm", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    x, w = rand(300, 128, dtype=torch.bfloat16), rand(520, 128, dtype=torch.bfloat16, scale=128 ** -0.5)
    b = rand(520, dtype=torch.bfloat16)
    check(gemm(x, w.t(), bias=b, activation="gelu"), gelu(F.linear(x.double(), w.double(), b.double())),
          gelu(F.linear(x, w, b)), "auto on sm_90")
    assert calls == [1]
    x2, w2 = rand(300, 127, dtype=torch.bfloat16), rand(520, 127, dtype=torch.bfloat16)
    gemm(x2, w2.t())  # rows of 254 bytes: not TMA-aligned, the tiled kernel
    assert calls == [1]


@needs_triton
def test_mlp_on_the_persistent_kernel(monkeypatch):
    """The whole MLP with every GEMM the persistent kernel can serve routed to it."""
    import llmkern
    from llmkern import reference

    monkeypatch.setenv("LLMKERN_GEMM_KERNEL", "persistent")
    x = rand(3, 13, 64, dtype=torch.float16).requires_grad_()
    fw, fb = rand(136, 64, dtype=torch.float16, scale=0.125), rand(136, dtype=torch.float16)
    pw, pb = rand(64, 136, dtype=torch.float16, scale=0.0857), rand(64, dtype=torch.float16)
    params = [t.requires_grad_() for t in (fw, fb, pw, pb)]
    out = llmkern.mlp(x, *params, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *params], dout)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, *params)]
    out64 = reference.mlp(*leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())
    leaves16 = [t.detach().requires_grad_() for t in (x, *params)]
    out16 = reference.mlp(*leaves16)
    grads16 = torch.autograd.grad(out16, leaves16, dout)
    check(out, out64, out16, "out")
    for name, g, g64, g16 in zip(["dx", "dfc_w", "dfc_b", "dproj_w", "dproj_b"], grads, grads64, grads16):
        check(g, g64, g16, name)


# ---- autotuning: keys and pruning -------------------------------------------------------------

def test_autotune_key_tells_layouts_and_fusions_apart(monkeypatch):
    """A forward, a dX and a dW GEMM of the same (M, N, K) tune separately."""
    import llmkern.kernels.matmul as matmul

    rounds = []

    def bench(fn, quantiles=None, **_):
        fn()
        rounds.append(1)
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    tuner = matmul.tuned([matmul._cfg(32, 32, 32, 4, 1), matmul._cfg(64, 32, 32, 4, 1)],
                         do_bench=bench)
    monkeypatch.setattr(matmul, "_kernel_for", lambda dtype, kind: tuner)
    M = N = K = 48
    x, w = rand(M, K, dtype=torch.float32), rand(N, K, dtype=torch.float32)
    dy = rand(M, N, dtype=torch.float32)
    gemm = lambda *a, **kw: matmul.gemm(*a, kernel="tiled", **kw)  # noqa: E731
    gemm(x, w.t())            # forward: B = W^T
    gemm(dy, w)               # dX: both row-major
    gemm(dy.t(), x)           # dW: A = dY^T
    gemm(x, w.t(), bias=w[:, 0])  # forward with a bias epilogue
    gemm(dy, w)               # dX again: tuned already
    assert len(tuner.cache) == 4
    assert len(rounds) == 4 * 2


def test_configs_pruned_to_shared_memory():
    from llmkern.kernels.matmul import CONFIGS, shipped_configs
    from llmkern.kernels.matmul_common import fitting, smem_bytes

    sm90 = shipped_configs(torch.bfloat16, "plain", "sm90")
    assert any(c.kwargs["BLOCK_N"] == 256 for c in sm90)
    assert shipped_configs(torch.bfloat16, "plain", "sm80") != sm90
    kept = fitting(sm90, 2, 100 * 1024)  # e.g. a consumer GPU's 100 KiB
    assert kept and all(smem_bytes(c, 2) <= 100 * 1024 for c in kept)
    assert len(kept) < len(sm90)
    for arch in CONFIGS:  # every shipped list fits its arch (227 KiB sm_90, 163 KiB sm_80)
        limit = {"sm90": 232448, "sm80": 166912}[arch]
        for dt, kinds in CONFIGS[arch].items():
            for kind, cfgs in kinds.items():
                assert fitting(cfgs, 4 if dt == "fp32" else 2, limit) == cfgs, (arch, dt, kind)


# ---- ahead-of-time compiles: every shipped config, sm_80 and sm_90 ----------------------------

@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_aot_every_gemm_config(dt):
    reports = aot_reports("llmkern.kernels.matmul", dtypes=[dt])
    assert {r.arch for r in reports} == {80, 90}
    assert [p for r in reports for p in r.problems()] == []
    if dt == "bf16":  # tensor-core GEMMs: wgmma on sm_90
        assert [r.name for r in reports if r.arch == 90 and r.name.startswith("gemm")
                and not r.uses_wgmma] == []


def test_aot_persistent_gemm_configs():
    """The persistent kernel's sm_90 configs: wgmma, TMA, warp specialization (setmaxnreg)."""
    from llmkern.kernels.matmul_persistent import warp_specialize_supported

    reports = aot_reports("llmkern.kernels.matmul_persistent", archs=(90,))
    assert reports and [p for r in reports for p in r.problems()] == []
    assert [r.name for r in reports if not (r.uses_wgmma and r.uses_tma)] == []
    if warp_specialize_supported():
        assert [r.name for r in reports if not r.uses_setmaxnreg] == []


@pytest.mark.skipif(DEVICE.type != "cpu" or "triton" not in KERNEL_BACKENDS,
                    reason="the Triton CPU interpreter only")
def test_gemm_refuses_bf16_under_the_interpreter():
    from llmkern.kernels.matmul import gemm

    a, b = rand(8, 16, dtype=torch.bfloat16), rand(16, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="gemm: bf16 matmuls are wrong in the Triton CPU "
                                           "interpreter \\(a: torch.bfloat16 \\(8, 16\\)"):
        gemm(a, b)
