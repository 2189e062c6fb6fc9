"""llmkern: fused Triton and CUDA C++ kernels for GPT-style language models.

Functional ops take an optional ``backend=`` ('auto' | 'torch' | 'triton' | 'cuda'); the
default comes from ``use_backend``/``set_backend`` or the ``LLMKERN_BACKEND`` variable.
"""
__version__ = "0.1.0"

from llmkern.backends import available_backends, get_backend, set_backend, use_backend  # noqa: F401
from llmkern.ops.norm import layer_norm, rms_norm  # noqa: F401
from llmkern.ops.softmax import softmax  # noqa: F401
from llmkern.ops.mlp import linear_gelu, mlp  # noqa: F401
from llmkern.ops.cross_entropy import cross_entropy, linear_cross_entropy  # noqa: F401
from llmkern.ops.logprobs import linear_logprobs  # noqa: F401
from llmkern.ops.rotary import rotary  # noqa: F401
from llmkern.ops.lm_head_loss import lm_head_loss  # noqa: F401
from llmkern.ops.gated_mlp import gated_mlp, geglu_mlp, swiglu_mlp  # noqa: F401
from llmkern.ops.attention import attention, scaled_dot_product_attention, varlen_attention  # noqa: F401
from llmkern.ops.decode_attention import attention_with_kvcache  # noqa: F401
from llmkern import nn  # noqa: F401,E402


def __getattr__(name: str):
    # Subpackages with optional dependencies load on first use: `llmkern.integrations.transformers`
    # works after a plain `import llmkern`, which itself never imports transformers.
    if name == "integrations":
        import importlib

        return importlib.import_module("llmkern.integrations")
    raise AttributeError(f"module 'llmkern' has no attribute {name!r}")
