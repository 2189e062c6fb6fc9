// Cross-entropy over large vocabularies (256k and more), forward and backward.
//
// Forward: one block per row streams the logits once with 16-byte loads, keeping a per-thread
// online log-sum-exp (running max and rescaled sum) and the sum of logits (for label
// smoothing); the block then merges them. loss = lse - (1 - eps) * x[target] - eps / V * sum(x),
// as torch's cross_entropy(label_smoothing=eps); rows whose target is ignore_index get loss 0.
// Backward: dlogits = dloss * (softmax(x) - (1 - eps) * onehot(target) - eps / V), from the
// saved lse, zeros for ignored rows. Statistics in fp32.
#include "common.h"
#include "ops.h"

namespace llmkern {
namespace {

constexpr int THREADS = 512;

template <typename T>
__global__ void __launch_bounds__(THREADS)
ce_fwd_kernel(const T* __restrict__ x, int64_t xs, const int64_t* __restrict__ target, float* __restrict__ loss,
              float* __restrict__ lse_out, int64_t n, int64_t ignore_index, float smoothing, bool aligned) {
  constexpr int V = Vec<T>::N;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t t = target[row];
  if (t == ignore_index) {  // uniform across the block
    if (threadIdx.x == 0) {
      loss[row] = 0.f;
      lse_out[row] = 0.f;
    }
    return;
  }
  CUDA_KERNEL_ASSERT(t >= 0 && t < n && "llmkern cross_entropy: target index out of range");
  const T* xr = x + row * xs;
  float m = -INFINITY, s = 0.f, total = 0.f;
  for (int64_t i0 = (int64_t)threadIdx.x * V; i0 < n; i0 += (int64_t)blockDim.x * V) {
    float v[V];
    load_vec(xr, i0, n, aligned, -INFINITY, v);
    float bm = m;
#pragma unroll
    for (int k = 0; k < V; ++k) bm = fmaxf(bm, v[k]);
#pragma unroll
    for (int k = 0; k < V; ++k) total += (i0 + k < n) ? v[k] : 0.f;
    if (bm == -INFINITY) continue;  // only -inf logits so far: nothing to add
    s = (m == -INFINITY) ? 0.f : s * __expf(m - bm);
#pragma unroll
    for (int k = 0; k < V; ++k) s += __expf(v[k] - bm);  // out-of-range slots hold -inf -> 0
    m = bm;
  }
  const float gm = block_max(m, scratch);
  s = (m == -INFINITY) ? 0.f : s * __expf(m - gm);
  s = block_sum(s, scratch);
  total = block_sum(total, scratch);
  if (threadIdx.x == 0) {
    const float lse = gm + __logf(s);
    const float xt = to_float(xr[t]);
    lse_out[row] = lse;
    loss[row] = lse - (1.f - smoothing) * xt - smoothing / (float)n * total;
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
ce_bwd_kernel(const float* __restrict__ dloss, const T* __restrict__ x, int64_t xs, const int64_t* __restrict__ target,
              const float* __restrict__ lse, T* __restrict__ dx, int64_t n, int64_t ignore_index, float smoothing,
              bool aligned) {
  constexpr int V = Vec<T>::N;
  const int64_t row = blockIdx.x;
  const int64_t t = target[row];
  const T* xr = x + row * xs;
  T* dr = dx + row * n;
  const bool ignored = t == ignore_index;
  const float g = ignored ? 0.f : dloss[row];
  const float l = lse[row];
  const float uniform = smoothing / (float)n;
  for (int64_t i0 = (int64_t)threadIdx.x * V; i0 < n; i0 += (int64_t)blockDim.x * V) {
    float o[V];
    if (ignored) {
#pragma unroll
      for (int k = 0; k < V; ++k) o[k] = 0.f;
    } else {
      float v[V];
      load_vec(xr, i0, n, aligned, 0.f, v);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float onehot = (i0 + k == t) ? (1.f - smoothing) : 0.f;
        o[k] = g * (__expf(v[k] - l) - onehot - uniform);
      }
    }
    store_vec(dr, i0, n, aligned, o);
  }
}

void check_target(const char* op, const at::Tensor& target, const at::Tensor& logits, int64_t rows) {
  check_cuda(op, "target", target);
  TORCH_CHECK(target.device() == logits.device(), "llmkern_cuda::", op, ": target is on ", target.device().str(),
              " but logits is on ", logits.device().str());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == rows, "llmkern_cuda::", op,
              ": target must be int64 of shape [", rows, "] (one class per row of logits), got ", describe(target));
}

void check_logits(const char* op, const at::Tensor& logits) {
  check_cuda(op, "logits", logits);
  check_float(op, "logits", logits);
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "llmkern_cuda::", op,
              ": logits must be (M, V) with V > 0, got ", describe(logits));
  TORCH_CHECK(logits.size(0) < (int64_t(1) << 31), "llmkern_cuda::", op, ": too many rows, got ", describe(logits));
}

}  // namespace

