"""The Triton GEMM with fused prologues/epilogues (kernels/matmul.py): every fusion against a
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
    """The GEMMs of the MLP backward: gelu' in the A loads (+ row sums), in the epilogue, gelu(B)."""
    from llmkern.kernels.matmul import gemm

    M, K, N = 130, 96, 257
    x, w = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype, scale=K ** -0.5)
    pre, dy = rand(M, N, dtype=dtype), rand(M, N, dtype=dtype)
    dpre64 = dy.double() * gelu_grad(pre.double())
    dpre_t = dy * gelu_grad(pre)  # torch in the same dtype
    rowsum = poison_(torch.empty(N, device=DEVICE, dtype=torch.float32))
    dw = gemm(dy.t(), x, a_gelu_grad=pre.t(), rowsum_out=rowsum)
    check(dw, dpre64.t() @ x.double(), dpre_t.t() @ x, "dW = (dy*gelu'(pre))^T x")
    check(rowsum, dpre64.sum(0), dpre_t.float().sum(0), "bias grad row sums")
    check(gemm(dy, w, a_gelu_grad=pre), dpre64 @ w.double(), dpre_t @ w, "dX = (dy*gelu'(pre)) W")
    dh = rand(M, K, dtype=dtype)
    w2 = rand(K, N, dtype=dtype, scale=N ** -0.5)  # c_proj weight (out=K, in=N)
    check(gemm(dh, w2, gelu_grad_pre=pre), (dh.double() @ w2.double()) * gelu_grad(pre.double()),
          (dh @ w2) * gelu_grad(pre), "epilogue * gelu'(pre)")
    check(gemm(dh.t(), pre, b_gelu=True), dh.double().t() @ gelu(pre.double()), dh.t() @ gelu(pre),
          "dW_proj = dout^T gelu(pre)")


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


# ---- ahead-of-time compiles: every shipped config, sm_80 and sm_90 ----------------------------

@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_aot_every_gemm_config(dt):
    reports = aot_reports("llmkern.kernels.matmul", dtypes=[dt])
    assert {r.arch for r in reports} == {80, 90}
    assert [p for r in reports for p in r.problems()] == []
    if dt == "bf16":  # tensor-core GEMMs: wgmma on sm_90
        assert [r.name for r in reports if r.arch == 90 and not r.uses_wgmma] == []


@pytest.mark.skipif(DEVICE.type != "cpu" or "triton" not in KERNEL_BACKENDS,
                    reason="the Triton CPU interpreter only")
def test_gemm_refuses_bf16_under_the_interpreter():
    from llmkern.kernels.matmul import gemm

    a, b = rand(8, 16, dtype=torch.bfloat16), rand(16, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="gemm: bf16 matmuls are wrong in the Triton CPU "
                                           "interpreter \\(a: torch.bfloat16 \\(8, 16\\)"):
        gemm(a, b)
