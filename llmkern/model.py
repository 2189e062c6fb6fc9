"""A GPT-2 style language model over the llmkern ops (nanoGPT-sized).

Token + learned position embeddings, pre-LN blocks (causal self-attention with optional GQA,
GELU(tanh) MLP), a final LayerNorm and an LM head tied to the token embedding. Every op goes
through llmkern (``llmkern.attention``, ``llmkern.nn.MLP``, ``llmkern.nn.LayerNorm``,
``llmkern.linear_cross_entropy``), so ``GPTConfig.backend`` ('torch' | 'triton' | 'cuda' |
'auto', None = the global choice) drives the same model on every backend. The training loss
never materializes the full (tokens x vocab) logits.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
from torch import nn

import llmkern
from llmkern.backends import CHOICES
from llmkern.hardware import gpt_flops_per_token, mfu, peak_flops  # noqa: F401 (peak_flops: public here)
from llmkern.nn import MLP, CausalSelfAttention, LayerNorm, RMSNorm, SwiGLUMLP
from llmkern.nn import KVCache as _StaticKVCache


ARCHS = ("gpt2", "llama")


@dataclass
class GPTConfig:
    vocab_size: int = 257
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None: n_head (plain multi-head attention)
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    backend: Optional[str] = None  # None: whatever llmkern.set_backend/use_backend says
    # 'gpt2' or 'llama': the defaults of rope, swiglu and rmsnorm (None: the arch's choice).
    arch: str = "gpt2"
    rope: Optional[bool] = None  # rotary position embeddings instead of learned positions
    swiglu: Optional[bool] = None  # gated SiLU MLP instead of the GELU one
    rmsnorm: Optional[bool] = None  # RMSNorm instead of LayerNorm
    rope_theta: float = 10000.0
    mlp_hidden: Optional[int] = None  # None: 4 * n_embd (GELU), 8/3 * n_embd up to a multiple of 64 (SwiGLU)

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.arch not in ARCHS:
            raise ValueError(f"GPTConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("rope", "swiglu", "rmsnorm"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, self.arch == "llama")
            elif not isinstance(value, bool):
                raise ValueError(f"GPTConfig.{name} must be a bool or None, got {value!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be an int >= 1, got {value!r}")
        if self.mlp_hidden is None:
            self.mlp_hidden = -(-8 * self.n_embd // 3 // 64) * 64 if self.swiglu else 4 * self.n_embd
        if isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1:
            raise ValueError(f"GPTConfig.mlp_hidden must be None or an int >= 1, got {self.mlp_hidden!r}")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig: rope needs an even head_dim, got n_embd {self.n_embd} / "
                             f"n_head {self.n_head}")
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) \
                or not self.rope_theta > 1:
            raise ValueError(f"GPTConfig.rope_theta must be a number > 1, got {self.rope_theta!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be a multiple of n_head "
                             f"({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"({self.n_kv_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.backend is not None and self.backend not in CHOICES:
            raise ValueError(f"GPTConfig.backend must be None or one of {CHOICES}, got {self.backend!r}")

    @classmethod
    def gpt2(cls, size: str = "124M", **overrides) -> "GPTConfig":
        """GPT-2 shapes (vocab padded to 50304, a multiple of 64, as nanoGPT does for speed)."""
        shapes = {"124M": (12, 12, 768), "350M": (24, 16, 1024), "774M": (36, 20, 1280),
                  "1558M": (48, 25, 1600)}
        if size not in shapes:
            raise ValueError(f"GPTConfig.gpt2: size must be one of {list(shapes)}, got {size!r}")
        n_layer, n_head, n_embd = shapes[size]
        base = dict(vocab_size=50304, block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        return cls(**{**base, **overrides})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class KVCache(_StaticKVCache):
    """The static KV cache (:class:`llmkern.nn.KVCache`) sized for a GPT: one layer per block,
    ``max_len`` positions (default and at most the model's ``block_size``); ``contiguous`` as
    there (rows are prefixes: unmasked prefill and split-KV decode attention)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: Optional[int] = None,
                 contiguous: bool = False):
        super().__init__(config.n_layer, batch_size,
                         min(max_len or config.block_size, config.block_size), contiguous)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        eps, bias, backend = config.layer_norm_eps, config.bias, config.backend
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.n_kv_head, bias=bias,
                                        dropout=config.dropout, backend=backend)
        self.ln_2 = _norm(config)
        if config.swiglu:
            self.mlp = SwiGLUMLP(config.n_embd, config.mlp_hidden, backend=backend)
            self.mlp_dropout = nn.Dropout(config.dropout)
        else:
            self.mlp = MLP(config.n_embd, config.mlp_hidden, bias=bias, backend=backend,
                           dropout=config.dropout)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0,
                input_pos: Optional[torch.Tensor] = None, rope=None):
        a = self.attn(self.ln_1(x), cache=cache, layer=layer, input_pos=input_pos, rope=rope)
        h, x = self.ln_2(a, residual=x)  # x + attn and ln_2 of the sum: one fused kernel
        if isinstance(self.mlp, SwiGLUMLP):
            return x + self.mlp_dropout(self.mlp(h))
        return self.mlp(h, residual=x)  # x + mlp(h), the add fused into the GEMM


