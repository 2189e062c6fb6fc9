"""llmkern: fused Triton and CUDA C++ kernels for GPT-style language models.

The top-level ``kernels/`` folder installs as the subpackage ``llmkern.kernels``.
The CUDA extension ``llmkern._C`` is built from ``csrc/`` when torch (a CUDA build) is
importable at build time and a CUDA toolkit is found; ``LLMKERN_SKIP_CUDA_BUILD=1`` skips it.
Without it, ``llmkern.ops.cuda_ext`` can build the same sources just in time.
"""
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    """Return (ext_modules, cmdclass) for llmkern._C, or ([], {}) when it cannot be built here."""
    if os.environ.get("LLMKERN_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    import sys

    sys.path.insert(0, ROOT)
    import llmkern_build  # noqa: E402  (build settings shared with the JIT path)

    sources = [os.path.relpath(s, ROOT) for s in llmkern_build.sources()]
    if not sources:
        return [], {}
    home = llmkern_build.cuda_home()
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return [], {}
    # torch guesses the toolkit root from nvcc/libcudart and can get it wrong (-lcudart not found)
    os.environ["CUDA_HOME"] = home
    try:  # torch is only importable here when building without isolation (pip --no-build-isolation)
        import torch
        import torch.utils.cpp_extension as cpp
    except ImportError:
        return [], {}
    if torch.version.cuda is None:
        return [], {}
    cpp.CUDA_HOME = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", llmkern_build.DEFAULT_ARCHS)
    include, _, _ = llmkern_build.cublas_dirs()
    ext = cpp.CUDAExtension(
        name="llmkern._C",
        sources=sources,
        include_dirs=[llmkern_build.CSRC] + include,
        extra_compile_args={"cxx": llmkern_build.cxx_flags(), "nvcc": llmkern_build.nvcc_flags()},
        extra_link_args=llmkern_build.ldflags(),
        depends=llmkern_build.headers(),
    )
    return [ext], {"build_ext": cpp.BuildExtension.with_options(use_ninja=True)}


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
