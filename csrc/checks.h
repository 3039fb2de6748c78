// Input checks at the op boundary, shared by every backend. Each message says what was
// expected and what came, and raises the Python exception that fits (TypeError for dtypes,
// ValueError for shapes and arguments).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace resnet_fused {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

#define RF_CHECK_DTYPE(T, NAME)                                                              \
  TORCH_CHECK_TYPE(::resnet_fused::supported_dtype((T).scalar_type()), "resnet_fused: ", NAME, \
                   " must be float32, float16 or bfloat16, got ", (T).scalar_type())

#define RF_CHECK_SAME_DTYPE(T, REF, NAME)                                                     \
  TORCH_CHECK_TYPE((T).scalar_type() == (REF).scalar_type(), "resnet_fused: ", NAME,          \
                   " must have the input's dtype ", (REF).scalar_type(), ", got ", (T).scalar_type())

#define RF_CHECK_SAME_DEVICE(T, REF, NAME)                                                    \
  TORCH_CHECK_VALUE((T).device() == (REF).device(), "resnet_fused: ", NAME,                   \
                    " must be on the input's device ", (REF).device(), ", got ", (T).device())

#define RF_CHECK_DIM(T, D, NAME)                                                              \
  TORCH_CHECK_VALUE((T).dim() == (D), "resnet_fused: ", NAME, " must have ", D,               \
                    " dimensions, got ", (T).dim(), " (shape ", ::resnet_fused::shape_str((T).sizes()), ")")

// Checks every argument of conv2d_bias_act and returns the output shape [N, K, Ho, Wo].
inline std::vector<int64_t> check_conv2d_bias_act(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  RF_CHECK_DIM(input, 4, "input");
  RF_CHECK_DTYPE(input, "input");
  RF_CHECK_DIM(weight, 4, "weight");
  RF_CHECK_SAME_DTYPE(weight, input, "weight");
  TORCH_CHECK_VALUE(weight.device().type() == input.device().type() &&
                        (weight.is_cpu() || weight.device() == input.device()),
                    "resnet_fused: weight must be on the input's device ", input.device(), ", got ",
                    weight.device());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "resnet_fused: stride, padding and dilation must have 2 values each, got ",
                    stride.size(), ", ", padding.size(), " and ", dilation.size());
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0, "resnet_fused: stride must be positive, got ", stride);
  TORCH_CHECK_VALUE(dilation[0] > 0 && dilation[1] > 0, "resnet_fused: dilation must be positive, got ",
                    dilation);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "resnet_fused: padding must be non-negative, got ",
                    padding);
  TORCH_CHECK_VALUE(groups > 0, "resnet_fused: groups must be positive, got ", groups);

  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t K = weight.size(0), R = weight.size(2), S = weight.size(3);
  TORCH_CHECK_VALUE(C == weight.size(1) * groups, "resnet_fused: input has ", C,
                    " channels but the weight ", shape_str(weight.sizes()), " with groups=", groups,
                    " expects ", weight.size(1) * groups);
  TORCH_CHECK_VALUE(K % groups == 0, "resnet_fused: the weight's ", K,
                    " output channels are not divisible by groups=", groups);
  const int64_t Ho = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(Ho > 0 && Wo > 0, "resnet_fused: input spatial size ", H, "x", W,
                    " is too small for a ", R, "x", S, " kernel with padding ", padding, " and dilation ",
                    dilation, " (output would be ", Ho, "x", Wo, ")");
  std::vector<int64_t> out{N, K, Ho, Wo};
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    RF_CHECK_DIM(b, 1, "bias");
    TORCH_CHECK_VALUE(b.size(0) == K, "resnet_fused: bias must have ", K, " elements (one per output channel), got ",
                      b.size(0));
    // A float32 bias is accepted with any input dtype: the epilogue adds it in float32.
    TORCH_CHECK_TYPE(b.scalar_type() == input.scalar_type() || b.scalar_type() == at::kFloat,
                     "resnet_fused: bias must be float32 or have the input's dtype ", input.scalar_type(), ", got ",
                     b.scalar_type());
    RF_CHECK_SAME_DEVICE(b, input, "bias");
  }
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK_VALUE(r.sizes().vec() == out, "resnet_fused: residual must have the output's shape ",
                      shape_str(out), ", got ", shape_str(r.sizes()));
    RF_CHECK_SAME_DTYPE(r, input, "residual");
    RF_CHECK_SAME_DEVICE(r, input, "residual");
  }
  return out;
}

inline void check_add_relu(const at::Tensor& a, const at::Tensor& b) {
  RF_CHECK_DTYPE(a, "a");
  RF_CHECK_SAME_DTYPE(b, a, "b");
  RF_CHECK_SAME_DEVICE(b, a, "b");
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), "resnet_fused: add_relu needs two tensors of one shape, got ",
                    shape_str(a.sizes()), " and ", shape_str(b.sizes()));
}

}  // namespace resnet_fused
