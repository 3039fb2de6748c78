// The ops are inference-only. Their Autograd kernel lets calls through when nothing needs a
// gradient and raises a clear error when something does, instead of the default fallback
// that only warns at backward time. It is C++ (not torch.library.register_autograd) so that
// an inference call pays no Python round trip per layer.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

namespace resnet_fused {
namespace {

void inference_only(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    const auto n = op.schema().arguments().size();
    for (size_t i = stack->size() - n; i < stack->size(); ++i) {
      const c10::IValue& v = (*stack)[i];
      const bool needs_grad = v.isTensor() && v.toTensor().defined() && v.toTensor().requires_grad();
      TORCH_CHECK(!needs_grad, "resnet_fused.", op.schema().name().substr(op.schema().name().find("::") + 2),
                  " is inference-only and has no backward, but its argument '", op.schema().arguments()[i - (stack->size() - n)].name(),
                  "' requires grad. Run the fused model under torch.inference_mode() or torch.no_grad(), "
                  "or train the original model and fuse it again.");
    }
  }
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, Autograd, m) {
  m.impl("conv2d_bias_act", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("conv2d_bias_act_", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("add_relu", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("prepack_conv2d_weight", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("winograd_prepack", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("winograd_conv2d_bias_act", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("winograd_conv2d_bias_act_", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("gemm_conv2d_bias_act", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("gemm_conv2d_bias_act_", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("max_pool2d_nhwc", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
}

}  // namespace resnet_fused
