"""Hugging Face transformers integration: attn_implementation="llmkern" and patch(model).

Tiny random-initialised models (2 layers, hidden 32-64, <= 16 tokens) in fp32, compared with
transformers' own "sdpa" (or "eager" where sdpa is not supported) on the same weights.
"""
import importlib.util
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkern  # noqa: E402
import llmkern.integrations.transformers as lkt  # noqa: E402
from conftest import DEVICE, DTYPES, KERNEL_BACKENDS  # noqa: E402
from llmkern.testing import assert_close_to_ref  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          MistralConfig, MistralForCausalLM)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

TRITON_ATTENTION = importlib.util.find_spec("llmkern.kernels.attention") is not None
VOCAB = 97
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(params=["torch"] + [b for b in KERNEL_BACKENDS if b == "triton"])
def attn_backend(request):
    """Backend serving the attention calls: the torch reference and the Triton kernel."""
    if request.param == "triton" and not TRITON_ATTENTION:
        pytest.skip("kernels/attention.py (the Triton attention kernel) is not there yet")
    with llmkern.use_backend(request.param):
        yield request.param


def gpt2(**kw):
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0,
                     eos_token_id=1, pad_token_id=1, **kw)
    return GPT2LMHeadModel(cfg).to(DEVICE).eval()


def llama(cls=LlamaForCausalLM, config=LlamaConfig, **kw):
    """GQA: 4 query heads over 2 key/value heads, head_dim 16."""
    cfg = config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1, **kw)
    return cls(cfg).to(DEVICE).eval()


def logits(model, impl, ids, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kw).logits


def ids_(batch, seq):
    return torch.randint(2, VOCAB, (batch, seq), device=DEVICE)


def left_padded(batch=2, seq=9, pad=3):
    ids = ids_(batch, seq)
    mask = torch.ones(batch, seq, dtype=torch.long, device=DEVICE)
    mask[0, :pad] = 0
    ids[0, :pad] = 1
    return ids, mask


@pytest.fixture(autouse=True)
def _restore_rotary():
    """patch() replaces apply_rotary_pos_emb module-wide: give it back after each test."""
    yield
    from llmkern.integrations import hf_llama

    hf_llama.restore_rotary()


# ---- registration ------------------------------------------------------------------------

def test_lazy_attribute_after_plain_import():
    """`import llmkern` leaves transformers alone; `llmkern.integrations.transformers` loads it."""
    code = ("import sys, llmkern\n"
            "assert 'transformers' not in sys.modules, 'imported by llmkern'\n"
            "assert llmkern.integrations.transformers.register() == 'llmkern'\n"
            "assert llmkern.integrations.transformers.is_registered()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        llmkern.integrations.nothing  # noqa: B018


def test_register_idempotent():
    assert lkt.is_registered()  # importing the module registered it
    fn, mask_fn = ALL_ATTENTION_FUNCTIONS["llmkern"], ALL_MASK_ATTENTION_FUNCTIONS["llmkern"]
    for _ in range(2):
        assert lkt.register() == "llmkern"
    assert ALL_ATTENTION_FUNCTIONS["llmkern"] is fn is lkt.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["llmkern"] is mask_fn
    assert list(ALL_ATTENTION_FUNCTIONS.valid_keys()).count("llmkern") == 1


def test_config_and_from_pretrained(tmp_path):
    model = gpt2()
    ids = ids_(2, 7)
    ref = logits(model, "sdpa", ids)
    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="llmkern").to(DEVICE).eval()
    assert loaded.config._attn_implementation == "llmkern"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, **TOL)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, attn_implementation="llmkern")
    assert GPT2LMHeadModel(cfg).config._attn_implementation == "llmkern"


# ---- models: logits and greedy generation match sdpa ---------------------------------------

