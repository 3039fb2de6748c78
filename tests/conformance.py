"""The conformance cases of the arch layer's instructions, and what the PTX ISA says each lane holds.

Shared by tests/test_emu_conformance.py (the emulator against this table and against golden
files) and scripts/record_golden.py (the same inputs on a GPU, recorded as tests/golden/*.json).

The table below is written from the PTX ISA text ("Matrix Fragments for mma.m16n8k16 with
floating point type", "Warp-level matrix load instruction: ldmatrix", "shfl.sync",
"cp.async"), separately from the emulator's code in csrc/cuda/arch/emu.h.
"""

import numpy as np

OPS = {
    "ldmatrix.x1": 0, "ldmatrix.x2": 1, "ldmatrix.x4": 2,
    "ldmatrix.x1.trans": 3, "ldmatrix.x2.trans": 4, "ldmatrix.x4.trans": 5,
    "mma.f16": 6, "mma.bf16": 7, "shfl.bfly": 8, "shfl.idx": 9, "cp.async.16": 10, "cp.async.8": 11,
    "mma.tf32": 12, "cvt.tf32": 13,
}
IN_WORDS, OUT_WORDS = 16, 4


# ---- the PTX ISA's fragment layouts, lane l: g = l // 4, t = l % 4 ---------------------------
def mma_a_position(lane, e):
    """A (16x16, row-major), element e (0..7) of lane: a_{e//2}, low half for even e."""
    g, t = lane // 4, lane % 4
    row = g if e in (0, 1, 4, 5) else g + 8
    col = 2 * t + (e & 1) + (8 if e >= 4 else 0)
    return row, col


def mma_b_position(lane, e):
    """B (16x8, column-major), element e (0..3): b_{e//2}."""
    g, t = lane // 4, lane % 4
    return 2 * t + (e & 1) + (8 if e >= 2 else 0), g


def mma_cd_position(lane, i):
    """C and D (16x8 float), element i (0..3)."""
    g, t = lane // 4, lane % 4
    return g + (8 if i >= 2 else 0), 2 * t + (i & 1)


def mma_tf32_a_position(lane, e):
    """m16n8k8 TF32: A (16x8, row-major), register a_e (0..3) of lane."""
    g, t = lane // 4, lane % 4
    return g + 8 * (e & 1), t + 4 * (e >> 1)


def mma_tf32_b_position(lane, e):
    """m16n8k8 TF32: B (8x8, column-major), register b_e (0..1)."""
    g, t = lane // 4, lane % 4
    return t + 4 * e, g


def tf32_rna(bits):
    """cvt.rna.tf32.f32 of finite float32 bits: to nearest, ties away from zero, 10 mantissa bits."""
    bits = int(bits)
    return ((bits + 0x1000) & 0xFFFFE000) & 0xFFFFFFFF


