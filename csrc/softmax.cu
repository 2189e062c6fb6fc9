// Softmax over the last dim with a fused scale and a bottom-right causal mask.
//
// One block per row (short rows: one warp per row, four rows per block). Rows of up to
// THREADS * CACHE_V bundles stay in registers (one read of x); longer rows make one online
// max/sum pass and one write pass. With causal=True, x is
// (..., Sq, Sk) and query i = row % Sq sees keys j <= i + Sk - Sq; a row that sees no key is
// all zeros (never NaN). Statistics in fp32.
#include "common.h"
#include "ops.h"

namespace llmkern {
namespace {

constexpr int CACHE_V = 4;
constexpr int THREADS = 512;
constexpr int MULTI_ROWS = 4;  // rows per block (one warp each) when a row needs only one warp

// number of visible columns of a row
__device__ __forceinline__ int64_t visible_cols(int64_t row, int64_t sq, int64_t sk, bool causal) {
  if (!causal) return sk;
  const int64_t i = row % sq;
  const int64_t v = i + sk - sq + 1;
  return v < 0 ? 0 : (v > sk ? sk : v);
}

template <typename T, int MAXV>
__global__ void __launch_bounds__(THREADS)
softmax_fwd_kernel(const T* __restrict__ x, int64_t xs, T* __restrict__ y, int64_t rows, int64_t n, int64_t sq,
                   float scale, bool causal, bool aligned) {
  constexpr int V = Vec<T>::N;
  __shared__ float scratch[32];
  // blockDim.y > 1 only with one warp per row (blockDim.x == 32): reductions stay in the warp
  const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const T* xr = x + row * xs;
  T* yr = y + row * n;
  const int64_t vis = visible_cols(row, sq, n, causal);
  const int64_t step = (int64_t)blockDim.x * V;
  // scaled scores, -inf where masked or out of range
  auto scores = [&](int64_t i0, float (&t)[V]) {
    load_vec(xr, i0, n, aligned, 0.f, t);
#pragma unroll
    for (int k = 0; k < V; ++k) t[k] = i0 + k < vis ? t[k] * scale : -INFINITY;
  };
  auto write = [&](int64_t i0, const float (&t)[V], float m, float inv) {
    float o[V];
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = t[k] == -INFINITY ? 0.f : __expf(t[k] - m) * inv;
    store_vec(yr, i0, n, aligned, o);
  };

  if constexpr (MAXV > 0) {
    float c[MAXV][V];
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      scores(((int64_t)threadIdx.x + (int64_t)i * blockDim.x) * V, c[i]);
#pragma unroll
      for (int k = 0; k < V; ++k) m = fmaxf(m, c[i][k]);
    }
    m = block_max(m, scratch);
    float s = 0.f;
    if (m != -INFINITY) {
#pragma unroll
      for (int i = 0; i < MAXV; ++i)
#pragma unroll
        for (int k = 0; k < V; ++k) s += c[i][k] == -INFINITY ? 0.f : __expf(c[i][k] - m);
    }
    s = block_sum(s, scratch);
    const float inv = s > 0.f ? 1.f / s : 0.f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) write(((int64_t)threadIdx.x + (int64_t)i * blockDim.x) * V, c[i], m, inv);
  } else {
    // online max and sum per thread, then merged across the block
    float m = -INFINITY, s = 0.f;
    for (int64_t i0 = (int64_t)threadIdx.x * V; i0 < n; i0 += step) {
      float t[V];
      scores(i0, t);
      float bm = m;
#pragma unroll
      for (int k = 0; k < V; ++k) bm = fmaxf(bm, t[k]);
      if (bm == -INFINITY) continue;
      s = (m == -INFINITY ? 0.f : s * __expf(m - bm));
#pragma unroll
      for (int k = 0; k < V; ++k) s += t[k] == -INFINITY ? 0.f : __expf(t[k] - bm);
      m = bm;
    }
    const float gm = block_max(m, scratch);
    s = (m == -INFINITY) ? 0.f : s * __expf(m - gm);
    s = block_sum(s, scratch);
    const float inv = s > 0.f ? 1.f / s : 0.f;
    for (int64_t i0 = (int64_t)threadIdx.x * V; i0 < n; i0 += step) {
      float t[V];
      scores(i0, t);
      write(i0, t, gm, inv);
    }
  }
}

template <typename T, int MAXV>
__global__ void __launch_bounds__(THREADS)
softmax_bwd_kernel(const T* __restrict__ dy, int64_t dys, const T* __restrict__ y, int64_t ys, T* __restrict__ dx,
                   int64_t rows, int64_t n, float scale, bool aligned) {
  constexpr int V = Vec<T>::N;
  constexpr int CV = MAXV > 0 ? MAXV : 1;
  __shared__ float scratch[32];
  const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const T* gr = dy + row * dys;
  const T* yr = y + row * ys;
  T* dxr = dx + row * n;
  const int64_t step = (int64_t)blockDim.x * V;
  float yc[CV][V], gc[CV][V];
  float d = 0.f;
  if constexpr (MAXV > 0) {
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int64_t i0 = ((int64_t)threadIdx.x + (int64_t)i * blockDim.x) * V;
      load_vec(yr, i0, n, aligned, 0.f, yc[i]);
      load_vec(gr, i0, n, aligned, 0.f, gc[i]);
#pragma unroll
      for (int k = 0; k < V; ++k) d += yc[i][k] * gc[i][k];
    }
  } else {
    for (int64_t i0 = (int64_t)threadIdx.x * V; i0 < n; i0 += step) {
      float a[V], g[V];
      load_vec(yr, i0, n, aligned, 0.f, a);
      load_vec(gr, i0, n, aligned, 0.f, g);
#pragma unroll
      for (int k = 0; k < V; ++k) d += a[k] * g[k];
    }
  }
  d = block_sum(d, scratch);
  auto write = [&](int64_t i0, const float (&a)[V], const float (&g)[V]) {
    float o[V];
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = scale * a[k] * (g[k] - d);
    store_vec(dxr, i0, n, aligned, o);
  };
  if constexpr (MAXV > 0) {
#pragma unroll
    for (int i = 0; i < MAXV; ++i) write(((int64_t)threadIdx.x + (int64_t)i * blockDim.x) * V, yc[i], gc[i]);
  } else {
    for (int64_t i0 = (int64_t)threadIdx.x * V; i0 < n; i0 += step) {
      float a[V], g[V];
      load_vec(yr, i0, n, aligned, 0.f, a);
      load_vec(gr, i0, n, aligned, 0.f, g);
      write(i0, a, g);
    }
  }
}

