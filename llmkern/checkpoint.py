"""Checkpoints: one directory per step, written under a temporary name and renamed into place.

    <out>/ckpt-0000300/
        model.safetensors   weights (the tied LM head stored once)
        state.pt            optimizer, step, RNG states, data-sampler state (for exact resume)
        config.json         model config, training config, tokenizer spec
        tokenizer.json      when the tokenizer is not the byte tokenizer
    <out>/latest            name of the newest complete checkpoint

A crash at any point leaves the previous checkpoints intact: a directory only gets its final
name once every file in it is written, and ``latest`` is replaced atomically.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import List, Optional

import torch

from llmkern.model import GPT, GPTConfig
from llmkern.tokenizer import TokenizerError, tokenizer_from_spec

WEIGHTS, STATE, CONFIG, LATEST = "model.safetensors", "state.pt", "config.json", "latest"
_NAME = re.compile(r"^ckpt-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or does not fit the requested run (user error)."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}"


def list_checkpoints(out: str) -> List[str]:
    """Complete checkpoint directories in ``out``, oldest first."""
    if not os.path.isdir(out):
        return []
    found = []
    for name in os.listdir(out):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(out, name, CONFIG)):
            found.append((int(m.group(1)), os.path.join(out, name)))
    return [path for _, path in sorted(found)]


def is_checkpoint(path: str) -> bool:
    """An llmkern checkpoint directory (a Hugging Face one also has config.json + safetensors)."""
    if not (os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(os.path.join(path, WEIGHTS))):
        return False
    try:
        with open(os.path.join(path, CONFIG), encoding="utf-8") as f:
            return "llmkern" in json.load(f)
    except (OSError, ValueError):
        return False


def resolve(path: str) -> str:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist")
    if is_checkpoint(path):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            candidate = os.path.join(path, f.read().strip())
        if is_checkpoint(candidate):
            return candidate
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise CheckpointError(f"no llmkern checkpoint in {path!r} (expected {CONFIG} and {WEIGHTS}, or "
                          f"ckpt-* directories of a training run)")


def read_config(ckpt: str) -> dict:
    try:
        with open(os.path.join(ckpt, CONFIG), encoding="utf-8") as f:
            meta = json.load(f)
        GPTConfig.from_dict(meta["model"])
        return meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt!r} has an unreadable {CONFIG}: {exc}") from None


def load_model(ckpt: str, backend: Optional[str] = None, device="cpu") -> tuple:
    """(model, tokenizer, meta) from a checkpoint directory, a run directory (its newest
    checkpoint), or a Hugging Face GPT-2 directory with its tokenizer."""
    from safetensors.torch import load_model as load_weights

    if _is_hf_dir(ckpt):
        return _load_hf(ckpt, backend, device)
    ckpt = resolve(ckpt)
    meta = read_config(ckpt)
    config = GPTConfig.from_dict({**meta["model"], "backend": backend})
    model = GPT(config)
    try:
        load_weights(model, os.path.join(ckpt, WEIGHTS), strict=True)
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"weights in {ckpt!r} do not fit its config: {exc}") from None
    try:
        tok = tokenizer_from_spec(meta.get("tokenizer"), ckpt)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    return model.to(device), tok, meta


def _is_hf_dir(path: str) -> bool:
    return (os.path.isdir(path) and not is_checkpoint(path)
            and os.path.isfile(os.path.join(path, CONFIG))
            and any(n.endswith(".safetensors") for n in os.listdir(path)))


def _load_hf(path: str, backend: Optional[str], device) -> tuple:
    """A Hugging Face GPT-2 directory (weights, config and its tokenizer) as a checkpoint."""
    from llmkern.tokenizer import load_tokenizer_dir

    try:
        model = GPT.from_hf(path, backend=backend)
        tok = load_tokenizer_dir(path)
    except (ValueError, OSError) as exc:
        raise CheckpointError(str(exc)) from None
    return model.to(device), tok, {"model": model.config.to_dict(), "source": "hf"}


def save(out: str, step: int, model: GPT, meta: dict, state: dict, tokenizer, keep_last: int) -> str:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, drop all but the last N."""
    from safetensors.torch import save_model

    final = os.path.join(out, checkpoint_name(step))
    tmp = os.path.join(out, f".{checkpoint_name(step)}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, WEIGHTS))
    torch.save(state, os.path.join(tmp, STATE))
    tokenizer.save(tmp)
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
        json.dump({**meta, "step": step}, f, indent=1)
    old = None
    if os.path.exists(final):  # the same step again (e.g. interrupted right after a save)
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    _write_atomic(os.path.join(out, LATEST), os.path.basename(final) + "\n")
    if keep_last > 0:
        for path in list_checkpoints(out)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def load_state(ckpt: str) -> dict:
    path = os.path.join(ckpt, STATE)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {ckpt!r} has no {STATE} (weights only): it can seed "
                              f"--init-from but not --resume")
    return torch.load(path, map_location="cpu", weights_only=False)


def config_mismatch(saved: dict, wanted: dict) -> List[str]:
    """'name: saved X, requested Y' for each architecture field that differs."""
    return [f"{k}: checkpoint {saved.get(k)!r}, requested {v!r}" for k, v in wanted.items()
            if saved.get(k) != v]
