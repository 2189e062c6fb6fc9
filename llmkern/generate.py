"""Generate text from a checkpoint.

``generate`` samples (greedy / temperature / top-k / top-p) over a static KV cache, for ragged
batches, streaming; ``beam_search`` is length-penalized; ``add_arguments``/``run`` are the
``llmkern generate`` command."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from llmkern.model import GPT, KVCache

# ---- sampling keyed by row -------------------------------------------------------------------
# With ``seeds``, the token a row draws at position p inverts the row's CDF at one uniform number
# hashed from (its seed, p) (murmur3's 32-bit finalizer, in int64 arithmetic that never
# overflows): a row samples the same in any batch, on any process. A call's numbers are hashed
# up front, so the work per step is that of a multinomial draw.

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), in 16-bit halves of c: no product reaches 2^63."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def row_uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Float64 uniform numbers in (0, 1) with 53 random bits, each a function of an int64 seed
    (>= 0) and a position alone (the same on any batch, process or device); broadcasts."""
    key = _mix32(_mix32(_mix32(seeds >> 32) ^ (seeds & _M32)) ^ (positions & _M32))
    high = _mix32(key ^ 0x68E31DA4) >> 5  # 27 bits
    low = _mix32(key ^ 0xB5297A4D) >> 6  # 26 bits
    return ((high << 26) + low).double().add_(0.5).mul_(2.0 ** -53)


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) tokens, row b the first whose cumulated probability (float64) reaches ``u[b]``:
    never one of probability 0."""
    cdf = probs.double().cumsum(-1)
    tok = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None]).squeeze(1)
    return tok.clamp_(max=probs.shape[-1] - 1)


def _next_token(logits: torch.Tensor, greedy: bool, temperature: float, top_k: Optional[int],
                top_p: Optional[float], generator: Optional[torch.Generator],
                uniforms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row of logits (B, V); with ``uniforms`` (B,) row b inverts its CDF there."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
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
    if uniforms is not None:
        return inverse_cdf_sample(probs, uniforms)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> None:
    """ValueError for options no sampler can use."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def _check_seeds(seeds, rows: int, generator) -> torch.Tensor:
    """``seeds`` as an int64 (rows,) CPU tensor, or ValueError naming what is wrong."""
    if generator is not None:
        raise ValueError("generate: pass seeds or generator, not both")
    values = list(seeds)
    if len(values) != rows or not all(isinstance(s, int) and not isinstance(s, bool)
                                      and 0 <= s < 2**63 for s in values):
        raise ValueError(f"generate: seeds must be {rows} ints in [0, 2^63), one per prompt; got "
                         f"{len(values)} values starting {values[:3]!r}")
    return torch.tensor(values, dtype=torch.int64)


def _prompts(idx, config) -> Tuple[List[List[int]], bool]:
    """idx as lists of token ids (checked), and whether it came as a (B, T) tensor."""
    if torch.is_tensor(idx):
        if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"generate: idx must be a (batch, seq) integer tensor, got shape "
                             f"{tuple(idx.shape)} and dtype {idx.dtype}")
        prompts, as_tensor = idx.tolist(), True
    else:
        prompts, as_tensor = [[int(t) for t in p] for p in idx], False
    if not prompts:
        raise ValueError("generate: no prompts (idx is empty)")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompt {i} is empty (start a document with the EOS token)")
        if len(p) > config.block_size:
            raise ValueError(f"generate: prompt {i} has {len(p)} tokens, more than the model's "
                             f"context (block_size {config.block_size})")
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise ValueError(f"generate: prompt {i} holds token ids outside [0, {config.vocab_size})")
    return prompts, as_tensor


def _decode_step(model: GPT, tok: torch.Tensor, input_pos: torch.Tensor, cache: KVCache):
    """One token per row at its own position: static shapes, so it compiles once."""
    logits, _ = model(tok, cache=cache, input_pos=input_pos, last_only=True)
    return logits[:, -1]


def make_decode_step(compile: Union[bool, str, Callable] = False, device=None) -> Callable:
    """The decoding step, compiled when asked: ``True`` uses ``mode="reduce-overhead"`` (CUDA
    graphs) on CUDA and the default mode elsewhere; a string or callable is a torch.compile
    backend (e.g. ``"eager"``, ``"aot_eager"``)."""
    if compile is False or compile is None:
        return _decode_step
    if compile is True:
        cuda = device is not None and torch.device(device).type == "cuda"
        step = torch.compile(_decode_step, mode="reduce-overhead" if cuda else None)
        if not cuda:
            return step

        def graphed(*args):
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed
            return step(*args)
        return graphed
    return torch.compile(_decode_step, backend=compile)


