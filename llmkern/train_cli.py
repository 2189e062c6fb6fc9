"""``llmkern train``: train a GPT on a corpus (default: this Python's standard library sources,
no download); runs data parallel under torchrun.

The flags are made from the fields of ``TrainConfig`` (help text from their metadata) and the
architecture fields of ``GPTConfig``; the options are checked in one place, ``TrainConfig``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import typing
from dataclasses import MISSING, fields
from typing import Optional, Sequence

from llmkern.cli import (CLIError, HelpFormatter, add_threads_argument,  # noqa: F401 (HelpFormatter)
                         apply_threads, run_command)
from llmkern.model import GPTConfig
from llmkern.train_config import MODEL_FIELDS, TrainConfig

GROUPS = {"data": "data", "model": "model (--resume and --init-from take it from their checkpoint)",
          "optimization": "optimization",
          "alignment": "reward / dpo / grpo stages",
          "parallel": "past one GPU (launch with torchrun)", "run": "run"}
MODEL_HELP = {"n_layer": "transformer blocks", "n_head": "attention heads",
              "n_kv_head": "key/value heads (GQA); default: --n-head",
              "n_embd": "model width", "dropout": "dropout probability",
              "bias": "biases in the linear layers and norms",
              "arch": "gpt2 (learned positions, GELU MLP, LayerNorm) or llama (rotary, SwiGLU, "
                      "RMSNorm)"}
# Options of the command, not of the run: --resume does not take them from the checkpoint
# (how a run is launched, too: it may resume on another number of processes).
PER_INVOCATION = ("out", "resume", "init_from", "progress", "plot", "parallel", "cpu_offload")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(hint) -> type:
    """int / float / str / bool of a field annotation (``Optional[X]`` is X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _parse(kind: type):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            article = "an" if kind.__name__[0] in "aeiou" else "a"
            raise argparse.ArgumentTypeError(f"expected {article} {kind.__name__}, got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def _add(group, name: str, kind: type, default, help_: str, choices=None) -> None:
    """One flag. Every default is SUPPRESS, so the namespace holds only what was given: a new
    run fills the rest from the dataclass, --resume from the run's checkpoint."""
    if kind is bool:
        if default is True:
            group.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                               default=argparse.SUPPRESS, help=f"no {help_}")
        else:
            group.add_argument(_flag(name), dest=name, action="store_true",
                               default=argparse.SUPPRESS, help=help_)
        return
    shown = "" if default is None else f" (default: {default})"
    group.add_argument(_flag(name), dest=name, type=_parse(kind), choices=choices,
                       default=argparse.SUPPRESS, help=help_ + shown,
                       metavar=None if choices else name.upper())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        meta = f.metadata
        _add(groups[meta.get("group", "run")], f.name, _value_type(hints[f.name]), f.default,
             meta.get("help", ""), meta.get("choices"))
    model_hints = typing.get_type_hints(GPTConfig)
    for f in fields(GPTConfig):
        if f.name in MODEL_FIELDS:
            default = None if f.default is MISSING else f.default
            _add(groups["model"], f.name, _value_type(model_hints[f.name]), default,
                 MODEL_HELP[f.name])
    add_threads_argument(groups["run"])


def _resume_settings(given: dict) -> dict:
    """--resume: the run's own settings (from its checkpoint) for every option not given again,
    so that `llmkern train --resume --out DIR` continues exactly the run in DIR."""
    from llmkern.checkpoint import CheckpointError, read_config, resolve

    out = given.get("out", TrainConfig.__dataclass_fields__["out"].default)
    try:
        saved = read_config(resolve(out)).get("train", {})
    except CheckpointError:
        return given  # the Trainer says there is nothing to resume
    skip = set(PER_INVOCATION)
    if "stage" in given or "sft" in given:
        skip |= {"stage", "sft"}
    known = {f.name for f in fields(TrainConfig)}
    return {**{k: v for k, v in saved.items() if k in known and k not in skip}, **given}


def run(args: argparse.Namespace) -> int:
    from llmkern.train import Trainer

    given = {k: v for k, v in vars(args).items() if k != "threads"}
    model = {k: given.pop(k) for k in MODEL_FIELDS if k in given}
    if given.get("resume"):
        given = _resume_settings(given)
    cfg = TrainConfig(**given)  # every option is checked here
    t0 = time.perf_counter()
    trainer = Trainer(cfg, model)
    try:
        apply_threads(args.threads, trainer.raw_model.num_params())
        if trainer.master:
            _describe(trainer)
        try:
            trainer.train()
        except RuntimeError as exc:  # a backend asked for by name that cannot serve a call
            if "cannot serve this call" in str(exc):
                raise CLIError(str(exc)) from None
            raise
    finally:
        trainer.close()
    if trainer.master:
        _summary(trainer, time.perf_counter() - t0)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(sys.modules[__name__], argv, "train")


def _describe(t) -> None:
    from llmkern.backends import get_backend

    c, m = t.cfg, t.model_config
    corpus = c.data or "the Python standard library sources (embedded default corpus)"
    meta = t.data.meta
    print(f"corpus:    {corpus}: {meta['files']} file(s), {meta['bytes'] / 1e6:.1f} MB, "
          f"{meta['tokens']:,} tokens ({t.tokenizer.kind} tokenizer, vocab {t.tokenizer.vocab_size})")
    print(f"model:     {m.n_layer} layers, {m.n_head} heads ({m.n_kv_head} kv), n_embd {m.n_embd}, "
          f"context {m.block_size}, {t.raw_model.num_params() / 1e6:.2f}M parameters")
    amp = "bf16 autocast" if t.amp else "fp32"
    import torch

    how = "".join((", fsdp" if t.fsdp else "",
                   f", activation checkpointing every {c.activation_checkpointing}"
                   if c.activation_checkpointing else ""))
    print(f"training:  {c.stage}, {c.steps} steps x {c.batch_size} x {c.block_size} tokens on "
          f"{t.device} ({amp}, backend {c.backend or get_backend()}, {t.world} process(es){how}, "
          f"{torch.get_num_threads()} thread(s)), from step {t.step}")


def _summary(t, seconds: float) -> None:
    from llmkern.checkpoint import resolve

    out = t.cfg.out
    vals = sorted(t.val_losses.items())
    drop = (f", val loss {vals[0][1]:.3f} (step {vals[0][0]}) -> {vals[-1][1]:.3f} (step {vals[-1][0]})"
            if len(vals) > 1 else "")
    print(f"done:      step {t.step} in {seconds:.0f} s{drop}")
    print(f"checkpoint: {resolve(out)}")
    print(f"metrics:   {os.path.join(out, 'metrics.jsonl')} and metrics.csv"
          + (f"; loss curve {os.path.join(out, 'loss.png')}"
             if os.path.isfile(os.path.join(out, "loss.png")) else ""))
    print(f"next:      llmkern generate --ckpt {out} --prompt 'def '")
