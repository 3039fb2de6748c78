"""FusedLinear: nn.Linear on our matrix-product kernel on CPU float32 (AVX-512), F.linear
elsewhere; one copy of the weight, given back plain by state_dict, pickling and deepcopy."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from resnet_fused import tactics
from resnet_fused.modules import FusedLinear

from conftest import assert_accuracy_rule

fast = pytest.mark.skipif(tactics._gemm_isa() != "avx512", reason="FusedLinear's kernel path is for AVX-512 CPUs")


def make(c=200, k=70, bias=True):
    torch.manual_seed(0)
    return nn.Linear(c, k, bias=bias).eval()


def spy(monkeypatch):
    calls = []
    real = torch.ops.resnet_fused.gemm_conv2d_bias_act.default
    monkeypatch.setattr(torch.ops.resnet_fused.gemm_conv2d_bias_act, "default",
                        lambda *a: calls.append(1) or real(*a))
    return calls


@fast
@pytest.mark.parametrize("shape", [(1, 200), (8, 200), (13, 200), (200,), (2, 3, 200)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_against_float64(shape, bias, monkeypatch):
    lin = make(bias=bias)
    fl = FusedLinear.from_linear(lin)
    calls = spy(monkeypatch)
    x = torch.randn(shape)
    with torch.inference_mode():
        out = fl(x)
        ref = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
        assert_accuracy_rule(out, lin(x), ref, what=f"linear {shape}",
                             magnitude=F.linear(x.double().abs(), lin.weight.double().abs(),
                                                None if lin.bias is None else lin.bias.double().abs()))
    assert out.shape == (*shape[:-1], 70) and calls == [1]
    assert fl.weight.dim() == 5  # packed: the panels replaced the plain weight


@fast
def test_one_copy_given_back_plain(monkeypatch):
    lin = make()
    fl = FusedLinear.from_linear(lin)
    x = torch.randn(4, 200)
    with torch.inference_mode():
        out = fl(x)
    assert fl.weight.dim() == 5
    sd = fl.state_dict()
    assert torch.equal(sd["weight"], lin.weight) and sd["weight"].shape == (70, 200)
    for other in (copy.deepcopy(fl), torch.load(_saved(fl), weights_only=False)):
        assert other.weight.shape == (70, 200) and torch.equal(other.weight, lin.weight)
        with torch.inference_mode():
            assert torch.equal(other(x), out)
    fresh = FusedLinear.from_linear(make())
    with torch.no_grad():
        fresh.weight.zero_()
    fresh.load_state_dict(sd)
    with torch.inference_mode():
        assert torch.equal(fresh(x), out)


def _saved(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return buf


def test_other_regimes_take_f_linear(monkeypatch):
    lin = make()
    fl = FusedLinear.from_linear(lin)
    calls = spy(monkeypatch)
    x = torch.randn(3, 200)
    with torch.inference_mode():
        fl.gemm = False
        assert torch.equal(fl(x), lin(x))
        fl.gemm = True
        assert torch.equal(fl.double()(x.double()), lin.double()(x.double()))
    assert calls == []
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        fl.float()(torch.randn(3, 199))


def test_fuse_swaps_the_classifier_and_respects_the_switches():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    assert isinstance(resnet_fused.fuse(model).fc, FusedLinear)
    assert ("fc", "linear") in resnet_fused.fuse(model).fuse_report.fused
    assert resnet_fused.fuse(model, gemm=False).fc.gemm is False
    assert type(resnet_fused.fuse(model, prepack=False).fc) is nn.Linear
    assert type(resnet_fused.fuse(model.half()).fc) is nn.Linear


@fast
def test_export_after_the_weight_was_packed():
    torchvision = pytest.importorskip("torchvision")
    from resnet_fused.modules import FusedConv2d

    model = torchvision.models.resnet18().eval()
    fused = resnet_fused.fuse(model, tune=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        fused(x)
    assert fused.fc.weight.dim() == 5
    for m in fused.modules():
        if isinstance(m, FusedConv2d):
            m.unpack()
    with pytest.raises(RuntimeError, match="FusedLinear holds its weight packed"):
        torch.jit.trace(fused, x, check_trace=False)
    traced = resnet_fused.trace(fused, x)
    assert fused.fc.weight.dim() == 2
    with torch.inference_mode():
        ref = copy.deepcopy(model).double()(x.double())
        assert_accuracy_rule(traced(x), model(x), ref, what="traced resnet18")
