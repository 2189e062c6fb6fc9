"""cross_entropy and linear_cross_entropy: loss and gradients against float64, ignore_index,
all-ignored batches, label smoothing, reductions, chunking, errors, op registration, compile,
and ahead-of-time compiles of every shipped kernel config."""
import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern import reference
from llmkern.testing import aot_reports, assert_close_to_ref
from conftest import DEVICE, DTYPES, HAS_GPU

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _target(shape, vocab, ignore_every=4, ignore_index=-100):
    t = torch.randint(0, vocab, shape, device=DEVICE)
    t.view(-1)[::ignore_every] = ignore_index
    return t


def _grads(fn, tensors, g):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves, g.to(loss.dtype).expand_as(loss))


def check(kernel_fn, ref_fn, tensors, names):
    dtype = tensors[0].dtype
    shape = ref_fn(*[t.double() for t in tensors]).shape
    g = torch.rand(shape, device=DEVICE) + 0.5  # a non-unit upstream gradient
    loss, grads = _grads(kernel_fn, tensors, g)
    loss_t, grads_t = _grads(ref_fn, tensors, g)
    loss_64, grads_64 = _grads(ref_fn, [t.double() for t in tensors], g)
    assert loss.dtype == torch.float32, "the loss is float32"
    assert_close_to_ref(loss, loss_64, loss_t, 1e-5 * max(1.0, loss_64.abs().max().item()), "loss")
    for name, gk, gt, g64 in zip(names, grads, grads_t, grads_64):
        assert gk.dtype == dtype
        assert_close_to_ref(gk, g64, gt, ATOL[dtype] * max(1.0, g64.abs().max().item()), name)


def _ce_ref(reduction, smoothing, ignore_index=-100):
    def fn(logits, target):
        return llmkern.cross_entropy(logits, target, ignore_index, reduction, smoothing, backend="torch")
    return fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.0), ("sum", 0.1), ("none", 0.0)])
def test_cross_entropy(backend, dtype, reduction, smoothing):
    # (2, 9) rows of a 1000-class vocabulary, a quarter of them ignored
    logits = torch.randn(2, 9, 1000, device=DEVICE, dtype=dtype) * 3
    target = _target((2, 9), 1000)
    ref = _ce_ref(reduction, smoothing)
    check(lambda x: llmkern.cross_entropy(x, target, reduction=reduction, label_smoothing=smoothing,
                                          backend=backend),
          lambda x: ref(x, target), [logits], ["dlogits"])


def test_cross_entropy_matches_torch_semantics():
    logits = torch.randn(17, 33, dtype=torch.float64)
    target = _target((17,), 33, ignore_every=5, ignore_index=3)
    for red in ("mean", "sum", "none"):
        ours = llmkern.cross_entropy(logits, target, ignore_index=3, reduction=red, label_smoothing=0.2)
        theirs = F.cross_entropy(logits, target, ignore_index=3, reduction=red, label_smoothing=0.2)
        torch.testing.assert_close(ours, theirs)


def test_cross_entropy_strided_rows_and_ignore_index(backend):
    """Rows of a wider buffer (row stride 1100), int32 targets, a real class as ignore_index."""
    base = torch.randn(18, 1100, device=DEVICE) * 2
    target = _target((18,), 1000, ignore_every=4, ignore_index=3).int()
    check(lambda x: llmkern.cross_entropy(x[:, :1000], target, ignore_index=3, label_smoothing=0.05,
                                          backend=backend),
          lambda x: _ce_ref("mean", 0.05, ignore_index=3)(x[:, :1000], target), [base], ["dlogits"])


