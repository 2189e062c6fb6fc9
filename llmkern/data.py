"""Corpora, token shards and reproducible batches.

A corpus is a text file, a directory of text files, or JSONL (``{"text": ...}`` records, or
``{"prompt": ..., "response": ...}`` pairs for instruction tuning); with no path it is the
embedded default corpus: the ``.py`` sources of the running interpreter's standard library
(offline, on every machine), capped to a few MB. It is tokenised once into memory-mapped
token shards (uint16/uint32 ``.bin`` files plus ``meta.json``) in a cache directory, reused
while the corpus and tokenizer are unchanged. Batches are drawn from a seeded
``numpy.random.Generator`` whose state a checkpoint saves, so a resumed run sees the same data.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from llmkern.tokenizer import (ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer_dir,
                               tokenizer_from_spec, train_bpe)

DEFAULT_CORPUS_BYTES = 3_000_000
VAL_FRACTION = 0.1
SHARD_TOKENS = 1 << 27  # tokens per shard file (256 MiB as uint16)
CHUNK_BYTES = 1 << 20  # long texts are tokenised in ~1 MB pieces split at line ends
SFT_TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"
META = "meta.json"
FORMAT_VERSION = 2


class DataError(ValueError):
    """A corpus that cannot be used (missing, unreadable, empty, malformed): a user error."""


def format_prompt(prompt: str) -> str:
    """How a prompt is shown to the model in instruction tuning (and at generation after it)."""
    return SFT_TEMPLATE.format(prompt=prompt)


# ---- finding and reading the corpus --------------------------------------------------------

def default_corpus_files(cap_bytes: int = DEFAULT_CORPUS_BYTES) -> List[str]:
    """Standard-library ``.py`` files of this interpreter, in a fixed pseudo-random order (so the
    cap samples many packages, not the alphabetically first), up to ``cap_bytes``."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages",
                                                              "__pycache__") and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                found.append((hashlib.sha1(rel.encode()).hexdigest(), rel))
    if not found:
        raise DataError(f"no standard-library sources under {root!r} to use as the default corpus; "
                        f"pass --data PATH")
    files, total = [], 0
    for _, rel in sorted(found):
        path = os.path.join(root, rel)
        size = os.path.getsize(path)
        if total + size > cap_bytes and files or not _is_text(path, size):
            continue  # (the stdlib's tests hold a few deliberately non-UTF-8 files)
        files.append(path)
        total += size
    return files


def _is_text(path: str, limit: int = 8192) -> bool:
    """Whether the first ``limit`` bytes look like UTF-8 text (no NUL, decodable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(limit)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a character cut at the end of the sniffed bytes
    return True


def corpus_files(path: str) -> List[str]:
    """The files of a corpus path: the file itself, or a directory's non-hidden text files
    (sorted; binary or non-UTF-8 files, judged by their first 8 KB, are skipped)."""
    if not os.path.exists(path):
        raise DataError(f"data path {path!r} does not exist")
    if os.path.isfile(path):
        if not os.access(path, os.R_OK):
            raise DataError(f"data file {path!r} is not readable")
        return [path]
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith(".")]
    if not files:
        raise DataError(f"data directory {path!r} holds no files")
    files = [f for f in files if _is_text(f)]
    if not files:
        raise DataError(f"data directory {path!r} holds no UTF-8 text files")
    return files


def _read_chunks(path: str) -> Iterator[str]:
    """A text file in ~CHUNK_BYTES pieces cut at line ends."""
    try:
        with open(path, encoding="utf-8") as f:
            buf, size = [], 0
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= CHUNK_BYTES:
                    yield "".join(buf)
                    buf, size = [], 0
            if buf:
                yield "".join(buf)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path!r}: {exc.strerror or exc}") from None


def read_jsonl(path: str, problem: Callable[[object], Optional[str]]) -> Iterator[dict]:
    """The records of a JSONL file (blank lines skipped). ``problem(record)`` says what is wrong
    with a record (None when it is fine); a bad line is a DataError naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                wrong = problem(record)
                if wrong:
                    raise DataError(f"{path}:{lineno}: {wrong}")
                yield record
    except UnicodeDecodeError as exc:
        raise DataError(f"{path!r} is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path!r}: {exc.strerror or exc}") from None


def _text_record_problem(record) -> Optional[str]:
    if isinstance(record, dict) and (isinstance(record.get("text"), str) or (
            isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str))):
        return None
    return 'expected an object with "text" or with "prompt" and "response" strings'


def _read_records(path: str) -> Iterator[dict]:
    return read_jsonl(path, _text_record_problem)


