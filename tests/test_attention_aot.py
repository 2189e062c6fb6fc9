"""Ahead-of-time compiles of every attention tile config the launchers can pick, for sm_80 and
sm_90, specialized like the JIT's launches: no register spills, shared memory within the
limits, and wgmma on sm_90 for half precision. No GPU needed (ptxas reads the registers).

Configs come from kernels/attention_common.shipped_configs; each compiles at the largest head
dim that uses it, plain ones with a causal sliding window, heavy ones and fp32 with every
feature on (window, softcap, additive mask, dropout). bf16 shares fp16's configs and code
shape (only the element type differs), so fp16 stands for both here.
"""
import dataclasses

import pytest

from llmkern.testing import aot_reports


def _reports(arch: int, dtype: str, part: str) -> list:
    return aot_reports("llmkern.kernels.attention", archs=(arch,), prefix="attn_" + part,
                       dtypes=[dtype])


@pytest.mark.parametrize("part", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("arch", [80, 90])
def test_every_shipped_attention_config_compiles(arch, dtype, part):
    # Split by arch, dtype and pass so that pytest-xdist spreads the compiles over its workers.
    reports = _reports(arch, dtype, part)
    names = [r.name for r in reports]
    for kind in (("fwd",) if part == "fwd" else ("bwd_dkdv", "bwd_dq")):
        assert any(f"attn_{kind}-{dtype}" in n for n in names)
    problems = [p for r in reports for p in r.problems()]
    assert problems == [], "\n".join(problems + [str(dataclasses.asdict(r)) for r in reports])
    if arch == 90:
        no_wgmma = [r.name for r in reports if "-fp16-" in r.name and not r.uses_wgmma]
        assert no_wgmma == [], f"half-precision configs without wgmma on sm_90: {no_wgmma}"


def test_config_helper_covers_every_head_dim():
    from llmkern.kernels.attention_common import ARCHS, KINDS, block_d, gpu_config

    for d in (16, 40, 64, 80, 96, 128, 160, 192, 256):
        bd = block_d(d)
        assert bd >= d and bd & (bd - 1) == 0
        for kind in KINDS:
            for arch in ARCHS:
                for fp32 in (False, True):
                    for heavy in (False, True):
                        bm, bn, warps, stages = gpu_config(kind, bd, fp32, arch, heavy)
                        assert bm >= 16 and bn >= 16 and warps in (4, 8) and stages >= 1
