"""Numerics of the CUDA C++ ops (torch.ops.llmkern_cuda.*) against llmkern.reference.

GPU only (marked gpu). The extension is the installed llmkern._C, else it is built just in
time (build/jit). The tolerance rule: err(cuda, ref64) <= 2 * err(torch same dtype, ref64) + atol.
The general op tests (tests/test_layer_norm.py, ...) also run on the cuda backend through the
`backend` fixture; these tests call the schemas directly, including what the Python ops do not
reach (lse, has_bias variants, linear_dgelu_bwd, determinism, error messages).
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import HAS_GPU
from llmkern import reference
from llmkern.testing import assert_close_to_ref

pytestmark = pytest.mark.gpu
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def ops():
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    from llmkern.ops import cuda_ext

    if cuda_ext.load_error() is not None:
        cuda_ext.build_jit()
    return torch.ops.llmkern_cuda


def rand(*shape, dtype=torch.float16, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=torch.float32) * scale).to(dtype)


def check(out, ref64, torch_out, dtype, name, atol=None):
    assert_close_to_ref(out.double(), ref64.double(), torch_out.double(),
                        ATOL[dtype] if atol is None else atol, name)


def grads(fn, inputs, dy):
    """Output and gradients of fn(*inputs) for the float inputs that require grad."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [t.grad if t is not None and t.requires_grad else None for t in leaves]


# ---- norms ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (37, 64), (4, 768), (2, 5, 1500), (3, 9000), (2, 70001)])
@pytest.mark.parametrize("rms", [False, True])
def test_norm(ops, dtype, shape, rms):
    n = shape[-1]
    x, dy = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype)
    w, b = rand(n, dtype=dtype) + 1, rand(n, dtype=dtype)
    _check_norm(ops, x, dy, w, b, rms, dtype)


