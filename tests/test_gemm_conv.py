"""The CPU matrix-product convolution kernel (csrc/cpu/gemm_conv.cpp, gemm_kernels.cpp): the op
against float64 and eager, on a plain and on a packed weight, on every register-tile kernel the
CPU has, in place, its edges and bad-input errors, and where FusedConv2d uses it."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import resnet_fused
from resnet_fused import tactics
from resnet_fused.modules import FusedConv2d

from conftest import assert_accuracy_rule, gemm_rule_runs_1x1s, randomize_bn
from test_ops import eager_results, magnitude, make_inputs, reference

ops = torch.ops.resnet_fused

# ResNet-50's 1x1s (C, K, H, stride), its stem, a stride-2 3x3; and edges: odd sizes, one
# channel, padding on a 1x1, a kernel wider than the padded image is not (valid shapes only).
RESNET50_1X1 = [(64, 256, 14, 1), (256, 64, 14, 1), (128, 512, 7, 1), (512, 128, 7, 1), (256, 512, 14, 2),
                (1024, 256, 5, 1), (512, 2048, 3, 1), (2048, 512, 3, 1)]
OTHER = [(3, 64, 23, 2, 7, 3), (32, 32, 9, 2, 3, 1), (1, 1, 1, 1, 1, 0), (5, 7, 6, 3, 3, 0), (9, 17, 5, 1, 1, 1),
         (4, 6, 8, 1, 5, 2)]


def check(x, w, b, res, relu, kw, what):
    """The op on the plain weight and on its packed panels: both within the accuracy rule, and
    the same values (one kernel; the plain weight is packed on the call)."""
    out = ops.gemm_conv2d_bias_act(x, w, b, res, kw["stride"], kw["padding"], relu)
    ref = reference(x, w, b, res, relu, dtype=torch.float64, **kw)
    assert_accuracy_rule(out, eager_results(x, w, b, res, relu, kw), ref, what=what,
                         magnitude=magnitude(x, w, b, res, **kw))
    assert out.is_contiguous(memory_format=torch.channels_last)
    packed = ops.gemm_prepack(w)
    again = ops.gemm_conv2d_bias_act(x, packed, b, res, kw["stride"], kw["padding"], relu, w.shape[0])
    assert torch.equal(again, out), what
    return out


@pytest.mark.parametrize("shape", RESNET50_1X1, ids=lambda s: "C{}K{}H{}s{}".format(*s))
@pytest.mark.parametrize("residual,relu,bias", [(False, True, True), (True, True, True), (False, False, False),
                                                (True, False, True)])
def test_1x1_against_float64(shape, residual, relu, bias):
    c, k, h, s = shape
    x, w, b, res, kw = make_inputs(2, c, k, 1, s, h, residual=residual, bias=bias, channels_last=True)
    check(x, w, b, res, relu, kw, what=f"{shape} res={residual} relu={relu} bias={bias}")


@pytest.mark.parametrize("shape", OTHER, ids=lambda s: "C{}K{}H{}s{}k{}p{}".format(*s))
@pytest.mark.parametrize("residual", [False, True])
def test_other_kernels_against_float64(shape, residual):
    """Kernels larger than 1x1 build their im2col rows (zeros where the window leaves the image)."""
    c, k, h, s, kernel, p = shape
    x, w, b, res, kw = make_inputs(2, c, k, kernel, s, h, residual=residual, channels_last=True, padding=p)
    check(x, w, b, res, True, kw, what=f"{shape} res={residual}")


def test_odd_sizes_and_long_reductions():
    """Output channels that leave a partial panel (33, 100), rows that leave a partial register
    tile, reductions cut in chunks (1152, 2304: the ReLU only after the last chunk, so partial
    sums may be negative on the way), with and without a residual."""
    for n, c, k, kernel, h in [(1, 40, 33, 1, 5), (1, 1152, 100, 1, 3), (2, 256, 70, 3, 4), (1, 2304, 64, 1, 2)]:
        for residual in (False, True):
            x, w, b, res, kw = make_inputs(n, c, k, kernel, 1, h, residual=residual, channels_last=True,
                                           padding=kernel // 2)
            check(x, w, b, res, True, kw, what=f"{(n, c, k, kernel, h)} res={residual}")


def test_prepack_round_trip():
    """gemm_unpack(gemm_prepack(w)) gives w back exactly, in channels-last; panels past the last
    output channel hold zeros."""
    w = torch.randn(40, 24, 3, 3)
    packed = ops.gemm_prepack(w)
    assert packed.shape == (2, 3, 3, 24, 32)
    assert torch.equal(packed[1, ..., 8:], torch.zeros(3, 3, 24, 24))
    back = ops.gemm_unpack(packed, 40)
    assert torch.equal(back, w) and back.is_contiguous(memory_format=torch.channels_last)


def test_every_kernel_of_this_cpu():
    """The narrower register-tile kernels (RESNET_FUSED_CPU_ISA) give answers within the rule too:
    an AVX-512 machine checks its AVX2 and plain C++ kernels, which other CPUs run."""
    isa = ops.gemm_isa()
    narrower = {"avx512": ["avx2", "generic"], "avx2": ["generic"], "generic": []}[isa]
    code = (
        "import os, torch, resnet_fused;"
        "from test_gemm_conv import check; from test_ops import make_inputs;"
        "assert torch.ops.resnet_fused.gemm_isa() == os.environ['RESNET_FUSED_CPU_ISA'];"
        "[check(*make_inputs(n, c, k, kk, s, h, residual=True, channels_last=True, padding=kk // 2)[:4], True,"
        "       make_inputs(n, c, k, kk, s, h, residual=True, channels_last=True, padding=kk // 2)[4], 'isa')"
        " for n, c, k, kk, s, h in [(2, 128, 96, 3, 2, 11), (1, 1024, 100, 1, 1, 5), (3, 16, 7, 1, 1, 3)]];"
        "print('ok')"
    )
    # (run from tests/: resnet_fused is imported as this process imports it, installed or on
    # PYTHONPATH, never the source folder without its compiled kernels)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in narrower:
        env = dict(os.environ, RESNET_FUSED_CPU_ISA=name)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.path.dirname(os.path.dirname(resnet_fused.__file__))
                                                        if resnet_fused.__file__ else None) if p)
        done = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True)
        assert done.returncode == 0 and "ok" in done.stdout, (name, done.stderr[-2000:])


def test_many_blocks_and_split_channels():
    """Enough pixels for many blocks of rows (batch 8 at 28x28), and too few for the threads
    (batch 1 at 3x3: the output channels are split instead): both against float64."""
    for n, h in [(8, 28), (1, 3)]:
        x, w, b, res, kw = make_inputs(n, 128, 96, 1, 1, h, residual=True, channels_last=True)
        check(x, w, b, res, True, kw, what=f"n={n} h={h}")


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("n,c,k,h,kernel", [(1, 512, 512, 7, 3), (8, 2048, 512, 7, 1), (1, 1024, 256, 14, 1),
                                            (1, 256, 96, 7, 3)])
def test_cuts_that_do_not_divide_among_the_threads(n, c, k, h, kernel, threads):
    """Where the row blocks and panel groups would not divide among the threads (49 rows are 5
    tiles: 3 on one thread, 2 on the other), the work is cut smaller (gemm_conv.cpp, balance):
    every row and output channel still computed once, against float64, in place too."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, b, res, kw = make_inputs(n, c, k, kernel, 1, h, residual=True, channels_last=True, padding=kernel // 2)
        out = check(x, w, b, res, True, kw, what=f"n={n} c={c} k={k} h={h} {kernel}x{kernel} threads={threads}")
        into = res.clone()
        ops.gemm_conv2d_bias_act_(into, x, ops.gemm_prepack(w), b, kw["stride"], kw["padding"], True, k)
        assert torch.equal(into, out)
    finally:
        torch.set_num_threads(before)


