import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from hypothesis import settings

import resnet_fused

torch.manual_seed(0)

# Tuned kernel choices (resnet_fused.tactics) go to a temporary cache for the whole test session,
# never to the user's: tests that fuse the same shapes share one measurement.
_TACTICS_DIR = tempfile.mkdtemp(prefix="resnet_fused_tactics_")
os.environ["RESNET_FUSED_CACHE_DIR"] = _TACTICS_DIR
atexit.register(shutil.rmtree, _TACTICS_DIR, ignore_errors=True)

# CI replays a fixed set of property-test examples (the suite must not turn red on a new random
# draw); set RF_HYPOTHESIS_RANDOM=1 to explore, as a developer session does.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI") and not os.environ.get("RF_HYPOTHESIS_RANDOM"):
    settings.load_profile("ci")

CUDA = resnet_fused.cuda_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device, or resnet_fused built without CUDA kernels")


_ISA_ORDER = ["avx512", "avx2", "generic"]


def gemm_rule_runs_1x1s() -> bool:
    """Whether tactics.Gemm's rule (tune=False) runs unpadded 1x1s on our kernel on this CPU: where
    its AVX-512 or AVX2 kernel runs. Written here, not asked of the rule: the tests check the rule."""
    return torch.ops.resnet_fused.gemm_isa() in ("avx512", "avx2")


def run_tests_held_to_isa(test_file: str, select: str, isa: str) -> None:
    """Runs the tests of test_file that `-k select` picks in a process held to `isa`
    (RESNET_FUSED_CPU_ISA): the kernels an AVX2-only or older CPU runs, on this one. Skips where this
    CPU runs that ISA by default (the tests themselves cover it) or cannot run it."""
    default = torch.ops.resnet_fused.gemm_isa()
    if _ISA_ORDER.index(isa) <= _ISA_ORDER.index(default):
        pytest.skip(f"this CPU runs {default} by default: the tests themselves cover it")
    here = os.path.dirname(os.path.abspath(test_file))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(test_file),
                           "-k", select], cwd=here, env=dict(os.environ, RESNET_FUSED_CPU_ISA=isa),
                          capture_output=True, text=True)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


# The tests that call run_tests_held_to_isa are skipped in the process they start.
held_to_isa = pytest.mark.skipif("RESNET_FUSED_CPU_ISA" in os.environ, reason="(run from a held-to-ISA test)")


def device_params():
    """cpu always; cuda as a param that skips where there is no GPU (so the skip shows)."""
    return ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.cuda])]


def dtypes_for(device):
    # float16 convolutions on CPU run in PyTorch's slow reference path: tested in op tests only.
    return [torch.float32, torch.bfloat16] if device == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def randomize_bn(model: torch.nn.Module, generator=None):
    """Random BN statistics and affine params, so folding is exercised (fresh BN is identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.3, 0.3, generator=generator)
                    m.running_var.uniform_(0.5, 1.5, generator=generator)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.2, generator=generator)
                    m.bias.uniform_(-0.2, 0.2, generator=generator)
    return model


def max_err(out, ref):
    return (out.double() - ref.double()).abs().max().item()


def tf32(t):
    """float32 rounded to TF32 as cvt.rna does (to nearest, ties away from zero; 10 mantissa bits):
    the operands eager PyTorch's convolutions multiply on a GPU under torch.backends.cudnn.allow_tf32."""
    bits = t.contiguous().view(torch.int32).to(torch.int64)
    rounded = ((bits + 0x1000) & 0xFFFFE000) - ((bits + 0x1000) & 0x80000000) * 2  # back to int32's range
    return rounded.to(torch.int32).view(torch.float32).view(t.shape).contiguous(memory_format=_format_of(t))


def _format_of(t):
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() else torch.contiguous_format


def assert_accuracy_rule(out, eager, ref, factor=2.0, what="", magnitude=None):
    """Flash-attention's rule: the fused error against a float64 reference is at most `factor`
    times eager PyTorch's own error in the same dtype, plus one ulp of the output's scale
    (eager can be bit-exact where it happens to compute the same way).

    `eager` may be a list of eager results computed in the same dtype in the layouts eager
    offers (NCHW, channels_last): their errors differ (oneDNN's NHWC kernels sum in another
    order), and each is eager's own error; the largest is the yardstick.

    `magnitude`, when given, is the float64 sum of the absolute values of the terms behind each
    output (for a conv: conv2d(|x|, |w|) + |bias| + |residual|): the ulp floor is then taken at
    that scale, as a sum's rounding error is bounded by its terms, not by its (possibly
    cancelled) result. Eager can be exact where it happens to use one FMA for x*w + b."""
    eagers = eager if isinstance(eager, (list, tuple)) else [eager]
    eager = max(eagers, key=lambda e: max_err(e, ref))
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == eager.dtype, f"{what}: dtype {out.dtype} != eager's {eager.dtype}"
    assert torch.isfinite(out).all() or not torch.isfinite(ref).all(), f"{what}: non-finite values where the reference has none"
    scale = ref.double().abs().max().item()
    if magnitude is not None:
        scale = max(scale, magnitude.double().abs().max().item())
    ulp = torch.finfo(out.dtype).eps * max(scale, 1e-30)
    e_fused, e_eager = max_err(out, ref), max_err(eager, ref)
    assert e_fused <= factor * e_eager + ulp, (
        f"{what}: fused error {e_fused:.3e} > {factor} x eager error {e_eager:.3e} + ulp {ulp:.3e} "
        f"(output scale {scale:.3e})"
    )


@pytest.fixture
def tactics_cache(tmp_path, monkeypatch):
    """A fresh, empty tactics cache directory (resnet_fused.tactics), and nothing remembered in memory."""
    from resnet_fused import tactics

    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path))
    tactics.clear_memory_cache()
    yield tmp_path
    tactics.clear_memory_cache()
