"""The Hopper kernels (kernels/attention_hopper.py, attention_hopper_bwd.py): the attention
matrix through the forward and the 5-GEMM backward against float64 with the tolerance rule,
its atomic-dQ variant (deterministic=False) likewise, bit-identical ordered backward runs (dense,
GQA, varlen), which kernels serve which calls (the backward's table by GPU and flag), the
benchmark providers that pin the backward, the scratch allocator, and
ahead-of-time compiles of the shipped configs for sm_90 (wgmma, TMA, setmaxnreg on
warp-specialized configs, no spills, shared memory within the limit).

On CPU, LLMKERN_ATTENTION_KERNEL=hopper routes the triton backend to them under the
interpreter (fp32/fp16, small tiles so that short sequences span several tiles).
"""
import contextvars
import math

import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.kernels import attention_hopper as hopper
from llmkern.kernels.attention_options import AttentionOptions
from llmkern.testing import assert_close_to_ref, aot_reports, max_error
from conftest import DEVICE, HAS_GPU, KERNEL_BACKENDS
from test_attention import ATOL, CASES, GRAD_ATOL, check_against_reference, make_qkv

pytestmark = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="no Triton backend here")


@pytest.fixture(autouse=True)
def _hopper_kernel(monkeypatch):
    monkeypatch.setenv(hopper.KERNEL_ENV, "hopper")


# The Hopper kernels' dtypes here: fp32 under the interpreter (on a GPU fp32 stays on the
# portable kernels), fp16, and bf16 on a GPU. DT: the most exact of them.
DTYPES = [torch.float16] + ([torch.bfloat16] if HAS_GPU else [torch.float32])
DT = torch.float16 if HAS_GPU else torch.float32

# Every matrix case the Hopper kernel serves (masks keep the portable kernel), fp32 and fp16.
SERVED = [c for c, (*_, kw) in CASES.items() if "mask" not in kw]
HOPPER_CASES = [(c, dt) for c in SERVED for dt in (torch.float32, torch.float16)]


@pytest.mark.parametrize("case,dtype", HOPPER_CASES,
                         ids=[f"{c}-{str(dt)[6:]}" for c, dt in HOPPER_CASES])
def test_features_match_reference(case, dtype):
    b, h, hkv, sq, sk, d, kw = CASES[case]
    q, k, v = make_qkv(b, h, hkv, sq, sk, d, dtype)
    check_against_reference(q, k, v, **kw)


@pytest.mark.parametrize("d,dtype", [(40, torch.float16), (64, torch.float32),
                                     (96, torch.float16), (128, torch.float32),
                                     (192, torch.float16), (256, torch.float16)])
def test_head_dims(d, dtype):
    q, k, v = make_qkv(1, 2, 1, 19, 35, d, dtype)
    check_against_reference(q, k, v, causal=True, grads=d in (40, 128))


def test_rows_that_see_no_key_are_zero():
    # Causal with Sq > Sk: the first Sq - Sk queries see nothing.
    q, k, v = make_qkv(1, 2, 2, 40, 17, 16, torch.float32, requires_grad=False)
    out, lse = llmkern.attention(q, k, v, causal=True, backend="triton", return_lse=True)
    dead = torch.arange(40) < 23
    assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
    assert torch.isneginf(lse[:, :, dead]).all() and torch.isfinite(lse[:, :, ~dead]).all()


def test_sdpa_top_left_causal_both_alignments():
    for sq, sk in ((13, 29), (29, 13)):
        q, k, v = make_qkv(1, 2, 2, sq, sk, 32, torch.float32, requires_grad=False)
        got = llmkern.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(),
                                                                v.double(), is_causal=True)
        same = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert_close_to_ref(got, want.float(), same, ATOL[torch.float32], f"sdpa {sq}x{sk}")


