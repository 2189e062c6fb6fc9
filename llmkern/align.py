"""The preference and policy stages of ``llmkern train``: ``reward``, ``dpo`` and ``grpo``.

- ``reward``: a reward model (the GPT with a scalar head, :class:`RewardModel`) trained with the
  Bradley-Terry loss on preference pairs; it can start from a pretrained/SFT checkpoint.
- ``dpo``: direct preference optimization of the policy against a frozen reference (the model
  the run starts from), on the same pairs.
- ``grpo``: each step samples ``group_size`` completions per prompt with the batched KV-cache
  generator (each completion with its own seed, drawn with the step's prompts, so that any
  number of processes samples the same), scores them with the reward (a ``module:function``
  callable, a reward-model checkpoint, or by default ``python_reward``), and takes a clipped
  policy-gradient step with group-normalized advantages and a k3 KL penalty against the
  frozen reference.

Every log-prob goes through ``llmkern.linear_logprobs`` (LM head and log-softmax fused). The
frozen reference is written once to ``<out>/reference.safetensors`` so that a resumed run uses
the same one. Per-step metrics (accuracy, margin, reward, KL) land in the run's metrics log.
"""
from __future__ import annotations

import importlib
import math
import os
from typing import Callable, List, Optional

import torch
from torch import nn

import llmkern
from llmkern import checkpoint as ckpt_io
from llmkern.align_data import parses, prepare_pairs, prepare_prompts
from llmkern.losses import dpo_loss, group_advantages, grpo_loss, kl_k3, reward_loss
from llmkern.model import GPT, GPTConfig

REFERENCE = "reference.safetensors"


class RewardModel(GPT):
    """The GPT with a scalar head: ``model(idx, lengths=n)`` -> (B,) float32 rewards read at
    position ``n - 1`` of each row (its last token). Without ``lengths`` it is the plain GPT."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.score = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.score.weight)  # every reward starts at 0: no initial preference
        nn.init.zeros_(self.score.bias)

    def forward(self, idx, targets=None, *args, lengths: Optional[torch.Tensor] = None, **kwargs):
        if lengths is None:
            return super().forward(idx, targets, *args, **kwargs)
        h, _ = super().forward(idx, return_hidden=True)
        last = h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device) - 1]
        return self.score(last).squeeze(-1).float()


def load_reward_model(source: str, backend: Optional[str] = None, device="cpu"):
    """(RewardModel, tokenizer, meta) from a reward checkpoint, or from a GPT checkpoint (the
    scalar head then starts at zero)."""
    from safetensors.torch import load_model as load_weights

    ckpt = ckpt_io.resolve(source)
    meta = ckpt_io.read_config(ckpt)
    model = RewardModel(GPTConfig.from_dict({**meta["model"], "backend": backend}))
    file = os.path.join(ckpt, ckpt_io.WEIGHTS)
    try:
        missing, unexpected = load_weights(model, file, strict=False)
    except Exception as exc:
        raise ckpt_io.CheckpointError(f"checkpoint {file} is unreadable: {exc}") from None
    bad = [k for k in missing if not k.startswith("score.")] + list(unexpected)
    if bad:
        raise ckpt_io.CheckpointError(f"weights in {file} do not fit a reward model: {bad[:4]}")
    tok = ckpt_io.tokenizer_from_spec(meta.get("tokenizer"), ckpt)
    return model.to(device), tok, meta


def _unwrap(model) -> GPT:
    """The GPT inside DDP / torch.compile wrappers (for its LM head weight)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def token_logps(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, T) float32 log p(y) under ``model`` (0 where y is -100), through linear_logprobs."""
    h, _ = model(x, return_hidden=True)
    raw = _unwrap(model)
    return llmkern.linear_logprobs(h, raw.lm_head.weight, y, backend=raw.config.backend)


def _record(stats: dict, **values) -> None:
    """Training metrics of one micro-batch (evaluation, under no_grad, records nothing)."""
    if torch.is_grad_enabled():
        for k, v in values.items():
            stats.setdefault(k, []).append(float(v.detach() if torch.is_tensor(v) else v))


# ---- rewards ---------------------------------------------------------------------------------

def python_reward(prompts: List[str], completions: List[str]) -> List[float]:
    """1.0 when the prompt followed by the completion's first line is valid Python (the
    standard library's parser decides), else 0.0."""
    return [1.0 if parses(p + c.split("\n", 1)[0]) else 0.0 for p, c in zip(prompts, completions)]


