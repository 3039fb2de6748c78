"""Our fused convolution kernel on a GPU, at full size: every ResNet-50 conv against cuDNN (eager)
and float64 under the accuracy rule, the split-K and stem paths, in place, the cuDNN fallback
switch, and the measured per-layer choice (tactics). The same kernels and the chooser run under
the emulator in CI (tests/test_emu.py, tests/test_tactics.py); these need a GPU."""

import copy

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from conftest import assert_accuracy_rule, needs_cuda, tf32
from resnet_fused import tactics
from test_ops import RESNET50_CONVS

pytestmark = [needs_cuda, pytest.mark.cuda]
CL = torch.channels_last


def case(n, c, k, ksz, stride, h, dtype, residual, seed=0, groups=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    pad = ksz // 2
    cg = c // groups
    x = torch.randn(n, c, h, h, device="cuda", generator=g).to(dtype).contiguous(memory_format=CL)
    w = (torch.randn(k, cg, ksz, ksz, device="cuda", generator=g) / (cg * ksz * ksz) ** 0.5).to(dtype)
    b = torch.randn(k, device="cuda", generator=g) * 0.5
    ho = (h + 2 * pad - ksz) // stride + 1
    r = torch.randn(n, k, ho, ho, device="cuda", generator=g).to(dtype).contiguous(memory_format=CL) if residual else None
    return x, w, b, r, dict(stride=[stride] * 2, padding=[pad] * 2, dilation=[1, 1], groups=groups)


def eager(x, w, b, r, kw, dtype, fmt=CL):
    y = F.conv2d(x.to(dtype).contiguous(memory_format=fmt), w.to(dtype).contiguous(memory_format=fmt), b.to(dtype), **kw)
    y = y + r.to(dtype) if r is not None else y
    return y.relu()


def check(x, w, b, r, kw, what, out=None):
    """The op's answer (or `out`, the same call made another way) under the accuracy rule."""
    out = resnet_fused.ops.conv2d_bias_act(x, w, b, r, relu=True, **kw) if out is None else out
    # float64 on the GPU (cuDNN computes it), so that the full-size references take seconds
    ref = eager(x, w, b, r, kw, torch.float64, torch.contiguous_format).cpu()
    if x.dtype == torch.float32:
        # TF32 (our kernel runs float32 so only where torch.backends.cudnn.allow_tf32 is on): eager's
        # yardstick is cuDNN on the operands rounded to TF32, in full float32 (cuDNN may or may not
        # pick a TF32 algorithm for a shape on its own)
        with torch.backends.cudnn.flags(allow_tf32=False):
            eagers = [eager(tf32(x), tf32(w), b, r, kw, x.dtype, f).cpu() for f in (torch.contiguous_format, CL)]
    else:
        eagers = [eager(x, w, b, r, kw, x.dtype, f).cpu() for f in (torch.contiguous_format, CL)]
    mag = F.conv2d(x.double().abs(), w.double().abs(), b.double().abs(), **kw)
    mag = (mag + r.double().abs() if r is not None else mag).cpu()
    assert_accuracy_rule(out.cpu(), eagers, ref, what=what, magnitude=mag)
    return out


@pytest.mark.parametrize("shape", RESNET50_CONVS, ids=lambda s: "C{}K{}k{}s{}H{}{}".format(*s[:5], "r" if s[5] else ""))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "tf32"])
@pytest.mark.parametrize("n", [1, 8])
def test_resnet50_shapes_full_size(shape, dtype, n):
    c, k, ksz, stride, h, residual = shape
    x, w, b, r, kw = case(n, c, k, ksz, stride, h, dtype, residual)
    out = None
    if dtype == torch.float32:  # (float32 takes our TF32 kernel only where the tactics chose it: ask for it)
        out = torch.ops.resnet_fused.cuda_conv2d_bias_act.default(
            x, w, b, r, kw["stride"], kw["padding"], kw["dilation"], kw["groups"], True, tactics.CUDA_ALGOS["tc128x64"])
    check(x, w, b, r, kw, f"{shape} batch {n}", out)


