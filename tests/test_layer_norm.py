"""LayerNorm and RMSNorm: forward and every gradient against float64, errors, op registration."""
import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.testing import assert_close_to_ref
from conftest import DEVICE, DTYPES, HAS_GPU

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (rows, N): 1, primes, 1500, 4096, and a row longer than one block (the looped path).
SHAPES = [(1, 1), (3, 17), (17, 127), (5, 1500), (2, 4096)]
LONG = (3, 20000)


def _inputs(rows, n, dtype, affine=True, bias=True, strided=False):
    if strided:  # rows of a wider buffer: last dim contiguous, row stride n + 7
        x = torch.randn(rows, n + 7, device=DEVICE, dtype=dtype)[:, :n]
    else:
        x = torch.randn(rows, n, device=DEVICE, dtype=dtype)
    w = (1 + 0.5 * torch.randn(n, device=DEVICE, dtype=dtype)) if affine else None
    b = (0.5 * torch.randn(n, device=DEVICE, dtype=dtype)) if affine and bias else None
    return x, w, b


def _grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    return out.detach(), torch.autograd.grad(out, wanted, dy.to(out.dtype))


def check_norm(kernel_fn, ref_fn, tensors):
    """Forward and all gradients of kernel_fn vs float64 ref_fn, with the tolerance rule."""
    dtype = tensors[0].dtype
    dy = torch.randn(tensors[0].shape, device=DEVICE, dtype=dtype)
    out, grads = _grads(kernel_fn, tensors, dy)
    out_t, grads_t = _grads(ref_fn, tensors, dy)
    out_64, grads_64 = _grads(ref_fn, [t.double() if t is not None else None for t in tensors], dy)
    scale = lambda r: max(1.0, r.abs().max().item())  # noqa: E731  (gradients of weights grow with rows)
    assert_close_to_ref(out, out_64, out_t, ATOL[dtype] * scale(out_64), "y")
    names = [n for n, t in zip(("dx", "dweight", "dbias"), tensors) if t is not None]
    for name, g, g_t, g_64 in zip(names, grads, grads_t, grads_64):
        assert g.dtype == g_t.dtype, f"{name} dtype {g.dtype} != {g_t.dtype}"
        assert_close_to_ref(g, g_64, g_t, ATOL[dtype] * scale(g_64), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SHAPES)
def test_layer_norm(backend, dtype, rows, n):
    x, w, b = _inputs(rows, n, dtype)
    check_norm(lambda x, w, b: llmkern.layer_norm(x, w, b, eps=1e-5, backend=backend),
               lambda x, w, b: reference.layer_norm(x, w, b, eps=1e-5), [x, w, b])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SHAPES)
def test_rms_norm(backend, dtype, rows, n):
    x, w, _ = _inputs(rows, n, dtype)
    check_norm(lambda x, w: llmkern.rms_norm(x, w, eps=1e-6, backend=backend),
               lambda x, w: reference.rms_norm(x, w, eps=1e-6), [x, w])


def check_plain(rms, backend, x, w, b):
    """rms_norm(x, w) or layer_norm(x, w, b) and their gradients against float64."""
    if rms:
        check_norm(lambda x, w: llmkern.rms_norm(x, w, backend=backend), reference.rms_norm, [x, w])
    else:
        check_norm(lambda x, w, b: llmkern.layer_norm(x, w, b, backend=backend),
                   reference.layer_norm, [x, w, b])


@pytest.mark.parametrize("rms", [False, True])
def test_long_rows_use_the_looped_path(backend, rms):
    x, w, b = _inputs(*LONG, torch.float32)
    check_plain(rms, backend, x, w, b)


@pytest.mark.parametrize("affine,bias", [(False, False), (True, False)])
def test_layer_norm_optional_weight_and_bias(backend, affine, bias):
    x, w, b = _inputs(7, 300, torch.float32, affine, bias)
    check_norm(lambda x, *p: llmkern.layer_norm(x, *(p + (None,) * (2 - len(p))), backend=backend),
               lambda x, *p: reference.layer_norm(x, *(p + (None,) * (2 - len(p)))),
               [x] + [t for t in (w, b) if t is not None])


def test_rms_norm_without_weight(backend):
    x, _, _ = _inputs(5, 257, torch.float16, affine=False)
    check_norm(lambda x: llmkern.rms_norm(x, None, backend=backend),
               lambda x: reference.rms_norm(x, None), [x])


