"""FusedDual: a bottleneck's last 1x1 with its downsample 1x1 as its residual. fuse() pairs them; on
CUDA (float16/bfloat16) the tactics time the pair as two layers against our dual kernel's tiles and
run the faster; elsewhere the pair runs as the two layers. The CUDA regime here is emulated on CPU
tensors (test_tactics.emulated_cuda; our kernels run by the emulator)."""

import copy

import pytest
import torch
from torch import nn

import resnet_fused
from conftest import assert_accuracy_rule, randomize_bn
from resnet_fused import FusedConv2d, FusedDual, tactics
from test_tactics import EmuCudnn, EmuTile, emulated_cuda

CL = torch.channels_last


class Block(nn.Module):
    """torchvision's Bottleneck, downsampling (stride 2 in the 3x3 and the shortcut)."""

    def __init__(self, c=16, width=8, out=32, stride=2, shortcut_read_twice=False, last_kernel=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, last_kernel, padding=last_kernel // 2, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = nn.Sequential(nn.Conv2d(c, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        self.shortcut_read_twice = shortcut_read_twice

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        identity = self.downsample(x)
        out = torch.relu(y + identity)
        return (out, identity) if self.shortcut_read_twice else out


def block(**kw):
    torch.manual_seed(0)
    return randomize_bn(Block(**kw)).eval()


def duals(m):
    return [mod for mod in m.modules() if isinstance(mod, FusedDual)]


def test_fuse_pairs_the_last_1x1_with_its_downsample():
    m = block()
    fused = resnet_fused.fuse(m)
    (d,) = duals(fused)
    assert (d.conv.tune_name, d.downsample.tune_name) == ("conv3", "downsample.0")
    assert d.stride2 == 2 and d.conv.residual and d.conv.relu and not d.downsample.relu
    assert sum(isinstance(mod, FusedConv2d) for mod in fused.modules()) == 4
    x = torch.randn(2, 16, 11, 9)
    with torch.inference_mode():
        out = fused(x)
        eager = [copy.deepcopy(m)(x), copy.deepcopy(m).to(memory_format=CL)(x.contiguous(memory_format=CL))]
        ref = copy.deepcopy(m).double()(x.double())
    assert_accuracy_rule(out, eager, ref, what="the pair on CPU (two layers)")


@pytest.mark.parametrize("kw", [dict(shortcut_read_twice=True), dict(last_kernel=3)], ids=["shortcut read twice", "3x3"])
def test_no_pair_where_the_product_would_not_be_the_block(kw):
    fused = resnet_fused.fuse(block(**kw))
    assert not duals(fused)


class EmuDual(tactics.DualTile):
    """A dual tile as the emulator runs it (the same kernel source), logged in `ran`."""

    def __init__(self, name, algo, ran, wrong=False):
        super().__init__(name, algo)
        self.ran, self.wrong = ran, wrong

    def run(self, layer, y, w, b, x):
        self.ran.append((self.name, "run"))
        out = torch.ops.resnet_fused_emu.conv1x1_dual_bias_act(y, w, b, x, layer.stride2, layer.conv.relu, 132,
                                                                 self.algo, -1)
        if self.wrong:
            out[:, : out.shape[1] // 4] = 0
        return out


def emulated_dual(monkeypatch, cost, wrong=()):
    """The CUDA regime on CPU tensors (float16 channels-last) for the two layers and the pair; the
    clock reads the cost of every candidate that ran in a timed call, summed (the pair as two layers
    costs its two layers' choices)."""
    ran = emulated_cuda(monkeypatch, [EmuTile("tc64x64"), EmuTile("tc128x64"), EmuCudnn("cudnn")], cost)
    monkeypatch.setattr(tactics, "DUAL_CANDIDATES", [EmuDual(n, a, ran, n in wrong) for n, a in
                                                     (("dual128x128", 0), ("dual128x64", 1))])
    monkeypatch.setattr(tactics, "dual_unsupported", lambda y, w, x, stride2: "")

    class Clock:
        def __init__(self, device):
            pass

        def __call__(self, fn):
            n = len(ran)
            fn()
            return sum(cost[name] for name, _ in ran[n:])

    monkeypatch.setattr(tactics, "_Clock", Clock)
    return ran


def half_block_and_input():
    m = block()
    x = torch.randn(2, 16, 11, 9).half().contiguous(memory_format=CL)
    return m, x


@pytest.mark.parametrize("winner", ["dual128x64", "separate"])
def test_the_pair_runs_the_faster_of_two_layers_and_our_dual_kernel(tactics_cache, monkeypatch, winner):
    dual_cost = 1e-4 if winner == "dual128x64" else 5e-3
    ran = emulated_dual(monkeypatch, {"tc64x64": 1e-3, "tc128x64": 2e-3, "cudnn": 3e-3, "dual128x128": 4e-3,
                                      "dual128x64": dual_cost})
    m, x = half_block_and_input()
    fused = resnet_fused.fuse(m).half()
    with torch.inference_mode():
        fused(x)  # tunes
        log = {t["layer"]: t for t in fused.fuse_report.tactics}
        assert log["conv3 + downsample.0"]["choice"] == winner, log
        assert set(log["conv3 + downsample.0"]["times_ms"]) == {"separate", "dual128x128", "dual128x64"}
        ran.clear()
        out = fused(x)
        eager = [copy.deepcopy(m).half()(x)]
        ref = copy.deepcopy(m).double()(x.double())
    names = [n for n, _ in ran]
    if winner == "separate":
        assert names == ["tc64x64"] * 4  # conv1, conv2, downsample, conv3
    else:
        assert names == ["tc64x64", "tc64x64", "dual128x64"]  # the downsample's output never made
    assert_accuracy_rule(out, eager, ref, what=f"{winner} chosen")
    # a second model of the same shapes reads the choice from the cache
    again = resnet_fused.fuse(m).half()
    with torch.inference_mode():
        again(x)
    assert {t["layer"]: t for t in again.fuse_report.tactics}["conv3 + downsample.0"]["source"] == "cache"


def test_a_wrong_dual_tile_is_rejected_however_fast(tactics_cache, monkeypatch):
    emulated_dual(monkeypatch, {"tc64x64": 1e-3, "tc128x64": 2e-3, "cudnn": 3e-3, "dual128x128": 1e-5,
                                "dual128x64": 5e-4}, wrong=("dual128x128",))
    m, x = half_block_and_input()
    fused = resnet_fused.fuse(m).half()
    with torch.inference_mode():
        fused(x)
    t = {t["layer"]: t for t in fused.fuse_report.tactics}["conv3 + downsample.0"]
    assert "dual128x128" in t["rejected"] and t["choice"] == "dual128x64", t


def test_float32_and_the_cudnn_backend_keep_the_two_layers(tactics_cache, monkeypatch):
    ran = emulated_dual(monkeypatch, {"tc64x64": 1e-3, "tc128x64": 2e-3, "cudnn": 3e-3, "dual128x128": 1e-5,
                                      "dual128x64": 1e-5})
    m, x = half_block_and_input()
    fused = resnet_fused.fuse(m).half()
    monkeypatch.setattr(tactics, "cuda_backend", lambda: "cudnn")
    with torch.inference_mode():
        fused(x)
    assert not any(n.startswith("dual") for n, _ in ran)
    assert tactics.dual_applies(duals(fused)[0], x.float(), x.float()) is False


def test_bad_input_gets_the_layers_own_errors(tactics_cache, monkeypatch):
    """Inputs the pair cannot take (the shortcut's input with the wrong channels, another dtype) go
    to the two layers, whose errors name the problem."""
    emulated_dual(monkeypatch, {"tc64x64": 1e-3, "tc128x64": 2e-3, "cudnn": 3e-3, "dual128x128": 1e-5,
                                "dual128x64": 1e-5})
    monkeypatch.setattr(tactics, "dual_unsupported",
                        lambda y, w, x, stride2: "" if w.shape[1] == y.shape[1] + x.shape[1] else "channels")
    m, x = half_block_and_input()
    (d,) = duals(resnet_fused.fuse(m).half())
    y = torch.randn(2, 8, 6, 5).half().contiguous(memory_format=CL)
    with torch.inference_mode():
        with pytest.raises((ValueError, RuntimeError), match="channels"):
            d(y, x[:, :12].contiguous(memory_format=CL))
        with pytest.raises(TypeError, match="computes in torch.float16 but got a torch.float32 input"):
            d(y, x.float())
