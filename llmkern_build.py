"""Compiler flags for the CUDA extension, shared by setup.py and the just-in-time build."""


def cxx_flags():
    return ["-O3", "-std=c++17"]


def nvcc_flags():
    return ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "--expt-relaxed-constexpr"]
