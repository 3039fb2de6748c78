"""Typed Python wrappers of torch.ops.resnet_fused.* and their fake (shape-only) kernels.

The kernels are C++ (csrc/cpu) and CUDA (csrc/cuda); these fake kernels let torch.compile,
torch.export and torch.library.opcheck reason about the ops without running them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format


def _pair(v) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) == 1:
        return [v[0], v[0]]
    return v


def conv2d_bias_act(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    relu: bool = False,
    assume_finite: bool = False,
) -> Tensor:
    """``act(conv2d(input, weight, stride, padding, dilation, groups) + bias [+ residual])``.

    ``act`` is ReLU when ``relu`` else the identity. ``weight`` may be dense or the result of
    :func:`prepack_conv2d_weight`. ``bias`` is float32 or the input's dtype; the epilogue adds
    it in float32 and rounds once. The output has the input's memory format.

    ``assume_finite=True`` vouches that no argument holds NaN/Inf; on CPU this lets the ReLU run
    as a oneDNN post-op (faster; it would map NaN to 0). The default keeps torch.relu's NaN
    semantics everywhere. Fused models pass True after checking their input.
    """
    return torch.ops.resnet_fused.conv2d_bias_act.default(
        input, weight, bias, residual, _pair(stride), _pair(padding), _pair(dilation), groups, relu, assume_finite
    )


def conv2d_bias_act_(
    residual: Tensor,
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    relu: bool = False,
    assume_finite: bool = False,
) -> Tensor:
    """:func:`conv2d_bias_act` written into ``residual`` (returned): for a residual that nothing
    reads after the join, no output buffer is allocated and oneDNN accumulates into it."""
    torch.ops.resnet_fused.conv2d_bias_act_.default(
        residual, input, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups, relu, assume_finite
    )
    return residual


def add_relu(a: Tensor, b: Tensor) -> Tensor:
    """``relu(a + b)`` in one pass (a residual join that no convolution absorbed)."""
    return torch.ops.resnet_fused.add_relu.default(a, b)


def prepack_conv2d_weight(
    weight: Tensor,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    input_size: Sequence[int] = (1, 1, 1, 1),
) -> Tensor:
    """Reorders ``weight`` once into the layout the device's convolution wants (oneDNN's
    blocked layout on CPU). Returns ``weight`` itself where no packing applies."""
    return torch.ops.resnet_fused.prepack_conv2d_weight.default(
        weight, _pair(stride), _pair(padding), _pair(dilation), groups, list(input_size)
    )


def conv_output_size(size: Sequence[int], weight_size: Sequence[int], stride, padding, dilation) -> list:
    n, _, h, w = size
    k, _, r, s = weight_size
    ho = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return [n, k, ho, wo]


@torch.library.register_fake("resnet_fused::conv2d_bias_act")
def _conv2d_bias_act_fake(input, weight, bias, residual, stride, padding, dilation, groups, relu,
                          assume_finite=False):
    torch._check(input.dim() == 4, lambda: f"resnet_fused: input must have 4 dimensions, got {input.dim()}")
    torch._check(weight.dim() == 4, lambda: f"resnet_fused: weight must have 4 dimensions, got {weight.dim()}")
    torch._check(
        input.shape[1] == weight.shape[1] * groups,
        lambda: f"resnet_fused: input has {input.shape[1]} channels, weight expects {weight.shape[1] * groups}",
    )
    shape = conv_output_size(input.shape, weight.shape, stride, padding, dilation)
    if residual is not None:
        torch._check(
            list(residual.shape) == shape,
            lambda: f"resnet_fused: residual must have the output's shape {shape}, got {list(residual.shape)}",
        )
    return input.new_empty(shape).contiguous(memory_format=suggest_memory_format(input))


@torch.library.register_fake("resnet_fused::conv2d_bias_act_")
def _conv2d_bias_act_inplace_fake(residual, input, weight, bias, stride, padding, dilation, groups, relu,
                                  assume_finite=False):
    shape = conv_output_size(input.shape, weight.shape, stride, padding, dilation)
    torch._check(
        list(residual.shape) == shape,
        lambda: f"resnet_fused: residual must have the output's shape {shape}, got {list(residual.shape)}",
    )


@torch.library.register_fake("resnet_fused::add_relu")
def _add_relu_fake(a, b):
    torch._check(a.shape == b.shape, lambda: f"resnet_fused: add_relu shapes differ: {a.shape} and {b.shape}")
    return torch.empty_like(a, memory_format=suggest_memory_format(a))


@torch.library.register_fake("resnet_fused::prepack_conv2d_weight")
def _prepack_fake(weight, stride, padding, dilation, groups, input_size):
    return torch.empty_like(weight)


@torch.library.register_fake("resnet_fused::winograd_prepack")
def _winograd_prepack_fake(weight, tile=2, stride=1, panels=False):
    k, c = weight.shape[0], weight.shape[1]
    positions = (4, 4) if stride == 2 else ((tile + 2) ** 2,)
    tail = ((k + 31) // 32, c, 32) if panels else (c, k)
    return weight.new_empty((*positions, *tail), dtype=torch.float32)


def _winograd_out_channels(weight, out_channels) -> int:
    """K of a Winograd weight: its last size, or out_channels where it is in panels ([..., ceil(K/32), C, 32])."""
    panels = weight.dim() == (5 if weight.shape[0] == 4 else 4)
    return out_channels if panels else weight.shape[-1]


@torch.library.register_fake("resnet_fused::winograd_conv2d_bias_act")
def _winograd_conv2d_bias_act_fake(input, weight, bias, residual, relu, schedule=0, out_channels=-1):
    n, _, h, w = input.shape
    if weight.shape[0] == 4:  # the stride-2 weight
        h, w = (h + 1) // 2, (w + 1) // 2
    k = _winograd_out_channels(weight, out_channels)
    return input.new_empty((n, k, h, w)).contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("resnet_fused::winograd_conv2d_bias_act_")
def _winograd_conv2d_bias_act_inplace_fake(residual, input, weight, bias, relu, schedule=0, out_channels=-1):
    return None


@torch.library.register_fake("resnet_fused::max_pool2d_nhwc")
def _max_pool2d_nhwc_fake(input, kernel_size, stride, padding, ceil_mode=False):
    n, c, h, w = input.shape

    def size(i, k, s, p):
        o = (i + 2 * p - (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        return o - 1 if ceil_mode and (o - 1) * s >= i + p else o

    oh, ow = size(h, kernel_size[0], stride[0], padding[0]), size(w, kernel_size[1], stride[1], padding[1])
    return input.new_empty((n, c, oh, ow)).contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("resnet_fused::to_channels_last")
def _to_channels_last_fake(input):
    return torch.empty_like(input, memory_format=torch.channels_last)


@torch.library.register_fake("resnet_fused::global_avg_pool_nhwc")
def _global_avg_pool_nhwc_fake(input):
    return input.new_empty((input.shape[0], input.shape[1], 1, 1)).contiguous(memory_format=torch.channels_last)


def _gemm_logical_shape(weight, out_channels) -> tuple:
    """[K, C, kh, kw] of a plain weight, or of gemm_prepack's [ceil(K/32), kh, kw, C, 32]."""
    if weight.dim() == 5:
        return (out_channels, weight.shape[3], weight.shape[1], weight.shape[2])
    return tuple(weight.shape)


