// LayerNorm and RMSNorm over the last dim, forward and backward.
//
// Forward: one block per row or, for rows of up to 32 * CACHE_V bundles (1024 elements in
// fp16/bf16, 512 in fp32), one warp per row and four rows per block in a grid-stride loop over
// one wave of blocks. A row of up to FWD_THREADS * CACHE_V bundles is held in registers (16-byte
// loads and stores when the row pointers and strides allow, element accesses for tails and
// unaligned rows). With one warp per row the block stages the fp32 weight and bias in shared
// memory once and its warps read them there (16-byte reads) for all their rows: kept in
// registers they cost 60-90 more registers a thread and halve the resident warps of this
// bandwidth-bound kernel. Wider rows read their parameters from L1. Longer rows are re-read
// (they stay in L1/L2). Statistics are fp32: the mean first, then the second moment about the
// mean (no E[x^2] - E[x]^2 cancellation).
// Backward: a grid of blocks strides over rows; every thread owns a fixed set of columns, so it
// accumulates its dweight/dbias partials without races (registers for cached rows, next to the
// weight of those columns, loaded once; a per-block row of a global buffer otherwise; the warps
// of a multi-row block are summed in shared memory). The per-block partials are then summed in
// a fixed order by sum_partials: deterministic weight/bias gradients.
#include <ATen/ops/zeros.h>

#include "common.h"
#include "ops.h"

