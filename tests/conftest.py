"""Test setup: without a GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so it is set here,
before llmkern is imported.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import llmkern  # noqa: E402

DEVICE = torch.device("cuda") if HAS_GPU else torch.device("cpu")
# Backends whose kernels can run here (the torch reference is the oracle, not a subject).
KERNEL_BACKENDS = [b for b in llmkern.available_backends(DEVICE) if b != "torch"]
# fp16 and fp32 everywhere; bf16 only on a GPU (tl.dot on bf16 is broken in the interpreter).
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_GPU else [])
# `llmkern train` flags for a run that takes a second on a CPU.
TINY_TRAIN_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size", "4",
                    "--block-size", "16", "--eval-iters", "1", "--no-progress", "--no-plot",
                    "--device", "cpu"]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    """Each kernel backend available on this machine (triton here; triton and cuda on a GPU)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
