"""Provider factories shared by the op benchmarks: llmkern backends, torch eager, torch.compile,
SDPA backends and Liger-Kernel (each n/a with a reason where it cannot run)."""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from llmkern.bench.core import Case, Provider, RunConfig, Unsupported

Make = Callable[[Case, RunConfig], Callable[[dict], torch.Tensor]]

TRITON_CPU_NOTE = ("not run on CPU unless asked (--providers llmkern-triton, with TRITON_INTERPRET=1 "
                   "set before starting): the Triton interpreter is very slow")


def _llmkern_available(backend: str) -> Callable[[RunConfig], Optional[str]]:
    def check(cfg: RunConfig) -> Optional[str]:
        from llmkern.backends import backend_unavailable

        if backend == "triton" and cfg.device.type != "cuda" and not cfg.asked_for("llmkern-triton"):
            return TRITON_CPU_NOTE
        return backend_unavailable(backend, cfg.device)
    return check


def llmkern_providers(call: Callable[[dict, Case, str], torch.Tensor]) -> list:
    """llmkern-triton and llmkern-cuda: ``call(inputs, case, backend)`` through the public API.

    An AttributeError/ImportError (the op is not in this build yet) is raised at build time, so the
    provider shows n/a with that reason.
    """
    def make(backend: str) -> Make:
        def build(case: Case, cfg: RunConfig):
            return lambda inputs: call(inputs, case, backend)
        return build

    return [Provider(f"llmkern-{b}", make(b), role="subject", available=_llmkern_available(b))
            for b in ("triton", "cuda")]


def torch_provider(make: Make, name: str = "torch", check: bool = True) -> Provider:
    return Provider(name, make, role="reference", check=check)


def _compile_available(cfg: RunConfig) -> Optional[str]:
    if cfg.device.type != "cuda" and cfg.quick and not cfg.asked_for("torch.compile"):
        return "not run in --quick mode on CPU (compiling takes longer than the whole run)"
    try:
        import torch._dynamo  # noqa: F401
    except Exception as exc:  # pragma: no cover - platform dependent
        return f"torch.compile unavailable: {exc}"
    return None


def compile_provider(make_eager: Make) -> Provider:
    """torch.compile of the eager reference; a fresh dynamo cache per case, so the recompile limit
    can never make it fall back to eager silently across many shapes."""
    def build(case: Case, cfg: RunConfig):
        import torch._dynamo

        torch._dynamo.reset()
        kwargs = {"dynamic": False}
        if cfg.compile_mode:
            kwargs["mode"] = cfg.compile_mode
        return torch.compile(make_eager(case, cfg), **kwargs)

    return Provider("torch.compile", build, role="reference", available=_compile_available)


SDPA_BACKENDS = (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION"),
                 ("sdpa-cudnn", "CUDNN_ATTENTION"))


def _sdpa_backend(attr: str):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, attr)


def sdpa_providers() -> list:
    """One provider per SDPA backend, forced with torch.nn.attention.sdpa_kernel."""
    def make(attr: str) -> Make:
        def build(case: Case, cfg: RunConfig):
            import torch.nn.functional as F
            from torch.nn.attention import sdpa_kernel

            backend = _sdpa_backend(attr)
            causal = bool(case.params.get("causal", False))

            def fn(inputs):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"],
                                                          is_causal=causal)
            return fn
        return build

    def available(attr: str):
        def check(cfg: RunConfig) -> Optional[str]:
            try:
                _sdpa_backend(attr)
            except Exception as exc:
                return f"this torch has no SDPA backend {attr}: {exc}"
            if cfg.device.type != "cuda" and attr != "FLASH_ATTENTION":
                return f"SDPA's {attr.lower()} backend needs a CUDA device"
            return None
        return check

    return [Provider(name, make(attr), role="reference", available=available(attr))
            for name, attr in SDPA_BACKENDS]


def liger_provider(function_path: str, call: Callable) -> Provider:
    """Liger-Kernel, when importable: ``call(fn, inputs, case)`` with ``fn`` its functional op."""
    module_name, attr = function_path.rsplit(".", 1)

    def load():
        return getattr(importlib.import_module(module_name), attr)

    def available(cfg: RunConfig) -> Optional[str]:
        if cfg.device.type != "cuda":
            return "Liger-Kernel needs a CUDA device"
        try:
            load()
        except Exception as exc:
            return f"Liger-Kernel not importable ({type(exc).__name__}: {exc})"
        return None

    def build(case: Case, cfg: RunConfig):
        fn = load()
        return lambda inputs: call(fn, inputs, case)

    return Provider("liger", build, role="reference", available=available)


def default_dtype(cfg: RunConfig) -> torch.dtype:
    """bf16 on a GPU (what training uses), fp32 on a CPU (the interpreter cannot do bf16 dots)."""
    if cfg.dtype is not None:
        return cfg.dtype
    return torch.bfloat16 if cfg.device.type == "cuda" else torch.float32


def randn(shape, device, dtype, requires_grad=False, scale=1.0, shift=0.0):
    """Fresh normal values (never zeros), optionally scaled and shifted, as a leaf tensor."""
    t = torch.randn(shape, device=device, dtype=torch.float32) * scale + shift
    return t.to(dtype).requires_grad_(requires_grad)


def need(module, attr: str, what: str):
    """``getattr(module, attr)`` or Unsupported naming what is missing from this build."""
    fn = getattr(module, attr, None)
    if fn is None:
        raise Unsupported(f"{what} is not in this build of llmkern")
    return fn
