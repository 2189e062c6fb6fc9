"""``llmkern export``: one safetensors file from a checkpoint (sharded or not), for generate,
other tools, or Hugging Face transformers.

``--format llmkern`` (default) writes a consolidated llmkern checkpoint directory (one
``model.safetensors``, ``config.json``, the tokenizer) that ``llmkern generate`` and
``--init-from`` read. ``--format hf`` writes a GPT-2 folder for
``GPT2LMHeadModel.from_pretrained`` (Conv1D weight layout, GPT-2 config, ``tokenizer.json``);
it needs a GPT-2 shaped model and a BPE tokenizer. Sharded checkpoints of an FSDP run are
gathered in this one process (``torch.distributed.checkpoint`` reads every rank's shards).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from llmkern.cli import CLIError, run_command

FORMATS = ("llmkern", "hf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint directory or training run directory (its newest)")
    parser.add_argument("--out", required=True, help="directory to write (created; must be empty)")
    parser.add_argument("--format", choices=FORMATS, default="llmkern",
                        help="llmkern: checkpoint for generate/--init-from; hf: a GPT-2 folder "
                             "for transformers")


def run(args: argparse.Namespace) -> int:
    path = export(args.ckpt, args.out, args.format)
    print(f"exported {args.ckpt} -> {path} ({args.format})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(sys.modules[__name__], argv, "export")


def export(ckpt: str, out: str, fmt: str = "llmkern") -> str:
    """Write ``ckpt``'s weights into the new directory ``out`` as one safetensors file."""
    from llmkern import checkpoint as ckpt_io

    if fmt not in FORMATS:
        raise CLIError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CLIError(f"--out {out!r} exists and is not an empty directory")
    model, tok, meta = ckpt_io.load_model(ckpt)
    if fmt == "hf":
        _check_hf(model.config, tok)
    os.makedirs(out, exist_ok=True)
    if fmt == "llmkern":
        from safetensors.torch import save_model

        save_model(model, os.path.join(out, ckpt_io.WEIGHTS))
        tok.save(out)
        clean = {k: v for k, v in meta.items() if k != "sharded"}
        clean.setdefault("llmkern", 1)
        with open(os.path.join(out, ckpt_io.CONFIG), "w", encoding="utf-8") as f:
            json.dump(clean, f, indent=1)
        return out
    _write_hf(model, tok, out)
    return out


def _check_hf(config, tok) -> None:
    arch = getattr(config, "arch", "gpt2")
    extras = [n for n in ("rope", "swiglu", "rmsnorm") if getattr(config, n, False)]
    if arch != "gpt2" or extras or not config.bias or config.n_kv_head != config.n_head \
            or getattr(config, "mlp_hidden", 4 * config.n_embd) != 4 * config.n_embd:
        raise CLIError(f"--format hf writes GPT-2 (biases, multi-head attention, GELU MLP of "
                       f"4 x n_embd, learned positions); this model is not: arch {arch!r}, "
                       f"{extras or 'no'} extras, bias {config.bias}, n_kv_head "
                       f"{config.n_kv_head} of n_head {config.n_head}")
    if getattr(tok, "kind", None) == "byte" or not hasattr(tok, "tok"):
        raise CLIError("--format hf needs a BPE tokenizer (train with --tokenizer bpe or a "
                       "tokenizer directory); this checkpoint uses the byte tokenizer: export "
                       "with --format llmkern")


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _write_hf(model, tok, out: str) -> None:
    from safetensors.torch import save_file

    c = model.config
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte; transformers ties it again on load
        if key.endswith(_CONV1D):  # nn.Linear (out, in) -> Conv1D (in, out)
            value = value.t()
        state[key] = value.detach().contiguous().cpu()
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
              "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
              "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
              "activation_function": "gelu_new", "layer_norm_epsilon": c.layer_norm_eps,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
              "scale_attn_weights": True, "tie_word_embeddings": True, "torch_dtype": "float32"}
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    tok.save(out)
