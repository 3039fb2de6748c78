"""The dual kernel under the emulator: a bottleneck's last 1x1 and its downsample 1x1 in one product,
act(conv1x1(y, w1) + conv1x1(x, w2, stride) + b1 + b2), the same kernel source a GPU runs
(csrc/cuda/kernels/implicit_gemm.cuh with kDual), held to the accuracy rule against eager's way of
computing the block: each convolution rounded to the dtype, then the add and the ReLU."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_accuracy_rule

pytest.importorskip("resnet_fused._emu", reason="resnet_fused built without RESNET_FUSED_EMU=1")
E = torch.ops.resnet_fused_emu
CL = torch.channels_last
H100_SMS = 132


@pytest.fixture(autouse=True)
def _emulator_checks():
    E.set_options()  # every check on (races, uninitialised reads, cp.async waits, bounds)
    yield
    E.set_options()


def make_dual(n, c1, c2, k, stride, h2, w2, dtype, seed=0):
    """y (the block's conv2 output, at the output size), x (the block's input), the two weights and biases."""
    g = torch.Generator().manual_seed(seed)
    p, q = (h2 - 1) // stride + 1, (w2 - 1) // stride + 1
    y = torch.randn(n, c1, p, q, generator=g).relu().to(dtype).contiguous(memory_format=CL)
    x = torch.randn(n, c2, h2, w2, generator=g).relu().to(dtype).contiguous(memory_format=CL)
    w1 = (torch.randn(k, c1, 1, 1, generator=g) / c1 ** 0.5).to(dtype)
    w2_ = (torch.randn(k, c2, 1, 1, generator=g) / c2 ** 0.5).to(dtype)
    b1, b2 = torch.randn(k, generator=g) * 0.5, torch.randn(k, generator=g) * 0.5
    return y, x, w1, w2_, b1, b2


def block(y, x, w1, w2, b1, b2, stride, relu, dtype, fmt=torch.contiguous_format):
    """The two layers as eager runs them in `dtype`: each convolution (+ its bias) rounded, then add, ReLU."""
    a = F.conv2d(y.to(dtype).contiguous(memory_format=fmt), w1.to(dtype), b1.to(dtype))
    d = F.conv2d(x.to(dtype).contiguous(memory_format=fmt), w2.to(dtype), b2.to(dtype), stride=stride)
    out = a + d
    return out.relu() if relu else out


def run_dual(y, x, w1, w2, b1, b2, stride, relu, tile=-1, splits=-1):
    w = torch.cat([w1, w2], 1).contiguous(memory_format=CL)
    return E.conv1x1_dual_bias_act(y, w, (b1 + b2).float(), x, stride, relu, H100_SMS, tile, splits)


def check_dual(y, x, w1, w2, b1, b2, stride, relu=True, tile=-1, splits=-1, what=""):
    out = run_dual(y, x, w1, w2, b1, b2, stride, relu, tile, splits)
    assert out.is_contiguous(memory_format=CL), f"{what}: output not channels-last"
    ref = block(y, x, w1, w2, b1, b2, stride, relu, torch.float64)
    eager = [block(y, x, w1, w2, b1, b2, stride, relu, y.dtype, fmt) for fmt in (torch.contiguous_format, CL)]
    magnitude = (F.conv2d(y.double().abs(), w1.double().abs(), b1.double().abs())
                 + F.conv2d(x.double().abs(), w2.double().abs(), b2.double().abs(), stride=stride))
    assert_accuracy_rule(out, eager, ref, what=what, magnitude=magnitude)
    return out


# ResNet-50's four downsampling blocks (conv3's input channels, the block input's, output channels,
# stride, input size), at a reduced spatial size; the real channel counts.
RESNET50_DUAL = [(64, 64, 256, 1, 56), (128, 256, 512, 2, 56), (256, 512, 1024, 2, 28), (512, 1024, 2048, 2, 14)]
REDUCED = {56: 9, 28: 7, 14: 6}


@pytest.mark.parametrize("shape", RESNET50_DUAL, ids=lambda s: "C{}C{}K{}s{}H{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_resnet50_downsampling_blocks(shape, dtype):
    c1, c2, k, stride, h = shape
    hr = REDUCED[h]
    case = make_dual(2, c1, c2, k, stride, hr, hr + 2, dtype, seed=c1 + k)
    check_dual(*case, stride, what=f"{shape} at {hr}x{hr + 2}")


@pytest.mark.parametrize("tile", [0, 1, 2], ids=["128x128", "128x64", "asked 64x64"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_every_dual_tile_and_split(tile, splits, dtype):
    # (several blocks in M and N, partial ones in both; a reduction of 40 + 72 channels: the switch
    # from the first input to the second falls inside a 32-deep step)
    case = make_dual(3, 40, 72, 136, 2, 15, 13, dtype, seed=tile)
    check_dual(*case, 2, tile=tile, splits=splits, what=f"tile {tile} splits {splits}")


@pytest.mark.parametrize("n,c1,c2,k,stride,h2,w2", [
    (1, 64, 64, 256, 1, 1, 1),  # batch 1, one pixel
    (1, 8, 8, 8, 2, 7, 7),  # odd size, stride 2: 4x4
    (2, 16, 24, 32, 3, 10, 5),  # stride 3, a non-square map
    (1, 512, 1024, 2048, 2, 3, 3),  # layer4's channels at batch 1 (split-K as planned)
])
def test_odd_sizes_and_batch_1(n, c1, c2, k, stride, h2, w2):
    case = make_dual(n, c1, c2, k, stride, h2, w2, torch.float16, seed=h2 * w2)
    check_dual(*case, stride, what=f"{n}x{h2}x{w2}")


@pytest.mark.parametrize("relu", [False, True])
def test_without_relu(relu):
    case = make_dual(2, 16, 32, 24, 2, 6, 6, torch.float16)
    out = check_dual(*case, 2, relu=relu)
    assert bool((out < 0).any()) != relu


def test_nan_and_inf_propagate_like_eager():
    y, x, w1, w2, b1, b2 = make_dual(1, 16, 32, 24, 2, 6, 6, torch.float16)
    y[0, 3, 1, 1] = float("nan")
    x[0, 5, 4, 2] = float("inf")  # (output pixel (2, 1))
    out = run_dual(y, x, w1, w2, b1, b2, 2, True)
    ref = block(y, x, w1, w2, b1, b2, 2, True, torch.float64)
    assert torch.equal(out.isnan(), ref.isnan()) and bool(out.isnan().any())
    assert torch.equal(out.isinf(), ref.isinf())


@pytest.mark.parametrize("change,match", [
    ("float32", "float16 or bfloat16 only"),
    ("nchw", "channels-last"),
    ("weight", r"weight must be \[K, C \+ C2, 1, 1\]"),
    ("c1", "input channels not multiples of 8"),
    ("size", "the second input's size does not give the first's"),
    ("k", "output channels not a multiple of 8"),
])
def test_unsupported_calls_raise(change, match):
    y, x, w1, w2, b1, b2 = make_dual(1, 16, 32, 24, 2, 6, 6, torch.float16)
    if change == "float32":
        y, x, w1, w2 = y.float(), x.float(), w1.float(), w2.float()
    elif change == "nchw":
        x = x.contiguous()
    elif change == "weight":
        w2 = w2[:, :16]
    elif change == "c1":
        y, w1 = y[:, :12].contiguous(memory_format=CL), w1[:, :12]
    elif change == "size":
        x = x[:, :, :3].contiguous(memory_format=CL)  # 3 rows at stride 2 give 2, not y's 3
    elif change == "k":
        w1, w2, b1, b2 = w1[:12], w2[:12], b1[:12], b2[:12]
    with pytest.raises((ValueError, RuntimeError), match=match):
        run_dual(y, x, w1, w2, b1, b2, 2, True)


@st.composite
def dual_configs(draw):
    stride = draw(st.sampled_from([1, 2]))
    return dict(n=draw(st.integers(1, 3)), c1=draw(st.sampled_from([8, 16, 40, 64])),
                c2=draw(st.sampled_from([8, 24, 64, 128])), k=draw(st.sampled_from([8, 16, 40, 136])),
                stride=stride, h2=draw(st.integers(1, 11)), w2=draw(st.integers(1, 11)),
                dtype=draw(st.sampled_from([torch.float16, torch.bfloat16])), relu=draw(st.booleans()),
                tile=draw(st.sampled_from([-1, 0, 1])), splits=draw(st.sampled_from([-1, 1, 2, 5])))


@settings(max_examples=20, deadline=None)
@given(cfg=dual_configs())
def test_random_configurations(cfg):
    case = make_dual(cfg["n"], cfg["c1"], cfg["c2"], cfg["k"], cfg["stride"], cfg["h2"], cfg["w2"], cfg["dtype"])
    check_dual(*case, cfg["stride"], relu=cfg["relu"], tile=cfg["tile"], splits=cfg["splits"], what=str(cfg))
