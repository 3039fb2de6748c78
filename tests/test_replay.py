"""A fused graph's recorded runs on CPU (resnet_fused.replay): after two calls of an input regime
the third records its ops and later calls replay them. A replay must give the module path's answer
bit for bit, and must stop the moment anything it relied on changes."""

import copy
import io
import math
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused
from resnet_fused import FusedConv2d, replay
from resnet_fused.replay import FusedGraphModule

import models
from conftest import randomize_bn


def fused_model(seed=0, **kw):
    torch.manual_seed(seed)
    return resnet_fused.fuse(randomize_bn(models.CifarResNet()).eval(), **kw)


def module_path(model, x):
    """The answer without replay."""
    was, replay.enabled = replay.enabled, False
    try:
        with torch.inference_mode():
            return model(x)
    finally:
        replay.enabled = was


def warm(model, x, calls=4):
    with torch.inference_mode():
        return [model(x) for _ in range(calls)]


def plans(model):
    r = model.__dict__.get("_replayer")
    return {} if r is None else r.plans


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32)


def test_third_call_records_and_later_calls_replay_bit_for_bit(x, monkeypatch):
    model = fused_model()
    assert isinstance(model, FusedGraphModule)
    outs = warm(model, x, 2)
    assert not plans(model)
    outs += warm(model, x, 3)
    assert len(plans(model)) == 1
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    # the replay runs no module's Python: with the fused layers' forward broken, it still answers
    monkeypatch.setattr(FusedConv2d, "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("module path")))
    with torch.inference_mode():
        assert torch.equal(model(x), outs[0])


def test_outputs_are_fresh_and_the_input_is_untouched(x):
    model = fused_model()
    x0 = x.clone()
    a, b, c, d = warm(model, x, 4)
    assert torch.equal(x, x0)
    assert len({t.data_ptr() for t in (c, d)}) == 2 and torch.equal(c, d)


def test_a_new_regime_gets_its_own_recording(x):
    model = fused_model()
    warm(model, x)
    x1 = torch.randn(1, 3, 32, 32)
    outs = warm(model, x1)  # (its first call packs weights for batch 1: the recording of batch 2 goes)
    assert torch.equal(outs[-1], module_path(model, x1))
    warm(model, x)  # (a layer whose master changed form for batch 1 prepares batch 2's weight again)
    assert torch.equal(warm(model, x1)[-1], outs[-1])
    warm(model, x)
    assert len(plans(model)) == 2  # (both regimes prepared now: nothing changes any more)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        outs = warm(model, x)
        assert torch.equal(outs[-1], module_path(model, x))
        assert any(k[3] == 1 for k in plans(model))
    finally:
        torch.set_num_threads(threads)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(warm(model, xc)[-1], module_path(model, xc))


def test_several_regimes_in_turn_keep_their_recordings():
    """A dynamically batched server runs several input regimes in turn: each keeps its prepared
    weights and its recording, and none drops the others' (each new regime's weights once did,
    for every recording in the process)."""
    model = fused_model()
    xs = [torch.randn(n, 3, h, h) for n, h in ((1, 32), (2, 32), (2, 24), (3, 16))]
    for xi in xs:
        warm(model, xi)
    expected = [module_path(model, xi) for xi in xs]
    epoch = replay._epoch[0]
    for _ in range(3):
        for xi, e in zip(xs, expected):
            assert torch.equal(warm(model, xi, 1)[0], e)
    assert replay._epoch[0] == epoch and len(plans(model)) == len(xs)
    # more regimes than a layer keeps: the oldest are prepared again, the answers stay
    more = [torch.randn(2, 3, h, h) for h in (20, 28, 36)]
    for xi in more + xs:
        assert torch.equal(warm(model, xi)[-1], module_path(model, xi))


def test_the_servers_warm_up_records_every_batch_size():
    from resnet_fused.serve import warm_up

    model = fused_model()
    warm_up(model, (3, 32, 32), 3)
    assert sorted(k[0][0] for k in plans(model)) == [1, 2, 3]
    x = torch.stack([torch.randn(3, 32, 32) for _ in range(2)])  # (as the server makes a batch)
    epoch = replay._epoch[0]
    assert torch.equal(warm(model, x, 1)[0], module_path(model, x)) and replay._epoch[0] == epoch


def test_new_weights_by_load_state_dict_are_used(x):
    model, other = fused_model(0), fused_model(1)
    warm(model, x)
    expected = module_path(other, x)
    model.load_state_dict(other.state_dict())
    assert torch.equal(warm(model, x, 1)[0], expected)
    assert torch.equal(warm(model, x, 4)[-1], expected)


def test_an_in_place_edit_of_a_weight_is_seen(x):
    """A layer that runs on a weight made from its master (Winograd's transform) must not replay
    the old one after the master is edited in place."""
    model = fused_model()
    warm(model, x)
    conv = next(m for m in model.modules() if isinstance(m, FusedConv2d) and m._cache
                and all(k[0][-1].startswith("winograd") for k in m._cache) and m.weight.dim() == 4)
    with torch.no_grad():
        conv.weight.mul_(1.5)
    out = warm(model, x, 1)[0]
    assert torch.equal(out, module_path(model, x))
    assert not torch.equal(out, module_path(fused_model(), x))


def test_new_data_under_a_weight_is_seen(x):
    """`.data =` keeps the tensor object and its version: a Winograd layer, which runs a weight made
    from its master, must not replay the old one (the guard on the master's data)."""
    model, other = fused_model(0), fused_model(1)
    warm(model, x)
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, FusedConv2d) and m._cache
                      and all(k[0][-1].startswith("winograd") for k in m._cache) and m.weight.dim() == 4)
    conv.weight.data = other.get_submodule(name).weight.detach().clone()
    out = warm(model, x, 1)[0]
    assert torch.equal(out, module_path(model, x))
    assert not torch.equal(out, module_path(fused_model(0), x))