def _norm(config: GPTConfig) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.n_embd, eps=config.layer_norm_eps, backend=config.backend)
    return LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias,
                     backend=config.backend)


def rope_tables(config: GPTConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (block_size, head_dim / 2), fp32: the angles ``llmkern.rotary`` takes
    (half-split pairs, frequencies ``rope_theta ** (-2i / head_dim)``)."""
    half = config.head_dim // 2
    inv = config.rope_theta ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
    angles = torch.arange(config.block_size, dtype=torch.float64, device=device)[:, None] * inv
    return angles.cos().float(), angles.sin().float()


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not config.rope:  # rotary models have no learned positions
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **parts,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=_norm(config),
        ))
        if config.rope:  # not in the state_dict: rebuilt from the config
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_dropout(self, p: float) -> None:
        """Change the dropout probability everywhere (e.g. for fine-tuning a loaded model)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p!r}")
        self.config.dropout = p
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, CausalSelfAttention):
                m.dropout = p

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding is left out by default (the token embedding
        stays: it is also the LM head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, last_only: bool = False,
                input_pos: Optional[torch.Tensor] = None,
                logits_index: Optional[torch.Tensor] = None, return_hidden: bool = False):
        """idx (B, T) token ids -> (logits or None, loss or None).

        With ``targets`` (B, T) (ignore_index -100 masks a position) returns (None, loss): the
        loss goes through ``llmkern.linear_cross_entropy``. Without, returns fp32 logits
        (B, T, V), or (B, 1, V) with ``last_only`` (the last position) or ``logits_index`` (B,)
        (one position per row). ``cache`` continues from each row's cached positions, or writes
        at ``input_pos`` (B, T) when given (the caller keeps those below ``block_size``; no host
        sync then, so a compiled decoding step has static shapes); either way the cache's lengths
        become the last position + 1. ``return_hidden`` returns (final-norm hidden states, None).
        """
        b, t = idx.shape
        host_length = None  # the cache's common length after this call, when known on the host
        if input_pos is None:
            start = cache.length if cache is not None else 0
            if cache is not None and cache._host_length is not None:
                host_length = start + t
            if start + t > self.config.block_size:
                raise ValueError(f"GPT: sequence of {start + t} tokens exceeds the model's context "
                                 f"(block_size {self.config.block_size})")
            if cache is not None:
                input_pos = pos = cache.next_positions(t, idx.device)  # per row
            else:
                pos = torch.arange(t, device=idx.device)
        elif cache is None:
            raise ValueError("GPT: input_pos needs a cache (positions say where to write keys)")
        else:
            pos = input_pos
        x = self.transformer.wte(idx)
        rope = None
        if self.config.rope:
            rope = (self.rope_cos, self.rope_sin)
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, input_pos, rope)
        if cache is not None:
            cache.advance(input_pos, host_length)
        if logits_index is not None:
            x = x.gather(1, logits_index.view(b, 1, 1).expand(b, 1, x.shape[-1]))
        elif last_only and targets is None:
            x = x[:, -1:, :]
        x = self.transformer.ln_f(x)
        if return_hidden:  # (B, T, C) for a scalar head or llmkern.linear_logprobs
            return x, None
        if targets is not None:
            loss = llmkern.linear_cross_entropy(x.reshape(b * t, -1), self.lm_head.weight,
                                                targets.reshape(b * t),
                                                ignore_index=-100, backend=self.config.backend)
            return None, loss
        return self.lm_head(x).float(), None

    # ---- compute accounting --------------------------------------------------------------

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs (forward + backward) per token (``llmkern.hardware.gpt_flops_per_token``)."""
        c = self.config
        return gpt_flops_per_token(self.num_params(), c.n_layer, c.n_head * c.head_dim,
                                   seq_len or c.block_size)

    def estimate_mfu(self, tokens_per_second: float, peak_flops: Optional[float],
                     seq_len: Optional[int] = None) -> Optional[float]:
        """Model FLOPs utilization: achieved training FLOP/s over ``peak_flops`` (None: unknown)."""
        return mfu(self.flops_per_token(seq_len), tokens_per_second, peak_flops)

    # ---- optimizer -----------------------------------------------------------------------

    def configure_optimizers(self, weight_decay: float, lr: float, betas=(0.9, 0.95),
                             device_type: str = "cpu") -> torch.optim.AdamW:
        """AdamW with weight decay on matrices (embeddings included) and none on biases/norms;
        the fused implementation on CUDA."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)

    # ---- Hugging Face GPT-2 --------------------------------------------------------------

    @classmethod
    def from_hf(cls, source, backend: Optional[str] = None, dtype: torch.dtype = torch.float32,
                device=None) -> "GPT":
        """A GPT from a transformers ``GPT2LMHeadModel`` instance or a local directory holding
        its ``config.json`` and safetensors weights (no transformers import needed for that).
        A ``LlamaForCausalLM`` with tied embeddings (no rope scaling, no biases) gives an
        ``arch='llama'`` GPT."""
        if isinstance(source, (str, os.PathLike)):
            config, state = _read_hf_dir(os.fspath(source), backend)
        else:
            config, state = _config_from_hf(source.config.to_dict(), backend), source.state_dict()
        model = cls(config)
        convert = _convert_llama_state if config.arch == "llama" else _convert_hf_state
        missing, unexpected = model.load_state_dict(convert(state, config), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"GPT.from_hf: weights do not match a {config.arch} model: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        return model.to(device=device, dtype=dtype)


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _read_hf_dir(path: str, backend: Optional[str]):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"GPT.from_hf: {path!r} has no config.json (expected a directory "
                                f"written by save_pretrained)")
    with open(cfg_path, encoding="utf-8") as f:
        config = _config_from_hf(json.load(f), backend)
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"GPT.from_hf: no *.safetensors weights in {path!r} (save with "
                                f"safe_serialization=True)")
    from safetensors.torch import load_file

    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return config, state


