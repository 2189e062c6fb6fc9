// Linear layers through cuBLASLt with fused epilogues.
//
// A row-major torch tensor read as column-major is its transpose, so y = x W^T (x: (M, K),
// W: (N, K), y: (M, N)) is computed as the column-major product y^T = W x^T:
//   D[N x M, ld N] = op_T(A = W stored K x N, ld K) * op_N(B = x stored K x M, ld K)
// and the epilogue's bias vector runs along D's rows (length N) as nn.Linear wants.
//   forward:       BIAS / GELU_AUX_BIAS (aux = the pre-activation, same layout as D)
//   dx = dy W:     D[K x M] = op_N(W stored K x N) * op_N(dy stored N x M)
//   dW = dy^T x:   D[K x N] = op_N(x stored K x M) * op_T(dy stored N x M), with BGRADB: the
//                  bias gradient (sum of dy over M) comes out of the same GEMM
//   linear_dgelu_bwd (MLP backward): dpre = (dz Wp) * gelu'(pre) and its bias gradient in one
//                  GEMM with DGELU_BGRAD.
// When cuBLASLt has no algorithm for an epilogue (unusual alignments), the plain GEMM runs and
// small deterministic kernels do the bias/GELU part. Descriptors and the heuristic's choice are
// cached per GEMM plan, the workspace per device and stream (gemm_plan.cu): a repeated call
// neither queries the heuristic nor allocates anything but its outputs.
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include "common.h"
#include "gemm_plan.h"
#include "ops.h"

namespace llmkern {
namespace {

// ---- small kernels for the epilogue fallbacks --------------------------------------------

constexpr float GELU_C = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float GELU_A = 0.044715f;

__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(GELU_C * (x + GELU_A * x * x * x)));
}

__device__ __forceinline__ float gelu_tanh_grad(float x) {
  const float t = tanhf(GELU_C * (x + GELU_A * x * x * x));
  return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * GELU_C * (1.f + 3.f * GELU_A * x * x);
}

// y[r, c] = (pre[r, c] + bias[c]) (pre updated in place when bias is given) and gelu(...)
template <typename T>
__global__ void bias_gelu_kernel(T* __restrict__ pre, const T* __restrict__ bias, T* __restrict__ y, int64_t total,
                                 int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    float v = to_float(pre[i]);
    if (bias != nullptr) {
      v += to_float(bias[i % n]);
      pre[i] = from_float<T>(v);
      v = to_float(pre[i]);  // gelu of the stored (rounded) pre-activation, as the epilogue does
    }
    if (y != nullptr) y[i] = from_float<T>(gelu_tanh(v));
  }
}

template <typename T>
__global__ void dgelu_kernel(const T* __restrict__ dy, const T* __restrict__ pre, T* __restrict__ dpre,
                             int64_t total) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    dpre[i] = from_float<T>(to_float(dy[i]) * gelu_tanh_grad(to_float(pre[i])));
}

// partial column sums of a (rows, n) matrix: block b sums rows b, b + gridDim.x, ...
template <typename T>
__global__ void colsum_partial_kernel(const T* __restrict__ a, float* __restrict__ part, int64_t rows, int64_t n) {
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
    float s = 0.f;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) s += to_float(a[r * n + c]);
    part[(int64_t)blockIdx.x * n + c] = s;
  }
}

unsigned elementwise_blocks(int64_t total) {
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, 65535 * 8));
}

