// See launch.h. One source for the GPU build and the emulator build (RF_EMU).
#include "launch.h"

#include <ATen/ATen.h>

#include "../checks.h"
#include "kernels/conformance.h"
#include "kernels/epilogue.h"
#include "kernels/implicit_gemm.h"

#ifdef RF_EMU
#include "../emu/runtime.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace resnet_fused::cuda {
namespace {

using at::Tensor;

#ifdef RF_EMU
// Every tensor a kernel may touch, registered for the emulator's bounds checks.
struct Buffers {
  std::vector<rf::emu::Buffer> list;
  void add(const Tensor& t, const char* name, bool writable) {
    if (t.defined() && t.numel()) {
      list.push_back(rf::emu::Buffer{t.const_data_ptr(), size_t(t.numel()) * t.element_size(), name, writable});
    }
  }
  // A tensor just allocated (at::empty): reading a byte of it no kernel stored is an error, and
  // so is leaving one unwritten where `fill` (an output).
  void add_fresh(const Tensor& t, const char* name, bool fill) {
    if (t.defined() && t.numel()) {
      if (fill) filled.push_back(list.size());
      list.push_back(rf::emu::Buffer::fresh(t.const_data_ptr(), size_t(t.numel()) * t.element_size(), name));
    }
  }
  void check_filled() const {
    for (const size_t i : filled) {
      const int64_t at = rf::emu::first_unwritten(list[i]);
      TORCH_CHECK(at < 0, "resnet_fused emulator: the launches left '", list[i].name, "' partly unwritten (byte ", at,
                  " of ", list[i].bytes, ")");
    }
  }
  std::vector<size_t> filled;
};
cudaStream_t stream_of(const Tensor&) { return nullptr; }
void check_launch(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "resnet_fused emulator: ", what, ": ", rf::emu::last_error());
}
#define RF_RUN(BUFFERS, CALL)                       \
  [&] {                                             \
    rf::emu::Buffers scope_((BUFFERS).list);        \
    const cudaError_t e_ = CALL;                    \
    if (e_ == cudaSuccess) (BUFFERS).check_filled(); \
    return e_;                                      \
  }()
#else
struct Buffers {
  void add(const Tensor&, const char*, bool) {}
  void add_fresh(const Tensor&, const char*, bool) {}
};
cudaStream_t stream_of(const Tensor& t) { return at::cuda::getCurrentCUDAStream(t.get_device()).stream(); }
void check_launch(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "resnet_fused: ", what, " failed: ", cudaGetErrorString(e));
}
#define RF_RUN(BUFFERS, CALL) CALL
#endif

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

bool is_channels_last(const Tensor& t) { return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast); }

bool aligned(const Tensor& t, int bytes) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0; }

// The kernel loads 16 bytes (8 for 4-channel inputs) at a time: a view that starts elsewhere (a
// slice) is copied to fresh, aligned storage first.
Tensor aligned_channels_last(const Tensor& t, int bytes) {
  return aligned(t, bytes) ? t : t.clone(at::MemoryFormat::ChannelsLast);
}