def iter_documents(files: List[str]) -> Iterator[Tuple[str, bool]]:
    """(text, ends_document) pieces of a pretraining corpus; a JSONL record is one document
    (a prompt/response pair becomes its formatted text)."""
    for path in files:
        if path.endswith(".jsonl"):
            for r in _read_records(path):
                if isinstance(r.get("text"), str):
                    yield r["text"], True
                else:
                    yield format_prompt(r["prompt"]) + r["response"], True
        else:
            prev = None  # one chunk of lookahead tells which chunk ends the document
            for chunk in _read_chunks(path):
                if prev is not None:
                    yield prev, False
                prev = chunk
            if prev is not None:
                yield prev, True


def iter_pairs(files: List[str]) -> Iterator[Tuple[str, str]]:
    for path in files:
        if not path.endswith(".jsonl"):
            raise DataError(f"--sft needs JSONL files of {{\"prompt\", \"response\"}} records; got {path!r}")
        for r in _read_records(path):
            if not (isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str)):
                raise DataError(f'{path}: --sft needs "prompt" and "response" in every record')
            yield r["prompt"], r["response"]


# ---- token shards --------------------------------------------------------------------------

class TokenStore:
    """A token stream in one or more memory-mapped shard files, addressed by global offset."""

    def __init__(self, directory: str, shards: List[Tuple[str, int]], dtype: str):
        self.dtype = np.dtype(dtype)
        self.maps = [np.memmap(os.path.join(directory, name), dtype=self.dtype, mode="r", shape=(n,))
                     if n else np.zeros(0, self.dtype) for name, n in shards]
        self.starts = np.cumsum([0] + [n for _, n in shards])
        self.n = int(self.starts[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        if start < 0 or start + n > self.n:
            raise IndexError(f"tokens [{start}, {start + n}) outside the stream of {self.n}")
        out, pos = [], start
        while n > 0:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            local = pos - int(self.starts[i])
            piece = self.maps[i][local:local + n]
            out.append(piece)
            pos += len(piece)
            n -= len(piece)
        return np.concatenate(out) if len(out) > 1 else np.asarray(out[0])


class _ShardWriter:
    def __init__(self, directory: str, prefix: str, dtype):
        self.directory, self.prefix, self.dtype = directory, prefix, np.dtype(dtype)
        self.shards: List[Tuple[str, int]] = []
        self.file = None

    def write(self, arr: np.ndarray) -> None:
        arr = arr.astype(self.dtype, copy=False)
        while len(arr):
            if self.file is None or self.shards[-1][1] >= SHARD_TOKENS:
                self._open()
            room = SHARD_TOKENS - self.shards[-1][1]
            piece, arr = arr[:room], arr[room:]
            self.file.write(piece.tobytes())
            name, n = self.shards[-1]
            self.shards[-1] = (name, n + len(piece))

    def _open(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"{self.prefix}-{len(self.shards):05d}.bin"
        self.file = open(os.path.join(self.directory, name), "wb")
        self.shards.append((name, 0))

    def close(self) -> List[Tuple[str, int]]:
        if self.file is not None:
            self.file.close()
        return self.shards


def _fingerprint(files: List[str], sft: bool, tokenizer_id: str) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION}|sft={sft}|tok={tokenizer_id}".encode())
    for path in files:
        st = os.stat(path)
        h.update(f"|{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _tokenizer_id(tokenizer) -> str:
    if isinstance(tokenizer, str):
        if tokenizer in ("byte", "bpe"):
            return tokenizer
        return "dir:" + hashlib.sha256(load_tokenizer_dir(tokenizer).tok.to_str().encode()).hexdigest()
    if isinstance(tokenizer, HFTokenizer):
        return "obj:" + hashlib.sha256(tokenizer.tok.to_str().encode()).hexdigest()
    return "byte"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, leave=False)


def prepare(data: Optional[str], cache_dir: str, tokenizer="byte", sft: bool = False,
            vocab_size: int = 4096, corpus_bytes: int = DEFAULT_CORPUS_BYTES,
            build: bool = True, progress: bool = True):
    """Tokenise a corpus into ``cache_dir`` once (or reuse it) and return (dataset, tokenizer).

    ``tokenizer``: 'byte', 'bpe' (train a byte-level BPE of ``vocab_size`` on the corpus), a
    local tokenizer directory, or a tokenizer object (e.g. the one of an --init-from checkpoint).
    ``build=False`` (DDP ranks other than 0) only loads what rank 0 built.
    """
    files = default_corpus_files(corpus_bytes) if data is None else corpus_files(data)
    fingerprint = _fingerprint(files, sft, _tokenizer_id(tokenizer) + f"|v={vocab_size}")
    meta, problem = _read_cache(cache_dir, fingerprint)
    if meta is None:
        if not build:
            raise DataError(f"the token cache in {cache_dir!r} was not built by rank 0"
                            + (f" ({problem})" if problem else ""))
        if problem:
            import warnings

            warnings.warn(f"rebuilding the token cache: {problem}", stacklevel=2)
        meta = _build(files, cache_dir, tokenizer, sft, vocab_size, fingerprint, progress)
    tok = tokenizer_from_spec(meta["tokenizer"], cache_dir)
    cls = SFTData if meta["sft"] else PretrainData
    return cls(cache_dir, meta), tok


def _read_cache(cache_dir: str, fingerprint: str) -> Tuple[Optional[dict], Optional[str]]:
    """(meta, None) for a usable cache of this corpus; (None, why) for a damaged one (a file
    truncated by a crash or a full disk); (None, None) when there is none or it is stale."""
    meta_path = os.path.join(cache_dir, META)
    if not os.path.isfile(meta_path):
        return None, None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint:
            return None, None
        files = [(name, n, meta["dtype"]) for name, n in meta["shards"]]
        files += [(name, n, "uint8") for name, n in meta.get("masks", [])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{meta_path} is unreadable ({exc})"
    for name, n, dtype in files:
        path = os.path.join(cache_dir, name)
        want = int(n) * np.dtype(dtype).itemsize
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != want:
            return None, (f"{path} is missing" if size is None
                          else f"{path} holds {size} bytes, its index says {want}")
    if meta.get("sft"):
        for name in ("lengths.npy", "prompt_lengths.npy"):
            path = os.path.join(cache_dir, name)
            try:
                if len(np.load(path, mmap_mode="r")) != meta.get("examples"):
                    return None, f"{path} does not match its index"
            except (OSError, ValueError) as exc:
                return None, f"{path} is unreadable ({exc})"
    return meta, None


def _make_tokenizer(tokenizer, files, sft, vocab_size):
    if not isinstance(tokenizer, str):
        return tokenizer
    if tokenizer == "byte":
        return ByteTokenizer()
    if tokenizer == "bpe":
        texts = ((p + r) for p, r in iter_pairs(files)) if sft else (t for t, _ in iter_documents(files))
        return train_bpe(texts, vocab_size)
    try:
        return load_tokenizer_dir(tokenizer)
    except TokenizerError as exc:
        raise DataError(str(exc)) from None


def _build(files, cache_dir, tokenizer, sft, vocab_size, fingerprint, progress) -> dict:
    os.makedirs(cache_dir, exist_ok=True)
    meta_path = os.path.join(cache_dir, META)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # no meta = no (complete) cache, whatever a crash leaves behind
    for name in os.listdir(cache_dir):
        if name.endswith(".bin"):
            os.remove(os.path.join(cache_dir, name))
    tok = _make_tokenizer(tokenizer, files, sft, vocab_size)
    tok.save(cache_dir)
    total = sum(os.path.getsize(p) for p in files)
    bar = _progress(total, "tokenizing", progress)
    try:  # the bar is closed before an error (a bad record, ...) is reported
        return _write_shards(files, cache_dir, tok, sft, fingerprint, total, bar)
    finally:
        bar.close()


def _write_shards(files, cache_dir, tok, sft, fingerprint, total, bar) -> dict:
    meta_path = os.path.join(cache_dir, META)
    dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
    meta = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "tokenizer": tok.spec(),
            "dtype": dtype, "sft": sft, "files": len(files), "bytes": total}
    eos = np.array([tok.eos_id], dtype=np.int64)
    tokens = _ShardWriter(cache_dir, "tokens", dtype)
    if sft:
        masks, lengths, prompts = _ShardWriter(cache_dir, "mask", "uint8"), [], []
        for prompt, response in iter_pairs(files):
            p = np.asarray(tok.encode(format_prompt(prompt)), dtype=np.int64)
            r = np.concatenate([np.asarray(tok.encode(response), dtype=np.int64), eos])
            tokens.write(np.concatenate([p, r]))
            masks.write(np.concatenate([np.zeros(len(p), np.uint8), np.ones(len(r), np.uint8)]))
            lengths.append(len(p) + len(r))
            prompts.append(len(p))
            bar.update(len(prompt.encode()) + len(response.encode()))
        meta["masks"] = masks.close()
        np.save(os.path.join(cache_dir, "lengths.npy"), np.asarray(lengths, dtype=np.int64))
        np.save(os.path.join(cache_dir, "prompt_lengths.npy"), np.asarray(prompts, dtype=np.int64))
        meta["examples"] = len(lengths)
    else:
        for text, ends in iter_documents(files):
            ids = tok.encode_array(text).astype(np.int64)
            tokens.write(np.concatenate([ids, eos]) if ends else ids)
            bar.update(len(text.encode("utf-8", errors="replace")))
    meta["shards"] = tokens.close()
    meta["tokens"] = sum(n for _, n in meta["shards"])
    if meta["tokens"] == 0 or (sft and meta["examples"] == 0):
        raise DataError(f"the corpus is empty ({len(files)} file(s), {total} bytes, no text)")
    tmp = meta_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path)
    return meta


# ---- datasets and batches ------------------------------------------------------------------

class PretrainData:
    """Random windows of block_size + 1 tokens; the last VAL_FRACTION of the stream is validation."""

    sft = False

    def __init__(self, directory: str, meta: dict):
        self.meta = meta
        self.store = TokenStore(directory, meta["shards"], meta["dtype"])
        n = self.store.n
        self.bounds = {"train": (0, n - int(n * VAL_FRACTION)), "val": (n - int(n * VAL_FRACTION), n)}

    def check_block_size(self, block_size: int) -> None:
        for split, (lo, hi) in self.bounds.items():
            if hi - lo < block_size + 1:
                raise DataError(f"the corpus is too small for --block-size {block_size}: its {split} "
                                f"split holds {hi - lo} tokens (of {self.store.n}), it needs at least "
                                f"{block_size + 1}; use more text or a smaller --block-size")

    def sample(self, rng: np.random.Generator, n: int, split: str, block_size: int) -> np.ndarray:
        lo, hi = self.bounds[split]
        return rng.integers(lo, hi - block_size, size=n)  # windows of block_size + 1 inside [lo, hi)

    def batch(self, index: np.ndarray, block_size: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.store.read(int(i), block_size + 1) for i in index]).astype(np.int64)
        t = torch.from_numpy(rows)
        x, y = t[:, :-1], t[:, 1:]
        if device.type == "cuda":
            return (x.pin_memory().to(device, non_blocking=True),
                    y.pin_memory().to(device, non_blocking=True))
        return x.contiguous().to(device), y.contiguous().to(device)


