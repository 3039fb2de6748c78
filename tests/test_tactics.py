"""Measured per-layer kernel choice on the CPU (resnet_fused.tactics): the chooser keeps only
candidates that meet the accuracy rule and picks the fastest, the cache round-trips on disk, and
tune=False is today's rules with nothing measured, read or written. No timing is asserted: the
slow candidate is slow by construction."""

import copy
import json
import os
import time
import types

import pytest
import torch
from torch import nn

import resnet_fused
from resnet_fused import tactics
from resnet_fused.modules import FusedConv2d, runs_cudnn_fused

from conftest import assert_accuracy_rule, gemm_rule_runs_1x1s, randomize_bn

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


class Net(nn.Module):
    """A 3x3 (Winograd applies), a 1x1 pair with a residual (gemm applies), a stride-2 3x3."""

    def __init__(self, c=64):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.conv3 = nn.Conv2d(2 * c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.conv4 = nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = torch.relu(self.bn2(self.conv2(y)))
        y = torch.relu(self.bn3(self.conv3(z)) + y)
        return torch.relu(self.bn4(self.conv4(y)))


def model():
    torch.manual_seed(0)
    return randomize_bn(Net()).eval()


def x_for(n=2, h=20):
    return torch.randn(n, 64, h, h, generator=torch.Generator().manual_seed(1))


def convs(fused):
    return [m for m in fused.modules() if isinstance(m, FusedConv2d)]


def kernels(fused):
    """The kernel each layer ran last ("" is oneDNN), by name."""
    return {m.tune_name: [v[2] for v in m._cache.values()][-1] for m in convs(fused)}


@pytest.fixture
def cache(tactics_cache):
    """A fresh, empty cache directory, and nothing remembered in memory (conftest.tactics_cache)."""
    return tactics_cache


def run(fused, x):
    with torch.inference_mode():
        return fused(x)


def test_cache_dir_is_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path / "here"))
    assert tactics.cache_path() == str(tmp_path / "here" / "tactics.json")
    monkeypatch.delenv("RESNET_FUSED_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tactics.cache_dir() == str(tmp_path / "xdg" / "resnet_fused")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tactics.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "resnet_fused")


def test_the_session_cache_is_not_the_home_cache():
    assert os.environ["RESNET_FUSED_CACHE_DIR"] != os.path.join(os.path.expanduser("~"), ".cache", "resnet_fused")


def test_tuned_choices_meet_the_accuracy_rule_and_the_report_lists_them(cache):
    m, x = model(), x_for()
    fused = resnet_fused.fuse(m)
    before = tactics.stats()["measured"]
    out = run(fused, x)
    assert tactics.stats()["measured"] - before == 4
    with torch.inference_mode():
        eager = [m(x), copy.deepcopy(m).to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))]
    ref = copy.deepcopy(m).double()(x.double())
    assert_accuracy_rule(out, eager, ref, what="tuned model")
    report = fused.fuse_report
    assert [t["layer"] for t in report.tactics] == ["conv1", "conv2", "conv3", "conv4"]
    ran = kernels(fused)
    for t in report.tactics:
        assert t["source"] == "measured" and t["input"] in ("2x64x20x20", "2x128x20x20")
        assert t["choice"] not in t["rejected"]
        assert "onednn" in t["times_ms"] and "gemm" in t["times_ms"]  # gemm runs any kernel
        assert ("winograd" in t["times_ms"]) == (t["layer"] in ("conv1", "conv4"))  # (conv4: at stride 2)
        assert all(ms > 0 for ms in t["times_ms"].values())
        assert ran[t["layer"]] == ("" if t["choice"] == "onednn" else t["choice"])
    text = str(report)
    assert "CPU kernels chosen: 4" in text and "conv1 [2x64x20x20, " in text and " ms" in text
    # the cache file holds the same records, under this machine's key
    data = json.loads((cache / "tactics.json").read_text())
    (mid, entry), = data["machines"].items()
    assert mid == tactics.machine_id() and entry["machine"]["cpu"] and len(entry["choices"]) == 4


