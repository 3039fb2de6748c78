"""Bad input raises a clear Python exception; odd but valid input behaves like eager; random
conv configurations (hypothesis) match plain PyTorch; no memory growth; threads and streams."""

import copy
import gc
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resnet_fused
from resnet_fused import ops

import models
from conftest import CUDA, assert_accuracy_rule, device_params, needs_cuda, randomize_bn
from test_ops import eager_results, magnitude, make_inputs, reference


# ---------------------------------------------------------------------------------------------
# Bad input to the ops
# ---------------------------------------------------------------------------------------------
def conv_args(device="cpu", **over):
    x, w, b, r, kw = make_inputs(2, 8, 16, 3, 1, 10, device=device, residual=True)
    args = dict(input=x, weight=w, bias=b, residual=r, **kw, relu=True)
    args.update(over)
    return args


def call(args):
    return ops.conv2d_bias_act(**args)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: dict(input=a["input"][0]), ValueError, r"input must have 4 dimensions, got 3"),
        (lambda a: dict(weight=a["weight"][0]), ValueError, r"weight must have 4 dimensions, got 3"),
        (lambda a: dict(input=a["input"][:, :5]), ValueError, r"input has 5 channels but the weight .* expects 8"),
        (lambda a: dict(input=a["input"].double(), weight=a["weight"].double()), TypeError,
         r"input must be float32, float16 or bfloat16, got Double"),
        (lambda a: dict(input=a["input"].to(torch.int32)), TypeError, r"input must be float32.*got Int"),
        (lambda a: dict(weight=a["weight"].bfloat16()), TypeError, r"weight must have the input's dtype Float, got BFloat16"),
        (lambda a: dict(bias=a["bias"].double()), TypeError, r"bias must be float32 or have the input's dtype"),
        (lambda a: dict(residual=a["residual"].bfloat16()), TypeError, r"residual must have the input's dtype"),
        (lambda a: dict(bias=a["bias"][:5]), ValueError, r"bias must have 16 elements .*got 5"),
        (lambda a: dict(residual=a["residual"][:, :, :3]), ValueError,
         r"residual must have the output's shape \[2, 16, 10, 10\], got \[2, 16, 3, 10\]"),
        (lambda a: dict(stride=[0, 1]), ValueError, r"stride must be positive"),
        (lambda a: dict(padding=[-1, 1]), ValueError, r"padding must be non-negative"),
        (lambda a: dict(dilation=[1, 0]), ValueError, r"dilation must be positive"),
        (lambda a: dict(groups=3), ValueError, r"channels"),
        (lambda a: dict(input=a["input"][:, :, :1, :1], padding=[0, 0]), ValueError, r"too small"),
    ],
)
def test_bad_conv_input(device, change, exc, match):
    args = conv_args(device)
    args.update(change(args))
    with pytest.raises(exc, match=match):
        call(args)


@needs_cuda
def test_mixed_devices_raise():
    args = conv_args("cuda")
    with pytest.raises(ValueError, match="device"):
        call(dict(args, weight=args["weight"].cpu()))
    with pytest.raises(ValueError, match="device"):
        call(dict(args, residual=args["residual"].cpu()))
    with pytest.raises((ValueError, RuntimeError), match="device|CUDA|cpu"):
        call(dict(args, input=args["input"].cpu()))


@pytest.mark.parametrize("device", device_params())
def test_bad_add_relu_input(device):
    a = torch.randn(2, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match=r"one shape, got \[2, 3, 4, 4\] and \[2, 3, 4, 5\]"):
        ops.add_relu(a, torch.randn(2, 3, 4, 5, device=device))
    with pytest.raises(TypeError, match="b must have the input's dtype Float, got Half"):
        ops.add_relu(a, a.half())
    with pytest.raises(TypeError, match="a must be float32"):
        ops.add_relu(a.long(), a.long())


# ---------------------------------------------------------------------------------------------
# Bad input to fused models
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar():
    model = randomize_bn(models.CifarResNet()).eval()
    return model, resnet_fused.fuse(model)