class SFTData:
    """Prompt/response examples; targets are -100 (ignored) on prompt tokens and padding."""

    sft = True

    def __init__(self, directory: str, meta: dict):
        self.meta = meta
        self.store = TokenStore(directory, meta["shards"], meta["dtype"])
        self.masks = TokenStore(directory, meta["masks"], "uint8")
        self.lengths = np.load(os.path.join(directory, "lengths.npy"))
        self.prompt_lengths = np.load(os.path.join(directory, "prompt_lengths.npy"))
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        n = len(self.lengths)
        if n < 2:
            raise DataError(f"--sft needs at least 2 prompt/response examples (1 for validation), got {n}")
        n_val = max(1, int(n * VAL_FRACTION))
        self.bounds = {"train": (0, n - n_val), "val": (n - n_val, n)}

    def check_block_size(self, block_size: int) -> None:
        """An example whose prompt fills the context teaches nothing (no response token to
        predict): an error when that is every example, a warning when it is some."""
        cut = int((self.prompt_lengths >= block_size + 1).sum())
        if cut == len(self.prompt_lengths):
            raise DataError(f"every prompt (formatted) is at least {block_size + 1} tokens long: no "
                            f"response token fits in --block-size {block_size}; raise it")
        if cut:
            import warnings

            warnings.warn(f"{cut} of {len(self.prompt_lengths)} SFT examples have prompts longer than "
                          f"--block-size {block_size} and carry no loss", stacklevel=2)

    def sample(self, rng: np.random.Generator, n: int, split: str, block_size: int) -> np.ndarray:
        lo, hi = self.bounds[split]
        return rng.integers(lo, hi, size=n)

    def batch(self, index: np.ndarray, block_size: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        x = np.zeros((len(index), block_size), dtype=np.int64)
        y = np.full((len(index), block_size), -100, dtype=np.int64)
        for row, i in enumerate(index):
            start, n = int(self.offsets[i]), int(self.lengths[i])
            n = min(n, block_size + 1)  # long examples are cut at the context length
            ids = self.store.read(start, n).astype(np.int64)
            keep = self.masks.read(start, n).astype(bool)
            x[row, :n - 1] = ids[:-1]
            y[row, :n - 1] = np.where(keep[1:], ids[1:], -100)
        return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