# A 3x3 of layer2 and layer4, a residual 1x1 and the stem, at batch 8: tiles the rule never picks
# (128x128k64, 256x128) run only where the tactics measure them.
TILE_SHAPES = [(128, 128, 3, 1, 28, False), (512, 512, 3, 1, 7, False), (256, 1024, 1, 1, 14, True)]


@pytest.mark.parametrize("algo", [a for a in tactics.CUDA_ALGOS.values() if a >= 0])
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "C{}K{}k{}H{}{}".format(s[0], s[1], s[2], s[4], "r" if s[5] else ""))
def test_every_tile_full_size(algo, shape):
    c, k, ksz, stride, h, residual = shape
    x, w, b, r, kw = case(8, c, k, ksz, stride, h, torch.float16, residual, seed=algo)
    out = torch.ops.resnet_fused.cuda_conv2d_bias_act.default(x, w, b, r, kw["stride"], kw["padding"], kw["dilation"],
                                                              1, True, algo)
    check(x, w, b, r, kw, f"algo {algo} {shape}", out=out)
    if residual:
        buf = r.clone()
        torch.ops.resnet_fused.cuda_conv2d_bias_act_.default(buf, x, w, b, kw["stride"], kw["padding"],
                                                             kw["dilation"], 1, True, algo)
        torch.testing.assert_close(buf, out, rtol=0, atol=0)


# ResNet-50's downsampling blocks' last 1x1 + downsample (test_emu_dual.RESNET50_DUAL) at full size.
DUAL_BLOCKS = [(64, 64, 256, 1, 56), (128, 256, 512, 2, 56), (256, 512, 1024, 2, 28), (512, 1024, 2048, 2, 14)]