@torch.library.register_fake("resnet_fused::gemm_conv2d_bias_act")
def _gemm_conv2d_bias_act_fake(input, weight, bias, residual, stride, padding, relu, out_channels=-1):
    shape = conv_output_size(input.shape, _gemm_logical_shape(weight, out_channels), stride, padding, [1, 1])
    return input.new_empty(shape).contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("resnet_fused::gemm_conv2d_bias_act_")
def _gemm_conv2d_bias_act_inplace_fake(residual, input, weight, bias, stride, padding, relu, out_channels=-1):
    return None


@torch.library.register_fake("resnet_fused::gemm_prepack")
def _gemm_prepack_fake(weight):
    k, c, kh, kw = weight.shape
    return weight.new_empty(((k + 31) // 32, kh, kw, c, 32))


@torch.library.register_fake("resnet_fused::grouped_prepack")
def _grouped_prepack_fake(weight, groups):
    k, cg, kh, kw = weight.shape
    return weight.new_empty((k // 16, kh, kw, cg, 16))


@torch.library.register_fake("resnet_fused::grouped_conv2d_bias_act")
def _grouped_conv2d_bias_act_fake(input, weight, bias, residual, stride, padding, groups, relu):
    logical = (weight.shape[0] * 16, weight.shape[3], weight.shape[1], weight.shape[2])
    shape = conv_output_size(input.shape, logical, stride, padding, [1, 1])
    return input.new_empty(shape).contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("resnet_fused::grouped_conv2d_bias_act_")
def _grouped_conv2d_bias_act_inplace_fake(residual, input, weight, bias, stride, padding, groups, relu):
    return None


@torch.library.register_fake("resnet_fused::gemm_unpack")
def _gemm_unpack_fake(packed, out_channels):
    return packed.new_empty(_gemm_logical_shape(packed, out_channels)).contiguous(memory_format=torch.channels_last)
