"""Hugging Face Llama-family models after patch(model): gated MLPs, rotary, the fused LM-head
loss and the report of what was swapped (llmkern/integrations/hf_llama.py), against the
unpatched models on the same weights."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkern  # noqa: E402
import llmkern.integrations.transformers as lkt  # noqa: E402
from conftest import DEVICE  # noqa: E402
from test_transformers import TOL, VOCAB, _restore_rotary, ids_, left_padded, llama  # noqa: E402,F401
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig,  # noqa: E402
                          MistralForCausalLM)


# ---- patch(model): the Llama family -------------------------------------------------------

def _family(arch):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch == "llama":
        return llama()
    if arch == "mistral":
        return llama(MistralForCausalLM, MistralConfig, sliding_window=4)
    if arch == "qwen2":  # sliding window on the second layer
        return llama(Qwen2ForCausalLM, Qwen2Config, use_sliding_window=True, sliding_window=4,
                     max_window_layers=1)
    model = llama(Gemma2ForCausalLM, Gemma2Config, head_dim=16, query_pre_attn_scalar=16,
                  sliding_window=4)
    model.set_attn_implementation("eager")  # sdpa has no softcap
    return model


def assert_same_greedy(model, ref, ids, mask, new_tokens):
    """HF greedy ``generate`` of the patched model gives the unpatched model's tokens."""
    with torch.no_grad():
        new = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        new_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(new, new_ref)


def _train_step(model, ids, labels, **kw):
    model.train()
    model.zero_grad()
    out = model(ids, labels=labels, **kw)
    out.loss.backward()
    model.eval()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2"])
def test_patch_llama_family_matches_unpatched(backend, arch):
    import copy

    model = _family(arch)
    ref = copy.deepcopy(model)
    ids = ids_(2, 11)
    labels = ids.clone()
    labels[0, :3] = -100
    lkt.patch(model, backend=backend)
    report = model.llmkern_report
    assert report.model_type == arch
    assert report.swapped["mlp"] == 2 and report.swapped["rotary"] == 1
    layer = model.model.layers[0]
    assert isinstance(layer.mlp, llmkern.nn.SwiGLUMLP) and layer.mlp.backend == backend
    assert layer.mlp.activation == ("gelu_tanh" if arch == "gemma2" else "silu")
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert report.swapped["loss"] == 1  # Gemma2's final-logit softcap included
    if arch == "gemma2":  # (1 + weight) norms stay HF's
        assert report.swapped["norms"] == 0 and "Gemma2RMSNorm" in report.left["norms"]
    else:
        assert report.swapped["norms"] == 5 and not report.left
    assert "swapped rotary: 1" in str(report)
    with torch.no_grad():
        out, expect = model(ids, labels=labels), ref(ids, labels=labels)
    torch.testing.assert_close(out.logits, expect.logits, **TOL)
    torch.testing.assert_close(out.loss, expect.loss, **TOL)
    loss, grads = _train_step(model, ids, labels)
    loss_ref, grads_ref = _train_step(ref, ids, labels)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
    assert_same_greedy(model, ref, ids, torch.ones_like(ids), 6)


def test_fused_loss_forward(backend):
    import copy
    import inspect

    model = llama()
    ref = copy.deepcopy(model)
    lkt.patch(model, backend=backend)
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    ids = ids_(3, 9)
    labels = ids.masked_fill(torch.rand(ids.shape, device=DEVICE) < 0.3, -100)
    model.train()
    ref.train()
    out = model(ids, labels=labels)
    assert out.logits is None and not calls  # training: the logits are never formed
    torch.testing.assert_close(out.loss, ref(ids, labels=labels).loss, **TOL)
    # asked for: logits too (and positional arguments bind as the model's own forward)
    out = model(ids, None, labels=labels, skip_logits=False)
    torch.testing.assert_close(out.logits, ref(ids, labels=labels).logits, **TOL)
    # gradient accumulation: sum over the tokens divided by num_items_in_batch
    n = torch.tensor(40, device=DEVICE)
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=n).loss,
                               ref(ids, labels=labels, num_items_in_batch=n).loss, **TOL)
    # labels already shifted (packed sequences), and the tuple return
    shift = torch.roll(labels, -1, dims=1)
    torch.testing.assert_close(model(ids, shift_labels=shift).loss,
                               ref(ids, shift_labels=shift, labels=labels).loss, **TOL)
    loss, *_ = model(ids, labels=labels, return_dict=False)
    assert loss.dim() == 0
    # Trainer reads forward's signature to keep dataset columns: still the model's own
    assert "labels" in inspect.signature(model.forward).parameters
    model.eval()
    with torch.no_grad():  # no labels: the model's own forward
        torch.testing.assert_close(model(ids).logits, ref.eval()(ids).logits, **TOL)