namespace llmkern {
namespace {

constexpr int CACHE_V = 4;  // 16-byte bundles per thread of a cached row
constexpr int FWD_THREADS = 512;  // max threads of a forward block
constexpr int WARP_ROW_MAX = 32 * CACHE_V * 8;  // widest row served by one warp (fp16/bf16: 1024)
constexpr int BWD_THREADS = 256;  // max threads of a backward block (more registers per thread)
constexpr int MULTI_ROWS = 4;     // rows per block (one warp each) when a row needs only one warp
constexpr int SM_THREADS = 2048;  // resident threads per SM (sm_80, sm_90): sizes the backward grid
constexpr int WARP_ROW_BLOCKS = 6;  // resident warp-row forward blocks per SM (<= 85 registers, no spills)

// bundles per thread of a cached row: one warp holds a row of up to 1024 elements in fp16/bf16
// and 512 in fp32 (8 bundles a lane in fp32 would cost twice the registers, halving the
// resident warps)
template <typename T>
constexpr int cache_v() {
  return CACHE_V;
}

// fp32 parameters of columns [i0, i0 + V) into registers: float4 loads (the host passes 16-byte
// aligned buffers and i0 is a multiple of 4) unless the bundle crosses n; `fill` when p is null,
// 0 past n.
template <int V>
__device__ __forceinline__ void load_param(const float* __restrict__ p, int64_t i0, int64_t n, float fill,
                                           float (&out)[V]) {
  if (p == nullptr) {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = fill;
  } else if (i0 + V <= n) {
#pragma unroll
    for (int k = 0; k < V; k += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + i0 + k);
      out[k] = f.x;
      out[k + 1] = f.y;
      out[k + 2] = f.z;
      out[k + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = i0 + k < n ? p[i0 + k] : 0.f;
  }
}

// Rows are taken in a grid-stride loop (blockDim.y rows at a time). With PSMEM (one warp per
// row, blockDim (32, MULTI_ROWS)) the weight and bias are staged in shared memory once per block,
// before the loop, and the bound keeps WARP_ROW_BLOCKS blocks resident; else they are read per
// row from L1.
template <typename T, int MAXV, bool RMS, bool PSMEM, int BOUND>
__global__ void __launch_bounds__(BOUND, PSMEM ? WARP_ROW_BLOCKS : 1)
norm_fwd_kernel(const T* __restrict__ x, int64_t xs, const float* __restrict__ w, const float* __restrict__ b,
                T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t rows,
                int64_t n, float eps, bool aligned) {
  constexpr int V = Vec<T>::N;
  constexpr int CV = MAXV > 0 ? MAXV : 1;
  static_assert(!PSMEM || (MAXV > 0 && BOUND == 32 * MULTI_ROWS), "shared parameters need warp rows");
  __shared__ float scratch[32];
  __shared__ __align__(16) float params[PSMEM ? 2 * WARP_ROW_MAX : 4];  // weight, then bias
  const int64_t step = (int64_t)blockDim.x * V;
  if constexpr (PSMEM) {  // n <= WARP_ROW_MAX here; absent parameters become 1 and 0
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    for (int c = tid; c < n; c += blockDim.x * blockDim.y) {
      params[c] = w != nullptr ? w[c] : 1.f;
      params[WARP_ROW_MAX + c] = b != nullptr ? b[c] : 0.f;
    }
    __syncthreads();  // before any warp leaves: every thread reaches it
  }
  // blockDim.y > 1 only with one warp per row (blockDim.x == 32): reductions stay in the warp,
  // so the warps of a block may run different numbers of rows
  auto one_row = [&](int64_t row) {
    const T* xr = x + row * xs;
    T* yr = y + row * n;
    float cache[CV][V];

    float s = 0.f;
    if constexpr (MAXV > 0) {
#pragma unroll
      for (int i = 0; i < MAXV; ++i) {
        load_vec(xr, ((int64_t)threadIdx.x + (int64_t)i * blockDim.x) * V, n, aligned, 0.f, cache[i]);
#pragma unroll
        for (int k = 0; k < V; ++k) s += cache[i][k];
      }
    } else {
      for (int64_t i0 = (int64_t)threadIdx.x * V; i0 < n; i0 += step) {
        float t[V];
        load_vec(xr, i0, n, aligned, 0.f, t);
#pragma unroll
        for (int k = 0; k < V; ++k) s += t[k];
      }
    }
    const float mean = RMS ? 0.f : block_sum(s, scratch) / (float)n;

    float q = 0.f;
    if constexpr (MAXV > 0) {
#pragma unroll
      for (int i = 0; i < MAXV; ++i) {
        const int64_t i0 = ((int64_t)threadIdx.x + (int64_t)i * blockDim.x) * V;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float d = i0 + k < n ? cache[i][k] - mean : 0.f;
          q += d * d;
        }
      }
    } else {
      for (int64_t i0 = (int64_t)threadIdx.x * V; i0 < n; i0 += step) {
        float t[V];
        load_vec(xr, i0, n, aligned, 0.f, t);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float d = i0 + k < n ? t[k] - mean : 0.f;
          q += d * d;
        }
      }
    }
    const float rstd = rsqrtf(block_sum(q, scratch) / (float)n + eps);
    if (threadIdx.x == 0) {
      if (!RMS) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }

    if constexpr (MAXV > 0) {
#pragma unroll
      for (int i = 0; i < MAXV; ++i) {
        const int64_t i0 = ((int64_t)threadIdx.x + (int64_t)i * blockDim.x) * V;
        float o[V], pw[V], pb[V];
        if constexpr (PSMEM) {
          load_param(params, i0, n, 1.f, pw);
          load_param(params + WARP_ROW_MAX, i0, n, 0.f, pb);
        } else {  // element loads from L1: fewer live registers than 16-byte bundles here
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const bool in = i0 + k < n;
            pw[k] = w != nullptr ? (in ? w[i0 + k] : 0.f) : 1.f;
            pb[k] = b != nullptr ? (in ? b[i0 + k] : 0.f) : 0.f;
          }
        }
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = (cache[i][k] - mean) * rstd * pw[k] + pb[k];
        store_vec(yr, i0, n, aligned, o);
      }
    } else {
      for (int64_t i0 = (int64_t)threadIdx.x * V; i0 < n; i0 += step) {
        float t[V], pw[V], pb[V], o[V];
        load_vec(xr, i0, n, aligned, 0.f, t);
        load_param(w, i0, n, 1.f, pw);
        load_param(b, i0, n, 0.f, pb);
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = (t[k] - mean) * rstd * pw[k] + pb[k];
        store_vec(yr, i0, n, aligned, o);
      }
    }
  };
  const int64_t first = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  if constexpr (PSMEM) {  // a grid-stride loop: the staged parameters serve many rows
    for (int64_t row = first; row < rows; row += (int64_t)gridDim.x * blockDim.y) one_row(row);
  } else if (first < rows) {  // one row per block (no loop: it would cost registers here)
    one_row(first);
  }
}

