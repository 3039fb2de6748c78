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
  m.def(
      "conv2d_bias_act(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
  // relu(a + b): a residual join that no convolution can absorb.
  m.def("add_relu(Tensor a, Tensor b) -> Tensor");
  // Reorders a (folded) weight once into the blocked layout the CPU convolution primitive
  // wants; the result is accepted by conv2d_bias_act in place of the dense weight.
  m.def(
      "prepack_conv2d_weight(Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int[] input_size) -> Tensor");
}