def test_nchw_and_rectangular_inputs():
    x, w, b, res, kw = make_inputs(3, 12, 10, 1, 2, 9, w=14, residual=True, channels_last=False)
    check(x, w, b, res, True, kw, what="nchw 9x14")


@pytest.mark.parametrize("c", [128, 1024])
def test_in_place_into_the_residual(c):
    x, w, b, res, kw = make_inputs(2, c, 256, 1, 1, 10, residual=True, channels_last=True)
    expect = ops.gemm_conv2d_bias_act(x, w, b, res, kw["stride"], kw["padding"], True)
    buf = res.clone()
    ptr = buf.data_ptr()
    ops.gemm_conv2d_bias_act_(buf, x, w, b, kw["stride"], kw["padding"], True)
    assert buf.data_ptr() == ptr
    # (accumulating into the residual sums in another order than conv + bias + residual)
    torch.testing.assert_close(buf, expect, rtol=1e-6, atol=1e-6)
    ref = reference(x, w, b, res, True, dtype=torch.float64, **kw)
    assert_accuracy_rule(buf, eager_results(x, w, b, res, True, kw), ref, what="in place",
                         magnitude=magnitude(x, w, b, res, **kw))
    packed = res.clone()
    ops.gemm_conv2d_bias_act_(packed, x, ops.gemm_prepack(w), b, kw["stride"], kw["padding"], True, 256)
    assert torch.equal(packed, buf)  # (one kernel: the plain weight is packed on the call)