@pytest.mark.parametrize("rms", [False, True])
def test_strided_and_non_collapsible_views(backend, rms):
    x, w, b = _inputs(6, 96, torch.float16, strided=True)
    x3 = torch.randn(4, 6, 96, device=DEVICE, dtype=torch.float16)[:, ::2]  # (4, 3, 96), not viewable as rows
    for inp in (x, x3):
        if rms:
            check_norm(lambda x, w: llmkern.rms_norm(x, w, backend=backend), reference.rms_norm, [inp, w])
        else:
            check_norm(lambda x, w, b: llmkern.layer_norm(x, w, b, backend=backend),
                       reference.layer_norm, [inp, w, b])


def test_fp32_weights_with_half_input(backend):
    """Mixed precision (fp16 activations, fp32 parameters) keeps parameter gradients in fp32."""
    x = torch.randn(9, 130, device=DEVICE, dtype=torch.float16, requires_grad=True)
    w = torch.randn(130, device=DEVICE, requires_grad=True)
    b = torch.randn(130, device=DEVICE, requires_grad=True)
    y = llmkern.layer_norm(x, w, b, backend=backend)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    ref = reference.layer_norm(x.detach().double(), w.detach().double(), b.detach().double())
    assert (y.double() - ref).abs().max().item() < 5e-3


def test_weight_gradients_are_deterministic(backend):
    x, w, b = _inputs(300, 200, torch.float32)
    dy = torch.randn_like(x)
    runs = [_grads(lambda x, w, b: llmkern.layer_norm(x, w, b, backend=backend), [x, w, b], dy)[1]
            for _ in range(2)]
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


def test_kernel_writes_every_output(backend):
    """The output buffer is fresh each call; NaN anywhere would mean an element was skipped."""
    x, w, b = _inputs(33, 1000, torch.float32)
    assert torch.isfinite(llmkern.layer_norm(x, w, b, backend=backend)).all()
    assert torch.isfinite(llmkern.rms_norm(x, w, backend=backend)).all()


def test_modules_match_torch_nn(backend):
    torch_ln = torch.nn.LayerNorm(48, eps=1e-5).to(DEVICE)
    torch_rms = torch.nn.RMSNorm(48, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        torch_ln.weight.normal_(), torch_ln.bias.normal_(), torch_rms.weight.normal_()
    ln = llmkern.nn.LayerNorm(48, eps=1e-5, backend=backend).to(DEVICE)
    rms = llmkern.nn.RMSNorm(48, eps=1e-6, backend=backend).to(DEVICE)
    ln.load_state_dict(torch_ln.state_dict())
    rms.load_state_dict(torch_rms.state_dict())
    assert ln.state_dict().keys() == torch_ln.state_dict().keys()
    x = torch.randn(3, 5, 48, device=DEVICE)
    torch.testing.assert_close(ln(x), torch_ln(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rms(x), torch_rms(x), atol=1e-5, rtol=1e-5)
    no_bias = llmkern.nn.LayerNorm(48, bias=False)
    assert no_bias.bias is None and set(no_bias.state_dict()) == {"weight"}


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        llmkern.layer_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="bias must have shape"):
        llmkern.layer_norm(x, torch.ones(8), torch.ones(9))
    with pytest.raises(TypeError, match="x has unsupported dtype"):
        llmkern.layer_norm(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="x is empty"):
        llmkern.rms_norm(torch.randn(0, 8))
    with pytest.raises(ValueError, match="eps must be > 0"):
        llmkern.rms_norm(x, eps=0.0)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        llmkern.rms_norm(x, [1.0] * 8)
    with pytest.raises(ValueError, match="weight must have 1 dimensions"):
        llmkern.rms_norm(x, torch.ones(1, 8))
    with pytest.raises(ValueError, match="backend must be one of"):
        llmkern.layer_norm(x, backend="fastest")


def test_cuda_backend_by_name_on_cpu_tensors_raises():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve this call"):
        llmkern.layer_norm(torch.randn(2, 8), backend="cuda")


@pytest.mark.gpu
def test_mismatched_devices_raise():
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        llmkern.layer_norm(torch.randn(2, 8, device="cuda"), torch.ones(8))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_opcheck(backend, op):
    x = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    w = torch.randn(33, device=DEVICE, requires_grad=True)
    b = torch.randn(33, device=DEVICE, requires_grad=True)
    if op == "layer_norm":
        torch.library.opcheck(torch.ops.llmkern.layer_norm_fwd.default, (x, w, b, 1e-5, backend))
        torch.library.opcheck(torch.ops.llmkern.layer_norm_fwd.default, (x, None, None, 1e-5, backend))
    else:
        torch.library.opcheck(torch.ops.llmkern.rms_norm_fwd.default, (x, w, 1e-6, backend))
        torch.library.opcheck(torch.ops.llmkern.rms_norm_fwd.default, (x, None, 1e-6, backend))


def test_torch_compile_fullgraph(backend):
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), llmkern.nn.LayerNorm(32, backend=backend),
                                torch.nn.Linear(32, 32), llmkern.nn.RMSNorm(32, backend=backend)).to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
    x = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