def _check_norm(ops, x, dy, w, b, rms, dtype):
    """Forward and backward of the CUDA LayerNorm / RMSNorm against float64 and torch."""
    n = x.shape[-1]
    if rms:
        y, rstd = ops.rms_norm_fwd(x, w, 1e-6)
        dx, dw = ops.rms_norm_bwd(dy, x, w, rstd)
        f = lambda x_, w_: reference.rms_norm(x_, w_, 1e-6)  # noqa: E731
        args, got = (x, w), (dx, dw)
    else:
        y, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-5)
        dx, dw, db = ops.layer_norm_bwd(dy, x, w, True, mean, rstd)
        f = lambda x_, w_, b_: reference.layer_norm(x_, w_, b_, 1e-5)  # noqa: E731
        args, got = (x, w, b), (dx, dw, db)
    y64, g64 = grads(f, [a.double() for a in args], dy.double())
    yt, gt = grads(f, list(args), dy)
    check(y, y64, yt, dtype, "y")
    for name, a, r, t in zip(["dx", "dweight", "dbias"], got, g64, gt):
        # parameter gradients sum over rows: scale atol with the row count
        atol = ATOL[dtype] * (1 if name == "dx" else max(1, x.numel() // n))
        check(a, r, t, dtype, name, atol)


# (rows, n): one warp per row over more rows than one wave of blocks holds (each warp loops),
# 1024 (the widest warp row in fp16/bf16; a block row in fp32), just over a warp, rows cached by
# a block (8190; 12289 in fp16/bf16 only, fp32 caches up to 8192) and uncached rows; odd n and
# n not a multiple of 8 take the element-wise tails.
NORM_PATHS = [(20000, 67), (3001, 1024), (257, 1000), (129, 1030), (33, 8190), (9, 12289), (5, 16385)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,n", NORM_PATHS)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "offset"])
@pytest.mark.parametrize("rms", [False, True])
def test_norm_row_groups_and_vector_fallbacks(ops, dtype, rows, n, layout, rms):
    """Rows grouped per block and the 16-byte / element-wise paths: strided rows (a row stride
    that breaks 16-byte alignment) and a base pointer one element off take the scalar path; a
    weight view at an odd offset is realigned for the kernels' vector parameter loads."""
    if layout == "strided":
        x, dy = rand(rows, n + 3, dtype=dtype)[:, :n], rand(rows, n + 3, dtype=dtype)[:, :n]
    elif layout == "offset":
        x = rand(rows * n + 1, dtype=dtype)[1:].view(rows, n)
        dy = rand(rows * n + 1, dtype=dtype)[1:].view(rows, n)
    else:
        x, dy = rand(rows, n, dtype=dtype), rand(rows, n, dtype=dtype)
    w = rand(n + 1, dtype=dtype)[1:] + 1 if layout == "offset" else rand(n, dtype=dtype) + 1
    b = rand(n, dtype=dtype)
    _check_norm(ops, x, dy, w, b, rms, dtype)


def test_norm_without_params_and_noncontiguous(ops):
    x = rand(64, 300, dtype=torch.float16)[:, :257]
    y, mean, rstd = ops.layer_norm_fwd(x, None, None, 1e-5)
    check(y, reference.layer_norm(x.double()), reference.layer_norm(x), torch.float16, "y")
    dx, dw, db = ops.layer_norm_bwd(torch.ones_like(x), x, None, False, mean, rstd)
    assert dw.numel() == 0 and db.numel() == 0


def test_norm_backward_is_deterministic(ops):
    x, dy, w = rand(4096, 1024), rand(4096, 1024), rand(1024)
    y, mean, rstd = ops.layer_norm_fwd(x, w, w, 1e-5)
    a = ops.layer_norm_bwd(dy, x, w, True, mean, rstd)
    b = ops.layer_norm_bwd(dy, x, w, True, mean, rstd)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# ---- softmax -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,causal", [((1, 1), False), ((2, 3, 17, 17), True), ((37, 64), False), ((2, 127, 300), True),
                                          ((300, 127), True), ((4, 5000), False), ((2, 3, 40001), True),
                                          # one warp per row up to 1024 columns in every dtype
                                          ((3000, 1024), False), ((2, 999, 999), True)])
def test_softmax(ops, dtype, shape, causal):
    x, dy = rand(*shape, dtype=dtype, scale=3.0), rand(*shape, dtype=dtype)
    y = ops.softmax_fwd(x, 0.7, causal)
    dx = ops.softmax_bwd(dy, y, 0.7)
    f = lambda x_: reference.softmax(x_, 0.7, causal)  # noqa: E731
    y64, (dx64,) = grads(f, [x.double()], dy.double())
    yt, (dxt,) = grads(f, [x], dy)
    check(y, y64, yt, dtype, "y")
    check(dx, dx64, dxt, dtype, "dx")
    if causal and shape[-2] > shape[-1]:
        assert (y[..., : shape[-2] - shape[-1], :] == 0).all()  # rows that see no key


# ---- attention -----------------------------------------------------------------------------

ATTN_CASES = [  # B, H, Hkv, Sq, Sk
    (1, 1, 1, 1, 1), (2, 4, 4, 17, 17), (1, 4, 2, 127, 300), (2, 4, 1, 300, 127), (1, 2, 2, 1500, 1500),
    (1, 2, 1, 64, 128),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention(ops, dtype, d, causal, case):
    B, H, Hkv, Sq, Sk = case
    q, k, v = rand(B, H, Sq, d, dtype=dtype), rand(B, Hkv, Sk, d, dtype=dtype), rand(B, Hkv, Sk, d, dtype=dtype)
    do = rand(B, H, Sq, d, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    out, lse = ops.attention_fwd(q, k, v, scale, causal)
    dq, dk, dv = ops.attention_bwd(do, q, k, v, out, lse, scale, causal)

    def f(q_, k_, v_):
        return reference.attention(q_, k_, v_, causal=causal, scale=scale)

    o64, g64 = grads(f, [q.double(), k.double(), v.double()], do.double())
    ot, gt = grads(f, [q, k, v], do)
    check(out, o64, ot, dtype, "out")
    _, lse64 = reference.attention(q.double(), k.double(), v.double(), causal=causal, scale=scale, return_lse=True)
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly where a row sees no key"
    assert (lse[finite] - lse64[finite]).abs().max().item() < 1e-2 if finite.any() else True
    assert (out[~finite.unsqueeze(-1).expand_as(out)] == 0).all()
    for name, a, r, t in zip(["dq", "dk", "dv"], (dq, dk, dv), g64, gt):
        check(a, r, t, dtype, name)


def test_attention_noncontiguous_and_deterministic(ops):
    base = rand(2, 300, 4, 64)  # (B, S, H, D) viewed as (B, H, S, D)
    q = k = v = base.transpose(1, 2)
    out, lse = ops.attention_fwd(q, k, v, 0.125, True)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True, scale=0.125)
    check(out, ref, reference.attention(q, k, v, causal=True, scale=0.125), torch.float16, "out")
    do = torch.randn_like(out)
    a = ops.attention_bwd(do, q, k, v, out, lse, 0.125, True)
    b = ops.attention_bwd(do, q, k, v, out, lse, 0.125, True)
    for u, w in zip(a, b):
        assert torch.equal(u, w)


def test_attention_errors(ops):
    q = rand(1, 2, 8, 96)
    with pytest.raises(RuntimeError, match="head_dim 96"):
        ops.attention_fwd(q, q, q, 0.1, False)
    q = rand(1, 2, 8, 64, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="q has unsupported dtype"):
        ops.attention_fwd(q, q, q, 0.1, False)
    q, k = rand(1, 3, 8, 64), rand(1, 2, 8, 64)
    with pytest.raises(RuntimeError, match="multiple of k/v heads"):
        ops.attention_fwd(q, k, k, 0.1, False)


# ---- linear / MLP --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mkn", [(1, 8, 8), (17, 64, 40), (256, 768, 3072), (127, 136, 24)])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("gelu", [False, True])
def test_linear(ops, dtype, mkn, has_bias, gelu):
    M, K, N = mkn
    x, w = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype, scale=K ** -0.5)
    b = rand(N, dtype=dtype) if has_bias else None
    dy = rand(M, N, dtype=dtype)
    f = reference.linear_gelu if gelu else torch.nn.functional.linear
    if gelu:
        y, pre = ops.linear_gelu_fwd(x, w, b)
        check(pre, torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()),
              torch.nn.functional.linear(x, w, b), dtype, "pre", atol=ATOL[dtype] * 4)
        dx, dw, db = ops.linear_gelu_bwd(dy, x, w, pre, has_bias)
    else:
        y = ops.linear_fwd(x, w, b)
        dx, dw, db = ops.linear_bwd(dy, x, w, has_bias)
    args = [x, w] + ([b] if has_bias else [])
    y64, g64 = grads(f, [a.double() for a in args], dy.double())
    yt, gt = grads(f, args, dy)
    atol = ATOL[dtype] * 4
    check(y, y64, yt, dtype, "y", atol)
    check(dx, g64[0], gt[0], dtype, "dx", atol)
    check(dw, g64[1], gt[1], dtype, "dweight", atol * max(1, M // 16))
    if has_bias:
        check(db, g64[2], gt[2], dtype, "dbias", atol * max(1, M // 16))
    else:
        assert db.numel() == 0


def test_linear_plans_are_cached(ops):
    """The cuBLASLt descriptors and algorithm of a GEMM are planned once per shape: a repeated
    call adds no plan, gives the same result and allocates only its output (no workspace)."""
    from llmkern.ops import cuda_ext

    x, w = rand(37, 72), rand(52, 72, scale=72 ** -0.5)  # a shape no other test uses
    before = cuda_ext.linear_cache_size()
    y1 = ops.linear_fwd(x, w, None)
    assert cuda_ext.linear_cache_size() == before + 1
    allocs = torch.cuda.memory_stats()["allocation.all.allocated"]
    y2 = ops.linear_fwd(x, w, None)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] - allocs == 1  # y2 only
    assert cuda_ext.linear_cache_size() == before + 1
    assert torch.equal(y1, y2)
    check(y1, torch.nn.functional.linear(x.double(), w.double()), torch.nn.functional.linear(x, w),
          torch.float16, "y", ATOL[torch.float16] * 4)
    ops.linear_fwd(rand(38, 72), w, None)  # another shape: another plan
    assert cuda_ext.linear_cache_size() == before + 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dweight_accumulate(ops, dtype):
    """out = dy^T x into an fp32 buffer, without reading it (a NaN-poisoned buffer) and then
    accumulating (beta = 1), as the chunked LM-head losses chain their weight gradients."""
    M, N, K = 37, 131, 72
    dy1, x1, dy2, x2 = rand(M, N, dtype=dtype), rand(M, K, dtype=dtype), rand(M + 4, N, dtype=dtype), rand(M + 4, K, dtype=dtype)
    out = torch.full((N, K), float("nan"), device="cuda")
    ops.dweight_accumulate(out, dy1, x1, False)
    ops.dweight_accumulate(out, dy2, x2, True)
    ref64 = dy1.double().t() @ x1.double() + dy2.double().t() @ x2.double()
    ref_t = (dy1.float().t() @ x1.float() + dy2.float().t() @ x2.float()).to(dtype)
    check(out, ref64, ref_t, dtype, "dweight", ATOL[dtype] * 8)
    same = torch.full((N, K), float("nan"), device="cuda", dtype=dtype)  # out in the operands' dtype
    ops.dweight_accumulate(same, dy1, x1, False)
    check(same, dy1.double().t() @ x1.double(), (dy1.float().t() @ x1.float()).to(dtype), dtype, "dweight",
          ATOL[dtype] * 8)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        ops.dweight_accumulate(out.t(), dy1, x1, True)


def test_linear_dgelu_bwd(ops):
    M, Nh, No = 200, 512, 128
    pre, wp, dz = rand(M, Nh), rand(No, Nh, scale=0.05), rand(M, No)
    dpre, db = ops.linear_dgelu_bwd(dz, wp, pre)

    def expected(pre_, wp_, dz_):
        p = pre_.detach().clone().requires_grad_(True)
        torch.nn.functional.gelu(p, approximate="tanh").backward(dz_ @ wp_)
        return p.grad

    r64 = expected(pre.double(), wp.double(), dz.double())
    rt = expected(pre, wp, dz)
    check(dpre, r64, rt, torch.float16, "dpre", 1e-2)
    check(db, r64.sum(0), rt.sum(0), torch.float16, "dbias", 1e-1)


# ---- cross-entropy -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mv", [(1, 1), (17, 1000), (4, 256000), (3, 50257)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(ops, dtype, mv, smoothing):
    M, V = mv
    logits = rand(M, V, dtype=dtype, scale=4.0)
    target = torch.randint(0, V, (M,), device="cuda")
    target[::3] = -100
    loss, lse = ops.cross_entropy_fwd(logits, target, -100, smoothing)
    dloss = torch.rand(M, device="cuda")
    dx = ops.cross_entropy_bwd(dloss, logits, target, lse, -100, smoothing)

    def f(x_):
        return reference.cross_entropy(x_, target, -100, "none", smoothing)

    l64, (g64,) = grads(f, [logits.double()], dloss.double())
    lt, (gt,) = grads(f, [logits], dloss.to(torch.float32))
    check(loss, l64, lt, dtype, "loss", 1e-4)
    assert (loss[target == -100] == 0).all() and (dx[target == -100] == 0).all()
    check(dx, g64, gt, dtype, "dlogits")