def test_bad_model_input(cifar):
    model, fused = cifar
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="4 dimensions, got 3"):
        fused(x[0])
    with pytest.raises(ValueError, match="input has 1 channels but the weight"):
        fused(x[:, :1])
    with pytest.raises(TypeError, match="computes in torch.float32 but got a torch.float64 input.*float64 has no"):
        fused(x.double())
    with pytest.raises(TypeError, match=r"computes in torch.float32 but got a torch.int64 input; cast the input with "
                                        r"\.to\(torch.float32\)$"):
        fused(x.long())
    with torch.inference_mode():
        for bad in (x.to_sparse(), x.to_mkldnn()):
            for _ in range(4):  # (the module path, and the calls a dense input would have replayed)
                with pytest.raises(TypeError, match=f"takes a dense \\(strided\\) input, got a {bad.layout} tensor"):
                    fused(bad)
    with pytest.raises(TypeError, match="torch.bfloat16"):
        fused(x.bfloat16())
    with pytest.raises(TypeError, match="takes an nn.Module"):
        resnet_fused.fuse(lambda t: t)


@needs_cuda
def test_model_device_mismatch(cifar):
    _, fused = cifar
    g = copy.deepcopy(fused).cuda()
    with pytest.raises(ValueError, match="is on cuda:0 but got an input on cpu"):
        g(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="is on cpu but got an input on cuda"):
        fused(torch.randn(2, 3, 16, 16, device="cuda"))


# ---------------------------------------------------------------------------------------------
# Odd but valid input behaves like eager
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize(
    "make_x",
    [
        lambda: torch.randn(0, 3, 32, 32),
        lambda: torch.randn(1, 3, 32, 32),
        lambda: torch.randn(4, 3, 1, 1),
        lambda: torch.randn(3, 3, 7, 7),
        lambda: torch.randn(2, 3, 37, 53),
        lambda: torch.randn(6, 3, 40, 40)[1:5, :, 3:35, ::2],  # sliced, non-contiguous
        lambda: torch.randn(2, 32, 32, 3).permute(0, 3, 1, 2),  # channels_last
        lambda: torch.randn(2, 3, 32, 32).transpose(2, 3),  # transposed strides
        lambda: torch.randn(96, 3, 16, 16),  # a larger batch
    ],
    ids=["empty", "batch1", "1x1", "7x7", "37x53", "sliced", "channels_last", "transposed", "batch96"],
)
def test_odd_inputs_like_eager(cifar, device, make_x):
    model, fused = cifar
    model, fused = copy.deepcopy(model).to(device), copy.deepcopy(fused).to(device)
    x = make_x().to(device)
    with torch.inference_mode():
        try:
            eager = model(x)
        except Exception as err:  # noqa: BLE001 - then fused must fail the same way
            with pytest.raises(type(err)):
                fused(x)
            return
        out = fused(x)
        ref = copy.deepcopy(model).double()(x.double())
        # (eager in both layouts it offers, as the rule takes it (conftest): on a GPU with TF32
        # allowed cuDNN may run NCHW in exact float32 and channels-last in TF32)
        cl = torch.channels_last
        eager_cl = copy.deepcopy(model).to(memory_format=cl)(x.contiguous(memory_format=cl)) if x.numel() else eager
    assert out.shape == eager.shape
    if x.numel():
        assert_accuracy_rule(out.cpu(), [eager.cpu(), eager_cl.cpu()], ref.cpu())


