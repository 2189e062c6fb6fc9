"""Training options, stages and the learning-rate schedule (the trainer is ``llmkern.train``).

``TrainConfig`` is the one place options are declared and checked: ``llmkern train`` makes its
flags from the fields (help text from their metadata), and ``validate`` holds every check.
``STAGES`` is the dispatch point of ``--stage``: each ``Stage`` brings its data and its loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from llmkern.backends import CHOICES
from llmkern.data import DEFAULT_CORPUS_BYTES, prepare
from llmkern.parallel import PARALLEL

MODEL_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "dropout", "bias", "arch")  # GPTConfig's
SEED_LIMIT = 2**63  # seeds go to torch.manual_seed and numpy, both fine below this
DTYPES = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A bad training option (user error)."""


# ---- stages ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """What a training stage brings to the shared loop: its data and its loss on a batch.
    Stages that need other data or losses (reward, preference, policy) subclass it."""

    name: str
    help: str
    pairs: bool = False  # prompt/response JSONL, loss on response tokens only

    def prepare(self, cfg: "TrainConfig", cache: str, tokenizer, build: bool, progress: bool):
        """(dataset, tokenizer) for this stage, tokenised into ``cache`` once."""
        return prepare(cfg.data, cache, tokenizer, self.pairs, cfg.vocab_size,
                       int(cfg.corpus_mb * 1e6), build=build, progress=progress)

    def loss(self, model, batch) -> torch.Tensor:
        """The scalar loss of one micro-batch, ``batch`` as the dataset's ``batch()`` made it."""
        inputs, targets = batch
        return model(inputs, targets)[1]

    def build_model(self, config):
        """A new model of this stage for a GPTConfig."""
        from llmkern.model import GPT

        return GPT(config)

    def load_model(self, source: str, backend):
        """(model, tokenizer, meta) of a checkpoint (--init-from, --resume)."""
        from llmkern import checkpoint

        return checkpoint.load_model(source, backend=backend)

    def attach(self, trainer) -> None:
        """Called once the trainer's model, optimizer and data exist (before compile/DDP)."""


@dataclass(frozen=True)
class AlignStage(Stage):
    """reward / dpo / grpo: data, models and losses in ``llmkern.align`` (imported on use)."""

    def _impl(self):
        from llmkern import align

        return align.IMPLS[self.name]

    def prepare(self, cfg, cache, tokenizer, build, progress):
        return self._impl().prepare(cfg, cache, tokenizer, build, progress)

    def loss(self, model, batch):
        return self._impl().loss(model, batch)

    def build_model(self, config):
        return self._impl().build_model(config)

    def load_model(self, source, backend):
        return self._impl().load_model(source, backend)

    def attach(self, trainer) -> None:
        self._impl().attach(trainer)


STAGES: Dict[str, Stage] = {s.name: s for s in (
    Stage("pretrain", "next-token prediction on text"),
    Stage("sft", "instruction tuning on JSONL prompt/response pairs (loss on responses only)",
          pairs=True),
    AlignStage("reward", "a reward model (GPT + scalar head) on preference pairs "
               "({'prompt','chosen','rejected'} JSONL; default: stdlib lines vs corrupted copies)"),
    AlignStage("dpo", "direct preference optimization against the frozen starting model, on "
               "the same pairs"),
    AlignStage("grpo", "group-relative policy optimization: --group-size samples per prompt "
               "({'prompt'} JSONL; default: stdlib lines cut open), scored by --reward"),
)}
DPO_LOSSES = ("sigmoid", "ipo")


# ---- configuration ---------------------------------------------------------------------------

