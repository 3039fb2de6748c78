"""The CPU max-pool kernel (max_pool2d_nhwc) against PyTorch's max_pool2d, bit for bit (a max
is exact), and where fused models use it (FusedMaxPool2d)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from resnet_fused.modules import FusedMaxPool2d

from conftest import held_to_isa, run_tests_held_to_isa

pool = torch.ops.resnet_fused.max_pool2d_nhwc


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n,c,h,w,k,s,p,ceil", [
    (1, 64, 112, 112, 3, 2, 1, False),  # ResNet's pool after the stem
    (2, 64, 56, 56, 3, 2, 1, False),
    (2, 17, 9, 7, 3, 2, 1, False),      # channels off the vector width, odd sizes
    (1, 3, 5, 5, 3, 2, 1, True),        # ceil_mode: the last window hangs over the edge
    (2, 40, 8, 11, 2, 2, 0, True),
    (2, 16, 7, 7, 3, 1, 1, False),
    (1, 33, 6, 9, (3, 2), (2, 1), (1, 0), False),
    (1, 8, 1, 1, 1, 1, 0, False),
])
def test_against_pytorch(n, c, h, w, k, s, p, ceil):
    x = cl(torch.randn(n, c, h, w))
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    out = pool(x, pair(k), pair(s), pair(p), ceil)
    want = F.max_pool2d(x, k, s, p, ceil_mode=ceil)
    assert out.shape == want.shape and torch.equal(out, want)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_nchw_input_gives_the_same_values():
    x = torch.randn(2, 20, 9, 9)
    assert torch.equal(pool(x, [3, 3], [2, 2], [1, 1]), F.max_pool2d(x, 3, 2, 1))


@pytest.mark.parametrize("where", [0, 5, 16, 23])  # a channel in the vector part, and in the tail
def test_nan_and_inf_as_pytorch(where):
    x = torch.randn(1, 24, 6, 6)
    x[0, where, 2, 3] = float("nan")
    x[0, (where + 1) % 24, 4, 4] = float("inf")
    x[0, (where + 2) % 24] = float("-inf")
    x = cl(x)
    out, want = pool(x, [3, 3], [2, 2], [1, 1]), F.max_pool2d(x, 3, 2, 1)
    assert torch.equal(out.isnan(), want.isnan()) and out.isnan().any()
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(want))


@held_to_isa
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_the_narrower_kernels_on_this_cpu(isa):
    """The kernels this CPU does not pick by default (AVX2-only CPUs run the AVX2 one): the value and
    NaN tests above, in a process held to that ISA."""
    run_tests_held_to_isa(__file__, "against_pytorch or nan_and_inf", isa)


@pytest.mark.parametrize("case,exc,match", [
    ("bf16", TypeError, "float32 only"),
    ("3-d", ValueError, "input must have 4 dimensions"),
    ("padding", ValueError, "at most half the kernel size"),
    ("stride", ValueError, "must be positive"),
    ("too small", ValueError, "too small for kernel"),
])
def test_bad_input(case, exc, match):
    x, k, s, p = cl(torch.randn(1, 4, 6, 6)), [3, 3], [2, 2], [1, 1]
    if case == "bf16":
        x = x.bfloat16()
    elif case == "3-d":
        x = x[0]
    elif case == "padding":
        p = [2, 2]
    elif case == "stride":
        s = [0, 2]
    elif case == "too small":
        x, k, p = cl(torch.randn(1, 4, 2, 2)), [3, 3], [0, 0]
    with pytest.raises(exc, match=match):
        pool(x, k, s, p)


def test_opcheck():
    torch.library.opcheck(pool.default, (cl(torch.randn(2, 8, 9, 7)), [3, 3], [2, 2], [1, 1], True))


def test_fused_resnet_runs_it_and_keeps_the_values(monkeypatch):
    """fuse() swaps nn.MaxPool2d for FusedMaxPool2d; a CPU float32 channels-last input takes our
    op, anything else PyTorch's (same values)."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    fused = resnet_fused.fuse(model)
    assert isinstance(fused.maxpool, FusedMaxPool2d)
    calls = []
    real = pool.default
    monkeypatch.setattr(torch.ops.resnet_fused.max_pool2d_nhwc, "default",
                        lambda *a: calls.append(1) or real(*a))
    x = cl(torch.randn(2, 64, 20, 20))
    with torch.inference_mode():
        assert torch.equal(fused.maxpool(x), model.maxpool(x)) and calls == [1]
        assert torch.equal(fused.maxpool(x.contiguous()), model.maxpool(x.contiguous())) and calls == [1]
        assert torch.equal(fused.maxpool(x.double()), model.maxpool(x.double())) and calls == [1]


def test_pools_with_indices_or_dilation_are_left_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.a = nn.MaxPool2d(3, 2, 1, dilation=2)
            self.b = nn.MaxPool2d(2)

        def forward(self, x):
            return self.b(self.a(self.conv(x)))

    net = Net().eval()
    fused = resnet_fused.fuse(net)
    assert type(fused.a) is nn.MaxPool2d and isinstance(fused.b, FusedMaxPool2d)
    assert any("dilation" in why for _, why in fused.fuse_report.left)
    x = torch.randn(2, 3, 17, 17)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), net(x))
