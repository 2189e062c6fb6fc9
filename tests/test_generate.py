"""Generation: KV cache vs recompute, sampling filters, EOS, beam search vs greedy and exhaustive search."""
import io
import itertools

import pytest
import torch

from llmkern.generate import TextStreamer, beam_score, beam_search, generate
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
