"""The whole-tensor CPU ops of a fused forward: all_finite (the graph's check of its input)
against torch.isfinite, global_avg_pool_nhwc (a ResNet's pool before its classifier) against a
float64 reference, to_channels_last (the graph's conversion of its input) against aten's copy; where
fused models use them."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from resnet_fused.modules import FusedGlobalAvgPool2d

from conftest import assert_accuracy_rule

all_finite = torch.ops.resnet_fused.all_finite
pool = torch.ops.resnet_fused.global_avg_pool_nhwc
to_cl = torch.ops.resnet_fused.to_channels_last


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 100_003, 300_000])  # (past the parallel chunk of 65536 elements)
def test_all_finite_finds_each_nan_and_inf(dtype, n):
    torch.manual_seed(0)
    x = torch.randn(n).to(dtype)
    assert all_finite(x)
    for where in sorted({0, n // 2, n - 1, min(n - 1, 65536)}):
        for bad in (math.nan, math.inf, -math.inf):
            y = x.clone()
            y[where] = bad
            assert not all_finite(y), (where, bad)
    # the largest finite values and the subnormals are finite
    y = x.clone()
    y[0], y[-1] = torch.finfo(dtype).max, -torch.finfo(dtype).tiny / 2
    assert all_finite(y)


def test_all_finite_reads_any_layout():
    x = torch.randn(2, 3, 8, 8)
    for t in (x.contiguous(memory_format=torch.channels_last), x[:, :, ::2, 1:], x.transpose(0, 3), x[:0]):
        assert all_finite(t)
    y = x.clone()
    y[1, 2, 7, 7] = math.nan
    assert not all_finite(y[:, :, 1:, 1:])  # (a view that holds it)
    assert all_finite(y[:, :, :7, :7])  # (a view that does not, though its storage does)
    assert not all_finite(y.contiguous(memory_format=torch.channels_last))


def test_all_finite_refuses_what_it_cannot_check():
    with pytest.raises(TypeError, match="floating-point"):
        all_finite(torch.arange(4))


@pytest.mark.parametrize("n,c,h,w", [(1, 2048, 7, 7), (2, 512, 7, 7), (3, 65, 5, 3), (2, 130, 1, 1), (1, 8, 224, 1)])
def test_global_avg_pool_against_float64(n, c, h, w):
    torch.manual_seed(0)
    x = (torch.randn(n, c, h, w) + 0.5).contiguous(memory_format=torch.channels_last)
    out = pool(x)
    ref = x.double().mean((2, 3), keepdim=True)
    eager = [F.adaptive_avg_pool2d(x, 1), F.adaptive_avg_pool2d(x.contiguous(), 1)]
    assert out.shape == (n, c, 1, 1) and out.is_contiguous(memory_format=torch.channels_last)
    assert_accuracy_rule(out, eager, ref, what=f"{(n, c, h, w)}", magnitude=x.double().abs().mean((2, 3), keepdim=True))


def test_global_avg_pool_keeps_nan_and_takes_nchw():
    x = torch.randn(2, 16, 4, 4)
    x[1, 3, 2, 2] = math.nan
    x[0, 5, 0, 0] = math.inf
    out = pool(x)  # (NCHW: read as channels-last)
    want = F.adaptive_avg_pool2d(x, 1)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    ok = out.isfinite()
    torch.testing.assert_close(out[ok], want[ok])


def test_global_avg_pool_bad_input_names_the_problem():
    with pytest.raises(TypeError, match="float32"):
        pool(torch.randn(1, 4, 2, 2).double())
    with pytest.raises(ValueError, match="4-D|dimensions|dim"):
        pool(torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="no pixels"):
        pool(torch.randn(1, 4, 0, 2))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.other = nn.AdaptiveAvgPool2d((2, 2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(torch.flatten(self.pool(y), 1)), self.other(y)


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (2, 3, 7, 5), (3, 1, 4, 4), (2, 2, 3, 9), (1, 4, 1, 6),
                                   (2, 8, 5, 5), (1, 9, 4, 3), (0, 3, 4, 4)])
def test_to_channels_last_copies_exactly(shape):
    x = torch.randn(shape)
    for t in (x, x.double(), x.half(), x[:, :, ::2], x.contiguous(memory_format=torch.channels_last)):
        y = to_cl(t)
        assert torch.equal(y, t.contiguous(memory_format=torch.channels_last)) and y.dtype == t.dtype
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert y.numel() == 0 or y.data_ptr() != t.data_ptr()  # (always a new tensor: the schema aliases nothing)
    nan = x.clone()
    if nan.numel():
        nan.view(-1)[-1] = math.nan
        assert torch.equal(to_cl(nan).isnan(), nan.isnan())


def test_to_channels_last_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="input"):
        to_cl(torch.randn(3, 4, 4))
    with pytest.raises((ValueError, RuntimeError), match="dense CPU"):
        to_cl(torch.randn(1, 3, 4, 4).to_mkldnn())


def test_fuse_runs_the_pool_on_our_kernel(monkeypatch):
    """fuse() swaps nn.AdaptiveAvgPool2d(1) for FusedGlobalAvgPool2d (not other output sizes); a
    CPU float32 channels-last input takes our kernel, anything else PyTorch's; the graph's input
    check runs all_finite."""
    torch.manual_seed(0)
    model = Head().eval()
    fused = resnet_fused.fuse(model)
    assert isinstance(fused.pool, FusedGlobalAvgPool2d) and type(fused.other) is nn.AdaptiveAvgPool2d
    assert ("pool", "avgpool") in fused.fuse_report.fused
    calls = []
    for name in ("global_avg_pool_nhwc", "all_finite", "to_channels_last"):
        op = getattr(torch.ops.resnet_fused, name).default
        monkeypatch.setattr(getattr(torch.ops.resnet_fused, name), "default",
                            lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    x = torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        out, other = fused(x)
        ref = model.double()(x.double())
        eager = copy.deepcopy(model).float()(x)
    assert calls.count("global_avg_pool_nhwc") == 1 and calls.count("all_finite") == 1, calls
    assert calls.count("to_channels_last") == 1, calls
    assert_accuracy_rule(out, [eager[0]], ref[0], what="head")
    assert_accuracy_rule(other, [eager[1]], ref[1], what="other pool")
    calls.clear()
    with torch.inference_mode():
        y = fused.pool(x.double().contiguous(memory_format=torch.channels_last))
    assert not calls and torch.equal(y, F.adaptive_avg_pool2d(x.double().contiguous(memory_format=torch.channels_last), 1))
    nan = x.clone()
    nan[0, 0, 0, 0] = math.nan
    with torch.inference_mode():
        bad, _ = fused(nan)
    assert bad[0].isnan().all() and bad[1].isfinite().all()