def test_every_shipped_config_compiles_for_sm80_and_sm90():
    from llmkern.testing import aot_reports

    reports = aot_reports("llmkern.kernels.layer_norm")
    assert {r.arch for r in reports} == {80, 90}
    assert [p for r in reports for p in r.problems()] == []


@pytest.mark.parametrize("which", ["torch", "kernel"])
@pytest.mark.parametrize("x_dtype, p_dtype", [(torch.float32, torch.float16),
                                              (torch.float16, torch.float32)])
def test_parameters_of_another_dtype_give_x_dtype_on_every_backend(which, x_dtype, p_dtype,
                                                                   backend):
    name = "torch" if which == "torch" else backend
    x, w, b = _inputs(6, 40, x_dtype)
    w, b = w.to(p_dtype), b.to(p_dtype)
    for op, args, ref in (
            (llmkern.layer_norm, (x, w, b), lambda: reference.layer_norm(x.double(), w.double(),
                                                                         b.double())),
            (llmkern.rms_norm, (x, w), lambda: reference.rms_norm(x.double(), w.double()))):
        leaves = [t.clone().requires_grad_() for t in args]
        y = op(*leaves, backend=name)
        assert y.dtype == x_dtype
        assert (y.double() - ref()).abs().max() < ATOL[x_dtype] * 10
        grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
        assert [g.dtype for g in grads] == [t.dtype for t in args]


def test_zero_dim_x_is_a_clear_error():
    for op in (llmkern.layer_norm, llmkern.rms_norm):
        with pytest.raises(ValueError, match="x must have at least 1 dimension .* got a 0-d tensor"):
            op(torch.tensor(1.0))


def test_float64_is_served_by_the_torch_reference(backend):
    x, w, b = _inputs(3, 16, torch.float64)
    torch.testing.assert_close(llmkern.layer_norm(x, w, b), torch.nn.functional.layer_norm(x, (16,), w, b))
    torch.testing.assert_close(llmkern.rms_norm(x, w), torch.nn.functional.rms_norm(x, (16,), w, 1e-6))
    with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot serve this call: x has "
                                           f"dtype float64"):
        llmkern.layer_norm(x, w, b, backend=backend)


def test_bf16_kernels_are_right_under_the_interpreter_too(backend):
    # no tl.dot in the norm kernels, so the interpreter computes bf16 correctly
    x, w, b = _inputs(5, 67, torch.bfloat16)
    y = llmkern.layer_norm(x, w, b, backend=backend)
    ref = reference.layer_norm(x.double(), w.double(), b.double())
    assert (y.double() - ref).abs().max() < 0.1


# ---- residual add fused into the norm ------------------------------------------------------

def _fused(rms, backend):
    if rms:
        return (lambda x, r, w, b: llmkern.rms_norm(x, w, eps=1e-6, residual=r, backend=backend),
                lambda x, r, w, b: reference.rms_norm(x, w, eps=1e-6, residual=r))
    return (lambda x, r, w, b: llmkern.layer_norm(x, w, b, eps=1e-5, residual=r, backend=backend),
            lambda x, r, w, b: reference.layer_norm(x, w, b, eps=1e-5, residual=r))


