"""resnet_fused: fused conv+BN(+add)+ReLU kernels for trained ResNets at inference.

    fused = resnet_fused.fuse(model.eval())
"""

import torch

from . import _C  # noqa: F401  (loads the kernels: registers torch.ops.resnet_fused.*)
from . import ops
from .cuda_graph import CUDAGraphModule, cuda_graph
from .export import export, hold_for_serving, trace, unpack_weights
from .fold import fold_conv_bn
from .fuse import FuseReport, fuse
from .modules import FusedAddReLU, FusedConv2d, FusedDual
from .ops import add_relu, conv2d_bias_act, prepack_conv2d_weight
from . import tactics
from .tactics import tune

__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when this build has CUDA kernels and a CUDA device is usable."""
    return cuda_compiled() and torch.cuda.is_available()


def cuda_compiled() -> bool:
    """True when the CUDA kernels were compiled into this build (a GPU need not be present)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::conv2d_bias_act", "CUDA")


def set_cuda_conv(backend: str) -> str:
    """Which kernel runs float16/bfloat16 channels-last convolutions on CUDA: "ours" (the fused
    implicit-GEMM kernel where it applies, or the path a tuned layer measured fastest; the
    default) or "cudnn" (cuDNN's convolution and then our epilogue pass, for every layer).
    Returns the previous setting; process-wide. The environment variable
    RESNET_FUSED_CUDA_CONV=cudnn sets the default."""
    if not cuda_compiled():
        raise RuntimeError("resnet_fused was built without CUDA kernels")
    previous = torch.ops.resnet_fused._set_cuda_conv(backend)
    tactics._cuda_backend[0] = backend  # (checked by the op above) layers that chose cuDNN's fused op follow it
    return previous


__all__ = [
    "CUDAGraphModule",
    "cuda_graph",
    "export",
    "hold_for_serving",
    "FuseReport",
    "FusedAddReLU",
    "FusedDual",
    "FusedConv2d",
    "add_relu",
    "conv2d_bias_act",
    "cuda_available",
    "cuda_compiled",
    "set_cuda_conv",
    "fold_conv_bn",
    "fuse",
    "ops",
    "prepack_conv2d_weight",
    "tactics",
    "trace",
    "tune",
    "unpack_weights",
]
