// Every schema of the resnet_fused namespace, and nothing else.
// Backends register their kernels in csrc/cpu/*.cpp and csrc/cuda/*.cpp.
#include <Python.h>
#include <torch/library.h>

// The shared object is imported for its registrations only (no pybind11):
// `import resnet_fused._C` runs the static initialisers below.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "resnet_fused kernels (registered as torch.ops.resnet_fused.*)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(resnet_fused, m) {
  // act(conv2d(input, weight, stride, padding, dilation, groups) + bias [+ residual]),
  // act = relu when `relu`, identity otherwise. After BatchNorm folding this one op is
  // conv+BN, conv+BN+ReLU and conv+BN+add+ReLU.
  // assume_finite: the caller vouches that no argument holds NaN or Inf, so the CPU path may
  // run the ReLU as a oneDNN post-op (which maps NaN to 0 where torch.relu keeps it). False
  // (the default) gives torch.relu's NaN semantics on every path.
  m.def(
      "conv2d_bias_act(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, "
      "bool assume_finite=False) -> Tensor");
  // The same with the residual updated in place: residual = act(conv(...) + bias + residual).
  // Returns nothing (a mutated input, not an aliased output, is what functionalization and so
  // torch.compile accept).
  // Used where the residual is read by nothing after the join (a ResNet block's shortcut):
  // no output buffer to allocate, and oneDNN accumulates into it (a sum post-op).
  m.def(
      "conv2d_bias_act_(Tensor(a!) residual, Tensor input, Tensor weight, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, "
      "bool assume_finite=False) -> ()");
  // relu(a + b): a residual join that no convolution can absorb.
  m.def("add_relu(Tensor a, Tensor b) -> Tensor");
  // Reorders a (folded) weight once into the blocked layout the CPU convolution primitive
  // wants; the result is accepted by conv2d_bias_act in place of the dense weight.
  m.def(
      "prepack_conv2d_weight(Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int[] input_size) -> Tensor");
  // Winograd, CPU float32: the 3x3 weight [K, C, 3, 3] transformed once (F(2x2, 3x3): [16, C, K];
  // tile 4, F(4x4, 3x3): [36, C, K]; stride 2: [4, 4, C, K]; panels=True: K in the matrix-product
  // kernels' panels, [..., ceil(K / 32), C, 32], then out_channels = K), and act(conv2d(input,
  // weight, stride, padding=1) + bias [+ residual]) from it, the stride the weight's (out of place,
  // and into the residual); schedule: 0 the kernel's choice, 1 chunked, 2 three passes
  // (winograd_schedule: the kernel's choice for an input).
  m.def("winograd_prepack(Tensor weight, int tile=2, int stride=1, bool panels=False) -> Tensor");
  m.def(
      "winograd_conv2d_bias_act(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, "
      "bool relu, int schedule=0, int out_channels=-1) -> Tensor");
  m.def(
      "winograd_conv2d_bias_act_(Tensor(a!) residual, Tensor input, Tensor weight, Tensor? bias, "
      "bool relu, int schedule=0, int out_channels=-1) -> ()");
  m.def("winograd_schedule(int[] input_size, int[] weight_size, int out_channels=-1) -> int");
  // A convolution as matrix products (im2col rows times the weight), CPU float32, dilation 1,
  // groups 1, with the epilogue applied in registers: out of place, and into the residual. The
  // weight is a plain [K, C, kh, kw] one, or gemm_prepack's panels (then out_channels = K).
  m.def(
      "gemm_conv2d_bias_act(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, "
      "int[2] stride, int[2] padding, bool relu, int out_channels=-1) -> Tensor");
  m.def(
      "gemm_conv2d_bias_act_(Tensor(a!) residual, Tensor input, Tensor weight, Tensor? bias, "
      "int[2] stride, int[2] padding, bool relu, int out_channels=-1) -> ()");
  // The weight packed once for it ([ceil(K / 32), kh, kw, C, 32]), and back.
  m.def("gemm_prepack(Tensor weight) -> Tensor");
  m.def("gemm_unpack(Tensor packed, int out_channels) -> Tensor");
  // Which register-tile kernel the matrix products run on this CPU: "avx512", "avx2" or "generic".
  m.def("gemm_isa() -> str");
  // Grouped convolutions (ResNeXt's 3x3s), CPU float32 on AVX-512, with the epilogue in
  // registers: the weight packed once ([K/16, kh, kw, C/groups, 16]); out of place and into the
  // residual; and why a layer of these channels cannot run on it here ("" if it can).
  m.def("grouped_prepack(Tensor weight, int groups) -> Tensor");
  m.def(
      "grouped_conv2d_bias_act(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, "
      "int[2] stride, int[2] padding, int groups, bool relu) -> Tensor");
  m.def(
      "grouped_conv2d_bias_act_(Tensor(a!) residual, Tensor input, Tensor weight, Tensor? bias, "
      "int[2] stride, int[2] padding, int groups, bool relu) -> ()");
  m.def("grouped_conv_unsupported(int in_channels, int out_channels, int groups) -> str");
  // max_pool2d (dilation 1) of a float32 CPU input, channels-last out, without the indices
  // PyTorch's CPU kernel computes and drops (ResNet's pool after the stem).
  m.def("max_pool2d_nhwc(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode=False) -> Tensor");
  // Whether a CPU tensor holds no NaN or Inf (one read, exact per element: the fused graph's
  // check of its input), and the mean over H and W of a float32 channels-last input ([N, C, 1, 1]
  // out: a ResNet's pool before its classifier).
  m.def("all_finite(Tensor input) -> bool");
  m.def("global_avg_pool_nhwc(Tensor input) -> Tensor");
  // A CPU tensor copied to channels-last, always a new tensor (the fused graph's one layout
  // conversion of its input; a float32 NCHW image on our own loop, anything else on aten's).
  m.def("to_channels_last(Tensor input) -> Tensor");
  // CUDA only, for the GPU session's golden dumps: runs one arch-layer instruction on a warp
  // (csrc/cuda/kernels/conformance.h) and returns what every lane holds.
  m.def("_conformance(Tensor inputs, Tensor tile, int op) -> Tensor");
}