def test_each_measured_choice_meets_the_rule_layer_by_layer(cache):
    """The chosen kernel's output, layer by layer, against float64 with conftest's rule (eager
    in both layouts as the yardstick)."""
    fused = resnet_fused.fuse(model())
    x = x_for().contiguous(memory_format=torch.channels_last)
    layer = convs(fused)[0]  # conv1: all four candidates apply
    name, record = tactics.decide(layer, x)
    cand = tactics.candidate(name)
    with torch.no_grad():
        out = cand.run(layer, x, cand.prepare(layer, x), layer.bias.float(), None)
        w, b = layer.dense_weight(), layer.bias
        eager = [torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1)),
                 torch.relu(torch.nn.functional.conv2d(x.contiguous(), w.contiguous(), b, padding=1))]
        ref = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1))
        mag = torch.nn.functional.conv2d(x.double().abs(), w.double().abs(), b.double().abs(), padding=1)
    # (and Winograd's other schedule where its own rule would not run it: test_winograd)
    other = {c.name for c in (tactics.WinogradThreePasses(), tactics.Winograd4ThreePasses()) if c.applies(layer, x)}
    assert record["source"] == "measured" and set(record["times_ms"]) == {"onednn", "winograd", "winograd4", "gemm"} | other
    assert_accuracy_rule(out, eager, ref, what=f"chosen {name}", magnitude=mag)


class Late:
    """A candidate's right answers, 20 ms late (mixed in before the candidate's class)."""

    def run(self, layer, x, w, b, residual):
        time.sleep(0.02)
        return super().run(layer, x, w, b, residual)

    def run_(self, layer, x, w, b, residual):
        time.sleep(0.02)
        super().run_(layer, x, w, b, residual)


class SlowGemm(Late, tactics.Gemm):
    """Right answers, 20 ms late."""


class FastWrong(tactics.Gemm):
    """Instant and wrong."""

    def run(self, layer, x, w, b, residual):
        return torch.zeros(x.shape[0], layer.out_channels, *x.shape[2:]).contiguous(
            memory_format=torch.channels_last)

    def run_(self, layer, x, w, b, residual):
        residual.zero_()


def test_a_slow_candidate_is_not_chosen(cache, monkeypatch):
    monkeypatch.setattr(tactics, "CANDIDATES", [tactics.Winograd(), SlowGemm(), tactics.OneDNN()])
    fused = resnet_fused.fuse(model(), winograd=False)
    run(fused, x_for())
    for t in fused.fuse_report.tactics:
        assert t["source"] == "measured" and "gemm" in t["times_ms"]
        assert t["choice"] == "onednn", t  # (winograd is switched off)
    assert all(k == "" for k in kernels(fused).values())


def test_a_layer_that_writes_into_its_residual_is_timed_so(cache, monkeypatch):
    """A layer that writes into its residual (inplace_residual, as fuse() sets it for ResNet's
    blocks): every candidate is timed and checked in place, into a copy, and the residual it was
    given is left as it was."""
    fused = resnet_fused.fuse(model())
    layer = convs(fused)[2]
    layer.inplace_residual = True
    x = torch.randn(2, 128, 20, 20).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 64, 20, 20).contiguous(memory_format=torch.channels_last)
    before = residual.clone()

    class WrongInPlace(tactics.Gemm):
        """Right out of place, wrong in place: only an in-place measurement sees it."""

        def run_(self, layer, x, w, b, residual):
            residual.zero_()

    monkeypatch.setattr(tactics, "CANDIDATES", [WrongInPlace(), tactics.OneDNN()])
    record = tactics.measure(layer, x, residual)
    assert torch.equal(residual, before)
    assert "gemm" in record["rejected"]
    monkeypatch.setattr(tactics, "CANDIDATES", [SlowGemm(), tactics.OneDNN()])
    record = tactics.measure(layer, x, residual)
    assert torch.equal(residual, before) and not record["rejected"]
    assert record["times_ms"]["gemm"] >= 20


def test_a_wrong_candidate_is_rejected_however_fast(cache, monkeypatch):
    monkeypatch.setattr(tactics, "CANDIDATES", [tactics.Winograd(), FastWrong(), tactics.OneDNN()])
    layer = convs(resnet_fused.fuse(model()))[1]
    name, record = tactics.decide(layer, x_for().contiguous(memory_format=torch.channels_last))
    assert "gemm" in record["rejected"] and name == "onednn"
    assert tactics.choose(layer, x_for().contiguous(memory_format=torch.channels_last)) == "onednn"  # cached


