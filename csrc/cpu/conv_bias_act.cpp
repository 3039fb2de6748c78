// CPU kernels of conv2d_bias_act, add_relu and prepack_conv2d_weight.
//
// Fast path: one oneDNN convolution primitive with the whole epilogue as post-ops (bias,
// binary add of the residual, ReLU), reached through the mkldnn::_convolution_pointwise ops
// that PyTorch registers for Inductor; weights may come prepacked in oneDNN's blocked layout.
// Other path (oneDNN disabled by torch.backends.mkldnn, or no oneDNN kernel for the dtype on
// this CPU): ATen's convolution without bias, then our vectorised epilogue in one pass.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <atomic>

#include "../checks.h"
#include "epilogue.h"

namespace resnet_fused::cpu {
namespace {

using at::Tensor;

// Whether oneDNN has a kernel for a dtype on this CPU; learned on first use, since
// PyTorch refuses bf16/fp16 oneDNN convolutions on CPUs without the instructions.
std::atomic<int> onednn_ok_bf16{-1}, onednn_ok_half{-1};

std::atomic<int>* onednn_state(at::ScalarType t) {
  if (t == at::kBFloat16) return &onednn_ok_bf16;
  if (t == at::kHalf) return &onednn_ok_half;
  return nullptr;
}

bool onednn_enabled(at::ScalarType t) {
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return false;
  auto* state = onednn_state(t);
  return state == nullptr || state->load() != 0;
}

c10::OperatorHandle op_handle(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

std::vector<int64_t> vec(at::IntArrayRef a) { return a.vec(); }

// oneDNN runs NHWC when the input or the weight is channels-last, or the weight is packed.
bool onednn_runs_nhwc(const Tensor& input, const Tensor& weight) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast || weight.is_mkldnn() ||
         weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// out = act(out + residual) in place, in out's own layout: the part of the epilogue a primitive
// could not take (the bias is already in). Returns out, made dense if it was not.
Tensor residual_relu_(Tensor out, const std::optional<Tensor>& residual, bool relu) {
  if (!residual.has_value() && !relu) return out;
  const auto fmt = out.suggest_memory_format();
  out = out.contiguous(fmt);
  const Tensor res = residual.has_value() ? residual->contiguous(fmt) : Tensor();
  bias_act_epilogue(out, out, nullptr, residual.has_value() ? &res : nullptr, relu,
                    fmt == at::MemoryFormat::ChannelsLast);
  return out;
}

Tensor onednn_conv(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                   const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups, bool relu, bool assume_finite) {
  static const auto unary = op_handle("mkldnn::_convolution_pointwise", "");
  static const auto binary = op_handle("mkldnn::_convolution_pointwise", "binary");
  const auto fmt = input.suggest_memory_format();
  const bool nhwc = onednn_runs_nhwc(input, weight);
  c10::IValue b = bias.has_value() ? c10::IValue(bias->to(input.scalar_type())) : c10::IValue();
  std::vector<c10::IValue> stack;
  stack.reserve(13);
  Tensor out;
  // oneDNN's ReLU post-op maps NaN to 0 (torch.relu keeps NaN): it is used only when the
  // caller vouches for finite inputs; otherwise our epilogue applies the ReLU afterwards.
  const bool relu_post_op = relu && assume_finite;
  if (residual.has_value() && nhwc && groups == 1) {
    // One primitive: conv + bias, then binary-add and ReLU post-ops, NHWC.
    const Tensor res = residual->contiguous(at::MemoryFormat::ChannelsLast);
    stack.insert(stack.end(), {input, res, weight, b, vec(padding), vec(stride), vec(dilation), groups,
                               std::string("add"), c10::IValue(),
                               relu_post_op ? c10::IValue(std::string("relu")) : c10::IValue(),
                               c10::List<std::optional<at::Scalar>>(), c10::IValue()});
    binary.callBoxed(&stack);
    out = residual_relu_(stack[0].toTensor(), std::nullopt, relu && !relu_post_op);
  } else {
    const bool unary_relu = relu_post_op && !residual.has_value();
    stack.insert(stack.end(), {input, weight, b, vec(padding), vec(stride), vec(dilation), groups,
                               std::string(unary_relu ? "relu" : "none"),
                               c10::List<std::optional<at::Scalar>>(), c10::IValue()});
    unary.callBoxed(&stack);
    // oneDNN fuses the residual only for NHWC, ungrouped convs; elsewhere (and for an exact
    // ReLU) our epilogue adds it and applies the ReLU in one pass over the conv output.
    out = residual_relu_(stack[0].toTensor(), residual, relu && !unary_relu);
  }
  return out.contiguous(fmt);  // the op's contract: the output has the input's layout
}

Tensor native_conv(const Tensor& input, const Tensor& weight_in, const std::optional<Tensor>& bias,
                   const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups, bool relu) {
  const Tensor weight = weight_in.is_mkldnn() ? weight_in.to_dense() : weight_in;
  const auto fmt = input.suggest_memory_format();
  // The bias goes into the convolution's float accumulator: added after a bf16/fp16 rounding of
  // the conv output, a bias that cancels it (as folded BatchNorm shifts do) would lose bits.
  const std::optional<Tensor> b =
      bias.has_value() ? std::optional<Tensor>(bias->to(input.scalar_type())) : std::nullopt;
  return residual_relu_(
      at::convolution(input, weight, b, stride, padding, dilation, false, {0, 0}, groups).contiguous(fmt), residual,
      relu);
}

// Shapes where oneDNN (as PyTorch 2.13 ships it) is wrong, found by the property-based tests;
// eager PyTorch's own conv2d fails on them too.
bool dilated_and_strided(at::IntArrayRef stride, at::IntArrayRef dilation) {
  // segfaults for some tiny spatial sizes, any dtype
  return (stride[0] > 1 || stride[1] > 1) && (dilation[0] > 1 || dilation[1] > 1);
}
bool reduced_strided_single_row(const Tensor& input, at::IntArrayRef out_shape, at::IntArrayRef stride) {
  // bf16/fp16 kernels return garbage (reads of unwritten memory) for a strided conv whose
  // output is one row or one column wide
  return input.scalar_type() != at::kFloat && (stride[0] > 1 || stride[1] > 1) &&
         (out_shape[2] == 1 || out_shape[3] == 1);
}

bool single_channel_batch(at::IntArrayRef out_shape) {
  // mkldnn::_convolution_pointwise returns wrong values for one output channel, a batch over 1
  // and a channels-last input (seen with 7x7 kernels on 7x7 images); eager's conv2d is right
  return out_shape[1] == 1 && out_shape[0] > 1;
}

Tensor conv2d_bias_act(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool relu, bool assume_finite) {
  TORCH_CHECK_VALUE(input.device().is_cpu() && !input.is_mkldnn(),
                    "resnet_fused: input must be a dense CPU tensor, got ", input.device(),
                    input.is_mkldnn() ? " (mkldnn layout)" : "");
  const auto out_shape = check_conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, groups);
  if (input.numel() == 0) {
    return at::empty(out_shape, input.options().memory_format(input.suggest_memory_format()));
  }
  if (reduced_strided_single_row(input, out_shape, stride)) {
    // A tiny layer: compute it in float32 and round once (more accurate than the bf16 kernel).
    const Tensor w = weight.is_mkldnn() ? weight.to_dense() : weight;
    auto f32 = [](const std::optional<Tensor>& t) {
      return t.has_value() ? std::optional<Tensor>(t->to(at::kFloat)) : std::nullopt;
    };
    return conv2d_bias_act(input.to(at::kFloat), w.to(at::kFloat), f32(bias), f32(residual), stride, padding,
                           dilation, groups, relu, assume_finite)
        .to(input.scalar_type())
        .contiguous(input.suggest_memory_format());
  }
  if (dilated_and_strided(stride, dilation)) {
    // oneDNN (PyTorch 2.13) crashes on some dilated *and* strided shapes with tiny spatial
    // sizes (eager bf16 conv2d included). Such convs are rare (dilation comes with stride 1 in
    // segmentation backbones): compute the stride-1 conv and keep every stride-th output.
    Tensor full = conv2d_bias_act(input, weight, bias, std::nullopt, {1, 1}, padding, dilation, groups, false,
                                  assume_finite);
    const auto fmt = input.suggest_memory_format();
    return residual_relu_(
        full.slice(2, 0, std::nullopt, stride[0]).slice(3, 0, std::nullopt, stride[1]).contiguous(fmt), residual,
        relu);
  }
  const auto dtype = input.scalar_type();
  if (single_channel_batch(out_shape)) {
    return native_conv(input, weight, bias, residual, stride, padding, dilation, groups, relu);
  }
  if (onednn_enabled(dtype)) {
    auto* state = onednn_state(dtype);
    if (state == nullptr || state->load() == 1) {
      return onednn_conv(input, weight, bias, residual, stride, padding, dilation, groups, relu, assume_finite);
    }
    try {
      Tensor out = onednn_conv(input, weight, bias, residual, stride, padding, dilation, groups, relu, assume_finite);
      state->store(1);
      return out;
    } catch (const c10::Error&) {
      // This CPU has no oneDNN kernel for the dtype: use the other path from now on.
      state->store(0);
    }
  }
  return native_conv(input, weight, bias, residual, stride, padding, dilation, groups, relu);
}

void conv2d_bias_act_(Tensor& residual, const Tensor& input, const Tensor& weight,
                         const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, bool relu, bool assume_finite) {
  TORCH_CHECK_VALUE(input.device().is_cpu() && !input.is_mkldnn(),
                    "resnet_fused: input must be a dense CPU tensor, got ", input.device());
  check_conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, groups);
  if (input.numel() == 0) return;
  const bool nhwc_res = residual.is_contiguous(at::MemoryFormat::ChannelsLast);
  const bool avoid_onednn = dilated_and_strided(stride, dilation) ||
                            reduced_strided_single_row(input, residual.sizes(), stride) ||
                            single_channel_batch(residual.sizes());
  if (!avoid_onednn && onednn_enabled(input.scalar_type()) && onednn_runs_nhwc(input, weight) && nhwc_res &&
      groups == 1 &&
      (input.scalar_type() == at::kFloat || onednn_state(input.scalar_type())->load() == 1)) {
    // oneDNN accumulates conv + bias into the residual buffer (sum post-op), then the ReLU.
    static const auto inplace = op_handle("mkldnn::_convolution_pointwise_", "binary");
    const bool relu_post_op = relu && assume_finite;
    std::vector<c10::IValue> stack{residual, input, weight,
                                   bias.has_value() ? c10::IValue(bias->to(input.scalar_type())) : c10::IValue(),
                                   vec(padding), vec(stride), vec(dilation), groups, std::string("add"),
                                   c10::IValue(at::Scalar(1.0)),
                                   relu_post_op ? c10::IValue(std::string("relu")) : c10::IValue(),
                                   c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    inplace.callBoxed(&stack);
    if (relu && !relu_post_op) {
      bias_act_epilogue(residual, residual, nullptr, nullptr, true, true);
    }
    return;
  }
  residual.copy_(conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, groups, relu,
                                 assume_finite));
}

Tensor add_relu(const Tensor& a, const Tensor& b) {
  check_add_relu(a, b);
  TORCH_CHECK_VALUE(a.device().is_cpu(), "resnet_fused: add_relu on CPU got a tensor on ", a.device());
  const auto fmt = a.suggest_memory_format();
  const Tensor ac = a.contiguous(fmt);
  const Tensor bc = b.contiguous(fmt);
  Tensor out = at::empty_like(ac, ac.options().memory_format(fmt));
  bias_act_epilogue(ac, out, nullptr, &bc, /*relu=*/true, fmt == at::MemoryFormat::ChannelsLast);
  return out;
}

Tensor prepack_conv2d_weight(const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, at::IntArrayRef input_size) {
  RF_CHECK_DIM(weight, 4, "weight");
  RF_CHECK_DTYPE(weight, "weight");
  TORCH_CHECK_VALUE(input_size.size() == 4, "resnet_fused: input_size must be [N, C, H, W], got ", input_size);
  // Packing only pays where the convolution runs in oneDNN; otherwise the dense weight is the
  // best layout, and conv2d_bias_act accepts both.
  // (A fresh tensor either way: the schema promises no aliasing.)
  if (weight.is_mkldnn() || !onednn_enabled(weight.scalar_type())) {
    return weight.clone();
  }
  static const auto reorder = op_handle("mkldnn::_reorder_convolution_weight", "");
  std::vector<c10::IValue> stack{weight.contiguous(), vec(padding), vec(stride), vec(dilation), groups,
                                 vec(input_size)};
  try {
    reorder.callBoxed(&stack);
  } catch (const c10::Error&) {
    // No oneDNN kernel for this dtype on this CPU (bf16/fp16 need AVX-512 or AMX): stay dense.
    return weight.clone();
  }
  return stack[0].toTensor();
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv2d_bias_act", &conv2d_bias_act);
  m.impl("conv2d_bias_act_", &conv2d_bias_act_);
  m.impl("add_relu", &add_relu);
  m.impl("prepack_conv2d_weight", &prepack_conv2d_weight);
}

// A prepacked weight is an opaque oneDNN tensor, whose dispatch key is MkldnnCPU.
TORCH_LIBRARY_IMPL(resnet_fused, MkldnnCPU, m) {
  m.impl("conv2d_bias_act", &conv2d_bias_act);
  m.impl("conv2d_bias_act_", &conv2d_bias_act_);
  m.impl("prepack_conv2d_weight", &prepack_conv2d_weight);
}

}  // namespace resnet_fused::cpu