def _opt(default, help: str, group: str = "run", **extra):
    """A TrainConfig field; ``llmkern train`` makes its flag from the name, type and metadata."""
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclass
class TrainConfig:
    data: Optional[str] = _opt(None, "text file, directory of text files, or JSONL ({'text'} or "
                               "{'prompt','response'}); default: the embedded stdlib corpus", "data")
    stage: str = _opt("pretrain", "what to train: " + "; ".join(f"{s.name}: {s.help}"
                                                                for s in STAGES.values()),
                      "data", choices=tuple(STAGES))
    sft: bool = _opt(False, "same as --stage sft", "data")
    tokenizer: str = _opt("byte", "'byte', 'bpe' (train a byte-level BPE on the corpus), or a "
                          "tokenizer directory", "data")
    vocab_size: int = _opt(4096, "BPE vocabulary size", "data")
    corpus_mb: float = _opt(DEFAULT_CORPUS_BYTES / 1e6, "size cap of the embedded default corpus, "
                            "in MB", "data")
    init_from: Optional[str] = _opt(None, "start from a checkpoint (or a Hugging Face GPT-2 "
                                    "directory)", "model")
    steps: int = _opt(300, "total optimizer steps", "optimization")
    batch_size: int = _opt(16, "global batch: sequences per step over all processes and "
                           "--grad-accum", "optimization")
    block_size: int = _opt(128, "sequence length", "optimization")
    grad_accum: int = _opt(1, "micro-steps per step", "optimization")
    lr: float = _opt(4e-3, "peak learning rate", "optimization")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr", "optimization")
    warmup: int = _opt(30, "linear warmup steps", "optimization")
    weight_decay: float = _opt(0.1, "AdamW decay (matrices)", "optimization")
    beta1: float = _opt(0.9, "AdamW beta1", "optimization")
    beta2: float = _opt(0.95, "AdamW beta2", "optimization")
    grad_clip: float = _opt(1.0, "max gradient norm (0: off)", "optimization")
    seed: int = _opt(1337, "initialization and data order, in [0, 2**63)", "optimization")
    out: str = _opt("runs/llmkern", "output directory (checkpoints, metrics, loss.png)")
    eval_every: int = _opt(50, "steps between val losses")
    eval_iters: int = _opt(8, "batches per val loss")
    ckpt_every: int = _opt(100, "steps between checkpoints")
    keep_last: int = _opt(2, "checkpoints to keep (0: all)")
    resume: bool = _opt(False, "continue the run in --out exactly (its settings come from its "
                        "checkpoint unless given again)")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1, mps")
    dtype: str = _opt("auto", "auto: bf16 autocast on CUDA, fp32 elsewhere", choices=DTYPES)
    backend: Optional[str] = _opt(None, "llmkern kernel backend (default: $LLMKERN_BACKEND, else "
                                  "auto)", choices=CHOICES)
    compile: bool = _opt(False, "torch.compile the model (under --parallel fsdp: each block)")
    parallel: str = _opt("auto", "under torchrun: 'ddp' (a replica per process), 'fsdp' (FSDP2 "
                         "shards weights, gradients and optimizer state), or 'auto' (DDP unless a "
                         "replica would take over half the GPU)", "parallel", choices=PARALLEL)
    cpu_offload: bool = _opt(False, "--parallel fsdp: keep the shards and optimizer on the CPU",
                             "parallel")
    activation_checkpointing: int = _opt(0, "recompute every k-th block in backward (0: off, "
                                         "1: every block): less memory, one more forward",
                                         "parallel")
    beta: float = _opt(0.1, "dpo: preference strength; grpo: weight of the KL penalty against the "
                       "reference (0: none)", "alignment")
    dpo_loss: str = _opt("sigmoid", "dpo: 'sigmoid' (DPO) or 'ipo'", "alignment", choices=DPO_LOSSES)
    label_smoothing: float = _opt(0.0, "dpo: assumed fraction of flipped preference labels",
                                  "alignment")
    group_size: int = _opt(4, "grpo: completions sampled per prompt (>= 2)", "alignment")
    reward: str = _opt("python", "grpo: 'python' (the completion makes the prompt valid Python), "
                       "'module:function' (fn(prompts, completions) -> floats), or a reward "
                       "checkpoint", "alignment")
    max_new_tokens: int = _opt(24, "grpo: tokens sampled per completion", "alignment")
    temperature: float = _opt(1.0, "grpo: sampling temperature", "alignment")
    clip_eps: float = _opt(0.2, "grpo: ratio clip range", "alignment")
    progress: bool = _opt(True, "progress bars")
    plot: bool = _opt(True, "loss-curve PNG at the end (when matplotlib is installed)")

    def __post_init__(self):
        if self.sft and self.stage == "pretrain":
            self.stage = "sft"
        self.validate()
        self.sft = self.stage == "sft"  # kept in checkpoints for readers that predate stages

    def validate(self, world: int = 1) -> None:
        """Every check of the options, in one place (``world``: data-parallel processes)."""
        def bad(name, what):
            return ConfigError(f"--{name.replace('_', '-')} must be {what}, got {getattr(self, name)!r}")

        at_least_one = ("steps", "batch_size", "block_size", "grad_accum", "eval_iters", "eval_every",
                        "ckpt_every", "vocab_size")
        for name in at_least_one + ("warmup", "keep_last", "seed", "activation_checkpointing"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "an integer")
            if v < (1 if name in at_least_one else 0):
                raise bad(name, "an integer >= 1" if name in at_least_one else "an integer >= 0")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                or self.group_size < 2:
            raise bad("group_size", "an integer >= 2 (advantages compare completions of a prompt)")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1 or (self.stage == "grpo"
                                               and self.max_new_tokens >= self.block_size):
            raise bad("max_new_tokens", f"an integer >= 1 (and below --block-size "
                      f"{self.block_size} for grpo: the prompt needs room)")
        for name, ok, what in (("beta", lambda v: v > 0 or (v == 0 and self.stage == "grpo"),
                                "> 0 (>= 0 for grpo)"),
                               ("label_smoothing", lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
                               ("temperature", lambda v: v > 0, "> 0"),
                               ("clip_eps", lambda v: v >= 0, ">= 0")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise bad(name, f"a finite number {what}")
        if self.dpo_loss not in DPO_LOSSES or not isinstance(self.reward, str):
            raise bad("dpo_loss" if self.dpo_loss not in DPO_LOSSES else "reward",
                      "one of " + ", ".join(DPO_LOSSES) if self.dpo_loss not in DPO_LOSSES
                      else "a string")
        if self.seed >= SEED_LIMIT:
            raise bad("seed", "below 2**63")
        for name, ok, what in (("lr", lambda v: v > 0, "> 0"), ("corpus_mb", lambda v: v > 0, "> 0"),
                               ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
                               ("weight_decay", lambda v: v >= 0, ">= 0"),
                               ("grad_clip", lambda v: v >= 0, ">= 0"),
                               ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
                               ("beta2", lambda v: 0 <= v < 1, "in [0, 1)")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise bad(name, f"a finite number {what}")
        for name, choices in (("stage", tuple(STAGES)), ("dtype", DTYPES), ("parallel", PARALLEL),
                              ("backend", (None,) + CHOICES)):
            if getattr(self, name) not in choices:
                raise bad(name, "one of " + ", ".join(str(c) for c in choices if c is not None))
        if self.sft and self.stage != "sft":
            raise ConfigError(f"--sft is --stage sft; it contradicts --stage {self.stage}")
        if self.batch_size % (self.grad_accum * world):
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --grad-accum "
                              f"({self.grad_accum}) x processes ({world})")
        if self.resume and self.init_from:
            raise ConfigError("--resume continues a run in --out; --init-from starts a new one: pick one")
        resolve_device(self.device)


def resolve_device(name: str) -> torch.device:
    """The torch.device of a --device value; ConfigError when this machine cannot train on it."""
    if not isinstance(name, str):
        raise ConfigError(f"--device must be a string such as 'cpu' or 'cuda:0', got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device: unknown device {name!r}; expected auto, cpu, cuda, cuda:N "
                          f"or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: llmkern runs on cpu, cuda or mps, not {device.type}")
    return device



def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)