class SlowOneDNN(Late, tactics.OneDNN):
    """oneDNN, 20 ms late (so that Winograd F(4x4) is the fastest by construction)."""


def test_a_weight_dependent_verdict_is_checked_on_each_layer(cache, monkeypatch):
    """F(4x4)'s error depends on the weights: the timing record of one layer serves every layer
    of its shape, but its accuracy verdict does not. A layer that meets the record in the cache
    gets F(4x4) only after its own check, and falls back to the next fastest when that fails."""
    monkeypatch.setattr(tactics, "CANDIDATES", [tactics.Winograd4(), SlowOneDNN()])
    a, b, c = (convs(resnet_fused.fuse(model()))[0] for _ in range(3))
    with torch.no_grad():
        b.weight.mul_(1.5)
        c.weight.mul_(0.5)
    x = x_for().contiguous(memory_format=torch.channels_last)
    first, record = tactics.decide(a, x)
    assert record["source"] == "measured" and record["times_ms"]["onednn"] >= 20
    checked = []

    def check(layer, x, residual, name):
        checked.append((layer, name))
        return "too far off, says the test" if layer is b else None

    monkeypatch.setattr(tactics, "check_accuracy", check)
    assert tactics.decide(c, x)[0] == "winograd4"  # whatever a's own verdict was
    name, record = tactics.decide(b, x)
    assert record["source"] == "cache" and name == "onednn"
    assert record["rejected"] == {"winograd4": "too far off, says the test"}
    assert checked == [(c, "winograd4"), (b, "winograd4")]


def test_new_weights_choose_again_where_the_choice_hung_on_them(cache, monkeypatch):
    """A layer whose choice hung on an accuracy check of its own weights (F(4x4) in play) chooses
    again when its weights change (by load_state_dict, or in place); the 1x1s, whose choices do
    not depend on the weights, keep theirs. The same weights give the same choices. (oneDNN made
    late too, so that F(4x4) is the fastest by construction, not by a timing on a busy machine.)"""
    monkeypatch.setattr(tactics, "CANDIDATES", [tactics.Winograd4(), SlowGemm(), SlowOneDNN()])
    x = x_for()
    decided = []
    real = tactics.decide
    monkeypatch.setattr(tactics, "decide", lambda layer, *a, **k: decided.append(layer.tune_name) or real(layer, *a, **k))
    fused = resnet_fused.fuse(model())
    run(fused, x)
    assert decided == ["conv1", "conv2", "conv3", "conv4"]
    run(fused, x)
    assert len(decided) == 4
    fused.load_state_dict(resnet_fused.fuse(model()).state_dict())
    out = run(fused, x)
    assert decided[4:] == ["conv1"]
    fresh = resnet_fused.fuse(model())
    assert torch.equal(out, run(fresh, x)) and kernels(fresh) == kernels(fused)
    # in place: F(4x4) accepted (every check passes, says the test), so the plain master stays
    monkeypatch.setattr(tactics, "_accuracy", lambda layer, x, residual, outs, yardstick="onednn": ({n: 0.0 for n in outs}, {}))
    tactics.clear_memory_cache()
    fused = resnet_fused.fuse(model())
    run(fused, x)
    assert kernels(fused)["conv1"] == "winograd4"
    del decided[:]
    with torch.no_grad():
        fused.conv1.weight.mul_(1.0)  # (the same values, a new version)
    run(fused, x)
    assert decided == ["conv1"]


def test_check_accuracy_runs_the_candidate_against_float64(cache, monkeypatch):
    layer = convs(resnet_fused.fuse(model()))[1]
    x = x_for().contiguous(memory_format=torch.channels_last)
    assert tactics.check_accuracy(layer, x, None, "gemm") is None
    monkeypatch.setattr(tactics, "CANDIDATES", [FastWrong(), tactics.OneDNN()])
    assert tactics.check_accuracy(layer, x, None, "gemm").startswith("error ")


