// Tensor-core building blocks of the flash-attention kernels (sm_80+): mma.sync m16n8k16 with
// fp32 accumulators, ldmatrix fragment loads, cp.async tile copies into an XOR-swizzled
// shared-memory layout (16-byte chunk c of row r lives at chunk c ^ (r % 8), so the 8 rows an
// ldmatrix phase reads hit 8 different bank groups).
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A 16x16 (row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8  (k x n):     b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t+8.., n = g)
//   C 16x8  (fp32):      c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// so the C fragments of two adjacent n-tiles are exactly the A fragment of the next product
// (P = softmax(S) feeds P V without a trip through shared memory).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.h"

namespace llmkern {
namespace attn {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// element offset of (row, col) in a swizzled tile with LD elements per row (col % 8 == 0 for
// the 16-byte accesses that use it)
template <int LD>
__device__ __forceinline__ int swz(int row, int col) {
  return row * LD + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // src_bytes = 0 zero-fills the 16 bytes (rows past the end of the sequence)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// two floats -> one 32-bit register of two 16-bit values (lo in the low half)
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Copies rows [row0, row0 + ROWS) of a (rows, D) global matrix (row stride `stride`
// elements, 16-byte aligned rows) into a swizzled tile; rows >= nrows are zero-filled.
template <typename T, int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t stride, int row0, int nrows) {
  constexpr int CHUNKS = D / 8;
  for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += NT) {
    const int r = idx / CHUNKS, c = idx % CHUNKS;
    const int gr = row0 + r;
    const bool ok = gr < nrows;
    const T* src = g + (int64_t)(ok ? gr : 0) * stride + c * 8;
    cp_async16(smem_u32(s + swz<D>(r, c * 8)), src, ok ? 16 : 0);
  }
}

// A fragment (16 rows from r0, k-step ks) of a swizzled (rows, LD) tile
template <typename T, int LD>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* s, int r0, int ks) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, smem_u32(s + swz<LD>(r0 + (lane & 15), ks * 16 + ((lane >> 4) << 3))));
}

// acc[16 x NTILES*8] += A (16 x KSTEPS*16, rows r0.. of the swizzled tile sA) * B, where B's
// n-th column is row n0 + n of the swizzled tile sB (both tiles have LD = K elements per row).
template <typename T, int KSTEPS, int NTILES, int LD>
__device__ __forceinline__ void gemm_sA_sB(float (&acc)[NTILES][4], const T* sA, int r0, const T* sB, int n0) {
  static_assert(NTILES % 2 == 0, "n-tiles come in pairs");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
    uint32_t a[4];
    load_a<T, LD>(a, sA, r0, ks);
#pragma unroll
    for (int np = 0; np < NTILES / 2; ++np) {
      const int n = n0 + np * 16 + (lane & 7) + ((lane >> 4) << 3);
      const int k = ks * 16 + (((lane >> 3) & 1) << 3);
      uint32_t b[4];
      ldmatrix_x4(b, smem_u32(sB + swz<LD>(n, k)));
      mma16816<T>(acc[2 * np], a, b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x NTILES*8] += A (registers, 16 x KSTEPS*16) * B, where B's n-th column is row n0 + n
// of the swizzled tile sB (LD = K elements per row).
template <typename T, int KSTEPS, int NTILES, int LD>
__device__ __forceinline__ void gemm_rA_sB(float (&acc)[NTILES][4], const uint32_t (&a)[KSTEPS][4], const T* sB,
                                           int n0) {
  static_assert(NTILES % 2 == 0, "n-tiles come in pairs");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
    for (int np = 0; np < NTILES / 2; ++np) {
      const int n = n0 + np * 16 + (lane & 7) + ((lane >> 4) << 3);
      const int k = ks * 16 + (((lane >> 3) & 1) << 3);
      uint32_t b[4];
      ldmatrix_x4(b, smem_u32(sB + swz<LD>(n, k)));
      mma16816<T>(acc[2 * np], a[ks], b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a[ks], b[2], b[3]);
    }
  }
}

// acc[16 x NTILES*8] += A (registers, 16 x KSTEPS*16) * B, where B is rows k0.. (k) and
// columns 0.. (n) of the swizzled tile sB with LD elements per row (ldmatrix.trans).
template <typename T, int KSTEPS, int NTILES, int LD>
__device__ __forceinline__ void gemm_rA_sBt(float (&acc)[NTILES][4], const uint32_t (&a)[KSTEPS][4], const T* sB,
                                            int k0) {
  static_assert(NTILES % 2 == 0, "n-tiles come in pairs");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
    for (int np = 0; np < NTILES / 2; ++np) {
      const int k = k0 + ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
      const int n = np * 16 + ((lane >> 4) << 3);
      uint32_t b[4];
      ldmatrix_x4_trans(b, smem_u32(sB + swz<LD>(k, n)));
      mma16816<T>(acc[2 * np], a[ks], b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a[ks], b[2], b[3]);
    }
  }
}