@pytest.mark.parametrize("device", device_params())
def test_nan_and_inf_propagate_like_eager(cifar, device):
    model, fused = cifar
    model, fused = copy.deepcopy(model).to(device), copy.deepcopy(fused).to(device)
    x = torch.randn(4, 3, 16, 16, device=device)
    x[0, 0, 3, 3] = float("nan")
    x[1, 1, 5, 5] = float("inf")
    x[2, 2, 7, 7] = float("-inf")
    with torch.inference_mode():
        out, eager = fused(x), model(x)
    assert torch.equal(torch.isnan(out), torch.isnan(eager)), (torch.isnan(out), torch.isnan(eager))
    assert torch.equal(torch.isinf(out), torch.isinf(eager))
    finite = torch.isfinite(eager)
    torch.testing.assert_close(out[finite], eager[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", device_params())
def test_op_nan_inf(device):
    x, w, b, r, kw = make_inputs(1, 4, 4, 3, 1, 6, device=device, residual=True)
    x[0, 0, 2, 2] = float("nan")
    r[0, 1, 0, 0] = float("inf")
    r[0, 2, 5, 5] = float("-inf")
    for path in (True, False):
        with torch.backends.mkldnn.flags(enabled=path):
            out = ops.conv2d_bias_act(x, w, b, r, relu=True, **kw)
        eager = reference(x, w, b, r, True, **kw)
        assert torch.equal(torch.isnan(out), torch.isnan(eager))
        assert torch.equal(torch.isinf(out), torch.isinf(eager))
        assert out[0, 2, 5, 5] == 0  # relu(-inf) = 0


# ---------------------------------------------------------------------------------------------
# Property-based: random conv configurations against plain PyTorch
# ---------------------------------------------------------------------------------------------
@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    c = groups * draw(st.integers(1, 6))
    k = groups * draw(st.integers(1, 6))
    kernel = draw(st.sampled_from([1, 3, 5, 7]))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 3))
    stride = draw(st.integers(1, 3))
    min_hw = max(1, dilation * (kernel - 1) + 1 - 2 * padding)
    h = draw(st.integers(min_hw, min_hw + 12))
    w = draw(st.integers(min_hw, min_hw + 12))
    return dict(
        n=draw(st.integers(1, 3)), c=c, k=k, kernel=kernel, stride=stride, h=h, w=w, groups=groups,
        dilation=dilation, padding=padding,
        bias=draw(st.booleans()), residual=draw(st.booleans()), relu=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        channels_last=draw(st.booleans()), onednn=draw(st.booleans()), assume_finite=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=int(os.environ.get("RF_HYPOTHESIS_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cfg=conv_configs())
def test_random_conv_configs(cfg):
    torch.manual_seed(cfg["seed"])  # inputs drawn from the example: a failure replays
    x, w, b, r, kw = make_inputs(cfg["n"], cfg["c"], cfg["k"], cfg["kernel"], cfg["stride"], cfg["h"], cfg["w"],
                                 groups=cfg["groups"], dtype=cfg["dtype"], residual=cfg["residual"],
                                 bias=cfg["bias"], channels_last=cfg["channels_last"], dilation=cfg["dilation"],
                                 padding=cfg["padding"])
    with torch.backends.mkldnn.flags(enabled=cfg["onednn"]):  # eager under the same backend settings
        out = ops.conv2d_bias_act(x, w, b, r, relu=cfg["relu"], assume_finite=cfg["assume_finite"], **kw)
        eager = eager_results(x, w, b, r, cfg["relu"], kw)
        if r is not None:
            inplace = r.clone()
            ops.conv2d_bias_act_(inplace, x, w, b, relu=cfg["relu"], assume_finite=cfg["assume_finite"], **kw)
    ref = reference(x, w, b, r, cfg["relu"], dtype=torch.float64, **kw)
    mag = magnitude(x, w, b, r, **kw)
    assert_accuracy_rule(out, eager, ref, what=str(cfg), magnitude=mag)
    if r is not None:
        assert_accuracy_rule(inplace, eager, ref, what="in place " + str(cfg), magnitude=mag)


def test_single_output_channel_batch_channels_last():
    """One output channel, batch 2, channels-last, a 7x7 kernel over a 7x7 image: PyTorch's oneDNN
    convolution op returns wrong values here (found by the test above); the op takes eager's path."""
    torch.manual_seed(0)
    for residual in (False, True):
        x, w, b, r, kw = make_inputs(2, 2, 1, 7, 1, 7, 7, residual=residual, channels_last=True)
        out = ops.conv2d_bias_act(x, w, b, r, relu=False, **kw)
        ref = reference(x, w, b, r, False, dtype=torch.float64, **kw)
        mag = magnitude(x, w, b, r, **kw)
        assert_accuracy_rule(out, eager_results(x, w, b, r, False, kw), ref, what="single channel", magnitude=mag)
        if r is not None:
            inplace = r.clone()
            ops.conv2d_bias_act_(inplace, x, w, b, relu=False, **kw)
            assert_accuracy_rule(inplace, eager_results(x, w, b, r, False, kw), ref, what="in place", magnitude=mag)


# ---------------------------------------------------------------------------------------------
# Memory and concurrency
# ---------------------------------------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_no_memory_growth_cpu(cifar):
    _, fused = cifar
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        for _ in range(300):
            fused(x)
        gc.collect()
        before = rss_mb()
        for _ in range(3000):
            fused(x)
        gc.collect()
        after = rss_mb()
    assert after - before < 16, f"RSS grew {after - before:.1f} MB over 3000 calls"


@needs_cuda
def test_no_memory_growth_cuda(cifar):
    _, fused = cifar
    g = copy.deepcopy(fused).cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.inference_mode():
        for _ in range(100):
            g(x)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(3000):
            g(x)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= before


@needs_cuda
def test_streams_give_one_stream_answers(cifar):
    _, fused = cifar
    g = copy.deepcopy(fused).cuda().half()
    xs = [torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.half) for _ in range(4)]
    with torch.inference_mode():
        expected = [g(x) for x in xs]
        torch.cuda.synchronize()
        streams = [torch.cuda.Stream() for _ in xs]
        outs = [None] * len(xs)
        for i, (s, x) in enumerate(zip(streams, xs)):
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(5):
                    outs[i] = g(x)
        torch.cuda.synchronize()
    for o, e in zip(outs, expected):
        assert torch.equal(o, e)


@needs_cuda
def test_cuda_graph_wrapper(cifar):
    model, fused = cifar
    g = resnet_fused.cuda_graph(copy.deepcopy(fused).cuda().half(), max_graphs=2)
    plain = copy.deepcopy(fused).cuda().half()
    with torch.inference_mode():
        for shape in [(1, 3, 32, 32), (4, 3, 32, 32), (1, 3, 32, 32), (2, 3, 24, 24)]:
            x = torch.randn(*shape, device="cuda", dtype=torch.half)
            first = g(x)
            second = g(torch.randn_like(x))  # must not overwrite `first`
            assert torch.equal(first, plain(x))
            assert not torch.equal(first, second)
    assert len(g.captured_shapes()) == 2
    cpu_out = resnet_fused.cuda_graph(fused)(torch.randn(1, 3, 32, 32))  # CPU: plain path
    assert cpu_out.shape == (1, 10)


def test_cuda_graph_on_cpu_is_plain(cifar):
    _, fused = cifar
    g = resnet_fused.cuda_graph(fused)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(g(x), fused(x))
    assert g.captured_shapes() == []


def test_threads_share_one_fused_model_op_level():
    x, w, b, r, kw = make_inputs(2, 16, 16, 3, 1, 12, residual=True)
    expected = ops.conv2d_bias_act(x, w, b, r, relu=True, **kw)
    errors = []

    def work():
        try:
            for _ in range(50):
                assert torch.equal(ops.conv2d_bias_act(x, w, b, r, relu=True, **kw), expected)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "n,c,k,h,w,kernel,stride,padding,dilation,groups,channels_last",
    [
        (1, 3, 3, 1, 5, 3, 2, 3, 2, 1, False),  # eager bf16 conv2d segfaults here (oneDNN, torch 2.13)
        (2, 2, 8, 5, 1, 1, 2, 1, 2, 2, True),
        (3, 4, 6, 12, 1, 1, 2, 1, 2, 2, True),
        (2, 10, 10, 5, 1, 1, 3, 2, 2, 2, True),
    ],
)
def test_dilated_strided_shapes_do_not_crash(dtype, n, c, k, h, w, kernel, stride, padding, dilation, groups,
                                             channels_last):
    """oneDNN crashes the process on some dilated and strided convs with tiny sizes; the op
    computes those as a stride-1 conv subsampled, and matches a float64 reference."""
    x, wt, b, r, kw = make_inputs(n, c, k, kernel, stride, h, w, groups=groups, dtype=dtype, residual=True,
                                  channels_last=channels_last, dilation=dilation, padding=padding)
    out = ops.conv2d_bias_act(x, wt, b, r, relu=True, assume_finite=True, **kw)
    ref = reference(x, wt, b, r, True, dtype=torch.float64, **kw)
    with torch.backends.mkldnn.flags(enabled=False):  # eager's own answer, on a path that does not crash
        eager = eager_results(x, wt, b, r, True, kw)
    assert_accuracy_rule(out, eager, ref, magnitude=magnitude(x, wt, b, r, **kw))
    buf = r.clone()
    ops.conv2d_bias_act_(buf, x, wt, b, relu=True, assume_finite=True, **kw)
    assert_accuracy_rule(buf, eager, ref, magnitude=magnitude(x, wt, b, r, **kw))
