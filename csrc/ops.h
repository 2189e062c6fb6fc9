// Host entry points of the llmkern CUDA ops; bound as llmkern_cuda::<name> (schemas in the
// TORCH_LIBRARY block of bindings.cpp). Every op checks its inputs with TORCH_CHECK, guards the
// input's device, launches on the current stream and checks every launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace llmkern {

std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias, double eps);
std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                       const c10::optional<at::Tensor>& weight, bool has_bias, const at::Tensor& mean,
                                       const at::Tensor& rstd);
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps);
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                     const at::Tensor& rstd);

at::Tensor softmax_fwd(const at::Tensor& x, double scale, bool causal);
at::Tensor softmax_bwd(const at::Tensor& dy, const at::Tensor& y, double scale);

std::vector<at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                      bool causal);
std::vector<at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
                                      bool causal);

at::Tensor linear_fwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
std::vector<at::Tensor> linear_gelu_fwd(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias);
std::vector<at::Tensor> linear_gelu_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& pre, bool has_bias);
std::vector<at::Tensor> linear_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                   bool has_bias);
// extra (MLP backward): dpre = (dz @ weight) * gelu_tanh'(pre), dbias = sum over rows of dpre
std::vector<at::Tensor> linear_dgelu_bwd(const at::Tensor& dz, const at::Tensor& weight, const at::Tensor& pre);
// out (N, K) float32 (or x's dtype) = dy^T x, plus out when accumulate: chunked weight gradients
void dweight_accumulate(const at::Tensor& out, const at::Tensor& dy, const at::Tensor& x, bool accumulate);
// number of cached cuBLASLt GEMM plans (descriptors + chosen algorithm), for tests
int64_t linear_cache_size();

std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                                          double label_smoothing);
at::Tensor cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& lse, int64_t ignore_index, double label_smoothing);

}  // namespace llmkern
