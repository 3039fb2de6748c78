// resnet_fused._emu (a test build): our CUDA kernels, run by the emulator on CPU tensors, as
// torch.ops.resnet_fused_emu.*. The ops go through the same launch layer as the GPU build
// (csrc/cuda/launch.cpp), so a test here exercises the code a GPU runs, but the hardware.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../cuda/launch.h"
#include "runtime.h"
#include "selftest.h"

extern "C" {
PyMODINIT_FUNC PyInit__emu(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_emu", "resnet_fused's CUDA kernels under the host emulator (torch.ops.resnet_fused_emu.*)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace resnet_fused::emu_ops {
namespace {

using at::Tensor;

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cpu(), "resnet_fused_emu: ", name, " must be a CPU tensor (the emulator runs on the CPU), got ",
                    t.device());
}

Tensor epilogue(const Tensor& src, const std::optional<Tensor>& bias, const std::optional<Tensor>& residual, bool relu) {
  check_cpu(src, "src");
  RF_CHECK_DTYPE(src, "src");
  const auto fmt = src.suggest_memory_format();
  const Tensor s = src.contiguous(fmt);
  Tensor b, r;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(src.dim() >= 2 && bias->numel() == src.size(1), "resnet_fused_emu: bias needs one value per channel");
    b = bias->to(at::kFloat).contiguous();
  }
  if (residual.has_value()) {
    check_add_relu(src, *residual);
    r = residual->contiguous(fmt);
  }
  Tensor out = at::empty_like(s, s.options().memory_format(fmt));
  cuda::run_epilogue(s, out, b.defined() ? &b : nullptr, r.defined() ? &r : nullptr, relu,
                     fmt == at::MemoryFormat::ChannelsLast && s.dim() == 4);
  return out;
}

Tensor conv2d_bias_act(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, bool relu, int64_t num_sms, int64_t tile, int64_t splits,
                       int64_t groups) {
  check_cpu(input, "input");
  check_conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, groups);
  return cuda::fused_conv(input, weight, bias, residual, stride, padding, dilation, groups, relu, false, num_sms, tile,
                          splits);
}

void conv2d_bias_act_(Tensor& residual, const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                      int64_t num_sms, int64_t tile, int64_t splits, int64_t groups) {
  check_cpu(input, "input");
  check_conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, groups);
  cuda::fused_conv(input, weight, bias, residual, stride, padding, dilation, groups, relu, true, num_sms, tile, splits);
}

Tensor conv1x1_dual_bias_act(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                             const Tensor& input2, int64_t stride2, bool relu, int64_t num_sms, int64_t tile,
                             int64_t splits) {
  check_cpu(input, "input");
  return cuda::fused_conv_dual(input, weight, bias, input2, stride2, relu, num_sms, tile, splits);
}

Tensor conformance(const Tensor& in, const Tensor& tile, int64_t op) {
  check_cpu(in, "inputs");
  return cuda::conformance(op, in, tile);
}

std::vector<int64_t> plan(at::IntArrayRef input_size, at::IntArrayRef weight_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t num_sms, int64_t groups,
                          int64_t tile) {
  const auto [planned, splits, narrow, ws] =
      cuda::fused_conv_plan(input_size, weight_size, stride, padding, dilation, num_sms, groups, tile);
  return {planned, splits, int64_t(narrow), ws};
}

void set_options(bool check_races, bool check_uninit, bool check_async, bool check_bounds, bool check_global_init,
                 int64_t lane_order, int64_t workers, int64_t skip_barrier, int64_t loosen_wait, int64_t drop_cp_async,
                 bool ignore_zfill, bool swap_mma_a, int64_t drop_global_store) {
  TORCH_CHECK_VALUE(lane_order >= 0 && lane_order <= 2, "resnet_fused_emu: lane_order must be 0, 1 or 2");
  rf::emu::Options& o = rf::emu::options();
  o.check_races = check_races;
  o.check_uninit = check_uninit;
  o.check_async = check_async;
  o.check_bounds = check_bounds;
  o.check_global_init = check_global_init;
  o.lane_order = int(lane_order);
  o.workers = int(workers);
  o.inject.skip_barrier = int(skip_barrier);
  o.inject.loosen_wait = int(loosen_wait);
  o.inject.drop_cp_async = int(drop_cp_async);
  o.inject.ignore_zfill = ignore_zfill;
  o.inject.swap_mma_a = swap_mma_a;
  o.inject.drop_global_store = int(drop_global_store);
}

void selftest(c10::string_view name) {
  const std::string error = rf::emu::run_selftest(std::string(name));
  TORCH_CHECK(error.empty(), "resnet_fused emulator: ", error);
}

std::vector<std::string> selftests() { return rf::emu::selftest_names(); }

}  // namespace
}  // namespace resnet_fused::emu_ops

TORCH_LIBRARY(resnet_fused_emu, m) {
  using namespace resnet_fused::emu_ops;
  m.def("epilogue(Tensor src, Tensor? bias, Tensor? residual, bool relu) -> Tensor");
  m.def(
      "conv2d_bias_act(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, bool relu, int num_sms=132, int tile=-1, int splits=-1, int groups=1) -> Tensor");
  m.def(
      "conv2d_bias_act_(Tensor(a!) residual, Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, bool relu, int num_sms=132, int tile=-1, int splits=-1, int groups=1) -> ()");
  m.def(
      "conv1x1_dual_bias_act(Tensor input, Tensor weight, Tensor? bias, Tensor input2, int stride2, bool relu, "
      "int num_sms=132, int tile=-1, int splits=-1) -> Tensor");
  m.def("conformance(Tensor inputs, Tensor tile, int op) -> Tensor");
  m.def("plan(int[] input_size, int[] weight_size, int[2] stride, int[2] padding, int[2] dilation, int num_sms=132, int groups=1, int tile=-1) -> int[]",
        &plan);
  m.def(
      "set_options(bool check_races=True, bool check_uninit=True, bool check_async=True, bool check_bounds=True, "
      "bool check_global_init=True, int lane_order=0, int workers=0, int skip_barrier=-1, int loosen_wait=0, "
      "int drop_cp_async=-1, bool ignore_zfill=False, bool swap_mma_a=False, int drop_global_store=-1) -> ()",
      &set_options);
  m.def("selftest(str name) -> ()", &selftest);
  m.def("selftests() -> str[]", &selftests);
}

TORCH_LIBRARY_IMPL(resnet_fused_emu, CPU, m) {
  using namespace resnet_fused::emu_ops;
  m.impl("epilogue", &epilogue);
  m.impl("conv2d_bias_act", &conv2d_bias_act);
  m.impl("conv2d_bias_act_", &conv2d_bias_act_);
  m.impl("conv1x1_dual_bias_act", &conv1x1_dual_bias_act);
  m.impl("conformance", &conformance);
}
