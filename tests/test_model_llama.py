"""GPT with Llama choices (rope, swiglu, rmsnorm): shapes, the HF Llama equivalence, the KV cache."""
import pytest
import torch

import llmkern
from llmkern.model import GPT, GPTConfig, KVCache


def tiny(**kw):
    cfg = dict(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
               arch="llama", bias=False)
    return GPT(GPTConfig(**{**cfg, **kw}))


def test_llama_config_defaults_and_overrides():
    cfg = GPTConfig(arch="llama", n_embd=96, n_head=4)
    assert (cfg.rope, cfg.swiglu, cfg.rmsnorm) == (True, True, True)
    assert cfg.mlp_hidden == 256  # 8/3 * 96 up to a multiple of 64
    assert GPTConfig().rope is False and GPTConfig().mlp_hidden == 4 * 128
    assert GPTConfig(arch="llama", rope=False).rope is False
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="arch must be one of"):
        GPTConfig(arch="mamba")
    with pytest.raises(ValueError, match="rope needs an even head_dim"):
        GPTConfig(rope=True, n_embd=12, n_head=4)
    with pytest.raises(ValueError, match="swiglu must be a bool"):
        GPTConfig(swiglu="yes")
    with pytest.raises(ValueError, match="mlp_hidden must be None or an int"):
        GPTConfig(mlp_hidden=0)


def test_llama_modules():
    model = tiny()
    block = model.transformer.h[0]
    assert "wpe" not in model.transformer
    assert isinstance(block.ln_1, llmkern.nn.RMSNorm) and isinstance(block.mlp, llmkern.nn.SwiGLUMLP)
    assert not any(k.startswith("rope_") for k in model.state_dict())
    assert model.num_params() == model.num_params(non_embedding=False)


def test_matches_transformers_llama():
    """Same weights in HF's LlamaForCausalLM give the same logits (rope, GQA, SwiGLU, RMSNorm)."""
    transformers = pytest.importorskip("transformers")
    model = tiny(layer_norm_eps=1e-6).eval()
    c = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        max_position_embeddings=c.block_size, rms_norm_eps=c.layer_norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=True)).eval()
    sd = {"model.embed_tokens.weight": model.transformer.wte.weight, "model.norm.weight":
          model.transformer.ln_f.weight, "lm_head.weight": model.lm_head.weight}
    hd = c.head_dim
    for i, block in enumerate(model.transformer.h):
        p = f"model.layers.{i}."
        q, k, v = block.attn.c_attn.weight.split([c.n_head * hd, c.n_kv_head * hd, c.n_kv_head * hd])
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v,
                   p + "self_attn.o_proj.weight": block.attn.c_proj.weight,
                   p + "input_layernorm.weight": block.ln_1.weight,
                   p + "post_attention_layernorm.weight": block.ln_2.weight,
                   p + "mlp.gate_proj.weight": block.mlp.gate_proj.weight,
                   p + "mlp.up_proj.weight": block.mlp.up_proj.weight,
                   p + "mlp.down_proj.weight": block.mlp.down_proj.weight})
    hf.load_state_dict(sd, strict=False)
    idx = torch.randint(0, c.vocab_size, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_kv_cache_and_ragged_positions_match_full_forward():
    model = tiny().eval()
    idx = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, 2)
        parts = [model(idx[:, :5], cache=cache)[0]]
        parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 13)]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
        cache = KVCache(model.config, 2, 12)  # rows of 7 and 4 tokens, then one more each
        first, _ = model(idx[:, :7], cache=cache, input_pos=torch.arange(7).expand(2, 7))
        cache.set_lengths(torch.tensor([7, 4]))
        second, _ = model(torch.stack([idx[0, 7:8], idx[1, 4:5]]), cache=cache)
        alone, _ = model(idx[1:2, :5])
        torch.testing.assert_close(second[1, 0], alone[0, 4], atol=1e-5, rtol=1e-5)


def test_training_step_and_triton_backend():
    torch.manual_seed(3)
    ref = tiny(vocab_size=17, block_size=8, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)
    model = tiny(vocab_size=17, block_size=8, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                 backend="triton")
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 17, (2, 8))
    _, loss = model(idx, idx)
    _, ref_loss = ref(idx, idx)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_attention_refuses_rope_tables_shorter_than_the_cache():
    attn = llmkern.nn.CausalSelfAttention(32, 4, 2)
    cos = torch.ones(6, 4)
    cache = llmkern.nn.KVCache(1, 1, 8)
    with pytest.raises(ValueError, match="rope tables have 6 rows, fewer than the cache's 8"):
        attn(torch.randn(1, 3, 32), cache=cache, rope=(cos, cos))
    out = attn(torch.randn(1, 3, 32), rope=(cos, 0 * cos))  # angle 0: the identity rotation
    assert out.shape == (1, 3, 32)