def test_the_disk_cache_round_trips_and_a_second_fuse_measures_nothing(cache):
    x = x_for()
    first = resnet_fused.fuse(model())
    out1 = run(first, x)
    measured = tactics.stats()["measured"]
    choices = {t["layer"]: t["choice"] for t in first.fuse_report.tactics}
    assert (cache / "tactics.json").exists() and len(choices) == 4
    tactics.clear_memory_cache()  # as a new process would start: only the file knows
    second = resnet_fused.fuse(model())
    out2 = run(second, x)
    assert tactics.stats()["measured"] == measured
    assert {t["layer"]: t["choice"] for t in second.fuse_report.tactics} == choices
    assert all(t["source"] == "cache" for t in second.fuse_report.tactics)
    assert kernels(second) == kernels(first)
    assert torch.equal(out1, out2)
    # the switches filter the cached measurements: no new measurement for winograd=False
    third = resnet_fused.fuse(model(), winograd=False, gemm=False)
    run(third, x)
    assert tactics.stats()["measured"] == measured
    assert all(t["choice"] == "onednn" for t in third.fuse_report.tactics)
    # a new input regime is measured (once)
    run(second, x_for(n=1))
    assert tactics.stats()["measured"] == measured + 4
    run(second, x_for(n=1))
    assert tactics.stats()["measured"] == measured + 4


def test_tune_false_is_the_rules_and_touches_nothing(cache):
    x = x_for()
    fused = resnet_fused.fuse(model(), tune=False)
    before = tactics.stats()
    run(fused, x)
    assert tactics.stats() == before
    assert not any(cache.iterdir())
    assert fused.fuse_report.tactics == []
    xcl = x.contiguous(memory_format=torch.channels_last)
    inputs = {"conv1": xcl, "conv2": xcl, "conv3": torch.empty(2, 128, 20, 20).contiguous(
        memory_format=torch.channels_last), "conv4": xcl}
    for m in convs(fused):
        rule = tactics.rule_choice(m, inputs[m.tune_name])
        assert kernels(fused)[m.tune_name] == ("" if rule == "onednn" else rule)
    # (the rules at this size: Winograd for the 3x3, gemm for the 1x1s on AVX-512 and AVX2, oneDNN else)
    g = "gemm" if gemm_rule_runs_1x1s() else ""
    assert kernels(fused) == {"conv1": "winograd", "conv2": g, "conv3": g, "conv4": ""}


def test_a_corrupt_cache_file_is_ignored_with_a_warning(cache):
    (cache / "tactics.json").write_text("{not json")
    fused = resnet_fused.fuse(model())
    with pytest.warns(RuntimeWarning, match="ignoring the tactics cache"):
        run(fused, x_for())
    assert all(t["source"] == "measured" for t in fused.fuse_report.tactics)
    data = json.loads((cache / "tactics.json").read_text())  # rewritten, whole
    assert len(data["machines"][tactics.machine_id()]["choices"]) == 4
    (cache / "tactics.json").write_text(json.dumps({"version": 0}))
    tactics.clear_memory_cache()
    with pytest.warns(RuntimeWarning, match="ignoring the tactics cache"):
        run(resnet_fused.fuse(model()), x_for())


def test_tune_runs_the_forward_and_shows_progress(cache, capsys):
    fused = resnet_fused.fuse(model())
    out = resnet_fused.tune(fused, x_for())
    assert out.shape == (2, 64, 10, 10)
    assert len(fused.fuse_report.tactics) == 4
    err = capsys.readouterr().err
    assert "tuning" in err or "tuned" in err


def test_keys_name_the_problem_and_the_machine():
    layer = convs(resnet_fused.fuse(model()))[0]
    x = x_for().contiguous(memory_format=torch.channels_last)
    key = tactics.problem_key(layer, x)
    for part in ("C64", "K64", "k3x3", "s1x1", "p1x1", "d1x1", "g1", "float32", "relu=1", "res=0", "N2", "H20",
                 "W20", f"t{torch.get_num_threads()}"):
        assert part in key.split(), (part, key)
    assert tactics.problem_key(layer, x_for(n=1).contiguous(memory_format=torch.channels_last)) != key
    mk = tactics.machine_key()
    assert set(mk) == {"cpu", "isa", "torch", "onednn", "threads"} and mk["torch"] == torch.__version__


def test_pickled_model_chooses_again():
    import io

    fused = resnet_fused.fuse(model())
    run(fused, x_for())
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert all(m._tuned == {} and m.tune for m in convs(again))
    assert torch.equal(run(again, x_for()), run(fused, x_for()))


