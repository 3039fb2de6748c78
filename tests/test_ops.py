"""Each op against plain PyTorch (conv2d + bias + add + relu), with a float64 reference."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops

from conftest import CUDA, assert_accuracy_rule, device_params, held_to_isa, needs_cuda, run_tests_held_to_isa

# Every distinct conv of torchvision's resnet50 at 224x224: (C, K, kernel, stride, H), plus
# whether ResNet-50 feeds it a residual (the expanding 1x1 that ends each bottleneck).
RESNET50_CONVS = [
    (3, 64, 7, 2, 224, False),
    (64, 64, 1, 1, 56, False),
    (64, 64, 3, 1, 56, False),
    (64, 256, 1, 1, 56, True),
    (64, 256, 1, 1, 56, False),  # downsample
    (256, 64, 1, 1, 56, False),
    (256, 128, 1, 1, 56, False),
    (128, 128, 3, 2, 56, False),
    (128, 512, 1, 1, 28, True),
    (256, 512, 1, 2, 56, False),
    (512, 128, 1, 1, 28, False),
    (128, 128, 3, 1, 28, False),
    (512, 256, 1, 1, 28, False),
    (256, 256, 3, 2, 28, False),
    (256, 1024, 1, 1, 14, True),
    (512, 1024, 1, 2, 28, False),
    (1024, 256, 1, 1, 14, False),
    (256, 256, 3, 1, 14, False),
    (1024, 512, 1, 1, 14, False),
    (512, 512, 3, 2, 14, False),
    (512, 2048, 1, 1, 7, True),
    (1024, 2048, 1, 2, 14, False),
    (2048, 512, 1, 1, 7, False),
    (512, 512, 3, 1, 7, False),
]


def make_inputs(n, c, k, kernel, stride, h, w=None, groups=1, dtype=torch.float32, device="cpu",
                residual=False, bias=True, channels_last=False, dilation=1, padding=None):
    w_ = w if w is not None else h
    padding = kernel // 2 * dilation if padding is None else padding
    x = torch.randn(n, c, h, w_, device=device)
    weight = torch.randn(k, c // groups, kernel, kernel, device=device) / (c // groups * kernel * kernel) ** 0.5
    b = torch.randn(k, device=device) if bias else None
    ho = (h + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    wo = (w_ + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    res = torch.randn(n, k, ho, wo, device=device) if residual else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(dtype).contiguous(memory_format=fmt)
    weight = weight.to(dtype)
    if b is not None:
        b = b.to(dtype)
    if res is not None:
        res = res.to(dtype).contiguous(memory_format=fmt)
    return x, weight, b, res, dict(stride=[stride] * 2, padding=[padding] * 2, dilation=[dilation] * 2, groups=groups)


def reference(x, weight, b, res, relu, stride, padding, dilation, groups, dtype=None, memory_format=None):
    """Plain PyTorch: conv2d, + bias, + residual, relu; in `dtype` (default: the inputs')
    and `memory_format` (default: the inputs')."""
    def cast(t):
        t = t.to(dtype) if dtype is not None else t
        return t.contiguous(memory_format=memory_format) if memory_format is not None and t.dim() == 4 else t

    y = F.conv2d(cast(x), cast(weight), None if b is None else cast(b), stride, padding, dilation, groups)
    if res is not None:
        y = y + cast(res)
    return torch.relu(y) if relu else y


def magnitude(x, weight, b, res, stride, padding, dilation, groups):
    """conv2d(|x|, |w|) + |b| + |res| in float64: the scale of the terms behind each output."""
    a = lambda t: None if t is None else t.double().abs()  # noqa: E731
    y = F.conv2d(a(x), a(weight), a(b), stride, padding, dilation, groups)
    return y if res is None else y + a(res)


def onednn_broken(x, weight, kw) -> bool:
    """Shapes where eager's own oneDNN conv (torch 2.13, CPU) segfaults or returns garbage:
    dilated and strided convs with tiny sizes, and bf16/fp16 strided convs whose output is one
    row or column wide. Eager's answer there comes from its non-oneDNN path."""
    if x.device.type != "cpu":
        return False
    strided = any(s > 1 for s in kw["stride"])
    if strided and any(d > 1 for d in kw["dilation"]):
        return True
    out = F.conv2d(torch.empty(1, *x.shape[1:], device="meta"), torch.empty(weight.shape, device="meta"), None,
                   kw["stride"], kw["padding"], kw["dilation"], kw["groups"]).shape
    return strided and x.dtype != torch.float32 and (out[2] == 1 or out[3] == 1)


def eager_results(x, weight, b, res, relu, kw):
    """Eager PyTorch in the inputs' dtype, in both layouts it offers."""
    with torch.backends.mkldnn.flags(enabled=torch.backends.mkldnn.enabled and not onednn_broken(x, weight, kw)):
        return [reference(x, weight, b, res, relu, memory_format=f, **kw)
                for f in (torch.contiguous_format, torch.channels_last)]


def check_conv(x, weight, b, res, relu, kw, what=""):
    out = ops.conv2d_bias_act(x, weight, b, res, relu=relu, **kw)
    ref = reference(x, weight, b, res, relu, dtype=torch.float64, **kw)
    assert_accuracy_rule(out, eager_results(x, weight, b, res, relu, kw), ref, what=what,
                         magnitude=magnitude(x, weight, b, res, **kw))
    expected_cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if expected_cl:
        assert out.is_contiguous(memory_format=torch.channels_last), f"{what}: output lost channels_last"
    return out


cpu_paths = pytest.mark.parametrize("path", ["onednn", "native"])


def with_path(path):
    return torch.backends.mkldnn.flags(enabled=(path == "onednn"))


@pytest.mark.parametrize("shape", RESNET50_CONVS, ids=lambda s: "C{}K{}k{}s{}H{}{}".format(*s[:5], "r" if s[5] else ""))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_resnet50_shapes_cpu(shape, channels_last, dtype):
    c, k, kernel, stride, h, residual = shape
    x, w, b, res, kw = make_inputs(2, c, k, kernel, stride, h, dtype=dtype, residual=residual,
                                   channels_last=channels_last)
    check_conv(x, w, b, res, True, kw, what=f"{shape}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual,relu,bias", list(itertools.product([False, True], repeat=3)))
@cpu_paths
def test_epilogue_combinations(device, dtype, channels_last, residual, relu, bias, path):
    if device == "cuda" and path == "native":
        pytest.skip("one CUDA path")
    x, w, b, res, kw = make_inputs(2, 16, 24, 3, 1, 9, 11, dtype=dtype, device=device, residual=residual,
                                   bias=bias, channels_last=channels_last)
    with with_path(path):
        check_conv(x, w, b, res, relu, kw, what=f"{device} {dtype} {path}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize(
    "n,c,k,kernel,stride,h,w,groups,dilation",
    [
        (1, 8, 8, 3, 2, 37, 53, 1, 1),  # odd sizes, stride 2
        (3, 32, 64, 3, 1, 7, 7, 32, 1),  # depthwise-like grouped
        (2, 64, 64, 3, 2, 15, 15, 32, 1),  # ResNeXt 32x4d-style grouped, stride 2
        (2, 16, 16, 3, 1, 11, 9, 1, 2),  # dilated
        (1, 3, 64, 7, 2, 33, 31, 1, 1),  # the stem at an odd size
        (1, 5, 7, 1, 1, 1, 1, 1, 1),  # 1x1 spatial, odd channels
        (4, 12, 20, 1, 2, 8, 8, 4, 1),  # grouped 1x1 stride 2
    ],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@cpu_paths
def test_odd_shapes(device, n, c, k, kernel, stride, h, w, groups, dilation, channels_last, path):
    if device == "cuda" and path == "native":
        pytest.skip("one CUDA path")
    x, wt, b, res, kw = make_inputs(n, c, k, kernel, stride, h, w, groups=groups, dilation=dilation,
                                    device=device, residual=True, channels_last=channels_last)
    with with_path(path):
        check_conv(x, wt, b, res, True, kw, what="odd")


@pytest.mark.parametrize("device", device_params())
@cpu_paths
def test_batch_zero(device, path):
    x, w, b, res, kw = make_inputs(0, 8, 16, 3, 2, 9, device=device, residual=True)
    with with_path(path):
        out = ops.conv2d_bias_act(x, w, b, res, relu=True, **kw)
    assert out.shape == (0, 16, 5, 5)
    assert ops.add_relu(res, res).shape == res.shape


@pytest.mark.parametrize("device", device_params())
def test_float32_bias_with_reduced_input(device):
    """The fused modules pass a float32 bias with half/bf16 inputs; it is added in float32."""
    dtype = torch.bfloat16
    x, w, b, res, kw = make_inputs(2, 16, 32, 3, 1, 10, dtype=dtype, device=device, residual=True)
    out = ops.conv2d_bias_act(x, w, b.float(), res, relu=True, **kw)
    ref = reference(x, w, b, res, True, dtype=torch.float64, **kw)
    assert_accuracy_rule(out, eager_results(x, w, b, res, True, kw), ref)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("batch", [1, 8, 3])
def test_prepacked_weight_any_batch(channels_last, batch):
    """A weight packed for one input size stays right for others (and for odd sizes)."""
    x, w, b, res, kw = make_inputs(batch, 64, 128, 3, 2, 29, channels_last=channels_last, residual=True)
    packed = ops.prepack_conv2d_weight(w, input_size=[1, 64, 56, 56], **kw)
    assert packed.shape == w.shape
    out = ops.conv2d_bias_act(x, packed, b, res, relu=True, **kw)
    ref = reference(x, w, b, res, True, dtype=torch.float64, **kw)
    eager = eager_results(x, w, b, res, True, kw)
    assert_accuracy_rule(out, eager, ref)
    with torch.backends.mkldnn.flags(enabled=False):  # the native path unpacks it
        out2 = ops.conv2d_bias_act(x, packed, b, res, relu=True, **kw)
        eager_native = eager_results(x, w, b, res, True, kw)
    assert_accuracy_rule(out2, eager_native, ref)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "flat", "strided"])
def test_add_relu(device, dtype, layout):
    a = torch.randn(3, 24, 13, 7, device=device, dtype=dtype)
    b = torch.randn(3, 24, 13, 7, device=device, dtype=dtype)
    if layout == "nhwc":
        a, b = a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
    elif layout == "flat":
        a, b = a.reshape(-1), b.reshape(-1)
    elif layout == "strided":
        a, b = a[:, ::2], b.transpose(2, 3).contiguous().transpose(2, 3)[:, 1::2]
    out = ops.add_relu(a, b)
    ref = torch.relu(a.double() + b.double())
    eager = torch.relu(a + b)
    assert_accuracy_rule(out, eager, ref)


@held_to_isa
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_the_narrower_epilogues_on_this_cpu(isa):
    """The CPU epilogue's builds this CPU does not pick by default (an AVX2-only CPU runs the AVX2
    one): add_relu and the convolutions that end in our epilogue, in a process held to that ISA."""
    run_tests_held_to_isa(__file__, "(add_relu or epilogue_combinations) and cpu and not opcheck", isa)


def test_cpu_kernels_registered():
    for name in ("conv2d_bias_act", "conv2d_bias_act_", "add_relu", "prepack_conv2d_weight"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{name}", "CPU"), name


@pytest.mark.skipif(not resnet_fused.cuda_compiled(), reason="built without CUDA kernels")
def test_cuda_kernels_registered():
    for name in ("conv2d_bias_act", "conv2d_bias_act_", "add_relu", "prepack_conv2d_weight"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{name}", "CUDA"), name


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck_conv(device, channels_last, residual):
    x, w, b, res, kw = make_inputs(2, 8, 16, 3, 2, 9, device=device, residual=residual, channels_last=channels_last)
    args = (x, w, b, res, kw["stride"], kw["padding"], kw["dilation"], kw["groups"], True)
    torch.library.opcheck(torch.ops.resnet_fused.conv2d_bias_act.default, args)


@pytest.mark.parametrize("device", device_params())
def test_opcheck_add_relu(device):
    a = torch.randn(2, 8, 5, 5, device=device)
    torch.library.opcheck(torch.ops.resnet_fused.add_relu.default, (a, torch.randn_like(a)))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_opcheck_prepack(device, dtype):
    w = torch.randn(16, 8, 3, 3, device=device, dtype=dtype)
    args = (w, [1, 1], [1, 1], [1, 1], 1, [1, 8, 16, 16])
    op = torch.ops.resnet_fused.prepack_conv2d_weight.default
    packed = op(*args)
    if packed.is_mkldnn:
        # FakeTensor cannot stand for oneDNN's opaque tensors, so the fake/AOT checks cannot
        # compare layouts for a packed result; the schema and autograd checks still run.
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))
        assert torch.equal(packed.to_dense(), w)
    else:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_op():
    def f(x, w, b, r):
        return ops.conv2d_bias_act(x, w, b, r, stride=1, padding=1, relu=True) * 2

    x, w, b, r, kw = make_inputs(2, 8, 8, 3, 1, 6, residual=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b, r), f(x, w, b, r))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("groups,relu,assume_finite", [(1, True, True), (1, True, False), (1, False, True), (2, True, True)])
def test_inplace_residual(device, dtype, channels_last, groups, relu, assume_finite):
    x, w, b, res, kw = make_inputs(2, 16, 32, 3, 2, 11, groups=groups, dtype=dtype, device=device,
                                   residual=True, channels_last=channels_last)
    ref = reference(x, w, b, res, relu, dtype=torch.float64, **kw)
    eager = eager_results(x, w, b, res, relu, kw)
    buf = res.clone()
    ptr = buf.data_ptr()
    out = ops.conv2d_bias_act_(buf, x, w, b, relu=relu, assume_finite=assume_finite, **kw)
    assert out is buf and buf.data_ptr() == ptr
    assert_accuracy_rule(buf, eager, ref)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_inplace(device, channels_last):
    x, w, b, r, kw = make_inputs(2, 8, 16, 3, 2, 9, device=device, residual=True, channels_last=channels_last)
    args = (r, x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"], True, True)
    torch.library.opcheck(torch.ops.resnet_fused.conv2d_bias_act_.default, args)
