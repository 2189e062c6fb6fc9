// The one binding file of llmkern._C: op schemas (namespace llmkern_cuda) with their CUDA
// implementations, inside the pybind11 module that `from llmkern import _C` loads. The ops are
// reached from Python as torch.ops.llmkern_cuda.<name> (llmkern/ops/cuda_ext.py: call()).
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(llmkern_cuda, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, bool has_bias, Tensor mean, Tensor rstd)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("softmax_fwd(Tensor x, float scale, bool causal) -> Tensor");
  m.def("softmax_bwd(Tensor dy, Tensor y, float scale) -> Tensor");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, bool causal)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("linear_fwd(Tensor x2d, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_gelu_fwd(Tensor x2d, Tensor weight, Tensor? bias) -> (Tensor, Tensor)");
  m.def("linear_gelu_bwd(Tensor dy2d, Tensor x2d, Tensor weight, Tensor pre, bool has_bias)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("linear_bwd(Tensor dy2d, Tensor x2d, Tensor weight, bool has_bias) -> (Tensor, Tensor, Tensor)");
  m.def("linear_dgelu_bwd(Tensor dz, Tensor weight, Tensor pre) -> (Tensor, Tensor)");
  m.def("dweight_accumulate(Tensor(a!) out, Tensor dy, Tensor x, bool accumulate) -> ()");
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing)"
        " -> (Tensor, Tensor)");
  m.def("cross_entropy_bwd(Tensor dloss, Tensor logits, Tensor target, Tensor lse, int ignore_index,"
        " float label_smoothing) -> Tensor");
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> tup3(std::vector<at::Tensor> v) {
  return {v.at(0), v.at(1), v.at(2)};
}
std::tuple<at::Tensor, at::Tensor> tup2(std::vector<at::Tensor> v) { return {v.at(0), v.at(1)}; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& w,
                                                              const c10::optional<at::Tensor>& b, double eps) {
  return tup3(llmkern::layer_norm_fwd(x, w, b, eps));
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& w, bool has_bias,
                                                              const at::Tensor& mean, const at::Tensor& rstd) {
  return tup3(llmkern::layer_norm_bwd(dy, x, w, has_bias, mean, rstd));
}
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& w, double eps) {
  return tup2(llmkern::rms_norm_fwd(x, w, eps));
}
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const c10::optional<at::Tensor>& w, const at::Tensor& rstd) {
  return tup2(llmkern::rms_norm_bwd(dy, x, w, rstd));
}
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale, bool causal) {
  return tup2(llmkern::attention_fwd(q, k, v, scale, causal));
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             double scale, bool causal) {
  return tup3(llmkern::attention_bwd(dout, q, k, v, out, lse, scale, causal));
}
std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(const at::Tensor& x, const at::Tensor& w,
                                                   const c10::optional<at::Tensor>& b) {
  return tup2(llmkern::linear_gelu_fwd(x, w, b));
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                               const at::Tensor& w, const at::Tensor& pre,
                                                               bool has_bias) {
  return tup3(llmkern::linear_gelu_bwd(dy, x, w, pre, has_bias));
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                          const at::Tensor& w, bool has_bias) {
  return tup3(llmkern::linear_bwd(dy, x, w, has_bias));
}
std::tuple<at::Tensor, at::Tensor> linear_dgelu_bwd(const at::Tensor& dz, const at::Tensor& w, const at::Tensor& pre) {
  return tup2(llmkern::linear_dgelu_bwd(dz, w, pre));
}
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                     int64_t ignore_index, double label_smoothing) {
  return tup2(llmkern::cross_entropy_fwd(logits, target, ignore_index, label_smoothing));
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkern_cuda, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("softmax_fwd", &llmkern::softmax_fwd);
  m.impl("softmax_bwd", &llmkern::softmax_bwd);
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("linear_fwd", &llmkern::linear_fwd);
  m.impl("linear_gelu_fwd", &linear_gelu_fwd);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd);
  m.impl("linear_bwd", &linear_bwd);
  m.impl("linear_dgelu_bwd", &linear_dgelu_bwd);
  m.impl("dweight_accumulate", &llmkern::dweight_accumulate);
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &llmkern::cross_entropy_bwd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llmkern CUDA C++ kernels; the ops are torch.ops.llmkern_cuda.*";
  m.attr("HEAD_DIMS") = pybind11::make_tuple(64, 128);
  m.def("linear_cache_size", &llmkern::linear_cache_size, "number of cached cuBLASLt GEMM plans");
  m.attr("OPS") = pybind11::make_tuple("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd",
                                       "softmax_fwd", "softmax_bwd", "attention_fwd", "attention_bwd", "linear_fwd",
                                       "linear_gelu_fwd", "linear_gelu_bwd", "linear_bwd", "linear_dgelu_bwd",
                                       "dweight_accumulate", "cross_entropy_fwd", "cross_entropy_bwd");
}