@pytest.mark.parametrize("deterministic", [True, False], ids=["ordered", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_with_an_empty_sequence(dtype, deterministic, seen_options):
    # One sequence has no queries and one no keys: the former writes nothing (its neighbours'
    # rows stay intact), the latter gives zeros and lse = -inf. Both ways to accumulate dQ.
    lens_q, lens_k = [5, 0, 37, 9], [9, 12, 30, 0]
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    h, hkv, d = 4, 2, 32
    q = torch.randn(sum(lens_q), h, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), hkv, d, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), hkv, d, device=DEVICE, dtype=dtype, requires_grad=True)
    kw = dict(causal=True, window=(9, None), softcap=4.0)
    out = llmkern.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                   backend="triton", deterministic=deterministic, **kw)
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.varlen_attention(*ins64, cu_q, cu_k, max(lens_q), max(lens_k), **kw)
    same = reference.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **kw)
    assert_close_to_ref(out, ref, same, ATOL[dtype], "out")
    assert torch.equal(out[-9:], torch.zeros_like(out[-9:]))
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, ins64, dout.double())
    base = torch.autograd.grad(same, (q, k, v), dout)
    for name, g, w, b_ in zip(("dq", "dk", "dv"), got, want, base):
        assert_close_to_ref(g, w, b_, GRAD_ATOL[dtype], name)
    served = not (q.is_cuda and dtype == torch.float32)
    assert [o.deterministic for o in seen_options] == ([deterministic] if served else [])


def test_non_contiguous_views():
    # (B, S, H, D) buffers viewed as (B, H, S, D), as models produce them.
    qs = torch.randn(2, 27, 4, 16, device=DEVICE)
    ks = torch.randn(2, 31, 2, 16, device=DEVICE)
    q, k, v = qs.transpose(1, 2), ks.transpose(1, 2), ks.transpose(1, 2).flip(-2)
    assert hopper.use_hopper(q, k, v, None, AttentionOptions(0.25, causal=True))
    check_against_reference(q, k, v, grads=False, causal=True)


# ---- the 5-GEMM backward: deterministic ------------------------------------------------

def _grads_twice(fn, ins, dout):
    return [torch.autograd.grad(fn(*ins), ins, dout) for _ in range(2)]


