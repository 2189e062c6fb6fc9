"""Sharded checkpoints with ``torch.distributed.checkpoint`` (an FSDP run's format).

    <out>/ckpt-0000300/
        sharded/            DCP files: every process writes its own shards, rank 0 the
                            ``.metadata`` index last ({"model": ..., "optim": ...})
        state.pt            step, RNG states, losses (rank 0's; the optimizer is in sharded/)
        config.json         as a consolidated checkpoint, with "sharded": true
        tokenizer.json      when the tokenizer is not the byte tokenizer

The directory is written under rank 0's temporary name and renamed into place by rank 0 once
every process has finished its shards (``checkpoint.begin`` / ``commit``): a torn save is a
hidden temporary that is never resumed and that ``clean_stale`` removes. The files are keyed
by parameter names, not by process, so a run resumes on any number of processes (DCP
reshards on load), single-process runs included. ``llmkern export`` consolidates one into a
single safetensors file.
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from typing import Optional

import torch

from llmkern import checkpoint as ckpt_io

SHARDED = "sharded"
METADATA = ".metadata"  # DCP's index, written last: its presence marks a finished save


def is_sharded(ckpt: str) -> bool:
    return os.path.isfile(os.path.join(ckpt, SHARDED, METADATA))


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


@contextmanager
def _quiet():
    """DCP warns that it reads in one process when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def save(out: str, step: int, model, optimizer, meta: dict, state: dict, tokenizer,
         keep_last: int) -> str:
    """Every process calls this: each writes its shards of the model and the optimizer into
    one temporary directory, then rank 0 adds the rest and renames it into place."""
    import torch.distributed.checkpoint as dcp

    dist = _dist()
    rank = dist.get_rank() if dist else 0
    box = [ckpt_io.begin(out, step) if rank == 0 else None]
    if dist:
        dist.broadcast_object_list(box, src=0)
    tmp = box[0]
    model_sd, optim_sd = _state_dicts(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, SHARDED))
    if dist:
        dist.barrier()  # every shard is on disk before the directory gets its final name
    final = os.path.join(out, ckpt_io.checkpoint_name(step))
    if rank == 0:
        torch.save({**state, "optimizer": SHARDED}, os.path.join(tmp, ckpt_io.STATE))
        tokenizer.save(tmp)
        with open(os.path.join(tmp, ckpt_io.CONFIG), "w", encoding="utf-8") as f:
            json.dump({**meta, "step": step, "sharded": True}, f, indent=1)
        ckpt_io.commit(out, tmp, final, keep_last)
    if dist:
        dist.barrier()  # nobody goes on (or resumes) before the rename
    return final


def load_train_state(ckpt: str, model, optimizer) -> None:
    """Weights and optimizer state of a sharded checkpoint into ``model`` / ``optimizer``
    (FSDP-sharded or plain, on any number of processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_sd, optim_sd = _state_dicts(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    try:
        with _quiet():
            dcp.load(sd, checkpoint_id=os.path.join(ckpt, SHARDED))
    except Exception as exc:  # DCP wraps reader errors of every rank in its own type
        raise ckpt_io.CheckpointError(f"sharded checkpoint {ckpt!r} does not fit this model and "
                                      f"optimizer: {ckpt_io.first_line(exc)}") from None
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def load_weights(model, ckpt: str) -> None:
    """The full weights of a sharded checkpoint into a plain (unsharded) model, in place."""
    import torch.distributed.checkpoint as dcp

    sd = model.state_dict()
    try:
        with _quiet():
            dcp.load({"model": sd}, checkpoint_id=os.path.join(ckpt, SHARDED),
                     no_dist=_dist() is None)
    except Exception as exc:
        raise ckpt_io.CheckpointError(f"sharded checkpoint {ckpt!r} does not fit its config: "
                                      f"{ckpt_io.first_line(exc)}") from None
    model.load_state_dict(sd)


def optimizer_state(state: dict) -> Optional[dict]:
    """The optimizer entry of a state.pt, or None when it lives in the sharded files."""
    opt = state.get("optimizer")
    return None if opt == SHARDED else opt