def _llama_config(cfg: dict, backend: Optional[str]) -> GPTConfig:
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")
    lacking = [k for k in need if k not in cfg]
    if lacking:
        raise ValueError(f"GPT.from_hf: config.json of model_type 'llama' lacks {lacking} "
                         f"(expected a GPT-2 model or a complete Llama config)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    heads, width = cfg["num_attention_heads"], cfg["hidden_size"]
    problems = [what for what, bad in (
        ("untied embeddings (GPT ties its LM head)", not cfg.get("tie_word_embeddings", False)),
        (f"rope scaling {rope.get('rope_type')!r}", rope.get("rope_type", "default") != "default"),
        ("attention or MLP biases", cfg.get("attention_bias") or cfg.get("mlp_bias")),
        (f"activation {cfg.get('hidden_act')!r}", cfg.get("hidden_act", "silu") != "silu"),
        ("a head_dim other than hidden_size / heads",
         cfg.get("head_dim") not in (None, width // heads))) if bad]
    if problems:
        raise ValueError(f"GPT.from_hf: this Llama model has {', '.join(problems)}, which the GPT "
                         f"does not support")
    return GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg.get("max_position_embeddings", 2048),
                     n_layer=cfg["num_hidden_layers"], n_head=heads,
                     n_kv_head=cfg.get("num_key_value_heads") or heads, n_embd=width, dropout=0.0,
                     bias=False, layer_norm_eps=cfg.get("rms_norm_eps", 1e-6), backend=backend,
                     arch="llama", rope_theta=float(theta), mlp_hidden=cfg["intermediate_size"])


def _convert_llama_state(state: dict, config: GPTConfig) -> dict:
    """HF Llama names -> ours; q/k/v projections stacked into c_attn."""
    out = {}
    rename = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
              "self_attn.o_proj": "attn.c_proj"}
    for key, value in state.items():
        key = key[len("model."):] if key.startswith("model.") else key
        if key == "lm_head.weight" or key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            continue  # tied; k/v go with q
        if key.startswith("embed_tokens."):
            key = "transformer.wte." + key.split(".", 1)[1]
        elif key.startswith("norm."):
            key = "transformer.ln_f." + key.split(".", 1)[1]
        elif key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            if rest == "self_attn.q_proj.weight":
                prefix = key[: -len("q_proj.weight")]
                value = torch.cat([state.get("model." + prefix + f"{n}_proj.weight",
                                             state.get(prefix + f"{n}_proj.weight")) for n in "qkv"])
                rest = "attn.c_attn.weight"
            for old, new in rename.items():
                rest = rest.replace(old, new)
            key = f"transformer.h.{i}.{rest}"
        out[key] = value.contiguous()
    return out


def _config_from_hf(cfg: dict, backend: Optional[str]) -> GPTConfig:
    if cfg.get("model_type") == "llama":
        return _llama_config(cfg, backend)
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"GPT.from_hf: expected a GPT-2 model, got model_type {cfg.get('model_type')!r}")
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"GPT.from_hf: activation {act!r} is not GELU(tanh), which this model uses")
    if cfg.get("scale_attn_by_inverse_layer_idx") or not cfg.get("scale_attn_weights", True):
        raise ValueError("GPT.from_hf: only the standard 1/sqrt(head_dim) attention scaling is supported")
    return GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg.get("n_positions", 1024),
                     n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                     dropout=0.0, bias=True, layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                     backend=backend)


def _convert_hf_state(state: dict, config: Optional[GPTConfig] = None) -> dict:
    """HF GPT-2 names -> ours (the same names); Conv1D (in, out) weights -> nn.Linear (out, in)."""
    out = {}
    for key, value in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers of old versions; the LM head is tied to wte
        if not key.startswith("transformer."):
            key = "transformer." + key  # GPT2Model (no LM head) checkpoints
        if key.endswith(_CONV1D):
            value = value.t()
        out[key] = value.contiguous()
    return out


__all__ = ["GPT", "GPTConfig", "KVCache", "peak_flops"]