def test_a_replaced_layer_is_used(x):
    model, other = fused_model(0), fused_model(1)
    warm(model, x)
    name = next(n for n, m in model.named_modules() if isinstance(m, FusedConv2d))
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, copy.deepcopy(other.get_submodule(name)))
    out = warm(model, x, 1)[0]
    assert torch.equal(out, module_path(model, x))
    assert torch.equal(warm(model, x)[-1], out)


def test_a_non_finite_input_after_a_finite_recording_takes_the_module_path(x, monkeypatch):
    """The finiteness check's answer is a branch in the recording: an input that answers otherwise
    (its Winograd layers must run direct, see FusedConv2d.forward) starts over on the module path."""
    model = fused_model()
    warm(model, x)
    calls = []
    forward = FusedConv2d.forward
    monkeypatch.setattr(FusedConv2d, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    warm(model, x, 1)
    assert not calls  # (replayed)
    bad = x.clone()
    bad[0, 0, 3, 3] = math.inf
    bad[1, 1, 5, 5] = math.nan
    out = warm(model, bad, 1)[0]
    assert calls
    torch.testing.assert_close(out, module_path(model, bad), equal_nan=True, rtol=0, atol=0)
    assert torch.equal(warm(model, x, 1)[0], module_path(model, x))


def test_hooks_registered_after_recording_still_fire(x):
    model = fused_model()
    warm(model, x)
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, FusedConv2d))
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    warm(model, x, 2)
    assert len(seen) == 2
    handle.remove()
    top = model.register_forward_pre_hook(lambda m, i: seen.append("top"))
    warm(model, x, 1)
    assert seen[-1] == "top"
    top.remove()
    every = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append("global"))
    warm(model, x, 1)
    every.remove()
    assert seen[-1] == "global"


