// Flash-attention backward on tensor cores, deterministic (no float atomics):
//   1. delta[i] = sum_d dO[i, d] * O[i, d]                                  (one warp per row)
//   2. dK, dV: a block owns 64 keys of one (batch, kv head) and loops over every query head of
//      its group and every query tile that can see those keys, accumulating in registers:
//        S^T = K Q^T, P^T = exp(S^T * scale - lse), dV += P^T dO, dP^T = V dO^T,
//        dS^T = P^T * (dP^T - delta), dK += dS^T Q                  (dK scaled at the end)
//   3. dQ: a block owns 64 query rows and loops over the key tiles (a second pass that
//      recomputes P instead of adding dQ with atomics): dQ += dS K.
// Query rows with lse = -inf (no visible key) or past Sq have P = 0 through lse := +inf.
#include "attention_common.cuh"
#include "ops.h"

namespace llmkern {
namespace attn {
namespace {

constexpr int WARPS = 4, THREADS = WARPS * 32;
constexpr int BK = 64;  // keys per dK/dV block (16 per warp), and per dQ key tile
constexpr int BQ = 64;  // query rows per dQ block (16 per warp)
// query rows per step of the dK/dV loop: fewer for D = 128 to keep accumulators in registers
template <int D>
constexpr int dkdv_bq() { return D == 128 ? 32 : 64; }

struct BwdParams {
  const void *q, *k, *v, *dout;
  const float *lse, *delta;
  void *dq, *dk, *dv;
  Strides qs, ks, vs, dos, dqs, dks, dvs;
  int heads, kv_group, sq, sk;
  float scale, scale_log2;
  bool causal;
};

template <typename T>
__global__ void delta_kernel(const T* __restrict__ dout, Strides ds, const T* __restrict__ out, Strides os,
                             float* __restrict__ delta, int heads, int sq, int d, int64_t rows) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t i = row % sq, bh = row / sq, h = bh % heads, b = bh / heads;
  const T* a = dout + b * ds.b + h * ds.h + i * ds.s;
  const T* c = out + b * os.b + h * os.h + i * os.s;
  float s = 0.f;
  for (int k = lane; k < d; k += 32) s += to_float(a[k]) * to_float(c[k]);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

// lse in the exp2 domain for query row i; +inf where P must vanish (past Sq, or no visible key)
__device__ __forceinline__ float lse2_of(const float* lse, int i, int sq) {
  if (i >= sq) return INFINITY;
  const float v = lse[i];
  return v == -INFINITY ? INFINITY : v * LOG2E;
}

template <typename T, int D>
__global__ void __launch_bounds__(THREADS) attention_dkdv_kernel(const BwdParams p) {
  constexpr int BQK = dkdv_bq<D>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BK * D;
  T* sQ = sV + BK * D;           // two buffers of BQK * D
  T* sdO = sQ + 2 * BQK * D;     // two buffers of BQK * D

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int k0 = blockIdx.x * BK, hk = blockIdx.y, b = blockIdx.z;
  const int off = p.sk - p.sq;
  const T* kg = static_cast<const T*>(p.k) + b * p.ks.b + hk * p.ks.h;
  const T* vg = static_cast<const T*>(p.v) + b * p.vs.b + hk * p.vs.h;

  // query tiles that can see keys [k0, k0 + BK): causal query i sees key j iff i >= j - off
  const int n_qt = (p.sq + BQK - 1) / BQK;
  int qt_start = 0;
  if (p.causal) {
    const int first_q = max(0, k0 - off);
    qt_start = first_q >= p.sq ? n_qt : first_q / BQK;
  }
  const int per_head = n_qt - qt_start;
  const int total = per_head * p.kv_group;

  auto q_ptr = [&](int it, int* h, int* q0) {
    *h = hk * p.kv_group + it / per_head;
    *q0 = (qt_start + it % per_head) * BQK;
  };
  auto load_q_do = [&](int it, int buf) {
    int h, q0;
    q_ptr(it, &h, &q0);
    const T* qg = static_cast<const T*>(p.q) + b * p.qs.b + h * p.qs.h;
    const T* dg = static_cast<const T*>(p.dout) + b * p.dos.b + h * p.dos.h;
    load_tile<T, BQK, D, THREADS>(sQ + buf * BQK * D, qg, p.qs.s, q0, p.sq);
    load_tile<T, BQK, D, THREADS>(sdO + buf * BQK * D, dg, p.dos.s, q0, p.sq);
  };

  load_tile<T, BK, D, THREADS>(sK, kg, p.ks.s, k0, p.sk);
  load_tile<T, BK, D, THREADS>(sV, vg, p.vs.s, k0, p.sk);
  if (total > 0) load_q_do(0, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  const int key_base = k0 + warp * 16 + gq;  // this thread's keys: key_base and key_base + 8

  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    if (it + 1 < total) {
      load_q_do(it + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    int h, q0;
    q_ptr(it, &h, &q0);
    const T* cQ = sQ + buf * BQK * D;
    const T* cdO = sdO + buf * BQK * D;
    const float* lse = p.lse + ((int64_t)b * p.heads + h) * p.sq;
    const float* delta = p.delta + ((int64_t)b * p.heads + h) * p.sq;

    float s[BQK / 8][4];
    zero(s);
    gemm_sA_sB<T, D / 16, BQK / 8, D>(s, sK, warp * 16, cQ, 0);
#pragma unroll
    for (int nt = 0; nt < BQK / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int qi = q0 + nt * 8 + 2 * tq + c;
        const float l2 = lse2_of(lse, qi, p.sq);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float pv = exp2f(s[nt][2 * r + c] * p.scale_log2 - l2);
          if (p.causal && key_base + 8 * r > qi + off) pv = 0.f;
          s[nt][2 * r + c] = pv;
        }
      }
    }
    uint32_t pa[BQK / 16][4];
    c_to_a<T, BQK / 8>(pa, s);
    gemm_rA_sBt<T, BQK / 16, D / 8, D>(dv, pa, cdO, 0);

    float dp[BQK / 8][4];
    zero(dp);
    gemm_sA_sB<T, D / 16, BQK / 8, D>(dp, sV, warp * 16, cdO, 0);
#pragma unroll
    for (int nt = 0; nt < BQK / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int qi = q0 + nt * 8 + 2 * tq + c;
        const float dl = qi < p.sq ? delta[qi] : 0.f;
#pragma unroll
        for (int r = 0; r < 2; ++r) dp[nt][2 * r + c] = s[nt][2 * r + c] * (dp[nt][2 * r + c] - dl);
      }
    }
    uint32_t da[BQK / 16][4];
    c_to_a<T, BQK / 8>(da, dp);
    gemm_rA_sBt<T, BQK / 16, D / 8, D>(dk, da, cQ, 0);
    __syncthreads();  // the next iteration's copy overwrites this buffer
  }
  cp_async_wait<0>();