template <typename T, int MAXV, bool RMS>
__global__ void __launch_bounds__(BWD_THREADS)
norm_bwd_kernel(const T* __restrict__ dy, int64_t dys, const T* __restrict__ x, int64_t xs,
                const float* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd,
                T* __restrict__ dx, float* __restrict__ dwp, float* __restrict__ dbp, int64_t rows, int64_t n,
                bool aligned) {
  constexpr int V = Vec<T>::N;
  constexpr int CV = MAXV > 0 ? MAXV : 1;
  __shared__ float scratch[32];
  __shared__ float red[MULTI_ROWS][MAXV > 0 ? 32 * CV * V : 1];  // cross-warp partial sums
  const int64_t step = (int64_t)blockDim.x * V;
  float* dw_row = dwp != nullptr ? dwp + (int64_t)blockIdx.x * n : nullptr;
  float* db_row = dbp != nullptr ? dbp + (int64_t)blockIdx.x * n : nullptr;
  float xc[CV][V], gc[CV][V], dwa[CV][V], dba[CV][V];
#pragma unroll
  for (int i = 0; i < CV; ++i)
#pragma unroll
    for (int k = 0; k < V; ++k) dwa[i][k] = dba[i][k] = 0.f;
  // 16-bit types: the weight of this thread's columns in registers, once for all its rows (it
  // leaves the resident blocks unchanged there; in fp32 it would halve them: loaded per row)
  constexpr bool WREG = MAXV > 0 && sizeof(T) == 2;
  float wc[WREG ? CV : 1][V];
  if constexpr (WREG) {
#pragma unroll
    for (int i = 0; i < MAXV; ++i) load_param(w, ((int64_t)threadIdx.x + (int64_t)i * blockDim.x) * V, n, 1.f, wc[i]);
  }

  // with blockDim.y > 1 (one warp per row) the warps of a block take different rows and own the
  // same columns; their partials are summed through shared memory at the end
  for (int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y; row < rows;
       row += (int64_t)gridDim.x * blockDim.y) {
    const T* xr = x + row * xs;
    const T* gr = dy + row * dys;
    T* dxr = dx + row * n;
    const float mu = RMS ? 0.f : mean[row];
    const float rs = rstd[row];

    // pass 1: sum(g * xhat) and sum(g) with g = dy * weight
    float a = 0.f, c = 0.f;
    auto accumulate = [&](const float (&xv)[V], const float (&gv)[V], const float (&wv)[V]) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float g = gv[k] * wv[k];
        a += g * (xv[k] - mu) * rs;
        c += g;
      }
    };
    if constexpr (MAXV > 0) {
#pragma unroll
      for (int i = 0; i < MAXV; ++i) {
        const int64_t i0 = ((int64_t)threadIdx.x + (int64_t)i * blockDim.x) * V;
        load_vec(xr, i0, n, aligned, 0.f, xc[i]);
        load_vec(gr, i0, n, aligned, 0.f, gc[i]);
        if constexpr (WREG) {
          accumulate(xc[i], gc[i], wc[i]);
        } else {
          float wt[V];
          load_param(w, i0, n, 1.f, wt);
          accumulate(xc[i], gc[i], wt);
        }
      }
    } else {
      #pragma unroll 1
      for (int64_t i0 = (int64_t)threadIdx.x * V; i0 < n; i0 += step) {
        float xv[V], gv[V], wv[V];
        load_vec(xr, i0, n, aligned, 0.f, xv);
        load_vec(gr, i0, n, aligned, 0.f, gv);
        load_param(w, i0, n, 1.f, wv);
        accumulate(xv, gv, wv);
      }
    }
    const float mean_gx = block_sum(a, scratch) / (float)n;
    const float mean_g = RMS ? 0.f : block_sum(c, scratch) / (float)n;

    // pass 2: dx, and the weight/bias partials of the columns this thread owns
    auto finish = [&](int64_t i0, const float (&xv)[V], const float (&gv)[V], const float (&wv)[V], float* dwv,
                      float* dbv) {
      constexpr bool in_registers = MAXV > 0;  // else the partials live in this block's global row
      float o[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t col = i0 + k;
        const bool in = col < n;
        const float xhat = (xv[k] - mu) * rs;
        const float g = gv[k] * wv[k];
        o[k] = rs * (g - mean_g - xhat * mean_gx);
        if constexpr (in_registers) {
          dwv[k] += gv[k] * xhat;
          dbv[k] += gv[k];
        } else if (in) {
          if (dw_row != nullptr) dw_row[col] += gv[k] * xhat;  // rows zeroed by the host
          if (db_row != nullptr) db_row[col] += gv[k];
        }
      }
      store_vec(dxr, i0, n, aligned, o);
    };
    if constexpr (MAXV > 0) {
#pragma unroll
      for (int i = 0; i < MAXV; ++i)
      {
        const int64_t i0 = ((int64_t)threadIdx.x + (int64_t)i * blockDim.x) * V;
        if constexpr (WREG) {
          finish(i0, xc[i], gc[i], wc[i], dwa[i], dba[i]);
        } else {
          float wt[V];
          load_param(w, i0, n, 1.f, wt);
          finish(i0, xc[i], gc[i], wt, dwa[i], dba[i]);
        }
      }
    } else {
      #pragma unroll 1
      for (int64_t i0 = (int64_t)threadIdx.x * V; i0 < n; i0 += step) {
        float xv[V], gv[V], wv[V];
        load_vec(xr, i0, n, aligned, 0.f, xv);
        load_vec(gr, i0, n, aligned, 0.f, gv);
        load_param(w, i0, n, 1.f, wv);
        finish(i0, xv, gv, wv, nullptr, nullptr);
      }
    }
  }
  if constexpr (MAXV > 0) {
    if (blockDim.y > 1) {
      for (int which = 0; which < 2; ++which) {
        float* out = which == 0 ? dw_row : db_row;  // uniform across the block
        if (out == nullptr) continue;
#pragma unroll
        for (int i = 0; i < MAXV; ++i)
#pragma unroll
          for (int k = 0; k < V; ++k)
            red[threadIdx.y][(threadIdx.x + i * 32) * V + k] = which == 0 ? dwa[i][k] : dba[i][k];
        __syncthreads();
        if (threadIdx.y == 0) {
#pragma unroll
          for (int i = 0; i < MAXV; ++i) {
#pragma unroll
            for (int k = 0; k < V; ++k) {
              const int c = (threadIdx.x + i * 32) * V + k;
              float v = 0.f;
              for (int w = 0; w < (int)blockDim.y; ++w) v += red[w][c];  // fixed order
              if (c < n) out[c] = v;
            }
          }
        }
        __syncthreads();
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int64_t i0 = ((int64_t)threadIdx.x + (int64_t)i * blockDim.x) * V;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (i0 + k < n) {
          if (dw_row != nullptr) dw_row[i0 + k] = dwa[i][k];
          if (db_row != nullptr) db_row[i0 + k] = dba[i][k];
        }
      }
    }
  }
}