def load_reward(spec: str, device, backend: Optional[str]) -> Callable:
    """The reward of ``--reward``: 'python', 'module:function', or a reward-model checkpoint."""
    if spec == "python":
        return python_reward
    if os.path.isdir(spec):
        model, tok, _ = load_reward_model(spec, backend, device)
        model.eval().requires_grad_(False)

        @torch.no_grad()
        def score(prompts, completions):
            block = model.config.block_size
            ids = [(tok.encode(p + c) + [tok.eos_id])[-block:] for p, c in zip(prompts, completions)]
            x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
            for i, row in enumerate(ids):
                x[i, :len(row)] = torch.tensor(row)
            n = torch.tensor([len(r) for r in ids])
            return model(x.to(device), lengths=n.to(device)).tolist()
        return score
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--reward must be 'python', 'module:function' or a reward checkpoint "
                         f"directory, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--reward {spec}: cannot load it ({type(exc).__name__}: {exc})") from None
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {name} is not callable")
    return fn


def call_reward(fn: Callable, spec: str, prompts: List[str], completions: List[str]) -> torch.Tensor:
    """Rewards (N,) float32 of the completions; a clear error for a reward that raises or
    returns the wrong number of values, NaN or inf."""
    try:
        out = fn(list(prompts), list(completions))
        values = [float(v) for v in out]
    except Exception as exc:
        raise RuntimeError(f"--reward {spec}: the reward function raised "
                           f"{type(exc).__name__}: {exc}") from exc
    if len(values) != len(completions):
        raise ValueError(f"--reward {spec}: returned {len(values)} rewards for "
                         f"{len(completions)} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"--reward {spec}: returned {values[bad[0]]} for completion {bad[0]} "
                         f"({completions[bad[0]]!r}); rewards must be finite")
    return torch.tensor(values, dtype=torch.float32)


# ---- sampling keyed by row -------------------------------------------------------------------
# A row's completion depends on its prompt, its seed and the weights alone, never on the other
# rows of the batch (``generate(seeds=...)``): so a step samples the same completions whether
# its prompts are spread over one process or many.

def row_seeds(prompt_seeds, group_size: int) -> List[int]:
    """One seed per completion: ``group_size`` of them from each prompt's seed, in 63 bits."""
    return [(int(s) * 0x9E3779B97F4A7C15 + j * 0xBF58476D1CE4E5B9 + j) & (2**63 - 1)
            for s in prompt_seeds for j in range(group_size)]


@torch.no_grad()
def sample_completions(policy: GPT, prompts: List[List[int]], max_new_tokens: int,
                       temperature: float, eos_id: Optional[int], seeds: List[int]) -> List[List[int]]:
    """The completions (new tokens, up to and including ``eos_id``) of ``prompts`` by the
    batched KV-cache generator, row r sampled with ``seeds[r]`` alone (temperature 0: greedy).
    The grpo stage samples with this (under the training loop's autocast)."""
    from llmkern.generate import generate

    if len(seeds) != len(prompts):
        raise ValueError(f"sample_completions: {len(seeds)} seeds for {len(prompts)} prompts")
    block = policy.config.block_size
    if any(len(p) + max_new_tokens > block for p in prompts):
        raise ValueError(f"sample_completions: a prompt of {max(map(len, prompts))} tokens and "
                         f"{max_new_tokens} new ones pass the context of {block} tokens")
    seqs = generate(policy, prompts, max_new_tokens, temperature=temperature, eos_id=eos_id,
                    seeds=seeds)
    return [s[len(p):] for s, p in zip(seqs, prompts)]


# ---- the frozen reference --------------------------------------------------------------------

def frozen_reference(trainer) -> GPT:
    """The model the run started from, frozen: saved to <out>/reference.safetensors by a new run,
    loaded from there by a resumed one."""
    from safetensors.torch import load_model as load_weights, save_model

    path = os.path.join(trainer.cfg.out, REFERENCE)
    ref = GPT(trainer.model_config).to(trainer.device)
    if trainer.cfg.resume:
        if not os.path.isfile(path):
            raise ckpt_io.CheckpointError(f"--resume: {path} (the frozen reference) is missing")
        load_weights(ref, path, strict=True)
    else:
        # full tensors of a sharded (FSDP) model's DTensors
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                 for k, v in trainer.raw_model.state_dict().items()}
        ref.load_state_dict(state, strict=False)
        if trainer.master:
            tmp = path + f".tmp-{os.getpid()}"
            save_model(ref, tmp)
            os.replace(tmp, path)
    return ref.eval().requires_grad_(False)


