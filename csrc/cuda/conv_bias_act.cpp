// CUDA kernels of conv2d_bias_act and add_relu: the launch layer. It checks inputs, picks
// the layout, fills EpilogueParams and launches on the current stream of the input's device.
//
// First version: the convolution runs in cuDNN (through ATen) on the folded weight, then our
// kernel applies bias + residual + ReLU in one pass over its output. A tensor-core kernel
// with the epilogue in registers will slot in beside `cudnn_conv` here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "epilogue.h"

namespace resnet_fused::cuda {
namespace {

using at::Tensor;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat;
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "resnet_fused: unsupported dtype ", t);
  }
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "resnet_fused: ", name, " must be a CUDA tensor, got ", t.device());
}

// dst = act(src + bias + residual); all dense in one memory format.
void run_epilogue(const Tensor& src, const Tensor& dst, const Tensor* bias_f, const Tensor* residual, bool relu,
                  bool channels_last) {
  EpilogueParams p;
  p.src = src.const_data_ptr();
  p.dst = dst.data_ptr();
  p.residual = residual ? residual->const_data_ptr() : nullptr;
  p.bias = bias_f ? bias_f->const_data_ptr<float>() : nullptr;
  p.numel = src.numel();
  if (src.dim() == 4) {
    p.C = src.size(1);
    p.HW = src.size(2) * src.size(3);
  }
  p.channels_last = channels_last;
  p.relu = relu;
  p.dtype = to_dtype(src.scalar_type());
  C10_CUDA_CHECK(launch_bias_act_epilogue(p, c10::cuda::getCurrentCUDAStream(src.get_device()).stream()));
}

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

// (assume_finite changes nothing here: our epilogue keeps NaN as torch.relu does.)
Tensor conv2d_bias_act(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool relu, bool /*assume_finite*/) {
  check_cuda(input, "input");
  const auto out_shape = check_conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = input.suggest_memory_format();
  if (input.numel() == 0) {
    return at::empty(out_shape, input.options().memory_format(fmt));
  }
  Tensor out = cudnn_conv(input, weight, stride, padding, dilation, groups, fmt);
  const Tensor bias_f = float_bias(bias);
  const Tensor res = residual.has_value() ? residual->contiguous(fmt) : Tensor();
  run_epilogue(out, out, bias.has_value() ? &bias_f : nullptr, residual.has_value() ? &res : nullptr, relu,
               fmt == at::MemoryFormat::ChannelsLast);
  return out;
}

// In place into the residual: cuDNN's conv output, then one epilogue pass that reads it and the
// residual and writes the residual.
void conv2d_bias_act_(Tensor& residual, const Tensor& input, const Tensor& weight,
                         const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, bool relu, bool /*assume_finite*/) {
  check_cuda(input, "input");
  check_conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  if (input.numel() == 0) return;
  const auto fmt = input.suggest_memory_format();
  if (!residual.is_contiguous(fmt)) {
    residual.copy_(conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, groups, relu, false));
    return;
  }
  const Tensor out = cudnn_conv(input, weight, stride, padding, dilation, groups, fmt);
  const Tensor bias_f = float_bias(bias);
  run_epilogue(out, residual, bias.has_value() ? &bias_f : nullptr, &residual, relu,
               fmt == at::MemoryFormat::ChannelsLast);
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

// No packed layout on CUDA: cuDNN takes the dense weight (a copy: the schema promises no aliasing).
Tensor prepack_conv2d_weight(const Tensor& weight, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                             at::IntArrayRef) {
  RF_CHECK_DIM(weight, 4, "weight");
  RF_CHECK_DTYPE(weight, "weight");
  return weight.clone();
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv2d_bias_act", &conv2d_bias_act);
  m.impl("conv2d_bias_act_", &conv2d_bias_act_);
  m.impl("add_relu", &add_relu);
  m.impl("prepack_conv2d_weight", &prepack_conv2d_weight);
}

}  // namespace resnet_fused::cuda