def test_generate_with_rope_cached_ragged_and_uncached_agree():
    from llmkern.generate import generate

    model = tiny(block_size=32).eval()
    idx = torch.randint(0, 61, (2, 5))
    cached = generate(model, idx, 8, greedy=True)
    assert torch.equal(cached, generate(model, idx, 8, greedy=True, use_cache=False))
    prompts = [[3, 4, 5, 6, 7], [8, 9]]  # ragged rows: each at its own positions
    together = generate(model, prompts, 6, greedy=True)
    alone = [generate(model, [p], 6, greedy=True)[0] for p in prompts]
    assert [list(map(int, t)) for t in together] == [list(map(int, a)) for a in alone]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_steps_fuse_the_rope_into_the_kvcache_op(backend, monkeypatch):
    """Each decoding step hands the rope tables to attention_with_kvcache (no separate rotary
    call), and greedy tokens are exactly those of rotating first and then calling it plainly,
    and of full recomputation."""
    from conftest import KERNEL_BACKENDS

    import llmkern.nn
    from llmkern.generate import generate

    if backend != "torch" and backend not in KERNEL_BACKENDS:
        pytest.skip(f"the {backend} backend does not run here")
    torch.manual_seed(4)
    model = tiny(block_size=16, n_layer=1, n_embd=64, backend=backend).eval()
    with torch.no_grad():  # a peaked distribution, so that greedy picks are well separated
        model.transformer.wte.weight.mul_(20)
    prompts, new = [[3, 4, 5, 6, 7], [8, 9]], 5
    real_decode, real_rotary = llmkern.nn.attention_with_kvcache, llmkern.nn.rotary
    fused, rotary_calls = [], []

    def count_rotary(q, *args, **kwargs):
        rotary_calls.append(q.shape[2])
        return real_rotary(q, *args, **kwargs)

    def count_decode(q, *args, **kwargs):
        fused.append(kwargs.get("rotary_cos") is not None)
        return real_decode(q, *args, **kwargs)

    monkeypatch.setattr(llmkern.nn, "rotary", count_rotary)
    monkeypatch.setattr(llmkern.nn, "attention_with_kvcache", count_decode)
    out = generate(model, prompts, new, greedy=True)
    assert fused == [True] * (new - 1) and rotary_calls == [5]  # the prefill alone rotates apart

    def unfused(q, k_cache, v_cache, k, v, rotary_cos=None, rotary_sin=None, **kwargs):
        pos = kwargs["cache_seqlens"][:, None] + torch.arange(q.shape[2])
        q, k = real_rotary(q, k, rotary_cos, rotary_sin, pos, backend=backend)
        return real_decode(q, k_cache, v_cache, k, v, **kwargs)

    monkeypatch.setattr(llmkern.nn, "attention_with_kvcache", unfused)
    assert generate(model, prompts, new, greedy=True) == out
    monkeypatch.undo()
    for p, o in zip(prompts, out):
        assert o == generate(model, [p], new, greedy=True, use_cache=False)[0]


def test_compiled_decode_step_with_the_fused_rope():
    """The compiled step traces the cache append (an op that mutates the caches) and gives the
    eager tokens."""
    from conftest import KERNEL_BACKENDS

    from llmkern.generate import generate

    if "triton" not in KERNEL_BACKENDS:
        pytest.skip("the triton backend does not run here")
    torch.manual_seed(4)
    model = tiny(block_size=16, n_layer=1, n_embd=64, backend="triton").eval()
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    torch._dynamo.reset()
    assert generate(model, prompts, 4, greedy=True, compile="aot_eager") == \
        generate(model, prompts, 4, greedy=True)
    torch._dynamo.reset()


def test_train_command_arch_llama(tmp_path, one_thread):
    from conftest import TINY_TRAIN_FLAGS
    from llmkern import train_cli
    from llmkern.checkpoint import load_model, resolve

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, hello llmkern.\n" * 200)
    out = tmp_path / "run"
    rc = train_cli.main(["--data", str(corpus), "--out", str(out), "--steps", "2", "--arch", "llama"]
                        + TINY_TRAIN_FLAGS)
    assert rc == 0
    model = load_model(resolve(str(out)))[0]
    assert model.config.arch == "llama" and model.config.rope and model.config.swiglu
    assert isinstance(model.transformer.h[0].mlp, llmkern.nn.SwiGLUMLP)


def test_from_hf_llama_instance_and_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=80,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=24, rope_theta=500.0,
                                   tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    idx = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        expect = hf(idx).logits
        model = GPT.from_hf(hf).eval()
        assert model.config.arch == "llama" and model.config.rope_theta == 500.0
        torch.testing.assert_close(model(idx)[0], expect, atol=1e-4, rtol=1e-4)
        hf.save_pretrained(tmp_path)
        torch.testing.assert_close(GPT.from_hf(tmp_path).eval()(idx)[0], expect, atol=1e-4, rtol=1e-4)
    untied = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=80, num_hidden_layers=1,
        num_attention_heads=4, tie_word_embeddings=False))
    with pytest.raises(ValueError, match="untied embeddings"):
        GPT.from_hf(untied)
