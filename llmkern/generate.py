"""Text generation: ``generate`` (greedy / temperature / top-k / top-p sampling with a KV cache,
streaming), ``beam_search`` (length-penalized), and the ``llmkern generate`` command."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from llmkern.model import GPT, KVCache


def _next_token(logits: torch.Tensor, greedy: bool, temperature: float, top_k: Optional[int],
                top_p: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row of logits (B, V)."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, greedy: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_id: Optional[int] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Extend idx (B, T) by up to ``max_new_tokens`` tokens; a row stops at ``eos_id`` (later
    positions of a stopped row repeat it) and all stop when every row has. Returns (B, T + n).

    With ``use_cache`` the keys/values of past positions are kept; once the context is full,
    every step reprocesses the last ``block_size`` tokens, exactly as without the cache.
    """
    model.eval()
    block = model.config.block_size
    cache = KVCache(model.config, idx.shape[0]) if use_cache else None
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if cache is None:
            inp = idx[:, -block:]
        elif cache.length == 0 or cache.length + 1 > block:
            cache.reset()
            inp = idx[:, -block:]
        else:
            inp = idx[:, -1:]
        logits, _ = model(inp, cache=cache, last_only=True)
        nxt = _next_token(logits[:, -1], greedy, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(nxt)
        if eos_id is not None and bool(done.all()):
            break
    return idx


def beam_score(logprob_sum: float, length: int, length_penalty: float) -> float:
    """A hypothesis' score: its log-probability over (generated length) ** length_penalty."""
    return logprob_sum / (length ** length_penalty)


@torch.no_grad()
def beam_search(model: GPT, prompt: Sequence[int], num_beams: int, max_new_tokens: int,
                length_penalty: float = 1.0, eos_id: Optional[int] = None,
                device=None) -> Tuple[List[int], float]:
    """The best continuation of one prompt by beam search: (generated tokens, score).

    Each step expands the live beams, ranks all continuations by log-probability and keeps the
    best ``num_beams`` that do not end in ``eos_id``; a continuation ending in EOS among the top
    ``num_beams`` becomes a finished hypothesis, scored by ``beam_score`` (the EOS counts in the
    length). The search stops when ``num_beams`` hypotheses are finished or after
    ``max_new_tokens`` (live beams are then scored as they are). With one beam this is greedy
    decoding; with beams >= vocab ** (max_new_tokens - 1) it is an exhaustive search.
    """
    model.eval()
    device = device or next(model.parameters()).device
    block = model.config.block_size
    prompt = list(prompt)[-(block - 1):] if len(prompt) >= block else list(prompt)
    max_new_tokens = min(max_new_tokens, block - len(prompt))
    if max_new_tokens < 1 or not prompt:
        return [], 0.0
    cache = KVCache(model.config, 1)
    logits, _ = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)
    logprobs = torch.log_softmax(logits[:, -1].double(), dim=-1)
    beams: List[List[int]] = [[]]
    sums = torch.zeros(1, dtype=torch.float64, device=device)
    finished: List[Tuple[float, List[int]]] = []
    vocab = logprobs.shape[-1]
    for step in range(max_new_tokens):
        cand = (sums[:, None] + logprobs).view(-1)
        top_vals, top_idx = cand.topk(min(2 * num_beams, cand.numel()))
        alive: List[Tuple[int, int, float]] = []
        for rank, (val, ix) in enumerate(zip(top_vals.tolist(), top_idx.tolist())):
            b, tok = divmod(ix, vocab)
            if eos_id is not None and tok == eos_id:
                if rank < num_beams:
                    seq = beams[b] + [tok]
                    finished.append((beam_score(val, len(seq), length_penalty), seq))
            else:
                alive.append((b, tok, val))
                if len(alive) == num_beams:
                    break
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        last = step == max_new_tokens - 1
        if last:
            finished += [(beam_score(val, step + 1, length_penalty), beams[b] + [tok])
                         for b, tok, val in alive]
        if last or len(finished) >= num_beams or not alive:
            break
        cache.reorder(torch.tensor([b for b, _, _ in alive], device=device))
        beams = [beams[b] + [tok] for b, tok, _ in alive]
        sums = torch.tensor([val for _, _, val in alive], dtype=torch.float64, device=device)
        logits, _ = model(torch.tensor([[tok] for _, tok, _ in alive], device=device), cache=cache,
                          last_only=True)
        logprobs = torch.log_softmax(logits[:, -1].double(), dim=-1)
    if not finished:
        return [], 0.0
    score, seq = max(finished, key=lambda f: f[0])
    return seq, score


