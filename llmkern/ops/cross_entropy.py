"""cross_entropy and linear_cross_entropy (fused LM head + loss): functional API and checks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmkern import reference
from llmkern.backends import (KERNEL_DTYPES, Backend, OpBackends, dtype_reason,
                              interpreter_bf16_reason)
from llmkern.ops import cuda_ext
from llmkern.ops._checks import (ANY_FLOAT, autocast_inputs, check_int, check_same_device,
                                 check_same_dtype, check_tensor, describe)

AUTO_ORDER = ("triton", "cuda")
REDUCTIONS = ("mean", "sum", "none")
# Checking that targets lie in [0, V) costs one device sync per call; set False to skip it
# (out-of-range targets then give a NaN loss for their row in the kernels, never a bad read).
CHECK_TARGET_RANGE = True


# Logits of one token chunk of linear_cross_entropy stay under this many bytes (the chunk is
# the only (tokens x vocab) buffer; see chunk_rows).
LOGITS_CHUNK_BYTES = 256 << 20
CHUNK_ALIGN = 64


def _long(target: Tensor) -> Tensor:
    return target if target.dtype == torch.int64 else target.long()


# ---- backends ----------------------------------------------------------------------------------

def _ce_serves(logits, **_):
    # No tl.dot in the loss kernels: bf16 logits are exact under the Triton interpreter too.
    return dtype_reason(logits, KERNEL_DTYPES, "logits")


def _lce_triton_serves(hidden, **_):
    # dW accumulates through the Triton GEMM (tl.dot), which the CPU interpreter gets wrong in bf16.
    return dtype_reason(hidden, KERNEL_DTYPES, "hidden") or interpreter_bf16_reason(hidden)


def _lce_cuda_serves(hidden, **_):
    return dtype_reason(hidden, KERNEL_DTYPES, "hidden")


def _cuda_ce_fwd(logits2d, target, ignore_index, label_smoothing):
    return tuple(cuda_ext.call("cross_entropy_fwd", logits2d, _long(target), ignore_index,
                               label_smoothing))


def _cuda_ce_bwd(dloss, logits2d, target, lse, ignore_index, label_smoothing):
    return cuda_ext.call("cross_entropy_bwd", dloss.float().contiguous(), logits2d, _long(target),
                         lse, ignore_index, label_smoothing)


CROSS_ENTROPY = OpBackends("cross_entropy", (
    Backend("triton", serves=_ce_serves,
            impl={"fwd": "llmkern.kernels.cross_entropy:cross_entropy_fwd",
                  "bwd": "llmkern.kernels.cross_entropy:cross_entropy_bwd"}),
    Backend("cuda", serves=_ce_serves, impl={"fwd": _cuda_ce_fwd, "bwd": _cuda_ce_bwd}),
), auto_order=("triton", "cuda"))


def _triton_lce_chunk(logits, t, ignore_index, smoothing, dl, loss, lse):
    """Loss and lse of one chunk into ``loss``/``lse``; with ``dl`` the gradient is written over
    ``logits`` in the same launch. Returns dlogits (or None)."""
    from llmkern.kernels.cross_entropy import cross_entropy_fwd_grad

    cross_entropy_fwd_grad(logits, t, ignore_index, smoothing, dl,
                           logits if dl is not None else None, loss, lse)
    return logits if dl is not None else None


def _cuda_lce_chunk(logits, t, ignore_index, smoothing, dl, loss, lse):
    lc, sc = cuda_ext.call("cross_entropy_fwd", logits, _long(t), ignore_index, smoothing)
    loss.copy_(lc)
    lse.copy_(sc)
    if dl is None:
        return None
    rows_dl = dl.expand(logits.shape[0]) if dl.dim() == 0 else dl
    return cuda_ext.call("cross_entropy_bwd", rows_dl.float().contiguous(), logits, _long(t), sc,
                         ignore_index, smoothing)


def _triton_accumulate_dweight(dlogits: Tensor, h: Tensor, out: Tensor, accumulate: bool) -> None:
    """out = dlogits^T h (+ out when ``accumulate``), the add done in the GEMM's epilogue on its
    fp32 accumulator: no separate pass over dW."""
    from llmkern.kernels.matmul import gemm

    gemm(dlogits.t(), h, residual=out if accumulate else None, out=out)


def _cuda_accumulate_dweight(dlogits: Tensor, h: Tensor, out: Tensor, accumulate: bool) -> None:
    """The same through cuBLASLt (csrc/linear.cu): half-precision operands, an fp32 (or the
    operands' dtype) ``out`` as C and D, beta = 1 to accumulate and 0 (``out`` never read) else."""
    cuda_ext.call("dweight_accumulate", out, dlogits, h, bool(accumulate))


class DWeightAccumulator:
    """d(weight) = sum over token chunks of dlogits_c^T h_c, for the chunk loops of the LM-head
    ops (linear_cross_entropy, linear_logprobs); ``add`` runs the backend's "dweight" callable.

    Order (V x C weight of element size b, n chunks): the chunk GEMMs chain through one fp32
    buffer, each adding its product in the GEMM epilogue (C = A B + C): the first chunk writes the
    buffer without reading it (beta = 0, no zero fill: 4VC bytes), each later chunk reads and
    writes it once (8VC), and one cast gives the weight's dtype (4VC + bVC). With a single chunk,
    or an fp32 weight, the GEMM writes dW itself (bVC, no buffer, no cast). In all:
    8(n - 1)VC + 4VC + (4 + b)VC. Formerly the buffer was zero-filled (4VC) and always cast, and
    on the cuda backend each chunk wrote its product (bVC), read it back and added it
    (bVC + 8VC): (8 + 2b)n VC + 4VC + (4 + b)VC. (torch's ``addmm`` cannot serve the cuda
    backend: its fp32-output form wants the added input in the operands' dtype; a cuBLASLt op
    with fp32 C/D does.) Only one chunk of logits exists at any time either way.
    """

    def __init__(self, weight: Tensor, rows: int, chunk: int, table: OpBackends, backend: str):
        self.weight_dtype = weight.dtype
        direct = rows <= chunk or weight.dtype == torch.float32
        dtype = weight.dtype if direct else torch.float32
        self.out = torch.empty(weight.shape, device=weight.device, dtype=dtype)
        if rows == 0:
            self.out.zero_()
        self.table, self.backend, self.started = table, backend, False

    def add(self, dlogits: Tensor, h: Tensor) -> None:
        self.table.run("dweight", self.backend, dlogits, h, self.out, self.started)
        self.started = True

    def result(self) -> Tensor:
        return self.out if self.out.dtype == self.weight_dtype else self.out.to(self.weight_dtype)


LINEAR_CROSS_ENTROPY = OpBackends("linear_cross_entropy", (
    Backend("triton", serves=_lce_triton_serves,
            impl={"chunk": _triton_lce_chunk, "dweight": _triton_accumulate_dweight}),
    Backend("cuda", serves=_lce_cuda_serves,
            impl={"chunk": _cuda_lce_chunk, "dweight": _cuda_accumulate_dweight}),
), auto_order=("triton", "cuda"))


# ---- cross_entropy: per-row loss and lse, then dlogits -----------------------------------------

@torch.library.custom_op("llmkern::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits2d: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                      backend: str) -> tuple[Tensor, Tensor]:
    """(loss, lse), both float32 (rows,); loss is 0 on ignore_index rows."""
    return CROSS_ENTROPY.run("fwd", backend, logits2d, target, ignore_index, label_smoothing)


@cross_entropy_fwd.register_fake
def _(logits2d, target, ignore_index, label_smoothing, backend):
    loss = logits2d.new_empty(logits2d.shape[0], dtype=torch.float32)
    return loss, torch.empty_like(loss)


@torch.library.custom_op("llmkern::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(dloss: Tensor, logits2d: Tensor, target: Tensor, lse: Tensor, ignore_index: int,
                      label_smoothing: float, backend: str) -> Tensor:
    return CROSS_ENTROPY.run("bwd", backend, dloss, logits2d, target, lse, ignore_index,
                             label_smoothing)


@cross_entropy_bwd.register_fake
def _(dloss, logits2d, target, lse, ignore_index, label_smoothing, backend):
    return logits2d.new_empty(logits2d.shape)


def _ce_setup(ctx, inputs, output):
    logits2d, target, ignore_index, label_smoothing, backend = inputs
    ctx.save_for_backward(logits2d, target, output[1])
    ctx.opts = (ignore_index, label_smoothing, backend)


def _ce_backward(ctx, dloss, _dlse):
    logits2d, target, lse = ctx.saved_tensors
    return cross_entropy_bwd(dloss, logits2d, target, lse, *ctx.opts), None, None, None, None


cross_entropy_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


def _n_valid(target: Tensor, ignore_index: int) -> Tensor:
    return (target != ignore_index).sum().clamp(min=1)


def _reduce(rows: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return rows.view(target.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / _n_valid(target, ignore_index)  # 'mean' over non-ignored rows, 0 if none


# ---- linear_cross_entropy: chunks of tokens through LM head, loss and gradient ------------------

def chunk_rows(tokens: int, vocab: int, element_size: int) -> int:
    """Tokens per chunk: the most whose logits fit LOGITS_CHUNK_BYTES, evened out over the
    chunks (no small tail chunk) and rounded up to CHUNK_ALIGN rows for GEMM-friendly shapes."""
    most = max(LOGITS_CHUNK_BYTES // max(vocab * element_size, 1), 1)
    if most >= tokens:
        return max(tokens, 1)
    n_chunks = -(-tokens // most)
    even = -(-tokens // n_chunks)
    if even < CHUNK_ALIGN:  # huge rows: alignment would blow the budget
        return even
    return min(-(-even // CHUNK_ALIGN) * CHUNK_ALIGN, tokens)


def _lce_chunks(hidden, weight, target, ignore_index, smoothing, chunk, dloss, backend):
    """Per-row losses, and when ``dloss`` is given (0-dim: the same for every row, or (M,)),
    d(hidden) and d(weight) for those row weights. Only one (chunk x V) logits buffer exists;
    the triton backend writes the gradient over it in the same launch that computes the loss."""
    M, V = hidden.shape[0], weight.shape[0]
    f32 = torch.float32
    loss = hidden.new_empty(M, dtype=f32)
    lse = hidden.new_empty(M, dtype=f32)
    want_grad = dloss is not None
    dhidden = torch.empty_like(hidden) if want_grad else None
    dweight = DWeightAccumulator(weight, M, chunk, LINEAR_CROSS_ENTROPY, backend) if want_grad else None
    buf = hidden.new_empty((min(chunk, M), V))
    for start in range(0, M, chunk):
        end = min(start + chunk, M)
        h, t = hidden[start:end], target[start:end]
        logits = buf[: end - start]
        # cuBLAS for the two plain GEMMs: no epilogue to fuse, and it is the fastest GEMM there is.
        torch.mm(h, weight.t(), out=logits)
        dl = None if not want_grad else (dloss if dloss.dim() == 0 else dloss[start:end])
        dlogits = LINEAR_CROSS_ENTROPY.run("chunk", backend, logits, t, ignore_index, smoothing, dl,
                                           loss[start:end], lse[start:end])
        if want_grad:
            torch.mm(dlogits, weight, out=dhidden[start:end])
            dweight.add(dlogits, h)
    return loss, dhidden, dweight.result() if want_grad else None


@torch.library.custom_op("llmkern::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden2d: Tensor, weight: Tensor, target: Tensor, ignore_index: int,
                             label_smoothing: float, reduction: str, with_grad: bool, chunk_size: int,
                             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dhidden, dweight): loss reduced (0-dim) or per row ('none'); with ``with_grad``
    and reduction 'mean'/'sum' the gradients of the loss are computed here (the backward only
    scales them), else they are empty and the backward recomputes chunk by chunk."""
    precompute = with_grad and reduction != "none"
    scale = None
    if precompute:
        scale = (1.0 / _n_valid(target, ignore_index).float()) if reduction == "mean" else \
            hidden2d.new_ones((), dtype=torch.float32)
    rows, dh, dw = _lce_chunks(hidden2d, weight, target, ignore_index, label_smoothing, chunk_size,
                               scale, backend)
    loss = _reduce(rows, target, ignore_index, reduction)
    if not precompute:
        return loss, hidden2d.new_empty(0), weight.new_empty(0)
    return loss, dh, dw


@linear_cross_entropy_fwd.register_fake
def _(hidden2d, weight, target, ignore_index, label_smoothing, reduction, with_grad, chunk_size,
      backend):
    f32 = torch.float32
    loss = hidden2d.new_empty(hidden2d.shape[0], dtype=f32) if reduction == "none" else \
        hidden2d.new_empty((), dtype=f32)
    if with_grad and reduction != "none":
        return loss, torch.empty_like(hidden2d), torch.empty_like(weight)
    return loss, hidden2d.new_empty(0), weight.new_empty(0)


@torch.library.custom_op("llmkern::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(dloss: Tensor, hidden2d: Tensor, weight: Tensor, target: Tensor,
                             ignore_index: int, label_smoothing: float, chunk_size: int,
                             backend: str) -> tuple[Tensor, Tensor]:
    """(dhidden, dweight) for per-row (or 0-dim, every row) loss weights ``dloss``, recomputed."""
    _, dh, dw = _lce_chunks(hidden2d, weight, target, ignore_index, label_smoothing, chunk_size,
                            dloss.float(), backend)
    return dh, dw


@linear_cross_entropy_bwd.register_fake
def _(dloss, hidden2d, weight, target, ignore_index, label_smoothing, chunk_size, backend):
    return torch.empty_like(hidden2d), torch.empty_like(weight)


def _lce_setup(ctx, inputs, output):
    hidden2d, weight, target, ignore_index, label_smoothing, reduction, _, chunk_size, backend = inputs
    _, dh, dw = output
    ctx.save_for_backward(hidden2d, weight, target, dh, dw)
    ctx.opts = (ignore_index, label_smoothing, chunk_size, backend)
    ctx.reduction = reduction


def _lce_backward(ctx, dloss, _ddh, _ddw):
    hidden2d, weight, target, dh, dw = ctx.saved_tensors
    ignore_index, label_smoothing, chunk_size, backend = ctx.opts
    if dh.numel() == dw.numel() == 0 or dh.shape != hidden2d.shape:
        if ctx.reduction == "mean":
            dloss = dloss / _n_valid(target, ignore_index)
        dh, dw = linear_cross_entropy_bwd(dloss, hidden2d, weight, target, ignore_index,
                                          label_smoothing, chunk_size, backend)
        return dh, dw, None, None, None, None, None, None, None
    # The loss is a scalar: its gradients were computed in the forward at unit scale.
    return (dh * dloss.to(dh.dtype), dw * dloss.to(dw.dtype), None, None, None, None, None, None, None)


linear_cross_entropy_fwd.register_autograd(_lce_backward, setup_context=_lce_setup)


# ---- functional API ------------------------------------------------------------------------

def _check_target(op: str, target, rows_shape: torch.Size, vocab: int, ignore_index: int,
                  other: Tensor, other_name: str) -> None:
    check_tensor("target", target, op, dtypes=(torch.int64, torch.int32),
                 allow_empty=True)
    if target.shape != rows_shape:
        raise ValueError(f"llmkern.{op}: target must have shape {tuple(rows_shape)} (the leading "
                         f"dims of {other_name}, {describe(other)}), got {describe(target)}")
    check_same_device(op, **{other_name: other, "target": target})
    if not CHECK_TARGET_RANGE or torch.compiler.is_compiling() or target.numel() == 0:
        return
    # One reduction and one sync: any target outside [0, V) that is not ignore_index.
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        first = target[bad].flatten()[0].item()
        raise ValueError(f"llmkern.{op}: target holds class index {first} outside [0, {vocab}) "
                         f"(vocab size from {other_name}.shape[-1]) that is not ignore_index "
                         f"({ignore_index})")


def _check_options(op: str, reduction: str, label_smoothing: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"llmkern.{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"llmkern.{op}: label_smoothing must be in [0, 1], got {label_smoothing}")


def _reference_rows(fn, target: Tensor, reduction: str, rows: Tensor, *args, **kwargs) -> Tensor:
    """The torch reference on (rows, last dim) views: F.cross_entropy wants classes in dim 1."""
    loss = fn(rows.reshape(-1, rows.shape[-1]), *args, target.reshape(-1).long(),
              reduction=reduction, **kwargs)
    return loss.view(target.shape) if reduction == "none" else loss


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """Cross-entropy of ``logits`` (..., V) against class indices ``target`` (...).

    The loss is float32 (math in fp32 for fp16/bf16 logits). 'mean' averages over the rows
    whose target is not ``ignore_index`` (0 when every row is ignored, never NaN); 'none'
    returns per-row losses of shape ``target.shape`` (0 on ignored rows). ``label_smoothing``
    as in torch.nn.functional.cross_entropy.
    """
    op = "cross_entropy"
    check_tensor("logits", logits, op, dtypes=ANY_FLOAT)
    if logits.dim() < 1:
        raise ValueError(f"llmkern.{op}: logits must have at least 1 dimension (..., V), got "
                         f"{describe(logits)}")
    _check_options(op, reduction, label_smoothing)
    ignore_index = check_int("ignore_index", ignore_index, op)
    _check_target(op, target, logits.shape[:-1], logits.shape[-1], ignore_index, logits, "logits")
    chosen = CROSS_ENTROPY.choose(logits.device, backend, logits=logits)
    if chosen == "torch":
        return _reference_rows(reference.cross_entropy, target, reduction, logits,
                               ignore_index=ignore_index, label_smoothing=label_smoothing)
    rows, _ = cross_entropy_fwd(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                int(ignore_index), float(label_smoothing), chosen)
    return _reduce(rows, target, ignore_index, reduction)


def check_lm_head(op: str, hidden: Tensor, lm_weight: Tensor) -> tuple[Tensor, Tensor]:
    """The checks every fused LM-head op makes; returns the inputs cast as autocast would."""
    check_tensor("hidden", hidden, op, dtypes=ANY_FLOAT)
    check_tensor("lm_weight", lm_weight, op, ndim=2, dtypes=ANY_FLOAT)
    hidden, lm_weight = autocast_inputs(hidden, lm_weight)
    if lm_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"llmkern.{op}: lm_weight must have shape (vocab, {hidden.shape[-1]}) "
                         f"(nn.Linear layout) to match the last dim of hidden ({describe(hidden)}), "
                         f"got {describe(lm_weight)}")
    check_same_device(op, hidden=hidden, lm_weight=lm_weight)
    check_same_dtype(op, hidden=hidden, lm_weight=lm_weight)
    return hidden, lm_weight


def linear_cross_entropy(hidden: Tensor, lm_weight: Tensor, target: Tensor, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         backend: Optional[str] = None, chunk_size: Optional[int] = None,
                         bias: Optional[Tensor] = None, lse_square_scale: float = 0.0,
                         class_weight: Optional[Tensor] = None, softcap: Optional[float] = None,
                         return_z_loss: bool = False, return_lse: bool = False):
    """``cross_entropy(hidden @ lm_weight.T, target)`` without materializing all the logits.

    ``bias``, ``class_weight``, z-loss (``lse_square_scale``, ``return_z_loss``), ``softcap``
    and ``return_lse`` are served by :func:`llmkern.lm_head_loss` (see there).

    hidden (..., C), lm_weight (V, C) (nn.Linear layout), target (...). Tokens are processed in
    chunks of ``chunk_size`` rows (default: chosen from V and C to bound memory); gradients for
    hidden and lm_weight are computed in the forward pass and scaled in the backward.
    """
    op = "linear_cross_entropy"
    hidden, lm_weight = check_lm_head(op, hidden, lm_weight)
    _check_options(op, reduction, label_smoothing)
    ignore_index = check_int("ignore_index", ignore_index, op)
    if chunk_size is not None and check_int("chunk_size", chunk_size, op) < 1:
        raise ValueError(f"llmkern.{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_target(op, target, hidden.shape[:-1], lm_weight.shape[0], ignore_index, hidden, "hidden")
    if bias is not None or class_weight is not None or softcap is not None or lse_square_scale \
            or return_z_loss or return_lse:
        from llmkern.ops.lm_head_loss import lm_head_loss

        return lm_head_loss(hidden, lm_weight, target, bias, ignore_index, reduction,
                            label_smoothing, lse_square_scale, class_weight, return_z_loss,
                            return_lse, softcap, backend, chunk_size)
    chosen = LINEAR_CROSS_ENTROPY.choose(hidden.device, backend, hidden=hidden)
    if chosen == "torch":
        return _reference_rows(reference.linear_cross_entropy, target, reduction, hidden, lm_weight,
                               ignore_index=ignore_index, label_smoothing=label_smoothing)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_weight.requires_grad)
    chunk = chunk_size or chunk_rows(hidden.shape[:-1].numel(), lm_weight.shape[0], hidden.element_size())
    loss, _, _ = linear_cross_entropy_fwd(hidden.reshape(-1, hidden.shape[-1]), lm_weight,
                                          target.reshape(-1), int(ignore_index), float(label_smoothing),
                                          reduction, bool(with_grad), int(chunk), chosen)
    return loss.view(target.shape) if reduction == "none" else loss
