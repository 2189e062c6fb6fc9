"""GPT model: Hugging Face GPT-2 parity, loss path, KV cache, GQA, accounting, optimizer groups."""
import math

import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.model import GPT, GPTConfig, KVCache, peak_flops


def tiny(**kw):
    cfg = dict(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def _hf_gpt2(vocab=97, n_positions=32, n_layer=2, n_head=4, n_embd=48):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_layer=n_layer,
                                     n_head=n_head, n_embd=n_embd, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a missed transpose would show
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


def _assert_rel_close(ours, ref, rel=1e-4):
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= rel, f"max relative error {err:.2e} > {rel}"


@pytest.mark.parametrize("source", ["instance", "directory"])
def test_from_hf_logits_match_transformers(tmp_path, source):
    hf = _hf_gpt2()
    if source == "directory":
        hf.save_pretrained(tmp_path, safe_serialization=True)
        src = str(tmp_path)
    else:
        src = hf
    model = GPT.from_hf(src, backend="torch").eval()
    idx = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        ref = hf(idx).logits
        ours, _ = model(idx)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    _assert_rel_close(ours, ref)
    # The tied head: the loss through linear_cross_entropy equals transformers' loss.
    with torch.no_grad():
        ref_loss = hf(idx, labels=idx).loss
        _, loss = model(idx[:, :-1], idx[:, 1:])
    assert torch.allclose(loss, ref_loss, rtol=1e-4)


def test_from_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="GPT-2"):
        GPT.from_hf(str(tmp_path))


def test_loss_equals_cross_entropy_of_logits_and_ignores_masked_targets():
    model = tiny().eval()
    idx = torch.randint(0, 61, (3, 11))
    targets = torch.randint(0, 61, (3, 11))
    targets[0, :5] = -100
    with torch.no_grad():
        logits, none = model(idx)
        empty, loss = model(idx, targets)
    assert none is None and empty is None
    ref = F.cross_entropy(logits.view(-1, 61), targets.view(-1), ignore_index=-100)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_matches_full_forward(n_kv_head):
    model = tiny(n_kv_head=n_kv_head).eval()
    idx = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, 2)
        parts = [model(idx[:, :5], cache=cache)[0]]
        parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 13)]
    assert cache.length == 13
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_ragged_rows_and_static_buffers():
    """Rows of different lengths in one cache (right-padded prefill, per-row positions) give
    each row's logits alone; the buffers keep their storage and shape."""
    model = tiny().eval()
    lens = [7, 4]
    idx = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        cache = KVCache(model.config, 2, 12)
        pos = torch.arange(7).expand(2, 7)
        first, _ = model(idx[:, :7], cache=cache, input_pos=pos, logits_index=torch.tensor(lens) - 1)
        cache.set_lengths(torch.tensor(lens))
        ptr = cache.k[0].data_ptr()
        nxt = torch.stack([idx[0, 7:8], idx[1, 4:5]])
        second, _ = model(nxt, cache=cache)
        assert cache.lengths.tolist() == [8, 5] and cache.length == 8
        assert cache.k[0].data_ptr() == ptr and cache.k[0].shape == (2, 4, 12, 8)
        for row, n in enumerate(lens):
            alone, _ = model(idx[row:row + 1, :n + 1])
            assert torch.allclose(first[row, 0], alone[0, n - 1], atol=1e-5, rtol=1e-5)
            assert torch.allclose(second[row, 0], alone[0, n], atol=1e-5, rtol=1e-5)


def test_mlp_dropout_lives_in_the_mlp():
    model = tiny(dropout=0.5)
    mlp = model.transformer.h[0].mlp
    assert mlp.dropout.p == 0.5 and not hasattr(model.transformer.h[0], "mlp_dropout")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        mlp.eval()
        assert torch.equal(mlp(x), mlp(x))
        fused = mlp(x, residual=x)
        mlp.train()
        dropped = mlp(x)
        assert (dropped == 0).float().mean() > 0.2  # dropout in training
        assert not torch.allclose(mlp(x, residual=x), fused)
    model.set_dropout(0.0)
    assert mlp.dropout.p == 0.0


def test_gqa_shapes_and_backward():
    model = tiny(n_kv_head=2)
    assert model.transformer.h[0].attn.c_attn.weight.shape == ((4 + 2 * 2) * 8, 32)
    idx = torch.randint(0, 61, (2, 9))
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight


def test_context_and_config_errors():
    model = tiny()
    with pytest.raises(ValueError, match="block_size 24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="backend"):
        GPTConfig(backend="tpu")
    c = GPTConfig.gpt2(backend="torch")
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (12, 12, 768, 1024, 50304)
    with torch.device("meta"):
        assert 123e6 < GPT(c).num_params(non_embedding=False) < 125e6


def test_flops_mfu_and_optimizer_groups():
    model = tiny()
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - c.block_size * c.n_embd
    assert model.num_params() == n
    assert model.flops_per_token(16) == 6 * n + 12 * 2 * 4 * 8 * 16
    assert math.isclose(model.estimate_mfu(1000.0, 1e12, 16), model.flops_per_token(16) * 1000 / 1e12)
    assert model.estimate_mfu(1000.0, None) is None
    assert peak_flops(torch.device("cpu")) > 0
    opt = model.configure_optimizers(0.1, 1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_backend_torch_and_global_backend_agree():
    torch.manual_seed(3)
    a = tiny(backend="torch").eval()
    b = tiny().eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 61, (2, 7))
    with torch.no_grad(), llmkern.use_backend("torch"):
        assert torch.equal(a(idx)[0], b(idx)[0])


def test_triton_backend_through_interpreter_matches_torch():
    torch.manual_seed(4)
    ref = tiny(vocab_size=17, block_size=8, n_layer=1, n_head=2, n_embd=16)
    model = tiny(vocab_size=17, block_size=8, n_layer=1, n_head=2, n_embd=16, backend="triton")
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 17, (1, 8))
    try:
        _, loss = model(idx, idx)
    except RuntimeError as exc:
        if "cannot serve" in str(exc):
            pytest.skip(f"triton backend not available for every op here: {exc}")
        raise
    _, ref_loss = ref(idx, idx)
    assert torch.allclose(loss, ref_loss, rtol=1e-4, atol=1e-5)
