"""Exporting a fused model for serving: torch.export (dynamic batch, save/load, AOTInductor) and
TorchScript give eager's predictions, and hold plain tensors only."""

import copy
import glob
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import resnet_fused
from conftest import assert_accuracy_rule, randomize_bn

import models

pytest.importorskip("sklearn.datasets")
from test_trained import train_digits_resnet  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _rng_neutral():
    """These tests leave the global RNG as they found it, so that the tests after them draw the
    inputs they drew before these existed (some of those pass on most draws only)."""
    with torch.random.fork_rng():
        yield


@pytest.fixture(scope="module")
def digits():
    """The trained digits network, its fused twin (run once, so its CPU weights are prepacked),
    the held-out images, eager's logits and a float64 reference."""
    model, x_test, y_test = train_digits_resnet()
    fused = resnet_fused.fuse(model)
    with torch.inference_mode():
        fused(x_test)
        eager = model(x_test)
        ref = copy.deepcopy(model).double()(x_test.double())
    assert (eager.argmax(1) == y_test).float().mean() > 0.9, "training did not work"
    return model, fused, x_test, eager, ref


def _no_onednn_tensors(state: dict):
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.layout != torch.strided]
    assert not bad, f"opaque (prepacked) tensors in the exported state: {bad}"


def check_predictions(run, digits, what):
    """`run` maps images to logits: eager's predictions, eager's accuracy rule, at the held-out
    batch and at two other batch sizes (the batch dimension is dynamic)."""
    model, _, x, eager, ref = digits
    with torch.inference_mode():
        out = run(x)
    assert torch.equal(out.argmax(1), eager.argmax(1)), f"{what}: predictions differ from eager's"
    assert_accuracy_rule(out, [eager], ref, what=what)
    for n in (1, 5):
        with torch.inference_mode():
            part = run(x[:n].clone())
        assert_accuracy_rule(part, [eager[:n]], ref[:n], what=f"{what}, batch {n}")


def test_export_digits(digits, tmp_path):
    _, fused, x, _, _ = digits
    ep = resnet_fused.export(fused, x[:1])  # batch 1: traced at 2, dynamic from 1 up
    _no_onednn_tensors(ep.state_dict)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "resnet_fused.conv2d_bias_act.default" in targets, targets
    assert not any("mkldnn" in t or "to_dense" in t for t in targets), targets
    check_predictions(ep.module(), digits, "exported")

    path = tmp_path / "digits.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    check_predictions(loaded.module(), digits, "exported, saved and loaded")
    # The fused model itself is untouched: it repacks and runs as before.
    check_predictions(fused, digits, "fused after export")


def test_nan_inf_like_eager(digits):
    """NaN and Inf inputs: exported and traced graphs give eager's NaN/Inf pattern (the ReLU keeps
    NaN; oneDNN's post-op ReLU would map it to 0) and eager's values elsewhere."""
    model, fused, x, _, _ = digits
    bad = x[:6].clone()
    bad[0, 0, 3, 3] = float("nan")
    bad[1, 0, 0, 0] = float("inf")
    bad[2, 0, 5, 5] = float("-inf")
    with torch.inference_mode():
        eager = model(bad)
        ref = copy.deepcopy(model).double()(bad.double())
    assert eager[:3].isnan().any(), "the reference lost its NaN: the test would prove nothing"
    for name, run in (("exported", resnet_fused.export(fused, bad).module()), ("TorchScript", resnet_fused.trace(fused, bad))):
        with torch.inference_mode():
            out = run(bad)
        assert torch.equal(out.isnan(), eager.isnan()), f"{name}: NaN where eager has none, or none where it has"
        assert torch.equal(out.isinf(), eager.isinf()), f"{name}: Inf pattern differs from eager's"
        ok = eager.isfinite().all(1)
        assert_accuracy_rule(out[ok], [eager[ok]], ref[ok], what=f"{name}, finite rows")


def test_export_static_batch(digits):
    """dynamic_batch=False: the batch size traced is the only one the program takes."""
    _, fused, x, _, _ = digits
    run = resnet_fused.export(fused, x[:4], dynamic_batch=False).module()
    with torch.inference_mode():
        out = run(x[4:8].clone())
        with pytest.raises(AssertionError, match=r"size\(\)\[0\] == 4"):
            run(x[:5].clone())
    model, _, _, eager, ref = digits
    assert_accuracy_rule(out, [eager[4:8]], ref[4:8], what="static export")


