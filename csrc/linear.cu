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
// cached per GEMM plan, the workspace per device and stream (below): a repeated call neither
// queries the heuristic nor allocates anything but its outputs.
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <cublasLt.h>

#include <array>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "common.h"
#include "ops.h"

namespace llmkern {
namespace {

constexpr size_t WORKSPACE_BYTES = 32u << 20;

#define LT_CHECK(expr)                                                                                  \
  do {                                                                                                  \
    cublasStatus_t st_ = (expr);                                                                        \
    TORCH_CHECK(st_ == CUBLAS_STATUS_SUCCESS, "llmkern_cuda: cuBLASLt call ", #expr, " failed with status ", \
                (int)st_);                                                                              \
  } while (0)

cublasLtHandle_t lt_handle(int device) {
  static std::array<cublasLtHandle_t, 64> handles{};
  static std::mutex mu;
  TORCH_CHECK(device >= 0 && device < 64, "llmkern_cuda: device index ", device, " out of range");
  std::lock_guard<std::mutex> lock(mu);
  if (handles[device] == nullptr) LT_CHECK(cublasLtCreate(&handles[device]));
  return handles[device];
}

cudaDataType_t cuda_type(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kFloat: return CUDA_R_32F;
    default: TORCH_CHECK(false, "llmkern_cuda: unsupported dtype ", c10::toString(st), " for a linear layer");
  }
}

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

// ---- plan cache ---------------------------------------------------------------------------
// A plan (matmul descriptor, layouts, heuristic algorithm) is keyed by everything the heuristic
// sees: device, dtype, shape, transposes, leading dims, epilogue, bias/aux presence and the
// pointers' alignment (the preference states it, so an algorithm needing more is never picked).
// Plans live for the whole process and are never destroyed: their number is bounded by the
// distinct GEMM shapes of a model (capped below), and destroying them from a static destructor
// could run after cuBLASLt or the CUDA context has gone. A miss (no algorithm) is cached too.
constexpr size_t MAX_PLANS = 4096;

uint32_t alignment(const void* p) {  // largest power of two <= 256 dividing the address
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al >>= 1;
  return al;
}

struct PlanKey {
  std::array<int64_t, 16> v;
  bool operator==(const PlanKey& o) const { return v == o.v; }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t x : k.v) h = (h ^ (size_t)x) * 1099511628211ull;
    return h;
  }
};

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
  bool found = false;
  std::mutex mu;  // the bias/aux pointers are set on the shared descriptor right before a launch
  ~Plan() {       // only transient plans (cache full) are destroyed
    if (ld) cublasLtMatrixLayoutDestroy(ld);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

std::mutex& plans_mutex() {
  static std::mutex mu;
  return mu;
}

std::unordered_map<PlanKey, Plan*, PlanKeyHash>& plans() {
  static auto* map = new std::unordered_map<PlanKey, Plan*, PlanKeyHash>();  // never freed, see above
  return *map;
}

void make_plan(Plan& p, const Gemm& g, cudaDataType_t dt, cublasLtHandle_t handle, const uint32_t (&align)[3]) {
  LT_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = g.transa ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g.transb ? CUBLAS_OP_T : CUBLAS_OP_N;
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epilogue, sizeof(g.epilogue)));
  // the heuristic sees the pointers of this first call; later calls set their own before launching
  if (g.bias != nullptr)
    LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  if (g.aux != nullptr) {
    LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux, sizeof(g.aux)));
    LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &g.ldaux, sizeof(g.ldaux)));
  }
  // stored shapes (before op): A is k x m when transposed, else m x k; likewise B
  LT_CHECK(cublasLtMatrixLayoutCreate(&p.la, dt, g.transa ? g.k : g.m, g.transa ? g.m : g.k, g.lda));
  LT_CHECK(cublasLtMatrixLayoutCreate(&p.lb, dt, g.transb ? g.n : g.k, g.transb ? g.k : g.n, g.ldb));
  LT_CHECK(cublasLtMatrixLayoutCreate(&p.ld, g.d_fp32 ? CUDA_R_32F : dt, g.m, g.n, g.ldd));
  cublasLtMatmulPreference_t pref = nullptr;
  LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  struct PrefGuard {
    cublasLtMatmulPreference_t p;
    ~PrefGuard() { cublasLtMatmulPreferenceDestroy(p); }
  } guard{pref};
  size_t ws = WORKSPACE_BYTES;
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align[0],
                                                sizeof(uint32_t)));
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align[1],
                                                sizeof(uint32_t)));
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align[2],
                                                sizeof(uint32_t)));
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align[2],
                                                sizeof(uint32_t)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.la, p.lb, p.ld, p.ld, pref, 1, &result, &found);
  p.found = st == CUBLAS_STATUS_SUCCESS && found > 0;
  if (p.found) {
    p.algo = result.algo;
    p.workspace = result.workspaceSize;
  }
}