def ldmatrix_positions(lane, trans):
    """(row, column) of the two 16-bit elements lane receives from each 8x8 matrix (low, high)."""
    if trans:
        return [(2 * (lane % 4), lane // 4), (2 * (lane % 4) + 1, lane // 4)]
    return [(lane // 4, 2 * (lane % 4)), (lane // 4, 2 * (lane % 4) + 1)]


# ---- the cases -------------------------------------------------------------------------------
def _halves_to_words(h):
    h = np.asarray(h, dtype=np.uint16).reshape(-1, 2)
    return (h[:, 0].astype(np.uint32) | (h[:, 1].astype(np.uint32) << 16)).astype(np.uint32)


def _small_ints_as(kind, values):
    """Small integers as float16 or bfloat16 bit patterns (exact in both)."""
    f = np.asarray(values, dtype=np.float32)
    if kind == "f16":
        return f.astype(np.float16).view(np.uint16)
    return (f.view(np.uint32) >> 16).astype(np.uint16)  # exact: small integers need no rounding


def make_case(op, seed=0):
    """(inputs [32, 16] uint32, tile [128] uint32) for one instruction."""
    rng = np.random.default_rng(seed + 101 * OPS[op])
    inputs = np.zeros((32, IN_WORDS), dtype=np.uint32)
    # The tile: 32 rows of eight 16-bit elements, element (r, c) = 256 * r + c + 1 (never 0).
    tile_halves = np.array([[256 * r + c + 1 for c in range(8)] for r in range(32)], dtype=np.uint16)
    tile = _halves_to_words(tile_halves.reshape(-1))
    if op.startswith("ldmatrix"):
        inputs[:, 0] = rng.permutation(32)  # each lane points at some row
    elif op == "mma.tf32":
        # small integers and halves: exact in TF32, products and sums exact in float32
        inputs[:, 0:6] = (rng.integers(-8, 9, size=(32, 6)) / 2).astype(np.float32).view(np.uint32)
        inputs[:, 6:10] = rng.integers(-50, 51, size=(32, 4)).astype(np.float32).view(np.uint32)
    elif op == "cvt.tf32":
        # random finite floats, and exact ties (the 13 dropped bits 0x1000) of both signs
        f = (rng.standard_normal((32, 4)) * 10.0 ** rng.integers(-6, 7, size=(32, 4))).astype(np.float32)
        inputs[:, 0:4] = f.view(np.uint32)
        inputs[:8, 0] = (inputs[:8, 0] & np.uint32(0xFFFFE000)) | np.uint32(0x1000)
    elif op.startswith("mma"):
        kind = op.split(".")[1]
        a = rng.integers(-4, 5, size=(32, 8))
        b = rng.integers(-4, 5, size=(32, 4))
        c = rng.integers(-50, 51, size=(32, 4)).astype(np.float32)
        for lane in range(32):
            inputs[lane, 0:4] = _halves_to_words(_small_ints_as(kind, a[lane]))
            inputs[lane, 4:6] = _halves_to_words(_small_ints_as(kind, b[lane]))
            inputs[lane, 6:10] = c[lane].view(np.uint32)
    elif op.startswith("shfl"):
        inputs[:, 0] = rng.integers(0, 2**32, size=32, dtype=np.uint64).astype(np.uint32)
        inputs[:, 1] = rng.integers(0, 32, size=32) if op == "shfl.idx" else rng.integers(0, 32)
    else:
        bytes_ = 16 if op == "cp.async.16" else 8
        inputs[:, 0] = rng.integers(0, bytes_ + 1, size=32)
        inputs[:4, 0] = [0, bytes_, 1, bytes_ - 1]
    return inputs, tile


def expected(op, inputs, tile):
    """What every lane holds after the instruction, per the PTX ISA: [32, 4] uint32."""
    out = np.zeros((32, OUT_WORDS), dtype=np.uint32)
    halves = tile.view(np.uint16).reshape(32, 8)  # little-endian: word = low | high << 16
    if op.startswith("ldmatrix"):
        x = int(op.split(".")[1][1])
        trans = op.endswith("trans")
        rows = inputs[:, 0] % 32
        for m in range(x):
            matrix = np.stack([halves[rows[8 * m + i]] for i in range(8)])  # lanes 8m..8m+7 give rows
            for lane in range(32):
                (r0, c0), (r1, c1) = ldmatrix_positions(lane, trans)
                out[lane, m] = np.uint32(matrix[r0, c0]) | (np.uint32(matrix[r1, c1]) << np.uint32(16))
    elif op == "mma.tf32":
        def f32(bits):
            return float(np.uint32(bits).view(np.float32))

        A, B, C = np.zeros((16, 8)), np.zeros((8, 8)), np.zeros((16, 8))
        for lane in range(32):
            words = inputs[lane]
            for e in range(4):
                A[mma_tf32_a_position(lane, e)] = f32(words[e])
            for e in range(2):
                B[mma_tf32_b_position(lane, e)] = f32(words[4 + e])
            for i in range(4):
                C[mma_cd_position(lane, i)] = f32(words[6 + i])
        D = A @ B + C
        for lane in range(32):
            out[lane] = np.array([D[mma_cd_position(lane, i)] for i in range(4)], dtype=np.float32).view(np.uint32)
    elif op == "cvt.tf32":
        for lane in range(32):
            out[lane] = [tf32_rna(inputs[lane, j]) for j in range(4)]
    elif op.startswith("mma"):
        kind = op.split(".")[1]

        def value(bits):
            if kind == "f16":
                return float(np.uint16(bits).view(np.float16))
            return float(np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32))

        A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
        for lane in range(32):
            words = inputs[lane]
            for e in range(8):
                A[mma_a_position(lane, e)] = value((words[e // 2] >> (16 * (e & 1))) & 0xFFFF)
            for e in range(4):
                B[mma_b_position(lane, e)] = value((words[4 + e // 2] >> (16 * (e & 1))) & 0xFFFF)
            for i in range(4):
                C[mma_cd_position(lane, i)] = float(words[6 + i].view(np.float32))
        D = A @ B + C  # small integers: exact in float32 whatever the order of the sums
        for lane in range(32):
            out[lane] = np.array([D[mma_cd_position(lane, i)] for i in range(4)], dtype=np.float32).view(np.uint32)
    elif op.startswith("shfl"):
        for lane in range(32):
            arg = int(inputs[lane, 1])
            src = (lane ^ arg) & 31 if op == "shfl.bfly" else arg & 31
            out[lane, 0] = inputs[src, 0]
    else:
        bytes_ = 16 if op == "cp.async.16" else 8
        src = tile.view(np.uint8)
        for lane in range(32):
            n = int(inputs[lane, 0]) % (bytes_ + 1)
            got = np.zeros(16, dtype=np.uint8)
            got[:n] = src[lane * bytes_: lane * bytes_ + n]
            out[lane] = got.view(np.uint32)
    return out
