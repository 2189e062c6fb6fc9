"""Generation: KV cache vs recompute, sampling filters, EOS, beam search vs greedy and exhaustive search."""
import io
import itertools

import pytest
import torch

from llmkern.generate import (TextStreamer, beam_score, beam_search, generate, inverse_cdf_sample,
                              row_uniforms)
from llmkern.model import GPT, GPTConfig
from llmkern.tokenizer import ByteTokenizer


def tiny(vocab=40, block=16, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=16,
                          backend="torch")).eval()
    with torch.no_grad():  # a peaked distribution: larger weights than the training init
        model.transformer.wte.weight.mul_(40)
    return model


def test_greedy_with_kv_cache_equals_without():
    model = tiny()
    idx = torch.randint(0, 40, (3, 5))
    # 30 new tokens on a 16-token context: also covers the sliding window once the cache is full.
    a = generate(model, idx, 30, greedy=True, use_cache=True)
    b = generate(model, idx, 30, greedy=True, use_cache=False)
    assert a.shape == (3, 35)
    assert torch.equal(a, b)


def test_sampling_filters_and_seed():
    model = tiny()
    idx = torch.randint(0, 40, (2, 4))
    greedy = generate(model, idx, 8, greedy=True)
    assert torch.equal(generate(model, idx, 8, top_k=1), greedy)
    assert torch.equal(generate(model, idx, 8, top_p=1e-6), greedy)
    s1 = generate(model, idx, 8, temperature=1.5, top_k=10, top_p=0.9,
                  generator=torch.Generator().manual_seed(7))
    s2 = generate(model, idx, 8, temperature=1.5, top_k=10, top_p=0.9,
                  generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2)


def test_row_seeds_sample_each_row_as_alone():
    """With seeds, a row's continuation (top-k/top-p too) is the same in any batch; the draws
    follow softmax(logits / T)."""
    model = tiny()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
    seeds = [5, 2**62 + 3, 0, 77]
    kw = dict(temperature=1.3, top_k=20, top_p=0.95)
    together = generate(model, prompts, 8, seeds=seeds, **kw)
    assert together == [generate(model, [p], 8, seeds=[s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert generate(model, prompts[::-1], 8, seeds=seeds[::-1], **kw) == together[::-1]
    assert generate(model, prompts, 8, seeds=[s + 1 for s in seeds], **kw) != together
    n = 40000
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, float("-inf")]).expand(n, 5)
    u = row_uniforms(torch.arange(n, dtype=torch.int64) * 977, torch.tensor(5))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    freq = torch.bincount(inverse_cdf_sample(torch.softmax(logits / 0.8, -1), u), minlength=5) / n
    assert torch.allclose(freq, torch.softmax(logits[0] / 0.8, 0), atol=0.01), freq
    assert freq[4] == 0


def test_stops_at_eos():
    model = tiny()
    idx = torch.randint(0, 40, (1, 4))
    first = int(generate(model, idx, 1, greedy=True)[0, -1])
    out = generate(model, idx, 10, greedy=True, eos_id=first)
    assert out.shape == (1, 5) and int(out[0, -1]) == first


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_with_one_beam_is_greedy(seed):
    model = tiny(seed=seed)
    prompt = torch.randint(0, 40, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
    eos = 3
    greedy = generate(model, torch.tensor([prompt]), 9, greedy=True, eos_id=eos)[0, 6:].tolist()
    if eos in greedy:
        greedy = greedy[:greedy.index(eos) + 1]
    seq, _ = beam_search(model, prompt, num_beams=1, max_new_tokens=9, eos_id=eos)
    assert seq == greedy


def _exhaustive_best(model, prompt, vocab, steps, eos, length_penalty):
    """Score every sequence of up to ``steps`` tokens (EOS only last). One batched forward over
    all full-length sequences gives every prefix's log-probabilities (the model is causal)."""
    full = list(itertools.product(range(vocab), repeat=steps))
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + list(s) for s in full]))
    logp = torch.log_softmax(logits.double(), dim=-1)
    rows = {s: i for i, s in enumerate(full)}
    best = (float("-inf"), None)
    for n in range(1, steps + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if eos in seq[:-1] or (n < steps and seq[-1] != eos):
                continue
            row = rows[seq + (1,) * (steps - n)]
            total = sum(float(logp[row, len(prompt) - 1 + i, t]) for i, t in enumerate(seq))
            score = beam_score(total, n, length_penalty)
            if score > best[0]:
                best = (score, list(seq))
    return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_finds_exhaustive_best(length_penalty):
    vocab, steps, eos = 5, 3, 0
    torch.manual_seed(11)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=8, n_layer=1, n_head=1, n_embd=8,
                          backend="torch")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.8)  # a spread-out distribution so that the search matters
    prompt = [1, 2]
    score, best = _exhaustive_best(model, prompt, vocab, steps, eos, length_penalty)
    seq, beam = beam_search(model, prompt, num_beams=vocab ** steps, max_new_tokens=steps,
                            length_penalty=length_penalty, eos_id=eos)
    assert seq == best
    assert beam == pytest.approx(score, rel=1e-5)  # fp32 model, cached vs full