def test_in_place_when_the_residual_is_the_input():
    """out = act(conv(x) + x) written over x: a block's rows are read while others are written,
    so the op computes out of place first."""
    x, w, b, _, kw = make_inputs(1, 16, 16, 1, 1, 8, channels_last=True)
    expect = ops.gemm_conv2d_bias_act(x, w, b, x, [1, 1], [0, 0], True)
    ops.gemm_conv2d_bias_act_(x, x, w, b, [1, 1], [0, 0], True)
    torch.testing.assert_close(x, expect, rtol=0, atol=0)


def test_in_place_into_an_nchw_residual():
    x, w, b, res, kw = make_inputs(2, 16, 8, 1, 1, 5, residual=True, channels_last=True)
    expect = ops.gemm_conv2d_bias_act(x, w, b, res, [1, 1], [0, 0], False)
    buf = res.contiguous()
    ops.gemm_conv2d_bias_act_(buf, x, w, b, [1, 1], [0, 0], False)
    torch.testing.assert_close(buf, expect, rtol=1e-6, atol=1e-6)


def test_empty():
    out = ops.gemm_conv2d_bias_act(torch.randn(0, 8, 5, 5), torch.randn(4, 8, 1, 1), None, None, [1, 1], [0, 0], True)
    assert out.shape == (0, 4, 5, 5)
    # no input channels: the convolution is zero, the epilogue still applies
    b = torch.tensor([-1.0, 2.0])
    out = ops.gemm_conv2d_bias_act(torch.randn(1, 0, 3, 3), torch.randn(2, 0, 1, 1), b, None, [1, 1], [0, 0], True)
    torch.testing.assert_close(out, torch.relu(b).view(1, 2, 1, 1).expand(1, 2, 3, 3))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_values_as_eager(bad):
    """NaN and Inf come out where eager's convolution puts them (the epilogue is torch.relu's:
    NaN stays NaN)."""
    x, w, b, res, kw = make_inputs(1, 128, 64, 1, 1, 6, residual=True, channels_last=True)
    x[0, 5, 2, 3] = bad
    w[7, 3, 0, 0] = 0.0
    out = ops.gemm_conv2d_bias_act(x, w, b, res, [1, 1], [0, 0], True)
    want = reference(x, w, b, res, True, **kw)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())


@pytest.mark.parametrize("case,exc,match", [
    ("bf16 input", TypeError, "float32 only"),
    ("groups", ValueError, "channels"),
    ("bias shape", ValueError, "bias"),
    ("residual shape", ValueError, "residual"),
    ("3-d input", ValueError, "input must have 4 dimensions"),
    ("packed weight", ValueError, "mkldnn"),
    ("stride", ValueError, "stride"),
    ("panels without out_channels", ValueError, "needs out_channels"),
    ("panels for other channels", ValueError, "packed weight for 40 output channels"),
    ("out_channels disagree", ValueError, "out_channels=5"),
    ("isa env", ValueError, "RESNET_FUSED_CPU_ISA"),
])
def test_bad_input(case, exc, match):
    x = torch.randn(1, 8, 6, 6)
    w = torch.randn(4, 8, 1, 1)
    b, r, stride = None, None, [1, 1]
    if case == "bf16 input":
        x, w = x.bfloat16(), w.bfloat16()
    elif case == "groups":
        w = torch.randn(4, 4, 1, 1)
    elif case == "bias shape":
        b = torch.randn(5)
    elif case == "residual shape":
        r = torch.randn(1, 4, 5, 6)
    elif case == "3-d input":
        x = x[0]
    elif case == "packed weight":
        if not torch.backends.mkldnn.is_available():
            pytest.skip("needs oneDNN")
        w = w.to_mkldnn()
    elif case == "stride":
        stride = [0, 1]
    elif case == "isa env":
        # (checked where the kernel is first chosen: in a fresh process)
        env = dict(os.environ, RESNET_FUSED_CPU_ISA="sse9")
        done = subprocess.run([sys.executable, "-c", "import torch, resnet_fused; torch.ops.resnet_fused.gemm_isa()"],
                              env=env, capture_output=True, text=True)
        assert done.returncode != 0 and "RESNET_FUSED_CPU_ISA must be avx512, avx2 or generic" in done.stderr
        return
    out_channels = -1
    if case.startswith("panels") or case == "out_channels disagree":
        w = ops.gemm_prepack(w) if case.startswith("panels") else w
        out_channels = {"panels without out_channels": -1, "panels for other channels": 40,
                        "out_channels disagree": 5}[case]
    with pytest.raises(exc, match=match):
        ops.gemm_conv2d_bias_act(x, w, b, r, stride, [0, 0], True, out_channels)


