"""The Llama-family parts of ``llmkern.integrations.transformers.patch``: gated MLPs, rotary
embeddings, the fused LM-head loss, and the report of what was swapped and what was left.

Needs ``transformers`` only for the model output class of the fused-loss forward.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import llmkern
from llmkern.ops.gated_mlp import activate
from llmkern.ops.lm_head_loss import lm_head_loss

# model_type values whose modeling code patch() knows part by part.
FAMILY = ("llama", "mistral", "qwen2", "gemma2")
KNOWN = ("gpt2",) + FAMILY


@dataclasses.dataclass
class PatchReport:
    """What ``patch()`` swapped (part -> count) and what it left, with the reason."""
    model_type: str
    swapped: dict
    left: dict

    def __str__(self) -> str:
        lines = [f"llmkern patch of a {self.model_type!r} model:"]
        lines += [f"  swapped {part}: {n}" for part, n in self.swapped.items() if n]
        lines += [f"  left {part}: {why}" for part, why in self.left.items()]
        return "\n".join(lines)


def unknown_message(model_type: str, swapped: dict) -> str:
    done = ", ".join(f"{k} ({v})" for k, v in swapped.items() if v) or "nothing"
    return (f"llmkern patch(): model_type {model_type!r} is not an architecture patch() knows "
            f"(known: {', '.join(KNOWN)}); only the parts recognised on their own were swapped: "
            f"{done}. Rotary embeddings and the LM-head loss are left as they are.")


# ---- gated MLPs ----------------------------------------------------------------------------

def _activation_name(act: Callable, like: torch.Tensor) -> Optional[str]:
    """Which llmkern gate activation ``act`` computes, found on a probe, or None."""
    g = torch.Generator(device="cpu").manual_seed(4321)
    x = (3 * torch.randn(256, generator=g)).to(device=like.device, dtype=like.dtype)
    tol = 1e-5 if like.dtype in (torch.float32, torch.float64) else 2e-2
    with torch.no_grad():
        y = act(x).float()
        for name in ("silu", "gelu_tanh", "gelu"):
            if torch.allclose(y, activate(x, name).float(), rtol=tol, atol=tol):
                return name
    return None


def gated_mlp_replacement(mod: nn.Module, backend, left: dict) -> Optional[nn.Module]:
    """An ``llmkern.nn.SwiGLUMLP`` sharing the ``gate_proj``/``up_proj``/``down_proj`` Linear
    modules of an HF gated MLP (Llama, Mistral, Qwen2, Gemma), or None. Why a module that looks
    like one is kept goes into ``left``."""
    gate, up, down = (getattr(mod, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if isinstance(mod, llmkern.nn.SwiGLUMLP) or \
            not all(isinstance(m, nn.Linear) for m in (gate, up, down)):
        return None
    name = type(mod).__name__
    act = getattr(mod, "act_fn", None)
    extra = set(dict(mod.named_children())) - {"gate_proj", "up_proj", "down_proj", "act_fn"}
    if extra or not callable(act):
        left[name] = "modules beyond gate_proj/up_proj/down_proj/act_fn"
        return None
    if any(m.bias is not None for m in (gate, up, down)):
        left[name] = "biases in the projections (llmkern.gated_mlp has none)"
        return None
    if gate.weight.shape != up.weight.shape or down.in_features != gate.out_features or \
            len({m.weight.dtype for m in (gate, up, down)}) != 1 or gate.weight.device.type == "meta":
        left[name] = "projection shapes or dtypes that do not fit one gated MLP"
        return None
    activation = _activation_name(act, gate.weight)
    if activation is None:
        left[name] = f"gate activation {type(act).__name__} (llmkern has silu, gelu_tanh, gelu)"
        return None
    new = llmkern.nn.SwiGLUMLP(gate.in_features, gate.out_features, activation, device="meta",
                               backend=backend)
    new.gate_proj, new.up_proj, new.down_proj = gate, up, down  # shared: same state_dict keys
    return new


# ---- rotary embeddings ---------------------------------------------------------------------

_ORIGINAL_ROTARY: dict = {}


def _llmkern_rotary(original: Callable, backend) -> Callable:
    """HF's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` over ``llmkern.rotary``:
    cos/sin (B, S, D) hold each angle twice (``cat(freqs, freqs)``), so the first halves are the
    angles. Calls of any other shape go to the original function."""
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", 1)
        if len(args) == 1 and isinstance(args[0], int) and not kwargs:
            unsqueeze_dim = args[0]
        elif args or set(kwargs) - {"unsqueeze_dim"}:  # another signature (position_ids, ...)
            return original(q, k, cos, sin, *args, **kwargs)
        d = q.shape[-1]
        if (unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3
                or cos.shape != sin.shape or cos.shape[-1] != d or d % 2 or k.shape[-1] != d
                or cos.shape[-2] != q.shape[-2] or k.shape[-2] != q.shape[-2] or q.dtype != k.dtype):
            return original(q, k, cos, sin, *args, **kwargs)
        return llmkern.rotary(q, k, cos[..., : d // 2], sin[..., : d // 2], backend=backend)

    return apply_rotary_pos_emb


def _rotary_layout_reason(base: nn.Module) -> Optional[str]:
    """Why the model's rotary embedding is not HF's duplicated-halves layout, or None."""
    emb = getattr(base, "rotary_emb", None)
    p = next(base.parameters(), None)
    if emb is None or p is None:
        return "no rotary_emb module on the base model"
    pos = torch.arange(5, device=p.device)[None]
    try:
        with torch.no_grad():
            cos, sin = emb(torch.zeros(1, device=p.device, dtype=p.dtype), pos)
    except Exception as exc:  # an interface patch() does not know
        return f"rotary_emb could not be probed ({type(exc).__name__}: {exc})"
    half = cos.shape[-1] // 2
    if cos.shape[-1] % 2 or not (torch.equal(cos[..., :half], cos[..., half:])
                                 and torch.equal(sin[..., :half], sin[..., half:])):
        return "cos/sin are not two copies of the angles (cat(freqs, freqs))"
    return None


def patch_rotary(model: nn.Module, base: nn.Module, backend) -> Optional[str]:
    """Point the modeling module's ``apply_rotary_pos_emb`` at llmkern.rotary; returns why it
    was left, or None. Module-wide (every model of this architecture in the process), as the
    attention code looks the function up there; :func:`restore_rotary` undoes it."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        return f"{type(model).__module__} has no apply_rotary_pos_emb"
    reason = _rotary_layout_reason(base)
    if reason:
        return reason
    original = fn.__wrapped__ if getattr(fn, "_llmkern", False) else fn
    _ORIGINAL_ROTARY.setdefault(module.__name__, original)
    new = _llmkern_rotary(original, backend)
    new._llmkern = True
    module.apply_rotary_pos_emb = new
    return None


