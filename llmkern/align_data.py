"""Data of the preference and policy stages: preference pairs and prompts, from JSONL or,
offline, from the embedded standard-library corpus.

Pairs: ``{"prompt", "chosen", "rejected"}`` records; by default a few lines of a stdlib source
file (the prompt), the line that really follows (chosen) and a corrupted copy of it
(rejected: characters reversed, words shuffled, or a bracket dropped). Prompts: ``{"prompt"}``
records; by default the first part of a stdlib line that parses on its own, cut inside its
brackets, so that a good completion closes it (see ``python_reward``). Both are small and
tokenised in memory, deterministically from the seed.
"""
from __future__ import annotations

import ast
import json
import os
import random
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from llmkern.data import (VAL_FRACTION, DataError, _make_tokenizer, corpus_files, read_jsonl,
                          default_corpus_files)

MAX_EXAMPLES = 4000  # default pairs/prompts drawn from the corpus
CONTEXT_LINES = 3  # lines of context before the line a default pair continues with


def _read_jsonl(path: str, keys: Sequence[str], what: str) -> List[dict]:
    def problem(record) -> Optional[str]:
        missing = [k for k in keys if not isinstance(record, dict) or not isinstance(record.get(k), str)]
        if missing:
            return (f"{what} records need string fields {', '.join(repr(k) for k in keys)}; "
                    f"missing {', '.join(missing)}")
        return None

    return list(read_jsonl(path, problem))


def _jsonl_files(data: str, what: str) -> List[str]:
    files = corpus_files(data)
    bad = [f for f in files if not f.endswith(".jsonl")]
    if bad:
        raise DataError(f"{what} data must be JSONL files; got {bad[0]!r}")
    return files


def _source_lines(files: List[str]) -> List[List[str]]:
    out = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                out.append(f.read().splitlines())
        except (OSError, UnicodeDecodeError):
            continue  # a stdlib file that is not UTF-8 is simply not used
    return out


def corrupt(line: str, rng: random.Random) -> str:
    """A broken copy of a code line: reversed characters, shuffled words or a dropped bracket
    (the one that applies first in a random order), never equal to the line."""
    indent = line[: len(line) - len(line.lstrip())]
    body = line.strip()
    ways = ["reverse", "shuffle", "bracket"]
    rng.shuffle(ways)
    for way in ways:
        if way == "reverse":
            bad = body[::-1]
        elif way == "shuffle":
            words = body.split()
            if len(words) < 2:
                continue
            rng.shuffle(words)
            bad = " ".join(words)
        else:
            spots = [i for i, c in enumerate(body) if c in ")]}"]
            if not spots:
                continue
            i = rng.choice(spots)
            bad = body[:i] + body[i + 1:]
        if bad != body:
            return indent + bad
    return indent + body + " ("


def default_pairs(files: List[str], seed: int, limit: int = MAX_EXAMPLES) -> List[dict]:
    """Preference pairs from source files: context lines, the real next line, a corrupted one."""
    rng = random.Random(seed)
    pairs = []
    for lines in _source_lines(files):
        for i in range(CONTEXT_LINES, len(lines), 7):
            line = lines[i]
            if not 12 <= len(line.strip()) <= 60 or line.strip().startswith("#"):
                continue
            prompt = "\n".join(lines[i - CONTEXT_LINES:i])[-120:] + "\n"
            pairs.append({"prompt": prompt, "chosen": line, "rejected": corrupt(line, rng)})
    rng.shuffle(pairs)
    return pairs[:limit]


def parses(code: str) -> bool:
    """Whether ``code`` (dedented as a whole) is valid Python for the standard library's parser."""
    try:
        with warnings.catch_warnings():  # sampled code trips SyntaxWarnings: not the user's to see
            warnings.simplefilter("ignore", SyntaxWarning)
            ast.parse(code.strip())
        return True
    except (SyntaxError, ValueError):
        return False


def default_prompts(files: List[str], seed: int, limit: int = MAX_EXAMPLES) -> List[dict]:
    """Prompts from source files: a line that parses alone, cut after an opening bracket."""
    rng = random.Random(seed)
    prompts = []
    for lines in _source_lines(files):
        for line in lines[::5]:
            body = line.strip()
            if not 10 <= len(body) <= 70 or "(" not in body or not parses(body):
                continue
            cut = body.index("(") + 1
            cut = rng.randint(cut, max(cut, len(body) - 2))
            if not parses(body[:cut]):
                prompts.append({"prompt": body[:cut]})
    rng.shuffle(prompts)
    return prompts[:limit]


def _split(n: int) -> dict:
    if n < 2:
        raise DataError(f"the stage needs at least 2 examples (1 for validation), got {n}")
    n_val = max(1, int(n * VAL_FRACTION))
    return {"train": (0, n - n_val), "val": (n - n_val, n)}


def _prepare_tokenizer(tokenizer, files, vocab_size, cache):
    tok = _make_tokenizer(tokenizer, files, False, vocab_size)
    os.makedirs(cache, exist_ok=True)
    tok.save(cache)
    return tok