def _windows(model: GPT, tokens: torch.Tensor, lens: List[int]) -> torch.Tensor:
    """Logits (B, V) after each row's last ``block_size`` tokens, recomputed from scratch."""
    block = model.config.block_size
    width = [min(n, block) for n in lens]
    start = torch.tensor([n - w for n, w in zip(lens, width)], device=tokens.device)
    last = torch.tensor(width, device=tokens.device) - 1
    cols = torch.arange(max(width), device=tokens.device)
    index = start[:, None] + torch.minimum(cols[None, :], last[:, None])  # pad: repeat the last
    logits, _ = model(tokens.gather(1, index), logits_index=last)
    return logits[:, -1]


@torch.no_grad()
def generate(model: GPT, idx, max_new_tokens: int, greedy: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_id: Optional[int] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None, seeds: Optional[Sequence[int]] = None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None,
             compile: Union[bool, str, Callable] = False):
    """Extend each prompt by up to ``max_new_tokens`` tokens.

    ``idx`` is a (B, T) tensor (returns (B, T + n), n the steps taken) or a list of token-id
    lists of any lengths, a ragged batch (returns a list: each prompt and its continuation, up
    to and including ``eos_id``). A row stops at ``eos_id`` (in the tensor, later positions of
    a stopped row repeat it); all stop when every row has. ``on_token`` gets each step's (B,)
    tokens. ``temperature=0`` is greedy. ``seeds`` (one int in [0, 2^63) per row) samples each
    row from its own seed instead of ``generator``: the same continuation in any batch and on
    any process (see :func:`row_uniforms`).

    With ``use_cache`` a static KV cache (one (B, Hkv, max_len, D) buffer per layer, written in
    place at each row's position) serves a decoding step of fixed shapes, which ``compile``
    compiles (see :func:`make_decode_step`). The cache is in contiguous mode (each row a prefix),
    so the prefill attends causally over the prompts' keys alone and each decoding step calls
    the split-KV kernel (:func:`llmkern.attention_with_kvcache`) with the rows' lengths. Rows
    are right-padded in the prefill, and a row never sees keys past its own position, so each
    row gets what it would get alone. Once a
    row's context is full, it reprocesses its last ``block_size`` tokens every step (learned
    positions cannot slide), exactly as without the cache.
    """
    prompts, as_tensor = _prompts(idx, model.config)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    greedy = greedy or temperature == 0.0
    if seeds is not None:
        seeds = _check_seeds(seeds, len(prompts), generator)
    model.eval()
    device = idx.device if torch.is_tensor(idx) else next(model.parameters()).device
    block = model.config.block_size
    lens = [len(p) for p in prompts]
    b, t0 = len(prompts), max(lens)
    tokens = torch.zeros(b, t0 + max_new_tokens, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, device=device)
    rows = torch.arange(b, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    # This loop writes each row at its next position: the rows are prefixes (contiguous mode).
    cache = KVCache(model.config, b, t0 + max_new_tokens, contiguous=True) if use_cache else None
    step_fn = make_decode_step(compile, device) if use_cache else None
    steps = 0
    lens_t = torch.tensor(lens, device=device)  # on the device; ``lens`` mirrors it on the host
    # row r's number for each position it may write, hashed up front: (B, max_new_tokens)
    uniforms = None if seeds is None or greedy else row_uniforms(
        seeds[:, None], torch.tensor(lens)[:, None] + torch.arange(max_new_tokens)).to(device)
    for steps in range(1, max_new_tokens + 1):
        if cache is None:
            logits = _windows(model, tokens, lens)
        elif steps == 1:  # prefill, right-padded: a row's padding lies after its positions
            pos = torch.arange(t0, device=device).expand(b, t0)
            logits, _ = model(tokens[:, :t0], cache=cache, input_pos=pos, logits_index=lens_t - 1)
            logits = logits[:, -1]
            cache.set_lengths(lens_t)
        else:
            pos = (lens_t - 1).clamp(max=cache.max_len - 1)[:, None]
            logits = step_fn(model, tokens.gather(1, lens_t[:, None] - 1), pos, cache)
            full = [i for i, n in enumerate(lens) if n > block]
            if full:  # these rows wrote nothing useful above; recompute them
                index = torch.tensor(full, device=device)
                logits = logits.clone()
                logits[index] = _windows(model, tokens[index], [lens[i] for i in full])
        nxt = _next_token(logits, greedy, temperature, top_k, top_p, generator,
                          None if uniforms is None else uniforms[:, steps - 1])
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        tokens[rows, lens_t] = nxt
        lens_t += 1
        lens = [n + 1 for n in lens]
        if on_token is not None:
            on_token(nxt)
        if eos_id is not None and bool(done.all()):
            break
    if as_tensor:
        return tokens[:, :t0 + steps]
    out = []
    for p, row in zip(prompts, tokens[:, :t0 + steps].tolist()):
        new = row[len(p):len(p) + steps]
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id) + 1]
        out.append(p + new)
    return out


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

