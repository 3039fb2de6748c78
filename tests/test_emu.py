"""Our CUDA kernels, run unchanged by the host emulator (resnet_fused._emu) on CPU tensors.

The emulator build goes through the same launch layer as the GPU (csrc/cuda/launch.cpp), so these
tests check the fused convolution kernel and the epilogue kernel that a GPU would run, against a
float64 reference under the accuracy rule, plus the emulator's own checks: races, uninitialised
shared memory, cp.async waits, out-of-bounds global accesses, deadlocks, divergent warps.
Built with RESNET_FUSED_EMU=1 (scripts/test.sh does); skipped otherwise.
"""

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_accuracy_rule, tf32
from test_ops import RESNET50_CONVS

pytest.importorskip("resnet_fused._emu", reason="resnet_fused built without RESNET_FUSED_EMU=1")
E = torch.ops.resnet_fused_emu
CL = torch.channels_last
H100_SMS = 132


@pytest.fixture(autouse=True)
def default_options():
    E.set_options()
    yield
    E.set_options()


# ---- the emulator's self-tests ---------------------------------------------------------------
SELFTESTS = {
    "bad_launch": r"invalid launch configuration: a block of \(2048,1,1\) threads",
    "cp_async_not_waited": r"exits with 1 cp.async copies never waited for",
    "cp_async_read_early": r"selftest.cpp:\d+: .* the destination of a cp.async by thread 0 that has not completed",
    "deadlock": r"deadlock, no thread can move on: threads 0-15 wait at .*shfl.sync.bfly.*threads 16-31 wait at .*__syncthreads",
    "divergent_shuffle": r"divergent warp: this lane is at .*selftest.cpp:\d+: shfl.sync.bfly while lanes 0-15 wait at",
    "exited_lane": r"thread \(5,0,0\) .* exits while lanes 0-4 of its warp wait at .*shfl.sync.idx",
    "misaligned": r"global load of 16 bytes at a misaligned global address \(address % 16 = 4\)",
    "missing_barrier": r"reads shared offset 0, written by thread 0 since the last __syncthreads \(a missing barrier",
    "out_of_bounds": r"out-of-bounds global read \(global load, 4 bytes\): 4 bytes past the end of 'in' \(256 bytes\)",
    "overwrite_race": r"writes shared offset 0, read by .* since the last __syncthreads \(a missing barrier before the overwrite",
    "read_only_store": r"global store writes into 'in', a read-only input",
    "smem_overflow": r"accesses 4 bytes at shared offset 256, outside the 256 bytes of dynamic shared memory",
    "uninitialised": r"reads shared offset 32, which nothing has written in this block",
    "ok_barrier": None,
    "ok_cp_async_zfill": None,
    "ok_exit_then_barrier": None,
    "ok_syncwarp": None,
}


def test_selftests_listed():
    assert sorted(E.selftests()) == sorted(SELFTESTS)


@pytest.mark.parametrize("name", sorted(SELFTESTS))
def test_selftest(name):
    expected = SELFTESTS[name]
    if expected is None:
        E.selftest(name)
    else:
        with pytest.raises(RuntimeError, match=expected):
            E.selftest(name)


def test_missing_barrier_unseen_without_the_race_check():
    """What the race check adds: the emulator runs a block's threads one after another, so a
    missing barrier gives the right answer there; only the check reports it."""
    E.set_options(check_races=False)
    E.selftest("missing_barrier")


# ---- the epilogue kernel ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("bias,residual,relu", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("shape", [(2, 16, 3, 5), (1, 3, 7, 1), (3, 24, 4, 4)], ids=lambda s: "x".join(map(str, s)))
def test_epilogue(dtype, layout, bias, residual, relu, shape):
    g = torch.Generator().manual_seed(hash((shape, bias, residual, relu)) % 2**31)
    fmt = CL if layout == "nhwc" else torch.contiguous_format
    src = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
    b = torch.randn(shape[1], generator=g) if bias else None
    r = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt) if residual else None
    out = E.epilogue(src, b, r, relu)
    ref = src.double() + (b.double().view(1, -1, 1, 1) if bias else 0) + (r.double() if residual else 0)
    ref = ref.relu() if relu else ref
    eager = src.float() + (b.view(1, -1, 1, 1) if bias else 0) + (r.float() if residual else 0)
    eager = (eager.relu() if relu else eager).to(dtype)
    assert out.is_contiguous(memory_format=fmt)
    assert_accuracy_rule(out, eager, ref, what="epilogue")