@pytest.mark.parametrize("block", [128, 256])
def test_cross_entropy_kernel_row_loop(backend, block):
    """Rows longer than the block (vocab 1000 in blocks that do not divide it), in place."""
    if backend != "triton":
        pytest.skip("Triton kernel launcher")
    from llmkern.kernels.cross_entropy import cross_entropy_bwd, cross_entropy_fwd, cross_entropy_fwd_grad

    x = torch.randn(5, 1000, device=DEVICE) * 4
    t = _target((5,), 1000, ignore_every=3)
    loss, lse = cross_entropy_fwd(x, t, -100, 0.1, block=block)
    ref = F.cross_entropy(x.double(), t, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(x.double(), -1), atol=1e-5, rtol=1e-5)
    dloss = torch.rand(5, device=DEVICE)
    xd = x.double().requires_grad_()
    F.cross_entropy(xd, t, reduction="none", label_smoothing=0.1).backward(dloss.double())
    torch.testing.assert_close(cross_entropy_bwd(dloss, x, t, lse, -100, 0.1, block=block).double(),
                               xd.grad, atol=1e-6, rtol=1e-5)
    y = x.clone()  # fused forward + gradient written over the logits
    loss2, lse2 = torch.empty_like(loss), torch.empty_like(lse)
    cross_entropy_fwd_grad(y, t, -100, 0.1, dloss, y, loss2, lse2, block=block)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(y.double(), xd.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_all_ignored_is_zero_not_nan(backend, fn):
    t = torch.full((7,), -100, device=DEVICE)
    if fn == "cross_entropy":
        inputs = [torch.randn(7, 50, device=DEVICE, requires_grad=True)]
        loss = llmkern.cross_entropy(inputs[0], t, backend=backend)
    else:
        inputs = [torch.randn(7, 16, device=DEVICE, requires_grad=True),
                  torch.randn(50, 16, device=DEVICE, requires_grad=True)]
        loss = llmkern.linear_cross_entropy(*inputs, t, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    for x in inputs:
        assert torch.equal(x.grad, torch.zeros_like(x.grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction,smoothing,chunk", [("mean", 0.0, 16), ("sum", 0.1, 7), ("none", 0.1, None)])
def test_linear_cross_entropy(backend, dtype, reduction, smoothing, chunk):
    # 37 tokens in chunks of 16 / 7 (neither divides 37), vocab 1000, hidden 64
    hidden = torch.randn(37, 64, device=DEVICE, dtype=dtype)
    weight = torch.randn(1000, 64, device=DEVICE, dtype=dtype) * 0.125
    target = _target((37,), 1000, ignore_every=5)

    def ref(h, w):
        return reference.linear_cross_entropy(h, w, target, -100, reduction, smoothing)

    check(lambda h, w: llmkern.linear_cross_entropy(h, w, target, reduction=reduction,
                                                    label_smoothing=smoothing, backend=backend,
                                                    chunk_size=chunk),
          ref, [hidden, weight], ["dhidden", "dweight"])


def test_linear_cross_entropy_3d_and_no_grad(backend):
    hidden = torch.randn(2, 5, 32, device=DEVICE)
    weight = torch.randn(100, 32, device=DEVICE)
    target = _target((2, 5), 100)
    with torch.no_grad():
        loss = llmkern.linear_cross_entropy(hidden, weight, target, reduction="none", backend=backend)
    ref = reference.cross_entropy(hidden.view(10, 32) @ weight.t(), target.view(10), reduction="none")
    assert loss.shape == (2, 5)
    torch.testing.assert_close(loss.view(10), ref, atol=1e-4, rtol=1e-5)
    # the functional API, any backend, a (B, T, V) logits tensor
    logits = torch.randn(2, 5, 100, device=DEVICE)
    torch.testing.assert_close(
        llmkern.cross_entropy(logits, target, backend=backend),
        F.cross_entropy(logits.view(10, 100), target.view(10)), atol=1e-5, rtol=1e-5)


def test_chunk_rows():
    from llmkern.ops.cross_entropy import LOGITS_CHUNK_BYTES, chunk_rows

    assert chunk_rows(37, 1000, 4) == 37  # everything fits: one chunk
    c = chunk_rows(16384, 50304, 2)  # GPT-2 LM head, bf16
    assert c % 64 == 0 and c * 50304 * 2 <= LOGITS_CHUNK_BYTES * 1.05
    assert -(-16384 // c) == -(-16384 * 50304 * 2 // LOGITS_CHUNK_BYTES)  # fewest chunks
    assert chunk_rows(5, 10 ** 9, 4) == 1



@pytest.mark.parametrize("dtype", DTYPES)
def test_dweight_accumulates_in_the_gemm_over_many_small_chunks(backend, dtype):
    """The chunk GEMMs chain dW through one buffer: the first chunk overwrites it (a NaN-poisoned
    buffer is never read), later ones add in the GEMM; one chunk (or fp32) writes dW directly."""
    from llmkern.ops.cross_entropy import LINEAR_CROSS_ENTROPY, DWeightAccumulator

    M, V, C, chunk = 23, 131, 24, 5  # odd sizes, five chunks, a short last one
    weight = torch.randn(V, C, device=DEVICE, dtype=dtype)
    hidden = torch.randn(M, C, device=DEVICE, dtype=dtype)
    dlogits = torch.randn(M, V, device=DEVICE, dtype=dtype) * 0.1
    acc = DWeightAccumulator(weight, M, chunk, LINEAR_CROSS_ENTROPY, backend)
    assert acc.out.dtype == torch.float32
    acc.out.fill_(float("nan"))
    for start in range(0, M, chunk):
        acc.add(dlogits[start:start + chunk], hidden[start:start + chunk])
    dw = acc.result()
    ref64 = dlogits.double().t() @ hidden.double()
    ref_t = (dlogits.float().t() @ hidden.float()).to(dtype)
    assert dw.dtype == dtype
    assert_close_to_ref(dw, ref64, ref_t, ATOL[dtype] * max(1.0, ref64.abs().max().item()), "dweight")

    single = DWeightAccumulator(weight, M, M, LINEAR_CROSS_ENTROPY, backend)
    assert single.out.dtype == dtype  # no fp32 buffer and no cast for one chunk
    single.out.fill_(float("nan"))
    single.add(dlogits, hidden)
    assert_close_to_ref(single.result(), ref64, ref_t, ATOL[dtype] * max(1.0, ref64.abs().max().item()),
                        "dweight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 4])
def test_linear_cross_entropy_many_small_chunks(backend, dtype, chunk):
    """Odd sizes, ignored rows and chunks forced small: the chained dW GEMMs add up exactly."""
    hidden = torch.randn(19, 40, device=DEVICE, dtype=dtype)
    weight = torch.randn(97, 40, device=DEVICE, dtype=dtype) * 0.125
    target = _target((19,), 97, ignore_every=3, ignore_index=7)

    def ref(h, w):
        return reference.linear_cross_entropy(h, w, target, 7, "mean", 0.0)

    check(lambda h, w: llmkern.linear_cross_entropy(h, w, target, ignore_index=7, backend=backend,
                                                    chunk_size=chunk),
          ref, [hidden, weight], ["dhidden", "dweight"])

def test_bad_inputs():
    logits, target = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        llmkern.cross_entropy(logits, target[:3])
    with pytest.raises(TypeError, match="target has unsupported dtype"):
        llmkern.cross_entropy(logits, target.float())
    with pytest.raises(TypeError, match="logits has unsupported dtype"):
        llmkern.cross_entropy(logits.int(), target)
    with pytest.raises(ValueError, match=r"target holds class index 10 outside \[0, 10\)"):
        llmkern.cross_entropy(logits, torch.tensor([0, 10, 1, 2]))
    with pytest.raises(ValueError, match=r"class index -1 outside"):
        llmkern.cross_entropy(logits, torch.tensor([0, -1, 1, 2]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        llmkern.cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        llmkern.cross_entropy(logits, target, label_smoothing=1.5)
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"lm_weight must have shape \(vocab, 8\)"):
        llmkern.linear_cross_entropy(h, torch.randn(10, 7), target)
    with pytest.raises(TypeError, match="lm_weight has dtype torch.float16 but hidden has torch.float32"):
        llmkern.linear_cross_entropy(h, w.half(), target)
    with pytest.raises(ValueError, match=r"target holds class index 12 outside \[0, 10\)"):
        llmkern.linear_cross_entropy(h, w, torch.tensor([0, 12, 1, 2]))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        llmkern.linear_cross_entropy(h, w, target, chunk_size=0)
    with pytest.raises(ValueError, match="hidden is empty"):
        llmkern.linear_cross_entropy(torch.randn(0, 8), w, target[:0])


@pytest.mark.gpu
def test_device_mismatch():
    with pytest.raises(ValueError, match="target is on cpu but logits is on cuda"):
        llmkern.cross_entropy(torch.randn(4, 10, device="cuda"), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="lm_weight is on cpu but hidden is on cuda"):
        llmkern.linear_cross_entropy(torch.randn(4, 8, device="cuda"), torch.randn(10, 8),
                                     torch.zeros(4, dtype=torch.long, device="cuda"))


def test_opcheck(backend):
    logits = torch.randn(6, 100, device=DEVICE, requires_grad=True)
    t = _target((6,), 100, ignore_every=4)
    torch.library.opcheck(torch.ops.llmkern.cross_entropy_fwd.default, (logits, t, -100, 0.1, backend))
    h = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(100, 16, device=DEVICE, requires_grad=True)
    for reduction, with_grad in (("mean", True), ("none", False)):
        torch.library.opcheck(torch.ops.llmkern.linear_cross_entropy_fwd.default,
                              (h, w, t, -100, 0.0, reduction, with_grad, 4, backend))


def test_torch_compile_fullgraph(backend):
    class LMHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = llmkern.nn.MLP(16, backend=backend)
            self.head = torch.nn.Linear(16, 100, bias=False)

        def forward(self, x, target):
            h = self.mlp(x)
            return (llmkern.linear_cross_entropy(h, self.head.weight, target, backend=backend)
                    + llmkern.cross_entropy(self.head(h), target, label_smoothing=0.1, backend=backend))

    model = LMHead().to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
    x = torch.randn(2, 5, 16, device=DEVICE)
    t = _target((2, 5), 100)
    loss = compiled(x, t)
    loss.backward()
    torch.testing.assert_close(loss, model(x, t), atol=1e-5, rtol=1e-5)
    assert model.head.weight.grad is not None


def test_aot_every_cross_entropy_config():
    reports = aot_reports("llmkern.kernels.cross_entropy", dtypes=["bf16", "fp32"])
    assert {r.arch for r in reports} == {80, 90}
    assert [p for r in reports for p in r.problems()] == []


@pytest.mark.gpu
def test_linear_cross_entropy_bf16_large_vocab(backend):
    hidden = torch.randn(1000, 768, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(50304, 768, device=DEVICE, dtype=torch.bfloat16) * 0.02
    target = _target((1000,), 50304, ignore_every=7)
    check(lambda h, w: llmkern.linear_cross_entropy(h, w, target, backend=backend, chunk_size=384),
          lambda h, w: reference.linear_cross_entropy(h, w, target), [hidden, weight],
          ["dhidden", "dweight"])


@pytest.mark.gpu
def test_cross_entropy_bf16_256k_vocab(backend):
    logits = torch.randn(8, 256000, device=DEVICE, dtype=torch.bfloat16) * 2
    target = _target((8,), 256000, ignore_every=3)
    check(lambda x: llmkern.cross_entropy(x, target, label_smoothing=0.1, backend=backend),
          lambda x: reference.cross_entropy(x, target, label_smoothing=0.1), [logits], ["dlogits"])


def test_linear_cross_entropy_under_autocast(backend):
    """fp32 hidden and LM head under autocast run in the autocast dtype, as F.linear would."""
    amp_dtype = torch.bfloat16 if HAS_GPU else torch.float16
    hidden = torch.randn(40, 32, device=DEVICE, requires_grad=True)
    weight = (torch.randn(300, 32, device=DEVICE) * 0.2).requires_grad_()
    target = torch.randint(0, 300, (40,), device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=amp_dtype):
        loss = llmkern.linear_cross_entropy(hidden, weight, target, backend=backend)
        expected = F.cross_entropy(F.linear(hidden, weight).float(), target)
    assert loss.dtype == torch.float32
    ref64 = reference.linear_cross_entropy(hidden.double(), weight.double(), target)
    assert_close_to_ref(loss, ref64, expected, ATOL[amp_dtype], "autocast loss")
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


@pytest.mark.skipif(not llmkern.backends.triton_interpret(), reason="the Triton CPU interpreter only")
def test_triton_refuses_bf16_linear_cross_entropy_under_the_interpreter():
    h, w = torch.randn(6, 16, dtype=torch.bfloat16), torch.randn(40, 16, dtype=torch.bfloat16)
    target = torch.randint(0, 40, (6,))
    with pytest.raises(RuntimeError, match="bf16 matmuls are wrong in the Triton CPU interpreter"):
        llmkern.linear_cross_entropy(h, w, target, backend="triton")
    # cross_entropy has no matmul: its bf16 kernel is right under the interpreter too
    logits = torch.randn(6, 40, dtype=torch.bfloat16)
    loss = llmkern.cross_entropy(logits, target, backend="triton")
    assert abs(loss.item() - reference.cross_entropy(logits.double(), target).item()) < 1e-2


def test_integer_arguments_reject_floats():
    logits, target = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="llmkern.cross_entropy: ignore_index must be an int, got 1.5"):
        llmkern.cross_entropy(logits, target, ignore_index=1.5)
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(TypeError, match="linear_cross_entropy: chunk_size must be an int, got 1.5"):
        llmkern.linear_cross_entropy(h, w, target, chunk_size=1.5)
    with pytest.raises(TypeError, match="linear_cross_entropy: ignore_index must be an int, got 2.0"):
        llmkern.linear_cross_entropy(h, w, target, ignore_index=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 17, 127, 1500, 10007, 20011])
def test_cross_entropy_odd_vocab_sizes(backend, dtype, vocab):
    """Whole rows in registers (up to 16384 classes, 8192 in fp32) and the block walk beyond, against
    float64, with label smoothing and ignored rows."""
    if vocab > 16384 and dtype != torch.float32 and not HAS_GPU:
        pytest.skip("long rows are checked in fp32 on the interpreter (time)")
    logits = torch.randn(7, vocab, device=DEVICE, dtype=dtype) * 3
    target = _target((7,), vocab, ignore_every=3)
    check(lambda x: llmkern.cross_entropy(x, target, reduction="sum", label_smoothing=0.1,
                                          backend=backend),
          lambda x: _ce_ref("sum", 0.1)(x, target), [logits], ["dlogits"])


@pytest.mark.parametrize("vocab", [50, 1000, 5003])
def test_cross_entropy_fused_gradient_from_registers_in_place(backend, vocab):
    """The forward+gradient launch on whole rows writes the gradient over the logits from the
    values it holds (no second read), matching the backward-only launch."""
    if backend != "triton":
        pytest.skip("Triton kernel launcher")
    from llmkern.kernels.cross_entropy import cross_entropy_bwd, cross_entropy_fwd, cross_entropy_fwd_grad

    x = torch.randn(6, vocab, device=DEVICE) * 4
    t = _target((6,), vocab, ignore_every=4)
    loss, lse = cross_entropy_fwd(x, t, -100, 0.05)
    dloss = torch.rand(6, device=DEVICE)
    xd = x.double().requires_grad_()
    ref = F.cross_entropy(xd, t, reduction="none", label_smoothing=0.05)
    ref.backward(dloss.double())
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    y = x.clone()
    loss2, lse2 = torch.empty_like(loss), torch.empty_like(lse)
    cross_entropy_fwd_grad(y, t, -100, 0.05, dloss, y, loss2, lse2)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(lse2, lse)
    torch.testing.assert_close(y.double(), xd.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cross_entropy_bwd(dloss, x, t, lse, -100, 0.05), y,
                               atol=1e-6, rtol=1e-5)


def test_cross_entropy_moves_logits_in_16_byte_vectors():
    """bf16 rows (a vocabulary padded to a multiple of 16): the logits are read and the
    gradient written in 16-byte vectors, in registers or walked in blocks."""
    from test_layer_norm import ptx_vector_counts

    names = [f"cross_entropy-fwd_grad-bf16-{b}" for b in ("1024", "16384", "4096-loop")]
    for name, c in ptx_vector_counts("llmkern.kernels.cross_entropy", names).items():
        assert c["ld16"] > 0 and c["st16"] > 0, (name, c)