def test_rejected_candidates_and_near_ties():
    """Rejected never wins; within TIE of the fastest the rules' choice stays (noise)."""
    rec = {"times_ms": {"onednn": 10.0, "gemm": 10.0 / (1 + tactics.TIE / 2), "winograd": 1.0},
           "rejected": {"winograd": "error too large"}}
    names = ["onednn", "gemm", "winograd"]
    assert tactics._pick(rec, names, prefer="onednn") == "onednn"
    assert tactics._pick(rec, names) == "gemm"
    rec["times_ms"]["gemm"] = 5.0
    assert tactics._pick(rec, names, prefer="onednn") == "gemm"
    assert tactics._pick(rec, ["onednn"], prefer="gemm") == "onednn"
    assert tactics._pick({"times_ms": {"gemm": 1.0}, "rejected": {"gemm": "x"}}, ["gemm"]) is None


# ---- the CUDA candidates' chooser, with our kernel run by the emulator ---------------------------
class EmuTile(tactics.CudaAlgo):
    """A tile of our CUDA kernel as the emulator runs it on CPU tensors (the same kernel source)."""

    def applies(self, layer, x):
        return tactics.CudaCandidate.applies(self, layer, x)  # (the op that asks our kernel is CUDA's)

    def run(self, layer, x, w, b, residual):
        return torch.ops.resnet_fused_emu.conv2d_bias_act(x, w, b, residual, layer.stride, layer.padding,
                                                          layer.dilation, layer.relu, 132, self.algo, -1)

    def run_(self, layer, x, w, b, residual):
        torch.ops.resnet_fused_emu.conv2d_bias_act_(residual, x, w, b, layer.stride, layer.padding, layer.dilation,
                                                    layer.relu, 132, self.algo, -1)


class EmuCudnn(tactics.CudaAlgo):
    """The yardstick as cuDNN + our epilogue computes it: the convolution rounded to the input's
    dtype, then the emulated epilogue kernel."""

    def run(self, layer, x, w, b, residual):
        y = torch.nn.functional.conv2d(x.float(), w.float(), None, layer.stride, layer.padding).to(x.dtype)
        y = y.contiguous(memory_format=torch.channels_last)
        return torch.ops.resnet_fused_emu.epilogue(y, b, residual, layer.relu)

    def run_(self, layer, x, w, b, residual):
        residual.copy_(self.run(layer, x, w, b, residual))


class EmuCudnnFused(tactics.CudnnFused):
    """cuDNN's fused op as its numbers come out (the bias in the input's dtype, float32 sums, one
    rounding), with a ReLU that maps NaN to 0 as its does."""

    def run(self, layer, x, w, b, residual):
        y = torch.nn.functional.conv2d(x.float(), w.float(), b.float(), layer.stride, layer.padding)
        if residual is not None:
            y = y + residual.float()
        return torch.where(y > 0, y, 0.0).to(x.dtype).contiguous(memory_format=torch.channels_last)