__global__ void sum_partials_kernel(const float* __restrict__ p, float* __restrict__ out, int64_t parts, int64_t n) {
  const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float s = 0.f;
  for (int64_t r = 0; r < parts; ++r) s += p[r * n + col];  // fixed order: deterministic
  out[col] = s;
}

int round_threads(int64_t work, int max_threads) {
  int64_t t = ((work + 31) / 32) * 32;
  return (int)std::max<int64_t>(32, std::min<int64_t>(t, max_threads));
}

at::Tensor float_param(const char* op, const char* name, const c10::optional<at::Tensor>& p, const at::Tensor& x,
                       int64_t n) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  check_cuda(op, name, *p);
  check_float(op, name, *p);
  check_vector(op, name, *p, n);
  TORCH_CHECK(p->device() == x.device(), "llmkern_cuda::", op, ": ", name, " is on ", p->device().str(),
              " but x is on ", x.device().str());
  at::Tensor f = p->to(at::kFloat).contiguous();  // fp32 parameters in the kernel whatever their dtype
  // the kernels read them in 16-byte bundles: a view at an odd offset gets an aligned copy
  if (reinterpret_cast<uintptr_t>(f.data_ptr()) % 16 != 0) f = f.clone();
  return f;
}

const float* fptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

std::vector<at::Tensor> norm_fwd(const char* op, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, double eps, bool rms) {
  check_cuda(op, "x", x_in);
  check_float(op, "x", x_in);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.numel() > 0, "llmkern_cuda::", op, ": x must be non-empty with a last dim, got ",
              describe(x_in));
  TORCH_CHECK(eps > 0, "llmkern_cuda::", op, ": eps must be > 0, got ", eps);
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = x_in.size(-1);
  int64_t xs = 0;
  at::Tensor x = rows_view(x_in, n, &xs);
  const int64_t rows = x.size(0);
  TORCH_CHECK(rows < (int64_t(1) << 31), "llmkern_cuda::", op, ": too many rows (", rows, ")");
  at::Tensor w = float_param(op, "weight", weight, x_in, n);
  at::Tensor b = float_param(op, "bias", bias, x_in, n);
  at::Tensor y = at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  auto fopts = x_in.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({rms ? 0 : rows}, fopts);
  at::Tensor rstd = at::empty({rows}, fopts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  LLMKERN_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    constexpr int V = Vec<scalar_t>::N;
    const int64_t nvec = (n + V - 1) / V;
    const bool aligned = is_aligned16(x.data_ptr(), xs, sizeof(scalar_t)) &&
                         is_aligned16(y.data_ptr(), n, sizeof(scalar_t));
    auto args = [&](auto kernel, int threads) {
      const int rpb = threads == 32 ? MULTI_ROWS : 1;
      // warp rows: a grid-stride loop over one wave of blocks (each block stages its parameters
      // once); else one block per row
      const int64_t blocks = (rows + rpb - 1) / rpb;
      const int64_t grid = threads != 32 ? blocks
                                         : std::min<int64_t>(blocks, (int64_t)num_sms(x_in.get_device()) *
                                                                         WARP_ROW_BLOCKS);
      kernel<<<(unsigned)grid, dim3(threads, rpb), 0, stream>>>(
          (const scalar_t*)x.data_ptr(), xs, fptr(w), fptr(b), (scalar_t*)y.data_ptr(),
          rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, n, (float)eps, aligned);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int CV = cache_v<scalar_t>();
    const bool cached = nvec <= (int64_t)FWD_THREADS * CV;
    const int threads = cached ? round_threads((nvec + CV - 1) / CV, FWD_THREADS) : FWD_THREADS;
    if (threads == 32) {  // one warp per row, parameters staged in shared memory
      if (rms) args(norm_fwd_kernel<scalar_t, CV, true, true, 32 * MULTI_ROWS>, threads);
      else args(norm_fwd_kernel<scalar_t, CV, false, true, 32 * MULTI_ROWS>, threads);
    } else if (cached) {
      if (rms) args(norm_fwd_kernel<scalar_t, CV, true, false, FWD_THREADS>, threads);
      else args(norm_fwd_kernel<scalar_t, CV, false, false, FWD_THREADS>, threads);
    } else {
      if (rms) args(norm_fwd_kernel<scalar_t, 0, true, false, FWD_THREADS>, threads);
      else args(norm_fwd_kernel<scalar_t, 0, false, false, FWD_THREADS>, threads);
    }
  });
  if (rms) return {y, rstd};
  return {y, mean, rstd};
}