def check_fused_residual(rms, backend, x, r, w, b):
    """y and h = x + r, and the gradients of x, r, weight and bias (from dy and dh together)
    against float64, with the tolerance rule."""
    fn, ref = _fused(rms, backend)
    dy, dh = torch.randn_like(x), torch.randn_like(x)

    def run(f, tensors):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
        y, h = f(*leaves)
        wanted = [t for t in leaves if t is not None]
        return (y.detach(), h.detach()), torch.autograd.grad((y, h), wanted, (dy.to(y.dtype), dh.to(h.dtype)))

    tensors = [x, r, w, None if rms else b]
    (y, h), grads = run(fn, tensors)
    (y_t, h_t), grads_t = run(ref, tensors)
    (y64, h64), grads64 = run(ref, [t.double() if t is not None else None for t in tensors])
    atol = ATOL[x.dtype]
    scale = lambda t: max(1.0, t.abs().max().item())  # noqa: E731
    assert y.dtype == h.dtype == x.dtype and h.shape == x.shape
    assert_close_to_ref(y, y64, y_t, atol * scale(y64), "y")
    assert_close_to_ref(h, h64, h_t, atol * scale(h64), "h")
    names = [n for n, t in zip(("dx", "dresidual", "dweight", "dbias"), tensors) if t is not None]
    for name, g, g_t, g64 in zip(names, grads, grads_t, grads64):
        assert g.dtype == g_t.dtype, f"{name} dtype {g.dtype} != {g_t.dtype}"
        assert_close_to_ref(g, g64, g_t, atol * scale(g64), name)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 17), (17, 127), (5, 1500), (2, 4096)])
def test_fused_residual_norm(backend, rms, dtype, rows, n):
    x, w, b = _inputs(rows, n, dtype)
    check_fused_residual(rms, backend, x, torch.randn_like(x), w, b)