void launch_bias_gelu(at::Tensor& pre, const at::Tensor& bias, at::Tensor* y) {
  const int64_t total = pre.numel(), n = pre.size(1);
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  LLMKERN_DISPATCH_FLOAT(pre.scalar_type(), "linear", [&] {
    bias_gelu_kernel<scalar_t><<<elementwise_blocks(total), 256, 0, stream>>>(
        (scalar_t*)pre.data_ptr(), bias.defined() ? (const scalar_t*)bias.data_ptr() : nullptr,
        y != nullptr ? (scalar_t*)y->data_ptr() : nullptr, total, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// deterministic column sums of a (rows, n) matrix into a float32 (n,) tensor
at::Tensor column_sums(const at::Tensor& a) {
  const int64_t rows = a.size(0), n = a.size(1);
  auto fopts = a.options().dtype(at::kFloat);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(rows, 256));
  at::Tensor part = at::empty({parts, n}, fopts);
  at::Tensor out = at::empty({n}, fopts);
  if (rows == 0) return out.zero_();
  auto stream = c10::cuda::getCurrentCUDAStream();
  LLMKERN_DISPATCH_FLOAT(a.scalar_type(), "linear", [&] {
    colsum_partial_kernel<scalar_t><<<(unsigned)parts, 256, 0, stream>>>((const scalar_t*)a.data_ptr(),
                                                                        part.data_ptr<float>(), rows, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  sum_partials(part, out, stream);
  return out;
}

// ---- argument checks -------------------------------------------------------------------

void check_linear(const char* op, const at::Tensor& x, const at::Tensor& w) {
  check_cuda(op, "x2d", x);
  check_cuda(op, "weight", w);
  check_float(op, "x2d", x);
  check_same(op, "weight", w, "x2d", x);
  TORCH_CHECK(x.dim() == 2, "llmkern_cuda::", op, ": x2d must be (M, K), got ", describe(x));
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "llmkern_cuda::", op,
              ": weight must be (N, K) with K = x2d.shape[1] = ", x.size(1), ", got ", describe(w));
  TORCH_CHECK(x.size(1) > 0 && w.size(0) > 0, "llmkern_cuda::", op, ": empty K or N; x2d ", describe(x),
              ", weight ", describe(w));
}

at::Tensor check_bias(const char* op, const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_cuda(op, "bias", *bias);
  check_same(op, "bias", *bias, "x2d", x);
  check_vector(op, "bias", *bias, n);
  return bias->contiguous();
}

void check_grad(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t m, int64_t n) {
  check_cuda(op, name, t);
  check_same(op, name, t, "x2d", x);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == m && t.size(1) == n, "llmkern_cuda::", op, ": ", name,
              " must have shape [", m, ", ", n, "], got ", describe(t));
}

// y^T[N x M] = W (op T of K x N) * x^T (K x M)
Gemm forward_gemm(const at::Tensor& x, const at::Tensor& w, at::Tensor& y) {
  Gemm g;
  g.transa = true;
  g.transb = false;
  g.m = w.size(0);
  g.n = x.size(0);
  g.k = x.size(1);
  g.a = w.data_ptr();
  g.lda = g.k;
  g.b = x.data_ptr();
  g.ldb = g.k;
  g.d = y.data_ptr();
  g.ldd = g.m;
  return g;
}

// dx, dW (and dbias via BGRADB) from dpre (M, N)
std::vector<at::Tensor> backward_gemms(const char* op, const at::Tensor& dpre, const at::Tensor& x,
                                       const at::Tensor& w, bool has_bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor dx = at::empty({M, K}, x.options());
  at::Tensor dw = at::empty({N, K}, x.options());
  at::Tensor db;
  if (M == 0) {
    return {dx, dw.zero_(), has_bias ? at::zeros({N}, x.options()) : at::empty({0}, x.options())};
  }
  Gemm gx;  // dx^T[K x M] = W^T stored (K x N) * dpre^T stored (N x M)
  gx.transa = false;
  gx.transb = false;
  gx.m = K;
  gx.n = M;
  gx.k = N;
  gx.a = w.data_ptr();
  gx.lda = K;
  gx.b = dpre.data_ptr();
  gx.ldb = N;
  gx.d = dx.data_ptr();
  gx.ldd = K;
  gemm_or_throw(gx, x.scalar_type(), x, op);

  Gemm gw;  // dW^T[K x N] = x^T stored (K x M) * op_T(dpre^T stored N x M)
  gw.transa = false;
  gw.transb = true;
  gw.m = K;
  gw.n = N;
  gw.k = M;
  gw.a = x.data_ptr();
  gw.lda = K;
  gw.b = dpre.data_ptr();
  gw.ldb = N;
  gw.d = dw.data_ptr();
  gw.ldd = K;
  bool done = false;
  if (has_bias) {
    db = at::empty({N}, x.options());
    gw.epilogue = CUBLASLT_EPILOGUE_BGRADB;
    gw.bias = db.data_ptr();
    done = run_gemm(gw, x.scalar_type(), x);
    if (!done) {  // no fused algorithm: plain GEMM and a deterministic column sum
      gw.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
      gw.bias = nullptr;
      db = column_sums(dpre).to(x.scalar_type());
    }
  } else {
    db = at::empty({0}, x.options());
  }
  if (!done) gemm_or_throw(gw, x.scalar_type(), x, op);
  return {dx, dw, db};
}

}  // namespace

void dweight_accumulate(const at::Tensor& out, const at::Tensor& dy_in, const at::Tensor& x_in, bool accumulate) {
  // out (N, K) float32 = dy^T x (+ out when accumulate) for dy (M, N), x (M, K): the chunked LM-head
  // losses chain their chunks' weight gradients through the GEMM's own accumulate (beta = 1)
  const char* op = "dweight_accumulate";
  check_cuda(op, "dy", dy_in);
  check_float(op, "dy", dy_in);
  check_cuda(op, "x", x_in);
  check_same(op, "x", x_in, "dy", dy_in);
  check_cuda(op, "out", out);
  TORCH_CHECK(dy_in.dim() == 2 && x_in.dim() == 2 && dy_in.size(0) == x_in.size(0), "llmkern_cuda::", op,
              ": dy must be (M, N) and x (M, K); got dy ", describe(dy_in), ", x ", describe(x_in));
  const int64_t M = x_in.size(0), K = x_in.size(1), N = dy_in.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == N && out.size(1) == K && out.is_contiguous() &&
                  out.device() == x_in.device() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == x_in.scalar_type()),
              "llmkern_cuda::", op, ": out must be a contiguous (", N, ", ", K, ") tensor of dtype float32 or ",
              c10::toString(x_in.scalar_type()), " on ", x_in.device().str(), ", got ", describe(out));
  TORCH_CHECK(N > 0 && K > 0, "llmkern_cuda::", op, ": empty N or K; dy ", describe(dy_in), ", x ", describe(x_in));
  c10::cuda::CUDAGuard guard(x_in.device());
  if (M == 0) {
    if (!accumulate) const_cast<at::Tensor&>(out).zero_();
    return;
  }
  at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  Gemm g;  // out^T[K x N] = x^T stored (K x M) * op_T(dy^T stored N x M), as the dW of backward_gemms
  g.transa = false;
  g.transb = true;
  g.m = K;
  g.n = N;
  g.k = M;
  g.a = x.data_ptr();
  g.lda = K;
  g.b = dy.data_ptr();
  g.ldb = N;
  g.d = out.data_ptr();
  g.ldd = K;
  g.d_fp32 = out.scalar_type() == at::kFloat;
  g.beta = accumulate ? 1.f : 0.f;
  gemm_or_throw(g, x.scalar_type(), x, op);
}

int64_t linear_cache_size() { return gemm_plan_count(); }

at::Tensor linear_fwd(const at::Tensor& x_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& bias_in) {
  const char* op = "linear_fwd";
  check_linear(op, x_in, w_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor bias = check_bias(op, bias_in, x, w.size(0));
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.size(0) == 0) return y;
  Gemm g = forward_gemm(x, w, y);
  if (bias.defined()) {
    g.epilogue = CUBLASLT_EPILOGUE_BIAS;
    g.bias = bias.data_ptr();
    if (run_gemm(g, x.scalar_type(), x)) return y;
    g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    g.bias = nullptr;
    gemm_or_throw(g, x.scalar_type(), x, op);
    launch_bias_gelu(y, bias, nullptr);
    return y;
  }
  gemm_or_throw(g, x.scalar_type(), x, op);
  return y;
}

std::vector<at::Tensor> linear_gelu_fwd(const at::Tensor& x_in, const at::Tensor& w_in,
                                        const c10::optional<at::Tensor>& bias_in) {
  const char* op = "linear_gelu_fwd";
  check_linear(op, x_in, w_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor bias = check_bias(op, bias_in, x, w.size(0));
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  at::Tensor pre = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.size(0) == 0) return {y, pre};
  Gemm g = forward_gemm(x, w, y);
  g.epilogue = bias.defined() ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
  g.bias = bias.defined() ? bias.data_ptr() : nullptr;
  g.aux = pre.data_ptr();
  g.ldaux = w.size(0);
  if (run_gemm(g, x.scalar_type(), x)) return {y, pre};
  // fallback: pre = x W^T, then pre += bias and y = gelu(pre) in one elementwise pass
  Gemm plain = forward_gemm(x, w, pre);
  gemm_or_throw(plain, x.scalar_type(), x, op);
  launch_bias_gelu(pre, bias, &y);
  return {y, pre};
}

std::vector<at::Tensor> linear_bwd(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& w_in,
                                   bool has_bias) {
  const char* op = "linear_bwd";
  check_linear(op, x_in, w_in);
  check_grad(op, "dy2d", dy_in, x_in, x_in.size(0), w_in.size(0));
  c10::cuda::CUDAGuard guard(x_in.device());
  return backward_gemms(op, dy_in.contiguous(), x_in.contiguous(), w_in.contiguous(), has_bias);
}

std::vector<at::Tensor> linear_gelu_bwd(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& w_in,
                                        const at::Tensor& pre_in, bool has_bias) {
  const char* op = "linear_gelu_bwd";
  check_linear(op, x_in, w_in);
  check_grad(op, "dy2d", dy_in, x_in, x_in.size(0), w_in.size(0));
  check_grad(op, "pre", pre_in, x_in, x_in.size(0), w_in.size(0));
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor dy = dy_in.contiguous(), pre = pre_in.contiguous();
  at::Tensor dpre = at::empty_like(pre);
  const int64_t total = pre.numel();
  if (total > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    LLMKERN_DISPATCH_FLOAT(pre.scalar_type(), op, [&] {
      dgelu_kernel<scalar_t><<<elementwise_blocks(total), 256, 0, stream>>>(
          (const scalar_t*)dy.data_ptr(), (const scalar_t*)pre.data_ptr(), (scalar_t*)dpre.data_ptr(), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return backward_gemms(op, dpre, x_in.contiguous(), w_in.contiguous(), has_bias);
}

std::vector<at::Tensor> linear_dgelu_bwd(const at::Tensor& dz_in, const at::Tensor& w_in, const at::Tensor& pre_in) {
  // dpre = (dz @ W) * gelu'(pre) for W (Nout, Nh), dz (M, Nout), pre (M, Nh); and sum_M dpre
  const char* op = "linear_dgelu_bwd";
  check_cuda(op, "dz", dz_in);
  check_float(op, "dz", dz_in);
  check_cuda(op, "weight", w_in);
  check_same(op, "weight", w_in, "dz", dz_in);
  TORCH_CHECK(dz_in.dim() == 2 && w_in.dim() == 2 && w_in.size(0) == dz_in.size(1), "llmkern_cuda::", op,
              ": dz must be (M, Nout) and weight (Nout, Nh); got dz ", describe(dz_in), ", weight ", describe(w_in));
  const int64_t M = dz_in.size(0), No = dz_in.size(1), Nh = w_in.size(1);
  check_cuda(op, "pre", pre_in);
  check_same(op, "pre", pre_in, "dz", dz_in);
  TORCH_CHECK(pre_in.dim() == 2 && pre_in.size(0) == M && pre_in.size(1) == Nh, "llmkern_cuda::", op,
              ": pre must have shape [", M, ", ", Nh, "], got ", describe(pre_in));
  TORCH_CHECK(No > 0 && Nh > 0, "llmkern_cuda::", op, ": empty weight ", describe(w_in));
  c10::cuda::CUDAGuard guard(dz_in.device());
  at::Tensor dz = dz_in.contiguous(), w = w_in.contiguous(), pre = pre_in.contiguous();
  at::Tensor dpre = at::empty({M, Nh}, dz.options());
  at::Tensor db = at::empty({Nh}, dz.options());
  if (M == 0) return {dpre, db.zero_()};
  Gemm g;  // dpre^T[Nh x M] = W stored (Nh x Nout) * dz^T stored (Nout x M)
  g.transa = false;
  g.transb = false;
  g.m = Nh;
  g.n = M;
  g.k = No;
  g.a = w.data_ptr();
  g.lda = Nh;
  g.b = dz.data_ptr();
  g.ldb = No;
  g.d = dpre.data_ptr();
  g.ldd = Nh;
  g.epilogue = CUBLASLT_EPILOGUE_DGELU_BGRAD;
  g.bias = db.data_ptr();
  g.aux = pre.data_ptr();
  g.ldaux = Nh;
  if (run_gemm(g, dz.scalar_type(), dz)) return {dpre, db};
  // fallback: dh = dz W, then dpre = dh * gelu'(pre) and a deterministic column sum
  at::Tensor dh = at::empty({M, Nh}, dz.options());
  Gemm plain = g;
  plain.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  plain.bias = nullptr;
  plain.aux = nullptr;
  plain.d = dh.data_ptr();
  gemm_or_throw(plain, dz.scalar_type(), dz, op);
  const int64_t total = dh.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  LLMKERN_DISPATCH_FLOAT(dz.scalar_type(), op, [&] {
    dgelu_kernel<scalar_t><<<elementwise_blocks(total), 256, 0, stream>>>(
        (const scalar_t*)dh.data_ptr(), (const scalar_t*)pre.data_ptr(), (scalar_t*)dpre.data_ptr(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dpre, column_sums(dpre).to(dz.scalar_type())};
}

}  // namespace llmkern
