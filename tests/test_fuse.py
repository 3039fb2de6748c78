"""fuse(model) on torchvision's ResNet family and hand-written ResNets: same predictions, every
conv through a resnet_fused op, no batch_norm / relu / add left where they could be fused."""

import collections
import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused
from resnet_fused import FusedConv2d

import models
from conftest import CUDA, assert_accuracy_rule, device_params, dtypes_for, gemm_rule_runs_1x1s, randomize_bn

torchvision = pytest.importorskip("torchvision")

TORCHVISION_MODELS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2",
]


class OpCounter(TorchDispatchMode):
    """Counts the ops a forward dispatches (top level: what a fused op does inside is its own)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model, x):
    with torch.inference_mode(), OpCounter() as c:
        model(x)
    return c.counts


CUDNN_FUSED_OPS = ("aten.cudnn_convolution_relu", "aten.cudnn_convolution_add_relu")


def assert_fully_fused(original, fused, x, add_relus=0):
    counts = count_ops(fused, x)
    # (a classifier head, global pool -> flatten -> Linear, runs as a 1x1 conv too on the CPU; on a
    # GPU it stays F.linear, see FusedLinear)
    on_cpu = x.device.type == "cpu"
    n_convs = sum(isinstance(m, (nn.Conv2d, nn.Linear) if on_cpu else nn.Conv2d) for m in original.modules())
    leftover = {k: v for k, v in counts.items() if "batch_norm" in k or k in (
        "aten.relu", "aten.relu_", "aten.add", "aten.add_", "aten.convolution", "aten.mkldnn_convolution",
        "aten.threshold", "aten.clamp_min") or (on_cpu and k in ("aten.linear", "aten.addmm", "aten.mm"))}
    assert not leftover, f"unfused ops left: {leftover}"
    # every conv is one fused op: direct, Winograd (CPU float32 3x3s, see tactics.Winograd.rule),
    # matrix products (CPU float32 1x1s, see tactics.Gemm.rule), or on CUDA cuDNN's fused op where
    # the tactics chose it (tactics.CudnnFused); on CUDA our dual kernel (tactics.DualTile) is two
    # convs, a block's last 1x1 and its downsample, in one op
    fused_convs = sum(n for k, n in counts.items() if k in CUDNN_FUSED_OPS
                      or (k.startswith("resnet_fused.") and "conv2d_bias_act" in k))
    fused_convs += 2 * counts["resnet_fused.cuda_conv1x1_dual_bias_act"]
    assert fused_convs == n_convs, counts
    assert counts["resnet_fused.add_relu"] == add_relus, counts
    return counts


def torchvision_model(name, seed=0, branch_scale=1.0):
    """A torchvision model with random weights and BN statistics. ``branch_scale`` scales each
    residual branch's last BN, as training leaves them small: with every BN's scale near 1,
    resnet152's activations grow past float16's range over its 50 blocks (logits ~2e5 at 128x128:
    eager overflows too), so the float16 tests take 0.5."""
    torch.manual_seed(seed)
    m = randomize_bn(getattr(torchvision.models, name)(weights=None))
    with torch.no_grad():
        for block in m.modules():
            if isinstance(block, torchvision.models.resnet.Bottleneck):
                block.bn3.weight.mul_(branch_scale)
            elif isinstance(block, torchvision.models.resnet.BasicBlock):
                block.bn2.weight.mul_(branch_scale)
    return m.eval()


def fused_and_reference(model, x, dtype, device, channels_last=False):
    """(fused output, [eager outputs], float64 reference) for `model` in `dtype` on `device`."""
    fused = resnet_fused.fuse(model).to(device=device, dtype=dtype)
    ref_model = copy.deepcopy(model).double()
    with torch.inference_mode():
        ref = ref_model(x.double())
        eager_model = copy.deepcopy(model).to(device=device, dtype=dtype)
        xd = x.to(device=device, dtype=dtype)
        if channels_last:
            xd = xd.contiguous(memory_format=torch.channels_last)
        eagers = [eager_model(xd).cpu()]
        eagers.append(eager_model.to(memory_format=torch.channels_last)(
            xd.contiguous(memory_format=torch.channels_last)).cpu())
        out = fused(xd).cpu()
    return out, eagers, ref, fused


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_family_cpu(name):
    model = torchvision_model(name)
    x = torch.randn(2, 3, 64, 64)
    out, eagers, ref, fused = fused_and_reference(model, x, torch.float32, "cpu")
    assert_accuracy_rule(out, eagers, ref, what=name)
    assert torch.equal(out.argmax(1), eagers[0].argmax(1))
    assert_fully_fused(model, fused, x)


@pytest.mark.slow
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_resnet50_dtypes(device, channels_last):
    model = torchvision_model("resnet50")
    x = torch.randn(2, 3, 96, 96)
    for dtype in dtypes_for(device):
        out, eagers, ref, fused = fused_and_reference(model, x, dtype, device, channels_last)
        assert_accuracy_rule(out, eagers, ref, what=f"resnet50 {device} {dtype}")
        assert_fully_fused(model, fused, x.to(device=device, dtype=dtype))


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("name", TORCHVISION_MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_torchvision_family_cuda(name, dtype):
    model = torchvision_model(name, branch_scale=0.5 if dtype == torch.float16 else 1.0)
    x = torch.randn(4, 3, 128, 128)
    out, eagers, ref, fused = fused_and_reference(model, x, dtype, "cuda", channels_last=True)
    assert_accuracy_rule(out, eagers, ref, what=f"{name} {dtype}")
    assert_fully_fused(model, fused, x.to("cuda", dtype))


HAND_WRITTEN = {
    "cifar": (lambda: models.CifarResNet(), (2, 3, 32, 32), 0),
    "bottleneck": (lambda: models.HandResNet(), (2, 3, 64, 64), 0),
    "grouped": (lambda: models.HandResNet(groups=4), (2, 3, 64, 64), 0),
    "wide": (lambda: models.HandResNet(width_mult=2), (2, 3, 64, 64), 0),
    "no_fc": (lambda: models.HandResNet(fc=False), (2, 3, 48, 48), 0),
    "backbone": (lambda: models.Backbone(), (2, 3, 20, 20), 0),
}


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_hand_written(name, device):
    make, shape, add_relus = HAND_WRITTEN[name]
    torch.manual_seed(1)
    model = randomize_bn(make()).eval()
    x = torch.randn(*shape)
    for dtype in dtypes_for(device):
        out, eagers, ref, fused = fused_and_reference(model, x, dtype, device)
        assert_accuracy_rule(out, eagers, ref, what=f"{name} {dtype}")
        assert_fully_fused(model, fused, x.to(device=device, dtype=dtype), add_relus)
    assert not fused.fuse_report.left, fused.fuse_report


def test_untraceable_model_fuses_its_submodules():
    model = randomize_bn(models.Untraceable()).eval()
    x = torch.randn(2, 3, 16, 16)
    out, eagers, ref, fused = fused_and_reference(model, x, torch.float32, "cpu")
    assert_accuracy_rule(out, eagers, ref)
    assert fused.fuse_report.untraced and fused.fuse_report.untraced[0][0] == ""
    assert isinstance(fused, models.Untraceable)  # the root stays, its body is fused
    assert_fully_fused(model, fused, x)


def test_unfusable_parts_left_and_right():
    model = randomize_bn(models.Unfusable()).eval()
    x = torch.randn(2, 3, 12, 12)
    out, eagers, ref, fused = fused_and_reference(model, x, torch.float32, "cpu")
    assert_accuracy_rule(out, eagers, ref)
    left = dict(fused.fuse_report.left)
    assert "running statistics" in left["bn_batchstats"]
    assert "several users" in left["bn_b"]
    assert "padding_mode" in left["conv_reflect"]
    # The SiLU stays, the BN before it is still folded into its conv.
    patterns = dict(fused.fuse_report.fused)
    assert patterns["conv_silu"] == "conv+bn"
    assert patterns["conv_a"] == "conv"
    assert isinstance(fused.silu, nn.SiLU)
    assert "conv_a" in str(fused.fuse_report)


def test_report_and_print_show_the_architecture():
    model = torchvision_model("resnet50")
    fused = resnet_fused.fuse(model)
    counts = fused.fuse_report.counts()
    assert counts == {"conv+bn+relu": 33, "conv+bn+add+relu": 16, "conv+bn": 4, "maxpool": 1, "avgpool": 1,
                      "linear": 1}, counts
    text = str(fused)
    assert "layer1" in text and "downsample" in text and "FusedConv2d" in text and "bn=folded" in text
    conv3 = fused.get_submodule("layer4.2.conv3")
    assert isinstance(conv3, FusedConv2d) and conv3.residual and conv3.relu


def test_verbose_prints_report(capsys):
    resnet_fused.fuse(models.CifarResNet().eval(), verbose=True)
    assert "fused:" in capsys.readouterr().out


def test_training_mode_is_refused():
    model = models.CifarResNet()  # training mode
    with pytest.raises(RuntimeError, match=r"eval\(\)"):
        resnet_fused.fuse(model)
    model.eval()
    model.layers[0][0].bn1.train()
    with pytest.raises(RuntimeError, match="bn1"):
        resnet_fused.fuse(model)


def test_backward_raises_clearly():
    fused = resnet_fused.fuse(randomize_bn(models.CifarResNet()).eval())
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        fused(x).sum().backward()
    assert all(not p.requires_grad for p in fused.parameters())


class ClassifierHead(nn.Module):
    """conv -> global average pool -> flatten -> Linear, in the ways hand-written ResNets write it."""

    def __init__(self, form, bias=True):
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(3, 24, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(24 * (4 if form == "not_global" else 1), 10, bias=bias)

    def forward(self, x):
        x = self.conv(x).relu()
        if self.form == "mean":  # (timm's habit)
            return self.fc(x.mean((2, 3)))
        if self.form == "torch_mean":
            return self.fc(torch.mean(x, dim=[-2, -1]))
        if self.form == "mean_keepdim":
            return self.fc(x.mean((2, 3), keepdim=True).flatten(1))
        p = nn.functional.adaptive_avg_pool2d(x, (1, 1)) if self.form == "functional_pool" else self.pool(x)
        if self.form in ("torch_flatten", "no_bias", "functional_pool"):
            f = torch.flatten(p, 1)
        elif self.form == "method":
            f = p.flatten(1)
        elif self.form == "module":
            f = self.flat(p)
        elif self.form == "view":
            f = p.view(p.size(0), -1)
        elif self.form == "reshape":
            f = p.reshape(p.size(0), -1)
        elif self.form == "not_global":
            f = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        elif self.form == "features_too":  # the flattened features are returned as well
            f = torch.flatten(p, 1)
            return self.fc(f), f
        return self.fc(f)


@pytest.mark.parametrize("form", ["torch_flatten", "method", "module", "view", "reshape", "functional_pool",
                                  "mean", "torch_mean", "mean_keepdim", "no_bias", "features_too", "not_global"])
def test_classifier_head_runs_as_a_fused_1x1(form):
    """A Linear on globally pooled features becomes a 1x1 FusedConv2d (packed weights, our matrix
    products on CPU) with the same answers; a Linear on anything else stays PyTorch's."""
    model = ClassifierHead(form, bias=form != "no_bias").eval()
    x = torch.randn(3, 3, 9, 11)
    fused = resnet_fused.fuse(model)
    with torch.inference_mode():
        got, want = fused(x), model(x)
        ref = copy.deepcopy(model).double()(x.double())
    if form == "features_too":
        assert_accuracy_rule(got[1], [want[1]], ref[1], what="features")
        got, want, ref = got[0], want[0], ref[0]
    assert got.shape == want.shape == (3, 10)
    assert_accuracy_rule(got, [want], ref, what=form)
    counts = count_ops(fused, x)
    fused_head = form != "not_global"
    assert fused.fuse_report.counts().get("linear", 0) == int(fused_head)
    assert isinstance(fused.get_submodule("fc"), FusedConv2d) == fused_head
    assert (counts["aten.linear"] + counts["aten.addmm"] + counts["aten.mm"] == 0) == fused_head, counts