std::vector<at::Tensor> norm_bwd(const char* op, const at::Tensor& dy_in, const at::Tensor& x_in,
                                 const c10::optional<at::Tensor>& weight, bool has_bias, const at::Tensor& mean_in,
                                 const at::Tensor& rstd_in, bool rms) {
  check_cuda(op, "x", x_in);
  check_cuda(op, "dy", dy_in);
  check_float(op, "x", x_in);
  check_same(op, "dy", dy_in, "x", x_in);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "llmkern_cuda::", op, ": dy must have x's shape; dy ", describe(dy_in),
              ", x ", describe(x_in));
  TORCH_CHECK(x_in.dim() >= 1 && x_in.numel() > 0, "llmkern_cuda::", op, ": x must be non-empty, got ",
              describe(x_in));
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = x_in.size(-1);
  int64_t xs = 0, dys = 0;
  at::Tensor x = rows_view(x_in, n, &xs);
  at::Tensor dy = rows_view(dy_in, n, &dys);
  const int64_t rows = x.size(0);
  auto check_stat = [&](const char* name, const at::Tensor& t) {
    check_cuda(op, name, t);
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == rows, "llmkern_cuda::", op, ": ", name,
                " must be float32 with ", rows, " elements (one per row of x), got ", describe(t));
  };
  check_stat("rstd", rstd_in);
  at::Tensor rstd = rstd_in.contiguous();
  at::Tensor mean;
  if (!rms) {
    check_stat("mean", mean_in);
    mean = mean_in.contiguous();
  }
  at::Tensor w = float_param(op, "weight", weight, x_in, n);
  const bool need_dw = w.defined(), need_db = has_bias && !rms;
  at::Tensor dx = at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  auto fopts = x_in.options().dtype(at::kFloat);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t vec = 16 / (int64_t)x.element_size();
  const int64_t nvec_all = (n + vec - 1) / vec;
  const int64_t cv = CACHE_V;  // cache_v<T>() of the dispatched dtype
  const bool cached_all = nvec_all <= (int64_t)BWD_THREADS * cv;
  const int threads = cached_all ? round_threads((nvec_all + cv - 1) / cv, BWD_THREADS) : BWD_THREADS;
  const int rpb = threads == 32 ? MULTI_ROWS : 1;
  // enough blocks to fill the GPU (2048 threads per SM); each writes one row of partials
  const int64_t grid = std::min<int64_t>((rows + rpb - 1) / rpb,
                                         (int64_t)num_sms(x_in.get_device()) * (SM_THREADS / (threads * rpb)));
  // the cached kernel writes every partial once; the uncached one accumulates into zeros
  const bool zero_partials = !cached_all;
  auto partials = [&](bool need) {
    if (!need) return at::Tensor();
    return zero_partials ? at::zeros({grid, n}, fopts) : at::empty({grid, n}, fopts);
  };
  at::Tensor dwp = partials(need_dw), dbp = partials(need_db);
  LLMKERN_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    constexpr int V = Vec<scalar_t>::N;
    const int64_t nvec = (n + V - 1) / V;
    const bool aligned = is_aligned16(x.data_ptr(), xs, sizeof(scalar_t)) &&
                         is_aligned16(dy.data_ptr(), dys, sizeof(scalar_t)) &&
                         is_aligned16(dx.data_ptr(), n, sizeof(scalar_t));
    auto args = [&](auto kernel, int threads) {
      kernel<<<(unsigned)grid, dim3(threads, rpb), 0, stream>>>(
          (const scalar_t*)dy.data_ptr(), dys, (const scalar_t*)x.data_ptr(), xs, fptr(w), rms ? nullptr : fptr(mean),
          rstd.data_ptr<float>(), (scalar_t*)dx.data_ptr(), need_dw ? dwp.data_ptr<float>() : nullptr,
          need_db ? dbp.data_ptr<float>() : nullptr, rows, n, aligned);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const bool cached = cached_all;
    constexpr int CV = cache_v<scalar_t>();
    TORCH_CHECK(nvec == nvec_all && CV == cv, "llmkern_cuda::", op, ": internal vector width mismatch");
    if (rms) {
      if (cached) args(norm_bwd_kernel<scalar_t, CV, true>, threads);
      else args(norm_bwd_kernel<scalar_t, 0, true>, threads);
    } else {
      if (cached) args(norm_bwd_kernel<scalar_t, CV, false>, threads);
      else args(norm_bwd_kernel<scalar_t, 0, false>, threads);
    }
  });
  at::Tensor dw = at::empty({need_dw ? n : 0}, fopts);
  at::Tensor db = at::empty({need_db ? n : 0}, fopts);
  if (need_dw) sum_partials(dwp, dw, stream);
  if (need_db) sum_partials(dbp, db, stream);
  if (rms) return {dx, dw};
  return {dx, dw, db};
}

}  // namespace

void sum_partials(const at::Tensor& partials, at::Tensor& out, cudaStream_t stream) {
  const int64_t parts = partials.size(0), n = partials.size(1);
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  sum_partials_kernel<<<(unsigned)blocks, threads, 0, stream>>>(partials.data_ptr<float>(), out.data_ptr<float>(),
                                                                 parts, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias, double eps) {
  return norm_fwd("layer_norm_fwd", x, weight, bias, eps, false);
}

std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                       const c10::optional<at::Tensor>& weight, bool has_bias, const at::Tensor& mean,
                                       const at::Tensor& rstd) {
  return norm_bwd("layer_norm_bwd", dy, x, weight, has_bias, mean, rstd, false);
}

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps) {
  return norm_fwd("rms_norm_fwd", x, weight, c10::nullopt, eps, true);
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                     const at::Tensor& rstd) {
  return norm_bwd("rms_norm_bwd", dy, x, weight, false, at::Tensor(), rstd, true);
}

}  // namespace llmkern