def test_aoti_package_digits(digits, tmp_path):
    """AOTInductor: the exported program compiled to a package (C++, our ops called by name) runs."""
    _, fused, x, _, _ = digits
    ep = resnet_fused.export(fused, x[:4])
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "digits_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    check_predictions(runner, digits, "AOTInductor package")


def test_torchscript_digits(digits, tmp_path):
    _, fused, x, _, _ = digits
    ts = resnet_fused.trace(fused, x[:8])
    _no_onednn_tensors(dict(ts.state_dict()))
    path = tmp_path / "digits.ts"
    ts.save(str(path))
    loaded = torch.jit.load(str(path))
    check_predictions(loaded, digits, "TorchScript, saved and loaded")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler to build the LibTorch loader")
@pytest.mark.skipif(torch.version.cuda is not None,
                    reason="the LibTorch loader is built and run in the CPU-only torch's run (once is enough)")
def test_torchscript_in_libtorch(digits, tmp_path):
    """The TorchScript model runs in a C++ LibTorch process (tests/libtorch_load.cpp) that loads
    resnet_fused's library for the ops: eager's predictions and accuracy."""
    _, fused, x, eager, ref = digits
    resnet_fused.trace(fused, x[:8]).save(str(tmp_path / "digits.ts"))
    torch_dir = os.path.dirname(torch.__file__)
    exe = tmp_path / "libtorch_load"
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libtorch_load.cpp")
    inc = os.path.join(torch_dir, "include")
    lib = os.path.join(torch_dir, "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    build = subprocess.run(
        ["g++", "-std=c++17", "-O1", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", src, "-o", str(exe), "-I", inc,
         "-I", os.path.join(inc, "torch", "csrc", "api", "include"), "-L", lib, f"-Wl,-rpath,{lib}",
         "-Wl,--no-as-needed", "-ltorch", "-ltorch_cpu", "-lc10", "-ldl"],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    so = glob.glob(os.path.join(os.path.dirname(resnet_fused.__file__), "_C*.so"))
    assert len(so) == 1, so
    x.contiguous().numpy().astype(np.float32).tofile(tmp_path / "in.f32")
    run = subprocess.run([str(exe), so[0], str(tmp_path / "digits.ts"), str(tmp_path / "in.f32"), *map(str, x.shape),
                          str(tmp_path / "out.f32")], capture_output=True, text=True, timeout=300, env={
                              k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    out = torch.from_numpy(np.fromfile(tmp_path / "out.f32", dtype=np.float32)).reshape(eager.shape)
    assert torch.equal(out.argmax(1), eager.argmax(1)), "LibTorch: predictions differ from eager's"
    assert_accuracy_rule(out, [eager], ref, what="TorchScript in LibTorch")


def test_direct_export_and_trace(digits):
    """torch.export.export and torch.jit.trace called directly: fine on a model whose weights are
    plain; a clear error, naming the way out, once its CPU weights are prepacked."""
    model, fused, x, _, _ = digits
    fresh = resnet_fused.fuse(model)
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(fresh, (x[:4],), dynamic_shapes=({0: batch},))
    ts = torch.jit.trace(fresh, x[:4])
    check_predictions(ep.module(), digits, "torch.export.export")
    check_predictions(ts, digits, "torch.jit.trace")

    with torch.inference_mode():
        fresh(x[:4])  # now prepacked
    assert any(p.is_mkldnn for p in fresh.parameters())
    with pytest.raises(RuntimeError, match="resnet_fused.export"):
        torch.export.export(fresh, (x[:4],))
    with pytest.raises(RuntimeError, match="unpack_weights"):
        torch.jit.trace(fresh, x[:4])
    # A copy (deepcopy, pickling, torch.save/load) holds plain weights: it exports directly.
    check_predictions(torch.export.export(copy.deepcopy(fresh), (x[:4],), dynamic_shapes=({0: batch},)).module(),
                      digits, "torch.export.export of a copy")
    resnet_fused.unpack_weights(fresh)
    assert not any(p.is_mkldnn for p in fresh.parameters())
    check_predictions(torch.export.export(fresh, (x[:4],), dynamic_shapes=({0: batch},)).module(), digits,
                      "torch.export.export after unpack_weights")
    with torch.inference_mode():
        fresh(x[:4])  # prepacked again
    resnet_fused.hold_for_serving(fresh)
    assert not any(p.is_mkldnn for p in fresh.parameters()) and any(p.dim() == 5 for p in fresh.parameters())
    ep = torch.export.export(fresh, (x[:4],), dynamic_shapes=({0: batch},))
    assert any("gemm_conv2d_bias_act" in str(n.target) for n in ep.graph.nodes)
    check_predictions(ep.module(), digits, "torch.export.export after hold_for_serving")
    check_predictions(fresh, digits, "the model itself after hold_for_serving")


def test_bad_input(digits):
    _, fused, x, _, _ = digits
    with pytest.raises(TypeError, match="nn.Module"):
        resnet_fused.export(lambda t: t, x)
    with pytest.raises(TypeError, match="tensor or a tuple of tensors"):
        resnet_fused.export(fused, [1, 2])
    with pytest.raises(TypeError, match="tensor or a tuple of tensors"):
        resnet_fused.trace(fused, None)
    with pytest.raises(ValueError, match="batch dimension"):
        resnet_fused.export(fused, torch.tensor(1.0))
    with pytest.raises(TypeError, match="nn.Module"):
        resnet_fused.unpack_weights(x)
    with pytest.raises(TypeError, match="float64"):
        resnet_fused.export(fused, x.double())


@pytest.fixture(scope="module")
def resnet50_case():
    """ResNet-50 (random weights, randomised BN statistics), three images, eager's logits and float64's."""
    torchvision = pytest.importorskip("torchvision")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = randomize_bn(torchvision.models.resnet50(weights=None)).eval()
        x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        return model, x, model(x), copy.deepcopy(model).double()(x.double())


@pytest.mark.slow
def test_resnet50_export_and_torchscript(resnet50_case):
    """Exported and TorchScript resnet50 give eager's predictions and meet eager's accuracy rule
    against float64, at a batch size other than the one traced."""
    model, x, eager, ref = resnet50_case
    fused = resnet_fused.fuse(model)
    with torch.inference_mode():
        fused(x)  # prepacks the CPU weights, as a model that served already has
    ep = resnet_fused.export(fused, x[:2])
    _no_onednn_tensors(ep.state_dict)
    # every conv but the 3-channel stem, and the fc, on our matrix products, their panels held in the graph's state
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "resnet_fused" in str(n.target)]
    assert ops.count("resnet_fused.gemm_conv2d_bias_act.default") == 53 and ops.count(
        "resnet_fused.conv2d_bias_act.default") == 1, ops
    assert sum(v.dim() == 5 for v in ep.state_dict.values()) == 53
    ts = resnet_fused.trace(fused, x[:2])
    assert str(ts.inlined_graph).count("resnet_fused::gemm_conv2d_bias_act") == 53
    # (predictions are compared where eager's top two are not within rounding of each other)
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * ref.abs().max()
    for name, run in (("exported", ep.module()), ("TorchScript", ts)):
        with torch.inference_mode():
            out = run(x)
        assert_accuracy_rule(out, [eager], ref, what=f"resnet50 {name}")
        assert torch.equal(out.argmax(1)[clear], eager.argmax(1)[clear]), f"resnet50 {name}: predictions differ"


@pytest.mark.slow
def test_resnet50_export_with_winograd(resnet50_case, tmp_path):
    """export / trace with winograd=True: the layers that run Winograd in the model at the example's
    batch run it in the graph too (the transformed weights carried as constants), the rest as without
    it; eager's accuracy rule at another batch size, through save and load; the live model keeps no
    trace of it."""
    model, x, eager, ref = resnet50_case
    fused = resnet_fused.fuse(model)
    ep = resnet_fused.export(fused, x[:2], winograd=True)
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "resnet_fused" in str(n.target)]
    wino = ops.count("resnet_fused.winograd_conv2d_bias_act.default")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        winograd = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.winograd += "winograd_conv2d_bias_act" in str(func)
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Count():
        fused(x[:2])  # what the model itself runs at that batch
    assert wino == Count.winograd > 0 and ops.count("resnet_fused.gemm_conv2d_bias_act.default") == 53 - wino, ops
    assert all(m._serving_winograd is None for m in fused.modules() if isinstance(m, resnet_fused.FusedConv2d))
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    ts = resnet_fused.trace(fused, x[:2], winograd=True)
    assert str(ts.inlined_graph).count("resnet_fused::winograd_conv2d_bias_act") == wino
    for name, run in (("exported with Winograd", loaded), ("TorchScript with Winograd", ts)):
        with torch.inference_mode():
            out = run(x)
        assert_accuracy_rule(out, [eager], ref, what=f"resnet50 {name}")