@pytest.mark.parametrize("shape", DUAL_BLOCKS, ids=lambda s: "C{}+{}K{}s{}H{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("n", [1, 8])
def test_dual_full_size(shape, dtype, n):
    """Our dual kernel (each tile, and as planned) against eager's pair (cuDNN: each conv rounded,
    then add, ReLU) and float64; and the op's cuDNN path (algo -2) under the same rule."""
    c1, c2, k, s, h = shape
    g = torch.Generator(device="cuda").manual_seed(c1)
    p = (h - 1) // s + 1
    y = torch.randn(n, c1, p, p, device="cuda", generator=g).relu().to(dtype).contiguous(memory_format=CL)
    x = torch.randn(n, c2, h, h, device="cuda", generator=g).relu().to(dtype).contiguous(memory_format=CL)
    w1 = (torch.randn(k, c1, 1, 1, device="cuda", generator=g) / c1 ** 0.5).to(dtype)
    w2 = (torch.randn(k, c2, 1, 1, device="cuda", generator=g) / c2 ** 0.5).to(dtype)
    b1, b2 = torch.randn(k, device="cuda", generator=g) * 0.5, torch.randn(k, device="cuda", generator=g) * 0.5

    def pair(dt, fmt):
        a = F.conv2d(y.to(dt).contiguous(memory_format=fmt), w1.to(dt), b1.to(dt))
        return (a + F.conv2d(x.to(dt).contiguous(memory_format=fmt), w2.to(dt), b2.to(dt), stride=s)).relu()

    ref = pair(torch.float64, torch.contiguous_format).cpu()
    eagers = [pair(dtype, f).cpu() for f in (torch.contiguous_format, CL)]
    mag = (F.conv2d(y.double().abs(), w1.double().abs(), b1.double().abs())
           + F.conv2d(x.double().abs(), w2.double().abs(), b2.double().abs(), stride=s)).cpu()
    w = torch.cat([w1, w2], 1).contiguous(memory_format=CL)
    for algo in (-1, 0, 1, -2):
        out = torch.ops.resnet_fused.cuda_conv1x1_dual_bias_act.default(y, w, b1 + b2, x, s, True, algo)
        assert out.is_contiguous(memory_format=CL)
        assert_accuracy_rule(out.cpu(), eagers, ref, what=f"dual algo {algo} {shape} batch {n}", magnitude=mag)


# ResNeXt-50 32x4d's grouped 3x3s at full size (32 groups of 4, 8, 16 and 32 channels).
RESNEXT50_GROUPED = [(128, 1, 56), (256, 2, 56), (256, 1, 28), (512, 2, 28), (512, 1, 14), (1024, 2, 14),
                     (1024, 1, 7)]


@pytest.mark.parametrize("shape", RESNEXT50_GROUPED, ids=lambda s: "C{}s{}H{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("n", [1, 8])
def test_resnext50_grouped_full_size(shape, dtype, n):
    """Our kernel (the op's own choice takes it for groups of 4+ channels), in place too."""
    c, stride, h = shape
    x, w, b, r, kw = case(n, c, c, 3, stride, h, dtype, True, groups=32)
    assert not torch.ops.resnet_fused._cuda_conv_unsupported(x, w, r, 32)
    out = check(x, w, b, r, kw, f"grouped {shape} batch {n}")
    buf = r.clone()
    resnet_fused.ops.conv2d_bias_act_(buf, x, w, b, relu=True, **kw)
    torch.testing.assert_close(buf, out, rtol=0, atol=0)


def test_in_place_matches_out_of_place():
    x, w, b, r, kw = case(4, 256, 1024, 1, 1, 14, torch.float16, True)
    expected = resnet_fused.ops.conv2d_bias_act(x, w, b, r, relu=True, **kw)
    buf = r.clone()
    resnet_fused.ops.conv2d_bias_act_(buf, x, w, b, relu=True, **kw)
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)


def test_cudnn_switch_gives_the_same_answers():
    x, w, b, r, kw = case(2, 64, 256, 1, 1, 56, torch.float16, True)
    ours = resnet_fused.ops.conv2d_bias_act(x, w, b, r, relu=True, **kw)
    previous = resnet_fused.set_cuda_conv("cudnn")
    try:
        theirs = resnet_fused.ops.conv2d_bias_act(x, w, b, r, relu=True, **kw)
    finally:
        resnet_fused.set_cuda_conv(previous)
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="must be 'ours' or 'cudnn'"):
        resnet_fused.set_cuda_conv("tensorrt")


# ---- measured per-layer choice on CUDA (resnet_fused.tactics) --------------------------------
def test_tuned_resnet50_chooses_measured_paths_within_the_accuracy_rule(tactics_cache):
    """fuse() tunes each CUDA layer on its first call (our tiles, cuDNN + epilogue, cuDNN's fused
    op); the second call runs the choices (cuDNN's fused op only after the inputs were checked
    finite); both within the accuracy rule against float64 and eager fp16."""
    from test_fuse import fused_and_reference, torchvision_model

    model = torchvision_model("resnet50", branch_scale=0.5)
    out, eagers, ref, fused = fused_and_reference(model, torch.randn(4, 3, 96, 96), torch.float16, "cuda", True)
    assert_accuracy_rule(out, eagers, ref, what="resnet50 f16 tuned, first call")
    choices = fused.fuse_report.tactics
    names = set(tactics.CUDA_ALGOS) | {tactics.CUDNN_FUSED, tactics.SEPARATE} | {c.name for c in tactics.DUAL_CANDIDATES}
    assert choices and all(t["choice"] in names and t["times_ms"] for t in choices), choices
    assert sum(" + " in t["layer"] for t in choices) == 4  # (the downsampling blocks' pairs: FusedDual)
    x = torch.randn(4, 3, 96, 96)
    with torch.inference_mode():
        again = fused(x.to("cuda", torch.float16).contiguous(memory_format=CL)).cpu()
        eagers = [copy.deepcopy(model).to("cuda", torch.float16).to(memory_format=CL)(
            x.to("cuda", torch.float16).contiguous(memory_format=CL)).cpu()]
        ref = copy.deepcopy(model).double()(x.double())
    assert_accuracy_rule(again, eagers, ref, what="second call")


