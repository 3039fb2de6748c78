// One instantiation of the fused convolution kernel (implicit_gemm.cuh): 128x64 tiles, float32
// in and out, TF32 tensor cores.
#include "implicit_gemm.cuh"

namespace resnet_fused::cuda {
template cudaError_t launch_conv_instance<Tile::k128x64, DType::kFloat, false>(const ConvParams&, int, cudaStream_t);
}  // namespace resnet_fused::cuda
