// One instantiation of the fused convolution kernel (implicit_gemm.cuh): 128x64 tiles, f16,
// 8-byte loads for inputs of 4 channels (the 3-channel stem, padded).
#include "implicit_gemm.cuh"

namespace resnet_fused::cuda {
template cudaError_t launch_conv_instance<Tile::k128x64, DType::kHalf, true>(const ConvParams&, int, cudaStream_t);
}  // namespace resnet_fused::cuda
