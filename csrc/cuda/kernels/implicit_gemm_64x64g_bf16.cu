// One instantiation of the fused convolution kernel (implicit_gemm.cuh): 64x64 tiles, bf16,
// grouped convolutions (ResNeXt's 3x3s) with 16-byte loads.
#include "implicit_gemm.cuh"

namespace resnet_fused::cuda {
template cudaError_t launch_conv_instance<Tile::k64x64, DType::kBFloat16, false, true>(const ConvParams&, int, cudaStream_t);
}  // namespace resnet_fused::cuda