// A channels-last [N, C, H, W] tensor with its channels zero-padded to `c` (the 3-channel stem
// runs with 4, so that every pixel is an 8-byte load).
Tensor pad_channels(const Tensor& t, int64_t c) {
  auto sizes = t.sizes().vec();
  sizes[1] = c;
  Tensor out = at::empty(sizes, t.options().memory_format(at::MemoryFormat::ChannelsLast)).zero_();
  out.narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

// A float32 bias whose storage is 16-byte aligned (the conv kernel reads it 4 channels at a time).
Tensor aligned_float_bias(const Tensor& b) {
  Tensor f = b.to(at::kFloat).contiguous();
  if (reinterpret_cast<uintptr_t>(f.const_data_ptr()) % 16) f = f.clone();
  return f;
}

int64_t conv_out(int64_t in, int64_t k, int64_t s, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / s + 1;
}

ConvParams shape_params(at::IntArrayRef in, at::IntArrayRef w, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups) {
  ConvParams p;
  p.groups = int(groups);
  p.N = int(in[0]);
  p.C = int(in[1]);
  p.H = int(in[2]);
  p.W = int(in[3]);
  p.K = int(w[0]);
  p.R = int(w[2]);
  p.S = int(w[3]);
  p.stride_h = int(stride[0]);
  p.stride_w = int(stride[1]);
  p.pad_h = int(padding[0]);
  p.pad_w = int(padding[1]);
  p.dil_h = int(dilation[0]);
  p.dil_w = int(dilation[1]);
  p.P = int(conv_out(in[2], w[2], stride[0], padding[0], dilation[0]));
  p.Q = int(conv_out(in[3], w[3], stride[1], padding[1], dilation[1]));
  if (p.C < 4 && groups == 1) p.C = 4;
  return p;
}

// Checks that our kernel takes p, plans it (tile, split-K), allocates the split-K workspace on
// `like`'s device and launches; `bufs` holds the call's other tensors (for the emulator).
void plan_and_launch(ConvParams& p, Buffers& bufs, const Tensor& like, int64_t num_sms, int64_t tile, int64_t splits,
                     const char* what) {
  if (const char* why = conv_unsupported(p)) {
    TORCH_CHECK_VALUE(false, "resnet_fused: ", what, " cannot run this call: ", why);
  }
  const ConvPlan plan = plan_conv(p, int(num_sms), int(tile), int(splits));
  Tensor ws;
  if (plan.workspace_bytes) {
    ws = at::empty({int64_t(plan.workspace_bytes / sizeof(float))}, like.options().dtype(at::kFloat));
    p.workspace = ws.data_ptr<float>();
  }
  bufs.add_fresh(ws, "split-K workspace", false);
  check_launch(RF_RUN(bufs, launch_conv(p, plan, stream_of(like))), what);
}

}  // namespace

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
  Buffers bufs;
  bufs.add(src, "src", false);
  bufs.add(dst, "dst", true);
  if (residual) bufs.add(*residual, "residual", false);
  if (bias_f) bufs.add(*bias_f, "bias", false);
  check_launch(RF_RUN(bufs, launch_bias_act_epilogue(p, stream_of(src))), "the epilogue kernel");
}

const char* fused_conv_unsupported(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& residual,
                                   int64_t groups) {
  if (input.scalar_type() == at::kFloat) {
    // float32 runs on TF32 tensor cores: only where PyTorch lets cuDNN's convolutions do so
    if (!at::globalContext().allowTF32CuDNN()) return "float32 with TF32 off (torch.backends.cudnn.allow_tf32)";
    if (groups > 1) return "grouped float32 (the TF32 kernel takes groups 1)";
  } else if (input.scalar_type() != at::kHalf && input.scalar_type() != at::kBFloat16) {
    return "only float32 (TF32), float16 and bfloat16";
  }
  if (!is_channels_last(input)) return "input not channels-last";
  if (weight.size(0) % 8 != 0) return "output channels not a multiple of 8";
  if (groups == 1 && input.size(1) % 4 != 0 && input.size(1) > 4) return "input channels not a multiple of 4";
  // (grouped: no padding; each group's channels are whole 8- or 16-byte chunks)
  if (groups > 1 && (input.size(1) / groups) % 4 != 0) return "input channels per group not a multiple of 4";
  if (residual.has_value() && residual->scalar_type() != input.scalar_type()) return "residual of another dtype";
  if (weight.dim() == 4 && (weight.size(2) > 16 || weight.size(3) > 16)) return "a filter taller or wider than 16";
  // (after the stem's channels are padded to 4)
  const int64_t limit = int64_t(1) << 31;
  if (input.numel() / std::max<int64_t>(input.size(1), 1) * ((input.size(1) + 3) / 4 * 4) >= limit ||
      weight.numel() / std::max<int64_t>(weight.size(1), 1) * ((weight.size(1) + 3) / 4 * 4) >= limit)
    return "an input or weight of 2^31 elements or more";
  // (rare: a view into its storage; the CUDA op then takes the cuDNN path)
  if (residual.has_value() && residual->numel() && !aligned(*residual, 16)) return "residual not 16-byte aligned";
  return nullptr;
}

std::tuple<int64_t, int64_t, bool, int64_t> fused_conv_plan(at::IntArrayRef input_size, at::IntArrayRef weight_size,
                                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                                            at::IntArrayRef dilation, int64_t num_sms, int64_t groups,
                                                            int64_t tile) {
  ConvParams p = shape_params(input_size, weight_size, stride, padding, dilation, groups);
  p.dtype = DType::kHalf;
  const ConvPlan plan = plan_conv(p, int(num_sms), int(tile));
  return {int64_t(plan.tile), plan.splits, plan.narrow_loads, int64_t(plan.workspace_bytes)};
}