// One workspace per (device, stream), grown to the largest size a plan asked for; a stream only
// ever uses its own, so its earlier launches are ordered before any reallocation reuses it.
void* workspace_for(const at::Tensor& like, int64_t stream_id, size_t bytes) {
  static std::mutex mu;
  static auto* spaces = new std::unordered_map<int64_t, at::Tensor>();  // never freed, as the plans
  if (bytes == 0) return nullptr;
  const int64_t key = stream_id * 64 + like.get_device();
  std::lock_guard<std::mutex> lock(mu);
  at::Tensor& ws = (*spaces)[key];
  if (!ws.defined() || (size_t)ws.numel() < bytes) ws = at::empty({(int64_t)bytes}, like.options().dtype(at::kByte));
  return ws.data_ptr();
}

// Runs one GEMM; returns false (running nothing) when cuBLASLt finds no algorithm for it.
bool run_gemm(const Gemm& g, at::ScalarType st, const at::Tensor& like) {
  const int device = like.get_device();
  cublasLtHandle_t handle = lt_handle(device);
  const cudaDataType_t dt = cuda_type(st);
  const uint32_t align[3] = {alignment(g.a), alignment(g.b), alignment(g.d)};
  const uint32_t bias_align = g.bias != nullptr ? alignment(g.bias) : 0, aux_align = g.aux ? alignment(g.aux) : 0;
  const PlanKey key{{device, (int64_t)st << 1 | g.d_fp32, g.transa, g.transb, g.m, g.n, g.k, g.lda, g.ldb, g.ldd, (int64_t)g.epilogue,
                     g.aux != nullptr ? g.ldaux : -1, (int64_t)align[0] << 16 | align[1], (int64_t)align[2],
                     (int64_t)bias_align << 16 | aux_align, g.bias != nullptr}};
  Plan* plan = nullptr;
  std::unique_ptr<Plan> transient;
  {
    std::lock_guard<std::mutex> lock(plans_mutex());
    auto it = plans().find(key);
    if (it != plans().end()) plan = it->second;
  }
  if (plan == nullptr) {
    auto fresh = std::make_unique<Plan>();
    make_plan(*fresh, g, dt, handle, align);
    std::lock_guard<std::mutex> lock(plans_mutex());
    auto it = plans().find(key);
    if (it != plans().end()) {  // another thread planned it meanwhile: use theirs
      plan = it->second;
    } else if (plans().size() < MAX_PLANS) {
      plan = fresh.release();
      plans().emplace(key, plan);
    } else {
      transient = std::move(fresh);
      plan = transient.get();
    }
  }
  if (!plan->found) return false;
  auto stream = c10::cuda::getCurrentCUDAStream();
  void* ws = workspace_for(like, (int64_t)stream.id(), plan->workspace);
  const float alpha = 1.f, beta = g.beta;
  std::lock_guard<std::mutex> lock(plan->mu);
  if (g.bias != nullptr)
    LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  if (g.aux != nullptr)
    LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux,
                                            sizeof(g.aux)));
  LT_CHECK(cublasLtMatmul(handle, plan->desc, &alpha, g.a, plan->la, g.b, plan->lb, &beta, g.d, plan->ld, g.d,
                          plan->ld, &plan->algo, ws, plan->workspace, stream.stream()));
  return true;
}

void gemm_or_throw(const Gemm& g, at::ScalarType st, const at::Tensor& like, const char* op) {
  TORCH_CHECK(run_gemm(g, st, like), "llmkern_cuda::", op, ": cuBLASLt found no algorithm for a ", g.m, "x", g.n,
              "x", g.k, " GEMM of dtype ", c10::toString(st));
}

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

int64_t linear_cache_size() {
  std::lock_guard<std::mutex> lock(plans_mutex());
  return (int64_t)plans().size();
}

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