def test_backward_is_bit_identical_run_to_run_with_gqa():
    q, k, v = make_qkv(2, 4, 2, 45, 53, 40, torch.float16)
    dout = torch.randn(2, 4, 45, 40, device=DEVICE, dtype=torch.float16)
    first, second = _grads_twice(lambda *t: llmkern.attention(*t, causal=True, softcap=6.0,
                                                              backend="triton"), (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_backward_is_bit_identical_run_to_run_with_varlen():
    lens_q, lens_k = [5, 37, 1, 20], [9, 30, 17, 20]
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    ins = [torch.randn(sum(n), h, 16, device=DEVICE, requires_grad=True)
           for n, h in ((lens_q, 4), (lens_k, 2), (lens_k, 2))]
    dout = torch.randn(sum(lens_q), 4, 16, device=DEVICE)
    first, second = _grads_twice(
        lambda *t: llmkern.varlen_attention(*t, cu_q, cu_k, 37, 30, causal=True,
                                            backend="triton"), ins, dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_backward_is_bit_identical_run_to_run_dense():
    q, k, v = make_qkv(2, 3, 3, 41, 41, 32, torch.float16)
    dout = torch.randn(2, 3, 41, 32, device=DEVICE, dtype=torch.float16)
    opts = AttentionOptions(32 ** -0.5, deterministic=True)
    assert hopper.bwd_kernel_for(dout, q, k, v, None, opts) == "hopper-ordered"
    first, second = _grads_twice(lambda *t: llmkern.attention(*t, backend="triton",
                                                              deterministic=True), (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---- the 5-GEMM backward: atomic dQ (deterministic=False) --------------------------------

ATOMIC_CASES = ["plain", "causal", "causal-sq<sk-gqa", "causal-sq>sk-empty-rows", "window",
                "window-left-causal", "softcap"]


@pytest.fixture
def seen_options(monkeypatch):
    """The options each 5-GEMM backward launch gets (the real kernel runs)."""
    from llmkern.kernels import attention_hopper_bwd

    seen, real = [], attention_hopper_bwd.hopper_backward

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(attention_hopper_bwd, "hopper_backward", spy)
    return seen


@pytest.mark.parametrize("case", ATOMIC_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(dt)[6:] for dt in DTYPES])
def test_atomic_backward_matches_reference(case, dtype, seen_options):
    b, h, hkv, sq, sk, d, kw = CASES[case]
    q, k, v = make_qkv(b, h, hkv, sq, sk, d, dtype)
    check_against_reference(q, k, v, deterministic=False, **kw)
    assert [o.deterministic for o in seen_options] == [False]


def test_sdpa_passes_deterministic_to_the_backward(seen_options):
    q, k, v = make_qkv(1, 4, 2, 19, 27, 16, DT)
    for det in (False, True):
        out = llmkern.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                   backend="triton", deterministic=det)
        torch.autograd.grad(out.sum(), (q, k, v))
    assert [o.deterministic for o in seen_options] == [False, True]


@pytest.mark.parametrize("deterministic", [True, False], ids=["ordered", "atomic"])
def test_opcheck_with_the_5gemm_backward(deterministic):
    q, k, v = make_qkv(1, 4, 2, 21, 30, 16, DT, requires_grad=False)
    args = (q, k, v, None, 0.25, True, 5, None, 3.0, 0.0, None, False, "triton", deterministic)
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default, args)
    out, lse = torch.ops.llmkern.attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q, k, v, out, lse, torch.randn_like(lse), *args[3:])
    assert hopper.use_hopper_bwd(bwd_args[0], q, k, v, None,
                                 AttentionOptions(0.25, deterministic=deterministic))
    torch.library.opcheck(torch.ops.llmkern.attention_bwd.default, bwd_args)


def test_which_backward_serves_each_gpu_and_flag():
    pick = hopper.backward_kernel
    for choice in ("auto", "hopper", "flash"):
        for ordered_default in (False, True):
            for major in (None, 8, 9, 10):
                for det in (False, True):
                    got = pick(major, det, choice, ordered_default)
                    if choice == "flash" or (choice == "auto" and major != 9):
                        want = "flash"
                    elif not det:
                        want = "hopper-atomic"
                    elif choice == "hopper" or ordered_default:
                        want = "hopper-ordered"
                    else:
                        want = "flash"
                    assert got == want, (choice, ordered_default, major, det)
    assert set(hopper.BWD_KERNELS) == {"flash", "hopper-ordered", "hopper-atomic"}
    # The shipped default: sm_90 keeps the 7-GEMM backward for deterministic calls until a GPU
    # run has validated the ordered kernel.
    assert pick(9, True, "auto") == ("hopper-ordered" if hopper.ORDERED_BWD_DEFAULT else "flash")
    assert pick(9, False, "auto") == "hopper-atomic"


def test_backward_falls_back_where_the_5gemm_kernel_cannot_serve():
    q, k, v = make_qkv(1, 2, 1, 8, 8, 16, torch.float16, requires_grad=False)
    dout = torch.randn(1, 2, 8, 16, dtype=torch.float16, device=DEVICE)
    for det in (True, False):
        opts = AttentionOptions(0.25, deterministic=det)
        assert hopper.bwd_kernel_for(dout, q, k, v, None, opts).startswith("hopper")
        mask = torch.ones(8, 8, dtype=torch.bool, device=DEVICE)
        assert hopper.bwd_kernel_for(dout, q, k, v, mask, opts) == "flash"
        strided = torch.randn(1, 2, 8, 32, dtype=torch.float16, device=DEVICE)[..., ::2]
        assert hopper.bwd_kernel_for(strided, q, k, v, None, opts) == "flash"
    assert hopper.backward_served_by(torch.device("cpu")) == hopper.BWD_KERNELS["hopper-ordered"]


def test_backward_runs_the_hopper_kernel_when_asked(monkeypatch):
    from llmkern.kernels.attention import attention_bwd as flash_bwd
    from llmkern.kernels.attention_hopper_bwd import hopper_backward
    from llmkern.kernels.attention_options import AttentionShape

    q, k, v = make_qkv(1, 4, 2, 33, 47, 32, DT, requires_grad=False)
    opts = AttentionOptions(0.2, causal=True, softcap=3.0)
    out, lse = hopper.hopper_attention_fwd(q, k, v, opts)
    dout = torch.randn_like(out)
    direct = hopper_backward(dout, q, k, v, out, lse, None, AttentionShape.dense(q, k), opts)
    routed = hopper.attention_bwd(dout, q, k, v, out, lse, None, None, opts)
    assert all(torch.equal(a, b) for a, b in zip(direct, routed))
    assert hopper.use_hopper_bwd(dout, q, k, v, None, opts)
    monkeypatch.setenv(hopper.KERNEL_ENV, "auto")  # opt-in: auto keeps the portable backward
    assert not hopper.use_hopper_bwd(dout, q, k, v, None, opts)
    portable = hopper.attention_bwd(dout, q, k, v, out, lse, None, None, opts)
    assert all(torch.equal(a, b) for a, b in
               zip(portable, flash_bwd(dout, q, k, v, out, lse, None, None, opts)))


# ---- which kernel serves ------------------------------------------------------------------

def test_triton_backend_forward_runs_the_hopper_kernel():
    q, k, v = make_qkv(1, 4, 2, 33, 47, 64, DT, requires_grad=False)
    opts = AttentionOptions(1 / math.sqrt(64), causal=True, window_left=20, softcap=3.0)
    direct, direct_lse = hopper.hopper_attention_fwd(q, k, v, opts)
    out, lse = llmkern.attention(q, k, v, causal=True, window=(20, None), softcap=3.0,
                                 backend="triton", return_lse=True)
    assert torch.equal(out, direct) and torch.equal(lse, direct_lse)


def test_which_calls_the_hopper_kernel_serves(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 8, 8, 64, torch.float16, requires_grad=False)
    plain = AttentionOptions(0.125, causal=True, window_left=3, softcap=2.0)
    assert hopper.use_hopper(q, k, v, None, plain)
    mask = torch.ones(8, 8, dtype=torch.bool)
    assert not hopper.use_hopper(q, k, v, mask, plain)
    assert not hopper.use_hopper(q, k, v, None, AttentionOptions(0.125, dropout_p=0.1))
    # Rows that are not 16-byte multiples cannot be TMA tiles: fp16 head_dim 20 (40 bytes).
    q20, k20, v20 = make_qkv(1, 2, 1, 8, 8, 20, torch.float16, requires_grad=False)
    assert "16-byte" in hopper.hopper_reason(q20, k20, v20, None, plain)
    with pytest.raises(ValueError, match=r"q \(1, 2, 8, 20\).*16-byte"):
        hopper.hopper_attention_fwd(q20, k20, v20, plain)
    out = llmkern.attention(q20, k20, v20, causal=True, backend="triton")  # the portable kernel
    assert max_error(out, reference.attention(q20.double(), k20.double(), v20.double(),
                                              causal=True)) < 2e-3
    monkeypatch.setenv(hopper.KERNEL_ENV, "flash")
    assert not hopper.use_hopper(q, k, v, None, plain)
    monkeypatch.setenv(hopper.KERNEL_ENV, "auto")
    assert hopper.use_hopper(q, k, v, None, plain) == (q.is_cuda and
                                                       torch.cuda.get_device_capability()[0] == 9)
    assert hopper.served_by(torch.device("cpu")).startswith("flash")
    monkeypatch.setenv(hopper.KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="LLMKERN_ATTENTION_KERNEL"):
        hopper.kernel_choice()


def test_allocator_is_installed_for_gpu_launches_only(monkeypatch):
    from triton.runtime import _allocation

    monkeypatch.setattr(hopper, "_interpret", lambda: False)

    def fresh(fn):  # the allocator is a context variable: run in a context with none set
        ctx = contextvars.copy_context()
        ctx.run(_allocation._allocator.set, _allocation._NULL_ALLOCATOR)
        return ctx.run(fn)

    assert fresh(lambda: (hopper.ensure_allocator(torch.device("cpu")),
                          _allocation._allocator.get())) == (False, _allocation._NULL_ALLOCATOR)
    assert fresh(lambda: (hopper.ensure_allocator(torch.device("cuda")),
                          _allocation._allocator.get())) == (True, hopper._scratch)

    def own(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    def keeps_own():
        triton_set = _allocation.set_allocator
        triton_set(own)
        hopper.ensure_allocator(torch.device("cuda"))
        return _allocation._allocator.get()

    assert fresh(keeps_own) is own  # a caller's allocator is left alone
    buf = hopper._scratch(4096, 128, None, device=torch.device("cpu"))
    assert buf.dtype == torch.int8 and buf.numel() == 4096


# ---- configs and ahead-of-time compiles ---------------------------------------------------

def test_config_table_is_bounded_and_covers_every_head_dim():
    from llmkern.kernels.attention_common import block_d

    configs = set()
    for d in (16, 40, 64, 80, 96, 128, 160, 192, 256):
        for causal in (False, True):
            for softcap in (False, True):
                for long in (False, True):
                    bm, bn, warps, stages, ws = hopper.hopper_config(block_d(d), causal, softcap,
                                                                     long)
                    assert bn >= 64 and bm >= 64 and warps == 4 and ws
                    configs.add((bm, bn, warps, stages, ws))
    assert len(configs) <= 6
    assert set(hopper.shipped_configs(90)) == configs and hopper.shipped_configs(80) == {}


def test_every_shipped_hopper_backward_config_compiles_for_sm90():
    from llmkern.kernels.attention_hopper_bwd import HOPPER_BWD_BLOCK_DS

    reports = aot_reports("llmkern.kernels.attention_hopper_bwd", archs=(90,))
    assert len(reports) == 2 * len(HOPPER_BWD_BLOCK_DS)  # ordered and atomic dQ
    for kind in ("ordered", "atomic"):
        assert sum(r.name.startswith(f"hopper_bwd-{kind}-") for r in reports) == len(
            HOPPER_BWD_BLOCK_DS)
    problems = [p for r in reports for p in r.problems()]
    assert problems == [], "\n".join(problems)
    for r in reports:
        assert r.uses_tma and (r.uses_wgmma or "-d256-" in r.name), r


def test_every_shipped_hopper_config_compiles_for_sm90():
    reports = aot_reports("llmkern.kernels.attention_hopper", archs=(90,))
    assert len(reports) == len(hopper.shipped_configs(90))
    problems = [p for r in reports for p in r.problems()]
    assert problems == [], "\n".join(problems)
    for r in reports:
        assert r.uses_wgmma and r.uses_tma, r
        assert r.uses_setmaxnreg == r.name.endswith("-ws"), r


# ---- on a GPU -----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["plain", "causal-sq<sk-gqa", "softcap", "window"])
def test_bf16_on_gpu(case):
    b, h, hkv, sq, sk, d, kw = CASES[case]
    q, k, v = make_qkv(b, h, hkv, sq, sk, d, torch.bfloat16)
    check_against_reference(q, k, v, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_tuned_tiles_on_long_sequences(dtype, d):
    # 1500 queries take the long-sequence tiles (128 rows) at d <= 128, with a ragged last block.
    q, k, v = make_qkv(2, 4, 2, 1500, 1500, d, dtype)
    check_against_reference(q, k, v, causal=True, grads=False)


def test_benchmark_rows_name_the_triton_kernels(monkeypatch):
    from llmkern.bench.core import RunConfig
    from llmkern.bench.ops_attention import ATTENTION

    cases = ATTENTION.cases(RunConfig(torch.device("cpu"), quick=True))
    assert cases and all(c.params["triton_fwd_kernel"] == "hopper" for c in cases)
    assert all(c.params["triton_bwd_kernel"] == "hopper-ordered" for c in cases)
    monkeypatch.setenv(hopper.KERNEL_ENV, "auto")
    cases = ATTENTION.cases(RunConfig(torch.device("cpu"), quick=True))
    assert all(c.params["triton_bwd_kernel"] == "flash" for c in cases)


def test_benchmark_providers_pin_the_5gemm_backward(monkeypatch, seen_options):
    from llmkern.bench.core import Case, RunConfig
    from llmkern.bench.ops_attention import ATTENTION

    if HAS_GPU and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the 5-GEMM backward needs an sm_90 GPU")
    monkeypatch.setenv(hopper.KERNEL_ENV, "auto")  # the table picks the 7-GEMM backward here
    cfg = RunConfig(DEVICE, quick=True)
    providers = {p.name: p for p in ATTENTION.providers}
    assert "llmkern-triton" in providers
    q, k, v = make_qkv(1, 2, 2, 40, 40, 32, DT)
    dout = torch.randn_like(q)
    case = Case("tiny", {"B": 1, "H": 2, "S": 40, "D": 32, "causal": True}, DT, None, None)
    want = torch.autograd.grad(llmkern.attention(q, k, v, causal=True, backend="triton"),
                               (q, k, v), dout)
    for name, det in (("llmkern-triton-5gemm", True), ("llmkern-triton-5gemm-atomic", False)):
        fn = providers[name].build(case, cfg)
        got = torch.autograd.grad(fn({"q": q, "k": k, "v": v}), (q, k, v), dout)
        assert seen_options[-1].deterministic == det and seen_options[-1].causal
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=GRAD_ATOL[DT], rtol=GRAD_ATOL[DT])
    assert len(seen_options) == 2


def test_info_and_aot_table_name_the_kernel_and_its_ptx():
    from llmkern.bench.aot import table
    from llmkern.info import report
    from llmkern.testing import AOTReport

    assert "attention forward kernel: hopper" in report(check=False)
    rows = table([AOTReport("hopper_fwd-x-ws", 90, 168, 0, 197112, True, True, True),
                  AOTReport("attn_fwd-y", 80, 200, 8, 1000, False, False, False)])
    assert rows[0].split() == ["config", "arch", "regs", "smem", "spills", "wgmma", "TMA", "WS"]
    assert rows[1].split() == ["hopper_fwd-x-ws", "90", "168", "197112", "0", "yes", "yes", "yes"]
    assert rows[2].split() == ["attn_fwd-y", "80", "200", "1000", "8", "-", "-", "-"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("d", [64, 128])
def test_backward_bit_identical_on_gpu(d):
    # Many key blocks contend for each dQ tile: the ordered accumulation must hold on a GPU.
    q, k, v = make_qkv(2, 8, 2, 1500, 1500, d, torch.bfloat16)
    dout = torch.randn(2, 8, 1500, d, device=DEVICE, dtype=torch.bfloat16)
    first, second = _grads_twice(lambda *t: llmkern.attention(*t, causal=True, backend="triton"),
                                 (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# The ordered backward on a grid of far more programs than SMs (256 key blocks x 32 heads x 8
# sequences at D = 128), in a subprocess, so that a deadlock fails the test instead of hanging
# the run: bit-identical over two runs, and agreeing with the portable 7-GEMM backward (and the
# atomic one with both).
_MANY_PROGRAMS = r"""
import sys
import torch
from llmkern.kernels import attention_hopper as hopper
from llmkern.kernels.attention import attention_bwd as flash_bwd
from llmkern.kernels.attention_hopper_bwd import hopper_backward
from llmkern.kernels.attention_options import AttentionOptions, AttentionShape

causal = sys.argv[1] == "causal"
b, h, s, d = 4, 16, 4096, 128  # thousands of programs: many waves per SM
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
                 for _ in range(4))
opts = AttentionOptions(d ** -0.5, causal=causal)
out, lse = hopper.hopper_attention_fwd(q, k, v, opts)
shape = AttentionShape.dense(q, k)
first = hopper_backward(dout, q, k, v, out, lse, None, shape, opts)
second = hopper_backward(dout, q, k, v, out, lse, None, shape, opts)
torch.cuda.synchronize()
assert all(torch.equal(x, y) for x, y in zip(first, second)), "ordered runs differ"
portable = flash_bwd(dout, q, k, v, out, lse, None, None, opts)
atomic = hopper_backward(dout, q, k, v, out, lse, None, shape,
                         AttentionOptions(d ** -0.5, causal=causal, deterministic=False))
for label, grads in (("ordered", first), ("atomic", atomic)):
    for name, x, y in zip(("dq", "dk", "dv"), grads, portable):
        err = ((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
        assert err < 2e-2, f"{label} {name} vs 7-GEMM: relative error {err:.2e}"
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs an sm_90 GPU")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ordered_backward_on_many_more_programs_than_sms(causal):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run([sys.executable, "-c", _MANY_PROGRAMS,
                               "causal" if causal else "full"], env=env, capture_output=True,
                              text=True, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("the ordered 5-GEMM backward did not finish in 150 s (a deadlock?)")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