def test_gpt2_logits_and_generate(attn_backend):
    # scale_attn_by_inverse_layer_idx: a per-layer `scaling` that must be folded in, not 1/sqrt(D).
    model = gpt2(scale_attn_by_inverse_layer_idx=True)
    ids = ids_(2, 11)
    torch.testing.assert_close(logits(model, "llmkern", ids), logits(model, "sdpa", ids), **TOL)
    gen = {}
    for impl in ("sdpa", "llmkern"):
        model.set_attn_implementation(impl)
        gen[impl] = model.generate(ids[:, :5], max_new_tokens=3, do_sample=False)
    assert torch.equal(gen["llmkern"], gen["sdpa"])


def test_llama_gqa_logits_and_generate(attn_backend):
    model = llama()
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    ids = ids_(2, 13)
    torch.testing.assert_close(logits(model, "llmkern", ids), logits(model, "sdpa", ids), **TOL)
    gen = {}
    for impl in ("sdpa", "llmkern"):
        model.set_attn_implementation(impl)
        gen[impl] = model.generate(ids[:, :6], max_new_tokens=3, do_sample=False)
    assert torch.equal(gen["llmkern"], gen["sdpa"])


def test_left_padding_matches_sdpa(attn_backend):
    model = llama()
    ids, mask = left_padded()
    out, ref = (logits(model, impl, ids, attention_mask=mask) for impl in ("llmkern", "sdpa"))
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], **TOL)
    gen = {}
    for impl in ("sdpa", "llmkern"):
        model.set_attn_implementation(impl)
        gen[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert torch.equal(gen["llmkern"], gen["sdpa"])


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
def test_half_precision_tolerance_rule(attn_backend, dtype):
    """fp16 (bf16 on GPU) left-padded GQA logits: err(llmkern, float64) <= 2 * err(sdpa, float64) + atol."""
    model = llama().double()
    ids, mask = left_padded()
    valid = mask.bool()
    ref64 = logits(model, "sdpa", ids, attention_mask=mask)[valid]
    model.to(dtype)
    torch_out = logits(model, "sdpa", ids, attention_mask=mask)[valid]
    out = logits(model, "llmkern", ids, attention_mask=mask)[valid]
    assert out.dtype == dtype
    assert_close_to_ref(out, ref64, torch_out, 2e-3 * max(1.0, ref64.abs().max().item()), "logits")


def test_static_cache_generate():
    """A static cache gives keys past the queries at prefill (no mask): cut as sdpa does."""
    model = llama()
    ids = ids_(1, 5)
    gen = {}
    for impl in ("sdpa", "llmkern"):
        model.set_attn_implementation(impl)
        gen[impl] = model.generate(ids, max_new_tokens=4, do_sample=False,
                                   cache_implementation="static")
    assert torch.equal(gen["llmkern"], gen["sdpa"])


def test_sliding_window_mistral(attn_backend):
    model = llama(MistralForCausalLM, MistralConfig, sliding_window=4)
    ids = ids_(2, 12)
    ref = logits(model, "eager", ids)
    torch.testing.assert_close(logits(model, "llmkern", ids), ref, **TOL)
    torch.testing.assert_close(logits(model, "sdpa", ids), ref, **TOL)
    # Decoding past the window: the cache outgrows sliding_window (4) from the 3-token prompt.
    gen = {}
    for impl in ("sdpa", "llmkern"):
        model.set_attn_implementation(impl)
        gen[impl] = model.generate(ids[:, :3], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen["llmkern"], gen["sdpa"])


@pytest.mark.parametrize("sliding_window", [1, 3, 5])
def test_sliding_window_convention(sliding_window):
    """transformers' sliding_window (eager mask) as llmkern window=(sliding_window - 1, 0):
    the no-mask path (where the window goes to the kernel) against eager with the HF mask."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function
    from transformers.models.mistral.modeling_mistral import eager_attention_forward

    module = llama(MistralForCausalLM, MistralConfig).model.layers[0].self_attn
    q, k, v = (torch.randn(2, h, 9, 16, device=DEVICE) for h in (4, 2, 2))
    mask = sdpa_mask(batch_size=2, q_length=9, kv_length=9, allow_is_causal_skip=False,
                     mask_function=sliding_window_causal_mask_function(sliding_window), device=DEVICE)
    additive = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, torch.finfo(torch.float32).min)
    ref, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.25)
    out, weights = lkt.attention_forward(module, q, k, v, None, scaling=0.25,
                                         sliding_window=sliding_window)
    assert weights is None and out.shape == (2, 9, 4, 16) and out.is_contiguous()
    torch.testing.assert_close(out, ref, **TOL)
    # The same window through the mask path gives the same result.
    out_mask, _ = lkt.attention_forward(module, q, k, v, mask, scaling=0.25,
                                        sliding_window=sliding_window)
    torch.testing.assert_close(out_mask, ref, **TOL)
    # Bidirectional (is_causal=False): transformers keeps |q - kv| <= sliding_window.
    from transformers.masking_utils import sliding_window_bidirectional_mask_function

    mask = sdpa_mask(batch_size=2, q_length=9, kv_length=9, allow_is_causal_skip=False,
                     mask_function=sliding_window_bidirectional_mask_function(sliding_window),
                     device=DEVICE)
    additive = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, torch.finfo(torch.float32).min)
    ref, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.25)
    out, _ = lkt.attention_forward(module, q, k, v, None, scaling=0.25, is_causal=False,
                                   sliding_window=sliding_window)
    torch.testing.assert_close(out, ref, **TOL)


def test_softcap_gemma2(attn_backend):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=2.0,
                       query_pre_attn_scalar=24, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = Gemma2ForCausalLM(cfg).to(DEVICE).eval()
    for layer in model.model.layers:  # larger scores, so that the softcap is not a no-op
        layer.self_attn.q_proj.weight.data.mul_(20.0)
    ids = ids_(2, 11)
    ref = logits(model, "eager", ids)  # Gemma2 has no sdpa path (softcap)
    out = logits(model, "llmkern", ids)
    torch.testing.assert_close(out, ref, **TOL)
    for layer in model.model.layers:  # the softcap binds: without it the logits differ
        layer.self_attn.attn_logit_softcapping = None
    assert not torch.allclose(logits(model, "llmkern", ids), out, rtol=1e-3, atol=1e-3)


# ---- packed sequences (padding-free batches) -----------------------------------------------

def _packed(lengths):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)
    pos = torch.cat([torch.arange(n, device=DEVICE) for n in lengths]).unsqueeze(0)
    return cu, pos


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_packed_cu_seq_lens(attn_backend, sliding_window):
    """cu_seq_lens_q/k (DataCollatorWithFlattening) take the varlen path; each packed sequence
    gives the logits it gives alone."""
    if sliding_window is None and attn_backend != "torch":
        pytest.skip("the kernel runs the windowed case, a superset; the interpreter is slow")
    if sliding_window is None:
        model = llama()
    else:
        model = llama(MistralForCausalLM, MistralConfig, sliding_window=sliding_window)
    lengths = [5, 1, 7]
    cu, pos = _packed(lengths)
    ids = ids_(1, sum(lengths))
    model.set_attn_implementation("llmkern")
    with torch.no_grad():
        out = model(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=max(lengths), max_length_k=max(lengths)).logits
    # sdpa on the same packed row (its mask from position_ids: only without a cache), and
    # llmkern the same way (the mask path), and each sequence alone.
    ref = logits(model, "sdpa", ids, position_ids=pos, use_cache=False)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(logits(model, "llmkern", ids, position_ids=pos, use_cache=False),
                               ref, **TOL)
    for b in range(len(lengths)):
        s, e = int(cu[b]), int(cu[b + 1])
        alone = logits(model, "sdpa", ids[:, s:e])
        torch.testing.assert_close(out[:, s:e], alone, **TOL)


def test_packed_mask_and_dropout():
    """With dropout while training, packed sequences run dense with a block-diagonal mask."""
    from llmkern.reference import visible_keys

    lengths = [3, 4, 1]
    cu, _ = _packed(lengths)
    for window in (None, (2, 0)):
        mask = lkt._packed_mask(cu, cu, 9, 9, True, window)  # one padding row/col at the end
        expected = torch.zeros(9, 9, dtype=torch.bool, device=DEVICE)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            expected[s:e, s:e] = visible_keys(e - s, e - s, True, window, DEVICE)
        assert torch.equal(mask, expected)
    module = llama().model.layers[0].self_attn.train()
    q, k, v = (torch.randn(1, h, 8, 16, device=DEVICE) for h in (4, 2, 2))
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
    plain, _ = lkt.attention_forward(module, q, k, v, None, **kw)
    dropped, _ = lkt.attention_forward(module, q, k, v, None, dropout=0.5, **kw)
    assert dropped.shape == plain.shape == (1, 8, 4, 16)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, plain)
    # A batch of 2 packed rows (B > 1): the dense dropout path keeps the (B, S, H, D) layout.
    q2, k2, v2 = (t.expand(2, -1, -1, -1) for t in (q, k, v))
    cu2 = torch.cat([cu, cu[1:] + 8])
    out2, _ = lkt.attention_forward(module, q2, k2, v2, None, dropout=0.5, cu_seq_lens_q=cu2,
                                    cu_seq_lens_k=cu2, max_length_q=4, max_length_k=4)
    assert out2.shape == (2, 8, 4, 16) and torch.isfinite(out2).all()
    module.eval()  # dropout only while training
    torch.testing.assert_close(lkt.attention_forward(module, q2, k2, v2, None, dropout=0.5,
                                                     cu_seq_lens_q=cu2, cu_seq_lens_k=cu2,
                                                     max_length_q=4, max_length_k=4)[0],
                               plain.expand(2, -1, -1, -1))
    torch.testing.assert_close(lkt.attention_forward(module, q, k, v, None, dropout=0.5, **kw)[0], plain)


# ---- the attention function on its own --------------------------------------------------------

def test_attention_function_masks_and_shapes():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = llama().model.layers[0].self_attn
    q, k, v = (torch.randn(2, h, 6, 16, device=DEVICE) for h in (4, 2, 2))
    keep = torch.rand(2, 1, 6, 6, device=DEVICE) > 0.3
    keep[..., 0] = True  # every query sees a key
    additive = torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
    additive = additive + 0.3 * torch.randn(keep.shape, device=DEVICE)  # a real bias too
    for mask in (None, keep, additive):
        ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
        out, w = lkt.attention_forward(module, q, k, v, mask, scaling=0.3)
        assert w is None and out.shape == (2, 6, 4, 16) and out.is_contiguous()
        torch.testing.assert_close(out, ref, **TOL)
    # is_causal=False overrides the module's is_causal; a single query sees every key.
    ref, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=False)
    torch.testing.assert_close(lkt.attention_forward(module, q, k, v, None, is_causal=False)[0], ref, **TOL)
    ref, _ = sdpa_attention_forward(module, q[:, :, -1:], k, v, None)
    torch.testing.assert_close(lkt.attention_forward(module, q[:, :, -1:], k, v, None)[0], ref, **TOL)
    # Dropout only in training.
    out = lkt.attention_forward(module, q, k, v, None, dropout=0.5)[0]
    torch.testing.assert_close(out, sdpa_attention_forward(module, q, k, v, None)[0], **TOL)
    module.train()
    assert not torch.allclose(lkt.attention_forward(module, q, k, v, None, dropout=0.5)[0], out)
    module.eval()
    # v with a smaller head dim than q/k (MLA-style): padded and cropped.
    v8 = torch.randn(2, 2, 6, 8, device=DEVICE)
    ref, _ = sdpa_attention_forward(module, q, k, v8, keep)
    out, _ = lkt.attention_forward(module, q, k, v8, keep)
    assert out.shape == (2, 6, 4, 8)
    torch.testing.assert_close(out, ref, **TOL)
    with pytest.raises(ValueError, match="s_aux"):
        lkt.attention_forward(module, q, k, v, None, s_aux=torch.zeros(4))


def test_training_gradients_match_sdpa(attn_backend):
    model = llama()
    model.train()
    ids, mask = left_padded(seq=8)
    grads = {}
    for impl in ("sdpa", "llmkern"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        grads[impl] = [p.grad.clone() for p in model.parameters()]
    for g, g_ref in zip(grads["llmkern"], grads["sdpa"]):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


# ---- patch(model) -------------------------------------------------------------------------

def _grads(model, ids, mask):
    model.train()
    model.zero_grad()
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    model.eval()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_patch_gpt2(attn_backend, tmp_path):
    model = gpt2()
    ids, mask = left_padded(seq=10)
    ref = logits(model, "sdpa", ids, attention_mask=mask)
    grads_ref = _grads(model, ids, mask)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    assert lkt.patch(model, backend=attn_backend) is model
    assert model.llmkern_patched == {"norms": 5, "mlp": 2, "attention": True}
    assert model.config._attn_implementation == "llmkern"
    block = model.transformer.h[0]
    assert isinstance(block.ln_1, llmkern.nn.LayerNorm) and isinstance(block.mlp, llmkern.nn.MLP)
    assert block.attn.llmkern_backend == attn_backend and block.mlp.backend == attn_backend
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], **TOL)
    # Training through the patched modules: the same gradients (MLP weights transposed back).
    grads = _grads(model, ids, mask)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        g = g.t() if ".mlp.c_" in name and name.endswith("weight") else g
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
    # The state_dict keeps GPT-2's layout (Conv1D (in, out) weights): loads into a plain model.
    sd = model.state_dict()
    assert sd.keys() == sd_before.keys()
    for key in sd:
        torch.testing.assert_close(sd[key], sd_before[key])
    plain = gpt2()
    plain.load_state_dict(sd)
    model.load_state_dict(sd)  # and back into the patched one
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, out)
        torch.testing.assert_close(logits(plain, "sdpa", ids, attention_mask=mask)[valid], ref[valid])
    # save_pretrained from the patched model, from_pretrained into a plain one.
    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="sdpa").to(DEVICE).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits[valid], ref[valid])


def test_patch_llama_norms_shared():
    model = llama()
    ids = ids_(2, 9)
    ref = logits(model, "sdpa", ids)
    weight = model.model.layers[0].input_layernorm.weight
    lkt.patch(model)
    assert model.llmkern_patched["norms"] == 5 and model.llmkern_patched["mlp"] == 2  # gated MLPs
    norm = model.model.layers[0].input_layernorm
    assert isinstance(norm, llmkern.nn.RMSNorm) and norm.weight is weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, **TOL)
    lkt.patch(model, backend="torch")  # again: nothing new to swap, the backend changes
    assert model.llmkern_patched["norms"] == 0 and model.model.layers[0].input_layernorm is norm
    assert norm.backend == "torch" and model.model.layers[0].self_attn.llmkern_backend == "torch"


def test_patch_options_and_gemma_norms_kept():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = llama()
    lkt.patch(model, norms=False, attention=False)
    assert model.llmkern_patched == {"norms": 0, "mlp": 2, "attention": False}  # gated MLPs
    assert model.llmkern_report.swapped["attention"] == 0
    model = llama()
    lkt.patch(model, norms=False, mlp=False, attention=False, rotary=False, loss=False)
    assert not any(model.llmkern_report.swapped.values())
    assert model.llmkern_patched == {"norms": 0, "mlp": 0, "attention": False}
    assert model.config._attn_implementation == "sdpa"
    # Gemma's RMSNorm scales by (1 + weight): not what llmkern.nn.RMSNorm computes, left alone.
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    gemma = Gemma2ForCausalLM(cfg).eval()
    lkt.patch(gemma)
    assert gemma.llmkern_patched["norms"] == 0
    with pytest.raises(ValueError, match="backend"):
        lkt.patch(llama(), backend="nope")


def test_torch_compile_fullgraph():
    """A Llama forward with llmkern attention (the Triton op where it runs) compiles with
    fullgraph=True (no graph break); backend aot_eager, as there may be no C++ compiler."""
    backend = "triton" if TRITON_ATTENTION and "triton" in KERNEL_BACKENDS else "torch"
    with llmkern.use_backend(backend):
        _compile_llama()


def _compile_llama():
    torch._dynamo.reset()
    model = llama()
    model.set_attn_implementation("llmkern")
    ids = ids_(2, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
        torch.testing.assert_close(out, model(ids, use_cache=False).logits, **TOL)