class PairData:
    """Tokenised preference pairs. ``batch`` gives (tokens (2B, T), targets (2B, T)): the B
    chosen rows, then the B rejected ones; targets are -100 except on response tokens."""

    def __init__(self, records: List[dict], tok, files: int):
        self.tok = tok
        self.prompts = [tok.encode(r["prompt"]) for r in records]
        eos = [tok.eos_id]
        self.chosen = [tok.encode(r["chosen"]) + eos for r in records]
        self.rejected = [tok.encode(r["rejected"]) + eos for r in records]
        self.bounds = _split(len(records))
        tokens = sum(len(p) + len(c) + len(r) for p, c, r in zip(self.prompts, self.chosen,
                                                                   self.rejected))
        self.meta = {"files": files, "bytes": sum(len(json.dumps(r)) for r in records),
                     "tokens": tokens, "examples": len(records)}

    def check_block_size(self, block_size: int) -> None:
        if block_size < 2:
            raise DataError(f"--block-size {block_size} leaves no room for a response")

    def sample(self, rng: np.random.Generator, n: int, split: str, block_size: int) -> np.ndarray:
        lo, hi = self.bounds[split]
        return rng.integers(lo, hi, size=n)

    def rows(self, prompt: List[int], response: List[int], block_size: int) -> Tuple[list, list]:
        """(inputs, targets) of one prompt + response, the prompt cut on the left to fit."""
        response = response[:block_size]
        ids = (prompt[max(0, len(prompt) - (block_size + 1 - len(response))):] + response)
        n_prompt = len(ids) - len(response)
        x = ids[:-1]
        y = [-100 if i + 1 < n_prompt else t for i, t in enumerate(ids[1:])]
        return x, y

    def batch(self, index: np.ndarray, block_size: int, device):
        xs, ys = [], []
        for side in (self.chosen, self.rejected):
            for i in index:
                x, y = self.rows(self.prompts[i], side[i], block_size)
                xs.append(x)
                ys.append(y)
        return pad(xs, ys, device)


def pad(xs: List[list], ys: List[list], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows to the longest (inputs with 0, targets with -100)."""
    t = max(len(x) for x in xs)
    x = torch.zeros(len(xs), t, dtype=torch.long)
    y = torch.full((len(xs), t), -100, dtype=torch.long)
    for r, (a, b) in enumerate(zip(xs, ys)):
        x[r, :len(a)] = torch.tensor(a, dtype=torch.long)
        y[r, :len(b)] = torch.tensor(b, dtype=torch.long)
    return x.to(device), y.to(device)


SAMPLE_DTYPE = np.dtype([("item", np.int64), ("seed", np.int64)])


class PromptData:
    """Tokenised prompts for sampling; ``batch`` is supplied by the stage (it samples)."""

    def __init__(self, records: List[dict], tok, files: int):
        self.tok = tok
        self.texts = [r["prompt"] for r in records]
        self.prompts = [tok.encode(t) for t in self.texts]
        self.bounds = _split(len(records))
        self.meta = {"files": files, "bytes": sum(len(t.encode()) for t in self.texts),
                     "tokens": sum(len(p) for p in self.prompts), "examples": len(records)}
        self.batch_fn = None

    def check_block_size(self, block_size: int) -> None:
        if not any(len(p) < block_size for p in self.prompts):
            raise DataError(f"every prompt is at least --block-size {block_size} tokens long")

    def sample(self, rng: np.random.Generator, n: int, split: str, block_size: int) -> np.ndarray:
        """n draws of the step, each a prompt ("item") and a sampling seed ("seed"), from the
        trainer's RNG: every process draws the whole step, so draw i samples the same
        completions however the step is split over processes."""
        lo, hi = self.bounds[split]
        draws = np.empty(n, dtype=SAMPLE_DTYPE)
        draws["item"] = rng.integers(lo, hi, size=n)
        draws["seed"] = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
        return draws

    def batch(self, index: np.ndarray, block_size: int, device):
        if self.batch_fn is None:
            raise RuntimeError("PromptData.batch: the stage did not attach its sampler")
        return self.batch_fn(index, block_size, device)


def prepare_pairs(data: Optional[str], cache: str, tokenizer, vocab_size: int, corpus_bytes: int,
                  seed: int):
    if data is None:
        files = default_corpus_files(corpus_bytes)
        records = default_pairs(files, seed)
    else:
        files = _jsonl_files(data, "preference")
        records = [r for f in files for r in _read_jsonl(f, ("prompt", "chosen", "rejected"),
                                                         "preference")]
    tok = _prepare_tokenizer(tokenizer, files, vocab_size, cache)
    return PairData(records, tok, len(files)), tok


def prepare_prompts(data: Optional[str], cache: str, tokenizer, vocab_size: int,
                    corpus_bytes: int, seed: int):
    if data is None:
        files = default_corpus_files(corpus_bytes)
        records = default_prompts(files, seed)
    else:
        files = _jsonl_files(data, "prompt")
        records = [r for f in files for r in _read_jsonl(f, ("prompt",), "prompt")]
    tok = _prepare_tokenizer(tokenizer, files, vocab_size, cache)
    return PromptData(records, tok, len(files)), tok