def restore_rotary() -> None:
    """Give every modeling module patched by :func:`patch_rotary` its own function back."""
    for name, fn in _ORIGINAL_ROTARY.items():
        sys.modules[name].apply_rotary_pos_emb = fn
    _ORIGINAL_ROTARY.clear()


# ---- fused LM-head loss --------------------------------------------------------------------

def causal_lm_loss(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: Optional[torch.Tensor],
                   shift_labels: Optional[torch.Tensor] = None, ignore_index: int = -100,
                   num_items_in_batch=None, backend=None,
                   bias: Optional[torch.Tensor] = None,
                   softcap: Optional[float] = None) -> torch.Tensor:
    """Hugging Face's causal-LM loss (``ForCausalLMLoss``) through ``linear_cross_entropy``:
    token t predicts label t + 1 (or ``shift_labels[t]``), ``ignore_index`` rows skipped, the
    mean over valid tokens, or the sum divided by ``num_items_in_batch`` when it is given
    (gradient accumulation). The logits are never all formed, with an LM-head ``bias`` or a
    final-logit ``softcap`` (Gemma2) either."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    reduction = "mean" if num_items_in_batch is None else "sum"
    if bias is None and softcap is None:
        loss = llmkern.linear_cross_entropy(hidden2d, lm_weight, target, ignore_index=ignore_index,
                                            reduction=reduction, backend=backend)
    else:
        loss = lm_head_loss(hidden2d, lm_weight, target, bias, ignore_index, reduction,
                            softcap=softcap, backend=backend)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


def _fused_forward(original: Callable, backend) -> Callable:
    """A ``*ForCausalLM.forward`` that, given labels, computes the loss from the final hidden
    states with the fused loss; logits only when ``skip_logits`` is False (default: not while
    training). Without labels it is the model's own forward."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    signature = inspect.signature(original)
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}

    @functools.wraps(original)
    def forward(self, *args, skip_logits: Optional[bool] = None, **kwargs):
        if args:
            bound = signature.bind_partial(self, *args).arguments
            bound.pop("self", None)
            kwargs = {**bound.pop("kwargs", {}), **bound, **kwargs}
        if kwargs.get("labels") is None and kwargs.get("shift_labels") is None:
            kwargs.pop("labels", None)
            return original(self, **kwargs)
        labels = kwargs.pop("labels", None)
        return_dict = kwargs.pop("return_dict", None)
        logits_to_keep = kwargs.pop("logits_to_keep", 0)
        loss_args = {k: kwargs.pop(k) for k in ("shift_labels", "ignore_index", "num_items_in_batch")
                     if k in kwargs}
        outputs = getattr(self, self.base_model_prefix)(**kwargs)
        hidden = outputs[0]
        softcap = getattr(self.config, "final_logit_softcapping", None) or None
        loss = causal_lm_loss(hidden, self.lm_head.weight, labels, backend=backend,
                              bias=self.lm_head.bias, softcap=softcap, **loss_args)
        if skip_logits is None:
            skip_logits = self.training
        logits = None
        if not skip_logits:
            logits = self.lm_head(_keep(hidden, logits_to_keep))
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
        rest = {k: v for k, v in outputs.items() if k in fields and k != "logits"}
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **rest)
        return out.to_tuple() if return_dict is False else out

    forward._llmkern = True
    return forward


def patch_loss(model: nn.Module, backend) -> Optional[str]:
    """Give ``model`` (an instance) the fused-loss forward; returns why it was left, or None."""
    lm_head = getattr(model, "lm_head", None)
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(lm_head, nn.Linear) or base is None:
        return "no nn.Linear lm_head over a base model"
    model.forward = types.MethodType(_fused_forward(type(model).forward, backend), model)
    return None
