"""BatchNorm folding arithmetic, in one place.

    y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
      = conv(x, W * s) + (b - mean) * s + beta,        s = gamma / sqrt(var + eps)

Computed in float64 (never in half), returned in ``dtype`` (default: float32, or float64 when
the conv weight is float64), so half and bfloat16 models are refolded from exact values.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype folded weights are kept in: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def fold_conv_bn_tensors(
    conv_w: Tensor,
    conv_b: Optional[Tensor],
    bn_mean: Tensor,
    bn_var: Tensor,
    bn_eps: float,
    bn_w: Optional[Tensor] = None,
    bn_b: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """Returns ``(weight, bias)`` of the conv that equals conv followed by BN in eval mode.

    Handles a conv without bias (``conv_b=None``) and a non-affine BN (``bn_w``/``bn_b`` None).
    """
    dtype = dtype or master_dtype(conv_w.dtype)
    f64 = dict(dtype=torch.float64)
    k = conv_w.shape[0]
    mean = bn_mean.to(**f64)
    var = bn_var.to(**f64)
    gamma = bn_w.to(**f64) if bn_w is not None else torch.ones(k, **f64, device=conv_w.device)
    beta = bn_b.to(**f64) if bn_b is not None else torch.zeros(k, **f64, device=conv_w.device)
    b = conv_b.to(**f64) if conv_b is not None else torch.zeros(k, **f64, device=conv_w.device)
    scale = gamma * torch.rsqrt(var + bn_eps)
    weight = conv_w.to(**f64) * scale.reshape(-1, *([1] * (conv_w.dim() - 1)))
    bias = (b - mean) * scale + beta
    return weight.to(dtype).contiguous(), bias.to(dtype).contiguous()


def can_fold(bn: nn.Module) -> tuple[bool, str]:
    """Whether a BatchNorm module can be folded into the conv before it, and if not, why."""
    if not isinstance(bn, nn.BatchNorm2d):
        return False, f"{type(bn).__name__} is not BatchNorm2d"
    if bn.training:
        return False, "BatchNorm is in training mode"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return False, "BatchNorm has no running statistics (track_running_stats=False): it normalises by batch"
    return True, ""


def fold_conv_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], dtype: Optional[torch.dtype] = None):
    """``(weight, bias)`` of ``conv`` with ``bn`` (or nothing) folded in; bias always present."""
    if bn is None:
        dtype = dtype or master_dtype(conv.weight.dtype)
        w = conv.weight.detach().to(dtype).contiguous()
        if conv.bias is not None:
            b = conv.bias.detach().to(dtype).contiguous()
        else:
            b = torch.zeros(conv.out_channels, dtype=dtype, device=w.device)
        return w, b
    ok, why = can_fold(bn)
    if not ok:
        raise ValueError(f"cannot fold {bn}: {why}")
    return fold_conv_bn_tensors(
        conv.weight.detach(),
        None if conv.bias is None else conv.bias.detach(),
        bn.running_mean,
        bn.running_var,
        bn.eps,
        None if bn.weight is None else bn.weight.detach(),
        None if bn.bias is None else bn.bias.detach(),
        dtype,
    )
