"""The arch layer's instructions, one warp at a time: the emulator against the PTX ISA's fragment
layouts (tests/conformance.py, written separately from the emulator), against the dumps a GPU
recorded (tests/golden/conformance_*.json, by scripts/record_golden.py on a GPU session), and, on a
GPU, the hardware against the same table."""

import glob
import json
import os

import numpy as np
import pytest
import torch

import resnet_fused
from conformance import OPS, expected, make_case

from conftest import needs_cuda

GOLDEN = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "golden", "conformance_*.json")))


def emulated(op, inputs, tile):
    pytest.importorskip("resnet_fused._emu", reason="resnet_fused built without RESNET_FUSED_EMU=1")
    out = torch.ops.resnet_fused_emu.conformance(
        torch.from_numpy(inputs.view(np.int32)), torch.from_numpy(tile.view(np.int32)), OPS[op])
    return out.numpy().view(np.uint32)


def show(op, got, want):
    bad = np.argwhere(got != want)
    lane, word = bad[0]
    return f"{op}: {len(bad)} words differ; lane {lane} word {word}: got {got[lane, word]:#010x}, PTX says {want[lane, word]:#010x}"


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("seed", [0, 1])
def test_emulator_matches_the_ptx_isa(op, seed):
    inputs, tile = make_case(op, seed)
    got, want = emulated(op, inputs, tile), expected(op, inputs, tile)
    assert np.array_equal(got, want), show(op, got, want)


def test_a_wrong_table_is_noticed():
    """The comparison can fail: the A layout with a1 and a2 exchanged gives other answers."""
    inputs, tile = make_case("mma.f16")
    swapped = inputs.copy()
    swapped[:, [1, 2]] = swapped[:, [2, 1]]
    assert not np.array_equal(emulated("mma.f16", swapped, tile), expected("mma.f16", inputs, tile))


@pytest.mark.skipif(not GOLDEN, reason="no golden dumps recorded on a GPU yet (scripts/record_golden.py)")
@pytest.mark.parametrize("path", GOLDEN, ids=os.path.basename)
def test_emulator_matches_the_gpu(path):
    with open(path) as f:
        golden = json.load(f)
    for case in golden["cases"]:
        inputs = np.array(case["inputs"], dtype=np.uint32)
        tile = np.array(case["tile"], dtype=np.uint32)
        want = np.array(case["out"], dtype=np.uint32)
        got = emulated(case["op"], inputs, tile)
        assert np.array_equal(got, want), f"{golden['gpu']}: " + show(case["op"], got, want)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("op", list(OPS))
def test_gpu_matches_the_ptx_isa(op):
    inputs, tile = make_case(op)
    out = torch.ops.resnet_fused._conformance(
        torch.from_numpy(inputs.view(np.int32)).cuda(), torch.from_numpy(tile.view(np.int32)).cuda(), OPS[op])
    got = out.cpu().numpy().view(np.uint32)
    want = expected(op, inputs, tile)
    assert np.array_equal(got, want), show(op, got, want)


def test_conformance_op_checks_its_input():
    pytest.importorskip("resnet_fused._emu", reason="resnet_fused built without RESNET_FUSED_EMU=1")
    inputs, tile = make_case("mma.f16")
    with pytest.raises(ValueError, match="conformance op must be in"):
        torch.ops.resnet_fused_emu.conformance(torch.from_numpy(inputs.view(np.int32)),
                                               torch.from_numpy(tile.view(np.int32)), 99)
    assert resnet_fused is not None
