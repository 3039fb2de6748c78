// The launch layer of our CUDA kernels: tensors in, parameter structs filled, kernels launched.
// Compiled twice from one source (launch.cpp): into resnet_fused._C against CUDA (current
// device and stream), and into the emulator build resnet_fused._emu (RF_EMU: CPU tensors, the
// kernels run under csrc/emu with every tensor registered as a buffer), so the emulator tests
// exercise this very code.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace resnet_fused::cuda {

// dst = act(src + bias + residual); all dense in one memory format, bias float32.
void run_epilogue(const at::Tensor& src, const at::Tensor& dst, const at::Tensor* bias_f32,
                  const at::Tensor* residual, bool relu, bool channels_last);

// Why our fused convolution kernel cannot take this call (nullptr: it can): float16/bfloat16,
// channels-last input, output channels a multiple of 8, input channels a multiple of 4 or fewer
// than 4 (padded to 4), grouped: input channels per group a multiple of 4, the epilogue's
// operands in the input's dtype.
const char* fused_conv_unsupported(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& residual, int64_t groups);

// act(conv2d(input, weight) + bias [+ residual]) by our implicit-GEMM kernel, NHWC out. The
// arguments must have passed check_conv2d_bias_act (checks.h) at the op boundary. With
// `inplace`, the result is written into `residual` (channels-last, dense) and returned.
// num_sms sizes the grid decisions (split-K); tile / splits >= 0 force a configuration.
at::Tensor fused_conv(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups, bool relu, bool inplace, int64_t num_sms,
                      int64_t tile = -1, int64_t splits = -1);

// act(conv1x1(input, weight[:, :C]) + conv1x1(input2, weight[:, C:], stride2) + bias) in one
// product (a bottleneck's last 1x1 and its downsample): float16/bfloat16, channels-last inputs,
// weight [K, C + C2, 1, 1]; input's H, W are input2's after the stride. NHWC out.
const char* fused_conv_dual_unsupported(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& input2,
                                        int64_t stride2);
at::Tensor fused_conv_dual(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& input2, int64_t stride2, bool relu, int64_t num_sms, int64_t tile = -1,
                           int64_t splits = -1);

// The plan fused_conv would run for these shapes (tile >= 0: asked for that tile): (tile, splits,
// narrow loads, workspace bytes).
std::tuple<int64_t, int64_t, bool, int64_t> fused_conv_plan(at::IntArrayRef input_size, at::IntArrayRef weight_size,
                                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                                            at::IntArrayRef dilation, int64_t num_sms,
                                                            int64_t groups = 1, int64_t tile = -1);

// Runs the conformance kernel (kernels/conformance.h): op, per-lane inputs [32, 16] int32, the
// tile [128] int32; returns every lane's words [32, 4] int32.
at::Tensor conformance(int64_t op, const at::Tensor& in, const at::Tensor& tile);

}  // namespace resnet_fused::cuda
