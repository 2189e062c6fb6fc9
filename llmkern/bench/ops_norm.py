"""Memory-bound row ops: LayerNorm, RMSNorm, softmax (GB/s against the measured copy bandwidth)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import llmkern
from llmkern import reference
from llmkern.bench.core import Case, OpSpec, RunConfig
from llmkern.bench.flops import rowwise_bytes
from llmkern.bench.providers import (compile_provider, default_dtype, liger_provider,
                                     llmkern_providers, randn, torch_provider)


def _shapes(cfg: RunConfig) -> list:
    """The targets' shapes on a GPU: 4096 rows of 1024, 4096 and 16384; tiny ones on a CPU."""
    if cfg.device.type == "cuda":
        return [(4096, 4096)] if cfg.quick else [(4096, 1024), (4096, 4096), (4096, 16384)]
    return [(64, 256)] if cfg.quick else [(64, 256), (128, 1000)]


def _cases(kind: str, cfg: RunConfig) -> list:
    dtype = default_dtype(cfg)
    params = {"layer_norm": 2, "rms_norm": 1, "softmax": 0}[kind]
    cases = []
    for rows, cols in _shapes(cfg):
        def make(device, requires_grad, rows=rows, cols=cols):
            inputs = {"x": randn((rows, cols), device, dtype, requires_grad)}
            if params >= 1:
                inputs["weight"] = randn((cols,), device, dtype, requires_grad, 0.1, 1.0)
            if params == 2:
                inputs["bias"] = randn((cols,), device, dtype, requires_grad, 0.1)
            return inputs

        elt = torch.empty((), dtype=dtype).element_size()
        cases.append(Case(f"M={rows} N={cols}", {"M": rows, "N": cols}, dtype, make,
                          lambda mode, r=rows, c=cols, e=elt: rowwise_bytes(r, c, e, mode, params)))
    return cases


# ---- LayerNorm ---------------------------------------------------------------------------

EPS = 1e-5


def _ln_eager(case, cfg):
    return lambda i: F.layer_norm(i["x"], (i["x"].shape[-1],), i["weight"], i["bias"], EPS)


def _ln_liger(fn, i, case):
    return fn(i["x"], i["weight"], i["bias"], EPS)


LAYER_NORM = OpSpec(
    "layer_norm", "GB/s", lambda cfg: _cases("layer_norm", cfg),
    llmkern_providers(lambda i, case, b: llmkern.layer_norm(i["x"], i["weight"], i["bias"], EPS,
                                                           backend=b))
    + [torch_provider(_ln_eager), compile_provider(_ln_eager),
       liger_provider("liger_kernel.transformers.functional.liger_layer_norm", _ln_liger)],
    oracle=lambda i, case: reference.layer_norm(i["x"].float(), i["weight"].float(), i["bias"].float(), EPS),
    description="LayerNorm over the last dim (weight and bias)")


# ---- RMSNorm -----------------------------------------------------------------------------

RMS_EPS = 1e-6


def _rms_eager(case, cfg):
    return lambda i: F.rms_norm(i["x"], (i["x"].shape[-1],), i["weight"], RMS_EPS)


def _rms_liger(fn, i, case):
    # in_place=False: Liger otherwise overwrites dy, which the timing loop reuses
    return fn(i["x"], i["weight"], RMS_EPS, offset=0.0, casting_mode="llama", in_place=False)


RMS_NORM = OpSpec(
    "rms_norm", "GB/s", lambda cfg: _cases("rms_norm", cfg),
    llmkern_providers(lambda i, case, b: llmkern.rms_norm(i["x"], i["weight"], RMS_EPS, backend=b))
    + [torch_provider(_rms_eager), compile_provider(_rms_eager),
       liger_provider("liger_kernel.transformers.functional.liger_rms_norm", _rms_liger)],
    oracle=lambda i, case: reference.rms_norm(i["x"].float(), i["weight"].float(), RMS_EPS),
    description="RMSNorm over the last dim (weight)")


# ---- softmax -----------------------------------------------------------------------------

def _softmax_eager(case, cfg):
    return lambda i: torch.softmax(i["x"], dim=-1)


SOFTMAX = OpSpec(
    "softmax", "GB/s", lambda cfg: _cases("softmax", cfg),
    llmkern_providers(lambda i, case, b: llmkern.softmax(i["x"], backend=b))
    + [torch_provider(_softmax_eager), compile_provider(_softmax_eager)],
    oracle=lambda i, case: torch.softmax(i["x"].float(), dim=-1),
    description="softmax over the last dim")

SPECS = [LAYER_NORM, RMS_NORM, SOFTMAX]
