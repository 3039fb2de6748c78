// One instantiation of the fused convolution kernel (implicit_gemm.cuh): 256x128 tiles, 8 warps, f16.
#include "implicit_gemm.cuh"

namespace resnet_fused::cuda {
template cudaError_t launch_conv_instance<Tile::k256x128, DType::kHalf, false>(const ConvParams&, int, cudaStream_t);
}  // namespace resnet_fused::cuda