class TextStreamer:
    """Prints decoded text as tokens arrive (waits while the tail is an incomplete character)."""

    def __init__(self, tokenizer, file=None):
        self.tokenizer, self.file = tokenizer, file or sys.stdout
        self.ids: List[int] = []
        self.printed = ""

    def put(self, token: int) -> None:
        if token == self.tokenizer.eos_id:
            return
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return
        self.file.write(text[len(self.printed):])
        self.file.flush()
        self.printed = text

    def end(self) -> str:
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.printed):
            self.file.write(text[len(self.printed):])
        self.file.write("\n")
        self.file.flush()
        return text


# ---- command line --------------------------------------------------------------------------

def _number(kind, low, high=None, low_open=True):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
        if not ok:
            bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from llmkern.backends import CHOICES
    from llmkern.train_cli import HelpFormatter

    p = argparse.ArgumentParser(prog="llmkern generate", description="Generate text from a checkpoint.",
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory or training run directory")
    p.add_argument("--prompt", default="", help="text to continue (empty: start of a document)")
    p.add_argument("--max-new-tokens", type=_number(int, 0), default=200, help="tokens to generate at most")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=_number(float, 0.0), default=0.8, help="sampling temperature")
    p.add_argument("--top-k", type=_number(int, 0), default=None, help="sample among the k most likely")
    p.add_argument("--top-p", type=_number(float, 0.0, 1.0), default=None,
                   help="sample among the most likely tokens holding probability p (nucleus)")
    p.add_argument("--beams", type=_number(int, 0), default=1, help="beam search with N beams (N > 1)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = logprob / length ** this")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default=None, choices=CHOICES,
                   help="llmkern kernel backend (default: $LLMKERN_BACKEND, else auto)")
    p.add_argument("--raw", action="store_true",
                   help="for an --sft checkpoint, do not wrap the prompt in its prompt template")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from llmkern.checkpoint import CheckpointError, load_model
    from llmkern.data import format_prompt
    from llmkern.train import ConfigError, _resolve_device

    args = build_parser().parse_args(argv)
    try:
        device = _resolve_device(args.device)
        model, tok, meta = load_model(args.ckpt, backend=args.backend, device=device)
    except (CheckpointError, ConfigError) as exc:
        print(f"llmkern generate: error: {exc}", file=sys.stderr)
        return 1
    if args.seed is not None:
        torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    text = format_prompt(args.prompt) if meta.get("train", {}).get("sft") and not args.raw else args.prompt
    ids = tok.encode(text) or [tok.eos_id]  # an empty prompt starts a fresh document
    block = model.config.block_size
    if len(ids) >= block:
        print(f"llmkern generate: note: the prompt has {len(ids)} tokens; keeping the last "
              f"{block - 1} (the model's context is {block})", file=sys.stderr)
        ids = ids[-(block - 1):]
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    with amp:
        if args.beams > 1:
            seq, _ = beam_search(model, ids, args.beams, args.max_new_tokens, args.length_penalty,
                                 tok.eos_id, device)
            print(tok.decode([t for t in seq if t != tok.eos_id]))
            return 0
        streamer = TextStreamer(tok)
        generate(model, torch.tensor([ids], device=device), args.max_new_tokens, greedy=args.greedy,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 eos_id=tok.eos_id, generator=generator,
                 on_token=lambda t: streamer.put(int(t[0])))
        streamer.end()
    return 0


def _null():
    from contextlib import nullcontext

    return nullcontext()
