// CUDA kernels of conv2d_bias_act, conv2d_bias_act_ and add_relu: checks, then the path.
//
// float16/bfloat16 channels-last layers that our kernel covers (launch.h: fused_conv_unsupported),
// and float32 ones on TF32 where torch.backends.cudnn.allow_tf32 allows it and the tactics chose it
// (conv_algo with its tile), run our implicit-GEMM
// kernel (kernels/implicit_gemm.cuh): conv + bias + residual + ReLU in one pass, the epilogue in
// registers. Everything else (float32 with TF32 off, NCHW, odd channel counts) runs cuDNN's
// convolution and then our epilogue kernel in one more pass.
// RESNET_FUSED_CUDA_CONV=cudnn, or resnet_fused.set_cuda_conv("cudnn"), sends every layer the
// second way (benchmarks compare the two side by side).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../checks.h"
#include "kernels/implicit_gemm.h"  // kNumTiles
#include "launch.h"

namespace resnet_fused::cuda {
namespace {

using at::Tensor;

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "resnet_fused: ", name, " must be a CUDA tensor, got ", t.device());
}

std::atomic<bool>& our_kernel_enabled() {
  static std::atomic<bool> enabled{[] {
    const char* v = std::getenv("RESNET_FUSED_CUDA_CONV");
    return !(v && std::strcmp(v, "cudnn") == 0);
  }()};
  return enabled;
}

// "ours" (our kernel where it applies) or "cudnn" (cuDNN + epilogue everywhere); returns the
// previous setting.
std::string set_cuda_conv(c10::string_view backend) {
  TORCH_CHECK_VALUE(backend == "ours" || backend == "cudnn",
                    "resnet_fused: the CUDA convolution backend must be 'ours' or 'cudnn', got '", backend, "'");
  return our_kernel_enabled().exchange(backend == "ours") ? "ours" : "cudnn";
}

bool use_our_kernel(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& residual,
                    int64_t groups) {
  return our_kernel_enabled().load() && fused_conv_unsupported(input, weight, residual, groups) == nullptr;
}

int64_t num_sms(const Tensor& t) { return at::cuda::getDeviceProperties(t.get_device())->multiProcessorCount; }

// cuDNN's convolution without bias, dense in the input's layout. cuDNN picks the output layout
// from input and weight; the weight is kept in the input's so that no copy follows (the fused
// modules cache a weight per layout).
Tensor cudnn_conv(const Tensor& input, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation, int64_t groups, at::MemoryFormat fmt) {
  return at::convolution(input, weight.contiguous(fmt), std::nullopt, stride, padding, dilation, false, {0, 0},
                         groups)
      .contiguous(fmt);
}

Tensor float_bias(const std::optional<Tensor>& bias) {
  return bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
}

// Which path a call takes: kAuto (our kernel where it applies, as planned; else cuDNN + our
// epilogue), kCudnn (cuDNN + our epilogue), or a tile >= 0 of our kernel (split-K as planned):
// the tactics (resnet_fused/tactics.py) time these per layer. set_cuda_conv("cudnn") overrides all.
constexpr int64_t kAuto = -1, kCudnn = -2;

bool take_our_kernel(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& residual,
                     int64_t groups, int64_t algo) {
  TORCH_CHECK_VALUE(algo >= kCudnn && algo < kNumTiles, "resnet_fused: CUDA conv algo must be in [", kCudnn, ", ",
                    kNumTiles, "), got ", algo);
  if (algo == kCudnn || !our_kernel_enabled().load()) return false;
  // (float32 takes our TF32 kernel only where the tactics chose it: measured faster there, and
  // within the accuracy rule against cuDNN on that layer's own weights)
  if (algo == kAuto) return input.scalar_type() != at::kFloat && use_our_kernel(input, weight, residual, groups);
  if (const char* why = fused_conv_unsupported(input, weight, residual, groups)) {
    TORCH_CHECK_VALUE(false, "resnet_fused: our CUDA kernel (tile ", algo, ") cannot run this call: ", why);
  }
  return true;
}

