"""Flash-attention forward for Hopper (sm_90), Triton: TMA tiles and a warp-specialized loop.

What differs from ``attention_fwd.py`` (the portable kernel, which keeps attn_mask and dropout):
- Q, K, V and O move through device-side tensor descriptors (TMA, ``cp.async.bulk.tensor``),
  one per (sequence, head), whose shape is that sequence's length and the head dim: the copy
  engine zero-fills rows past the end and clips the output store, so odd lengths, varlen and
  head dims below BLOCK_D need no masks on the loads.
- The key loop is ``tl.range(..., warp_specialize=True)``: a producer warp issues the TMA loads
  while the consumer warpgroups run wgmma and the softmax (register reallocation, ``setmaxnreg``).
- 128-wide key tiles; scores scaled and max-subtracted in one FMA (qk * qk_out - m) with exp2.
- Tiles from ``hopper_config``: a bounded table keyed on (BLOCK_D, fp32, causal, softcap,
  long sequence), compiled ahead of time for sm_90 (``aot_configs``).

Device-side descriptors need a global scratch allocator (``triton.set_allocator``) on a GPU;
the launcher installs one per calling context when none is set (the interpreter needs none).
The output and lse match the portable kernel's, so either backward (the portable 7-GEMM one,
or the 5-GEMM one in ``attention_hopper_bwd.py``, ordered or atomic dQ) serves either forward;
``backward_kernel`` is the one place that says which serves a call.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_common import (_program_tile, _tanh, _visible_range, _wide_ids, aot_types,
                               block_d)
from .attention_options import AttentionOptions, AttentionShape, VarlenOffsets

KERNEL_ENV = "LLMKERN_ATTENTION_KERNEL"  # auto | hopper | flash
KERNEL_CHOICES = ("auto", "hopper", "flash")


# ---- kernel ------------------------------------------------------------------------------

@triton.jit
def _hopper_tiles(acc, l_i, m_i, q, desc_k, desc_v, lo, n_tiles, rows, offs_n, len_k, shift, left,
                  right, qk_in, qk_out, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr,
                  HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, WARP_SPEC: tl.constexpr,
                  PREC: tl.constexpr):
    # One loop over every visible key tile, masks on each: the warp-specialization pass of
    # triton 3.6/3.8 rejects a kernel with a second loop after the specialized one, and a
    # branch that masks only the edge tiles leaves the loop unspecialized (and spilling).
    for t in tl.range(0, n_tiles, warp_specialize=WARP_SPEC):
        start = lo + t * BLOCK_N
        k = desc_k.load([start, 0])
        qk = tl.dot(q, k.T, input_precision=PREC)
        if SOFTCAP:
            qk = _tanh(qk * qk_in)
        cols = start + offs_n
        ok = cols[None, :] < len_k
        if HAS_RIGHT:
            ok = ok & (cols[None, :] - rows[:, None] - shift <= right)
        if HAS_LEFT:
            ok = ok & (cols[None, :] - rows[:, None] - shift >= -left)
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_out)
        # A row with no visible key so far keeps m = -inf: subtract 0 instead (no NaN).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk * qk_out - m_use[:, None])  # scale and max in one FMA
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([start, 0])
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _hopper_fwd_kernel(Q, K, V, Out, Lse, CuQ, CuK,
                       sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                       slb, slh, sls, H, GROUP, seqlen_q, seqlen_k, left, right, qk_in, qk_out,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
                       HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, WARP_SPEC: tl.constexpr,
                       PREC: tl.constexpr):
    """One program per (query block, query head, sequence): Out and lse of its rows."""
    m0, h, b, q_start, k_start, len_q, len_k = _program_tile(CuQ, CuK, seqlen_q, seqlen_k, BLOCK_M,
                                                             IS_VARLEN)
    b64, h64, hk64 = _wide_ids(b, h, GROUP)
    # Descriptor extents are at least 1 row (an empty varlen sequence has none); a block with
    # no rows of its own addresses a row past the extent, where TMA reads zeros and drops stores.
    rows_q = tl.maximum(len_q, 1)
    rows_k = tl.maximum(len_k, 1)
    desc_q = tl.make_tensor_descriptor(Q + b64 * sqb + h64 * sqh + q_start * sqs,
                                       [rows_q, HEAD_DIM], [sqs, 1], [BLOCK_M, BLOCK_D])
    desc_k = tl.make_tensor_descriptor(K + b64 * skb + hk64 * skh + k_start * sks,
                                       [rows_k, HEAD_DIM], [sks, 1], [BLOCK_N, BLOCK_D])
    desc_v = tl.make_tensor_descriptor(V + b64 * svb + hk64 * svh + k_start * svs,
                                       [rows_k, HEAD_DIM], [svs, 1], [BLOCK_N, BLOCK_D])
    desc_o = tl.make_tensor_descriptor(Out + b64 * sob + h64 * soh + q_start * sos,
                                       [rows_q, HEAD_DIM], [sos, 1], [BLOCK_M, BLOCK_D])
    m_row = tl.where(m0 < len_q, m0, rows_q)
    shift = len_k - len_q
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = desc_q.load([m_row, 0])
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    lo, _, _, hi = _visible_range(m0, len_k, shift - left, shift + right, HAS_LEFT, HAS_RIGHT,
                                  BLOCK_M, BLOCK_N)
    # A block past its (varlen) sequence's end does no work (no early return: the
    # warp-specialization pass rejects that branch).
    n_tiles = tl.where(m0 < len_q, tl.cdiv(hi - lo, BLOCK_N), 0)
    acc, l_i, m_i = _hopper_tiles(acc, l_i, m_i, q, desc_k, desc_v, lo, n_tiles, rows, offs_n,
                                  len_k, shift, left, right, qk_in, qk_out, BLOCK_N, HAS_LEFT,
                                  HAS_RIGHT, SOFTCAP, WARP_SPEC, PREC)

    empty = l_i == 0.0  # the row saw no key: zeros and lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (1.0 / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    desc_o.store([m_row, 0], out.to(Out.dtype.element_ty))
    tl.store(Lse + b64 * slb + h64 * slh + q_start * sls + rows * sls, lse, mask=rows < len_q)


# ---- configs -----------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize) per (BLOCK_D, causal, softcap,
# long), half precision on sm_90. 128-wide key tiles (64 at head dim 256, for shared memory).
# With warp_specialize the compiler adds a producer warpgroup (TMA) to the consumers, which
# split BLOCK_M between two warpgroups of ``num_warps`` each (wgmma M = 64 per group), so
# num_warps is 4. Long sequences take 128 query rows, short ones 64 (more programs).
# Each entry compiles for sm_90 under triton 3.6 and 3.8 with wgmma, TMA and setmaxnreg, no
# spills and shared memory within the limit (``aot_configs``, tests/test_attention_hopper.py).
# fp32 (FMA products at ieee precision, no tensor cores) spills on this kernel's TMA tiles and
# stays on the portable kernel on a GPU; the interpreter runs it here for its accuracy.

LONG_SEQ = 1024  # queries per sequence from which 128-row blocks pay off
HOPPER_BLOCK_DS = (16, 32, 64, 128, 256)


def hopper_config(bd: int, causal: bool, softcap: bool, long: bool
                  ) -> tuple[int, int, int, int, bool]:
    del causal, softcap  # the same tiles serve them today; kept in the key for tuning
    if bd == 256:
        return (64, 64, 4, 2, True)
    if bd == 128:
        return (128, 128, 4, 2, True) if long else (64, 128, 4, 2, True)
    return (128, 128, 4, 3, True) if long else (64, 128, 4, 3, True)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_config(q: torch.Tensor, shape: AttentionShape, opts: AttentionOptions):
    bd = block_d(q.shape[-1])
    if _interpret():
        # Small tiles so that the tests' short sequences span several key tiles.
        return 16, 32, 4, 1, True
    return hopper_config(bd, opts.causal, opts.softcap > 0.0, shape.seqlen_q >= LONG_SEQ)


# ---- which forward kernel serves a call --------------------------------------------------

def kernel_choice() -> str:
    """The kernels the environment asks for (LLMKERN_ATTENTION_KERNEL): ``auto`` (on sm_90 CUDA
    tensors the Hopper forward for the calls it serves, and the backward ``backward_kernel``
    picks), ``hopper`` (the Hopper forward and its 5-GEMM backward wherever they serve, also
    under the interpreter) or ``flash`` (always the portable kernels)."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of {KERNEL_CHOICES}, got {choice!r}")
    return choice