@pytest.mark.parametrize("rms", [False, True])
def test_fused_residual_norm_strided_and_long_rows(backend, rms):
    x, w, b = _inputs(6, 96, torch.float16, strided=True)
    r = torch.randn(6, 2 * 96, device=DEVICE, dtype=torch.float16)[:, ::2]  # last dim strided too
    check_fused_residual(rms, backend, x, r, w, b)
    x, w, b = _inputs(*LONG, torch.float32)
    check_fused_residual(rms, backend, x, torch.randn_like(x), w, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rms", [False, True])
def test_wide_rows(backend, dtype, rms):
    """10000 columns: the one-pass backward with its weight/bias sums in memory in fp16, the
    two-kernel path in fp32 (over 8192); with and without the residual."""
    x, w, b = _inputs(5, 10000, dtype)
    check_fused_residual(rms, backend, x, torch.randn_like(x), w, b)
    check_plain(rms, backend, x, w, b)


def test_fused_residual_without_affine_parameters(backend):
    x, _, _ = _inputs(7, 300, torch.float32, affine=False)
    check_fused_residual(False, backend, x, torch.randn_like(x), None, None)
    check_fused_residual(True, backend, x, torch.randn_like(x), None, None)


def test_fused_residual_modules(backend):
    ln = llmkern.nn.LayerNorm(40, backend=backend).to(DEVICE)
    rms = llmkern.nn.RMSNorm(40, eps=1e-6, backend=backend).to(DEVICE)
    x, r = torch.randn(2, 3, 40, device=DEVICE), torch.randn(2, 3, 40, device=DEVICE)
    for mod in (ln, rms):
        y, h = mod(x, residual=r)
        torch.testing.assert_close(h, x + r)
        torch.testing.assert_close(y, mod(x + r), atol=1e-5, rtol=1e-5)


def test_fused_residual_bad_inputs_and_cuda_declaration():
    from llmkern.ops.norm import LAYER_NORM

    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"residual must have the shape and dtype of x \(\(4, 8\)"):
        llmkern.layer_norm(x, residual=torch.randn(4, 9))
    with pytest.raises(ValueError, match="residual must have the shape and dtype"):
        llmkern.rms_norm(x, residual=torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        llmkern.rms_norm(x, residual=1.0)
    assert "no fused residual" in LAYER_NORM.reason("cuda", x=x, residual=x)
    assert LAYER_NORM.reason("cuda", x=x) is None


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_opcheck_with_residual(backend, op):
    x = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    r = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    w = torch.randn(33, device=DEVICE, requires_grad=True)
    b = torch.randn(33, device=DEVICE, requires_grad=True)
    if op == "layer_norm":
        torch.library.opcheck(torch.ops.llmkern.layer_norm_fwd.default, (x, w, b, 1e-5, backend, r))
    else:
        torch.library.opcheck(torch.ops.llmkern.rms_norm_fwd.default, (x, w, 1e-6, backend, r))


def test_torch_compile_fullgraph_with_residual(backend):
    ln = llmkern.nn.LayerNorm(32, backend=backend).to(DEVICE)
    rms = llmkern.nn.RMSNorm(32, backend=backend).to(DEVICE)

    def block(x, r):
        y, h = ln(x, residual=r)
        z, h = rms(y, residual=h)
        return z * h

    compiled = torch.compile(block, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
    x = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    out = compiled(x, r)
    gx, gr = torch.autograd.grad(out.sum(), (x, r))
    ex, er = torch.autograd.grad(block(x, r).sum(), (x, r))
    torch.testing.assert_close(out, block(x, r), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, ex, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gr, er, atol=1e-5, rtol=1e-5)


def test_gpt_block_fuses_the_attention_residual_into_ln_2(backend):
    """Each block calls the norm with a residual once (x + attn and ln_2 in one kernel) and
    still computes x + attn(ln_1(x)) followed by x + mlp(ln_2(x))."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from llmkern.model import GPT, GPTConfig

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fused = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.llmkern.layer_norm_fwd.default:
                self.fused += (args[5] if len(args) > 5 else kwargs.get("residual")) is not None
            return func(*args, **kwargs)

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50,
                          backend=backend)).to(DEVICE).eval()
    block = model.transformer.h[0]
    x = torch.randn(2, 5, 32, device=DEVICE)
    with Calls() as calls, torch.no_grad():
        out = block(x)
    assert calls.fused == 1
    with torch.no_grad():
        mid = x + block.attn(block.ln_1(x))
        ref = mid + block.mlp(block.ln_2(mid))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- what the ahead-of-time compile emits ---------------------------------------------------

_PTX_SCRIPT = """
import importlib, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmkern.testing import triton_signature
module, arch, names = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
out = {}
for cfg in importlib.import_module(module).aot_configs():
    if cfg.name not in names:
        continue
    params = [p.name for p in cfg.kernel.params]
    # the divisibility the JIT sees at a launch on 16-byte aligned rows (as aot_compile gives)
    attrs = {(params.index(k),): [["tt.divisibility", 16]] for k, t in cfg.types.items()
             if t.startswith("*") or t == "i32"}
    src = ASTSource(cfg.kernel, triton_signature(cfg.kernel, **cfg.types), cfg.constexprs, attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}).asm["ptx"]
    out[cfg.name] = {k: len(re.findall(p, ptx)) for k, p in (
        ("ld16", r"ld\\.global[.\\w]*\\.(?:v4\\.b32|v2\\.b64)"),
        ("st16", r"st\\.global[.\\w]*\\.(?:v4\\.b32|v2\\.b64)"),
        ("ld_narrow", r"ld\\.global[.\\w]*\\.(?:b16|v2\\.b16)\\b"))}
print(json.dumps(out))
"""


def ptx_vector_counts(module: str, names, arch: int = 90) -> dict:
    """{config name: counts of 16-byte global loads/stores and 2-byte loads in its PTX}."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, module, str(arch), ",".join(names)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(counts) == sorted(names), f"configs not found: {set(names) - set(counts)}"
    return counts


def test_norm_kernels_move_rows_in_16_byte_vectors():
    """bf16 rows of 1024 and 4096 (a multiple of 16 wide): every global access of x, dy, h, y
    and dx is a 16-byte vector, none a 2-byte scalar."""
    names = [f"norm_{d}-{n}-bf16-{t}" for d in ("fwd", "bwd") for n in ("ln-res", "rms")
             for t in ("4x1024", "1x4096")]
    for name, c in ptx_vector_counts("llmkern.kernels.layer_norm", names).items():
        assert c["ld16"] > 0 and c["st16"] > 0 and c["ld_narrow"] == 0, (name, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,n,strided", [(203, 67, False), (203, 33, True), (9, 9000, False)])
@pytest.mark.parametrize("rms", [False, True])
def test_backward_row_loops_with_the_next_group_prefetched(backend, dtype, rows, n, strided, rms):
    """Programs that walk several row groups (and a partial last group), with the next group's
    loads issued while the current one is reduced; 9000 columns take the paths without (the
    two-kernel path in fp32, sums in memory in fp16)."""
    x, w, b = _inputs(rows, n, dtype, strided=strided)
    check_fused_residual(rms, backend, x, torch.randn_like(x), w, b)
    check_plain(rms, backend, x, w, b)
