"""Preference and policy losses: the Bradley-Terry reward-model loss, DPO (and IPO), and the
GRPO/PPO clipped policy loss with group-normalized advantages and a k3 KL penalty.

They take log-probabilities, never logits: per-token log-probs come from
``llmkern.linear_logprobs`` (the LM head and log-softmax fused, chunked over tokens), and
``sequence_logps`` sums them over a sequence's scored tokens. Every loss is float32 (float64
inputs stay float64) and differentiable in the policy's log-probs / rewards.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkern.ops._checks import check_finite, describe

DPO_TYPES = ("sigmoid", "ipo")
GRPO_LEVELS = ("token", "sequence")


def _float(name: str, t, op: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"llmkern.losses.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"llmkern.losses.{op}: {name} must be floating point, got {describe(t)}")
    return t if t.dtype == torch.float64 else t.float()


def _same_shape(op: str, **tensors) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.shape != first.shape:
            raise ValueError(f"llmkern.losses.{op}: {name} ({describe(t)}) must have the shape of "
                             f"{first_name} ({describe(first)})")


def sequence_logps(token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean, with ``average``) of (N, T) per-token log-probs over the tokens where
    ``mask`` is true: one log-prob per sequence, (N,)."""
    op = "sequence_logps"
    token_logps = _float("token_logps", token_logps, op)
    _same_shape(op, token_logps=token_logps, mask=mask)
    m = mask.to(token_logps.dtype)
    total = (token_logps * m).sum(-1)
    return total / m.sum(-1).clamp(min=1) if average else total


def reward_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Optional[Tensor] = None
                ) -> Tensor:
    """Bradley-Terry loss of a reward model: ``-log sigmoid(r_chosen - r_rejected - margin)``,
    averaged over pairs. The model learns P(chosen preferred) = sigmoid(r_c - r_r)."""
    op = "reward_loss"
    rc, rr = _float("chosen_rewards", chosen_rewards, op), _float("rejected_rewards", rejected_rewards, op)
    _same_shape(op, chosen_rewards=rc, rejected_rewards=rr)
    diff = rc - rr
    if margin is not None:
        diff = diff - _float("margin", margin, op)
    return -F.logsigmoid(diff).mean()


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> Tensor:
    """Direct preference optimization from sequence log-probs (N,) of the policy and of a frozen
    reference on the chosen and rejected responses, averaged over pairs.

    With ``h = (pc - rc) - (pr - rr)`` (how much more the policy prefers the chosen response
    than the reference does):

    - ``"sigmoid"`` (DPO): ``-(1 - eps) * log sigmoid(beta h) - eps * log sigmoid(-beta h)``,
      ``eps = label_smoothing`` the assumed fraction of flipped labels (conservative DPO);
    - ``"ipo"`` (IPO): ``(h - 1 / (2 beta))^2``, which keeps h finite instead of pushing it up.

    The implicit rewards are ``beta * (pc - rc)`` and ``beta * (pr - rr)``.
    """
    op = "dpo_loss"
    beta = check_finite("beta", beta, op)
    label_smoothing = check_finite("label_smoothing", label_smoothing, op)
    if beta <= 0:
        raise ValueError(f"llmkern.losses.{op}: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"llmkern.losses.{op}: label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if loss_type not in DPO_TYPES:
        raise ValueError(f"llmkern.losses.{op}: loss_type must be one of {DPO_TYPES}, got {loss_type!r}")
    pc, pr = (_float("policy_chosen_logps", policy_chosen_logps, op),
              _float("policy_rejected_logps", policy_rejected_logps, op))
    rc, rr = (_float("ref_chosen_logps", ref_chosen_logps, op),
              _float("ref_rejected_logps", ref_rejected_logps, op))
    _same_shape(op, policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                ref_rejected_logps=rr)
    h = (pc - rc) - (pr - rr)
    if loss_type == "ipo":
        return ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    z = beta * h
    return (-(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)).mean()


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO advantages: each reward minus the mean of its group (``group_size`` consecutive
    completions of one prompt), divided by the group's standard deviation (+ ``eps``) when
    ``scale``. rewards (N,) with N a multiple of group_size -> (N,)."""
    op = "group_advantages"
    r = _float("rewards", rewards, op)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"llmkern.losses.{op}: group_size must be an int >= 2 (advantages compare "
                         f"completions of one prompt), got {group_size!r}")
    if r.dim() != 1 or r.shape[0] % group_size:
        raise ValueError(f"llmkern.losses.{op}: rewards must be 1-D with a multiple of group_size "
                         f"({group_size}) entries, got {describe(r)}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"llmkern.losses.{op}: rewards hold NaN or inf: {r.tolist()}")
    g = r.view(-1, group_size)
    adv = g - g.mean(-1, keepdim=True)
    if scale:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || reference) on tokens sampled from the policy:
    ``exp(ref - logp) - (ref - logp) - 1``, never negative, unbiased, low variance."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1.0


def grpo_loss(logps: Tensor, advantages: Tensor, mask: Tensor, old_logps: Optional[Tensor] = None,
              ref_logps: Optional[Tensor] = None, beta: float = 0.04, clip_eps: float = 0.2,
              clip_eps_high: Optional[float] = None, level: str = "token") -> Tensor:
    """The GRPO (PPO-clip) policy loss on completions sampled from the old policy.

    logps (N, T): the policy's per-token log-probs of the sampled tokens; advantages (N,)
    (``group_advantages``); mask (N, T): the completion tokens that count; old_logps: those of
    the sampling policy (default: ``logps`` detached, i.e. one update per sample, ratio 1);
    ref_logps: a frozen reference's, for the penalty ``beta * kl_k3`` (skipped when None or
    ``beta == 0``). Per token ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + beta *
    KL``; ``level="token"`` averages over every counted token of the batch, ``"sequence"``
    over each sequence's tokens then over sequences.
    """
    op = "grpo_loss"
    beta = check_finite("beta", beta, op)
    clip_eps = check_finite("clip_eps", clip_eps, op)
    high = clip_eps if clip_eps_high is None else check_finite("clip_eps_high", clip_eps_high, op)
    if beta < 0 or clip_eps < 0 or high < 0:
        raise ValueError(f"llmkern.losses.{op}: beta, clip_eps and clip_eps_high must be >= 0, got "
                         f"{beta}, {clip_eps}, {high}")
    if level not in GRPO_LEVELS:
        raise ValueError(f"llmkern.losses.{op}: level must be one of {GRPO_LEVELS}, got {level!r}")
    lp = _float("logps", logps, op)
    if lp.dim() != 2:
        raise ValueError(f"llmkern.losses.{op}: logps must be (sequences, tokens), got {describe(lp)}")
    _same_shape(op, logps=lp, mask=mask, old_logps=old_logps, ref_logps=ref_logps)
    adv = _float("advantages", advantages, op)
    if adv.shape != lp.shape[:1]:
        raise ValueError(f"llmkern.losses.{op}: advantages must have shape ({lp.shape[0]},) (one per "
                         f"sequence of logps), got {describe(adv)}")
    old = lp.detach() if old_logps is None else _float("old_logps", old_logps, op)
    ratio = torch.exp(lp - old)
    a = adv.unsqueeze(-1)
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * a)
    if ref_logps is not None and beta > 0:
        per_token = per_token + beta * kl_k3(lp, _float("ref_logps", ref_logps, op))
    m = mask.to(per_token.dtype)
    if level == "token":
        return (per_token * m).sum() / m.sum().clamp(min=1)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