std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits_in, const at::Tensor& target_in,
                                          int64_t ignore_index, double label_smoothing) {
  const char* op = "cross_entropy_fwd";
  check_logits(op, logits_in);
  const int64_t rows = logits_in.size(0), n = logits_in.size(1);
  check_target(op, target_in, logits_in, rows);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "llmkern_cuda::", op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  c10::cuda::CUDAGuard guard(logits_in.device());
  int64_t xs = 0;
  at::Tensor x = rows_view(logits_in, n, &xs);
  at::Tensor target = target_in.contiguous();
  auto fopts = logits_in.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, fopts);
  at::Tensor lse = at::empty({rows}, fopts);
  if (rows == 0) return {loss, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  LLMKERN_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    const bool aligned = is_aligned16(x.data_ptr(), xs, sizeof(scalar_t));
    ce_fwd_kernel<scalar_t><<<(unsigned)rows, THREADS, 0, stream>>>(
        (const scalar_t*)x.data_ptr(), xs, target.data_ptr<int64_t>(), loss.data_ptr<float>(), lse.data_ptr<float>(),
        n, ignore_index, (float)label_smoothing, aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

at::Tensor cross_entropy_bwd(const at::Tensor& dloss_in, const at::Tensor& logits_in, const at::Tensor& target_in,
                             const at::Tensor& lse_in, int64_t ignore_index, double label_smoothing) {
  const char* op = "cross_entropy_bwd";
  check_logits(op, logits_in);
  const int64_t rows = logits_in.size(0), n = logits_in.size(1);
  check_target(op, target_in, logits_in, rows);
  auto check_stat = [&](const char* name, const at::Tensor& t) {
    check_cuda(op, name, t);
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == rows, "llmkern_cuda::", op, ": ", name,
                " must be float32 with ", rows, " elements (one per row of logits), got ", describe(t));
  };
  check_stat("dloss", dloss_in);
  check_stat("lse", lse_in);
  c10::cuda::CUDAGuard guard(logits_in.device());
  int64_t xs = 0;
  at::Tensor x = rows_view(logits_in, n, &xs);
  at::Tensor target = target_in.contiguous(), dloss = dloss_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dx = at::empty({rows, n}, logits_in.options());
  if (rows == 0) return dx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  LLMKERN_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    const bool aligned = is_aligned16(x.data_ptr(), xs, sizeof(scalar_t)) &&
                         is_aligned16(dx.data_ptr(), n, sizeof(scalar_t));
    ce_bwd_kernel<scalar_t><<<(unsigned)rows, THREADS, 0, stream>>>(
        dloss.data_ptr<float>(), (const scalar_t*)x.data_ptr(), xs, target.data_ptr<int64_t>(), lse.data_ptr<float>(),
        (scalar_t*)dx.data_ptr(), n, ignore_index, (float)label_smoothing, aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace llmkern