def test_streamer_waits_for_complete_characters():
    tok = ByteTokenizer()
    out = io.StringIO()
    s = TextStreamer(tok, out)
    for b in "é€x".encode():
        s.put(b)
    s.put(tok.eos_id)
    assert s.end() == "é€x"
    assert out.getvalue() == "é€x\n"


# ---- static KV cache, ragged batches -------------------------------------------------------

def _backend_model(backend, vocab=40, block=16, seed=0):
    from conftest import KERNEL_BACKENDS

    if backend != "torch" and backend not in KERNEL_BACKENDS:
        pytest.skip(f"the {backend} backend does not run here")
    model = tiny(vocab=vocab, block=block, seed=seed)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    model.config.backend = backend
    return model


@pytest.mark.parametrize("backend,new", [("torch", 14), ("triton", 5)])
def test_ragged_batch_equals_each_prompt_alone(backend, new):
    """Prompts of different lengths in one batch (static cache, per-row positions) give exactly
    the greedy tokens of each prompt generated alone by full recomputation; rows that fill the
    16-token context slide (recompute) on their own; a row stops at EOS on its own."""
    model = _backend_model(backend)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 40, (n,), generator=g).tolist() for n in (5, 1, 12, 8)]
    out = generate(model, prompts, new, greedy=True)
    assert [len(o) for o in out] == [len(p) + new for p in prompts]
    for p, o in zip(prompts, out):
        assert o == generate(model, [p], new, greedy=True, use_cache=False)[0]
    eos = out[0][len(prompts[0]) + 2]  # row 0 stops after at most 3 tokens
    stopped = generate(model, prompts, new, greedy=True, eos_id=eos)
    assert stopped[0][-1] == eos and len(stopped[0]) <= len(prompts[0]) + 3
    for p, o in zip(prompts, stopped):
        assert o == generate(model, [p], new, greedy=True, eos_id=eos, use_cache=False)[0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_steps_use_the_split_kv_kernel(backend, monkeypatch):
    """The prefill attends over the prompts' keys only (not the cache's max_len positions) and
    every decoding step of every layer calls the split-KV decode functional, never masked
    attention; the tokens stay those of full recomputation."""
    import llmkern.nn

    model = _backend_model(backend, block=32)
    decode, prefill = [], []
    real_decode, real_attention = llmkern.nn.attention_with_kvcache, llmkern.nn.attention

    def counting_decode(q, k_cache, *args, **kwargs):
        decode.append((q.shape[2], k_cache.shape[2]))
        return real_decode(q, k_cache, *args, **kwargs)

    def counting_attention(q, k, *args, **kwargs):
        prefill.append((q.shape[2], k.shape[2], kwargs.get("attn_mask") is None))
        return real_attention(q, k, *args, **kwargs)
    monkeypatch.setattr(llmkern.nn, "attention_with_kvcache", counting_decode)
    monkeypatch.setattr(llmkern.nn, "attention", counting_attention)
    prompts, new = [[1, 2, 3, 4, 5], [6, 7, 8]], 6
    out = generate(model, prompts, new, greedy=True)
    layers = model.config.n_layer
    assert prefill == [(5, 5, True)] * layers  # t0 = 5 keys, though the cache holds 11
    assert decode == [(1, 5 + new)] * (layers * (new - 1))
    monkeypatch.undo()
    for p, o in zip(prompts, out):
        assert o == generate(model, [p], new, greedy=True, use_cache=False)[0]


def test_streaming_gets_every_row_each_step():
    model = tiny()
    seen = []
    out = generate(model, [[1, 2, 3], [4]], 4, greedy=True, on_token=lambda t: seen.append(t.tolist()))
    assert len(seen) == 4 and all(len(s) == 2 for s in seen)
    assert [s[0] for s in seen] == out[0][3:] and [s[1] for s in seen] == out[1][1:]


def test_compiled_decode_step_has_static_shapes():
    """The decoding step compiles once for all steps (counted with a counting torch.compile
    backend) and gives the eager tokens."""
    model = tiny()
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(len(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    out = generate(model, prompts, 8, greedy=True, compile=counting)
    assert out == generate(model, prompts, 8, greedy=True)
    assert 1 <= len(compiles) <= 2, f"{len(compiles)} compilations for 7 decoding steps"
    torch._dynamo.reset()


def test_temperature_zero_is_greedy():
    model = tiny()
    idx = torch.randint(0, 40, (2, 4))
    assert torch.equal(generate(model, idx, 5, temperature=0.0), generate(model, idx, 5, greedy=True))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(idx=[[1, 2], []]), "prompt 1 is empty"),
    (dict(idx=[list(range(17))]), "more than the model's context"),
    (dict(idx=[[1, 99]]), "outside"),
    (dict(idx=torch.zeros(3)), "integer tensor"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(seeds=[1, 2]), "seeds must be 1 ints"),
    (dict(seeds=[-1]), "seeds must be 1 ints"),
    (dict(seeds=[1], generator=torch.Generator()), "not both"),
])
def test_bad_inputs(kwargs, needle):
    args = dict(idx=[[1, 2, 3]], max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        generate(tiny(), args.pop("idx"), **args)


# ---- command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny byte-level checkpoint, plain and marked as instruction-tuned (--sft)."""
    from llmkern import checkpoint

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=48, n_layer=1, n_head=2, n_embd=16))
    tok = ByteTokenizer()
    out = {}
    for name, sft in (("plain", False), ("sft", True)):
        meta = {"llmkern": 1, "model": model.config.to_dict(), "tokenizer": tok.spec(),
                "train": {"sft": sft}}
        out[name] = checkpoint.save(str(tmp_path_factory.mktemp(name)), 1, model, meta, {}, tok, 0)
    return out