def _tma_ready(t: torch.Tensor, name: str) -> Optional[str]:
    size = t.element_size()
    if t.stride(-1) != 1:
        return f"{name}'s last dim is strided"
    if t.data_ptr() % 16 or any((s * size) % 16 for s in t.stride()[:-1]):
        return f"{name} is not 16-byte aligned in memory and strides (TMA)"
    return None


def hopper_reason(q, k, v, attn_mask, opts: AttentionOptions) -> Optional[str]:
    """Why the Hopper forward cannot serve this call, or None. The device is not checked here
    (``use_hopper`` does): the logic runs on any tensors."""
    if attn_mask is not None:
        return "an attn_mask needs the portable kernel"
    if opts.dropout_p > 0.0:
        return "dropout needs the portable kernel"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    if q.dtype == torch.float32 and q.is_cuda:
        return "fp32 has no tensor-core path here (the portable kernel serves it)"
    if q.shape[-1] != v.shape[-1] or q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} (value {v.shape[-1]})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        reason = _tma_ready(t, name)
        if reason:
            return reason
    # The output is allocated contiguous: its rows must be 16-byte multiples too.
    if (q.shape[-1] * q.element_size()) % 16:
        return f"head_dim {q.shape[-1]} rows are not 16-byte multiples"
    return None