def test_opcheck():
    x, w, b, r, kw = make_inputs(2, 8, 6, 1, 2, 7, residual=True, channels_last=True)
    torch.library.opcheck(ops.gemm_conv2d_bias_act.default, (x, w, b, r, [2, 2], [0, 0], True))
    torch.library.opcheck(ops.gemm_conv2d_bias_act_.default, (r.clone(), x, w, b, [2, 2], [0, 0], True))
    p = ops.gemm_prepack(w)
    torch.library.opcheck(ops.gemm_conv2d_bias_act.default, (x, p, b, r, [2, 2], [0, 0], True, 6))
    torch.library.opcheck(ops.gemm_prepack.default, (w,))
    torch.library.opcheck(ops.gemm_unpack.default, (p, 6))


# --- where FusedConv2d uses it ----------------------------------------------------------------
def layer(c, k, kernel=1, stride=1):
    conv = nn.Conv2d(c, k, kernel, stride, kernel // 2, bias=True)
    return FusedConv2d.from_conv(conv, conv.weight.detach(), conv.bias.detach(), conv.padding, folded_bn=False)


@pytest.fixture
def gemm_rule_any_isa(monkeypatch):
    """The rule picks our kernel for every unpadded 1x1 whatever the CPU's ISA (it does so on
    AVX-512 and AVX2 only): the tests of the packed master's life then run on other CPUs too."""
    monkeypatch.setattr(tactics.Gemm, "rule", lambda self, layer, x: tuple(layer.kernel_size) == (1, 1)
                        and list(layer.padding) == [0, 0])


def path(m, x):
    with torch.inference_mode():
        m(x, assume_finite=True)
    return m._cache[m._cache_key(x)][2]


@pytest.mark.parametrize("n,c,k,h,stride,kernel", [
    (1, 256, 64, 56, 1, 1), (1, 128, 512, 28, 1, 1), (1, 256, 512, 56, 2, 1), (8, 256, 1024, 14, 1, 1),
    (1, 1024, 2048, 14, 2, 1), (8, 64, 256, 56, 1, 1), (1, 3, 64, 32, 2, 7), (1, 128, 128, 28, 2, 3),
])
def test_which_layers(n, c, k, h, stride, kernel):
    """The rule (tune=False): every 1x1 without padding, on AVX-512 and AVX2 CPUs."""
    x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
    expected = kernel == 1 and gemm_rule_runs_1x1s()
    assert (path(layer(c, k, kernel, stride=stride), x) == "gemm") == expected


@pytest.mark.parametrize("why", ["nchw input", "bf16", "switched off", "no prepack"])
def test_not_used(why):
    m = layer(128, 128)
    x = torch.randn(1, 128, 32, 32)
    if why != "nchw input":
        x = x.contiguous(memory_format=torch.channels_last)
    if why == "bf16":
        m, x = m.bfloat16(), x.bfloat16()
    if why == "switched off":
        m.gemm = False
    if why == "no prepack":
        m.prepack = False
    assert path(m, x) != "gemm"


def test_packed_master_and_another_regime(gemm_rule_any_isa):
    """The packed panels replace the plain master (the model keeps one copy of its weights);
    state_dict, deepcopy and .to() give the plain weight back exactly; a regime that runs oneDNN
    (the rule switched off for it) gets its own packed copy, and both give the same answers."""
    m = layer(256, 64)
    plain = m.weight.detach().clone()
    big = torch.randn(1, 256, 28, 28).contiguous(memory_format=torch.channels_last)
    small = torch.randn(1, 256, 7, 7).contiguous(memory_format=torch.channels_last)
    assert path(m, big) == "gemm"
    assert m._cache[m._cache_key(big)][0] is m.weight and m.weight.dim() == 5
    assert torch.equal(m.state_dict()["weight"], plain)
    assert torch.equal(copy.deepcopy(m).weight, plain)
    with torch.inference_mode():
        y1 = m(big, assume_finite=True)
        m.gemm = False
        assert path(m, small) == ""
        assert m.weight.dim() == 5  # (the oneDNN regime packed a copy)
        m.gemm = True
        y2 = m(big, assume_finite=True)
        assert path(m, big) == "gemm"
    assert torch.equal(y1, y2)
    m.to(torch.float32)
    assert m.weight.dim() == 4 and torch.equal(m.weight, plain)


def test_float64_master_computing_in_float32(gemm_rule_any_isa):
    """A float64 model keeps float64 masters; cast to float32, the gemm layer gets a float32 weight."""
    conv = nn.Conv2d(128, 64, 1).double()
    m = FusedConv2d.from_conv(conv, conv.weight.detach(), conv.bias.detach(), conv.padding, folded_bn=False).float()
    x = torch.randn(1, 128, 28, 28).contiguous(memory_format=torch.channels_last)
    assert path(m, x) == "gemm" and m.weight.dtype == torch.float64
    with torch.inference_mode():
        out = m(x)
    ref = torch.nn.functional.conv2d(x.double(), conv.weight, conv.bias)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


class Bottleneck(nn.Module):
    def __init__(self, c=256, mid=128):
        super().__init__()
        self.conv1 = nn.Conv2d(c, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def test_fused_model_uses_it_in_place_and_keeps_the_rule(gemm_rule_any_isa):
    # (two blocks: the second's shortcut is an intermediate, which the fused model writes into)
    model = randomize_bn(nn.Sequential(Bottleneck(), Bottleneck())).eval()
    x = torch.randn(2, 256, 20, 20)
    fused = resnet_fused.fuse(model, tune=False)
    onednn = resnet_fused.fuse(model, gemm=False, tune=False)
    with torch.inference_mode():
        out, out_onednn = fused(x), onednn(x)
        eager = [model(x), copy.deepcopy(model).to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))]
        ref = model.double()(x.double())
    convs = [m for m in fused.modules() if isinstance(m, FusedConv2d)]
    assert len(convs) == 4 and all(v[2] == "gemm" for m in convs for v in m._cache.values())
    assert any(m.inplace_residual for m in convs)
    assert not any(v[2] == "gemm" for m in onednn.modules() if isinstance(m, FusedConv2d) for v in m._cache.values())
    assert_accuracy_rule(out, eager, ref, what="gemm block")
    assert_accuracy_rule(out_onednn, eager, ref, what="oneDNN block")