# ---- the fused convolution kernel --------------------------------------------------------------
def make_case(n, c, k, ksz, stride, h, w, dtype, residual, pad=None, dil=1, seed=0, groups=1):
    g = torch.Generator().manual_seed(seed)
    pad = ksz // 2 * dil if pad is None else pad
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=CL)
    wt = (torch.randn(k, c // groups, ksz, ksz, generator=g) / (c // groups * ksz * ksz) ** 0.5).to(dtype)
    b = torch.randn(k, generator=g) * 0.5
    ho = (h + 2 * pad - dil * (ksz - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dil * (ksz - 1) - 1) // stride + 1
    r = torch.randn(n, k, ho, wo, generator=g).to(dtype).contiguous(memory_format=CL) if residual else None
    kw = dict(stride=[stride] * 2, padding=[pad] * 2, dilation=[dil] * 2)
    if groups > 1:
        kw["groups"] = groups
    return x, wt, b, r, kw


def conv_reference(x, wt, b, r, relu, kw, dtype):
    """F.conv2d + bias + residual + relu in `dtype` (float64 for the reference), in the layout given."""
    def run(fmt):
        y = F.conv2d(x.to(dtype).contiguous(memory_format=fmt), wt.to(dtype).contiguous(memory_format=fmt),
                     b.to(dtype), **kw)
        if r is not None:
            y = y + r.to(dtype)
        return y.relu() if relu else y
    if dtype == torch.float64:
        return run(torch.contiguous_format)
    return [run(torch.contiguous_format), run(CL)]


def terms_magnitude(x, wt, b, r, kw):
    y = F.conv2d(x.double().abs(), wt.double().abs(), b.double().abs(), **kw)
    return y if r is None else y + r.double().abs()


def check_emulated_conv(x, wt, b, r, relu, kw, tile=-1, splits=-1, what=""):
    out = E.conv2d_bias_act(x, wt, b, r, kw["stride"], kw["padding"], kw["dilation"], relu, H100_SMS, tile, splits,
                            kw.get("groups", 1))
    assert out.is_contiguous(memory_format=CL), f"{what}: output not channels-last"
    ref = conv_reference(x, wt, b, r, relu, kw, torch.float64)
    if x.dtype == torch.float32:
        # eager float32 on a GPU runs cuDNN on TF32 (torch.backends.cudnn.allow_tf32, on by default):
        # its operands rounded to TF32, the sums in float32
        eager = conv_reference(tf32(x), tf32(wt), b, r, relu, kw, torch.float32)
    else:
        eager = conv_reference(x, wt, b, r, relu, kw, x.dtype)
    assert_accuracy_rule(out, eager, ref, what=what, magnitude=terms_magnitude(x, wt, b, r, kw))
    return out


# Every ResNet-50 conv with its real channel counts, at a reduced batch and spatial size.
REDUCED_SIZE = {224: 17, 56: 9, 28: 7, 14: 6, 7: 5}


@pytest.mark.parametrize("shape", RESNET50_CONVS, ids=lambda s: "C{}K{}k{}s{}H{}{}".format(*s[:5], "r" if s[5] else ""))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "tf32"])
def test_resnet50_shapes(shape, dtype):
    c, k, ksz, stride, h, residual = shape
    hr = REDUCED_SIZE[h]
    x, wt, b, r, kw = make_case(2, c, k, ksz, stride, hr, hr + 2, dtype, residual, seed=c + k + ksz)
    check_emulated_conv(x, wt, b, r, True, kw, what=f"{shape} at {hr}x{hr + 2}")


@pytest.mark.parametrize("tile", [0, 1, 2, 3, 4], ids=["128x128", "128x64", "64x64", "128x128k64", "256x128"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_every_tile_and_split(tile, splits, dtype):
    """Partial tiles in M (150 pixels), N (72 channels) and K (a reduction of 9 x 40 = 360, not a
    multiple of 32), for each block tile, with and without split-K."""
    x, wt, b, r, kw = make_case(2, 40, 72, 3, 1, 5, 15, dtype, residual=True, seed=tile * 10 + splits)
    check_emulated_conv(x, wt, b, r, True, kw, tile=tile, splits=splits, what=f"tile {tile} splits {splits}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_eight_warp_tile_over_several_blocks(dtype):
    """256x128 (8 warps, 4 x 2) over 2 x 2 blocks, both partial (312 pixels, 136 channels), in place."""
    x, wt, b, r, kw = make_case(2, 32, 136, 3, 1, 12, 13, dtype, residual=True, seed=5)
    out = check_emulated_conv(x, wt, b, r, True, kw, tile=4, splits=1, what="256x128 over 2 x 2 blocks")
    buf = r.clone()
    E.conv2d_bias_act_(buf, x, wt, b, kw["stride"], kw["padding"], kw["dilation"], True, H100_SMS, 4, 1)
    torch.testing.assert_close(buf, out, rtol=0, atol=0)


# ResNeXt-50 32x4d's grouped 3x3s (32 groups of 4, 8, 16, 32 channels; stride 2 opening layers 2-4),
# at reduced size.
RESNEXT50_GROUPED = [(128, 1, 56), (256, 2, 56), (256, 1, 28), (512, 2, 28), (512, 1, 14), (1024, 2, 14),
                     (1024, 1, 7)]


@pytest.mark.parametrize("shape", RESNEXT50_GROUPED, ids=lambda s: "C{}s{}H{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_resnext50_grouped_shapes(shape, dtype):
    c, stride, h = shape
    hr = REDUCED_SIZE[h]
    x, wt, b, r, kw = make_case(2, c, c, 3, stride, hr, hr + 1, dtype, residual=False, seed=c + stride, groups=32)
    check_emulated_conv(x, wt, b, r, True, kw, what=f"grouped {shape} at {hr}x{hr + 1}")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize(
    "c,k,groups,plan",
    [(48, 144, 3, (2, 0)),   # groups of 48 output channels: 64-wide blocks end inside a group
     (256, 256, 2, (2, 0)),  # groups of 128: a block within one group
     (32, 64, 8, (1, 1))],   # groups of 4 input channels: 8-byte loads (128x64), 8 output channels each
    ids=["48-144g3", "256g2", "32-64g8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_grouped_blocks_and_splits(splits, c, k, groups, plan, dtype):
    """The two kernels that take groups (64x64; 128x64 with 8-byte loads), whatever tile is asked
    for, with blocks that span several groups, part of one, or end inside one; with split-K."""
    x, wt, b, r, kw = make_case(2, c, k, 3, 1, 5, 7, dtype, residual=True, seed=splits + groups, groups=groups)
    assert tuple(E.plan(list(x.shape), list(wt.shape), [1, 1], [1, 1], [1, 1], H100_SMS, groups)[::2]) == plan
    check_emulated_conv(x, wt, b, r, True, kw, tile=0, splits=splits, what=f"{groups} groups, splits {splits}")


@pytest.mark.parametrize("c,k,ksz,groups", [(3, 64, 7, 1), (4, 32, 3, 1), (8, 16, 3, 1), (64, 256, 1, 1), (128, 128, 3, 32),
                                         (256, 256, 3, 32), (1024, 1024, 3, 32), (48, 144, 3, 3), (24, 24, 3, 6)])
def test_the_tactics_know_which_tile_runs_a_layer(c, k, ksz, groups):
    """tactics.fixed_cuda_tile (which CUDA candidates are worth timing) agrees with plan_conv: where
    it names a tile, every tile asked for plans that one; where it names none, each is planned as asked."""
    from resnet_fused import tactics
    fixed = tactics.fixed_cuda_tile(groups, c)
    for tile in range(5):
        planned = E.plan([1, c, 3, 3], [k, c // groups, ksz, ksz], [1, 1], [ksz // 2] * 2, [1, 1], H100_SMS, groups,
                         tile)[0]
        assert planned == (tile if fixed is None else fixed), (tile, planned, fixed)


def test_grouped_in_place():
    x, wt, b, r, kw = make_case(2, 128, 128, 3, 1, 6, 5, torch.float16, residual=True, groups=32)
    expected = check_emulated_conv(x, wt, b, r, True, kw, what="grouped")
    buf = r.clone()
    E.conv2d_bias_act_(buf, x, wt, b, kw["stride"], kw["padding"], kw["dilation"], True, H100_SMS, -1, -1, 32)
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "n,c,k,ksz,stride,h,w,pad,dil",
    [
        (1, 64, 64, 1, 1, 1, 1, 0, 1),     # a 1x1 map
        (1, 64, 128, 3, 1, 7, 7, 1, 1),    # a 7x7 map
        (1, 32, 64, 3, 1, 37, 53, 1, 1),   # 37x53
        (1, 32, 64, 3, 2, 37, 53, 1, 1),   # strided, odd
        (3, 16, 24, 3, 1, 6, 5, 2, 2),     # dilated
        (1, 8, 16, 5, 2, 11, 9, 0, 1),     # no padding, 5x5
        (1, 3, 64, 7, 2, 31, 29, 3, 1),    # the stem, 3 channels (padded to 4)
        (2, 4, 32, 3, 1, 5, 5, 1, 1),      # 4 channels: 8-byte loads
        (1, 1, 8, 3, 1, 4, 4, 1, 1),       # 1 channel
        (1, 8, 16, 16, 1, 9, 20, 8, 1),    # the largest filter the loader's masks hold
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "tf32"])
def test_odd_sizes(n, c, k, ksz, stride, h, w, pad, dil, dtype):
    x, wt, b, r, kw = make_case(n, c, k, ksz, stride, h, w, dtype, residual=True, pad=pad, dil=dil)
    check_emulated_conv(x, wt, b, r, True, kw, what="odd size")


@pytest.mark.parametrize("residual,relu", [(False, False), (False, True), (True, False)])
def test_epilogue_variants(residual, relu):
    x, wt, b, r, kw = make_case(1, 64, 64, 3, 1, 6, 6, torch.float16, residual)
    check_emulated_conv(x, wt, b, r, relu, kw, what=f"residual={residual} relu={relu}")


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "tf32"])
def test_in_place(splits, dtype):
    x, wt, b, r, kw = make_case(2, 64, 256, 1, 1, 5, 5, dtype, residual=True)
    expected = E.conv2d_bias_act(x, wt, b, r, kw["stride"], kw["padding"], kw["dilation"], True, H100_SMS, -1, splits)
    buf = r.clone()
    ptr = buf.data_ptr()
    E.conv2d_bias_act_(buf, x, wt, b, kw["stride"], kw["padding"], kw["dilation"], True, H100_SMS, -1, splits)
    assert buf.data_ptr() == ptr
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["f16", "tf32"])
def test_nan_and_inf_propagate_like_eager(dtype):
    x, wt, b, r, kw = make_case(1, 16, 32, 3, 1, 6, 6, dtype, residual=True)
    x[0, 3, 2, 2] = float("nan")
    x[0, 5, 4, 1] = float("inf")
    r[0, 7, 0, 0] = float("-inf")
    out = E.conv2d_bias_act(x, wt, b, r, kw["stride"], kw["padding"], kw["dilation"], True, H100_SMS, -1, -1)
    ref = conv_reference(x, wt, b, r, True, kw, torch.float64)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    assert torch.equal(out[out.isinf()], ref[ref.isinf()].to(out.dtype))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(dtype=torch.float32, groups=2, c=16), "grouped float32"),
        (dict(layout="nchw"), "input not channels-last"),
        (dict(k=12), "output channels not a multiple of 8"),
        (dict(c=6), "input channels not a multiple of 4"),
        (dict(residual_dtype=torch.bfloat16), "residual must have the input's dtype"),
        (dict(ksz=17), "a filter taller or wider than 16"),
        (dict(c=16, groups=8), "input channels per group not a multiple of 4"),
    ],
)
def test_unsupported_calls_raise(change, match):
    dtype = change.get("dtype", torch.float16)
    x, wt, b, r, kw = make_case(1, change.get("c", 8), change.get("k", 16), change.get("ksz", 3), 1, 4, 4, dtype,
                                residual=True, groups=change.get("groups", 1))
    if change.get("layout") == "nchw":
        x = x.contiguous()
    if "residual_dtype" in change:
        r = r.to(change["residual_dtype"])
    with pytest.raises((ValueError, TypeError), match=match):
        E.conv2d_bias_act(x, wt, b, r, kw["stride"], kw["padding"], kw["dilation"], True, H100_SMS, -1, -1,
                          kw.get("groups", 1))


def test_float32_only_where_tf32_is_allowed(monkeypatch):
    """float32 runs on TF32 tensor cores only where PyTorch lets cuDNN's convolutions do so."""
    x, wt, b, r, kw = make_case(1, 16, 32, 3, 1, 5, 5, torch.float32, residual=True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    with pytest.raises(ValueError, match=r"float32 with TF32 off \(torch.backends.cudnn.allow_tf32\)"):
        E.conv2d_bias_act(x, wt, b, r, kw["stride"], kw["padding"], kw["dilation"], True, H100_SMS, -1, -1)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    check_emulated_conv(x, wt, b, r, True, kw, what="TF32 allowed again")


def test_tf32_rounds_rather_than_truncates():
    """Operands that TF32 rounding moves up (the dropped 13 bits just over half) come out as a
    rounding kernel gives them, not as truncation would: 1 + 2^-11 + 2^-20 rounds to 1 + 2^-10."""
    v = 1.0 + 2.0 ** -11 + 2.0 ** -20
    x = torch.full((1, 8, 1, 1), v).contiguous(memory_format=CL)
    wt = torch.ones(8, 8, 1, 1)
    out = E.conv2d_bias_act(x, wt, None, None, [1, 1], [0, 0], [1, 1], False, H100_SMS, -1, -1)
    assert out.flatten().tolist() == [8 * (1.0 + 2.0 ** -10)] * 8


@pytest.mark.parametrize("order", [1, 2], ids=["descending", "shuffled"])
def test_result_does_not_depend_on_thread_order(order):
    x, wt, b, r, kw = make_case(2, 64, 128, 3, 1, 5, 7, torch.float16, residual=True)
    args = (x, wt, b, r, kw["stride"], kw["padding"], kw["dilation"], True, H100_SMS, 1, 2)
    first = E.conv2d_bias_act(*args)
    E.set_options(lane_order=order, workers=1)
    torch.testing.assert_close(E.conv2d_bias_act(*args), first, rtol=0, atol=0)


def test_plan_splits_late_layers_at_batch_1():
    """Layer4's 3x3 at batch 1 has 8 output tiles of 64: split-K fills the GPU; at batch 256 it
    has plenty of 128x128 tiles (392 for 132 SMs) and no split."""
    tile, splits, narrow, ws = E.plan([1, 512, 7, 7], [512, 512, 3, 3], [1, 1], [1, 1], [1, 1], H100_SMS)
    assert (tile, narrow) == (2, 0) and splits > 4 and ws == splits * 49 * 512 * 4
    tile, splits, _, ws = E.plan([256, 512, 7, 7], [512, 512, 3, 3], [1, 1], [1, 1], [1, 1], H100_SMS)
    assert (tile, splits, ws) == (0, 1, 0)
    assert E.plan([8, 3, 224, 224], [64, 3, 7, 7], [2, 2], [3, 3], [1, 1], H100_SMS)[2] == 1


@st.composite
def conv_configs(draw):
    ksz = draw(st.sampled_from([1, 3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    dil = draw(st.sampled_from([1, 2])) if ksz > 1 else 1
    pad = draw(st.integers(0, ksz // 2 * dil))
    smallest = max(1, dil * (ksz - 1) + 1 - 2 * pad)  # an output of at least 1x1
    h = draw(st.integers(smallest, 12))
    w = draw(st.integers(smallest, 12))
    c = draw(st.sampled_from([3, 4, 8, 16, 24, 64]))
    k = draw(st.sampled_from([8, 16, 40, 64, 136]))
    # groups: any common divisor leaving whole 4-channel chunks per input group
    groups = draw(st.sampled_from([g for g in (1, 2, 4, 8) if c % (4 * g) == 0 and k % g == 0] or [1]))
    return dict(n=draw(st.integers(1, 3)), c=c, k=k, groups=groups, ksz=ksz, stride=stride, h=h, w=w, pad=pad, dil=dil,
                dtype=draw(st.sampled_from([torch.float16, torch.bfloat16])), residual=draw(st.booleans()),
                relu=draw(st.booleans()), tile=draw(st.sampled_from([-1, 0, 1, 2, 3])),
                splits=draw(st.sampled_from([-1, 1, 2, 5])))


@settings(max_examples=25, deadline=None)
@given(cfg=conv_configs())
def test_random_configurations(cfg):
    relu, tile, splits = cfg.pop("relu"), cfg.pop("tile"), cfg.pop("splits")
    x, wt, b, r, kw = make_case(cfg["n"], cfg["c"], cfg["k"], cfg["ksz"], cfg["stride"], cfg["h"], cfg["w"], cfg["dtype"],
                                cfg["residual"], pad=cfg["pad"], dil=cfg["dil"], groups=cfg["groups"])
    check_emulated_conv(x, wt, b, r, relu, kw, tile=tile, splits=splits, what=str(cfg))


# ---- planted defects ----------------------------------------------------------------------------
# The emulator runs our real conv kernel as if its source had one bug (csrc/emu/runtime.h, Inject);
# each must be reported by the check named, and goes unreported with that check switched off.
PLANTED = {
    "missing barrier": (dict(skip_barrier=1), "check_races", r"a missing barrier before the overwrite: a race"),
    "too-loose wait_group": (dict(loosen_wait=1), "check_async",
                             r"the destination of a cp.async .* has not completed \(a missing or too-loose cp.async.wait_group\)"),
    "out-of-bounds read": (dict(ignore_zfill=True), "check_bounds", r"out-of-bounds global read \(cp.async.cg"),
    "uninitialised shared memory": (dict(drop_cp_async=0), "check_uninit",
                                    r"which nothing has written in this block \(uninitialised shared memory\)"),
}


def planted_case():
    return make_case(1, 64, 128, 3, 1, 6, 6, torch.float16, residual=False)


def run_planted(**options):
    x, wt, b, r, kw = planted_case()
    E.set_options(**options)
    return E.conv2d_bias_act(x, wt, b, r, kw["stride"], kw["padding"], kw["dilation"], False, H100_SMS, 2, 1)


@pytest.mark.parametrize("name", list(PLANTED))
def test_planted_defect_is_caught(name):
    inject, check, message = PLANTED[name]
    with pytest.raises(RuntimeError, match=r"csrc/cuda/kernels/implicit_gemm.cuh:\d+: kernel conv_kernel<64x64,f16>.*" + message):
        run_planted(**inject)
    # Without that check the launch passes (its output is poisoned or wrong, unseen by the launch).
    others_off = dict(check_races=False, check_uninit=False, check_async=False, check_bounds=False,
                      check_global_init=False)
    run_planted(**inject, **others_off)


@pytest.mark.parametrize("splits", [1, 3])
def test_planted_unwritten_element_is_caught(splits):
    """Thread 0 of each block skips its first global store: with split-K the reduction then reads a
    workspace byte no kernel wrote (what compute-sanitizer's initcheck reports); without, an output
    element is left as at::empty gave it, which a comparison can miss (stale memory that happens to
    hold the right value)."""
    x, wt, b, r, kw = planted_case()
    args = (x, wt, b, r, kw["stride"], kw["padding"], kw["dilation"], False, H100_SMS, 2, splits)
    E.set_options(drop_global_store=0)
    message = (r"kernel splitk_reduce_kernel<f16>.*global load of 8 bytes at byte \d+ of 'split-K workspace', which "
               r"no kernel has written since it was allocated" if splits > 1 else
               r"the launches left 'output' partly unwritten \(byte \d+ of 9216\)")
    with pytest.raises(RuntimeError, match=message):
        E.conv2d_bias_act(*args)
    E.set_options(drop_global_store=0, check_global_init=False)
    E.conv2d_bias_act(*args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["f16", "tf32"])
def test_planted_wrong_fragment_order_fails_the_accuracy_rule(dtype):
    x, wt, b, r, kw = planted_case()
    x, wt, r = x.to(dtype), wt.to(dtype), r.to(dtype) if r is not None else None
    E.set_options(swap_mma_a=True)
    with pytest.raises(AssertionError, match="fused error"):
        check_emulated_conv(x, wt, b, r, False, kw, tile=2, splits=1, what="a1/a2 swapped")


def test_checks_pass_the_kernel_as_written():
    x, wt, b, r, kw = planted_case()
    check_emulated_conv(x, wt, b, r, False, kw, tile=2, splits=1, what="no defect")


def test_emulator_error_names_kernel_block_thread_and_line():
    with pytest.raises(RuntimeError) as info:
        run_planted(skip_barrier=1)
    msg = str(info.value)
    assert re.search(r"block \(\d+,\d+,\d+\), thread \(\d+,0,0\) \(warp \d, lane \d+\)", msg), msg


# ---- whole models ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "tf32"])
def test_whole_model_on_the_emulated_gpu_kernel(name, dtype, monkeypatch):
    """A fused torchvision ResNet with every convolution run by the emulated GPU kernel, as
    conv2d_bias_act runs it on a GPU (the module's weight and bias, its residual, in place or
    not; the downsampling blocks' pairs as our dual kernel in float16/bfloat16), against float64 and
    eager in the same dtype (float32: eager as a GPU runs it under
    torch.backends.cudnn.allow_tf32, each convolution's input and weight rounded to TF32; ResNeXt's
    grouped layers, which keep cuDNN there, run eager's way)."""
    from test_fuse import fused_and_reference, torchvision_model  # skips without torchvision

    from resnet_fused import FusedConv2d, FusedDual
    from resnet_fused.modules import FusedLinear

    calls = []

    def on_emulated_gpu_kernel(self, x, residual=None, assume_finite=False):
        if isinstance(self, FusedLinear):  # (a classifier head is F.linear on a GPU, as in eager)
            w = self.dense_weight().to(x.dtype).flatten(1)
            return F.linear(x.flatten(1), w, self.bias.to(x.dtype))[:, :, None, None]
        w = self.dense_weight().to(x.dtype).contiguous(memory_format=CL)
        calls.append(self)
        if x.dtype == torch.float32 and self.groups > 1:
            y = F.conv2d(tf32(x), tf32(w), self.bias, self.stride, self.padding, self.dilation, self.groups)
            y = y + residual if residual is not None else y
            return y.relu() if self.relu else y
        if residual is not None and self.inplace_residual:
            E.conv2d_bias_act_(residual, x, w, self.bias.float(), self.stride, self.padding, self.dilation, self.relu,
                               H100_SMS, -1, -1, self.groups)
            return residual
        return E.conv2d_bias_act(x, w, self.bias.float(), residual, self.stride, self.padding, self.dilation,
                                 self.relu, H100_SMS, -1, -1, self.groups)

    duals = []

    def dual_on_emulated_gpu_kernel(self, y, x, assume_finite=False):
        # (float16/bfloat16: a downsampling block's last 1x1 and its downsample as our dual kernel,
        # as FusedDual runs it where the tactics chose it; float32 keeps the two layers)
        if y.dtype == torch.float32:
            return self.separate(y, x, assume_finite)
        duals.append(self)
        w, b = self.dual_weights(y)
        return E.conv1x1_dual_bias_act(y, w, b, x, self.stride2, self.conv.relu, H100_SMS, -1, -1)

    monkeypatch.setattr(FusedConv2d, "forward", on_emulated_gpu_kernel)
    monkeypatch.setattr(FusedDual, "forward", dual_on_emulated_gpu_kernel)
    model = torchvision_model(name)
    x = torch.randn(2, 3, 64, 64)
    out, eagers, ref, fused = fused_and_reference(model, x, dtype, "cpu", channels_last=True)
    assert len(calls) + 2 * len(duals) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert len(duals) == (0 if dtype == torch.float32 or name == "resnet18" else 4)
    if dtype == torch.float32:
        eagers = eager_on_tf32(model, x)
    assert_accuracy_rule(out, eagers, ref, what=f"{name} {dtype} on the emulated kernel")
    assert torch.equal(out.argmax(1), ref.argmax(1))


def eager_on_tf32(model, x):
    """The model in float32 as eager PyTorch runs it on a GPU with TF32 allowed: every convolution
    multiplies its input and weight rounded to TF32 (in both layouts, as fused_and_reference)."""
    import copy

    tf = copy.deepcopy(model).float()
    for m in tf.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = tf32(m.weight.data)
            m.register_forward_pre_hook(lambda mod, args: (tf32(args[0]),))
    with torch.inference_mode():
        return [tf(x), tf.to(memory_format=CL)(x.contiguous(memory_format=CL))]


def test_views_that_start_off_alignment():
    """A sliced input (its data 2 bytes past a 16-byte boundary) runs, copied to aligned storage; a
    residual not 16-byte aligned is refused with the reason (the GPU op then takes the cuDNN path)."""
    x, wt, b, r, kw = make_case(1, 16, 32, 3, 1, 5, 6, torch.float16, residual=True)
    xs = torch.randn(x.numel() + 1).half()[1:].view(1, 5, 6, 16).permute(0, 3, 1, 2)
    xs.copy_(x)
    assert xs.is_contiguous(memory_format=CL) and xs.data_ptr() % 16 == 2
    out = check_emulated_conv(xs, wt, b, r, True, kw, what="a sliced input")
    torch.testing.assert_close(out, E.conv2d_bias_act(x, wt, b, r, kw["stride"], kw["padding"], kw["dilation"], True,
                                                      H100_SMS, -1, -1), rtol=0, atol=0)
    bs = torch.randn(b.numel() + 2)[2:]  # a bias 8 bytes past a 16-byte boundary: copied (read 4 at a time)
    bs.copy_(b)
    assert bs.data_ptr() % 16 == 8
    torch.testing.assert_close(E.conv2d_bias_act(x, wt, bs, r, kw["stride"], kw["padding"], kw["dilation"], True,
                                                 H100_SMS, -1, -1), out, rtol=0, atol=0)
    for elements in (1, 2):  # 2 and 4 bytes past a 16-byte boundary: the epilogue moves 16 bytes at a time
        rs = torch.randn(r.numel() + elements).half()[elements:].view(1, 5, 6, 32).permute(0, 3, 1, 2)
        rs.copy_(r)
        assert rs.is_contiguous(memory_format=CL) and rs.data_ptr() % 16 == 2 * elements
        with pytest.raises(ValueError, match="residual not 16-byte aligned"):
            E.conv2d_bias_act_(rs, x, wt, b, kw["stride"], kw["padding"], kw["dilation"], True, H100_SMS, -1, -1)