def _sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def use_hopper(q, k, v, attn_mask, opts: AttentionOptions) -> bool:
    """Whether the triton backend's forward runs on the Hopper kernel for this call."""
    choice = kernel_choice()
    if choice == "flash" or (choice == "auto" and not _sm90(q.device)):
        return False
    return hopper_reason(q, k, v, attn_mask, opts) is None


def served_by(device: torch.device) -> str:
    """The forward kernel an unmasked, dropout-free half-precision call gets on ``device``
    (``backward_served_by`` names the backward)."""
    choice = kernel_choice()
    if choice == "hopper" or (choice == "auto" and _sm90(device)):
        return "hopper (TMA, warp-specialized)"
    return "flash (portable)"


# ---- scratch for device-side descriptors -------------------------------------------------

def _scratch(size: int, alignment: int, stream: Optional[int], device=None) -> torch.Tensor:
    """Global scratch for the descriptors a kernel builds on the device (128-byte aligned,
    which torch's caching allocator gives every block)."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    return torch.empty(size, dtype=torch.int8, device=device)


def ensure_allocator(device: torch.device) -> bool:
    """Install ``_scratch`` as Triton's allocator in this context when none is set and the
    launch is on a GPU; returns whether one is now needed and present. The setting is a
    context variable, so autograd's backward threads and new threads install their own."""
    if device.type != "cuda" or _interpret():
        return False
    from triton.runtime import _allocation

    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_scratch)
    return True


# ---- launchers ---------------------------------------------------------------------------

def _fwd(q, k, v, out, lse, shape: AttentionShape, opts: AttentionOptions):
    d = q.shape[-1]
    bd = block_d(d)
    bm, bn, warps, stages, ws = launch_config(q, shape, opts)
    wl, wr, has_l, has_r = opts.window_args()
    qk_in, qk_out, cap = opts.score_args()
    cu_q, cu_k = shape.offsets(lse)
    ensure_allocator(q.device)
    grid = (triton.cdiv(shape.seqlen_q, bm), shape.heads, shape.batch)
    _hopper_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k, *shape.strides(q), *shape.strides(k), *shape.strides(v),
        *shape.strides(out), *shape.lse_strides(lse), shape.heads, shape.group, shape.seqlen_q,
        shape.seqlen_k, wl, wr, qk_in, qk_out, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        IS_VARLEN=shape.varlen is not None, HAS_LEFT=has_l, HAS_RIGHT=has_r, SOFTCAP=cap,
        WARP_SPEC=ws, PREC=opts.precision(q.dtype), num_warps=warps, num_stages=stages)