def test_dtype_round_trip_and_copies(x):
    model = fused_model()
    expected = warm(model, x)[-1]
    model.half().float()
    assert torch.equal(warm(model, x)[-1], module_path(model, x))
    for twin in (copy.deepcopy(model), torch.load(_saved(model), weights_only=False)):
        assert isinstance(twin, FusedGraphModule)
        outs = warm(twin, x)
        assert torch.equal(outs[-1], expected) and plans(twin)


def _saved(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


def test_grad_mode_and_inference_mode_each_their_own(x):
    model = fused_model()
    with torch.no_grad():
        outs = [model(x) for _ in range(4)]
    assert not outs[-1].is_inference() and torch.equal(outs[-1], module_path(model, x))
    assert torch.equal(warm(model, x)[-1], outs[-1])
    assert len(plans(model)) == 2


def test_switched_off(x, monkeypatch):
    monkeypatch.setattr(replay, "enabled", False)
    model = fused_model()
    warm(model, x, 5)
    assert not plans(model)


def test_a_resnet_records_every_layer_once():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = resnet_fused.fuse(randomize_bn(torchvision.models.resnet18(weights=None)).eval())
    x = torch.randn(1, 3, 64, 64)
    outs = warm(model, x, 4)
    (plan,) = plans(model).values()
    convs = [s for s in plan.steps if "conv2d_bias_act" in str(s[0])]
    assert len(convs) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in torchvision.models.resnet18().modules())
    assert torch.equal(outs[-1], outs[1])


def test_a_replay_lets_each_activation_go_after_its_last_use(x):
    """As the module path does: a replay that kept every activation to the end held all of them at
    once. (Python's executor, whose steps can be wrapped; the C++ one's frees: the test below.)"""
    model = fused_model()
    expected = warm(model, x)[-1]
    (plan,) = plans(model).values()
    plan.native = None
    first, alive_at_last = [], []
    assert plan.steps[1][4] == 1  # (step 0 is the input check; step 1 makes the first activation)
    func0 = plan.steps[1][0]
    funcn = plan.steps[-1][0]

    def record_first(*args, **kwargs):
        out = func0(*args, **kwargs)
        first.append(weakref.ref(out))
        return out

    def check_last(*args, **kwargs):
        alive_at_last.append(first[-1]() is not None)
        return funcn(*args, **kwargs)

    plan.steps[1] = (record_first, *plan.steps[1][1:])
    plan.steps[-1] = (check_last, *plan.steps[-1][1:])
    with torch.inference_mode():
        out = model(x)
    assert alive_at_last == [False], "the first layer's output was still held when the last op ran"
    assert torch.equal(out, expected)


def test_the_recording_holds_no_more_tensors_than_the_module_path(x, monkeypatch):
    """The recording call's memory is the module path's: at no op more of the tensors the call made
    are alive than on the module path (the recorder once held every op's output to the end)."""
    def counting(base):
        class Counting(base):
            most = 0
            refs: list = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if base is TorchDispatchMode:
                    out = func(*args, **(kwargs or {}))
                else:
                    out = super().__torch_dispatch__(func, types, args, kwargs)
                if isinstance(out, torch.Tensor):
                    Counting.refs.append(weakref.ref(out))
                Counting.most = max(Counting.most, sum(r() is not None for r in Counting.refs))
                return out
        return Counting

    Probe = counting(replay._Recorder)
    monkeypatch.setattr(replay, "_Recorder", Probe)
    model = fused_model()
    for _ in range(5):  # (until the call that records)
        Probe.most, Probe.refs = 0, []
        with torch.inference_mode():
            model(x)
        if plans(model):
            break
    assert len(plans(model)) == 1 and len(Probe.refs) > 10
    Plain = counting(TorchDispatchMode)
    with Plain():
        module_path(model, x)
    assert Probe.most <= Plain.most, f"{Probe.most} tensors alive at once while recording, {Plain.most} without"