// (assume_finite changes nothing here: our kernels keep NaN as torch.relu does.)
Tensor conv_algo(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                 const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation, int64_t groups, bool relu, int64_t algo) {
  check_cuda(input, "input");
  const auto out_shape = check_conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = input.suggest_memory_format();
  const bool ours = take_our_kernel(input, weight, residual, groups, algo);
  if (input.numel() == 0) {
    return at::empty(out_shape, input.options().memory_format(fmt));
  }
  if (ours) {
    return fused_conv(input, weight, bias, residual, stride, padding, dilation, groups, relu, /*inplace=*/false,
                      num_sms(input), algo >= 0 ? algo : -1);
  }
  Tensor out = cudnn_conv(input, weight, stride, padding, dilation, groups, fmt);
  const Tensor bias_f = float_bias(bias);
  const Tensor res = residual.has_value() ? residual->contiguous(fmt) : Tensor();
  run_epilogue(out, out, bias.has_value() ? &bias_f : nullptr, residual.has_value() ? &res : nullptr, relu,
               fmt == at::MemoryFormat::ChannelsLast);
  return out;
}

// In place into the residual: our kernel reads each residual element and writes the result over
// it; on the cuDNN path, its output and one epilogue pass that writes the residual.
void conv_algo_(Tensor& residual, const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                int64_t algo) {
  check_cuda(input, "input");
  check_conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool ours = take_our_kernel(input, weight, residual, groups, algo);
  if (input.numel() == 0) return;
  const auto fmt = input.suggest_memory_format();
  if (!residual.is_contiguous(fmt)) {
    residual.copy_(conv_algo(input, weight, bias, residual, stride, padding, dilation, groups, relu, algo));
    return;
  }
  if (ours) {
    fused_conv(input, weight, bias, residual, stride, padding, dilation, groups, relu, /*inplace=*/true, num_sms(input),
               algo >= 0 ? algo : -1);
    return;
  }
  const Tensor out = cudnn_conv(input, weight, stride, padding, dilation, groups, fmt);
  const Tensor bias_f = float_bias(bias);
  run_epilogue(out, residual, bias.has_value() ? &bias_f : nullptr, &residual, relu,
               fmt == at::MemoryFormat::ChannelsLast);
}

Tensor conv2d_bias_act(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool relu, bool /*assume_finite*/) {
  return conv_algo(input, weight, bias, residual, stride, padding, dilation, groups, relu, kAuto);
}

void conv2d_bias_act_(Tensor& residual, const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      bool relu, bool /*assume_finite*/) {
  conv_algo_(residual, input, weight, bias, stride, padding, dilation, groups, relu, kAuto);
}

// Why our kernel cannot run a call ("" when it can): what the tactics ask before timing it.
std::string cuda_conv_unsupported(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& residual,
                                  int64_t groups) {
  const char* why = fused_conv_unsupported(input, weight, residual, groups);
  return why ? why : "";
}

// A bottleneck's last 1x1 and its downsample 1x1 as one layer (launch.h: fused_conv_dual): our
// dual kernel (algo: kAuto or a tile), or cuDNN's two convolutions and our epilogue (kCudnn, or
// where our kernel cannot run it).
Tensor dual_algo(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& input2,
                 int64_t stride2, bool relu, int64_t algo) {
  check_cuda(input, "input");
  check_cuda(input2, "input2");
  TORCH_CHECK_VALUE(algo >= kCudnn && algo < kNumTiles, "resnet_fused: CUDA conv algo must be in [", kCudnn, ", ",
                    kNumTiles, "), got ", algo);
  const c10::cuda::CUDAGuard guard(input.device());
  const char* why = fused_conv_dual_unsupported(input, weight, input2, stride2);
  TORCH_CHECK_VALUE(algo < 0 || !why, "resnet_fused: our dual kernel (tile ", algo, ") cannot run this call: ",
                    why ? why : "");
  if (algo != kCudnn && !why && our_kernel_enabled().load()) {
    return fused_conv_dual(input, weight, bias, input2, stride2, relu, num_sms(input), algo);
  }
  TORCH_CHECK_VALUE(input.dim() == 4 && input2.dim() == 4 && weight.dim() == 4 &&
                        weight.size(1) == input.size(1) + input2.size(1),
                    "resnet_fused: dual convolution: weight must be [K, C + C2, 1, 1] for inputs of ", input.sizes(),
                    " and ", input2.sizes(), ", got ", weight.sizes());
  const auto fmt = input.suggest_memory_format();
  const int64_t c = input.size(1);
  Tensor out = cudnn_conv(input, weight.narrow(1, 0, c), {1, 1}, {0, 0}, {1, 1}, 1, fmt);
  const Tensor other = cudnn_conv(input2, weight.narrow(1, c, input2.size(1)), {stride2, stride2}, {0, 0}, {1, 1}, 1, fmt);
  TORCH_CHECK_VALUE(other.sizes() == out.sizes(), "resnet_fused: dual convolution: the two convolutions give ",
                    out.sizes(), " and ", other.sizes());
  if (out.numel() == 0) return out;
  const Tensor bias_f = float_bias(bias);
  run_epilogue(out, out, bias.has_value() ? &bias_f : nullptr, &other, relu, fmt == at::MemoryFormat::ChannelsLast);
  return out;
}

