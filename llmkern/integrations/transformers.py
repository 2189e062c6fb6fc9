"""Hugging Face transformers integration: ``attn_implementation="llmkern"`` and ``patch(model)``.

Importing this module registers the attention function (and its mask function) under the name
``"llmkern"`` with transformers' ``AttentionInterface`` / ``AttentionMaskInterface``; ``register()``
does the same explicitly and is idempotent. Then::

    import llmkern.integrations.transformers as lkt
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="llmkern")
    # or, on a loaded model:
    model.set_attn_implementation("llmkern")
    lkt.patch(model)          # also swaps norms and the GPT-2 MLP for llmkern modules

Masks: ``"llmkern"`` builds its masks exactly as ``"sdpa"`` does (transformers' ``sdpa_mask``):
no mask at all when the pattern is purely causal (the kernel then runs ``causal=True`` and skips
the masked tiles), a boolean (B, 1, Sq, Sk) mask otherwise (padding, sliding window, packed
sequences found from ``position_ids``, custom overlays), which the kernel reads tile by tile.
Registering a mask function matters: transformers drops the mask (returns None) for any
attention name it has no mask function for, which would silently lose padding and windows.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import llmkern
from llmkern.reference import restrict_to_window

NAME = "llmkern"

try:  # transformers is an optional dependency of llmkern
    import transformers  # noqa: F401
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError as exc:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None


def _resolve_causal(module, is_causal) -> bool:
    if is_causal is not None:
        return bool(is_causal)
    return bool(getattr(module, "is_causal", True))


def _window(sliding_window: Optional[int], causal: bool):
    """transformers' ``sliding_window`` as llmkern ``window=(left, right)``.

    transformers' masks keep, causally, the keys ``q - sliding_window < kv <= q`` (the query and
    the ``sliding_window - 1`` before it: ``sliding_window_overlay``) and, bidirectionally,
    ``|q - kv| <= sliding_window`` (``sliding_window_bidirectional_overlay``).
    """
    if sliding_window is None:
        return None
    sliding_window = int(sliding_window)
    return (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)


def _pad_head_dims(query, key, value):
    """q/k and v with different head dims (e.g. MLA): zero-pad to a common one (scores and
    outputs unchanged) and return the v head dim to crop the output back to."""
    dqk, dv = query.shape[-1], value.shape[-1]
    if dqk == dv:
        return query, key, value, None
    d = max(dqk, dv)
    query, key = (F.pad(t, (0, d - dqk)) for t in (query, key))
    value = F.pad(value, (0, d - dv))
    return query, key, value, dv


def _packed_mask(cu_q, cu_k, total_q: int, total_k: int, causal: bool, window):
    """Boolean (total_q, total_k) mask of packed sequences: block-diagonal, each block aligned
    bottom-right as varlen attention is (rows past cu[-1] see nothing)."""
    device = cu_q.device
    cu_q, cu_k = cu_q.long(), cu_k.long()
    nseq = cu_q.shape[0] - 1
    iq, ik = torch.arange(total_q, device=device), torch.arange(total_k, device=device)
    seq_q = torch.searchsorted(cu_q[1:], iq, right=True).clamp(max=nseq - 1)
    seq_k = torch.searchsorted(cu_k[1:], ik, right=True).clamp(max=nseq - 1)
    shift = (cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])
    diag = (ik - cu_k[seq_k]).view(1, -1) - ((iq - cu_q[seq_q]) + shift[seq_q]).view(-1, 1)
    allowed = (seq_q.view(-1, 1) == seq_k.view(1, -1)) & (iq < cu_q[-1]).view(-1, 1)
    allowed = allowed & (ik < cu_k[-1]).view(1, -1)
    return restrict_to_window(allowed, diag, causal, window)


def attention_forward(module: Optional[nn.Module], query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      scaling: Optional[float] = None, dropout: float = 0.0,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function (``AttentionInterface`` signature) over llmkern.

    query (B, H, Sq, D), key/value (B, Hkv, Sk, D) with H % Hkv == 0 (GQA/MQA passed as is, K/V
    never repeated). ``attention_mask`` is None, boolean (True = attend) or additive float,
    broadcastable to (B, H, Sq, Sk). ``scaling`` None means 1/sqrt(D). ``dropout`` applies only
    while ``module.training``. ``cu_seq_lens_q/k`` with ``max_length_q/k`` (the padding-free
    packed layout of ``DataCollatorWithFlattening``) take the varlen path. The backend is
    ``module.llmkern_backend`` when set (``patch(model, backend=...)``), else llmkern's default.
    Returns (attn_output (B, Sq, H, D) contiguous, None): attention weights are never formed.
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError("llmkern attention: attention sinks (s_aux) are not supported; use "
                         "attn_implementation='eager' or 'sdpa' for this model")
    if kwargs.get("cache") is not None and type(kwargs["cache"]).__name__ == "PagedAttentionCache":
        raise ValueError("llmkern attention: paged caches (continuous batching) are not supported")
    if kwargs.get("output_attentions", False):
        from transformers.utils import logging

        logging.get_logger(__name__).warning_once(
            "llmkern attention does not return attention weights (output_attentions=True); use "
            "attn_implementation='eager' to get them")
    backend = getattr(module, "llmkern_backend", None)
    training = module.training if isinstance(module, nn.Module) else True
    dropout_p = float(dropout) if training else 0.0
    causal = _resolve_causal(module, is_causal)
    softcap = None if softcap is None or softcap == 0 else float(softcap)
    b, h, sq = query.shape[0], query.shape[1], query.shape[2]
    d_orig = query.shape[-1]
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(d_orig)
    query, key, value, crop = _pad_head_dims(query, key, value)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        # Padding-free packed batch: rows of all sequences laid end to end (B is usually 1).
        window = _window(sliding_window, causal)
        if dropout_p > 0.0:
            # The varlen kernel has no dropout: one dense row with a block-diagonal mask instead.
            q, k, v = (t.transpose(0, 1).reshape(1, t.shape[1], -1, t.shape[-1])
                       for t in (query, key, value))
            mask = _packed_mask(cu_q, cu_k, q.shape[2], k.shape[2], causal, window)
            out = llmkern.attention(q, k, v, scale=scale, softcap=softcap, attn_mask=mask,
                                    dropout_p=dropout_p, backend=backend)
            out = out.reshape(h, b, sq, -1).permute(1, 2, 0, 3)
        else:
            q = query.transpose(1, 2).reshape(-1, h, query.shape[-1])
            k = key.transpose(1, 2).reshape(-1, key.shape[1], key.shape[-1])
            v = value.transpose(1, 2).reshape(-1, value.shape[1], value.shape[-1])
            out = llmkern.varlen_attention(q, k, v, cu_q, cu_k, int(max_q), int(max_k),
                                           causal=causal, scale=scale, window=window,
                                           softcap=softcap, backend=backend)
        out = out.reshape(b, sq, h, out.shape[-1])
    else:
        position_bias = kwargs.get("position_bias")
        if position_bias is not None:
            # Relative-position models: fold the bias into one additive mask, as sdpa does.
            from transformers.integrations.sdpa_attention import create_position_bias_mask

            attention_mask = create_position_bias_mask(position_bias, attention_mask,
                                                       causal and sq > 1, query, key)
            causal = False
        window = None
        if attention_mask is not None:
            # The mask (built by sdpa_mask) already holds causality, padding and the window, with
            # the right query/key offsets for every cache layout; it is used alone.
            if attention_mask.shape[-1] > key.shape[-2]:
                attention_mask = attention_mask[..., : key.shape[-2]]
            causal = False
        else:
            # No mask means purely causal (or bidirectional). Like sdpa: a single query sees
            # every key; with more keys than queries (prefill of an empty static cache) the keys
            # past the queries are empty slots, so they are cut and the diagonals agree.
            window = _window(sliding_window, causal)  # the model's causality picks the window
            causal = causal and sq > 1
            if causal and key.shape[-2] > sq:
                key, value = key[:, :, :sq], value[:, :, :sq]
        out = llmkern.attention(query, key, value, causal=causal, scale=scale, window=window,
                                softcap=softcap, attn_mask=attention_mask, dropout_p=dropout_p,
                                backend=backend)
        out = out.transpose(1, 2)
    if crop is not None:
        out = out[..., :crop]
    return out.contiguous(), None


# ---- patch(model): llmkern modules in place of norms, the GPT-2 MLP and attention ----------

def _probe(module: nn.Module, width: int) -> Optional[torch.Tensor]:
    """A small random input on the module's device and dtype (None for meta/odd modules)."""
    p = next(module.parameters(), None)
    if p is None or p.device.type == "meta" or not p.dtype.is_floating_point:
        return None
    g = torch.Generator(device="cpu").manual_seed(1234)
    return torch.randn(3, width, generator=g).to(device=p.device, dtype=p.dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 2e-2
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def _norm_replacement(mod: nn.Module, backend) -> Optional[nn.Module]:
    """An llmkern norm computing what ``mod`` computes, sharing its parameters, or None."""
    if isinstance(mod, nn.LayerNorm):
        if len(mod.normalized_shape) != 1:
            return None
        new = llmkern.nn.LayerNorm(mod.normalized_shape, eps=mod.eps,
                                   elementwise_affine=mod.elementwise_affine,
                                   bias=mod.bias is not None, backend=backend)
        new.weight, new.bias = mod.weight, mod.bias
        return new
    if isinstance(mod, nn.RMSNorm):
        if len(mod.normalized_shape) != 1:
            return None
        new = llmkern.nn.RMSNorm(mod.normalized_shape, eps=mod.eps,
                                 elementwise_affine=mod.elementwise_affine, backend=backend)
        new.weight = mod.weight
        return new
    # Hugging Face RMSNorm classes (LlamaRMSNorm, MistralRMSNorm, T5LayerNorm, ...): swapped only
    # when they compute weight * x / rms(x) on a probe; Gemma's (1 + weight) variant is kept.
    weight = getattr(mod, "weight", None)
    if isinstance(mod, llmkern.nn.RMSNorm) or not (type(mod).__name__.endswith(("RMSNorm", "T5LayerNorm")) and isinstance(weight, nn.Parameter)
            and weight.dim() == 1 and getattr(mod, "bias", None) is None):
        return None
    eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
    if not isinstance(eps, float) or len(list(mod.parameters())) != 1:
        return None
    x = _probe(mod, weight.shape[0])
    if x is None:
        return None
    with torch.no_grad():
        if not _same(mod(x), llmkern.rms_norm(x, weight, eps, backend="torch")):
            return None
    new = llmkern.nn.RMSNorm(weight.shape[0], eps=eps, backend=backend)
    new.weight = weight
    return new


def _to_conv1d_layout(module, state_dict, prefix, local_metadata):
    """state_dict post-hook: c_fc/c_proj weights in GPT-2's Conv1D layout (in, out)."""
    for name in ("c_fc.weight", "c_proj.weight"):
        if prefix + name in state_dict:
            state_dict[prefix + name] = state_dict[prefix + name].t().contiguous()


def _from_conv1d_layout(module, state_dict, prefix, *args):
    """load_state_dict pre-hook: Conv1D (in, out) weights back to nn.Linear's (out, in)."""
    for name in ("c_fc.weight", "c_proj.weight"):
        if prefix + name in state_dict:
            state_dict[prefix + name] = state_dict[prefix + name].t()


def _mlp_replacement(mod: nn.Module, backend) -> Optional[nn.Module]:
    """An ``llmkern.nn.MLP`` for modules shaped like transformers' GPT2MLP (Conv1D c_fc/c_proj
    around a tanh-GELU ``act``, optional ``dropout``), or None.

    Its weights live in nn.Linear layout (out, in), the kernels' own; hooks keep GPT-2's Conv1D
    layout (in, out) in ``state_dict``/``load_state_dict``, so checkpoints saved from a patched
    model load into an unpatched one and back."""
    fc, proj, act = (getattr(mod, n, None) for n in ("c_fc", "c_proj", "act"))
    if any(type(m).__name__ != "Conv1D" for m in (fc, proj)) or not callable(act):
        return None
    if fc.bias is None or proj.bias is None or fc.weight.shape[1] != proj.weight.shape[0]:
        return None
    if set(dict(mod.named_children())) - {"c_fc", "c_proj", "act", "dropout"}:
        return None
    x = _probe(fc, 64)
    if x is None:
        return None
    with torch.no_grad():
        if not _same(act(x * 3), F.gelu(x * 3, approximate="tanh")):
            return None
    n_embd, hidden = fc.weight.shape
    drop = getattr(mod, "dropout", None)
    new = llmkern.nn.MLP(n_embd, hidden, bias=True, device=fc.weight.device, dtype=fc.weight.dtype,
                         backend=backend, dropout=drop.p if isinstance(drop, nn.Dropout) else 0.0)
    new.register_state_dict_post_hook(_to_conv1d_layout)
    new.register_load_state_dict_pre_hook(_from_conv1d_layout)
    with torch.no_grad():
        new.c_fc.weight.copy_(fc.weight.t())
        new.c_fc.bias.copy_(fc.bias)
        new.c_proj.weight.copy_(proj.weight.t())
        new.c_proj.bias.copy_(proj.bias)
    new.train(mod.training)
    return new


def _replace(model: nn.Module, make) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = make(child)
            if new is not None:
                new.train(child.training)
                setattr(parent, name, new)
                count += 1
    return count


def patch(model: nn.Module, norms: bool = True, mlp: bool = True, attention: bool = True,
          backend: Optional[str] = None, rotary: bool = True, loss: bool = True,
          strict: bool = False) -> nn.Module:
    """Swap parts of a Hugging Face model for llmkern, in place; returns the model.

    - ``norms``: ``nn.LayerNorm``, ``nn.RMSNorm`` and Llama-style HF RMSNorms (checked on a
      probe; Gemma's ``1 + weight`` norms are left alone) become ``llmkern.nn.LayerNorm/RMSNorm``
      sharing the same Parameter objects.
    - ``mlp``: GPT-2 style MLPs (Conv1D c_fc/c_proj, tanh GELU) become ``llmkern.nn.MLP``
      (``llmkern.mlp``); their weights are new tensors (transposed to nn.Linear layout), so build
      the optimizer after patching. The state_dict layout stays GPT-2's. Gated MLPs (Llama,
      Mistral, Qwen2 SwiGLU; Gemma GeGLU; activation checked on a probe) become
      ``llmkern.nn.SwiGLUMLP`` sharing their gate_proj/up_proj/down_proj modules.
    - ``attention``: registers ``"llmkern"`` and calls ``model.set_attn_implementation``.
    - ``rotary`` (Llama family): the modeling module's ``apply_rotary_pos_emb`` becomes
      ``llmkern.rotary`` (module-wide, as the attention code looks it up there;
      ``hf_llama.restore_rotary()`` undoes it).
    - ``loss`` (Llama family): ``model(input_ids, labels=...)`` computes HF's causal-LM loss
      (shifted labels, ignore_index, ``num_items_in_batch``) with ``linear_cross_entropy``
      from the final hidden states; logits are formed only when ``skip_logits=False`` is passed
      or the model is in eval mode.
    - ``backend``: the llmkern backend for the swapped parts (None: the default).

    Logits stay equal within floating-point tolerance. ``model.llmkern_patched`` records the
    counts of norms, MLPs and attention; ``model.llmkern_report`` (``hf_llama.PatchReport``)
    what was swapped and what was left, and why. An architecture patch() does not know gets
    the parts recognised on their own and a warning (a ValueError with ``strict=True``).
    """
    import warnings

    from llmkern.integrations import hf_llama

    if backend is not None:
        llmkern.backends._check_choice(backend, "backend")
    for m in model.modules():  # patched before: only the backend changes
        if isinstance(m, (llmkern.nn.LayerNorm, llmkern.nn.RMSNorm, llmkern.nn.MLP,
                          llmkern.nn.SwiGLUMLP)):
            m.backend = backend
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    known = model_type in hf_llama.KNOWN
    if strict and not known:
        raise ValueError(hf_llama.unknown_message(model_type, {}))
    left: dict = {}
    n_norms = _replace(model, lambda m: _norm_replacement(m, backend)) if norms else 0
    n_mlp = 0
    if mlp:
        n_mlp = _replace(model, lambda m: _mlp_replacement(m, backend)
                         or hf_llama.gated_mlp_replacement(m, backend, left))
    if attention:
        register()
        if not hasattr(model, "set_attn_implementation"):
            raise TypeError(f"patch(attention=True) needs a transformers PreTrainedModel with "
                            f"set_attn_implementation, got {type(model).__name__}")
        model.set_attn_implementation(NAME)
        for m in model.modules():
            if "Attention" in type(m).__name__:
                m.llmkern_backend = backend
    swapped = {"norms": n_norms, "mlp": n_mlp, "attention": int(bool(attention)),
               "rotary": 0, "loss": 0}
    kept_norms = sorted({type(m).__name__ for m in model.modules()
                         if type(m).__name__.endswith(("RMSNorm", "LayerNorm"))
                         and not isinstance(m, (llmkern.nn.RMSNorm, llmkern.nn.LayerNorm))})
    if norms and kept_norms:
        left["norms"] = f"{', '.join(kept_norms)} (not weight * x / rms(x) or a plain LayerNorm)"
    if model_type in hf_llama.FAMILY:
        base = getattr(model, getattr(model, "base_model_prefix", ""), model)
        for part, wanted, fn in (("rotary", rotary, lambda: hf_llama.patch_rotary(model, base, backend)),
                                 ("loss", loss, lambda: hf_llama.patch_loss(model, backend))):
            if wanted:
                why = fn()
                if why is None:
                    swapped[part] = 1
                else:
                    left[part] = why
    elif not known:
        warnings.warn(hf_llama.unknown_message(model_type, swapped), UserWarning, stacklevel=2)
        left["rotary, loss"] = f"model_type {model_type!r} is not one patch() knows"
    model.llmkern_patched = {"norms": n_norms, "mlp": n_mlp, "attention": bool(attention)}
    model.llmkern_report = hf_llama.PatchReport(model_type, swapped, left)
    return model


def register() -> str:
    """Register ``"llmkern"`` with transformers' attention and mask interfaces (idempotent).

    Afterwards ``from_pretrained(..., attn_implementation="llmkern")`` and
    ``model.set_attn_implementation("llmkern")`` work. Importing this module calls it.
    Returns the name.
    """
    if _IMPORT_ERROR is not None:
        raise ImportError("llmkern.integrations.transformers needs the `transformers` package "
                          f"(pip install transformers): {_IMPORT_ERROR}")
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def is_registered() -> bool:
    """True when ``"llmkern"`` is registered with both transformers interfaces."""
    if _IMPORT_ERROR is not None:
        return False
    return (AttentionInterface._global_mapping.get(NAME) is attention_forward
            and AttentionMaskInterface._global_mapping.get(NAME) is sdpa_mask)


if _IMPORT_ERROR is None:
    register()