Tensor fused_conv(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                  const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation, int64_t groups, bool relu, bool inplace, int64_t num_sms, int64_t tile,
                  int64_t splits) {
  if (const char* why = fused_conv_unsupported(input, weight, residual, groups)) {
    TORCH_CHECK_VALUE(false, "resnet_fused: the fused convolution kernel cannot run this call: ", why);
  }
  TORCH_CHECK_VALUE(!inplace || residual.has_value(), "resnet_fused: in place needs a residual");
#ifndef RF_EMU
  const c10::cuda::CUDAGuard guard(input.device());
#endif
  const auto cl = at::MemoryFormat::ChannelsLast;
  Tensor out;
  if (inplace) {
    TORCH_CHECK_VALUE(is_channels_last(*residual), "resnet_fused: in place needs a dense channels-last residual");
    out = *residual;
  } else {
    out = at::empty({input.size(0), weight.size(0), conv_out(input.size(2), weight.size(2), stride[0], padding[0], dilation[0]),
                     conv_out(input.size(3), weight.size(3), stride[1], padding[1], dilation[1])},
                    input.options().memory_format(cl));
  }
  if (out.numel() == 0) return out;
  Tensor x = input, w = weight.contiguous(cl);
  if (groups == 1 && x.size(1) < 4) {
    x = pad_channels(x, 4);
    w = pad_channels(w, 4);
  }
  // (input channels per group: 8-byte loads where 16 bytes would straddle two filter positions)
  const int load_bytes = w.size(1) * w.element_size() % 16 == 0 ? 16 : 8;
  x = aligned_channels_last(x, load_bytes);
  w = aligned_channels_last(w, load_bytes);
  const Tensor b = bias.has_value() ? aligned_float_bias(*bias) : Tensor();
  Tensor r;
  if (residual.has_value()) r = inplace ? out : residual->contiguous(cl);

  ConvParams p = shape_params(input.sizes(), weight.sizes(), stride, padding, dilation, groups);
  p.input = x.const_data_ptr();
  p.weight = w.const_data_ptr();
  p.bias = b.defined() ? b.const_data_ptr<float>() : nullptr;
  p.residual = r.defined() ? r.const_data_ptr() : nullptr;
  p.output = out.data_ptr();
  p.relu = relu;
  p.dtype = to_dtype(input.scalar_type());
  Buffers bufs;
  bufs.add(x, "input", false);
  bufs.add(w, "weight", false);
  bufs.add(b, "bias", false);
  if (!inplace) bufs.add(r, "residual", false);
  if (inplace) {
    bufs.add(out, "residual (output, in place)", true);
  } else {
    bufs.add_fresh(out, "output", true);
  }
  plan_and_launch(p, bufs, input, num_sms, tile, splits, "the fused convolution kernel");
  return out;
}

const char* fused_conv_dual_unsupported(const Tensor& input, const Tensor& weight, const Tensor& input2,
                                        int64_t stride2) {
  if (input.scalar_type() != at::kHalf && input.scalar_type() != at::kBFloat16) return "dual: float16 or bfloat16 only";
  if (input2.scalar_type() != input.scalar_type() || weight.scalar_type() != input.scalar_type())
    return "dual: input2 or weight of another dtype";
  if (!is_channels_last(input) || !is_channels_last(input2)) return "dual: inputs not channels-last";
  if (weight.dim() != 4 || weight.size(1) != input.size(1) + input2.size(1) || weight.size(2) != 1 || weight.size(3) != 1)
    return "dual: weight not [K, C + C2, 1, 1]";
  if (input.size(0) != input2.size(0)) return "dual: batches differ";
  if (weight.size(0) % 8 != 0) return "output channels not a multiple of 8";
  if (stride2 < 1) return "dual: stride2 < 1";
  ConvParams p = shape_params(input.sizes(), weight.sizes(), {1, 1}, {0, 0}, {1, 1}, 1);
  p.C = int(input.size(1));
  p.input = p.weight = p.input2 = p.output = reinterpret_cast<void*>(uintptr_t(16));  // (copied aligned if not)
  p.C2 = int(input2.size(1));
  p.H2 = int(input2.size(2));
  p.W2 = int(input2.size(3));
  p.stride2 = int(stride2);
  p.dtype = to_dtype(input.scalar_type());
  if (input.numel() == 0) return nullptr;
  return conv_unsupported(p);
}

