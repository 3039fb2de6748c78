// One instantiation of the fused convolution kernel (implicit_gemm.cuh): 128x128 tiles, f16, dual
// (a bottleneck's last 1x1 and its downsample 1x1 in one product).
#include "implicit_gemm.cuh"

namespace resnet_fused::cuda {
template cudaError_t launch_conv_instance<Tile::k128x128, DType::kHalf, false, false, true>(const ConvParams&, int,
                                                                                       cudaStream_t);
}  // namespace resnet_fused::cuda
