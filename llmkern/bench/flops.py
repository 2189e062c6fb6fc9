"""Work counts behind the figures: FLOPs for attention and GEMMs, bytes for memory-bound ops.

Modes are 'fwd', 'bwd' and 'fwd+bwd'. FLOP counts: attention forward is
4*B*H*Sq*Sk*D (two matmuls), halved when causal, backward 2.5x forward (five matmuls, two of
them recomputation-free). A GEMM's backward is two GEMMs (dX and dW). Byte counts are the
fewest bytes the mode must move: each input read once and each output written once, so a
kernel that re-reads its input shows a lower GB/s, never a flattering one.
"""
from __future__ import annotations

MODES = ("fwd", "bwd", "fwd+bwd")
_BWD_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}  # GEMM-like: backward = 2x forward


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int,
                    causal: bool, mode: str) -> float:
    fwd = 4.0 * batch * heads * seq_q * seq_k * head_dim
    if causal:
        fwd /= 2.0
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[_check_mode(mode)]


def gemm_flops(m: int, n: int, k: int, mode: str) -> float:
    """(m, k) @ (k, n): 2mnk forward; backward computes dX and dW, 4mnk."""
    return 2.0 * m * n * k * _BWD_FACTOR[_check_mode(mode)]


def mlp_flops(tokens: int, hidden: int, ffn: int, mode: str) -> float:
    """GPT-2 MLP: hidden -> ffn -> hidden, two GEMMs (elementwise work is not counted)."""
    return gemm_flops(tokens, ffn, hidden, mode) + gemm_flops(tokens, hidden, ffn, mode)


def io_bytes(reads: float, writes: float, element_size: int) -> float:
    return float(reads + writes) * element_size


def rowwise_bytes(rows: int, cols: int, element_size: int, mode: str, params: int = 0) -> float:
    """Norms and softmax over (rows, cols) with ``params`` weight/bias vectors of length cols.

    fwd reads x, writes y; bwd reads x (or y) and dy, writes dx (and the parameter grads);
    fwd+bwd reads x and dy once and writes y and dx once.
    """
    n = rows * cols
    p = params * cols
    reads, writes = {"fwd": (n + p, n), "bwd": (2 * n + p, n + p),
                     "fwd+bwd": (2 * n + p, 2 * n + p)}[_check_mode(mode)]
    return io_bytes(reads, writes, element_size)


def cross_entropy_bytes(tokens: int, vocab: int, element_size: int, mode: str) -> float:
    """fwd reads the logits; bwd (and a fused fwd+bwd) reads them and writes their gradient."""
    n = tokens * vocab
    reads, writes = {"fwd": (n, 0), "bwd": (n, n), "fwd+bwd": (n, n)}[_check_mode(mode)]
    return io_bytes(reads, writes, element_size) + tokens * 8  # int64 targets


def rate(work: float, ms: float, unit: str) -> float:
    """Work per millisecond converted to TFLOP/s or GB/s."""
    scale = {"TFLOP/s": 1e12, "GB/s": 1e9}[unit]
    return work / (ms * 1e-3) / scale
