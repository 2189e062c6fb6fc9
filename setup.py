"""llmkern: fused Triton and CUDA C++ kernels for GPT-style language models.

The top-level ``kernels/`` folder installs as the subpackage ``llmkern.kernels``.
The CUDA extension ``llmkern._C`` is built from ``csrc/`` when torch (a CUDA build) is
importable at build time and a CUDA toolkit is found; ``LLMKERN_SKIP_CUDA_BUILD=1`` skips it.
Without it, ``llmkern.ops.cuda_ext`` can build the same sources just in time.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    """Return (ext_modules, cmdclass) for llmkern._C, or ([], {}) when it cannot be built here."""
    if os.environ.get("LLMKERN_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:  # torch is only importable here when building without isolation (pip --no-build-isolation)
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from llmkern_build import nvcc_flags, cxx_flags  # noqa: E402  (shared with the JIT path)

    ext = CUDAExtension(
        name="llmkern._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()},
        libraries=["cublasLt", "cublas"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="llmkern",
    version="0.1.0",
    description="Fused Triton and CUDA C++ kernels for GPT-style language models",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["llmkern", "llmkern.ops", "llmkern.integrations", "llmkern.bench", "llmkern.kernels"],
    package_dir={"llmkern.kernels": "kernels"},
    py_modules=["llmkern_build"],
    install_requires=["torch>=2.5", "triton>=3.1; platform_system=='Linux'", "numpy", "tqdm"],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark", "pytest-xdist", "ninja", "pybind11",
                "transformers>=4.48", "tokenizers", "safetensors", "matplotlib"],
        "hf": ["transformers>=4.48", "tokenizers", "safetensors"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["llmkern=llmkern.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
