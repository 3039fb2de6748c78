#pragma once

#include <ATen/core/Tensor.h>

namespace resnet_fused::cpu {

// dst = act(src + bias[c] + residual), in one vectorised, parallel pass.
// src, dst and residual are dense in `format` (NCHW or NHWC when `bias` is given; any
// dense layout otherwise) and of one dtype; bias is float32 with one value per channel.
// dst may alias src.
void bias_act_epilogue(const at::Tensor& src, const at::Tensor& dst, const at::Tensor* bias,
                       const at::Tensor* residual, bool relu, bool channels_last);

}  // namespace resnet_fused::cpu