@pytest.fixture(scope="module")
def probe_ops():
    """Two ops written in Python, for plans built by hand: rf_probe::make returns a new tensor and
    keeps a weak reference to it; rf_probe::check returns its input's copy and notes whether that
    tensor is still alive."""
    lib = torch.library.Library("rf_probe", "DEF")
    lib.define("make(Tensor x) -> Tensor")
    lib.define("check(Tensor x) -> Tensor")
    made, alive = [], []

    def make(x):
        out = x * 2
        made.append(weakref.ref(out))
        return out

    def check(x):
        alive.append(made[-1]() is not None)
        return x.clone()

    lib.impl("make", make, "CPU")
    lib.impl("check", check, "CPU")
    yield made, alive
    lib._destroy()


def test_the_native_plan_lets_each_tensor_go_after_its_last_use(probe_ops):
    made, alive = probe_ops
    for dead_after_add in (True, False):
        made.clear(), alive.clear()
        plan = torch.classes.resnet_fused.ReplayPlan()
        plan.add_step("rf_probe::make", "", [None], [0, 0], 1, None, [0, 1], [])  # slot 1 = make(x)
        plan.add_step("aten::add", "Scalar", [None, 1.0, 1.0], [0, 1], 1, None, [0, 2],  # slot 2 = slot 1 + 1
                      [1] if dead_after_add else [])
        plan.add_step("rf_probe::check", "", [None], [0, 2], 1, None, [0, 3], [2])
        plan.set_output(3)
        x = torch.randn(4)
        assert torch.equal(plan.run(x), x * 2 + 1)
        assert alive == [not dead_after_add]


def test_the_native_plan_checks_values_and_guards():
    plan = torch.classes.resnet_fused.ReplayPlan()
    plan.add_step("aten::is_nonzero", "", [None], [0, 0], 2, True, [], [])
    plan.add_step("aten::mul", "Scalar", [None, 3.0], [0, 0], 1, None, [0, 1], [])
    plan.set_output(1)
    w = torch.ones(2)
    plan.add_guard(w, True, True)
    assert torch.equal(plan.run(torch.ones(1)), torch.full((1,), 3.0))
    assert plan.run(torch.zeros(1)) is None  # (the recorded True differs: the caller takes the module path)
    assert plan.unchanged()
    w.add_(1)
    assert not plan.unchanged()
    with pytest.raises(ValueError, match="no operator"):
        plan.add_step("aten::no_such_op", "", [], [], 1, None, [0, 2], [])
    with pytest.raises(ValueError, match="takes 2 arguments"):
        plan.add_step("aten::mul", "Scalar", [None], [0, 0], 1, None, [0, 2], [])
    with pytest.raises(ValueError, match="out of range"):
        plan.add_step("aten::mul", "Scalar", [None, 2.0], [0, 9], 1, None, [0, 2], [])
    with pytest.raises(ValueError, match="one slot"):
        plan.add_step("aten::mul", "Scalar", [None, 2.0], [0, 0], 1, None, [], [])


def test_a_resnet_replays_natively_with_the_python_executors_answer():
    torch.manual_seed(0)
    model = resnet_fused.fuse(randomize_bn(models.CifarResNet()).eval())
    x = torch.randn(2, 3, 32, 32)
    warm(model, x)
    (plan,) = plans(model).values()
    assert plan.native is not None and plan.native.num_steps() == len(plan.steps)
    native = warm(model, x, 1)[0]
    plan.native = None
    assert torch.equal(native, warm(model, x, 1)[0])
    assert torch.equal(native, module_path(model, x))


def test_a_step_the_native_plan_cannot_hold_stays_in_python():
    """An argument of a type the C++ plan is not given (a dtype): that plan runs from Python."""
    class Cast(nn.Module):
        def forward(self, x):
            return x.to(torch.float64).sum(1).float()

    gm = replay.as_replayed(torch.fx.symbolic_trace(Cast()))
    x = torch.randn(2, 3)
    outs = warm(gm, x)
    (plan,) = plans(gm).values()
    assert plan.native is None
    assert torch.equal(outs[-1], x.double().sum(1).float())
