"""Checkpoints: one directory per step, written under a temporary name and renamed into place.

    <out>/ckpt-0000300/
        model.safetensors   weights (the tied LM head stored once)
        state.pt            optimizer, step, RNG states, data-sampler state (for exact resume)
        config.json         model config, training config, tokenizer spec
        tokenizer.json      when the tokenizer is not the byte tokenizer
    <out>/latest            name of the newest complete checkpoint

An FSDP run writes ``sharded/`` (``torch.distributed.checkpoint``) instead of
``model.safetensors``: see ``llmkern.dcp``; it reads back here as any other checkpoint.

A crash at any point leaves the previous checkpoints intact: a directory only gets its final
name once every file in it is written, ``latest`` is replaced atomically, and a checkpoint is
renamed to a hidden name before it is deleted, so one is either whole or gone. A killed run's
hidden temporaries are removed by ``clean_stale`` when the next run starts. Every file loads
without executing code: safetensors, JSON, and ``torch.load(weights_only=True)``.
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
# temporaries of save/prune (and the names of earlier versions), with their writer's pid
_STALE = re.compile(r"^(\.ckpt-\d+\.(tmp|old|del)|ckpt-\d+\.old|latest\.tmp)-(\d+)$")
STATE_KEYS = ("step", "optimizer", "data_rng", "torch_rng")


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
        if m and os.path.isfile(os.path.join(out, name, CONFIG)) \
                and _has_weights(os.path.join(out, name)):
            found.append((int(m.group(1)), os.path.join(out, name)))
    return [path for _, path in sorted(found)]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has not written anything yet: a recycled pid's leftover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_stale(out: str) -> List[str]:
    """Remove what killed runs left in ``out`` (temporary checkpoint directories, half-pruned
    checkpoints, ``latest`` temporaries) unless their writer is still running; return them."""
    if not os.path.isdir(out):
        return []
    removed = []
    for name in sorted(os.listdir(out)):
        m = _STALE.match(name)
        if not m or _pid_alive(int(m.group(3))):
            continue
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass
        removed.append(path)
    return removed


def _config_problem(path: str) -> Optional[str]:
    """Why ``path``'s config.json cannot be read as JSON, or None."""
    file = os.path.join(path, CONFIG)
    try:
        with open(file, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as exc:
        return f"{file} is not readable JSON ({_first_line(exc)})"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


first_line = _first_line


def _has_weights(path: str) -> bool:
    """Consolidated weights, or the finished index of sharded ones (``llmkern.dcp``)."""
    from llmkern.dcp import is_sharded

    return os.path.isfile(os.path.join(path, WEIGHTS)) or is_sharded(path)


def is_checkpoint(path: str) -> bool:
    """An llmkern checkpoint directory (a Hugging Face one also has config.json + safetensors)."""
    if not (os.path.isfile(os.path.join(path, CONFIG)) and _has_weights(path)):
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
    if os.path.isfile(os.path.join(path, WEIGHTS)) and os.path.isfile(os.path.join(path, CONFIG)):
        problem = _config_problem(path)
        if problem:
            raise CheckpointError(f"checkpoint {problem}")
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
    file = os.path.join(ckpt, CONFIG)
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
        GPTConfig.from_dict(meta["model"])
        return meta
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {file} is unreadable: no {exc} entry") from None
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {file} is unreadable: {_first_line(exc)}") from None


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
    if not os.path.isfile(os.path.join(ckpt, WEIGHTS)):  # an FSDP run's sharded checkpoint
        from llmkern import dcp

        dcp.load_weights(model, ckpt)
        return model.to(device), _tokenizer(meta, ckpt), meta
    file = os.path.join(ckpt, WEIGHTS)
    try:
        load_weights(model, file, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {file} do not fit its config: {_first_line(exc)}") from None
    except Exception as exc:  # safetensors' own error type for a truncated or corrupt file
        raise CheckpointError(f"checkpoint {file} is unreadable (truncated or corrupt?): "
                              f"{_first_line(exc)}") from None
    return model.to(device), _tokenizer(meta, ckpt), meta


def _tokenizer(meta: dict, ckpt: str):
    try:
        return tokenizer_from_spec(meta.get("tokenizer"), ckpt)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None


def _is_hf_dir(path: str) -> bool:
    return (os.path.isdir(path) and not is_checkpoint(path)
            and os.path.isfile(os.path.join(path, CONFIG)) and _config_problem(path) is None
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
    tmp = begin(out, step)
    save_model(model, os.path.join(tmp, WEIGHTS))
    torch.save(state, os.path.join(tmp, STATE))
    tokenizer.save(tmp)
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
        json.dump({**meta, "step": step}, f, indent=1)
    commit(out, tmp, final, keep_last)
    return final


def begin(out: str, step: int) -> str:
    """A fresh hidden temporary directory for checkpoint ``step`` (named by this process)."""
    tmp = os.path.join(out, f".{checkpoint_name(step)}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def commit(out: str, tmp: str, final: str, keep_last: int) -> None:
    """Give a fully written ``tmp`` its final name, point ``latest`` at it, prune to N."""
    if os.path.exists(final):  # the same step again (e.g. interrupted right after a save)
        _remove(final)
    os.replace(tmp, final)
    _write_atomic(os.path.join(out, LATEST), os.path.basename(final) + "\n")
    if keep_last > 0:
        for path in list_checkpoints(out)[:-keep_last]:
            _remove(path)


def _remove(path: str) -> None:
    """Delete a checkpoint so that it is whole or gone at every instant: first renamed to a
    hidden name (atomic), then deleted; a kill in between leaves what ``clean_stale`` removes."""
    head, name = os.path.split(path)
    doomed = os.path.join(head, f".{name}.del-{os.getpid()}")
    if os.path.exists(doomed):  # an earlier deletion of the same name that did not finish
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, a pickle naming code (refused), ...
        raise CheckpointError(f"checkpoint {path} is not a loadable trainer state (truncated, "
                              f"corrupt, or holding more than tensors and plain data): "
                              f"{_first_line(exc)}") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a trainer state: no {', '.join(missing)}")
    return state


def config_mismatch(saved: dict, wanted: dict) -> List[str]:
    """'name: saved X, requested Y' for each architecture field that differs."""
    return [f"{k}: checkpoint {saved.get(k)!r}, requested {v!r}" for k, v in wanted.items()
            if saved.get(k) != v]
