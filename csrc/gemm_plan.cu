// cuBLASLt GEMM plans (gemm_plan.h).
#include "gemm_plan.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "common.h"

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

}  // namespace

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

int64_t gemm_plan_count() {
  std::lock_guard<std::mutex> lock(plans_mutex());
  return (int64_t)plans().size();
}

}  // namespace llmkern
