"""linear_logprobs: per-token log p(target) (and entropy) of ``hidden @ lm_weight.T / T``,
chunked over tokens so that the (tokens x vocab) logits exist one chunk at a time.

The per-token log-prob is minus the cross-entropy of that token, so the chunk kernels of
linear_cross_entropy serve it unchanged: with per-row weights ``dloss = -dlogp`` they write
``dlogp * (onehot - softmax)``, the gradient of ``dlogp * logp``, over the chunk's logits in the
same launch that finds its log-sum-exp. The entropy (asked for by policy losses as a bonus or a
metric) has its own row kernel (kernels/logprobs.py): the online log-sum-exp walk also sums
``exp(x - m) * x``, and the gradient of ``g * logp + e * H`` is written in place likewise.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkern.backends import Backend, OpBackends
from llmkern.ops._checks import check_finite, check_int
from llmkern.ops.cross_entropy import (DWeightAccumulator, _check_target,
                                       _cuda_accumulate_dweight, _cuda_lce_chunk, _lce_cuda_serves,
                                       _lce_triton_serves, _triton_accumulate_dweight,
                                       _triton_lce_chunk, check_lm_head, chunk_rows)


def reference_linear_logprobs(hidden: Tensor, lm_weight: Tensor, target: Tensor,
                              temperature: float = 1.0, ignore_index: int = -100,
                              return_entropy: bool = False):
    """Plain PyTorch: all the logits at once, log_softmax and gather, in fp32 (float64 stays)."""
    z = F.linear(hidden, lm_weight)
    z = (z if z.dtype == torch.float64 else z.float()) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, entropy


def _triton_entropy_chunk(z, t, ignore_index, logp, entropy, g, e, scale):
    """logp and entropy of one chunk; with row weights ``g``/``e`` the gradient of
    ``g * logp + e * H`` (times ``scale``) written over ``z`` in the same launch."""
    from llmkern.kernels.logprobs import logprobs_entropy

    logprobs_entropy(z, t, ignore_index, logp, entropy, g, e, scale,
                     z if g is not None else None)
    return z if g is not None else None


def _torch_entropy_chunk(z, t, ignore_index, logp, entropy, g, e, scale):
    """The same from torch ops on the chunk (fp32 copies of it): the cuda backend's entropy."""
    valid = t != ignore_index
    logq = torch.log_softmax(z.float(), dim=-1)
    q = logq.exp()
    ent = -(q * logq).sum(-1)
    lp = logq.gather(-1, torch.where(valid, t, torch.zeros_like(t)).long().unsqueeze(-1)).squeeze(-1)
    logp.copy_(lp * valid)
    entropy.copy_(ent * valid)
    if g is None:
        return None
    gv, ev = (g * valid * scale).unsqueeze(-1), (e * valid * scale).unsqueeze(-1)
    d = -gv * q - ev * q * (logq + ent.unsqueeze(-1))  # dH/dz = -q (log q + H)
    d.scatter_add_(-1, t.clamp(min=0).long().unsqueeze(-1), gv)
    z.copy_(d)
    return z


LINEAR_LOGPROBS = OpBackends("linear_logprobs", (
    Backend("triton", serves=_lce_triton_serves,
            impl={"chunk": _triton_lce_chunk, "entropy": _triton_entropy_chunk,
                  "dweight": _triton_accumulate_dweight}),
    Backend("cuda", serves=_lce_cuda_serves,
            impl={"chunk": _cuda_lce_chunk, "entropy": _torch_entropy_chunk,
                  "dweight": _cuda_accumulate_dweight}),
), auto_order=("triton", "cuda"))


def _chunks(hidden, weight, target, temperature, ignore_index, with_entropy, chunk, backend,
            dlogp=None, dentropy=None):
    """Forward (logp, entropy) or, with ``dlogp``, (dhidden, dweight) for those row weights
    (and ``dentropy``, possibly empty: no entropy term). One (chunk x V) logits buffer: the
    kernels write the gradient over it in the launch that reads it."""
    M, V = hidden.shape[0], weight.shape[0]
    f32 = torch.float32
    want_grad = dlogp is not None
    use_entropy = (dentropy.numel() > 0) if want_grad else with_entropy
    logp = hidden.new_empty(M, dtype=f32)
    scratch = hidden.new_empty(M, dtype=f32)  # lse, or the entropy when it is not returned
    entropy = hidden.new_empty(M if with_entropy else 0, dtype=f32) if not want_grad else scratch
    dhidden = torch.empty_like(hidden) if want_grad else None
    dweight = DWeightAccumulator(weight, M, chunk, LINEAR_LOGPROBS, backend) if want_grad else None
    buf = hidden.new_empty((min(chunk, M), V))
    inv_t = 1.0 / temperature
    for start in range(0, M, chunk):
        end = min(start + chunk, M)
        h, t = hidden[start:end], target[start:end]
        z = buf[: end - start]
        # 1/T applied inside the GEMM (fp32), before the one rounding to the logits' dtype
        torch.addmm(z, h, weight.t(), beta=0, alpha=inv_t, out=z)
        if use_entropy:
            g = dlogp[start:end].float().contiguous() if want_grad else None
            e = dentropy[start:end].float().contiguous() if want_grad else None
            dz = LINEAR_LOGPROBS.run("entropy", backend, z, t, ignore_index, logp[start:end],
                                     entropy[start:end], g, e, inv_t)
        else:
            # logp = -(cross-entropy); d z / d logits = 1/T rides on the row weights
            dl = (dlogp[start:end].float() * -inv_t).contiguous() if want_grad else None
            dz = LINEAR_LOGPROBS.run("chunk", backend, z, t, ignore_index, 0.0, dl,
                                     logp[start:end], scratch[start:end])
            logp[start:end].neg_()  # the kernels give loss 0 on ignored rows: logp 0 there too
        if want_grad:
            torch.mm(dz, weight, out=dhidden[start:end])
            dweight.add(dz, h)
    if want_grad:
        return dhidden, dweight.result()
    return logp, entropy


