"""The trainer: ``Trainer(TrainConfig(...)).train()`` (``llmkern train`` is its command line).

AdamW (fused on CUDA) with decay/no-decay groups, linear warmup then cosine decay, gradient
clipping and accumulation, bf16 autocast on GPU, periodic validation loss, atomic checkpoints
with exact resume, metrics (JSONL, CSV, PNG) and a progress bar with loss, tokens/s and MFU.
Data parallel under ``torchrun`` (NCCL on GPU, gloo on CPU): ``batch_size`` is the global
batch (sequences per optimizer step over all processes and accumulation steps), so a run
gives the same result on any number of processes; ``--parallel fsdp`` shards the model, its
gradients and optimizer state with FSDP2 and saves sharded checkpoints (``llmkern.parallel``,
``llmkern.dcp``). ``stage`` picks what is trained (``STAGES``):
``pretrain`` on text, ``sft`` on prompt/response JSONL with the loss on response tokens only,
usually from ``init_from``; ``reward``, ``dpo`` and ``grpo`` (``llmkern.align``) learn from
preferences and rewards. Ctrl-C or SIGTERM during ``train()`` finishes the step in flight,
saves a checkpoint of that step boundary and raises KeyboardInterrupt; ``resume`` continues
it exactly.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from typing import List, Optional

import numpy as np
import torch

from llmkern import checkpoint as ckpt_io
from llmkern import dcp as dcp_io
from llmkern import parallel
from llmkern.backends import backend_unavailable
from llmkern.data import DataError
from llmkern.hardware import datasheet_peak_flops
from llmkern.model import GPT, GPTConfig
from llmkern.train_config import (MODEL_FIELDS, STAGES, ConfigError, Stage, TrainConfig,  # noqa: F401
                                  lr_at, resolve_device)
from llmkern.train_log import MetricsLog

_resolve_device = resolve_device  # the name llmkern.generate imports


class Trainer:
    """Trains a GPT. ``model_overrides``: GPTConfig fields asked for explicitly (n_layer, ...);
    a resumed or initialised run checks its checkpoint's architecture against them."""

    def __init__(self, config: TrainConfig, model_overrides: Optional[dict] = None):
        self.cfg = config
        self.overrides = dict(model_overrides or {})
        unknown = sorted(set(self.overrides) - set(MODEL_FIELDS))
        if unknown:
            raise ConfigError(f"model_overrides: unknown field(s) {unknown}; expected {MODEL_FIELDS}")
        try:  # bad combinations (n_embd % n_head, ...) before any work
            GPTConfig(**self.overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc).replace("GPTConfig", "model config")) from None
        self.rank, self.world, self.local_rank = 0, 1, 0
        # distributed: several processes, or FSDP under torchrun on one (a process group of one)
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
            config.parallel == "fsdp" and "WORLD_SIZE" in os.environ)
        if self.ddp:
            self.rank = int(os.environ["RANK"])
            self.world = int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        config.validate(self.world)
        self.fsdp = False  # set once the model is built (--parallel auto looks at its size)
        self.master = self.rank == 0
        self.device = resolve_device(config.device)
        parallel.check(config, self.world, self.device)
        if config.backend not in (None, "auto", "torch"):
            reason = backend_unavailable(config.backend, self.device)
            if reason is not None:
                raise ConfigError(f"--backend {config.backend} cannot run on {self.device}: {reason}")
        self.stage = STAGES[config.stage]
        if self.ddp:
            self._init_distributed()
        self.losses: List[float] = []
        self.val_losses: dict = {}
        self._updating = False  # inside the optimizer update: a stop cannot rewind to the boundary
        self._stop = False  # a signal asked to stop at the next step boundary
        self._saved_step: Optional[int] = None
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
        if self.master:
            ckpt_io.clean_stale(cfg.out)  # debris of killed runs: temporary and half-pruned dirs
        if cfg.resume:
            resume_ckpt = self._find_resume()
            meta = ckpt_io.read_config(resume_ckpt)
            self._check_arch(meta["model"], resume_ckpt)
            saved = meta.get("train", {})
            saved_stage = saved.get("stage") or ("sft" if saved.get("sft") else "pretrain")
            if saved_stage != cfg.stage:
                raise ckpt_io.CheckpointError(f"{resume_ckpt!r} was trained with --stage {saved_stage}; "
                                              f"resume it with the same stage")
            state = ckpt_io.load_state(resume_ckpt)
        elif self.master and ckpt_io.list_checkpoints(cfg.out):
            raise ckpt_io.CheckpointError(f"{cfg.out!r} already holds checkpoints; pass --resume to "
                                          f"continue that run, or choose another --out")
        if cfg.data is not None and not os.path.exists(cfg.data):
            raise DataError(f"data path {cfg.data!r} does not exist")
        source = resume_ckpt or cfg.init_from
        tokenizer = cfg.tokenizer
        if source:
            init_model, tokenizer = self._load_source(source)
        if self.master:
            os.makedirs(cfg.out, exist_ok=True)
        cache = os.path.join(cfg.out, "data")
        if self.master:
            self.data, self.tokenizer = self.stage.prepare(cfg, cache, tokenizer, True, cfg.progress)
        self._barrier()
        if not self.master:
            self.data, self.tokenizer = self.stage.prepare(cfg, cache, tokenizer, False, False)
        self.data.check_block_size(cfg.block_size)

        if init_model is None:
            self.model_config = GPTConfig(vocab_size=self.tokenizer.vocab_size,
                                          block_size=cfg.block_size, backend=cfg.backend,
                                          **self.overrides)
            torch.manual_seed(cfg.seed)
            model = self.stage.build_model(self.model_config)
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
        amp = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        if cfg.activation_checkpointing:
            parallel.set_activation_checkpointing(model, cfg.activation_checkpointing)
        self.parallel = parallel.choose(cfg.parallel, model, self.device, self.world)
        self.fsdp = self.ddp and self.parallel == "fsdp"
        if self.fsdp:  # before the optimizer: it holds the sharded parameters
            parallel.apply_fsdp(model, self.device, self.world, bf16=amp,
                                cpu_offload=cfg.cpu_offload, compile_blocks=cfg.compile)
        self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.lr,
                                                         (cfg.beta1, cfg.beta2), self.device.type)
        self.step = 0
        self.rng = np.random.default_rng(cfg.seed)
        # a frozen reference, a sampler: on the raw model, before the restored RNG state (building
        # them draws random numbers)
        self.stage.attach(self)
        if state is not None:
            self._restore(state, resume_ckpt)
        if cfg.compile and not self.fsdp:
            self.model = torch.compile(self.model)
        if self.ddp and not self.fsdp:
            self.model = parallel.wrap_ddp(self.model, self.device)
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
        wanted = {k: v for k, v in self.overrides.items() if k != "dropout"}
        diff = ckpt_io.config_mismatch(saved, wanted)
        if diff:
            raise ckpt_io.CheckpointError(f"checkpoint {where!r} is from another model config: "
                                          + "; ".join(diff))

    def _load_source(self, source: str):
        """(model, tokenizer) of a checkpoint, or of a Hugging Face GPT-2 directory."""
        model, tok, meta = self.stage.load_model(source, self.cfg.backend)
        self._check_arch(meta["model"], source)
        return model, tok

    # ---- state for exact resume ----------------------------------------------------------

    def _rng_state(self) -> dict:
        return {"data_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def _set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["data_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def _state(self) -> dict:
        """Plain data and tensors only: checkpoints load with torch.load(weights_only=True)."""
        optimizer = None if self.fsdp else self.optimizer.state_dict()  # FSDP: in the shards
        return {"step": self.step, "optimizer": optimizer, **self._rng_state(),
                "losses": list(self.losses), "val_losses": dict(self.val_losses), "world": self.world}

    def _restore(self, state: dict, where: str) -> None:
        optimizer = dcp_io.optimizer_state(state)
        if optimizer is None:  # a sharded checkpoint: weights and optimizer from its shards
            dcp_io.load_train_state(where, self.raw_model, self.optimizer)
        try:
            if optimizer is not None and self.fsdp:  # a consolidated one: each process its part
                parallel.load_full_optimizer_state(self.raw_model, self.optimizer, optimizer)
            elif optimizer is not None:
                self.optimizer.load_state_dict(optimizer)
            self._set_rng_state(state)
            self.step = int(state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ckpt_io.CheckpointError(f"{os.path.join(where, ckpt_io.STATE)} does not hold this "
                                          f"run's trainer state ({type(exc).__name__}: {exc})") from None
        self.losses = list(state.get("losses", []))
        self.val_losses = dict(state.get("val_losses", {}))
        if self.step >= self.cfg.steps:
            raise ConfigError(f"the checkpoint is at step {self.step}; pass --steps > {self.step} to "
                              f"train further")

    def save(self) -> Optional[str]:
        """The checkpoint of this step (FSDP: sharded, every process takes part)."""
        if not (self.master or self.fsdp):
            return None
        meta = {"llmkern": 1, "model": self.model_config.to_dict(), "train": asdict(self.cfg),
                "tokenizer": self.tokenizer.spec()}
        if self.fsdp:
            state = {k: v for k, v in self._state().items() if k != "optimizer"}
            path = dcp_io.save(self.cfg.out, self.step, self.raw_model, self.optimizer, meta, state,
                               self.tokenizer, self.cfg.keep_last)
            self._saved_step = self.step
            return path if self.master else None
        path = ckpt_io.save(self.cfg.out, self.step, self.raw_model, meta, self._state(),
                            self.tokenizer, self.cfg.keep_last)
        self._saved_step = self.step
        return path

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
            batch = self.data.batch(rows, cfg.block_size, self.device)
            with self.autocast:
                loss = self.stage.loss(self.raw_model, batch)
            total += loss.float()
        self.model.train()
        return self._all_mean(total / cfg.eval_iters)

    def train_step(self) -> float:
        """One optimizer step; appends its loss to ``losses``. Interrupted before the update, it
        leaves the trainer at the step boundary it started from (RNG states included)."""
        cfg = self.cfg
        boundary = self._rng_state()
        try:
            index = self.data.sample(self.rng, cfg.batch_size, "train", cfg.block_size)
            total = torch.zeros((), device=self.device)
            for i, rows in enumerate(self._my_rows(index, cfg.grad_accum)):
                batch = self.data.batch(rows, cfg.block_size, self.device)
                last = i == cfg.grad_accum - 1
                if self.fsdp:  # reduce-scatter gradients on the last micro-batch only
                    self.model.set_requires_gradient_sync(last)
                sync = self.model.no_sync() if self.ddp and not last and not self.fsdp \
                    else nullcontext()
                with sync, self.autocast:
                    loss = self.stage.loss(self.model, batch)
                    (loss / cfg.grad_accum).backward()
                total += loss.detach().float()
            loss = self._all_mean(total / cfg.grad_accum)
        except BaseException:
            self._set_rng_state(boundary)
            self.optimizer.zero_grad(set_to_none=True)
            raise
        self._updating = True
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = (torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
                if cfg.grad_clip > 0 else None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(loss)
        self.last_lr, self.last_norm = lr, parallel.full_value(norm)
        self._updating = False
        return loss

    @contextmanager
    def _signals_stop_at_step_end(self):
        """SIGINT/SIGTERM only ask to stop: the step in flight finishes first, so the saved
        state is that of a step boundary. A second signal interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)

    def _stop_requested(self) -> bool:
        """Whether any process was asked to stop (all processes stop at the same step)."""
        if not self.ddp:
            return self._stop
        import torch.distributed as dist

        flag = torch.tensor([float(self._stop)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train(self, stop_after: Optional[int] = None) -> List[float]:
        """Train to ``cfg.steps`` (or stop after step ``stop_after``); return all step losses."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        self.model.train()
        self._stop = False
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.master and cfg.progress), dynamic_ncols=True)
        start_step = self.step
        try:
            with self._signals_stop_at_step_end():
                if self.step == 0 and not cfg.resume:
                    self._record_val()
                self._loop(end, bar)
        except KeyboardInterrupt:
            if (self.master or self.fsdp) and not self._updating and self.step > start_step \
                    and self._saved_step != self.step:
                path = self.save()  # FSDP: every process stopped at this step and saves
                if self.master:
                    bar.write(f"interrupted at step {self.step}; saved {path} (continue with "
                              f"--resume)")
            raise
        finally:
            bar.close()
        if self.master and cfg.plot:
            self.log.plot()
        return self.losses

    def _loop(self, end: int, bar) -> None:
        cfg = self.cfg
        t0 = last_t = time.perf_counter()
        dt_avg = None
        while self.step < end:
            if self._stop_requested():
                raise KeyboardInterrupt
            loss = self.train_step()
            now = time.perf_counter()
            dt = max(now - last_t, 1e-9)
            dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt  # a steadier readout
            tps = self.tokens_per_step / dt_avg
            mfu = self.raw_model.estimate_mfu(tps / self.world, self.peak, cfg.block_size)
            if self.master:
                self.log.log(step=self.step, loss=loss, lr=self.last_lr, grad_norm=self.last_norm,
                             tokens_per_s=tps, mfu=mfu, elapsed_s=now - t0, **self._stage_metrics())
                bar.update(1)
                bar.set_postfix_str(f"loss {loss:.3f} | {tps:,.0f} tok/s"
                                    + (f" | MFU {mfu:.1%}" if mfu is not None else ""))
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                val = self._record_val()
                if self.master:
                    bar.write(f"step {self.step}: train loss {loss:.4f}, val loss {val:.4f}")
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
            last_t = time.perf_counter()  # evaluation and saving do not count against tokens/s

    def _stage_metrics(self) -> dict:
        """The stage's own metrics of the last step (accuracy, margin, reward, KL), averaged
        over its micro-batches; empty for stages that record none."""
        stats = getattr(self.data, "stats", None)
        if not stats:
            return {}
        out = {k: sum(v) / len(v) for k, v in stats.items() if v}
        stats.clear()
        return out

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