def test_the_last_calls_answer_follows_every_change():
    """A layer keeps its last call's weights and kernel apart (_memo_key) for speed: whatever that
    answer depends on (the input's shape and layout, threads, the switches, an in-place edit of
    the weight or bias, a new weight tensor or storage, a reload) gives a fresh answer."""
    m = layer(64, 64)
    x = torch.randn(1, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    ref = lambda: torch.nn.functional.conv2d(x, m.dense_weight(), m.bias)  # noqa: E731

    def run():
        with torch.inference_mode():
            out = m(x, assume_finite=True)
        torch.testing.assert_close(out, ref(), rtol=1e-4, atol=1e-4)
        return m._cache[m._cache_key(x)][2]

    assert run() == ("gemm" if gemm_rule_runs_1x1s() else "")
    m.gemm = False
    assert run() == ""
    m.gemm = True
    run()
    with torch.no_grad():
        m.bias.add_(1.0)  # in place: the version counter moves
    run()
    plain = m.dense_weight().clone()
    m.load_state_dict({"weight": plain * 2, "bias": m.bias.detach().clone()})
    run()
    if m.weight.is_mkldnn:  # (oneDNN's packed master, off AVX-512: .data takes a tensor of its kind only)
        m.unpack()
    m.weight.data = m.dense_weight() * 0.5  # new storage under the same Parameter
    run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run()
    finally:
        torch.set_num_threads(threads)
    x = x.contiguous()  # NCHW: the same shape, other strides
    run()
    assert copy.deepcopy(m)._memo is None
    # A Winograd layer runs a transform of its plain master: new storage under the master (its
    # version counter unchanged) must reach it.
    m = layer(64, 64, kernel=3)
    x = x.contiguous(memory_format=torch.channels_last)
    ref = lambda: torch.nn.functional.conv2d(x, m.dense_weight(), m.bias, padding=1)  # noqa: E731
    assert run() == "winograd"
    m.weight.data = m.dense_weight() * 0.5
    assert run() == "winograd"
