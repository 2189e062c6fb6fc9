// cuBLASLt GEMM plans shared by the linear layers (csrc/linear.cu): one GEMM description, run
// through a cached plan (descriptors, layouts and the heuristic's algorithm per shape, dtype,
// layout, epilogue, bias/aux presence and alignment) with a workspace kept per device and stream.
#pragma once

#include <ATen/core/Tensor.h>
#include <cublasLt.h>

#include <cstdint>

namespace llmkern {

struct Gemm {
  bool transa, transb;
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* d;
  int64_t ldd;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // bias, or the bias-gradient output for BGRAD epilogues
  void* aux = nullptr;
  int64_t ldaux = 0;
  bool d_fp32 = false;  // C/D in float32 whatever the A/B dtype (accumulating GEMMs)
  float beta = 0.f;     // D = A B + beta C with C = D
};

// Runs one GEMM; returns false (running nothing) when cuBLASLt finds no algorithm for it.
bool run_gemm(const Gemm& g, at::ScalarType st, const at::Tensor& like);
// run_gemm, or a RuntimeError naming the op, the shape and the dtype
void gemm_or_throw(const Gemm& g, at::ScalarType st, const at::Tensor& like, const char* op);
// number of cached plans
int64_t gemm_plan_count();

}  // namespace llmkern
