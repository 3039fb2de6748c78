"""Measured per-layer kernel choice ("tactics"), on the CPU and on CUDA.

On CPU in float32 a fused layer can run one of five kernels: oneDNN's convolution with post-ops
on a prepacked weight ("onednn"), our Winograd F(2x2, 3x3) ("winograd", also at stride 2) or
F(4x4, 3x3) ("winograd4", csrc/cpu/winograd.cpp; "winograd_3pass" and "winograd4_3pass": the
same in its other schedule), our blocked matrix products ("gemm", csrc/cpu/gemm_conv.cpp), or,
for grouped layers, our grouped kernel ("grouped", csrc/cpu/grouped_conv.cpp). Each is a
:class:`Candidate`:
it says whether it can run a layer for an input, how to prepare the weight, how to run, and
keeps the rule of thumb that picked it before anything was measured (:meth:`Candidate.rule`).

:func:`choose` picks one for a layer and an input:

1. a choice cached for (machine, problem) is used as it is (memory, then the JSON file in
   :func:`cache_dir`);
2. otherwise, when tuning is on, every applicable candidate is timed on the real input shape,
   side by side (a warm-up call, then a few interleaved calls each with the caches flushed before
   every call, median); candidates whose output breaks the accuracy rule against a float64
   reference of the layer are dropped; the fastest of the rest wins (the rules' choice where it
   is within TIE of the fastest: closer than that is noise); the times are cached;
3. otherwise the rules decide (:func:`rule_choice`).

The layer's switches (``FusedConv2d.winograd`` / ``.gemm``) filter the candidates at selection
time, so one cached measurement serves a model fused with ``winograd=False`` as well.

On CUDA (float16/bfloat16, channels-last; float32 too where TF32 is allowed, with our one TF32 tile)
the candidates are our tensor-core kernel in each of its
tile configurations ("tc128x128", "tc128x64", "tc64x64", "tc128x128k64", "tc256x128"), cuDNN's convolution
followed by our epilogue pass ("cudnn", also the accuracy yardstick) and cuDNN's own fused conv-bias-(add)-ReLU
("cudnn_fused": ReLU layers, used only where the graph vouched its inputs finite, as its ReLU
does not keep NaN); timed with CUDA events, the L2 flushed before each call, cached per GPU.
That vouching is a check of the graph's inputs on every forward (a sum and a synchronisation,
made only once some layer runs cuDNN's fused op): the first layer to choose it is charged that
check's measured time (:func:`finite_check_ms`), so that a batch-1 model, bound by its host, does
not pay a synchronisation per forward for a few microseconds of GPU time.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ONEDNN, WINOGRAD, WINOGRAD4, GEMM, GROUPED = "onednn", "winograd", "winograd4", "gemm", "grouped"
#: Winograd in three passes where its own rule would run it in chunks (csrc/cpu/winograd.cpp): tuning only.
WINOGRAD_3PASS, WINOGRAD4_3PASS = "winograd_3pass", "winograd4_3pass"
WINOGRAD_PATHS = frozenset({WINOGRAD, WINOGRAD4, WINOGRAD_3PASS, WINOGRAD4_3PASS})
CUDNN, CUDNN_FUSED = "cudnn", "cudnn_fused"
#: The CUDA paths that the op cuda_conv2d_bias_act takes by number: our kernel's tiles, cuDNN + epilogue.
CUDA_ALGOS = {"tc128x128": 0, "tc128x64": 1, "tc64x64": 2, "tc128x128k64": 3, "tc256x128": 4, CUDNN: -2}
CUDA_PATHS = frozenset(CUDA_ALGOS) | {CUDNN_FUSED}

#: Timing: one warm-up call per candidate, then at least this many interleaved timed calls each
#: (median); small layers get more rounds (up to MAX_TIMED_CALLS, while a round of all candidates
#: takes under SMALL_ROUND_S), so that one preemption of a shared machine's scheduler (several
#: ms) cannot decide for a layer that runs in tens of microseconds.
TIMED_CALLS = 3
MAX_TIMED_CALLS = 15
SMALL_ROUND_S = 0.002

#: Within this fraction of the fastest, the rules' choice is kept: closer than that, a 2-core
#: shared machine's noise decides, and a choice that flips from run to run helps nobody.
TIE = 0.03

#: Winograd keeps its transformed weight (16/9 the direct one, 36/9 for F(4x4)) beside the plain master. Over this
#: size the memory it adds is judged not worth it, whatever the timing says: a memory limit,
#: which timing cannot see, not a speed rule.
WINOGRAD_MAX_WEIGHT_BYTES = 4 << 20

# 2: the gemm candidate runs our own kernels; 3: in-place layers timed in place; 4: winograd4;
# 5: the gemm kernels' work cuts, prefetch and AVX2 stores, Winograd's chunks (timings moved);
# 6: Winograd at stride 2, and in its other schedule (new candidates); 7: the AVX2 gemm kernel's
# epilogue in assembly and its weight prefetch (timings moved); 8: Winograd's weight in the
# matrix-product kernels' panels (timings moved)
# (CUDA records live under their own machine ids: the version did not move for them)
_CACHE_VERSION = 8
#: Part of a CUDA machine's key: moves when our CUDA kernels change what they run or how fast
#: (2: grouped convolutions on our kernel), so that choices measured on the old ones are not reused.
_CUDA_KERNELS_VERSION = 2


# --- candidates -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _gemm_isa() -> str:
    return torch.ops.resnet_fused.gemm_isa.default()


def _is_channels_last(x: Tensor) -> bool:
    """NHWC in memory: channels-last strides, and not NCHW too, unless the map is 1x1 (a classifier
    head's pooled input), where the two layouts are the same bytes."""
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and (not x.is_contiguous() or (x.shape[2] * x.shape[3] == 1 and x.numel() > 0)))


def cpu_float32_prepacked(layer, x: Tensor) -> bool:
    """What every CPU candidate needs: a prepacked layer (``prepack=True``), a float32 channels-
    last 4-D CPU input, dilation 1. Anything else runs the one native path."""
    return bool(layer.prepack and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 4
                and list(layer.dilation) == [1, 1] and _is_channels_last(x))


def _bias(layer) -> Tensor:
    return layer.bias.to(torch.float32)