def _check(q, k, v, attn_mask, opts):
    reason = hopper_reason(q, k, v, attn_mask, opts)
    if reason:
        raise ValueError(f"llmkern hopper attention cannot serve q {tuple(q.shape)} {q.dtype}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}: {reason}")


def hopper_attention_fwd(q, k, v, opts: AttentionOptions):
    """(out (B, H, Sq, D) contiguous, lse (B, H, Sq) fp32) on the Hopper kernel."""
    _check(q, k, v, None, opts)
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    _fwd(q, k, v, out, lse, AttentionShape.dense(q, k), opts)
    return out, lse


def hopper_varlen_attention_fwd(q, k, v, varlen: VarlenOffsets, opts: AttentionOptions):
    """(out (total_q, H, D), lse (H, total_q) fp32) on the Hopper kernel."""
    _check(q, k, v, None, opts)
    total_q, h, _ = q.shape
    out = torch.empty(total_q, h, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(h, total_q, dtype=torch.float32, device=q.device)
    _fwd(q, k, v, out, lse, AttentionShape.packed(q, k, varlen), opts)
    return out, lse


def attention_fwd(q, k, v, attn_mask, opts: AttentionOptions):
    """The triton backend's forward: the Hopper kernel where ``use_hopper``, else the portable
    one."""
    if use_hopper(q, k, v, attn_mask, opts):
        return hopper_attention_fwd(q, k, v, opts)
    from .attention import attention_fwd as flash_fwd

    return flash_fwd(q, k, v, attn_mask, opts)


def varlen_attention_fwd(q, k, v, varlen: VarlenOffsets, opts: AttentionOptions):
    if use_hopper(q, k, v, None, opts):
        return hopper_varlen_attention_fwd(q, k, v, varlen, opts)
    from .attention import varlen_attention_fwd as flash_fwd

    return flash_fwd(q, k, v, varlen, opts)


# ---- which backward kernel serves a call -------------------------------------------------
# The triton backend's backward, by GPU and the call's ``deterministic`` (``backward_kernel``):
#   LLMKERN_ATTENTION_KERNEL=flash, or not sm_90     -> "flash": the portable 7-GEMM backward
#                                                       (no atomics, deterministic);
#   sm_90, deterministic=False                       -> "hopper-atomic": 5 GEMMs, fp32 atomic dQ;
#   sm_90, deterministic=True                        -> "hopper-ordered" (5 GEMMs, dQ summed in
#                                                       key-block order) when ORDERED_BWD_DEFAULT,
#                                                       else "flash";
#   LLMKERN_ATTENTION_KERNEL=hopper, any device      -> the 5-GEMM kernel, ordered or atomic as
#                                                       ``deterministic`` says (interpreter too).
# A call the Hopper kernels cannot serve (``hopper_reason``, a dout TMA cannot read) takes "flash".
# The ordered kernel becomes the sm_90 default once a GPU run shows it correct and faster.
ORDERED_BWD_DEFAULT = False
BWD_KERNELS = {
    "flash": "flash 7-GEMM (portable, deterministic)",
    "hopper-ordered": "hopper 5-GEMM, ordered dQ (deterministic)",
    "hopper-atomic": "hopper 5-GEMM, atomic dQ (not deterministic)",
}


def backward_kernel(major: Optional[int], deterministic: bool, choice: Optional[str] = None,
                    ordered_default: Optional[bool] = None) -> str:
    """The backward (a ``BWD_KERNELS`` key) for a call on a GPU of compute capability ``major``
    (None: no GPU, as under the interpreter); ``choice`` and ``ordered_default`` default to
    ``kernel_choice()`` and ``ORDERED_BWD_DEFAULT``. Pure logic: the table above."""
    choice = kernel_choice() if choice is None else choice
    ordered_default = ORDERED_BWD_DEFAULT if ordered_default is None else ordered_default
    if choice == "flash":
        return "flash"
    if choice == "hopper" or major == 9:
        if not deterministic:
            return "hopper-atomic"
        return "hopper-ordered" if choice == "hopper" or ordered_default else "flash"
    return "flash"


def _major(device: torch.device) -> Optional[int]:
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else None


def bwd_kernel_for(dout, q, k, v, attn_mask, opts: AttentionOptions) -> str:
    """The backward kernel this call runs on (a ``BWD_KERNELS`` key)."""
    name = backward_kernel(_major(q.device), opts.deterministic)
    if name != "flash" and (hopper_reason(q, k, v, attn_mask, opts) is not None
                            or _tma_ready(dout, "dout") is not None):
        return "flash"
    return name


def use_hopper_bwd(dout, q, k, v, attn_mask, opts: AttentionOptions) -> bool:
    """Whether the backward runs on the Hopper 5-GEMM kernel (ordered or atomic)."""
    return bwd_kernel_for(dout, q, k, v, attn_mask, opts) != "flash"


def backward_served_by(device: torch.device, deterministic: bool = True) -> str:
    """The backward an unmasked, dropout-free half-precision call gets on ``device``."""
    return BWD_KERNELS[backward_kernel(_major(device), deterministic)]


def attention_bwd(dout, q, k, v, out, lse, dlse, attn_mask, opts: AttentionOptions):
    """The triton backend's backward: the Hopper kernel where ``use_hopper_bwd``, else the
    portable one."""
    if use_hopper_bwd(dout, q, k, v, attn_mask, opts):
        from .attention_hopper_bwd import hopper_backward

        return hopper_backward(dout, q, k, v, out, lse, dlse, AttentionShape.dense(q, k), opts)
    from .attention import attention_bwd as flash_bwd

    return flash_bwd(dout, q, k, v, out, lse, dlse, attn_mask, opts)


def varlen_attention_bwd(dout, q, k, v, out, lse, dlse, varlen: VarlenOffsets,
                         opts: AttentionOptions):
    if use_hopper_bwd(dout, q, k, v, None, opts):
        from .attention_hopper_bwd import hopper_backward

        return hopper_backward(dout, q, k, v, out, lse, dlse, AttentionShape.packed(q, k, varlen),
                               opts)
    from .attention import varlen_attention_bwd as flash_bwd

    return flash_bwd(dout, q, k, v, out, lse, dlse, varlen, opts)


# ---- ahead-of-time compiles --------------------------------------------------------------

def shipped_configs(arch: int = 90) -> dict:
    """{config: largest BLOCK_D using it} for sm_90 (none elsewhere)."""
    found = {}
    if arch != 90:
        return found
    for bd in HOPPER_BLOCK_DS:
        for causal in (False, True):
            for softcap in (False, True):
                for long in (False, True):
                    cfg = hopper_config(bd, causal, softcap, long)
                    found[cfg] = max(found.get(cfg, 0), bd)
    return found


def aot_configs(arch: int = 90, dtypes=("fp16",)):
    """Every config ``hopper_config`` can pick, compiled at its largest head dim with every
    feature on (a causal sliding window and a softcap); sm_90 only. bf16 shares fp16's code
    shape, so fp16 stands for both."""
    from llmkern.testing import AOTConfig

    for (bm, bn, warps, stages, ws), bd in sorted(shipped_configs(arch).items()):
        for dt in dtypes:
            types = aot_types(_hopper_fwd_kernel, dt)
            yield AOTConfig(_hopper_fwd_kernel, types, dict(
                HEAD_DIM=bd, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IS_VARLEN=False, HAS_LEFT=True,
                HAS_RIGHT=True, SOFTCAP=True, WARP_SPEC=ws, PREC="ieee"), warps, stages,
                name=f"hopper_fwd-{dt}-d{bd}-{bm}x{bn}-w{warps}s{stages}{'-ws' if ws else ''}",
                ones=("sls",))