# ---- held-out measures -----------------------------------------------------------------------

@torch.no_grad()
def preference_accuracy(model, data, split: str = "val", block_size: int = 128,
                        reference: Optional[GPT] = None, beta: float = 0.1, rows: int = 32):
    """(accuracy, mean margin) over every pair of ``data``'s ``split``: a RewardModel's
    r_chosen - r_rejected, or (with ``reference``) the DPO implicit reward margin
    beta * ((pc - rc) - (pr - rr)); accuracy is the fraction of pairs with a positive margin."""
    from llmkern.align_data import PairData

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    lo, hi = data.bounds[split]
    margins = []
    for start in range(lo, hi, rows):
        index = list(range(start, min(start + rows, hi)))
        x, y = PairData.batch(data, index, block_size, device)
        b = len(index)
        if reference is None:
            pos = torch.arange(y.shape[1], device=device)
            r = model(x, lengths=torch.where(y != -100, pos, -1).max(-1).values + 1)
            margins.append(r[:b] - r[b:])
        else:
            lp = token_logps(model, x, y).sum(-1) - token_logps(reference, x, y).sum(-1)
            margins.append(beta * (lp[:b] - lp[b:]))
    model.train(was)
    m = torch.cat(margins)
    return float((m > 0).float().mean()), float(m.mean())


@torch.no_grad()
def mean_reward(model, data, tok, reward: Callable = python_reward, split: str = "val",
                prompts: int = 64, samples: int = 4, max_new_tokens: int = 24,
                temperature: float = 1.0, seed: int = 0) -> float:
    """The mean reward of ``samples`` completions of each of the first ``prompts`` prompts of a
    split (with the default reward: the fraction of completions that make valid Python)."""
    from llmkern.generate import generate

    was = model.training
    device = next(model.parameters()).device
    lo, hi = data.bounds[split]
    room = model.config.block_size - max_new_tokens
    batch = [data.prompts[i][-room:] for i in range(lo, min(hi, lo + prompts)) for _ in range(samples)]
    gen = torch.Generator(device).manual_seed(seed)
    seqs = generate(model, batch, max_new_tokens, temperature=temperature, eos_id=tok.eos_id,
                    generator=gen)
    model.train(was)
    words = [tok.decode([t for t in s[len(p):] if t != tok.eos_id]) for s, p in zip(seqs, batch)]
    return float(call_reward(reward, "mean_reward", [tok.decode(p) for p in batch], words).mean())


# ---- stages ----------------------------------------------------------------------------------

class _Impl:
    """What a stage does beyond the shared loop; the defaults are those of a plain GPT."""

    def build_model(self, config):
        return GPT(config)

    def load_model(self, source, backend):
        return ckpt_io.load_model(source, backend=backend)

    def attach(self, trainer) -> None:
        pass


class _PairsImpl(_Impl):
    def prepare(self, cfg, cache, tokenizer, build, progress):
        return prepare_pairs(cfg.data, cache, tokenizer, cfg.vocab_size, int(cfg.corpus_mb * 1e6),
                             cfg.seed)


class RewardImpl(_PairsImpl):
    def build_model(self, config):
        return RewardModel(config)

    def load_model(self, source, backend):
        return load_reward_model(source, backend)

    def attach(self, trainer) -> None:
        data = trainer.data
        data.stats = {}
        plain = type(data).batch

        def batch(index, block_size, device):
            return (*plain(data, index, block_size, device), data.stats)
        data.batch = batch

    def loss(self, model, batch):
        x, y, stats = batch
        pos = torch.arange(y.shape[1], device=y.device)
        lengths = torch.where(y != -100, pos, -1).max(-1).values + 1
        r = model(x, lengths=lengths)
        b = r.shape[0] // 2
        loss = reward_loss(r[:b], r[b:])
        _record(stats, accuracy=(r[:b] > r[b:]).float().mean(), margin=(r[:b] - r[b:]).mean())
        return loss


