"""Tokenizers: bytes (the default, no download), a byte-level BPE trained on the user's corpus
with ``tokenizers``, or a local Hugging Face tokenizer directory.

All expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eos_id``,
``save(directory)`` and ``spec()`` (what a checkpoint records to load it back).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, List, Optional

import numpy as np

EOS_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or built (a user-facing error)."""


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus one end-of-text token (256)."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in (int(t) for t in ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        pass  # nothing to save: spec() says it all

    def spec(self) -> dict:
        return {"type": "byte"}


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (tokenizer.json), e.g. a trained byte-level BPE or GPT-2's."""

    kind = "hf"

    def __init__(self, tok, source: str = ""):
        self.tok = tok
        self.source = source
        eos = tok.token_to_id(EOS_TEXT)
        if eos is None:  # other families name it differently; fall back to a listed special
            for name in ("</s>", "<eos>", "<|eot_id|>", "[SEP]"):
                eos = tok.token_to_id(name)
                if eos is not None:
                    break
        if eos is None:
            raise TokenizerError(f"tokenizer {source or ''} has no end-of-text token ({EOS_TEXT!r} "
                                 f"or </s>); it is needed to separate documents")
        self.eos_id = int(eos)
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str) -> None:
        self.tok.save(os.path.join(directory, TOKENIZER_FILE))

    def spec(self) -> dict:
        return {"type": "hf", "file": TOKENIZER_FILE, "vocab_size": self.vocab_size}


def train_bpe(texts: Iterator[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style: every byte is a token, so no text is out of vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise TokenizerError(f"--vocab-size must be > 257 for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, source="trained byte-level BPE")


def load_tokenizer_dir(path: str) -> HFTokenizer:
    """A local tokenizer directory: tokenizer.json, or GPT-2's vocab.json + merges.txt."""
    from tokenizers import Tokenizer

    if os.path.isfile(path) and path.endswith(".json"):
        return HFTokenizer(_from_file(Tokenizer, path), source=path)
    file = os.path.join(path, TOKENIZER_FILE)
    if os.path.isfile(file):
        return HFTokenizer(_from_file(Tokenizer, file), source=path)
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer(vocab, merges)
        return HFTokenizer(bpe._tokenizer, source=path)
    raise TokenizerError(f"no tokenizer in {path!r}: expected {TOKENIZER_FILE} or vocab.json + "
                         f"merges.txt")


def _from_file(cls, file: str):
    try:
        return cls.from_file(file)
    except Exception as exc:  # tokenizers raises its own exception type for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TokenizerError(f"tokenizer file {file} is unreadable: {first}") from None


def tokenizer_from_spec(spec: Optional[dict], directory: str):
    """The tokenizer a checkpoint (or data cache) in ``directory`` recorded with ``spec()``."""
    if not spec or spec.get("type") == "byte":
        return ByteTokenizer()
    if spec.get("type") == "hf":
        return load_tokenizer_dir(os.path.join(directory, spec.get("file", TOKENIZER_FILE)))
    raise TokenizerError(f"unknown tokenizer spec {json.dumps(spec)} in {directory!r}")