@torch.library.custom_op("llmkern::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(hidden2d: Tensor, weight: Tensor, target: Tensor, temperature: float,
                        ignore_index: int, with_entropy: bool, chunk_size: int,
                        backend: str) -> tuple[Tensor, Tensor]:
    """(logp (rows,), entropy (rows,) or empty), float32; both 0 on ignore_index rows."""
    return _chunks(hidden2d, weight, target, temperature, ignore_index, with_entropy, chunk_size,
                   backend)


@linear_logprobs_fwd.register_fake
def _(hidden2d, weight, target, temperature, ignore_index, with_entropy, chunk_size, backend):
    rows = hidden2d.shape[0]
    return (hidden2d.new_empty(rows, dtype=torch.float32),
            hidden2d.new_empty(rows if with_entropy else 0, dtype=torch.float32))


@torch.library.custom_op("llmkern::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(dlogp: Tensor, dentropy: Tensor, hidden2d: Tensor, weight: Tensor,
                        target: Tensor, temperature: float, ignore_index: int, chunk_size: int,
                        backend: str) -> tuple[Tensor, Tensor]:
    """(dhidden, dweight), recomputed chunk by chunk; ``dentropy`` empty: no entropy term."""
    return _chunks(hidden2d, weight, target, temperature, ignore_index, False, chunk_size, backend,
                   dlogp=dlogp, dentropy=dentropy)


@linear_logprobs_bwd.register_fake
def _(dlogp, dentropy, hidden2d, weight, target, temperature, ignore_index, chunk_size, backend):
    return torch.empty_like(hidden2d), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    hidden2d, weight, target, temperature, ignore_index, with_entropy, chunk_size, backend = inputs
    ctx.save_for_backward(hidden2d, weight, target)
    ctx.opts = (temperature, ignore_index, chunk_size, backend)
    ctx.with_entropy = with_entropy


def _backward(ctx, dlogp, dentropy):
    hidden2d, weight, target = ctx.saved_tensors
    if dlogp is None:
        dlogp = hidden2d.new_zeros(hidden2d.shape[0], dtype=torch.float32)
    if dentropy is None or not ctx.with_entropy:
        dentropy = hidden2d.new_empty(0, dtype=torch.float32)
    dh, dw = linear_logprobs_bwd(dlogp, dentropy, hidden2d, weight, target, *ctx.opts)
    return dh, dw, None, None, None, None, None, None


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup)


def linear_logprobs(hidden: Tensor, lm_weight: Tensor, target: Tensor, temperature: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False,
                    backend: Optional[str] = None, chunk_size: Optional[int] = None):
    """Per-token ``log softmax(hidden @ lm_weight.T / temperature)[target]`` in float32.

    hidden (..., C), lm_weight (V, C) (nn.Linear layout), target (...) -> logp of shape
    ``target.shape`` (0 where target is ``ignore_index``). With ``return_entropy`` also the
    entropy of each token's distribution (0 on ignored tokens): ``(logp, entropy)``. Tokens are
    processed in chunks of ``chunk_size`` rows (default: chosen from V and C to bound memory),
    so the full logits never exist; the backward recomputes them chunk by chunk.
    """
    op = "linear_logprobs"
    hidden, lm_weight = check_lm_head(op, hidden, lm_weight)
    temperature = check_finite("temperature", temperature, op)
    if temperature <= 0:
        raise ValueError(f"llmkern.{op}: temperature must be > 0, got {temperature}")
    ignore_index = check_int("ignore_index", ignore_index, op)
    if chunk_size is not None and check_int("chunk_size", chunk_size, op) < 1:
        raise ValueError(f"llmkern.{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_target(op, target, hidden.shape[:-1], lm_weight.shape[0], ignore_index, hidden, "hidden")
    chosen = LINEAR_LOGPROBS.choose(hidden.device, backend, hidden=hidden)
    if chosen == "torch":
        return reference_linear_logprobs(hidden, lm_weight, target, temperature, ignore_index,
                                         bool(return_entropy))
    chunk = chunk_size or chunk_rows(hidden.shape[:-1].numel(), lm_weight.shape[0],
                                     hidden.element_size())
    logp, entropy = linear_logprobs_fwd(hidden.reshape(-1, hidden.shape[-1]), lm_weight,
                                        target.reshape(-1), temperature, int(ignore_index),
                                        bool(return_entropy), int(chunk), chosen)
    logp = logp.view(target.shape)
    return (logp, entropy.view(target.shape)) if return_entropy else logp
