// One instantiation of the fused convolution kernel (implicit_gemm.cuh): 128x128 tiles with
// 64-deep reduction steps in 3 stages, f16.
#include "implicit_gemm.cuh"

namespace resnet_fused::cuda {
template cudaError_t launch_conv_instance<Tile::k128x128k64, DType::kHalf, false>(const ConvParams&, int, cudaStream_t);
}  // namespace resnet_fused::cuda