def test_tuned_resnext50_times_our_grouped_kernel(tactics_cache):
    """A fused ResNeXt on CUDA: each grouped 3x3 times our grouped kernel (one candidate: the tile
    plan_conv runs for groups) beside cuDNN's paths, and the model keeps the accuracy rule."""
    from test_fuse import fused_and_reference, torchvision_model

    model = torchvision_model("resnext50_32x4d", branch_scale=0.5)
    out, eagers, ref, fused = fused_and_reference(model, torch.randn(2, 3, 96, 96), torch.float16, "cuda", True)
    assert_accuracy_rule(out, eagers, ref, what="resnext50_32x4d f16 tuned")
    grouped = [t for t in fused.fuse_report.tactics if t["layer"].endswith("conv2")]
    assert len(grouped) == 16, fused.fuse_report.tactics
    for t in grouped:
        ours = {n for n in t["times_ms"] if n.startswith("tc")}
        assert len(ours) == 1, t  # (64x64, or 128x64 with 8-byte loads for layer1's 4-channel groups)


def test_cudnn_fused_keeps_nan_as_eager_does(tactics_cache, monkeypatch):
    """A layer that chose cuDNN's fused op (made the only fast candidate here) runs it on inputs
    checked finite, and the exact path on an input holding NaN: NaN where eager has NaN."""
    import time

    from torch import nn

    class LateCudnn(tactics.CudaAlgo):
        def run(self, layer, x, w, b, residual):
            time.sleep(0.02)
            return super().run(layer, x, w, b, residual)

    monkeypatch.setattr(tactics, "CUDA_CANDIDATES", [LateCudnn("cudnn"), tactics.CudnnFused()])
    net = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()).eval()
    fused = resnet_fused.fuse(net).to("cuda", torch.float16)
    x = torch.randn(2, 64, 16, 16, device="cuda").half().contiguous(memory_format=CL)
    with torch.inference_mode():
        fused(x)
        assert [t["choice"] for t in fused.fuse_report.tactics] == ["cudnn_fused"]
        ok = fused(x)
        x[0, :, 3, 3] = float("nan")
        bad = fused(x)
        eager = net.to("cuda", torch.float16)(x)
    assert torch.isfinite(ok).all()
    assert torch.equal(torch.isnan(bad), torch.isnan(eager)) and torch.isnan(bad).any()
    # in a CUDA graph: cuDNN's fused op recorded, every replay's input checked, NaN run eagerly
    graphed = resnet_fused.cuda_graph(fused)
    x = torch.randn(2, 64, 16, 16, device="cuda").half().contiguous(memory_format=CL)
    with torch.inference_mode():
        torch.testing.assert_close(graphed(x), fused(x), rtol=0, atol=0)
        assert all(entry.check_finite for entry in graphed._graphs.values())
        x[1, :, 0, 0] = float("nan")
        bad = graphed(x)
        eager = net(x)
    assert torch.equal(torch.isnan(bad), torch.isnan(eager)) and torch.isnan(bad).any()


def test_cudnn_convolution_relu_does_not_leak_its_uninitialised_z():
    """torch.cudnn_convolution_relu passes its own uninitialised output to cuDNN as z with alpha 0
    (shared/GPU_NOTES.md, section 4): were z multiplied rather than skipped, NaN garbage there
    would reach the result. The tactics' cudnn_fused candidate relies on it for layers without a
    residual. Memory freed full of NaN, of the output's size, is what the allocator hands out next."""
    x, w, b, _, kw = case(8, 64, 64, 3, 1, 28, torch.float16, False)
    w, b = w.contiguous(memory_format=CL), b.half()
    for _ in range(3):
        poison = torch.full((8, 64, 28, 28), float("nan"), device="cuda", dtype=torch.float16)
        del poison
        out = torch.cudnn_convolution_relu(x, w, b, kw["stride"], kw["padding"], kw["dilation"], 1)
        assert torch.isfinite(out).all()