  T* dkg = static_cast<T*>(p.dk) + b * p.dks.b + hk * p.dks.h;
  T* dvg = static_cast<T*>(p.dv) + b * p.dvs.b + hk * p.dvs.h;
  store_c<T, D / 8>(dkg, p.dks.s, k0 + warp * 16, p.sk, dk, p.scale);
  store_c<T, D / 8>(dvg, p.dvs.s, k0 + warp * 16, p.sk, dv, 1.f);
}

template <typename T, int D>
__global__ void __launch_bounds__(THREADS) attention_dq_kernel(const BwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BQ * D;
  T* sK = sdO + BQ * D;       // two buffers of BK * D
  T* sV = sK + 2 * BK * D;    // two buffers of BK * D

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int q0 = blockIdx.x * BQ, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / p.kv_group;
  const int off = p.sk - p.sq;
  const T* qg = static_cast<const T*>(p.q) + b * p.qs.b + h * p.qs.h;
  const T* dg = static_cast<const T*>(p.dout) + b * p.dos.b + h * p.dos.h;
  const T* kg = static_cast<const T*>(p.k) + b * p.ks.b + hk * p.ks.h;
  const T* vg = static_cast<const T*>(p.v) + b * p.vs.b + hk * p.vs.h;
  const float* lse = p.lse + ((int64_t)b * p.heads + h) * p.sq;
  const float* delta = p.delta + ((int64_t)b * p.heads + h) * p.sq;

  int n_blocks = (p.sk + BK - 1) / BK;
  if (p.causal) {
    const int last_key = min(q0 + BQ, p.sq) - 1 + off;
    n_blocks = last_key < 0 ? 0 : min(n_blocks, last_key / BK + 1);
  }
  load_tile<T, BQ, D, THREADS>(sQ, qg, p.qs.s, q0, p.sq);
  load_tile<T, BQ, D, THREADS>(sdO, dg, p.dos.s, q0, p.sq);
  if (n_blocks > 0) {
    load_tile<T, BK, D, THREADS>(sK, kg, p.ks.s, 0, p.sk);
    load_tile<T, BK, D, THREADS>(sV, vg, p.vs.s, 0, p.sk);
  }
  cp_async_commit();

  const int row_base = q0 + warp * 16 + gq;
  float l2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row_base + 8 * r;
    l2[r] = lse2_of(lse, i, p.sq);
    dl[r] = i < p.sq ? delta[i] : 0.f;
  }
  float dq[D / 8][4];
  zero(dq);