def test_patch_unknown_architecture_and_rotary_restore():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.models.llama import modeling_llama

    from llmkern.integrations import hf_llama

    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=32)
    with pytest.warns(UserWarning, match="'gpt_neox' is not an architecture patch\\(\\) knows"):
        lkt.patch(GPTNeoXForCausalLM(cfg).eval())
    with pytest.raises(ValueError, match="known: gpt2, llama, mistral, qwen2, gemma2"):
        lkt.patch(GPTNeoXForCausalLM(cfg).eval(), strict=True)
    original = modeling_llama.apply_rotary_pos_emb
    lkt.patch(llama())
    assert modeling_llama.apply_rotary_pos_emb is not original
    lkt.patch(llama(), backend="torch")  # patched twice: still one level over the original
    assert modeling_llama.apply_rotary_pos_emb.__wrapped__ is original
    hf_llama.restore_rotary()
    assert modeling_llama.apply_rotary_pos_emb is original


def _saved_bytes(model, ids, labels):
    """Bytes of the tensors a training step keeps for its backward, parameters aside (a CPU
    stand-in for the activation part of peak memory)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=labels).loss
    loss.backward()
    return sum(seen.values())


def test_patched_training_step_keeps_less_for_the_backward(backend):
    import copy

    cfg = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(DEVICE)
    ref = copy.deepcopy(model)
    lkt.patch(model, backend=backend)
    ids = torch.randint(0, 2048, (2, 48), device=DEVICE)
    patched, eager = _saved_bytes(model, ids, ids), _saved_bytes(ref, ids, ids)
    # No (tokens x vocab) logits and half the MLP activations (the fused loss keeps its weight
    # gradient, computed in the forward, instead): about two thirds of the eager figure here.
    assert patched < 0.75 * eager, f"saved for backward: patched {patched} B, eager {eager} B"


def test_patched_llama_training_step_compiles_fullgraph(backend):
    """Rotary, gated MLP, norms and the fused loss compile without a graph break, backward too."""
    import copy

    model = llama()
    ref = copy.deepcopy(model).train()
    lkt.patch(model, attention=False, backend=backend)
    model.train()
    ids = ids_(2, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(ids, labels=ids, use_cache=False).loss
    loss.backward()
    loss_ref = ref(ids, labels=ids, use_cache=False).loss
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, **TOL)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_patched_llama_left_padded_generate(backend):
    """Per-row positions (left padding) reach the rotary kernel as per-row cos/sin tables."""
    import copy

    model = llama()
    ref = copy.deepcopy(model)
    lkt.patch(model, backend=backend)
    assert_same_greedy(model, ref, *left_padded(), 5)


def test_fused_loss_with_an_lm_head_bias(backend):
    import copy

    model = llama()
    bias = torch.nn.Linear(64, VOCAB, bias=True).to(DEVICE)
    bias.weight = model.lm_head.weight
    model.lm_head = bias
    ref = copy.deepcopy(model).train()
    lkt.patch(model, backend=backend)
    assert model.llmkern_report.swapped["loss"] == 1
    ids = ids_(2, 9)
    loss, grads = _train_step(model, ids, ids)
    loss_ref, grads_ref = _train_step(ref, ids, ids)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(grads["lm_head.bias"], grads_ref["lm_head.bias"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["lm_head.weight"], grads_ref["lm_head.weight"], rtol=1e-4, atol=1e-5)


def test_report_names_what_was_left():
    model = llama(mlp_bias=True)
    lkt.patch(model, attention=False)
    report = model.llmkern_report
    assert report.swapped["mlp"] == 0 and "biases" in report.left["LlamaMLP"]
    assert "left LlamaMLP: biases" in str(report)


def test_rotary_wrapper_passes_other_calls_to_the_original():
    from llmkern.integrations import hf_llama

    calls = []

    def original(q, k, cos, sin, *args, **kwargs):
        calls.append((args, kwargs))
        return q, k

    fn = hf_llama._llmkern_rotary(original, "torch")
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    fn(q, k, cos, sin, torch.arange(5))  # an older signature with position_ids
    fn(q, k, cos, sin, unsqueeze_dim=2)  # (B, S, H, D) layout
    assert len(calls) == 2
    half = (cos[..., :4], sin[..., :4])
    torch.testing.assert_close(fn(q, k, cos, sin, 1)[0], llmkern.rotary(q, k, *half)[0])
    assert len(calls) == 2
