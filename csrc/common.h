// Shared helpers of the llmkern CUDA kernels: argument checks, dtype dispatch, vector
// loads, warp/block reductions. Kept free of torch/extension.h (pybind11) so that every .cu
// compiles quickly; only bindings.cpp pulls in the Python side.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>

namespace llmkern {

// ---- host-side checks (messages name the op, the argument, its shape and dtype) -----------

inline std::string describe(const at::Tensor& t) {
  std::string s = "shape [";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "], dtype " + std::string(c10::toString(t.scalar_type())) + ", device " + t.device().str();
}

inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "llmkern_cuda::", op, ": ", name, " is undefined; expected a CUDA tensor");
  TORCH_CHECK(t.is_cuda(), "llmkern_cuda::", op, ": ", name, " must be a CUDA tensor, got ", describe(t));
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat, "llmkern_cuda::", op, ": ", name,
              " has unsupported dtype (", describe(t), "); expected float16, bfloat16 or float32");
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "llmkern_cuda::", op, ": ", name, " is on ", t.device().str(), " but ",
              ref_name, " is on ", ref.device().str(), "; all inputs must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "llmkern_cuda::", op, ": ", name, " has dtype ",
              c10::toString(t.scalar_type()), " but ", ref_name, " has ", c10::toString(ref.scalar_type()),
              "; they must match");
}

inline void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "llmkern_cuda::", op, ": ", name, " must have shape [", n,
              "], got ", describe(t));
}

// (rows, n) view of a (..., n) tensor whose last dim is contiguous; copies only when the
// leading dims cannot be flattened into one strided dim. Returns the row stride.
inline at::Tensor rows_view(const at::Tensor& t, int64_t n, int64_t* row_stride) {
  at::Tensor v = t;
  if (t.stride(-1) != 1) v = t.contiguous();
  // reshape returns a view when possible, else a contiguous copy
  v = v.reshape({-1, n});
  if (v.stride(-1) != 1) v = v.contiguous();
  *row_stride = v.size(0) > 1 ? v.stride(0) : n;
  return v;
}

inline int num_sms(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

#define LLMKERN_DISPATCH_FLOAT(st, op, ...)                                                     \
  [&] {                                                                                        \
    switch (st) {                                                                              \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }                       \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }            \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                       \
      default: TORCH_CHECK(false, "llmkern_cuda::", op, ": unsupported dtype ", c10::toString(st)); \
    }                                                                                          \
  }()

// ---- device helpers ----------------------------------------------------------------------

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A 16-byte bundle of VEC = 16 / sizeof(T) elements.
template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// Loads elements [i, i + N) of a row of length n as floats; a 16-byte load when the whole
// bundle is in range and the row is 16-byte aligned, element loads otherwise (tail/unaligned).
// Out-of-range elements read as `fill`.
template <typename T>
__device__ __forceinline__ void load_vec(const T* row, int64_t i, int64_t n, bool aligned, float fill,
                                         float (&out)[Vec<T>::N]) {
  constexpr int N = Vec<T>::N;
  if (aligned && i + N <= n) {
    Vec<T> v = *reinterpret_cast<const Vec<T>*>(row + i);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_float(v.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = (i + k < n) ? to_float(row[i + k]) : fill;
  }
}

template <typename T>
__device__ __forceinline__ void store_vec(T* row, int64_t i, int64_t n, bool aligned, const float (&in)[Vec<T>::N]) {
  constexpr int N = Vec<T>::N;
  if (aligned && i + N <= n) {
    Vec<T> v;
#pragma unroll
    for (int k = 0; k < N; ++k) v.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Vec<T>*>(row + i) = v;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (i + k < n) row[i + k] = from_float<T>(in[k]);
  }
}

inline bool is_aligned16(const void* p, int64_t row_stride_elems, size_t elem) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && ((row_stride_elems * (int64_t)elem) % 16 == 0);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reductions; `scratch` holds >= 32 floats. Every thread gets the result. The
// trailing barrier lets the caller reuse `scratch` right away.
template <bool IS_MAX>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = IS_MAX ? warp_max(v) : warp_sum(v);
  if (nwarps == 1) return v;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < nwarps ? scratch[lane] : (IS_MAX ? -INFINITY : 0.f);
  r = IS_MAX ? warp_max(r) : warp_sum(r);
  __syncthreads();
  return r;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce<false>(v, scratch); }
__device__ __forceinline__ float block_max(float v, float* scratch) { return block_reduce<true>(v, scratch); }

// Sums a (parts, n) float32 buffer over its first dim in a fixed order: deterministic.
void sum_partials(const at::Tensor& partials, at::Tensor& out, cudaStream_t stream);

}  // namespace llmkern