  for (int j = 0; j < n_blocks; ++j) {
    const int buf = j & 1;
    if (j + 1 < n_blocks) {
      load_tile<T, BK, D, THREADS>(sK + (buf ^ 1) * BK * D, kg, p.ks.s, (j + 1) * BK, p.sk);
      load_tile<T, BK, D, THREADS>(sV + (buf ^ 1) * BK * D, vg, p.vs.s, (j + 1) * BK, p.sk);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* cK = sK + buf * BK * D;
    const T* cV = sV + buf * BK * D;
    const int k0 = j * BK;
    const bool need_mask = (k0 + BK > p.sk) || (p.causal && k0 + BK - 1 > q0 + off);

    float s[BK / 8][4];
    zero(s);
    gemm_sA_sB<T, D / 16, BK / 8, D>(s, sQ, warp * 16, cK, 0);
    float dp[BK / 8][4];
    zero(dp);
    gemm_sA_sB<T, D / 16, BK / 8, D>(dp, sdO, warp * 16, cV, 0);
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float pv = exp2f(s[nt][e] * p.scale_log2 - l2[r]);
        if (need_mask) {
          const int col = k0 + nt * 8 + 2 * tq + (e & 1);
          if (col >= p.sk || (p.causal && col > row_base + 8 * r + off)) pv = 0.f;
        }
        dp[nt][e] = pv * (dp[nt][e] - dl[r]);
      }
    }
    uint32_t da[BK / 16][4];
    c_to_a<T, BK / 8>(da, dp);
    gemm_rA_sBt<T, BK / 16, D / 8, D>(dq, da, cK, 0);
    __syncthreads();
  }
  cp_async_wait<0>();
  T* dqg = static_cast<T*>(p.dq) + b * p.dqs.b + h * p.dqs.h;
  store_c<T, D / 8>(dqg, p.dqs.s, q0 + warp * 16, p.sq, dq, p.scale);
}

template <typename T, int D>
void launch_bwd(const BwdParams& p, int batch, int kv_heads, cudaStream_t stream) {
  constexpr int BQK = dkdv_bq<D>();
  constexpr int smem_kv = (2 * BK * D + 4 * BQK * D) * 2;
  constexpr int smem_q = (2 * BQ * D + 4 * BK * D) * 2;
  auto kv_kernel = attention_dkdv_kernel<T, D>;
  auto q_kernel = attention_dq_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_kv));
  C10_CUDA_CHECK(cudaFuncSetAttribute(q_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_q));
  kv_kernel<<<dim3((p.sk + BK - 1) / BK, kv_heads, batch), THREADS, smem_kv, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  q_kernel<<<dim3((p.sq + BQ - 1) / BQ, p.heads, batch), THREADS, smem_q, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace attn

std::vector<at::Tensor> attention_bwd(const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                      const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
                                      double scale, bool causal) {
  using namespace attn;
  const char* op = "attention_bwd";
  check_qkv(op, q_in, k_in, v_in);
  check_cuda(op, "dout", dout_in);
  check_cuda(op, "out", out_in);
  check_cuda(op, "lse", lse_in);
  check_same(op, "dout", dout_in, "q", q_in);
  check_same(op, "out", out_in, "q", q_in);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), "llmkern_cuda::attention_bwd: ",
              "dout and out must have q's shape; q ", describe(q_in), ", dout ", describe(dout_in), ", out ",
              describe(out_in));
  const int64_t B = q_in.size(0), H = q_in.size(1), Sq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Sk = k_in.size(2);
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H &&
                  lse_in.size(2) == Sq,
              "llmkern_cuda::attention_bwd: lse must be float32 of shape [", B, ", ", H, ", ", Sq, "], got ",
              describe(lse_in));
  c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  at::Tensor dout = prepare(dout_in), out = prepare(out_in);
  at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({B, H, Sq}, lse.options());
  at::Tensor dq = at::empty({B, H, Sq, D}, q.options());
  at::Tensor dk = at::empty({B, Hkv, Sk, D}, q.options());
  at::Tensor dv = at::empty({B, Hkv, Sk, D}, q.options());
  auto stream = c10::cuda::getCurrentCUDAStream();

  const int64_t rows = B * H * Sq;
  const int rows_per_block = 8;  // one warp per row
  const bool half = q.scalar_type() == at::kHalf;
  auto launch_delta = [&](auto tag) {
    using T = decltype(tag);
    delta_kernel<T><<<(unsigned)((rows + rows_per_block - 1) / rows_per_block), rows_per_block * 32, 0, stream>>>(
        (const T*)dout.data_ptr(), strides_of(dout), (const T*)out.data_ptr(), strides_of(out),
        delta.data_ptr<float>(), (int)H, (int)Sq, (int)D, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  half ? launch_delta(__half()) : launch_delta(__nv_bfloat16());

  BwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.qs = strides_of(q);
  p.ks = strides_of(k);
  p.vs = strides_of(v);
  p.dos = strides_of(dout);
  p.dqs = strides_of(dq);
  p.dks = strides_of(dk);
  p.dvs = strides_of(dv);
  p.heads = (int)H;
  p.kv_group = (int)(H / Hkv);
  p.sq = (int)Sq;
  p.sk = (int)Sk;
  p.scale = (float)scale;
  p.scale_log2 = (float)(scale * LOG2E);
  p.causal = causal;
  if (D == 64) {
    half ? launch_bwd<__half, 64>(p, (int)B, (int)Hkv, stream) : launch_bwd<__nv_bfloat16, 64>(p, (int)B, (int)Hkv, stream);
  } else {
    half ? launch_bwd<__half, 128>(p, (int)B, (int)Hkv, stream)
         : launch_bwd<__nv_bfloat16, 128>(p, (int)B, (int)Hkv, stream);
  }
  return {dq, dk, dv};
}

}  // namespace llmkern