int threads_for(int64_t nvec, bool cached) {
  if (!cached) return THREADS;
  int64_t t = ((nvec + CACHE_V - 1) / CACHE_V + 31) / 32 * 32;
  return (int)std::max<int64_t>(32, std::min<int64_t>(t, THREADS));
}

}  // namespace

at::Tensor softmax_fwd(const at::Tensor& x_in, double scale, bool causal) {
  const char* op = "softmax_fwd";
  check_cuda(op, "x", x_in);
  check_float(op, "x", x_in);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.numel() > 0, "llmkern_cuda::softmax_fwd: x must be non-empty, got ",
              describe(x_in));
  TORCH_CHECK(!causal || x_in.dim() >= 2, "llmkern_cuda::softmax_fwd: causal=True needs x of shape (..., Sq, Sk), got ",
              describe(x_in));
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = x_in.size(-1);
  const int64_t sq = x_in.dim() >= 2 ? x_in.size(-2) : 1;
  int64_t xs = 0;
  at::Tensor x = rows_view(x_in, n, &xs);
  const int64_t rows = x.size(0);
  TORCH_CHECK(rows < (int64_t(1) << 31), "llmkern_cuda::softmax_fwd: too many rows (", rows, ")");
  at::Tensor y = at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  auto stream = c10::cuda::getCurrentCUDAStream();
  LLMKERN_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    constexpr int V = Vec<scalar_t>::N;
    const int64_t nvec = (n + V - 1) / V;
    const bool cached = nvec <= (int64_t)THREADS * CACHE_V;
    const bool aligned = is_aligned16(x.data_ptr(), xs, sizeof(scalar_t)) &&
                         is_aligned16(y.data_ptr(), n, sizeof(scalar_t));
    auto kernel = cached ? softmax_fwd_kernel<scalar_t, CACHE_V> : softmax_fwd_kernel<scalar_t, 0>;
    const int threads = threads_for(nvec, cached), rpb = threads == 32 ? MULTI_ROWS : 1;
    kernel<<<(unsigned)((rows + rpb - 1) / rpb), dim3(threads, rpb), 0, stream>>>(
        (const scalar_t*)x.data_ptr(), xs, (scalar_t*)y.data_ptr(), rows, n, sq, (float)scale, causal, aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor softmax_bwd(const at::Tensor& dy_in, const at::Tensor& y_in, double scale) {
  const char* op = "softmax_bwd";
  check_cuda(op, "y", y_in);
  check_cuda(op, "dy", dy_in);
  check_float(op, "y", y_in);
  check_same(op, "dy", dy_in, "y", y_in);
  TORCH_CHECK(dy_in.sizes() == y_in.sizes(), "llmkern_cuda::softmax_bwd: dy must have y's shape; dy ",
              describe(dy_in), ", y ", describe(y_in));
  TORCH_CHECK(y_in.dim() >= 1 && y_in.numel() > 0, "llmkern_cuda::softmax_bwd: y must be non-empty, got ",
              describe(y_in));
  c10::cuda::CUDAGuard guard(y_in.device());
  const int64_t n = y_in.size(-1);
  int64_t ys = 0, dys = 0;
  at::Tensor y = rows_view(y_in, n, &ys);
  at::Tensor dy = rows_view(dy_in, n, &dys);
  const int64_t rows = y.size(0);
  TORCH_CHECK(rows < (int64_t(1) << 31), "llmkern_cuda::softmax_bwd: too many rows (", rows, ")");
  at::Tensor dx = at::empty(y_in.sizes(), y_in.options().memory_format(at::MemoryFormat::Contiguous));
  auto stream = c10::cuda::getCurrentCUDAStream();
  LLMKERN_DISPATCH_FLOAT(y.scalar_type(), op, [&] {
    constexpr int V = Vec<scalar_t>::N;
    const int64_t nvec = (n + V - 1) / V;
    const bool cached = nvec <= (int64_t)THREADS * CACHE_V;
    const bool aligned = is_aligned16(y.data_ptr(), ys, sizeof(scalar_t)) &&
                         is_aligned16(dy.data_ptr(), dys, sizeof(scalar_t)) &&
                         is_aligned16(dx.data_ptr(), n, sizeof(scalar_t));
    auto kernel = cached ? softmax_bwd_kernel<scalar_t, CACHE_V> : softmax_bwd_kernel<scalar_t, 0>;
    const int threads = threads_for(nvec, cached), rpb = threads == 32 ? MULTI_ROWS : 1;
    kernel<<<(unsigned)((rows + rpb - 1) / rpb), dim3(threads, rpb), 0, stream>>>(
        (const scalar_t*)dy.data_ptr(), dys, (const scalar_t*)y.data_ptr(), ys, (scalar_t*)dx.data_ptr(), rows, n,
        (float)scale, aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace llmkern
