"""The CPU grouped-convolution kernel (csrc/cpu/grouped_conv.cpp): ResNeXt's grouped 3x3s and the
edges of each of its inner loops against float64 and eager under the accuracy rule, in place, NaN
and Inf, bad input, and where a fused model runs it; its AVX2 kernel too on an AVX-512 machine. It
needs AVX2 and FMA or AVX-512; elsewhere it says so."""

import copy
import os
import subprocess
import sys

import pytest
import torch

import resnet_fused
from resnet_fused import tactics
from resnet_fused.modules import FusedConv2d

from conftest import assert_accuracy_rule
from test_ops import eager_results, magnitude, make_inputs, reference

ops = torch.ops.resnet_fused
WHY = ops.grouped_conv_unsupported(128, 128, 32)
needs_kernel = pytest.mark.skipif(WHY != "", reason=f"the grouped kernel cannot run here: {WHY}")
pytestmark = needs_kernel


def run(x, w, b, res, relu, kw, inplace=False):
    packed = ops.grouped_prepack(w, kw["groups"])
    if inplace:
        buf = res.clone()
        ops.grouped_conv2d_bias_act_(buf, x, packed, b, kw["stride"], kw["padding"], kw["groups"], relu)
        return buf
    return ops.grouped_conv2d_bias_act(x, packed, b, res, kw["stride"], kw["padding"], kw["groups"], relu)


def check(x, w, b, res, relu, kw, what):
    out = run(x, w, b, res, relu, kw)
    ref = reference(x, w, b, res, relu, dtype=torch.float64, **kw)
    assert_accuracy_rule(out, eager_results(x, w, b, res, relu, kw), ref, what=what,
                         magnitude=magnitude(x, w, b, res, **kw))
    assert out.is_contiguous(memory_format=torch.channels_last)
    return out


# ResNeXt-50 32x4d's grouped 3x3s (C, stride, H) at reduced size: groups of 4 and 8 channels take
# the shuffle loops, of 16 and 32 the broadcast loop.
RESNEXT50 = [(128, 1, 9), (256, 2, 9), (256, 1, 7), (512, 2, 7), (512, 1, 6), (1024, 2, 6), (1024, 1, 5)]


@pytest.mark.parametrize("shape", RESNEXT50, ids=lambda s: "C{}s{}H{}".format(*s))
@pytest.mark.parametrize("n", [1, 3])
def test_resnext50_shapes(shape, n):
    c, s, h = shape
    x, w, b, res, kw = make_inputs(n, c, c, 3, s, h, h + 3, groups=32, channels_last=True)
    check(x, w, b, res, True, kw, what=f"{shape} batch {n}")


@pytest.mark.parametrize(
    "c,k,groups,kernel,stride,h,w,padding",
    [
        (16, 16, 4, 3, 1, 1, 1, 1),     # a 1x1 map: every tap but the centre reads zeros
        (32, 32, 8, 3, 1, 13, 4, 1),    # 4-channel groups, a row shorter than a tile
        (64, 64, 8, 3, 2, 17, 19, 1),   # 8-channel groups, strided, odd, tiles of 8 with a remainder
        (96, 96, 12, 3, 1, 5, 11, 1),   # 8-channel groups, channels not a multiple of 32
        (48, 96, 3, 3, 1, 6, 9, 1),     # groups of 16 in, 32 out (broadcast loop)
        (64, 32, 2, 3, 2, 7, 7, 1),     # groups of 32 in, 16 out
        (32, 64, 2, 5, 1, 9, 10, 2),    # a 5x5 filter
        (64, 64, 4, 1, 1, 6, 6, 0),     # a grouped 1x1
        (16, 16, 4, 3, 1, 4, 5, 0),     # no padding
    ],
)
@pytest.mark.parametrize("residual,relu,bias", [(False, True, True), (True, True, True), (True, False, False)])
def test_edges(c, k, groups, kernel, stride, h, w, padding, residual, relu, bias):
    x, wt, b, res, kw = make_inputs(2, c, k, kernel, stride, h, w, groups=groups, residual=residual, bias=bias,
                                    channels_last=True, padding=padding)
    check(x, wt, b, res, relu, kw, what=f"C{c} K{k} g{groups} {kernel}x{kernel}/{stride} {h}x{w} p{padding}")


def test_the_avx2_kernel_on_this_cpu():
    """On an AVX-512 machine, the AVX2 kernel (RESNET_FUSED_CPU_ISA=avx2, which AVX2-only CPUs run)
    against float64 and eager on each inner loop: groups of 4, 8, 16 and 32, strided, a remainder tile."""
    if ops.gemm_isa() != "avx512":
        pytest.skip("this CPU runs the AVX2 kernel (or none) by default: the tests above cover it")
    code = (
        "import torch; from test_grouped_conv import check; from test_ops import make_inputs;"
        "[check(*make_inputs(2, c, c, 3, s, h, h + 3, groups=g, residual=True, channels_last=True)[:4], True,"
        "       make_inputs(2, c, c, 3, s, h, h + 3, groups=g, residual=True, channels_last=True)[4], 'avx2')"
        " for c, g, s, h in [(128, 32, 1, 9), (256, 32, 2, 9), (512, 32, 1, 6), (1024, 32, 2, 6), (48, 3, 1, 5)]];"
        "print('ok')"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, RESNET_FUSED_CPU_ISA="avx2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.path.dirname(os.path.dirname(resnet_fused.__file__))
                                                    if resnet_fused.__file__ else None) if p)
    done = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("c,groups", [(128, 32), (256, 32), (512, 32)])