class Candidate:
    """One CPU kernel for a fused layer. ``switch`` names the FusedConv2d attribute that turns it
    off (``fuse(winograd=False)``); None: it cannot be turned off (the oneDNN fallback)."""

    name = ""
    switch: Optional[str] = None
    #: Whether its error depends on the weights enough that passing the accuracy rule on one layer
    #: says nothing about another of the same shape: then each layer is checked on its own
    #: (check_accuracy), whatever the shared timing record says.
    weight_dependent_error = False
    #: Whether it can write its output into the residual's buffer (run_): a layer that owns its
    #: residual (``inplace_residual``) runs it so. Where it cannot, the layer runs it out of place
    #: and is timed so (a copy back would be a second pass over the output).
    writes_residual = True

    def applies(self, layer, x: Tensor) -> bool:
        """Whether the kernel can run this layer for input x (structure only, nothing measured)."""
        return cpu_float32_prepacked(layer, x)

    def enabled(self, layer) -> bool:
        return self.switch is None or bool(getattr(layer, self.switch, True))

    def rule(self, layer, x: Tensor) -> bool:
        """The rule of thumb: whether it is expected to be the fastest (used when not tuning)."""
        return False

    def prepare(self, layer, x: Tensor) -> Tensor:
        raise NotImplementedError

    def bias(self, layer, x: Tensor) -> Tensor:
        """The bias as run() takes it (float32 unless the kernel adds it in another dtype)."""
        return _bias(layer)

    def run(self, layer, x: Tensor, w: Tensor, b: Tensor, residual: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def run_(self, layer, x: Tensor, w: Tensor, b: Tensor, residual: Tensor) -> None:
        """The same written into the residual (how a layer with ``inplace_residual`` runs)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<candidate {self.name}>"


class OneDNN(Candidate):
    """oneDNN's direct convolution with bias/residual/ReLU post-ops, on a weight prepacked for
    the input's shape. Runs every layer the CPU candidates run: the fallback and the yardstick."""

    name = ONEDNN

    def rule(self, layer, x):
        return True

    def prepare(self, layer, x):
        w = layer.dense_weight().to(torch.float32).contiguous(memory_format=torch.channels_last)
        return torch.ops.resnet_fused.prepack_conv2d_weight.default(
            w, layer.stride, layer.padding, layer.dilation, layer.groups, list(x.shape))

    def run(self, layer, x, w, b, residual):
        return torch.ops.resnet_fused.conv2d_bias_act.default(
            x, w, b, residual, layer.stride, layer.padding, layer.dilation, layer.groups, layer.relu, True)

    def run_(self, layer, x, w, b, residual):
        torch.ops.resnet_fused.conv2d_bias_act_.default(
            residual, x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups, layer.relu, True)


class Winograd(Candidate):
    """Winograd F(2x2, 3x3): 3x3, padding 1, and a transformed weight of at most
    WINOGRAD_MAX_WEIGHT_BYTES. At stride 2 its polyphase form (csrc/cpu/winograd.cpp): 25
    multiplies per 2x2 output tile instead of 36, 16 distinct positions of weight; only measuring
    picks it there."""

    name = WINOGRAD
    switch = "winograd"
    tile = 2  # output tile: F(tile x tile, 3x3), (tile + 2)^2 positions
    strides = (1, 2)
    schedule = 0  # the kernel's own choice of schedule

    def applies(self, layer, x):
        s = list(layer.stride)
        return (super().applies(layer, x) and layer.groups == 1 and tuple(layer.kernel_size) == (3, 3)
                and s[0] == s[1] and s[0] in self.strides
                and list(layer.padding) == [1, 1]
                and (self.tile + 2) ** 2 * layer.in_channels * layer.out_channels * 4 <= WINOGRAD_MAX_WEIGHT_BYTES)

    def rule(self, layer, x):
        """Where it beat oneDNN on the machine it was first measured on (2 Intel cores, weights
        evicted before each call): at least 32 input and output channels (the transforms cost as
        much as the products below that), and at least 16 tiles and at most 512 KiB of
        transformed weight per tile (too few tiles do not pay for reading the weight)."""
        if not (tuple(layer.kernel_size) == (3, 3) and list(layer.stride) == [1, 1] and list(layer.padding) == [1, 1]):
            return False
        c, k = layer.in_channels, layer.out_channels
        if min(c, k) < 32 or 16 * c * k * 4 > WINOGRAD_MAX_WEIGHT_BYTES:
            return False
        tiles = x.shape[0] * ((x.shape[2] + 1) // 2) * ((x.shape[3] + 1) // 2)
        return tiles >= max(16, c * k // 8192)

    def prepare(self, layer, x):
        return torch.ops.resnet_fused.winograd_prepack.default(layer.dense_weight(), self.tile, layer.stride[0], True)

    def run(self, layer, x, w, b, residual):
        return torch.ops.resnet_fused.winograd_conv2d_bias_act.default(x, w, b, residual, layer.relu, self.schedule,
                                                                       layer.out_channels)

    def run_(self, layer, x, w, b, residual):
        torch.ops.resnet_fused.winograd_conv2d_bias_act_.default(residual, x, w, b, layer.relu, self.schedule,
                                                                 layer.out_channels)


class Winograd4(Winograd):
    """Winograd F(4x4, 3x3): 4x fewer multiplies than direct (F(2x2)'s 2.25x), a transformed
    weight 36/16 of F(2x2)'s, and about half a decimal digit more error (transforms over the points
    0, +-1, +-2). Never a rule: only measuring picks it, on a layer where its error on the layer's
    own weights and input met the accuracy rule."""

    name = WINOGRAD4
    tile = 4
    strides = (1,)
    weight_dependent_error = True

    def rule(self, layer, x):
        return False


def _weight_size(layer, tile: int) -> list:
    c, k = layer.in_channels, layer.out_channels
    return [4, 4, c, k] if layer.stride[0] == 2 else [(tile + 2) ** 2, c, k]


class _ThreePasses:
    """The same Winograd in three passes (every input transform, every product, every output
    transform) where the kernel's own rule would run it in chunks: that rule was measured on one
    machine, and on a CPU with a smaller L2 the chunks can lose (benchmarks/results). Measuring
    only; applies only where it is not what the rule runs already."""

    schedule = 2

    def applies(self, layer, x):
        return (super().applies(layer, x)
                and torch.ops.resnet_fused.winograd_schedule(list(x.shape), _weight_size(layer, self.tile)) == 1)

    def rule(self, layer, x):
        return False


class WinogradThreePasses(_ThreePasses, Winograd):
    name = WINOGRAD_3PASS


class Winograd4ThreePasses(_ThreePasses, Winograd4):
    name = WINOGRAD4_3PASS


class Gemm(Candidate):
    """Matrix products on our register-tile kernel with the epilogue in registers (any kernel,
    stride and padding; kernels over 1x1 build im2col rows), on the weight packed once in panels."""

    name = GEMM
    switch = "gemm"

    def applies(self, layer, x):
        return super().applies(layer, x) and layer.groups == 1

    def rule(self, layer, x):
        """1x1s with no padding where our AVX-512 or AVX2 kernel runs: there it matched or beat
        oneDNN's 1x1 kernels on most of ResNet-50's shapes as tuning timed them (benchmarks/results:
        an AVX-512 Zen 4, an AVX2 Zen 3), and it skips oneDNN's per-call cost. Elsewhere (the plain
        C++ kernel) only measuring picks it."""
        return (tuple(layer.kernel_size) == (1, 1) and list(layer.padding) == [0, 0]
                and _gemm_isa() in ("avx512", "avx2"))

    def prepare(self, layer, x):
        w = layer.weight
        if w.dim() == 5:  # the master, packed already
            return w
        return torch.ops.resnet_fused.gemm_prepack.default(layer.dense_weight().to(torch.float32))

    def run(self, layer, x, w, b, residual):
        return torch.ops.resnet_fused.gemm_conv2d_bias_act.default(x, w, b, residual, layer.stride, layer.padding,
                                                                   layer.relu, layer.out_channels)

    def run_(self, layer, x, w, b, residual):
        torch.ops.resnet_fused.gemm_conv2d_bias_act_.default(residual, x, w, b, layer.stride, layer.padding,
                                                             layer.relu, layer.out_channels)


class Grouped(Candidate):
    """Grouped convolutions (ResNeXt's 3x3s) on our kernel (csrc/cpu/grouped_conv.cpp, AVX-512 or
    AVX2): output channels a multiple of 16, in groups of 4 or 8 channels (as many in as out) or of a
    multiple of 16 output channels; the weight packed once, the epilogue in registers."""

    name = GROUPED

    def applies(self, layer, x):
        return (super().applies(layer, x) and layer.groups > 1
                and not torch.ops.resnet_fused.grouped_conv_unsupported(x.shape[1], layer.out_channels, layer.groups))

    def rule(self, layer, x):
        """On AVX-512 CPUs, wherever it applies: in resnext50_32x4d it made the whole model faster
        at batch 1 than oneDNN's grouped convolution there, and no slower at batch 8
        (cpu_grouped_resnext50.md in benchmarks/results). Its AVX2 kernel has run only on an
        AVX-512 CPU held to AVX2: on AVX2 CPUs only measuring (tune=True) picks it."""
        return _gemm_isa() == "avx512"

    def prepare(self, layer, x):
        return torch.ops.resnet_fused.grouped_prepack.default(layer.dense_weight().to(torch.float32), layer.groups)

    def run(self, layer, x, w, b, residual):
        return torch.ops.resnet_fused.grouped_conv2d_bias_act.default(x, w, b, residual, layer.stride, layer.padding,
                                                                      layer.groups, layer.relu)

    def run_(self, layer, x, w, b, residual):
        torch.ops.resnet_fused.grouped_conv2d_bias_act_.default(residual, x, w, b, layer.stride, layer.padding,
                                                                layer.groups, layer.relu)


#: In the order the rules ask them (the first whose rule says yes wins); oneDNN last.
CANDIDATES: list = [Winograd(), Winograd4(), WinogradThreePasses(), Winograd4ThreePasses(), Gemm(), Grouped(), OneDNN()]


# --- CUDA candidates --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _has_cuda_ops() -> bool:
    return hasattr(torch.ops.resnet_fused, "cuda_conv2d_bias_act")


_cuda_backend = ["cudnn" if os.environ.get("RESNET_FUSED_CUDA_CONV") == "cudnn" else "ours"]


def cuda_backend() -> str:
    """"cudnn" while resnet_fused.set_cuda_conv("cudnn") holds: every CUDA layer then runs cuDNN
    + our epilogue, whatever it chose (the benchmarks' fused_cudnn); else "ours"."""
    return _cuda_backend[0]


def cuda_tf32() -> bool:
    """Whether float32 convolutions on CUDA may run on TF32 tensor cores, as PyTorch's own
    (torch.backends.cudnn.allow_tf32, on by default): then our TF32 kernel is a candidate, and
    cuDNN, the yardstick, multiplies in TF32 too. Without it float32 stays with the op's own path
    (cuDNN in full float32 + our epilogue)."""
    return bool(torch.backends.cudnn.allow_tf32)


def cuda_tunable(layer, x: Tensor) -> bool:
    """What the CUDA candidates need: a float16/bfloat16 (or, TF32 allowed, float32) channels-last
    4-D CUDA input, and a build with our CUDA kernels."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if cuda_tf32() else (torch.float16, torch.bfloat16)
    return (x.is_cuda and x.dtype in dtypes and _is_channels_last(x)
            and list(layer.dilation) == [1, 1] and _has_cuda_ops())


class CudaCandidate(Candidate):
    def applies(self, layer, x):
        return cuda_tunable(layer, x)

    def prepare(self, layer, x):
        return layer.dense_weight().to(x.dtype).contiguous(memory_format=torch.channels_last)


def fixed_cuda_tile(groups: int, in_channels: int, dtype: torch.dtype = torch.float16) -> Optional[int]:
    """The tile our CUDA kernel runs a layer with whatever tile is asked for (plan_conv in
    csrc/cuda/kernels/implicit_gemm.cu), or None where every tile can: float32 runs the one TF32
    kernel (128x64); channels per group not a multiple of 8 (the stem, padded to 4; ResNeXt's
    4-wide groups) the one kernel with 8-byte loads (128x64), other grouped layers the one 64x64
    kernel compiled for groups. Only that candidate is timed for them: the others would time the
    same kernel again."""
    if dtype == torch.float32:
        return CUDA_ALGOS["tc128x64"]
    if (in_channels // groups) % 8:
        return CUDA_ALGOS["tc128x64"]
    if groups > 1:
        return CUDA_ALGOS["tc64x64"]
    return None


class CudaAlgo(CudaCandidate):
    """One path of the op cuda_conv2d_bias_act: a tile configuration of our kernel (split-K as its
    plan says), or cuDNN's convolution and our epilogue pass ("cudnn")."""

    def __init__(self, name: str):
        self.name, self.algo = name, CUDA_ALGOS[name]

    def applies(self, layer, x):
        if not super().applies(layer, x):
            return False
        if self.algo < 0:
            return True
        fixed = fixed_cuda_tile(layer.groups, x.shape[1], x.dtype)
        return (fixed is None or fixed == self.algo) and not torch.ops.resnet_fused._cuda_conv_unsupported(
            x, layer.weight, None, layer.groups)

    def run(self, layer, x, w, b, residual):
        return torch.ops.resnet_fused.cuda_conv2d_bias_act.default(
            x, w, b, residual, layer.stride, layer.padding, layer.dilation, layer.groups, layer.relu, self.algo)

    def run_(self, layer, x, w, b, residual):
        torch.ops.resnet_fused.cuda_conv2d_bias_act_.default(
            residual, x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups, layer.relu, self.algo)


class CudnnFused(CudaCandidate):
    """cuDNN's fused convolution + bias (+ residual) + ReLU (torch.cudnn_convolution_relu /
    _add_relu): one pass like our kernel, the bias in the input's dtype. Its ReLU maps NaN to 0, so
    a layer runs it only where the graph vouched its inputs finite (assume_finite)."""

    name = CUDNN_FUSED

    def applies(self, layer, x):
        return super().applies(layer, x) and bool(layer.relu)

    def bias(self, layer, x):
        return layer.bias.to(x.dtype)

    writes_residual = False  # (it writes a fresh output)

    def run(self, layer, x, w, b, residual):
        if residual is None:
            return torch.cudnn_convolution_relu(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
        return torch.cudnn_convolution_add_relu(x, w, residual, 1.0, b, layer.stride, layer.padding, layer.dilation,
                                                layer.groups)


#: The CUDA candidates; "cudnn" is the yardstick of the accuracy rule there.
CUDA_CANDIDATES: list = [CudaAlgo(n) for n in CUDA_ALGOS] + [CudnnFused()]


# --- a bottleneck's last 1x1 and its downsample 1x1 in one product (modules.FusedDual) --------------
#: The pair run as two layers, each on its own choice (the yardstick of the dual's accuracy rule).
SEPARATE = "separate"


class DualTile:
    """Our dual kernel in one tile (the op cuda_conv1x1_dual_bias_act): the block's last 1x1 and its
    downsample as one product over both reductions, both biases, the ReLU; the downsample's output
    is never written nor read back."""

    def __init__(self, name: str, algo: int):
        self.name, self.algo = name, algo

    def run(self, layer, y: Tensor, w: Tensor, b: Tensor, x: Tensor) -> Tensor:
        return torch.ops.resnet_fused.cuda_conv1x1_dual_bias_act.default(y, w, b, x, layer.stride2, layer.conv.relu,
                                                                          self.algo)

    def __repr__(self) -> str:
        return f"<dual candidate {self.name}>"


DUAL_CANDIDATES: list = [DualTile("dual128x128", CUDA_ALGOS["tc128x128"]), DualTile("dual128x64", CUDA_ALGOS["tc128x64"])]


def dual_unsupported(y: Tensor, w: Tensor, x: Tensor, stride2: int) -> str:
    """Why our dual kernel cannot run these operands ("" when it can)."""
    if not hasattr(torch.ops.resnet_fused, "_cuda_dual_unsupported"):
        return "a build without CUDA kernels"
    return torch.ops.resnet_fused._cuda_dual_unsupported.default(y, w, x, stride2)


def dual_applies(layer, y: Tensor, x: Tensor) -> bool:
    """Whether the dual kernel is a candidate for FusedDual ``layer`` on inputs y (the last 1x1's)
    and x (the downsample's): the CUDA regime of both layers (float16/bfloat16 channels-last;
    float32 stays with the two layers), our backend, and a shape the kernel takes."""
    if y.dtype == torch.float32 or cuda_backend() != "ours":
        return False
    if not (cuda_tunable(layer.conv, y) and cuda_tunable(layer.downsample, x)):
        return False
    if y.dtype != layer.conv.dtype or x.dtype != y.dtype or y.device != x.device:
        return False
    w, _ = layer.dual_weights(y)
    return dual_unsupported(y, w, x, layer.stride2) == ""


def dual_problem_key(layer, y: Tensor, x: Tensor) -> str:
    return (f"dual C{layer.conv.in_channels}+{layer.downsample.in_channels} K{layer.conv.out_channels} "
            f"s{layer.stride2} {str(y.dtype).replace('torch.', '')} relu={int(bool(layer.conv.relu))} "
            f"N{x.shape[0]} H{x.shape[2]} W{x.shape[3]}")


def _dual_reference(layer, y: Tensor, x: Tensor, rows) -> tuple[Tensor, float]:
    """The pair in float64 on images ``rows``, and the scale of its terms."""
    c, d = layer.conv, layer.downsample
    yd, xd = y[rows].double(), x[rows].double()
    w1, w2 = c.dense_weight().double(), d.dense_weight().double()
    b1, b2 = c.bias.double(), d.bias.double()
    ref = F.conv2d(yd, w1, b1) + F.conv2d(xd, w2, b2, stride=d.stride)
    mag = F.conv2d(yd.abs(), w1.abs(), b1.abs()) + F.conv2d(xd.abs(), w2.abs(), b2.abs(), stride=d.stride)
    if c.relu:
        ref = ref.relu()
    return ref, max(ref.abs().max().item(), mag.max().item()) if ref.numel() else 0.0


def measure_dual(layer, y: Tensor, x: Tensor, assume_finite: bool = False) -> dict:
    """Time the pair as two layers (each on its own choice, as the model runs them) against each
    dual tile, L2 flushed before each call, and check each output against float64: a tile whose
    error is above 2x the two layers' + one ulp of the terms' scale is rejected. A record as
    measure() returns."""
    clock = _Clock(y.device)
    with torch.no_grad():
        y, x = _finite_inputs(y, x)
        w, b = layer.dual_weights(y)
        calls = {SEPARATE: lambda: layer.separate(y, x, assume_finite)}
        for c in DUAL_CANDIDATES:
            calls[c.name] = functools.partial(c.run, layer, y, w, b, x)
        outs, failed = {}, {}
        for name, fn in list(calls.items()):  # warm-up (the two layers make their own choices here)
            try:
                outs[name] = fn().clone()
            except Exception as err:  # noqa: BLE001 - one failing kernel must not stop the others
                if name == SEPARATE:
                    raise
                failed[name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
                del calls[name]
        times = _timed_rounds(calls, clock, y.device)
        rows = sorted({0, y.shape[0] - 1})
        errors, rejected = _judge(outs, rows, *_dual_reference(layer, y, x, rows), y.dtype, SEPARATE)
        rejected.update(failed)
    record = {
        "times_ms": {n: round(statistics.median(t) * 1e3, 4) for n, t in times.items()},
        "errors": {n: float(f"{e:.4g}") for n, e in errors.items()},
        "rejected": rejected,
    }
    record["fastest"] = _pick(record, list(times))
    return record


def decide_dual(layer, y: Tensor, x: Tensor, assume_finite: bool = False) -> tuple[str, dict]:
    """SEPARATE or a dual tile for FusedDual ``layer`` (measured once per machine and shape, cached
    beside the layers' choices; the two layers are kept where a tile is within TIE of them)."""
    problem, names = dual_problem_key(layer, y, x), [SEPARATE] + [c.name for c in DUAL_CANDIDATES]
    record, source = _record(y.device, problem, names, lambda: measure_dual(layer, y, x, assume_finite))
    choice = _pick(record, names, prefer=SEPARATE) or SEPARATE
    listed = ", ".join(f"{n} {t:.2f}" for n, t in sorted(record["times_ms"].items(), key=lambda kv: kv[1]))
    _say(f"resnet_fused: {'tuned' if source == 'measured' else 'cached'} {layer.tune_name or problem}: {choice} "
         f"({listed} ms)", quiet=source != "measured")
    return choice, {"source": source, "times_ms": dict(record["times_ms"]), "rejected": dict(record.get("rejected", {})),
                    "problem": problem}


#: (CANDIDATES, CUDA_CANDIDATES, {name: the first candidate of that name}): candidate() runs on
#: every call of a tuned layer (a GPU at small batches is bound by the host's time per layer).
_by_name: tuple = (None, None, {})


def candidate(name: str) -> Candidate:
    global _by_name
    memo = _by_name
    if memo[0] is not CANDIDATES or memo[1] is not CUDA_CANDIDATES:  # (tests replace the lists)
        memo = _by_name = (CANDIDATES, CUDA_CANDIDATES,
                           {c.name: c for c in reversed(CANDIDATES + CUDA_CANDIDATES)})
    found = memo[2].get(name)
    if found is None:
        raise KeyError(name)
    return found


def candidates_for(layer, x: Tensor) -> tuple[list, str]:
    """(the candidates for x's device and regime, the yardstick's name); ([], "") where none apply."""
    if cpu_float32_prepacked(layer, x):
        return CANDIDATES, ONEDNN
    if cuda_tunable(layer, x):
        return CUDA_CANDIDATES, CUDNN
    return [], ""


def weight_dependent(name: str) -> bool:
    """Whether candidate ``name``'s accuracy verdict holds for one layer's weights only."""
    return any(c.name == name and c.weight_dependent_error for c in CANDIDATES)


def rule_choice(layer, x: Tensor) -> str:
    """Today's rules: the first enabled candidate whose rule says yes ("onednn" at the latest).
    On CUDA "": the op's own choice (our kernel where it applies, else cuDNN + epilogue)."""
    if x.is_cuda:
        return ""
    for c in CANDIDATES:
        if c.enabled(layer) and c.rule(layer, x) and c.applies(layer, x):
            return c.name
    return ONEDNN


# --- keys -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _cpu_identity() -> tuple:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.processor() or platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.strip()
                if model and flags and key == "":
                    break
    except OSError:
        pass
    # the ISA extensions that decide which code oneDNN and the BLAS run
    isa = sorted(f for f in flags.split() if f.startswith(("avx", "amx", "fma", "sse4", "f16c", "asimd", "sve")))
    return model, " ".join(isa)


def machine_key(device: Optional[torch.device] = None) -> dict:
    """What a measurement holds for: the CPU (model name, ISA flags), torch and oneDNN versions,
    and the thread count; on CUDA the GPU (name, compute capability, multiprocessors), torch,
    CUDA and cuDNN versions, and our CUDA kernels' version."""
    if device is not None and device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"gpu": p.name, "cc": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "kernels": _CUDA_KERNELS_VERSION}
    model, isa = _cpu_identity()
    return {"cpu": model, "isa": isa, "torch": torch.__version__, "onednn": _onednn_version(),
            "threads": torch.get_num_threads()}


@functools.lru_cache(maxsize=None)
def _onednn_version() -> str:
    """oneDNN's version as torch's build configuration names it ("v3.12.0 (Git Hash ...)")."""
    if not torch.backends.mkldnn.is_available():
        return "none"
    for line in torch.__config__.show().splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            m = re.search(r"v\d+(\.\d+)*( \(Git Hash \w+\))?", line)
            if m:
                return m.group(0)
    return "unknown"


def machine_id(key: Optional[dict] = None) -> str:
    key = key or machine_key()
    return " | ".join(f"{k}={key[k]}" for k in sorted(key))


def problem_key(layer, x: Tensor) -> str:
    """The layer's problem: channels, kernel, stride, padding, dilation, groups, dtype, epilogue,
    the input's N/H/W and the thread count (the weights' values do not matter)."""
    n, _, h, w = x.shape
    return (f"C{layer.in_channels} K{layer.out_channels} k{'x'.join(map(str, layer.kernel_size))} "
            f"s{'x'.join(map(str, layer.stride))} p{'x'.join(map(str, layer.padding))} "
            f"d{'x'.join(map(str, layer.dilation))} g{layer.groups} {str(x.dtype).replace('torch.', '')} "
            f"relu={int(bool(layer.relu))} res={int(bool(layer.residual))} N{n} H{h} W{w} "
            f"t{torch.get_num_threads()}" + (" tf32" if x.dtype == torch.float32 and x.is_cuda and cuda_tf32() else ""))


# --- the cache: memory and a JSON file --------------------------------------------------------
def cache_dir() -> str:
    """$RESNET_FUSED_CACHE_DIR, else $XDG_CACHE_HOME/resnet_fused, else ~/.cache/resnet_fused."""
    d = os.environ.get("RESNET_FUSED_CACHE_DIR")
    if d:
        return d
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "resnet_fused")


def cache_path() -> str:
    return os.path.join(cache_dir(), "tactics.json")


_lock = threading.RLock()
_memory: dict = {}  # cache file path -> {machine id -> {problem key -> record}}
_stats = {"measured": 0, "cache_hits": 0}  # layers measured / answered from the cache (for tests)


# Layers that chose cuDNN's fused op in this process (FusedConv2d._choose notes them): only then
# does inputs_finite check CUDA inputs, and only the first such choice pays for that check.
_cudnn_fused_layers = [0]
_check_ms: dict = {}  # (device, shape, dtype) -> ms


def note_cudnn_fused() -> None:
    _cudnn_fused_layers[0] += 1


def cudnn_fused_in_use() -> bool:
    return _cudnn_fused_layers[0] > 0


def finite_check_ms(x: Tensor) -> float:
    """What inputs_finite adds to a forward on an input like ``x``, in ms: a sum, an isfinite and
    reading the answer (on CUDA a synchronisation), from an idle device. Measured once per device,
    shape and dtype (median of 5 after 2 warm-up calls)."""
    key = (x.device, tuple(x.shape), x.dtype)
    if key not in _check_ms:
        ts = []
        for _ in range(7):
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            bool(torch.isfinite(x.sum()))
            ts.append(time.perf_counter() - t0)
        _check_ms[key] = statistics.median(ts[2:]) * 1e3
    return _check_ms[key]


def stats() -> dict:
    return dict(_stats)


def clear_memory_cache() -> None:
    """Forget what was read or measured in this process (the file stays): the next choice reads
    the file again."""
    with _lock:
        _memory.clear()


def _read_file(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(
                data.get("machines"), dict):
            raise ValueError(f"not a version-{_CACHE_VERSION} resnet_fused tactics cache")
        return data
    except FileNotFoundError:
        return {"version": _CACHE_VERSION, "machines": {}}
    except (OSError, ValueError) as err:
        warnings.warn(f"resnet_fused: ignoring the tactics cache {path} ({type(err).__name__}: {err}); "
                      "layers will be measured again", RuntimeWarning, stacklevel=3)
        return {"version": _CACHE_VERSION, "machines": {}}


def _entries(path: str, mid: str) -> dict:
    with _lock:
        if path not in _memory:
            data = _read_file(path)
            _memory[path] = {m: dict(v.get("choices", {})) for m, v in data["machines"].items()
                             if isinstance(v, dict)}
        return _memory[path].setdefault(mid, {})


def _write(path: str, mkey: dict, mid: str, problem: str, record: dict) -> None:
    """Merge one record into the file: read it again (another process may have written), add,
    write a temporary file beside it and rename it over (atomic)."""
    with _lock:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            data = _read_file(path) if os.path.exists(path) else {"version": _CACHE_VERSION, "machines": {}}
            m = data["machines"].setdefault(mid, {"machine": mkey, "choices": {}})
            m.setdefault("choices", {})[problem] = record
            fd, tmp = tempfile.mkstemp(prefix=".tactics-", suffix=".json", dir=os.path.dirname(path))
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as err:
            warnings.warn(f"resnet_fused: could not write the tactics cache {path} ({err})", RuntimeWarning,
                          stacklevel=3)


# --- measuring --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _flush_buffer() -> Tensor:
    """A buffer larger than the L2 cache (4x, at least 8 MiB): touching it before a timed call
    evicts the layer's weight and input as the other layers of a whole model do."""
    l2 = 1 << 20
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            s = f.read().strip().upper()
        l2 = int(s[:-1]) << (10 if s.endswith("K") else 20) if s[-1] in "KM" else int(s)
    except (OSError, ValueError, IndexError):
        pass
    with torch.inference_mode(False):  # (a normal tensor: it is written in and out of inference mode)
        return torch.zeros(max(4 * l2, 8 << 20) // 4, dtype=torch.float32)


def _flush(device: Optional[torch.device] = None) -> None:
    if device is not None and device.type == "cuda":
        _cuda_flush_buffer(device).add_(1.0)
    else:
        _flush_buffer().add_(1.0)


@functools.lru_cache(maxsize=4)
def _cuda_flush_buffer(device: torch.device) -> Tensor:
    """Twice the GPU's L2 (its last-level cache): the CUDA counterpart of _flush_buffer."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    with torch.inference_mode(False):
        return torch.zeros(2 * l2 // 4, dtype=torch.float32, device=device)


class _Clock:
    """Seconds a call takes: the host's clock on the CPU, CUDA events on a GPU. There the device
    is idle when the call starts (the flush before it has finished), so the time is the later of
    the call's device work and its host work (launches, cuDNN's plan lookup): at batch 1, where a
    model waits on the host between small kernels, the host's part is what differs."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.current_stream().synchronize()
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) * 1e-3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _reference(layer, x: Tensor, residual: Optional[Tensor], rows) -> tuple[Tensor, float]:
    """The layer in float64 on images `rows` of the batch, and the scale of its terms
    (conv2d(|x|, |w|) + |b| + |residual|, as tests/conftest.py's accuracy rule takes it)."""
    xd = x[rows].double().contiguous()
    w = layer.dense_weight().double().contiguous()
    b = layer.bias.double()
    args = (layer.stride, layer.padding, layer.dilation, layer.groups)
    ref = F.conv2d(xd, w, b, *args)
    mag = F.conv2d(xd.abs(), w.abs(), b.abs(), *args)
    if residual is not None:
        r = residual[rows].double()
        ref = ref + r
        mag = mag + r.abs()
    if layer.relu:
        ref = ref.relu()
    return ref, max(ref.abs().max().item(), mag.max().item()) if ref.numel() else 0.0


def _finite_inputs(x: Tensor, residual: Optional[Tensor]) -> tuple:
    """x and the residual as measuring uses them: as they are when finite (the layer's real
    input), else random numbers of their shape."""
    if not bool(torch.isfinite(x.sum())):
        x = torch.randn_like(x).relu_()
    if residual is not None and not bool(torch.isfinite(residual.sum())):
        residual = torch.randn_like(residual)
    return x, residual


def _accuracy(layer, x: Tensor, residual: Optional[Tensor], outs: dict,
              yardstick: str = ONEDNN) -> tuple[dict, dict]:
    """Each output's max abs error against float64 on the first and the last image (float64 on
    the whole batch would cost more than the timing), and the candidates that broke the accuracy
    rule: error at most 2x the yardstick's (oneDNN on the CPU, cuDNN + epilogue on CUDA: in outs)
    plus one ulp of the terms' scale in x's dtype."""
    rows = sorted({0, x.shape[0] - 1})
    return _judge(outs, rows, *_reference(layer, x, residual, rows), x.dtype, yardstick)


def _judge(outs: dict, rows, ref: Tensor, scale: float, dtype: torch.dtype, yardstick: str) -> tuple[dict, dict]:
    """Each output's max abs error on images ``rows`` against ``ref`` (float64), and those above 2x
    the yardstick's error plus one ulp of ``scale`` in ``dtype`` (rejected, with why). A candidate
    whose error depends on the weights (F(4x4)) gets no ulp: that allowance is for rounding the same
    sums another way, and F(4x4)'s extra error is its transforms', which compounds from layer to
    layer (a CIFAR ResNet with four F(4x4) layers each within 2x + an ulp came out at 3.9x eager's
    error)."""
    ulp = torch.finfo(dtype).eps * max(scale, 1e-30)
    errors = {}
    for name, out in outs.items():
        o = out[rows].double()
        errors[name] = (o - ref).abs().max().item() if torch.isfinite(o).all() else float("inf")
    yard = errors.get(yardstick)
    rejected = {}
    for name, e in errors.items():
        allowance = 0.0 if weight_dependent(name) else ulp
        if yard is not None and not e <= 2.0 * yard + allowance:
            rejected[name] = f"error {e:.3g} > 2 x {yardstick}'s {yard:.3g} + ulp {allowance:.3g}"
    return errors, rejected


def check_accuracy(layer, x: Tensor, residual: Optional[Tensor], name: str) -> Optional[str]:
    """Whether candidate ``name`` meets the accuracy rule on this layer's own weights and input:
    None if it does, else why not. For the candidates whose error depends on the weights
    (``Candidate.weight_dependent_error``), whose cached verdict from another layer of the same
    shape does not carry over."""
    with torch.no_grad():
        x, residual = _finite_inputs(x, residual)
        b = _bias(layer)
        outs = {}
        for c in (candidate(name), candidate(ONEDNN)):
            outs[c.name] = c.run(layer, x, c.prepare(layer, x), b, residual)
        return _accuracy(layer, x, residual, outs)[1].get(name)


def _timed_rounds(calls: dict, clock, device: torch.device, before=None) -> dict:
    """{name: [seconds]}: each call timed once per round, interleaved, the caches flushed before
    each (``before()`` first, where given: untimed); TIMED_CALLS rounds, more (up to
    MAX_TIMED_CALLS) while a round's fastest times add up to less than SMALL_ROUND_S."""
    times: dict = {n: [] for n in calls}
    for i in range(MAX_TIMED_CALLS):
        for name, fn in calls.items():
            if before is not None:
                before()
            _flush(device)
            times[name].append(clock(fn))
        if i + 1 >= TIMED_CALLS and sum(min(t) for t in times.values() if t) >= SMALL_ROUND_S:
            break
    return times


def measure(layer, x: Tensor, residual: Optional[Tensor] = None, candidates=None) -> dict:
    """Time every applicable candidate on x's shape and check its output. Returns a record:
    {"times_ms": {name: median ms}, "errors": {name: max abs error on the checked images},
    "rejected": {name: why}, "fastest": the fastest accepted of all (choose() applies the
    switches and the TIE margin)}.

    x is used as it is when finite (the layer's real input), else replaced by random numbers of
    its shape; likewise the residual. A layer that writes into its residual (``inplace_residual``)
    is timed so, into a copy of the residual made before the caches are flushed: writing a fresh
    output costs other kernels differently (page faults, write-allocate) than the model pays.

    A candidate that raises on its first call (cuDNN finds no engine for a shape, say) is rejected
    with the error as the reason; the others are measured as usual."""
    default, yardstick = candidates_for(layer, x)
    cands = [c for c in (candidates if candidates is not None else default) if c.applies(layer, x)]
    clock = _Clock(x.device)
    failed = {}
    with torch.no_grad():
        x, residual = _finite_inputs(x, residual)
        inplace = residual is not None and bool(getattr(layer, "inplace_residual", False))
        buf = torch.empty_like(residual) if inplace else None
        prepared, outs = {}, {}

        def call(c):
            w, b = prepared[c.name]
            if inplace and c.writes_residual:
                c.run_(layer, x, w, b, buf)
                return buf
            return c.run(layer, x, w, b, buf if inplace else residual)

        for c in cands:  # warm-up (and the output checked below)
            try:
                prepared[c.name] = (c.prepare(layer, x), c.bias(layer, x))
                if inplace:
                    buf.copy_(residual)
                outs[c.name] = call(c).clone()
            except Exception as err:  # noqa: BLE001 - one failing kernel must not stop the others
                failed[c.name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        cands = [c for c in cands if c.name not in failed]
        times = _timed_rounds({c.name: functools.partial(call, c) for c in cands}, clock, x.device,
                              (lambda: buf.copy_(residual)) if inplace else None)
        errors, rejected = _accuracy(layer, x, residual, outs, yardstick)
        rejected.update(failed)
    record = {
        "times_ms": {n: round(statistics.median(t) * 1e3, 4) for n, t in times.items()},
        "errors": {n: float(f"{e:.4g}") for n, e in errors.items()},
        "rejected": rejected,
    }
    record["fastest"] = _pick(record, [c.name for c in cands])
    return record


def _pick(record: dict, allowed, prefer: Optional[str] = None) -> Optional[str]:
    """The fastest allowed candidate that met the accuracy rule; ``prefer`` (the rules' choice)
    instead when it is within TIE of it."""
    ok = [n for n in allowed if n in record["times_ms"] and n not in record["rejected"]]
    if not ok:
        return None
    t = record["times_ms"]
    best = min(ok, key=lambda n: t[n])
    if prefer in ok and t[prefer] <= t[best] * (1 + TIE):
        return prefer
    return best


# --- progress -----------------------------------------------------------------------------------
_progress = threading.local()


class _Progress:
    """A progress bar over the layers of one explicit :func:`tune` call (tqdm if importable)."""

    def __init__(self, total: int):
        self.bar = None
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="resnet_fused: tuning", unit="layer", file=sys.stderr, leave=False)
        except ImportError:
            pass

    def step(self, line: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(line[-60:], refresh=False)
            self.bar.update(1)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _say(line: str, quiet: bool = False) -> None:
    """A layer decided: a step of tune()'s bar, else a line on stderr (none for a cache hit)."""
    p = getattr(_progress, "bar", None)
    if p is not None:
        p.step(line)
    elif not quiet:
        print(line, file=sys.stderr, flush=True)


# --- the chooser ------------------------------------------------------------------------------
def choose(layer, x: Tensor, residual: Optional[Tensor] = None, tune: bool = True) -> str:
    """The kernel for ``layer`` on input ``x``: a name of CANDIDATES ("onednn", "winograd", ...) on the CPU;
    on CUDA a name of CUDA_ALGOS, "cudnn_fused", or "" for the op's own choice (see :func:`decide`)."""
    return decide(layer, x, residual, tune)[0]


def _record(device: torch.device, problem: str, names, measure_fn) -> tuple[dict, str]:
    """(record, source): the cached record of ``problem`` on this machine where it has a time or a
    verdict for every candidate in ``names`` ("cache"), else ``measure_fn()``'s, written to the
    cache ("measured"). A record this version cannot read is measured again."""
    mkey = machine_key(device)
    mid, path = machine_id(mkey), cache_path()
    with _lock:
        entries = _entries(path, mid)
        record = entries.get(problem)
    if (isinstance(record, dict) and isinstance(record.get("times_ms"), dict)
            and isinstance(record.get("rejected", {}), dict)
            and all(n in record["times_ms"] or n in record.get("rejected", {}) for n in names)):
        with _lock:
            _stats["cache_hits"] += 1
        return record, "cache"
    record = measure_fn()
    with _lock:
        _stats["measured"] += 1
        entries[problem] = record
        _write(path, mkey, mid, problem, record)
    return record, "measured"


def decide(layer, x: Tensor, residual: Optional[Tensor] = None, tune: bool = True) -> tuple[str, dict]:
    """The kernel for ``layer`` on input ``x`` and the record behind it: ("onednn" | "winograd" |
    "gemm", record). The record says where the choice came from ("source": "cache", "measured" or
    "rule") and the times measured. Measures only with ``tune``; reads or writes no cache
    without it."""
    cands, yardstick = candidates_for(layer, x)
    if not cands:
        return rule_choice(layer, x), {"source": "not applicable"}
    allowed = [c.name for c in cands if c.enabled(layer) and c.applies(layer, x)]
    if not tune:
        return rule_choice(layer, x), {"source": "rule"}
    problem = problem_key(layer, x)
    record, source = _record(x.device, problem, allowed, lambda: measure(layer, x, residual))
    # The record's timings hold for every layer of this shape, its accuracy verdicts only for the
    # layer it measured: a weight-dependent candidate is checked on this layer before it is used.
    rejected = dict(record.get("rejected", {}))
    if source == "cache":
        rejected = {n: why for n, why in rejected.items() if not weight_dependent(n)}
    prefer = rule_choice(layer, x)
    times, charged = record["times_ms"], 0.0
    if yardstick == CUDNN and CUDNN_FUSED in times and not cudnn_fused_in_use():
        charged = finite_check_ms(x)  # (the first layer on cuDNN's fused op brings the input check)
        times = {**times, CUDNN_FUSED: times[CUDNN_FUSED] + charged}
    while True:
        choice = _pick({"times_ms": times, "rejected": rejected}, allowed, prefer=prefer) or (
            "" if x.is_cuda else ONEDNN)
        if source == "measured" or not weight_dependent(choice):
            break
        why = check_accuracy(layer, x, residual, choice)
        if why is None:
            break
        rejected[choice] = why
    out = {"source": source, "times_ms": dict(record.get("times_ms", {})), "rejected": rejected, "problem": problem}
    listed = ", ".join(f"{n} {t:.2f}" for n, t in sorted(record["times_ms"].items(), key=lambda kv: kv[1]))
    if charged:
        out["input_check_ms"] = round(charged, 4)
        listed += f"; {CUDNN_FUSED} + the input check {charged:.2f}"
    _say(f"resnet_fused: {'tuned' if source == 'measured' else 'cached'} "
         f"{getattr(layer, 'tune_name', '') or problem}: {choice} ({listed} ms)", quiet=source != "measured")
    return choice, out


def tune(model, *example_inputs, **example_kwargs):
    """Run ``model`` once on the example input under inference mode, so that every fused layer it
    meets picks its kernel for that input regime (measuring what the cache does not hold), with a
    progress bar on stderr. Returns the model's output."""
    from .modules import FusedConv2d

    layers = [m for m in model.modules() if isinstance(m, FusedConv2d) and m.tune]
    bar = _Progress(len(layers))
    prev = getattr(_progress, "bar", None)
    _progress.bar = bar
    try:
        with torch.inference_mode():
            return model(*example_inputs, **example_kwargs)
    finally:
        _progress.bar = prev
        bar.close()