def test_classifier_head_off_the_cpu_is_f_linear():
    """Off the CPU (on a GPU; the meta device stands in here) the head is eager's F.linear on a
    cached 2-D weight, and its cache entry reads as every layer's (runs_cudnn_fused walks them)."""
    from resnet_fused.modules import FusedLinear, runs_cudnn_fused

    head = FusedLinear(24, 10, (1, 1), weight=torch.empty(10, 24, 1, 1, device="meta"))
    x = torch.empty(3, 24, 1, 1, device="meta")
    with torch.inference_mode():
        counts = count_ops(head, x)
        out = head(x)
    assert out.shape == (3, 10, 1, 1) and counts["aten.linear"] == 1, counts
    assert not runs_cudnn_fused(head)


def test_callers_model_untouched_unless_inplace():
    model = randomize_bn(models.HandResNet()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    resnet_fused.fuse(model)
    assert [type(m) for m in model.modules()] == types_before
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fused = resnet_fused.fuse(model, inplace=True)  # no copy: the caller's modules are reused
    assert fused.get_submodule("fc.0") is model.fc[0]  # (a module fuse() leaves as it is: the Flatten)


def test_state_dict_and_torch_save_round_trip(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    fused = resnet_fused.fuse(randomize_bn(models.CifarResNet()).eval())
    with torch.inference_mode():
        expected = fused(x)  # populates the prepacked-weight caches, which must not be pickled
    torch.manual_seed(123)
    other = resnet_fused.fuse(randomize_bn(models.CifarResNet()).eval())
    with torch.inference_mode():
        other(x)  # cache built from the old weights: load_state_dict must invalidate it
    other.load_state_dict(fused.state_dict())
    with torch.inference_mode():
        assert torch.equal(other(x), expected)
    path = tmp_path / "fused.pt"
    torch.save(fused, path)
    loaded = torch.load(path, weights_only=False)
    with torch.inference_mode():
        assert torch.equal(loaded(x), expected)
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    with torch.inference_mode():
        assert torch.equal(other(x), expected)


@pytest.mark.parametrize("copied", ["as fused", "pickled", "untraceable"])
def test_a_state_dict_from_before_fusion_is_refused_whole(copied):
    """The original model's state_dict shares the fused model's conv weight keys but holds them
    unfolded: torch would load those, then raise on the BatchNorm keys, and leave a wrong model.
    Nothing is loaded, and the error says what the dict is."""
    x = torch.randn(2, 3, 32, 32)
    model = randomize_bn(models.Untraceable() if copied == "untraceable" else models.CifarResNet()).eval()
    if copied == "untraceable":
        x = torch.randn(2, 3, 16, 16)
    fused = resnet_fused.fuse(copy.deepcopy(model))
    if copied == "pickled":
        fused = pickle.loads(pickle.dumps(fused))
    with torch.inference_mode():
        expected = fused(x)
    with pytest.raises(ValueError,
                       match=r"BatchNorm statistics \(e\.g\. '.*running_mean'\).*before fusion.*nothing was loaded"):
        fused.load_state_dict(model.state_dict())
    partial = dict(fused.state_dict())
    partial.pop(next(iter(partial)))
    with pytest.raises(ValueError, match="not the fused model's .*missing.*nothing was loaded"):
        fused.load_state_dict({k: v + 1 for k, v in partial.items()})
    with torch.inference_mode():
        assert torch.equal(fused(x), expected)
    # strict=False is torch's: the keys that match are loaded
    result = fused.load_state_dict(fused.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys


def test_torch_jit_script_names_the_way_to_torchscript():
    fused = resnet_fused.fuse(randomize_bn(models.CifarResNet()).eval())
    with pytest.raises(TypeError, match="cannot be compiled by torch.jit.script.*resnet_fused.trace"):
        torch.jit.script(fused)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_prepacked_weight_replaces_the_plain_master():
    """On CPU in float32 the fused model holds one copy of each weight: the packed one (oneDNN's,
    or the panels of our matrix products for the 1x1s). Everything that needs the plain tensor
    gets back exactly the folded values."""
    torch.manual_seed(0)
    model = randomize_bn(models.CifarResNet()).eval()
    # (by the rules, without Winograd: a Winograd layer keeps its plain master, see test_winograd.py)
    fused = resnet_fused.fuse(model, winograd=False, tune=False)
    plain = {k: v.clone() for k, v in fused.state_dict().items()}
    x8, x1 = torch.randn(8, 3, 32, 32), torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        expected8, expected1 = fused(x8), fused(x1)  # b8 packs first: its packs become the masters
    convs = [m for m in fused.modules() if isinstance(m, FusedConv2d)]
    assert all(m.weight.is_mkldnn or m.weight.dim() == 5 for m in convs)
    if gemm_rule_runs_1x1s():
        assert any(m.weight.dim() == 5 for m in convs) and any(m.weight.is_mkldnn for m in convs)
    after = fused.state_dict()
    assert after.keys() == plain.keys()
    for k in plain:  # same values, same (plain) layout
        assert not after[k].is_mkldnn and torch.equal(after[k], plain[k]), k
        assert after[k].stride() == plain[k].stride(), k
    with torch.inference_mode():
        assert torch.equal(fused(x8), expected8) and torch.equal(fused(x1), expected1)
        assert torch.equal(copy.deepcopy(fused)(x8), expected8)
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x1), expected1)
        fresh = resnet_fused.fuse(model, winograd=False, tune=False)
        fresh.load_state_dict(after)
        assert torch.equal(fresh(x8), expected8)
        compiled = torch.compile(fused, fullgraph=True)  # traced with packed masters
        assert_accuracy_rule(compiled(x8), [model(x8)], copy.deepcopy(model).double()(x8.double()))
        fused.load_state_dict(plain)  # loading into packed masters
        assert torch.equal(fused(x8), expected8)
        fused.bfloat16()  # unpacks: bf16 copies are cast from the exact float32 values
        assert all(not m.weight.is_mkldnn and m.weight.dim() == 4 and m.weight.dtype == torch.float32 for m in convs)
        sd = fused.state_dict()
        conv_names = [n for n, m in fused.named_modules() if isinstance(m, FusedConv2d)]
        assert all(torch.equal(sd[n + ".weight"], plain[n + ".weight"]) for n in conv_names)
        fused.float()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_new_image_size_gets_its_own_packed_weights(capfd):
    """oneDNN packs a weight for the input size it will meet; a weight packed for another size
    still works but is reordered on every call. After one call at a new size, none is."""
    fused = resnet_fused.fuse(torchvision_model("resnet50"), tune=False)  # the rules
    with torch.inference_mode():
        for size in (224, 160, 160):
            x = torch.randn(2, 3, size, size)
            capfd.readouterr()
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fused(x)
            lines = [ln for ln in capfd.readouterr().out.splitlines() if ",exec," in ln]
    # (the layers that run our own kernels are not oneDNN convolutions. At 160x160 and batch 2:
    # Winograd, every stride-1 3x3 but layer4's two; matrix products, every 1x1 (36) and the fc on AVX-512
    # and AVX2)
    counts = count_ops(fused, x)
    n_winograd = counts["resnet_fused.winograd_conv2d_bias_act"] + counts["resnet_fused.winograd_conv2d_bias_act_"]
    n_gemm = counts["resnet_fused.gemm_conv2d_bias_act"] + counts["resnet_fused.gemm_conv2d_bias_act_"]
    assert n_winograd == 11, counts
    assert n_gemm == (37 if gemm_rule_runs_1x1s() else 0), counts
    assert sum(",convolution," in ln for ln in lines) == 54 - n_winograd - n_gemm, lines[:3]
    reorders = [ln for ln in lines if ",reorder," in ln]
    assert not reorders, f"{len(reorders)} weight reorders per call at the second size: {reorders[:2]}"


def test_fuse_twice_is_harmless():
    x = torch.randn(2, 3, 32, 32)
    once = resnet_fused.fuse(randomize_bn(models.CifarResNet()).eval())
    twice = resnet_fused.fuse(once)
    with torch.inference_mode():
        assert torch.equal(once(x), twice(x))
    assert not twice.fuse_report.fused


def test_dtype_round_trip_refolds_from_float32_masters():
    x = torch.randn(2, 3, 32, 32)
    # No Linear: an unfused nn.Linear rounds its own weights on .half(), as in eager.
    fused = resnet_fused.fuse(randomize_bn(models.HandResNet(fc=False)).eval())
    with torch.inference_mode():
        expected = fused(x)
        fused.bfloat16()
        assert fused(x.bfloat16()).dtype == torch.bfloat16
        fused.half().float()  # float32 masters were never rounded
        assert torch.equal(fused(x), expected)
    assert all(p.dtype == torch.float32 for p in fused.parameters())


def test_channels_last_and_layout_options():
    model = randomize_bn(models.HandResNet()).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.inference_mode():
        a = resnet_fused.fuse(model)(x)
        b = resnet_fused.fuse(model)(x.contiguous(memory_format=torch.channels_last))
        c = resnet_fused.fuse(model, memory_format=None, prepack=False)(x)
        ref = copy.deepcopy(model).double()(x.double())
        eager = model(x)
    for out in (a, b, c):
        assert_accuracy_rule(out, [eager], ref)


def test_threads_give_single_thread_answers():
    fused = resnet_fused.fuse(randomize_bn(models.HandResNet()).eval())
    xs = [torch.randn(2, 3, 48, 48) for _ in range(8)]
    with torch.inference_mode():
        expected = [fused(x) for x in xs]
    results = [None] * len(xs)
    errors = []

    def work(model, i):
        try:
            with torch.inference_mode():
                for _ in range(3):
                    results[i] = model(xs[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    fresh = resnet_fused.fuse(randomize_bn(models.HandResNet()).eval())  # caches built concurrently
    fresh.load_state_dict(fused.state_dict())
    for model in (fused, fresh):
        results = [None] * len(xs)
        threads = [threading.Thread(target=work, args=(model, i)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        # (the fresh model tuned its layers under the threads: its choices may differ from
        # fused's, so it is held to its own single-thread answers)
        if model is not fused:
            with torch.inference_mode():
                expected = [model(x) for x in xs]
        for r, e in zip(results, expected):
            assert torch.equal(r, e)
    # (fused's calls in the threads replayed its recorded plan on the C++ executor, several at once;
    # the fresh model's caches, built under the threads, may have dropped its recordings)
    (plan,) = fused.__dict__["_replayer"].plans.values()
    assert plan.native is not None


def test_torch_compile_fullgraph():
    model = randomize_bn(models.CifarResNet(num_blocks=(1, 1), widths=(8, 16))).eval()
    fused = resnet_fused.fuse(model)
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.inference_mode():
        expected = fused(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", device_params())
def test_to_device_and_back(device):
    model = randomize_bn(models.CifarResNet()).eval()
    fused = resnet_fused.fuse(model).to(device)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = fused(x.to(device)).cpu()
        assert torch.equal(fused.cpu()(x), resnet_fused.fuse(model)(x)) or device == "cuda"
    # eager on the same device: on a GPU, float32 convolutions follow torch.backends.cudnn.allow_tf32
    # in both (TF32 by default), so eager on the CPU is not the error to compare with
    eager = copy.deepcopy(model).to(device)(x.to(device)).cpu()
    assert_accuracy_rule(out, [eager], copy.deepcopy(model).double()(x.double()))


def test_fusing_a_bfloat16_model_computes_in_bfloat16():
    model = randomize_bn(models.CifarResNet()).eval()
    fused = resnet_fused.fuse(copy.deepcopy(model).bfloat16())
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        out = fused(x.bfloat16())
        eager = copy.deepcopy(model).bfloat16()(x.bfloat16())
        ref = copy.deepcopy(model).double()(x.double())
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in fused.named_parameters() if "linear" not in n)
    # folded in float64 from the bf16 values: as accurate as eager bf16 at least
    assert_accuracy_rule(out, [eager], ref)
