"""Launch helpers shared by the Triton kernels: row views, block sizes, program counts."""
from __future__ import annotations

import functools

import torch
import triton


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as (rows, last_dim) with a unit last stride, copying only when it must."""
    n = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, n)
    except RuntimeError:  # leading dims not collapsible into one stride
        return x.reshape(-1, n)


# Row kernels keep a whole row in registers up to ``max_block`` elements and loop over chunks
# of ``LOOP_BLOCK`` beyond it. Every block size a launcher can pick comes from here, so the
# ahead-of-time compile tests can enumerate them.
MIN_BLOCK = 128
LOOP_BLOCK = 4096


def warps_for_block(block: int) -> int:
    """About 8 elements per thread (16 at the largest block), 4 to 32 warps."""
    return max(4, min(32, block // 256))


def row_block(n: int, max_block: int) -> tuple[int, bool]:
    """(BLOCK_N, whole_row): the block for rows of ``n`` elements, and whether one block holds them."""
    block = max(triton.next_power_of_2(n), MIN_BLOCK)
    if block <= max_block:
        return block, True
    return LOOP_BLOCK, False


def row_blocks(max_block: int) -> list[tuple[int, bool]]:
    """Every (BLOCK_N, whole_row) that ``row_block`` can return for this ``max_block``."""
    blocks, b = [], MIN_BLOCK
    while b <= max_block:
        blocks.append((b, True))
        b *= 2
    return blocks + [(LOOP_BLOCK, False)]


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, per_sm: int = 4) -> int:
    """How many programs a persistent (grid-stride) kernel launches on ``device``."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
    return 4  # the CPU interpreter: few programs keep it quick