std::string cuda_dual_unsupported(const Tensor& input, const Tensor& weight, const Tensor& input2, int64_t stride2) {
  const char* why = fused_conv_dual_unsupported(input, weight, input2, stride2);
  return why ? why : "";
}

Tensor add_relu(const Tensor& a, const Tensor& b) {
  check_cuda(a, "a");
  check_add_relu(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto fmt = a.suggest_memory_format();
  const Tensor ac = a.contiguous(fmt);
  const Tensor bc = b.contiguous(fmt);
  Tensor out = at::empty_like(ac, ac.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  run_epilogue(ac, out, nullptr, &bc, /*relu=*/true, fmt == at::MemoryFormat::ChannelsLast);
  return out;
}

// No packed layout on CUDA: the kernels take the dense weight (a copy: the schema promises no aliasing).
Tensor prepack_conv2d_weight(const Tensor& weight, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                             at::IntArrayRef) {
  RF_CHECK_DIM(weight, 4, "weight");
  RF_CHECK_DTYPE(weight, "weight");
  return weight.clone();
}

Tensor conformance_cuda(const Tensor& in, const Tensor& tile, int64_t op) {
  check_cuda(in, "inputs");
  return conformance(op, in, tile);
}

}  // namespace

// A setting with no tensor to dispatch on, defined only in builds with CUDA kernels.
TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def("_set_cuda_conv(str backend) -> str", &set_cuda_conv);
  // One CUDA path for a layer, by number (kAuto, kCudnn or a tile of our kernel): the tactics' handle.
  m.def(
      "cuda_conv2d_bias_act(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool relu, int algo) -> Tensor");
  m.def(
      "cuda_conv2d_bias_act_(Tensor(a!) residual, Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool relu, int algo) -> ()");
  m.def("_cuda_conv_unsupported(Tensor input, Tensor weight, Tensor? residual, int groups) -> str");
  // A bottleneck's last 1x1 and its downsample 1x1 in one product (weight [K, C + C2, 1, 1]).
  m.def(
      "cuda_conv1x1_dual_bias_act(Tensor input, Tensor weight, Tensor? bias, Tensor input2, int stride2, bool relu, "
      "int algo) -> Tensor");
  m.def("_cuda_dual_unsupported(Tensor input, Tensor weight, Tensor input2, int stride2) -> str");
}

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv2d_bias_act", &conv2d_bias_act);
  m.impl("conv2d_bias_act_", &conv2d_bias_act_);
  m.impl("add_relu", &add_relu);
  m.impl("prepack_conv2d_weight", &prepack_conv2d_weight);
  m.impl("_conformance", &conformance_cuda);
  m.impl("cuda_conv2d_bias_act", &conv_algo);
  m.impl("cuda_conv2d_bias_act_", &conv_algo_);
  m.impl("_cuda_conv_unsupported", &cuda_conv_unsupported);
  m.impl("cuda_conv1x1_dual_bias_act", &dual_algo);
  m.impl("_cuda_dual_unsupported", &cuda_dual_unsupported);
}

}  // namespace resnet_fused::cuda