// C fragments of 16 x NTILES*8 (fp32) -> A fragments of 16 x NTILES*8 (16-bit) for the next mma
template <typename T, int NTILES>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[NTILES / 2][4], const float (&c)[NTILES][4]) {
#pragma unroll
  for (int j = 0; j < NTILES / 2; ++j) {
    a[j][0] = pack2<T>(c[2 * j][0], c[2 * j][1]);
    a[j][1] = pack2<T>(c[2 * j][2], c[2 * j][3]);
    a[j][2] = pack2<T>(c[2 * j + 1][0], c[2 * j + 1][1]);
    a[j][3] = pack2<T>(c[2 * j + 1][2], c[2 * j + 1][3]);
  }
}

template <int NTILES>
__device__ __forceinline__ void zero(float (&c)[NTILES][4]) {
#pragma unroll
  for (int i = 0; i < NTILES; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// Stores a warp's 16 x NTILES*8 fp32 accumulator (times `mul`) to rows r0.. of a row-major
// (rows, NTILES*8) matrix with row stride `stride`; rows >= nrows are skipped.
template <typename T, int NTILES>
__device__ __forceinline__ void store_c(T* g, int64_t stride, int r0, int nrows, const float (&c)[NTILES][4],
                                        float mul) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + gq + 8 * h;
    if (r >= nrows) continue;
    T* row = g + (int64_t)r * stride;
#pragma unroll
    for (int nt = 0; nt < NTILES; ++nt) {
      const uint32_t v = pack2<T>(c[nt][2 * h] * mul, c[nt][2 * h + 1] * mul);
      *reinterpret_cast<uint32_t*>(row + nt * 8 + 2 * t) = v;
    }
  }
}

// What the kernels need to address one (batch, head) of a (B, H, S, D) tensor.
struct Strides {
  int64_t b, h, s;
};

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// A (B, H, S, D) operand the kernels can read with 16-byte copies: last dim contiguous, rows
// and base 16-byte aligned; anything else is copied to a contiguous tensor.
inline at::Tensor prepare(const at::Tensor& t) {
  const int64_t es = (int64_t)t.element_size();
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && ((t.stride(d) * es) % 16 == 0 || t.size(d) == 1);
  return ok ? t : t.contiguous();
}

inline bool supported_head_dim(int64_t d) { return d == 64 || d == 128; }

// Checks q (B, H, Sq, D), k/v (B, Hkv, Sk, D): CUDA, fp16/bf16, one dtype and device, GQA heads.
inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cuda(op, "q", q);
  check_cuda(op, "k", k);
  check_cuda(op, "v", v);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "llmkern_cuda::", op,
              ": q has unsupported dtype (", describe(q), "); expected float16 or bfloat16");
  check_same(op, "k", k, "q", q);
  check_same(op, "v", v, "q", q);
  TORCH_CHECK(q.dim() == 4, "llmkern_cuda::", op, ": q must be (B, H, Sq, D), got ", describe(q));
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, "llmkern_cuda::", op, ": k and v must be (B, Hkv, Sk, D), got k ",
              describe(k), ", v ", describe(v));
  TORCH_CHECK(k.sizes() == v.sizes(), "llmkern_cuda::", op, ": k and v must have one shape, got k ", describe(k),
              ", v ", describe(v));
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), "llmkern_cuda::", op,
              ": k must match q in batch and head_dim; q ", describe(q), ", k ", describe(k));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "llmkern_cuda::", op, ": q heads (", q.size(1),
              ") must be a multiple of k/v heads (", k.size(1), ") for grouped-query attention");
  TORCH_CHECK(supported_head_dim(q.size(3)), "llmkern_cuda::", op, ": head_dim ", q.size(3),
              " is not supported by the cuda backend (supported: 64, 128); q ", describe(q));
  TORCH_CHECK(q.numel() > 0 && k.numel() > 0, "llmkern_cuda::", op, ": empty input; q ", describe(q), ", k ",
              describe(k));
  TORCH_CHECK(q.size(2) < (int64_t(1) << 30) && k.size(2) < (int64_t(1) << 30), "llmkern_cuda::", op,
              ": sequence too long; q ", describe(q), ", k ", describe(k));
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535, "llmkern_cuda::", op,
              ": batch and heads must be <= 65535 (grid limits); q ", describe(q));
}

}  // namespace attn
}  // namespace llmkern
