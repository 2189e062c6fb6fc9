"""Tokenizers, corpora, token shards and reproducible batches."""
import json
import os

import numpy as np
import pytest
import torch

from llmkern import data
from llmkern.data import DataError, PretrainData, SFTData, prepare
from llmkern.tokenizer import ByteTokenizer, load_tokenizer_dir, train_bpe

CPU = torch.device("cpu")
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # héllo\n" for i in range(400))


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo €")
    assert max(ids) < 256 and tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.decode(ids + [tok.eos_id]) == "héllo €"
    assert np.array_equal(tok.encode_array("héllo"), np.array(tok.encode("héllo")))


def test_bpe_training_roundtrip_and_directory_loading(tmp_path):
    tok = train_bpe(iter([TEXT]), vocab_size=300)
    assert 257 < tok.vocab_size <= 300
    ids = tok.encode(TEXT[:200])
    assert len(ids) < len(TEXT[:200].encode())  # merges were learned
    assert tok.decode(ids) == TEXT[:200]
    tok.save(str(tmp_path))
    again = load_tokenizer_dir(str(tmp_path))
    assert again.encode(TEXT[:200]) == ids and again.eos_id == tok.eos_id


def test_pretrain_corpus_file_dir_and_jsonl(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(TEXT)
    ds, tok = prepare(str(f), str(tmp_path / "c1"), progress=False)
    assert isinstance(ds, PretrainData) and ds.meta["tokens"] == len(TEXT.encode()) + 1
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "x.txt").write_text("abc")
    (d / "sub" / "y.md").write_text("def")
    (d / "blob.bin").write_bytes(b"\x00\x01\xff")  # binary: skipped
    ds, _ = prepare(str(d), str(tmp_path / "c2"), progress=False)
    eos = tok.eos_id
    assert ds.store.read(0, ds.store.n).tolist() == [*b"abc", eos, *b"def", eos]
    j = tmp_path / "t.jsonl"
    j.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    ds, _ = prepare(str(j), str(tmp_path / "c3"), progress=False)
    assert ds.store.read(0, ds.store.n).tolist() == [*b"one", eos, *b"two", eos]


def test_token_cache_is_reused_and_rebuilt_on_change(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(TEXT)
    cache = str(tmp_path / "cache")
    ds1, _ = prepare(str(f), cache, progress=False)
    stamp = os.stat(os.path.join(cache, "meta.json")).st_mtime_ns
    ds2, _ = prepare(str(f), cache, progress=False)
    assert os.stat(os.path.join(cache, "meta.json")).st_mtime_ns == stamp
    assert ds2.meta["fingerprint"] == ds1.meta["fingerprint"]
    f.write_text(TEXT + "more")
    ds3, _ = prepare(str(f), cache, progress=False)
    assert ds3.meta["tokens"] == ds1.meta["tokens"] + 4


def test_shards_split_and_windows_cross_shard_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHARD_TOKENS", 1000)
    f = tmp_path / "a.txt"
    f.write_text(TEXT)
    ds, _ = prepare(str(f), str(tmp_path / "c"), progress=False)
    assert len(ds.meta["shards"]) > 5
    whole = np.frombuffer(TEXT.encode(), dtype=np.uint8)
    assert np.array_equal(ds.store.read(990, 30), whole[990:1020])
    lo, hi = ds.bounds["val"]
    assert ds.bounds["train"] == (0, lo) and hi == ds.store.n and hi - lo == int(hi * 0.1)
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    i1, i2 = ds.sample(rng1, 6, "train", 32), ds.sample(rng2, 6, "train", 32)
    assert np.array_equal(i1, i2) and (i1 + 33 <= lo).all()
    x, y = ds.batch(i1, 32, CPU)
    assert x.shape == (6, 32) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    val = ds.sample(rng1, 2000, "val", 32)
    assert val.min() >= lo and val.max() + 33 <= hi
    with pytest.raises(IndexError):
        ds.store.read(hi - 5, 6)


def test_default_corpus_is_stdlib_deterministic_and_capped(tmp_path):
    files = data.default_corpus_files(300_000)
    assert files == data.default_corpus_files(300_000)
    assert all(p.endswith(".py") for p in files)
    assert 0 < sum(os.path.getsize(p) for p in files) <= 300_000
    ds, tok = prepare(None, str(tmp_path / "c"), corpus_bytes=300_000, progress=False)
    assert ds.meta["files"] == len(files) and ds.meta["tokens"] > 100_000


def test_sft_examples_mask_prompt_tokens(tmp_path):
    j = tmp_path / "sft.jsonl"
    pairs = [{"prompt": f"add {i} and {i}", "response": str(2 * i)} for i in range(20)]
    j.write_text("\n".join(json.dumps(p) for p in pairs))
    ds, tok = prepare(str(j), str(tmp_path / "c"), sft=True, progress=False)
    assert isinstance(ds, SFTData) and ds.bounds == {"train": (0, 18), "val": (18, 20)}
    x, y = ds.batch(np.array([3, 0]), 64, CPU)
    prompt = tok.encode(data.format_prompt("add 3 and 3"))
    response = tok.encode("6") + [tok.eos_id]
    n = len(prompt) + len(response)
    assert x[0, :n - 1].tolist() == (prompt + response)[:-1]
    assert (y[0, :len(prompt) - 1] == -100).all()  # no loss on the prompt
    assert y[0, len(prompt) - 1:n - 1].tolist() == response  # loss on the response and EOS
    assert (y[0, n - 1:] == -100).all()  # nor on padding
    x, y = ds.batch(np.array([3]), 8, CPU)  # cut at the context length
    assert x.shape == (1, 8) and (y == -100).all()
    ds.check_block_size(64)
    with pytest.raises(DataError, match="no response token fits in --block-size 8"):
        ds.check_block_size(8)


def test_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(str(tmp_path / "nope.txt"), str(tmp_path / "c"), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        prepare(str(empty), str(tmp_path / "c"), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"oops": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        prepare(str(bad), str(tmp_path / "c"), progress=False)
    text_only = tmp_path / "t.jsonl"
    text_only.write_text('{"text": "ok"}\n')
    with pytest.raises(DataError, match="prompt"):
        prepare(str(text_only), str(tmp_path / "c"), sft=True, progress=False)
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus")
    ds, _ = prepare(str(small), str(tmp_path / "c"), progress=False)
    with pytest.raises(DataError, match="too small"):
        ds.check_block_size(64)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        prepare(str(latin), str(tmp_path / "c"), progress=False)


@pytest.mark.parametrize("damage", ["truncate", "empty", "meta"])
def test_damaged_token_cache_is_rebuilt(tmp_path, damage):
    f = tmp_path / "a.txt"
    f.write_text(TEXT)
    cache = tmp_path / "cache"
    ds, _ = prepare(str(f), str(cache), progress=False)
    want = ds.store.read(0, ds.store.n).copy()
    shard = cache / ds.meta["shards"][0][0]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])  # a crash or a full disk mid-write
    elif damage == "empty":
        shard.write_bytes(b"")
    else:
        (cache / data.META).write_text('{"fingerprint": ')
    with pytest.warns(UserWarning, match="rebuilding the token cache"):
        again, _ = prepare(str(f), str(cache), progress=False)
    assert np.array_equal(again.store.read(0, again.store.n), want)
    # A process that may not build (a DDP rank other than 0) names the damaged file.
    shard.write_bytes(b"")
    with pytest.raises(DataError, match="tokens-00000.bin"):
        prepare(str(f), str(cache), build=False, progress=False)