class EmuWrongTile(EmuTile):
    """A wrong tile: a quarter of the output channels left at zero."""

    def run(self, layer, x, w, b, residual):
        out = super().run(layer, x, w, b, residual)
        out[:, : layer.out_channels // 4] = 0
        return out

    def run_(self, layer, x, w, b, residual):
        super().run_(layer, x, w, b, residual)
        residual[:, : layer.out_channels // 4] = 0


def emulated_cuda(monkeypatch, candidates, cost, dtype=torch.float16):
    """The CUDA regime on CPU tensors: float16 channels-last inputs are "CUDA-tunable", the CUDA
    candidates are `candidates`, and the clock reads `cost[name]` seconds for the candidate that
    ran (the emulator is far slower than a GPU: its own times would say nothing). Returns the log
    of (candidate, run or run_) calls."""
    pytest.importorskip("resnet_fused._emu", reason="resnet_fused built without RESNET_FUSED_EMU=1")
    monkeypatch.setattr(tactics, "cuda_tunable", lambda layer, x: x.dtype == dtype and tactics._is_channels_last(x))
    monkeypatch.setattr(tactics, "CUDA_CANDIDATES", candidates)
    ran, depth = [], [0]
    for c in candidates:
        for method in ("run", "run_"):
            def spy(*args, _c=c, _f=getattr(c, method), _m=method):
                if not depth[0]:  # (a run_ that calls run is one call)
                    ran.append((_c.name, _m))
                depth[0] += 1
                try:
                    return _f(*args)
                finally:
                    depth[0] -= 1
            monkeypatch.setattr(c, method, spy)

    class Clock:
        def __init__(self, device):
            pass

        def __call__(self, fn):
            fn()
            return cost[ran[-1][0]]

    monkeypatch.setattr(tactics, "_Clock", Clock)
    return ran


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_cuda_candidates_are_timed_checked_against_cudnn_and_cached(cache, monkeypatch, inplace):
    """The CUDA chooser's path (float16, channels-last; the yardstick cuDNN + epilogue, the ulp in
    float16) with our kernel's tiles run by the emulator: a wrong tile is rejected however fast, a
    slow one loses, the choice is cached under its own machine key and read back."""
    emulated_cuda(monkeypatch, [EmuTile("tc128x128"), EmuWrongTile("tc128x64"), EmuTile("tc64x64"), EmuCudnn("cudnn")],
                  {"tc128x128": 0.5, "tc128x64": 1e-4, "tc64x64": 2e-3, "cudnn": 3e-3})
    layer = convs(resnet_fused.fuse(model()).half())[2]  # the 1x1 with the residual
    layer.inplace_residual = inplace
    x = torch.randn(2, 128, 12, 12).half().contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 64, 12, 12).half().contiguous(memory_format=torch.channels_last)
    assert tactics.candidates_for(layer, x)[1] == "cudnn"
    name, record = tactics.decide(layer, x, residual)
    assert record["source"] == "measured" and set(record["times_ms"]) == {"tc128x128", "tc128x64", "tc64x64", "cudnn"}
    assert set(record["rejected"]) == {"tc128x64"}, record["rejected"]
    assert name == "tc64x64"
    again, record = tactics.decide(layer, x, residual)
    assert again == name and record["source"] == "cache"
    with open(tactics.cache_path()) as f:
        machines = json.load(f)["machines"]
    assert any(tactics.problem_key(layer, x) in m["choices"] for m in machines.values())


@pytest.mark.parametrize("winner", ["tc64x64", "cudnn_fused"])
def test_a_fused_model_runs_its_cuda_choices(cache, monkeypatch, winner):
    """fuse() on the CUDA regime (float16, channels-last; our kernel's tiles run by the emulator,
    cuDNN's paths as their numbers come out): each layer tunes on its first call and runs what it
    chose through the candidate that was timed (in place where the block writes its residual, but
    cuDNN's fused op, which writes a fresh output, out of place: timed and run so, no copy back),
    within the accuracy rule; a layer on cuDNN's fused op runs it only on inputs the graph checked
    finite, and an input with NaN goes the exact path (NaN where eager has NaN)."""
    cost = {"tc64x64": 1.0, "tc128x64": 1.0, "cudnn": 1.0, "cudnn_fused": 1.0, winner: 1e-3}
    ran = emulated_cuda(monkeypatch, [EmuTile("tc64x64"), EmuTile("tc128x64"), EmuCudnn("cudnn"), EmuCudnnFused()],
                        cost)
    m = model()
    fused = resnet_fused.fuse(m).half()
    convs(fused)[2].inplace_residual = True  # (its residual, conv1's output, is read by nothing after it)
    x = x_for().half().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fused(x)  # tunes
        assert [t["choice"] for t in fused.fuse_report.tactics] == [winner] * 4, fused.fuse_report.tactics
        assert ("cudnn_fused", "run") in ran and ("cudnn_fused", "run_") not in ran  # (timed out of place)
        assert ("tc64x64", "run_") in ran
        ran.clear()
        out = fused(x)
        eager, ref = copy.deepcopy(m).half()(x), copy.deepcopy(m).double()(x.double())
        assert {n for n, _ in ran} == {winner} and len(ran) == 4
        # (cuda_graph checks each replay's input where a layer runs cuDNN's fused op)
        assert runs_cudnn_fused(fused) == (winner == "cudnn_fused")
        assert [meth for _, meth in ran] == ["run", "run", "run" if winner == "cudnn_fused" else "run_", "run"]
        assert_accuracy_rule(out, [eager], ref, what=f"{winner} chosen")
        x[0, :, 3, 3] = float("nan")
        ran.clear()
        bad = fused(x)
        assert torch.equal(bad.isnan(), copy.deepcopy(m).half()(x).isnan()) and bad.isnan().any()
        assert {n for n, _ in ran} == ({"cudnn"} if winner == "cudnn_fused" else {winner})  # NaN kept


def test_a_cuda_path_runs_the_weight_its_candidate_prepared(cache, monkeypatch):
    """Where the CPU's oneDNN packs float16 weights (AMX-FP16; on an H100 host), a layer on a CUDA
    path still runs the plain channels-last weight its candidate was timed with, not oneDNN's
    packed one (which our kernels cannot read)."""
    def packs_float16(w, *args):
        return w.to_mkldnn()

    monkeypatch.setattr(torch.ops.resnet_fused, "prepack_conv2d_weight",
                        types.SimpleNamespace(default=packs_float16))
    seen = []

    class Tile(EmuTile):
        def run(self, layer, x, w, b, residual):
            seen.append(w.layout)
            return super().run(layer, x, w, b, residual)

    emulated_cuda(monkeypatch, [Tile("tc64x64"), EmuCudnn("cudnn")], {"tc64x64": 1e-3, "cudnn": 2e-3})
    m = model()
    fused = resnet_fused.fuse(m).half()
    x = x_for().half().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fused(x)  # tunes
        seen.clear()
        out = fused(x)
        eager, ref = copy.deepcopy(m).half()(x), copy.deepcopy(m).double()(x.double())
    assert [t["choice"] for t in fused.fuse_report.tactics] == ["tc64x64"] * 4
    assert seen == [torch.strided] * 4, seen
    assert_accuracy_rule(out, [eager], ref, what="tc64x64 chosen")


@pytest.mark.parametrize("case", ["small_gain", "small_gain_in_use", "large_gain"])
def test_the_first_layer_on_cudnn_fused_pays_for_the_input_check(cache, monkeypatch, case):
    """A layer on cuDNN's fused op brings a check of the graph's input on every forward (inputs_finite:
    a sum and a synchronisation). Where no layer runs that op yet, it is charged the check's time:
    a gain smaller than the check (batch 1, bound by the host) keeps our tile; a larger one takes
    the op, and the layers after it are not charged again."""
    fused_cost = 0.1e-3 if case == "large_gain" else 0.9e-3  # against the tile's 1 ms; the check 0.5 ms
    emulated_cuda(monkeypatch, [EmuTile("tc64x64"), EmuCudnn("cudnn"), EmuCudnnFused()],
                  {"tc64x64": 1e-3, "cudnn": 2e-3, "cudnn_fused": fused_cost})
    monkeypatch.setattr(tactics, "finite_check_ms", lambda x: 0.5)
    monkeypatch.setattr(tactics, "_cudnn_fused_layers", [1 if case == "small_gain_in_use" else 0])
    fused = resnet_fused.fuse(model()).half()
    with torch.inference_mode():
        fused(x_for().half().contiguous(memory_format=torch.channels_last))
    log = fused.fuse_report.tactics
    want = "tc64x64" if case == "small_gain" else "cudnn_fused"
    assert [t["choice"] for t in log] == [want] * 4, log
    assert runs_cudnn_fused(fused) == (want == "cudnn_fused")


class EmuCudnnTf32(EmuCudnn):
    """cuDNN + epilogue in float32 as a GPU runs it with TF32 allowed: the operands rounded to TF32."""

    def run(self, layer, x, w, b, residual):
        from conftest import tf32
        return super().run(layer, tf32(x), tf32(w), b, residual)


@pytest.mark.parametrize("yardstick", ["tf32", "float32"])
def test_the_tf32_tile_is_chosen_only_within_the_rule(cache, monkeypatch, yardstick):
    """float32 on CUDA: our TF32 tile (emulated) against cuDNN + epilogue. Where cuDNN multiplies in
    TF32 too (PyTorch's default), the faster TF32 tile is chosen and the model stays within the
    rule; where cuDNN ran a layer in full float32, our tile's TF32 error breaks the rule there and
    cuDNN keeps the layer, however fast the tile."""
    cudnn = EmuCudnnTf32("cudnn") if yardstick == "tf32" else EmuCudnn("cudnn")
    ran = emulated_cuda(monkeypatch, [EmuTile("tc128x64"), cudnn], {"tc128x64": 1e-4, "cudnn": 1e-3},
                        dtype=torch.float32)
    m = model()
    fused = resnet_fused.fuse(m, prepack=False)  # (float32 on the CPU: not the CPU candidates' regime)
    x = x_for().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fused(x)  # tunes
        choices = [t["choice"] for t in fused.fuse_report.tactics]
        ran.clear()
        out = fused(x)
    if yardstick == "tf32":
        assert choices == ["tc128x64"] * 4 and {n for n, _ in ran} == {"tc128x64"}
        from conftest import tf32
        tf = copy.deepcopy(m)
        for c in tf.modules():
            if isinstance(c, torch.nn.Conv2d):
                c.weight.data = tf32(c.weight.data)
                c.register_forward_pre_hook(lambda mod, args: (tf32(args[0]),))
        with torch.inference_mode():
            eager, ref = tf(x), copy.deepcopy(m).double()(x.double())
        assert_accuracy_rule(out, [eager], ref, what="TF32 tile chosen")
    else:
        assert choices == ["cudnn"] * 4, fused.fuse_report.tactics
        assert all("tc128x64" in t["rejected"] for t in fused.fuse_report.tactics)


class RaisingGemm(tactics.Gemm):
    """A kernel that refuses the shape on its first call (as cuDNN does with no engine for it)."""

    def run(self, layer, x, w, b, residual):
        raise RuntimeError("no engine for this shape\nsecond line")


def test_a_candidate_that_raises_is_rejected_and_the_others_measured(cache, monkeypatch):
    monkeypatch.setattr(tactics, "CANDIDATES", [tactics.Winograd(), RaisingGemm(), tactics.OneDNN()])
    layer = convs(resnet_fused.fuse(model()))[1]
    x = x_for().contiguous(memory_format=torch.channels_last)
    name, record = tactics.decide(layer, x)
    assert record["rejected"]["gemm"] == "failed: RuntimeError: no engine for this shape"
    assert "gemm" not in record["times_ms"] and "onednn" in record["times_ms"] and name == "onednn"
    assert tactics.decide(layer, x)[1]["source"] == "cache"  # (a failure is remembered, not measured again)


def test_f4_where_its_check_accepts_it_keeps_the_whole_model_within_the_rule(cache, monkeypatch):
    """The choices a CI run measured for this CIFAR ResNet (F(4x4) on the four conv2s of layers 1-2,
    F(2x2) and the matrix products elsewhere), each taken where the layer's own check accepts it:
    the whole model still meets the accuracy rule. With an ulp's allowance in F(4x4)'s check each
    of the four passed and the model came out at 3.9x eager's error; without it the check turns
    F(4x4) down where its error is over 2x oneDNN's."""
    from test_fuse import HAND_WRITTEN, fused_and_reference

    ran = {"conv1": "winograd", "layers.0.0.conv1": "winograd", "layers.0.0.conv2": "winograd",
           "layers.0.1.conv1": "winograd", "layers.0.1.conv2": "winograd", "layers.1.0.conv1": "gemm",
           "layers.1.0.shortcut.0": "gemm", "layers.1.0.conv2": "winograd4", "layers.1.1.conv1": "winograd",
           "layers.1.1.conv2": "winograd4", "layers.2.0.conv1": "gemm", "layers.2.0.shortcut.0": "gemm",
           "layers.2.0.conv2": "winograd4", "layers.2.1.conv1": "winograd", "layers.2.1.conv2": "winograd4",
           "linear": "gemm"}
    decide = tactics.decide

    def as_that_run(layer, x, residual=None, tune=True):
        name, record = decide(layer, x, residual, tune)
        want = ran[layer.tune_name]
        ok = want in record["times_ms"] and want not in record["rejected"]
        return (want, record) if ok else (name, record)

    monkeypatch.setattr(tactics, "decide", as_that_run)
    make, shape, _ = HAND_WRITTEN["cifar"]
    torch.manual_seed(1)
    model = randomize_bn(make()).eval()
    x = torch.randn(*shape)
    out, eagers, ref, fused = fused_and_reference(model, x, torch.float32, "cpu")
    assert sum(t["choice"] == tactics.WINOGRAD4 for t in fused.fuse_report.tactics) >= 2, fused.fuse_report.tactics
    assert_accuracy_rule(out, eagers, ref, what="cifar with a CI run's choices")