class DPOImpl(_PairsImpl):
    def attach(self, trainer) -> None:
        data, ref, cfg = trainer.data, frozen_reference(trainer), trainer.cfg
        data.stats = {}
        plain = type(data).batch

        def batch(index, block_size, device):
            return (*plain(data, index, block_size, device), ref, cfg, data.stats)
        data.batch = batch

    def loss(self, model, batch):
        x, y, ref, cfg, stats = batch
        with torch.no_grad():  # here, under the loop's autocast, like the policy's
            ref_logps = token_logps(ref, x, y).sum(-1)
        logps = token_logps(model, x, y).sum(-1)
        b = logps.shape[0] // 2
        loss = dpo_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], beta=cfg.beta,
                        label_smoothing=cfg.label_smoothing, loss_type=cfg.dpo_loss)
        h = (logps[:b] - ref_logps[:b]) - (logps[b:] - ref_logps[b:])
        _record(stats, accuracy=(h > 0).float().mean(), margin=(cfg.beta * h).mean(),
                chosen_logp=logps[:b].mean(), rejected_logp=logps[b:].mean())
        return loss


class GRPOImpl(_Impl):
    def prepare(self, cfg, cache, tokenizer, build, progress):
        return prepare_prompts(cfg.data, cache, tokenizer, cfg.vocab_size,
                               int(cfg.corpus_mb * 1e6), cfg.seed)

    def attach(self, trainer) -> None:
        cfg, data = trainer.cfg, trainer.data
        if getattr(trainer, "fsdp", False):
            # each process stops sampling at its own eos: sharded forwards would wait on each other
            raise ValueError("--stage grpo does not run under --parallel fsdp: its sampling "
                             "needs whole weights on each process; use --parallel ddp")
        ref = frozen_reference(trainer) if cfg.beta > 0 else None
        reward = load_reward(cfg.reward, trainer.device, cfg.backend)
        policy, tok = trainer.raw_model, trainer.tokenizer
        data.stats = {}

        def batch(index, block_size, device):
            # index: the step's draws (PromptData.sample), each a prompt and its sampling seed
            g, new = cfg.group_size, cfg.max_new_tokens
            room = block_size - new
            prompts = [data.prompts[i][-room:] for i in index["item"] for _ in range(g)]
            texts = [tok.decode(p) for p in prompts]
            was_training = policy.training
            with trainer.autocast:  # decoding in the loop's precision (bf16 on a GPU)
                completions = sample_completions(policy, prompts, new, cfg.temperature,
                                                 tok.eos_id, row_seeds(index["seed"], g))
            policy.train(was_training)
            words = [tok.decode([t for t in c if t != tok.eos_id]) for c in completions]
            rewards = call_reward(reward, cfg.reward, texts, words).to(device)
            xs, ys = [], []
            for p, c in zip(prompts, completions):
                ids = p + c
                xs.append(ids[:-1])
                ys.append([-100] * (len(p) - 1) + c)
            from llmkern.align_data import pad

            x, y = pad(xs, ys, device)
            return x, y, group_advantages(rewards, g), ref, rewards, cfg, data.stats
        data.batch_fn = batch

    def loss(self, model, batch):
        """The clipped policy loss; in evaluation (no grad) minus the mean reward of the sampled
        completions instead, so that the run's val loss tracks the held-out reward."""
        x, y, adv, ref, rewards, cfg, stats = batch
        if not torch.is_grad_enabled():
            return -rewards.mean()
        ref_logps = None
        if ref is not None:
            with torch.no_grad():  # under the loop's autocast, like the policy's
                ref_logps = token_logps(ref, x, y)
        logps = token_logps(model, x, y)
        mask = y != -100
        loss = grpo_loss(logps, adv, mask, ref_logps=ref_logps, beta=cfg.beta, clip_eps=cfg.clip_eps)
        kl = 0.0 if ref_logps is None else \
            (kl_k3(logps.detach(), ref_logps) * mask).sum() / mask.sum().clamp(min=1)
        _record(stats, reward=rewards.mean(), kl=kl, completion_tokens=mask.sum(-1).float().mean())
        return loss


IMPLS = {"reward": RewardImpl(), "dpo": DPOImpl(), "grpo": GRPOImpl()}