SEPARATOR = "\n--- response ---\n"  # between an instruction prompt and the model's answer


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmkern.backends import CHOICES
    from llmkern.cli import add_threads_argument

    p.add_argument("--ckpt", required=True, help="checkpoint directory or training run directory")
    p.add_argument("--prompt", default=None,
                   help="text to continue (default: the start of a document)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="many prompts at once: one per line, or JSONL ({\"prompt\": ...} or a "
                        "string per line); prints each completion and the throughput")
    p.add_argument("--batch-size", type=_number(int, 0), default=16,
                   help="prompts generated together (ragged batch) with --prompts")
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
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (CUDA graphs on a GPU; slow to start)")
    p.add_argument("--raw", action="store_true",
                   help="for an --sft checkpoint, do not wrap the prompt in its prompt template")
    add_threads_argument(p)


def read_prompts(path: str) -> List[str]:
    """Prompts of a --prompts file: JSONL (objects with "prompt", or strings) or one per line."""
    from llmkern.cli import CLIError

    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(f"--prompts {path}: not valid UTF-8 (byte {exc.start})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise CLIError(f"--prompts {path}: no prompts in the file")
    if not (path.endswith(".jsonl") or all(line.lstrip().startswith(("{", '"')) for _, line in lines)):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CLIError(f"--prompts {path}:{n}: not JSON ({exc.msg})") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise CLIError(f"--prompts {path}:{n}: expected a string or an object with a "
                           f"\"prompt\" string")
        prompts.append(prompt)
    return prompts


def _encode(tok, prompt: Optional[str], sft: bool, block: int, where: str) -> List[int]:
    from llmkern.cli import CLIError
    from llmkern.data import format_prompt

    if prompt is None:
        return [tok.eos_id]  # the start of a document
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in argv arrive as lone surrogates
        raise CLIError(f"{where} is not valid UTF-8 text") from None
    if not prompt:
        raise CLIError(f"{where} is empty (leave out --prompt to start a document)")
    ids = tok.encode(format_prompt(prompt) if sft else prompt)
    if len(ids) > block:
        raise CLIError(f"{where} has {len(ids)} tokens, more than the model's context of {block}")
    return ids


def run(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from llmkern.checkpoint import load_model
    from llmkern.cli import CLIError, apply_threads
    from llmkern.train import _resolve_device

    if args.prompt is not None and args.prompts is not None:
        raise CLIError("give --prompt or --prompts, not both")
    device = _resolve_device(args.device)
    texts = read_prompts(args.prompts) if args.prompts is not None else [args.prompt]
    model, tok, meta = load_model(args.ckpt, backend=args.backend, device=device)
    apply_threads(args.threads, model.num_params())  # the model's size decides the default
    sft = bool(meta.get("train", {}).get("sft")) and not args.raw
    block = model.config.block_size
    ids = [_encode(tok, text, sft, block, "--prompt" if args.prompts is None else
                   f"--prompts {args.prompts}: prompt {i + 1}") for i, text in enumerate(texts)]
    if args.seed is not None:
        torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    many = args.prompts is not None

    def head(text: Optional[str]) -> str:  # what precedes a completion
        return "" if text is None else text + (SEPARATOR if sft else "")
    n_new, t0 = 0, time.perf_counter()
    with amp:
        for start in range(0, len(ids), args.batch_size if many else 1):
            batch = ids[start:start + (args.batch_size if many else 1)]
            texts_b = texts[start:start + len(batch)]
            if many:
                sys.stdout.write(f"=== prompt {start + 1} ===\n")
            sys.stdout.write(head(texts_b[0]))
            sys.stdout.flush()
            if args.beams > 1:
                outs = []
                for i, prompt in enumerate(batch):
                    seq, _ = beam_search(model, prompt, args.beams, args.max_new_tokens,
                                         args.length_penalty, tok.eos_id, device)
                    outs.append(prompt + seq)
                    if i == 0:
                        print(tok.decode([t for t in seq if t != tok.eos_id]))
            else:
                streamer = TextStreamer(tok)
                outs = generate(model, batch, args.max_new_tokens, greedy=args.greedy,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                eos_id=tok.eos_id, generator=generator, compile=args.compile,
                                on_token=lambda t: streamer.put(int(t[0])))
                streamer.end()
            for i, (prompt, out) in enumerate(zip(batch, outs)):
                new = [t for t in out[len(prompt):] if t != tok.eos_id]
                n_new += len(out) - len(prompt)
                if i > 0:
                    sys.stdout.write(f"=== prompt {start + i + 1} ===\n{head(texts_b[i])}"
                                     f"{tok.decode(new)}\n")
    if many:
        seconds = time.perf_counter() - t0
        print(f"llmkern generate: {n_new} tokens for {len(ids)} prompts in {seconds:.2f} s: "
              f"{n_new / max(seconds, 1e-9):.1f} tokens/s", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from llmkern.cli import run_command

    return run_command(sys.modules[__name__], argv, "generate")
