"""The trainer: ``Trainer(TrainConfig(...)).train()`` or ``llmkern train [flags]``.

AdamW (fused on CUDA) with decay/no-decay groups, linear warmup then cosine decay, gradient
clipping and accumulation, bf16 autocast on GPU, periodic validation loss, atomic checkpoints
with exact resume, metrics (JSONL, CSV, PNG) and a progress bar with loss, tokens/s and MFU.
Data parallel under ``torchrun`` (NCCL on GPU, gloo on CPU): ``batch_size`` is the global
batch (sequences per optimizer step over all processes and accumulation steps), so a run
gives the same result on any number of processes. ``sft=True`` trains on prompt/response
JSONL with the loss on response tokens only, usually from ``init_from``.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import List, Optional

import numpy as np
import torch

from llmkern import checkpoint as ckpt_io
from llmkern.data import DEFAULT_CORPUS_BYTES, prepare
from llmkern.hardware import datasheet_peak_flops
from llmkern.model import GPT, GPTConfig
from llmkern.train_log import MetricsLog

MODEL_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "dropout", "bias")


class ConfigError(ValueError):
    """A bad training option (user error)."""


@dataclass
class TrainConfig:
    data: Optional[str] = None  # None: the embedded default corpus (stdlib sources)
    out: str = "runs/llmkern"
    steps: int = 300
    batch_size: int = 16  # global: sequences per optimizer step
    block_size: int = 128
    grad_accum: int = 1
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_iters: int = 8
    ckpt_every: int = 100
    keep_last: int = 2
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    backend: Optional[str] = None
    compile: bool = False
    sft: bool = False
    init_from: Optional[str] = None
    resume: bool = False
    tokenizer: str = "byte"  # 'byte' | 'bpe' | a tokenizer directory
    vocab_size: int = 4096  # for 'bpe'
    corpus_bytes: int = DEFAULT_CORPUS_BYTES
    progress: bool = True
    plot: bool = True  # loss-curve PNG at the end of train() (needs matplotlib)

    def validate(self, world: int = 1) -> None:
        for name in ("steps", "batch_size", "block_size", "grad_accum", "eval_iters", "eval_every",
                     "ckpt_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        for name in ("warmup", "keep_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("grad_clip and weight_decay must be >= 0")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.batch_size % (self.grad_accum * world):
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --grad-accum "
                              f"({self.grad_accum}) x processes ({world})")
        if self.resume and self.init_from:
            raise ConfigError("--resume continues a run in --out; --init-from starts a new one: pick one")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


class Trainer:
    """Trains a GPT. ``model_overrides``: GPTConfig fields asked for explicitly (n_layer, ...);
    a resumed or initialised run checks its checkpoint's architecture against them."""

    def __init__(self, config: TrainConfig, model_overrides: Optional[dict] = None):
        self.cfg = config
        self.overrides = dict(model_overrides or {})
        self.rank, self.world, self.local_rank = 0, 1, 0
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.ddp:
            self.rank = int(os.environ["RANK"])
            self.world = int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        config.validate(self.world)
        self.master = self.rank == 0
        self.device = _resolve_device(config.device)
        if self.ddp:
            self._init_distributed()
        self.losses: List[float] = []
        self.val_losses: dict = {}
        self._setup()

    # ---- setup ---------------------------------------------------------------------------

    def _init_distributed(self) -> None:
        import torch.distributed as dist

        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def _barrier(self) -> None:
        if self.ddp:
            import torch.distributed as dist

            dist.barrier()

    def _setup(self) -> None:
        cfg = self.cfg
        resume_ckpt = state = init_model = None
        if cfg.resume:
            resume_ckpt = self._find_resume()
            meta = ckpt_io.read_config(resume_ckpt)
            self._check_arch(meta["model"], resume_ckpt)
            if meta.get("train", {}).get("sft", False) != cfg.sft:
                raise ckpt_io.CheckpointError(f"{resume_ckpt!r} was trained with sft="
                                              f"{meta['train'].get('sft')}; resume with the same --sft")
            state = ckpt_io.load_state(resume_ckpt)
        elif self.master and ckpt_io.list_checkpoints(cfg.out):
            raise ckpt_io.CheckpointError(f"{cfg.out!r} already holds checkpoints; pass --resume to "
                                          f"continue that run, or choose another --out")
        source = resume_ckpt or cfg.init_from
        tokenizer = cfg.tokenizer
        if source:
            init_model, tokenizer = self._load_source(source)
        if self.master:
            os.makedirs(cfg.out, exist_ok=True)
        cache = os.path.join(cfg.out, "data")
        if self.master:
            self.data, self.tokenizer = prepare(cfg.data, cache, tokenizer, cfg.sft, cfg.vocab_size,
                                                cfg.corpus_bytes, build=True, progress=cfg.progress)
        self._barrier()
        if not self.master:
            self.data, self.tokenizer = prepare(cfg.data, cache, tokenizer, cfg.sft, cfg.vocab_size,
                                                cfg.corpus_bytes, build=False, progress=False)
        self.data.check_block_size(cfg.block_size)

        if init_model is None:
            mc = {k: v for k, v in self.overrides.items() if k in MODEL_FIELDS}
            self.model_config = GPTConfig(vocab_size=self.tokenizer.vocab_size,
                                          block_size=cfg.block_size, backend=cfg.backend, **mc)
            torch.manual_seed(cfg.seed)
            model = GPT(self.model_config)
        else:
            model = init_model
            self.model_config = model.config
            if "dropout" in self.overrides:  # not part of the weights: may change on a new run
                model.set_dropout(self.overrides["dropout"])
        if cfg.block_size > self.model_config.block_size:
            raise ConfigError(f"--block-size {cfg.block_size} is over the model's context of "
                              f"{self.model_config.block_size} tokens")
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise ckpt_io.CheckpointError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, the "
                                          f"model only {self.model_config.vocab_size}")
        self.model = model.to(self.device)
        self.raw_model = self.model
        self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.lr,
                                                         (cfg.beta1, cfg.beta2), self.device.type)
        self.step = 0
        self.rng = np.random.default_rng(cfg.seed)
        if state is not None:
            self._restore(state)
        if cfg.compile:
            self.model = torch.compile(self.model)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=ids)
        amp = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if amp else nullcontext())
        self.amp = amp
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.micro = cfg.batch_size // (cfg.grad_accum * self.world)
        self.tokens_per_step = cfg.batch_size * cfg.block_size
        # MFU only against a datasheet peak (known GPU, bf16): none on a CPU or in fp32
        self.peak = datasheet_peak_flops(self.device, torch.bfloat16 if amp else torch.float32)
        self.log = MetricsLog(cfg.out, self.step if cfg.resume else None) if self.master else None

    def _find_resume(self) -> str:
        try:
            return ckpt_io.resolve(self.cfg.out)
        except ckpt_io.CheckpointError:
            raise ckpt_io.CheckpointError(f"--resume: no checkpoint in {self.cfg.out!r} to resume "
                                          f"from") from None

    def _check_arch(self, saved: dict, where: str) -> None:
        wanted = {k: v for k, v in self.overrides.items() if k in MODEL_FIELDS and k != "dropout"}
        diff = ckpt_io.config_mismatch(saved, wanted)
        if diff:
            raise ckpt_io.CheckpointError(f"checkpoint {where!r} is from another model config: "
                                          + "; ".join(diff))

    def _load_source(self, source: str):
        """(model, tokenizer) of a checkpoint, or of a Hugging Face GPT-2 directory."""
        model, tok, meta = ckpt_io.load_model(source, backend=self.cfg.backend)
        self._check_arch(meta["model"], source)
        return model, tok

    # ---- state for exact resume ----------------------------------------------------------

    def _state(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "data_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "losses": self.losses, "val_losses": self.val_losses, "world": self.world}

    def _restore(self, state: dict) -> None:
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["data_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.losses = list(state.get("losses", []))
        self.val_losses = dict(state.get("val_losses", {}))
        if self.step >= self.cfg.steps:
            raise ConfigError(f"the checkpoint is at step {self.step}; pass --steps > {self.step} to "
                              f"train further")

    def save(self) -> Optional[str]:
        if not self.master:
            return None
        meta = {"llmkern": 1, "model": self.model_config.to_dict(), "train": asdict(self.cfg),
                "tokenizer": self.tokenizer.spec()}
        return ckpt_io.save(self.cfg.out, self.step, self.raw_model, meta, self._state(),
                            self.tokenizer, self.cfg.keep_last)

    # ---- the loop ------------------------------------------------------------------------

    def _my_rows(self, index: np.ndarray, groups: int) -> np.ndarray:
        """This process's rows of a global draw, (groups, micro): every process draws the same
        global indices, so the global batch does not depend on the number of processes."""
        return index.reshape(groups, self.world, -1)[:, self.rank]

    def _all_mean(self, value: torch.Tensor) -> float:
        if self.ddp:
            import torch.distributed as dist

            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.world
        return float(value)

    @torch.no_grad()
    def evaluate(self) -> float:
        cfg = self.cfg
        self.model.eval()
        rng = np.random.default_rng(cfg.seed + 1)  # the same validation batches every time
        index = self.data.sample(rng, cfg.eval_iters * self.world * self.micro, "val", cfg.block_size)
        total = torch.zeros((), device=self.device)
        for rows in self._my_rows(index, cfg.eval_iters):
            x, y = self.data.batch(rows, cfg.block_size, self.device)
            with self.autocast:
                _, loss = self.raw_model(x, y)
            total += loss.float()
        self.model.train()
        return self._all_mean(total / cfg.eval_iters)

    def train_step(self) -> float:
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        index = self.data.sample(self.rng, cfg.batch_size, "train", cfg.block_size)
        total = torch.zeros((), device=self.device)
        for i, rows in enumerate(self._my_rows(index, cfg.grad_accum)):
            x, y = self.data.batch(rows, cfg.block_size, self.device)
            last = i == cfg.grad_accum - 1
            sync = self.model.no_sync() if self.ddp and not last else nullcontext()
            with sync, self.autocast:
                _, loss = self.model(x, y)
                (loss / cfg.grad_accum).backward()
            total += loss.detach().float()
        norm = (torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
                if cfg.grad_clip > 0 else None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.last_lr, self.last_norm = lr, (float(norm) if norm is not None else None)
        return self._all_mean(total / cfg.grad_accum)

    def train(self, stop_after: Optional[int] = None) -> List[float]:
        """Train to ``cfg.steps`` (or stop after step ``stop_after``); return all step losses."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        self.model.train()
        if self.step == 0 and not cfg.resume:
            self._record_val()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.master and cfg.progress), dynamic_ncols=True)
        t0, start_step, saved = time.perf_counter(), self.step, None
        last_t, dt_avg = t0, None
        try:
            while self.step < end:
                loss = self.train_step()
                self.losses.append(loss)
                saved = None
                now = time.perf_counter()
                dt = max(now - last_t, 1e-9)
                dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt  # a steadier readout
                tps = self.tokens_per_step / dt_avg
                mfu = self.raw_model.estimate_mfu(tps / self.world, self.peak, cfg.block_size)
                if self.master:
                    self.log.log(step=self.step, loss=loss, lr=self.last_lr, grad_norm=self.last_norm,
                                 tokens_per_s=tps, mfu=mfu, elapsed_s=now - t0)
                    bar.update(1)
                    bar.set_postfix_str(f"loss {loss:.3f} | {tps:,.0f} tok/s"
                                        + (f" | MFU {mfu:.1%}" if mfu is not None else ""))
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    val = self._record_val()
                    if self.master:
                        bar.write(f"step {self.step}: train loss {loss:.4f}, val loss {val:.4f}")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    saved = self.save()
                last_t = time.perf_counter()  # evaluation and saving do not count against tokens/s
        except KeyboardInterrupt:
            if self.master and self.step > start_step and saved is None:
                saved = self.save()
                bar.write(f"interrupted at step {self.step}; saved {saved} (continue with --resume)")
            bar.close()
            raise
        bar.close()
        if self.master and cfg.plot:
            self.log.plot()
        return self.losses

    def _record_val(self) -> float:
        val = self.evaluate()
        self.val_losses[self.step] = val
        if self.master:
            self.log.log(step=self.step, val_loss=val)
        return val

    def close(self) -> None:
        if self.ddp:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def main(argv=None) -> int:
    from llmkern.train_cli import main as cli_main

    return cli_main(argv)

