// Flash-attention forward on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate).
//
// A block of 4 warps owns BM = 64 query rows of one (batch, head); each warp owns 16 rows and
// keeps its Q fragments, its S = Q K^T tile, the online-softmax statistics (running max m and sum l, in the
// exp2 domain) and its O accumulator in registers. K/V tiles of BN = 64 keys are streamed
// through shared memory with cp.async double buffering (the copy of tile j+1 overlaps the
// math of tile j). Causal masking is bottom-right aligned (query i sees key j <= i + Sk - Sq);
// key tiles past the diagonal are skipped; a row that sees no key gets zeros and lse = -inf.
#include "attention_common.cuh"
#include "ops.h"

namespace llmkern {
namespace attn {
namespace {

constexpr int BM = 64, BN = 64, WARPS = 4, THREADS = WARPS * 32;

struct FwdParams {
  const void *q, *k, *v;
  void* o;
  float* lse;
  Strides qs, ks, vs, os;
  int heads, kv_group, sq, sk;
  float scale_log2;  // softmax scale * log2(e): scores live in the exp2 domain
  bool causal;
};

template <int D>
constexpr int fwd_smem_bytes() {
  return (BM * D + 4 * BN * D) * 2;  // Q, K[2], V[2] in 16-bit elements
}

template <typename T, int D>
__global__ void __launch_bounds__(THREADS) attention_fwd_kernel(const FwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;       // two buffers of BN * D
  T* sV = sK + 2 * BN * D;   // two buffers of BN * D

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int q0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / p.kv_group;
  const T* qg = static_cast<const T*>(p.q) + b * p.qs.b + h * p.qs.h;
  const T* kg = static_cast<const T*>(p.k) + b * p.ks.b + hk * p.ks.h;
  const T* vg = static_cast<const T*>(p.v) + b * p.vs.b + hk * p.vs.h;
  T* og = static_cast<T*>(p.o) + b * p.os.b + h * p.os.h;
  const int off = p.sk - p.sq;  // bottom-right diagonal offset

  int n_blocks = (p.sk + BN - 1) / BN;
  if (p.causal) {
    const int last_key = min(q0 + BM, p.sq) - 1 + off;  // the furthest key any row of the block sees
    n_blocks = last_key < 0 ? 0 : min(n_blocks, last_key / BN + 1);
  }

  load_tile<T, BM, D, THREADS>(sQ, qg, p.qs.s, q0, p.sq);
  if (n_blocks > 0) {
    load_tile<T, BN, D, THREADS>(sK, kg, p.ks.s, 0, p.sk);
    load_tile<T, BN, D, THREADS>(sV, vg, p.vs.s, 0, p.sk);
  }
  cp_async_commit();

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[D / 8][4];
  zero(o);
  const int row_base = q0 + warp * 16 + gq;  // this thread's rows: row_base and row_base + 8
  uint32_t qa[D / 16][4];

  for (int j = 0; j < n_blocks; ++j) {
    const int buf = j & 1;
    if (j + 1 < n_blocks) {
      load_tile<T, BN, D, THREADS>(sK + (buf ^ 1) * BN * D, kg, p.ks.s, (j + 1) * BN, p.sk);
      load_tile<T, BN, D, THREADS>(sV + (buf ^ 1) * BN * D, vg, p.vs.s, (j + 1) * BN, p.sk);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    if (j == 0) {  // Q stays in registers: one ldmatrix pass instead of one per key tile
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) load_a<T, D>(qa[ks], sQ, warp * 16, ks);
    }
    float s[BN / 8][4];
    zero(s);
    gemm_rA_sB<T, D / 16, BN / 8, D>(s, qa, sK + buf * BN * D, 0);

    const int k0 = j * BN;
    const bool need_mask = (k0 + BN > p.sk) || (p.causal && k0 + BN - 1 > q0 + off);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (need_mask) {
          const int col = k0 + nt * 8 + 2 * tq + (e & 1);
          const int row = row_base + 8 * (e >> 1);
          if (col >= p.sk || (p.causal && col > row + off)) x = -INFINITY;
        }
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float m_use[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet stays at 0
      alpha[r] = exp2f(m[r] - m_use[r]);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pv = exp2f(s[nt][e] - m_use[e >> 1]);
        s[nt][e] = pv;
        l[e >> 1] += pv;
      }
    }
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      o[nt][0] *= alpha[0];
      o[nt][1] *= alpha[0];
      o[nt][2] *= alpha[1];
      o[nt][3] *= alpha[1];
    }
    uint32_t pa[BN / 16][4];
    c_to_a<T, BN / 8>(pa, s);
    gemm_rA_sBt<T, BN / 16, D / 8, D>(o, pa, sV + buf * BN * D, 0);
    __syncthreads();  // the next iteration's copy overwrites this buffer
  }
  cp_async_wait<0>();

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
    const int row = row_base + 8 * r;
    if (tq == 0 && row < p.sq) {
      const float lse = l[r] > 0.f ? (m[r] + __log2f(l[r])) * LN2 : -INFINITY;
      p.lse[((int64_t)b * p.heads + h) * p.sq + row] = lse;
    }
  }
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    o[nt][0] *= inv[0];
    o[nt][1] *= inv[0];
    o[nt][2] *= inv[1];
    o[nt][3] *= inv[1];
  }
  store_c<T, D / 8>(og, p.os.s, q0 + warp * 16, p.sq, o, 1.f);
}

template <typename T, int D>
void launch_fwd(const FwdParams& p, int batch, cudaStream_t stream) {
  auto kernel = attention_fwd_kernel<T, D>;
  constexpr int smem = fwd_smem_bytes<D>();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  dim3 grid((p.sq + BM - 1) / BM, p.heads, batch);
  kernel<<<grid, THREADS, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace attn

std::vector<at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                      double scale, bool causal) {
  using namespace attn;
  check_qkv("attention_fwd", q_in, k_in, v_in);
  c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK((Sq + BM - 1) / BM <= 2147483647, "llmkern_cuda::attention_fwd: too many query blocks");
  at::Tensor out = at::empty({B, H, Sq, D}, q.options());
  at::Tensor lse = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  FwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.qs = strides_of(q);
  p.ks = strides_of(k);
  p.vs = strides_of(v);
  p.os = strides_of(out);
  p.heads = (int)H;
  p.kv_group = (int)(H / Hkv);
  p.sq = (int)Sq;
  p.sk = (int)Sk;
  p.scale_log2 = (float)(scale * LOG2E);
  p.causal = causal;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool half = q.scalar_type() == at::kHalf;
  if (D == 64) {
    half ? launch_fwd<__half, 64>(p, (int)B, stream) : launch_fwd<__nv_bfloat16, 64>(p, (int)B, stream);
  } else {
    half ? launch_fwd<__half, 128>(p, (int)B, stream) : launch_fwd<__nv_bfloat16, 128>(p, (int)B, stream);
  }
  return {out, lse};
}

}  // namespace llmkern