def test_in_place_matches_out_of_place(c, groups):
    x, w, b, res, kw = make_inputs(2, c, c, 3, 1, 6, 7, groups=groups, residual=True, channels_last=True)
    expected = run(x, w, b, res, True, kw)
    assert torch.equal(run(x, w, b, res, True, kw, inplace=True), expected)


def test_nan_and_inf_propagate_like_eager():
    x, w, b, res, kw = make_inputs(1, 64, 64, 3, 1, 6, 6, groups=16, residual=True, channels_last=True)
    x[0, 3, 2, 2] = float("nan")
    x[0, 40, 4, 1] = float("inf")
    res[0, 7, 0, 0] = float("-inf")
    out = run(x, w, b, res, True, kw)
    ref = reference(x, w, b, res, True, dtype=torch.float64, **kw)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert out.isnan().any() and out.isinf().any()


@pytest.mark.parametrize(
    "c,k,groups,match",
    [(16, 16, 8, "groups of 4 or 8 channels"), (32, 64, 8, "groups of 4 or 8 channels"),
     (30, 30, 4, "not divisible by the groups"), (8, 8, 2, "multiple of 16"), (40, 40, 5, "multiple of 16")],
)
def test_layers_it_does_not_take_are_refused(c, k, groups, match):
    assert match in ops.grouped_conv_unsupported(c, k, groups)
    w = torch.randn(k, max(c // groups, 1), 3, 3)
    with pytest.raises(ValueError, match=match):
        ops.grouped_prepack(w, groups)


def test_bad_input_gets_clear_errors():
    x, w, b, res, kw = make_inputs(1, 64, 64, 3, 1, 5, 5, groups=16, residual=True, channels_last=True)
    packed = ops.grouped_prepack(w, 16)
    with pytest.raises(ValueError, match="takes the weight from grouped_prepack"):
        ops.grouped_conv2d_bias_act(x, w, b, None, [1, 1], [1, 1], 16, True)
    with pytest.raises(TypeError, match="float32"):
        ops.grouped_conv2d_bias_act(x.double(), packed, b, None, [1, 1], [1, 1], 16, True)
    with pytest.raises(ValueError, match="input"):
        ops.grouped_conv2d_bias_act(x[:, :32], packed, b, None, [1, 1], [1, 1], 16, True)
    with pytest.raises(ValueError, match="residual"):
        ops.grouped_conv2d_bias_act(x, packed, b, res[:, :, :3], [1, 1], [1, 1], 16, True)


def test_opcheck():
    x, w, b, r, kw = make_inputs(2, 32, 32, 3, 2, 7, groups=4, residual=True, channels_last=True)
    p = ops.grouped_prepack(w, 4)
    torch.library.opcheck(ops.grouped_prepack.default, (w, 4))
    torch.library.opcheck(ops.grouped_conv2d_bias_act.default, (x, p, b, r, [2, 2], [1, 1], 4, True))
    torch.library.opcheck(ops.grouped_conv2d_bias_act_.default, (r.clone(), x, p, b, [2, 2], [1, 1], 4, True))


@pytest.mark.parametrize("tune", [False, True], ids=["rules", "tuned"])
def test_a_fused_resnext_runs_it_within_the_accuracy_rule(tune, tmp_path, monkeypatch):
    """fuse() on a ResNeXt: by the rules its grouped 3x3s run this kernel on AVX-512 CPUs and oneDNN
    elsewhere (tactics.Grouped.rule); measured, each runs the faster of the two; either way the
    model keeps the accuracy rule against float64."""
    from test_fuse import torchvision_model  # skips without torchvision

    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path))
    model = torchvision_model("resnext50_32x4d")
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    fused = resnet_fused.fuse(model, tune=tune)
    with torch.inference_mode():
        fused(x)
        paths = {name: m._path(inp) for name, m, inp in _layer_inputs(fused, x) if m.groups > 1}
    assert len(paths) == 16
    if tune:
        assert set(paths.values()) <= {tactics.GROUPED, ""}, paths
        assert {t["layer"] for t in fused.fuse_report.tactics} >= set(paths)
    else:
        assert set(paths.values()) == {tactics.GROUPED if ops.gemm_isa() == "avx512" else ""}, paths
    with torch.inference_mode():
        out = fused(x)
        ref = copy.deepcopy(model).double()(x.double())
        eagers = [model(x.contiguous()), copy.deepcopy(model).to(memory_format=torch.channels_last)(x)]
    assert_accuracy_rule(out, eagers, ref, what=f"resnext50_32x4d tune={tune}")


def _layer_inputs(fused, x):
    """(name, layer, its input) for every FusedConv2d of one forward."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.append((n, m, a[0])))
             for n, m in fused.named_modules() if isinstance(m, FusedConv2d)]
    try:
        fused(x)
    finally:
        for h in hooks:
            h.remove()
    return seen