def _cli(capsys, *argv):
    from llmkern import generate as gen_cli

    rc = gen_cli.main(list(argv) + ["--threads", "1", "--device", "cpu"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_prompts_file_batches_and_throughput(ckpts, capsys, tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("ab\nhello\n\nxyz\n", encoding="utf-8")
    rc, out, err = _cli(capsys, "--ckpt", ckpts["plain"], "--prompts", str(lines), "--greedy",
                        "--max-new-tokens", "3", "--batch-size", "2")
    assert rc == 0, err
    assert out.startswith("=== prompt 1 ===\nab") and "=== prompt 3 ===\nxyz" in out
    assert "9 tokens for 3 prompts" in err and "tokens/s" in err
    # The same completions one prompt at a time, and from JSONL.
    for i, prompt in enumerate(["ab", "hello", "xyz"]):
        rc, single, _ = _cli(capsys, "--ckpt", ckpts["plain"], "--prompt", prompt, "--greedy",
                             "--max-new-tokens", "3")
        assert rc == 0 and f"=== prompt {i + 1} ===\n{single}" in out
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "ab"}\n"hello"\n{"prompt": "xyz"}\n', encoding="utf-8")
    rc, out_j, _ = _cli(capsys, "--ckpt", ckpts["plain"], "--prompts", str(jsonl), "--greedy",
                        "--max-new-tokens", "3")
    assert rc == 0 and out_j == out


def test_cli_sft_output_separates_prompt_and_response(ckpts, capsys):
    rc, out, err = _cli(capsys, "--ckpt", ckpts["sft"], "--prompt", "q1", "--greedy",
                        "--max-new-tokens", "3")
    assert rc == 0, err
    assert out.startswith("q1\n--- response ---\n")


def test_cli_bad_inputs(ckpts, capsys, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    empty_json = tmp_path / "e.jsonl"
    empty_json.write_text('{"prompt": ""}\n')
    for argv, needle in ((["--prompts", str(bad)], "not valid UTF-8"),
                         (["--prompt", "ab\udcff"], "not valid UTF-8"),
                         (["--prompt", ""], "--prompt is empty"),
                         (["--prompts", str(empty_json)], "prompt 1 is empty"),
                         (["--prompts", str(tmp_path / "missing.txt")], "missing.txt"),
                         (["--prompt", "x" * 60], "more than the model's context of 48"),
                         (["--prompt", "a", "--prompts", str(bad)], "not both")):
        rc, _, err = _cli(capsys, "--ckpt", ckpts["plain"], *argv)
        assert rc == 2 and needle in err, (argv, err)
        assert err.startswith("llmkern generate: error:") and len(err.strip().splitlines()) == 1
