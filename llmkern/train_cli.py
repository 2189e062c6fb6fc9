"""``llmkern train``: flags -> TrainConfig -> Trainer, with user mistakes reported as one line."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from llmkern.backends import CHOICES, get_backend
from llmkern.checkpoint import CheckpointError
from llmkern.data import DataError
from llmkern.model import GPTConfig
from llmkern.tokenizer import TokenizerError

USER_ERRORS = (DataError, CheckpointError, TokenizerError)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0 or value != value:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _dropout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (those flags say in their help what they default to)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from llmkern.train import TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="llmkern train",
        description="Train a GPT on a corpus (default: this Python's standard library sources, "
                    "no download). Runs data parallel under torchrun.",
        formatter_class=HelpFormatter)
    pint, pfloat = _positive(int), _positive(float)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="text file, directory of text files, or JSONL "
                   "({'text'} or {'prompt','response'}); default: the embedded stdlib corpus")
    g.add_argument("--tokenizer", default=d.tokenizer,
                   help="'byte', 'bpe' (train a byte-level BPE on the corpus), or a tokenizer directory")
    g.add_argument("--vocab-size", type=pint, default=d.vocab_size, help="BPE vocabulary size")
    g.add_argument("--corpus-mb", type=pfloat, default=d.corpus_bytes / 1e6,
                   help="size cap of the embedded default corpus, in MB")
    g.add_argument("--sft", action="store_true",
                   help="instruction tuning on JSONL prompt/response pairs (loss on responses only)")
    g = p.add_argument_group("model (--resume and --init-from take it from their checkpoint)")
    g.add_argument("--n-layer", type=pint, default=None, help="transformer blocks (new run: 4)")
    g.add_argument("--n-head", type=pint, default=None, help="attention heads (new run: 4)")
    g.add_argument("--n-kv-head", type=pint, default=None, help="key/value heads (GQA); default n_head")
    g.add_argument("--n-embd", type=pint, default=None, help="model width (new run: 128)")
    g.add_argument("--dropout", type=_dropout, default=None, help="dropout probability (new run: 0)")
    g.add_argument("--init-from", default=None,
                   help="start from a checkpoint (or a Hugging Face GPT-2 directory)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=pint, default=d.steps, help="total optimizer steps")
    g.add_argument("--batch-size", type=pint, default=d.batch_size,
                   help="global batch: sequences per step over all processes and --grad-accum")
    g.add_argument("--block-size", type=pint, default=d.block_size, help="sequence length")
    g.add_argument("--grad-accum", type=pint, default=d.grad_accum, help="micro-steps per step")
    g.add_argument("--lr", type=pfloat, default=d.lr, help="peak learning rate")
    g.add_argument("--warmup", type=_non_negative_int, default=d.warmup, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay (matrices)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=d.seed, help="initialization and data order")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=d.out, help="output directory (checkpoints, metrics, loss.png)")
    g.add_argument("--eval-every", type=pint, default=d.eval_every, help="steps between val losses")
    g.add_argument("--eval-iters", type=pint, default=d.eval_iters, help="batches per val loss")
    g.add_argument("--ckpt-every", type=pint, default=d.ckpt_every, help="steps between checkpoints")
    g.add_argument("--keep-last", type=_non_negative_int, default=d.keep_last,
                   help="checkpoints to keep (0: all)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default=d.dtype, choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    g.add_argument("--backend", default=None, choices=CHOICES,
                   help="llmkern kernel backend (default: $LLMKERN_BACKEND, else auto)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from llmkern.train import ConfigError, Trainer, TrainConfig

    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "dropout")
                 if getattr(args, k) is not None}
    try:
        GPTConfig(**overrides)  # bad combinations (n_embd % n_head, ...) before any work
    except ValueError as exc:
        return _fail(str(exc).replace("GPTConfig", "model config"), 2)
    cfg = TrainConfig(
        data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size,
        block_size=args.block_size, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
        eval_iters=args.eval_iters, ckpt_every=args.ckpt_every, keep_last=args.keep_last,
        seed=args.seed, device=args.device, dtype=args.dtype, backend=args.backend,
        compile=args.compile, sft=args.sft, init_from=args.init_from, resume=args.resume,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        corpus_bytes=int(args.corpus_mb * 1e6), progress=not args.no_progress)
    if args.resume:
        try:
            cfg = _resume_settings(cfg, argv)
        except CheckpointError as exc:
            return _fail(str(exc), 1)
    if cfg.data is not None and not os.path.exists(cfg.data):
        return _fail(f"data path {cfg.data!r} does not exist", 1)
    trainer = None
    t0 = time.perf_counter()
    _sigterm_as_interrupt()
    try:
        trainer = Trainer(cfg, overrides)
        if trainer.master:
            _describe(trainer)
        trainer.train()
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except USER_ERRORS as exc:
        return _fail(str(exc), 1)
    except OSError as exc:  # e.g. --out not writable, disk full
        return _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 1)
    except KeyboardInterrupt:
        print("llmkern train: interrupted", file=sys.stderr)
        return 130
    finally:
        if trainer is not None:
            trainer.close()
    if trainer.master:
        _summary(trainer, time.perf_counter() - t0)
    return 0


def _resume_settings(cfg, argv):
    """--resume: the run's own settings (from its checkpoint) for every flag not given again,
    so that `llmkern train --resume --out DIR` continues exactly the run in DIR."""
    from dataclasses import fields, replace

    from llmkern.checkpoint import read_config, resolve

    try:
        saved = read_config(resolve(cfg.out)).get("train", {})
    except CheckpointError:
        return cfg  # the Trainer says there is nothing to resume
    explicit = build_parser()
    for action in explicit._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(explicit.parse_args(argv)))
    given |= {"progress"} if "no_progress" in given else set()
    given |= {"corpus_bytes"} if "corpus_mb" in given else set()
    keep = {"out", "resume", "init_from", "progress"}
    updates = {f.name: saved[f.name] for f in fields(cfg)
               if f.name in saved and f.name not in given and f.name not in keep}
    return replace(cfg, **updates)


def _sigterm_as_interrupt() -> None:
    """A SIGTERM (kill, a scheduler's preemption) stops like Ctrl-C: the trainer saves a
    checkpoint of the last finished step before exiting."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _fail(message: str, code: int) -> int:
    print(f"llmkern train: error: {message}", file=sys.stderr)
    return code


def _describe(t) -> None:
    c, m = t.cfg, t.model_config
    corpus = c.data or "the Python standard library sources (embedded default corpus)"
    meta = t.data.meta
    print(f"corpus:    {corpus}: {meta['files']} file(s), {meta['bytes'] / 1e6:.1f} MB, "
          f"{meta['tokens']:,} tokens ({t.tokenizer.kind} tokenizer, vocab {t.tokenizer.vocab_size})")
    print(f"model:     {m.n_layer} layers, {m.n_head} heads ({m.n_kv_head} kv), n_embd {m.n_embd}, "
          f"context {m.block_size}, {t.raw_model.num_params() / 1e6:.2f}M parameters")
    amp = "bf16 autocast" if t.amp else "fp32"
    print(f"training:  {c.steps} steps x {c.batch_size} x {c.block_size} tokens on {t.device} "
          f"({amp}, backend {c.backend or get_backend()}, {t.world} process(es)), from step {t.step}")


def _summary(t, seconds: float) -> None:
    out = t.cfg.out
    vals = sorted(t.val_losses.items())
    drop = (f", val loss {vals[0][1]:.3f} (step {vals[0][0]}) -> {vals[-1][1]:.3f} (step {vals[-1][0]})"
            if len(vals) > 1 else "")
    print(f"done:      step {t.step} in {seconds:.0f} s{drop}")
    from llmkern.checkpoint import resolve

    print(f"checkpoint: {resolve(out)}")
    print(f"metrics:   {os.path.join(out, 'metrics.jsonl')} and metrics.csv"
          + (f"; loss curve {os.path.join(out, 'loss.png')}"
             if os.path.isfile(os.path.join(out, "loss.png")) else ""))
    print(f"next:      llmkern generate --ckpt {out} --prompt 'def '")