Tensor fused_conv_dual(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                       const Tensor& input2, int64_t stride2, bool relu, int64_t num_sms, int64_t tile, int64_t splits) {
  TORCH_CHECK_VALUE(input.dim() == 4 && input2.dim() == 4 && weight.dim() == 4, "resnet_fused: dual convolution: ",
                    "input, input2 and weight must be 4-D, got ", input.dim(), "-D, ", input2.dim(), "-D, ", weight.dim(), "-D");
  TORCH_CHECK_VALUE(input.scalar_type() == input2.scalar_type() && input.scalar_type() == weight.scalar_type(),
                    "resnet_fused: dual convolution: input, input2 and weight must share a dtype, got ",
                    input.scalar_type(), ", ", input2.scalar_type(), ", ", weight.scalar_type());
  TORCH_CHECK_VALUE(input.device() == input2.device() && input.device() == weight.device(),
                    "resnet_fused: dual convolution: input, input2 and weight must be on one device");
  TORCH_CHECK_VALUE(input.size(0) == input2.size(0), "resnet_fused: dual convolution: batch ", input.size(0),
                    " and input2's ", input2.size(0), " differ");
  TORCH_CHECK_VALUE(weight.size(1) == input.size(1) + input2.size(1) && weight.size(2) == 1 && weight.size(3) == 1,
                    "resnet_fused: dual convolution: weight must be [K, C + C2, 1, 1] = [K, ", input.size(1) + input2.size(1),
                    ", 1, 1], got ", weight.sizes());
  TORCH_CHECK_VALUE(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
                    "resnet_fused: dual convolution: bias must be [", weight.size(0), "]");
  TORCH_CHECK_VALUE(stride2 >= 1, "resnet_fused: dual convolution: stride2 must be >= 1, got ", stride2);
  TORCH_CHECK_VALUE(input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16,
                    "resnet_fused: dual convolution: float16 or bfloat16 only, got ", input.scalar_type());
  TORCH_CHECK_VALUE(is_channels_last(input) && is_channels_last(input2),
                    "resnet_fused: dual convolution: input and input2 must be channels-last");
#ifndef RF_EMU
  const c10::cuda::CUDAGuard guard(input.device());
#endif
  const auto cl = at::MemoryFormat::ChannelsLast;
  Tensor out = at::empty({input.size(0), weight.size(0), input.size(2), input.size(3)}, input.options().memory_format(cl));
  const Tensor x = aligned_channels_last(input, 16), x2 = aligned_channels_last(input2, 16);
  const Tensor w = aligned_channels_last(weight.contiguous(cl), 16);
  const Tensor b = bias.has_value() ? aligned_float_bias(*bias) : Tensor();
  ConvParams p = shape_params(input.sizes(), weight.sizes(), {1, 1}, {0, 0}, {1, 1}, 1);
  p.C = int(input.size(1));  // (the weight's columns are C + C2)
  p.input = x.const_data_ptr();
  p.input2 = x2.const_data_ptr();
  p.C2 = int(input2.size(1));
  p.H2 = int(input2.size(2));
  p.W2 = int(input2.size(3));
  p.stride2 = int(stride2);
  p.weight = w.const_data_ptr();
  p.bias = b.defined() ? b.const_data_ptr<float>() : nullptr;
  p.output = out.data_ptr();
  p.relu = relu;
  p.dtype = to_dtype(input.scalar_type());
  if (out.numel() == 0) return out;
  Buffers bufs;
  bufs.add(x, "input", false);
  bufs.add(x2, "input2", false);
  bufs.add(w, "weight", false);
  bufs.add(b, "bias", false);
  bufs.add_fresh(out, "output", true);
  plan_and_launch(p, bufs, input, num_sms, tile, splits, "the dual convolution kernel");
  return out;
}

Tensor conformance(int64_t op, const Tensor& in, const Tensor& tile) {
  TORCH_CHECK_VALUE(op >= 0 && op < kNumConformanceOps, "resnet_fused: conformance op must be in [0, ",
                    kNumConformanceOps, "), got ", op);
  TORCH_CHECK_VALUE(in.scalar_type() == at::kInt && in.numel() == 32 * kConformanceInWords && in.is_contiguous(),
                    "resnet_fused: conformance inputs must be a contiguous int32 [32, ", kConformanceInWords, "]");
  TORCH_CHECK_VALUE(tile.scalar_type() == at::kInt && tile.numel() == 128 && tile.is_contiguous(),
                    "resnet_fused: the conformance tile must be a contiguous int32 [128]");
#ifndef RF_EMU
  const c10::cuda::CUDAGuard guard(in.device());
#endif
  Tensor out = at::zeros({32, kConformanceOutWords}, in.options());
  ConformanceParams p;
  p.op = int(op);
  p.in = reinterpret_cast<const uint32_t*>(in.const_data_ptr());
  p.tile = reinterpret_cast<const uint32_t*>(tile.const_data_ptr());
  p.out = reinterpret_cast<uint32_t*>(out.data_ptr());
  Buffers bufs;
  bufs.add(in, "in", false);
  bufs.add(tile, "tile", false);
  bufs.add(out, "out", true);
  check_launch(RF_RUN(bufs, launch_conformance(p, stream_of(in))), "the conformance kernel");
  return out;
}

}  // namespace resnet_fused::cuda
