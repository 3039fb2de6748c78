"""Fused inference modules that replace conv (+BN) (+add) (+ReLU) chains.

A FusedConv2d keeps its folded weight and bias as float32 "master" tensors (float64 for a
float64 model). ``.half()``, ``.bfloat16()`` and ``.to(dtype)`` change the dtype it computes in,
never the masters, so every dtype is cast from values folded in float64: a model is never
folded in half. The weight in the compute dtype and memory layout (and, on CPU, prepacked for
oneDNN) is made on first use and cached.

On CPU in float32 the prepacked weight holds the same values as the master, only reordered, so it
*becomes* the master (an opaque oneDNN tensor, as ``torch.utils.mkldnn`` stores its weights): the
model keeps one copy of its weights, not two. Everything that needs the plain tensor
(``state_dict``, pickling, ``deepcopy``, ``.to()``, another dtype or batch regime) gets it back
exactly with ``to_dense()``.

On CPU in float32 the 3x3 stride-1 layers where it measured faster (see ``tactics.Winograd.rule``) run
Winograd F(2x2, 3x3) instead (our kernel, csrc/cpu/winograd.cpp): their cached weight is the
Winograd transform, made once, and the plain master stays as it is. The 1x1 layers the rule picks
(see ``tactics.Gemm.rule``) run as matrix products on our register-tile kernel (csrc/cpu/gemm_conv.cpp)
with the weight packed once into panels, which replace the plain master as oneDNN's packed weight
does.
Those are the rules; with ``tune`` (``fuse(tune=True)``, the default there) each layer measures
the kernels (those and Winograd F(4x4, 3x3)) on the first input of each shape instead and runs
the fastest that meets the accuracy rule (resnet_fused.tactics).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
from torch import Tensor, nn

from . import tactics
from .fold import master_dtype
from .ops import conv_output_size
from .replay import _version, invalidate

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
# Prepared weights a layer keeps, one per input regime: the batch sizes a dynamically batched
# server runs can choose different kernels, and a regime evicted is prepared again on its next call.
_CACHED_REGIMES = 4


def _return_freed_pages() -> None:
    """Hand pages that free() kept back to the OS (glibc only). A plain master freed when its
    prepacked copy replaces it sits in the middle of the heap, where glibc never trims on its own:
    without this the process keeps both copies' pages resident. Called once per repack, not per call."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _is_packed(w: Tensor) -> bool:
    """Whether a master weight is held prepacked: an opaque oneDNN tensor, or the panels of our
    matrix-product kernel (gemm_prepack: [ceil(K/32), kh, kw, C, 32])."""
    return w.is_mkldnn or w.dim() == 5


def to_channels_last(x):
    """The one layout conversion at the start of a fused chain (a no-op when x is channels-last
    already). Leaves anything but a 4-D tensor alone, so the fused op names the problem. A CPU
    float32 NCHW image takes our copy (``to_channels_last``: aten's runs its generic strided loop
    there, several times a plain copy's time). A sparse or mkldnn tensor is left alone too."""
    if isinstance(x, Tensor) and x.dim() == 4 and x.layout == torch.strided:
        # (tracing and export checked first: under torch.jit.trace a shape compared is a traced value)
        if (not capturing_for_serving() and not torch.compiler.is_compiling() and type(x) is Tensor
                and x.device.type == "cpu" and x.dtype == torch.float32
                and x.shape[1] <= 8 and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)):
            return torch.ops.resnet_fused.to_channels_last.default(x)
        return x.contiguous(memory_format=torch.channels_last)
    return x


_BN_STATS = (".running_mean", ".running_var", ".num_batches_tracked")


def _state_keys(module: nn.Module) -> set:
    """The keys module.state_dict() would have, without making it (a prepacked weight would be
    unpacked for it)."""
    keys = set()
    for name, m in module.named_modules(remove_duplicate=False):
        pre = name + "." if name else ""
        keys.update(pre + k for k, v in m._parameters.items() if v is not None)
        keys.update(pre + k for k, v in m._buffers.items() if v is not None and k not in m._non_persistent_buffers_set)
        if type(m).get_extra_state is not nn.Module.get_extra_state:
            keys.add(pre + "_extra_state")
    return keys


def check_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """A fused model's strict load_state_dict checks the keys before it loads anything (a pre-hook
    that fuse() puts on the model, and unpickling on a fused graph module). torch loads the keys
    that match and then raises; the state_dict most often offered by mistake, the model's own
    before fusion, has matching conv weights not yet folded, which would leave a wrong model
    behind the error."""
    if not strict:
        return
    given = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
    expected = _state_keys(module)
    if given == expected:
        return
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if any(k.endswith(_BN_STATS) for k in unexpected):
        example = next((k for k in unexpected if k.endswith(".running_mean")), None) or next(
            k for k in unexpected if k.endswith(_BN_STATS))
        raise ValueError(
            f"resnet_fused: this state_dict holds BatchNorm statistics (e.g. '{example}') that the fused model "
            "has folded into its convolutions: it is the model's before fusion. Load it into that model and "
            "fuse it again; nothing was loaded")
    raise ValueError(f"resnet_fused: the state_dict's keys are not the fused model's (missing: {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''}; unexpected: {unexpected[:5]}"
                     f"{' ...' if len(unexpected) > 5 else ''}); nothing was loaded")


def capturing_for_serving() -> bool:
    """Whether torch.export or torch.jit.trace is capturing the model into a graph to serve
    elsewhere (AOTInductor, LibTorch). Then the fused layers call one op on their plain master
    weight, whatever the input's size: nothing prepacked (an opaque oneDNN tensor) or chosen per
    batch size may end up in the graph. torch.compile keeps the eager paths (its graph stays in
    this process)."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def inputs_finite(*xs) -> bool:
    """Whether a fused graph's inputs are free of NaN and Inf: then its convs may run their
    ReLU as a oneDNN post-op or cuDNN's fused op (which map NaN to 0); otherwise they keep
    torch.relu's NaN semantics. On CPU one read per input (``all_finite``: each element's exponent
    bits); on CUDA one sum per input (a finite sum means finite elements; a huge input whose sum
    overflows just takes the exact path), which is a synchronisation per
    forward: it is made only once some layer has chosen cuDNN's fused op, never while a CUDA graph
    is captured, and a layer runs that op only after a check that was made (inputs_verified).
    A graph captured for serving (torch.export, torch.jit.trace) cannot branch on the data: it
    keeps the exact semantics (measured no slower there: its layers run oneDNN's convolution on
    plain weights either way). torch.compile's graphs take the post-op path, as Inductor's own
    CPU fusions do."""
    if capturing_for_serving():
        return False
    if torch.compiler.is_compiling():
        return True
    _verified.all = skipped = False
    for x in xs:
        if isinstance(x, Tensor) and x.is_floating_point() and x.numel():
            if x.layout != torch.strided:
                return False  # (not read: the exact path, where a layer names what it cannot take)
            if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # (cuda_graph checks each replay's input itself where it captures with this on)
                skipped = skipped or not getattr(_verified, "capture", False)
                continue
            if x.device.type not in ("cpu", "cuda") or (x.device.type == "cuda" and not tactics.cudnn_fused_in_use()):
                skipped = True  # (not checked: a layer on cuDNN's fused op takes the exact path)
                continue
            if x.device.type == "cpu":
                if not torch.ops.resnet_fused.all_finite.default(x):
                    return False
            elif not bool(torch.isfinite(x.sum())):
                return False
    _verified.all = not skipped
    return True


def inputs_verified() -> bool:
    """Whether this thread's last inputs_finite checked every input (and found them finite): what
    a layer on cuDNN's fused op asks before it runs it."""
    return getattr(_verified, "all", False)


@contextlib.contextmanager
def capture_with_checked_inputs():
    """Within: a CUDA graph being captured counts its inputs as checked finite, so that layers on
    cuDNN's fused op record it. For cuda_graph, which then checks every replay's input before it
    replays, and runs the model eagerly (the exact path) on one that is not finite."""
    previous = getattr(_verified, "capture", False)
    _verified.capture = True
    try:
        yield
    finally:
        _verified.capture = previous


def runs_cudnn_fused(model: nn.Module) -> bool:
    """Whether some fused layer of ``model`` runs cuDNN's fused op for an input it has met."""
    return any(isinstance(m, FusedConv2d) and any(v[2] == tactics.CUDNN_FUSED for v in m._cache.values())
               for m in model.modules())


_verified = threading.local()


_REGIME_STATE = frozenset(("_memo", "_cache", "_tuned", "_checked"))


class _Watched(nn.Module):
    """A fused module whose every attribute, parameter or submodule set drops the recorded runs
    that may rely on it (see replay.py), but for what a new input regime adds: ``_memo`` (a memo
    of the last call), ``_cache`` (the prepared weights per regime), ``_tuned`` and ``_checked``
    (the kernel measured per input shape, and the weights it was checked on). A recording holds
    the prepared weights it runs, whose values hang only on the master (its parameters are
    guarded, and every change of master drops the recordings itself), and its own shape's choice
    is made before it records. Otherwise each batch size new to a dynamically batched server
    dropped every recording of the process."""

    def __setattr__(self, name, value):
        if name not in _REGIME_STATE:
            invalidate()
        super().__setattr__(name, value)



# The fused graph calls these two as submodules rather than functions: a pickled GraphModule is
# re-traced on torch.load with every module a leaf, and a module call survives that unchanged.
class ToChannelsLast(_Watched):
    """See :func:`to_channels_last`."""

    def forward(self, x):
        return to_channels_last(x)


class InputsFinite(_Watched):
    """See :func:`inputs_finite`."""

    def forward(self, *xs) -> bool:
        return inputs_finite(*xs)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class FusedConv2d(_Watched):
    """``act(conv2d(x, W') + b' [+ residual])`` with BatchNorm folded into ``W'`` and ``b'``.

    ``forward(x, residual=None)``. Inference only: parameters do not require grad, and an input
    that requires grad raises.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        groups: int = 1,
        weight: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        relu: bool = False,
        residual: bool = False,
        folded_bn: bool = False,
        prepack: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = list(stride)
        self.padding = list(padding)
        self.dilation = list(dilation)
        self.groups = groups
        self.relu = relu
        self.residual = residual
        self.folded_bn = folded_bn
        self.prepack = prepack
        # Write the result into the residual's buffer (set by fuse() where nothing reads the
        # residual after the join).
        self.inplace_residual = False
        # CPU float32, prepacked: run the layers that fit (tactics.Winograd.rule) as Winograd F(2x2, 3x3).
        self.winograd = True
        # CPU float32, prepacked: run the 1x1 layers that fit (tactics.Gemm.rule) as blocked matrix products.
        self.gemm = True
        # CPU float32, prepacked: measure the candidate kernels on the first input of each regime
        # and run the fastest that meets the accuracy rule (tactics.choose; fuse(tune=True) sets
        # it). Off: the rules (tactics.rule_choice) pick.
        self.tune = False
        self.tune_name = ""  # the layer's name in the model, for progress lines and the report
        self._tuned: dict = {}  # (input shape, threads, switches) -> kernel ("" for oneDNN)
        # the same key -> the weights a choice that hung on an accuracy check of this layer's own
        # weights was made for (_weights_token): other weights choose again
        self._checked: dict = {}
        self._tactics_log: Optional[list] = None  # the fuse report's list of choices, if any
        if weight is None:
            weight = torch.zeros(out_channels, in_channels // groups, *self.kernel_size)
        if bias is None:
            bias = torch.zeros(out_channels, dtype=weight.dtype, device=weight.device)
        mdt = master_dtype(weight.dtype)
        # (kept in the layout it comes in: fuse() passes it channels-last when the layer will run so)
        w = weight.detach().to(mdt)
        cl = w.is_contiguous(memory_format=torch.channels_last)
        self._master_cl = cl  # (a bool: torch.memory_format does not pickle)
        self.weight = nn.Parameter(w.contiguous(memory_format=self._master_format), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().to(mdt).contiguous(), requires_grad=False)
        # None: compute in the masters' dtype. Set by .half() / .bfloat16() / .to(dtype).
        self.compute_dtype: Optional[torch.dtype] = None
        self._cache: dict = {}
        self._packed_for: Optional[tuple] = None  # the regime a prepacked master was packed for
        self._memo: Optional[tuple] = None  # the last call's answer of _weights (see _memo_key)
        self._plain_strides: Optional[tuple] = None  # the plain master's, where panels replaced it
        # The transformed Winograd weight a graph captured for serving runs (export(winograd=True)):
        # set only while it is captured.
        self._serving_winograd: Optional[Tensor] = None
        self._lock = threading.Lock()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight: Tensor, bias: Tensor, padding, folded_bn: bool, prepack: bool = True):
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            padding,
            conv.dilation,
            conv.groups,
            weight=weight,
            bias=bias,
            folded_bn=folded_bn,
            prepack=prepack,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or self.weight.dtype

    def extra_repr(self) -> str:
        parts = [
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={tuple(self.stride)}",
        ]
        if any(self.padding):
            parts.append(f"padding={tuple(self.padding)}")
        if any(d != 1 for d in self.dilation):
            parts.append(f"dilation={tuple(self.dilation)}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        parts.append("bn=folded" if self.folded_bn else "bn=none")
        if self.residual:
            parts.append("+residual" + (" (in place)" if self.inplace_residual else ""))
        if self.relu:
            parts.append("relu")
        if self.compute_dtype is not None:
            parts.append(f"dtype={self.compute_dtype}")
        return ", ".join(parts)

    # -- dtype/device handling: masters stay in float32 --------------------------------------
    def _apply(self, fn, recurse=True):
        # What fn does to a tensor of the current compute dtype says what it does to the module:
        # .to(device) keeps a half model half, .float() makes it float32 again.
        probe = fn(torch.zeros(1, dtype=self.dtype, device=self.weight.device))
        with self._lock, torch.no_grad():
            self._unpack_master()
            if probe.dtype.is_floating_point:
                self.compute_dtype = None if probe.dtype == self.weight.dtype else probe.dtype
            self.weight.data = self.weight.data.to(probe.device)
            self.bias.data = self.bias.data.to(probe.device)
            self._cache = {}
        return self

    # -- the master weight, plain or prepacked ----------------------------------------------
    @property
    def _master_format(self) -> torch.memory_format:
        return torch.channels_last if self._master_cl else torch.contiguous_format

    def dense_weight(self) -> Tensor:
        """The folded master weight as a plain tensor (a copy when it is held prepacked)."""
        w = self.weight
        if w.is_mkldnn:
            return w.to_dense().contiguous(memory_format=self._master_format)
        if w.dim() == 5:
            # (the strides the plain master had: a 1x1 weight counts as contiguous in both formats)
            plain = torch.ops.resnet_fused.gemm_unpack.default(w, self.out_channels)
            return torch.empty_strided(plain.shape, self._plain_strides or plain.stride(), dtype=plain.dtype,
                                       device=plain.device).copy_(plain)
        return w

    def _plain_master(self) -> nn.Parameter:
        return nn.Parameter(self.dense_weight(), requires_grad=False)

    def _unpack_master(self) -> None:
        """Make the master a plain tensor again (before it is moved, saved or loaded into)."""
        if _is_packed(self.weight):
            invalidate()
            self._parameters["weight"] = self._plain_master()
            self._cache = {}
            self._same_values_new_master()
        self._packed_for = None

    def unpack(self) -> None:
        """Hold the master weight as a plain tensor again (it is repacked on the next eager CPU
        float32 call). Before torch.export: an exported graph must not hold an oneDNN tensor."""
        with self._lock:
            self._unpack_master()

    def hold_for_serving(self) -> None:
        """The master as a graph captured for serving should hold it (before torch.export or
        torch.jit.trace, see _forward_plain): a CPU float32 layer that our matrix products take
        (groups 1, dilation 1, at least 8 input channels, ``gemm`` on) holds their panels, a plain
        tensor they read as it is; any other layer holds its plain weight. (A plain weight makes
        oneDNN reorder it on every call, which costs more than its convolution on the large ones;
        the 3-channel stem's is small, and oneDNN's direct kernel is the faster one there.)"""
        with self._lock:
            w = self.weight
            takes_panels = (w.device.type == "cpu" and self.dtype == torch.float32 and self.groups == 1
                            and tuple(self.dilation) == (1, 1) and self.in_channels >= 8 and self.gemm)
            if not takes_panels:
                self._unpack_master()
                return
            if w.dim() == 5:
                self._packed_for = None
                return
            plain = self.dense_weight()
            panels = torch.ops.resnet_fused.gemm_prepack.default(plain.to(torch.float32))
            self._plain_strides = plain.stride()
            invalidate()
            self._parameters["weight"] = nn.Parameter(panels, requires_grad=False)
            self._same_values_new_master()
            self._packed_for = None
            self._cache = {}
            self._memo = None
            del w, plain
            _return_freed_pages()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if _is_packed(self.weight):
            destination[prefix + "weight"] = self.dense_weight()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = {}  # prepacked oneDNN tensors are not picklable, and are rebuilt on use
        if _is_packed(self.weight):
            params = dict(self._parameters)
            params["weight"] = self._plain_master()
            state["_parameters"] = params
            state["_packed_for"] = None  # (the copy's master is plain)
        state.pop("_lock", None)
        state["_tuned"] = {}  # choices hold for this machine: a copy loaded elsewhere chooses again
        state["_checked"] = {}
        state["_memo"] = None
        state["_serving_winograd"] = None
        return state

    def __setstate__(self, state):
        state.setdefault("inplace_residual", False)
        state.setdefault("_packed_for", None)
        state.setdefault("_plain_strides", None)
        state.setdefault("winograd", True)
        state.setdefault("gemm", True)
        state.setdefault("tune", False)
        state.setdefault("tune_name", "")
        state.setdefault("_tuned", {})
        state["_checked"] = {}
        state.setdefault("_tactics_log", None)
        state["_memo"] = None
        state["_serving_winograd"] = None
        self.__dict__.update(state)
        if "_master_cl" not in state:
            self._master_cl = _is_channels_last(self.weight)
        self._cache = {}
        self._lock = threading.Lock()

    def _load_from_state_dict(self, *args, **kwargs):
        with self._lock:
            self._unpack_master()
            self._cache = {}
            # choices that hung on the old weights' accuracy (see tactics.check_accuracy) are made again
            self._tuned = {k: v for k, v in self._tuned.items() if k not in self._checked}
            self._checked = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def __prepare_scriptable__(self):
        raise TypeError("resnet_fused: a fused model cannot be compiled by torch.jit.script; for TorchScript trace "
                        "it with resnet_fused.trace(model, example) (or torch.jit.trace), or export it with "
                        "resnet_fused.export")

    def _check_input(self, x: Tensor) -> None:
        dtype = self.dtype
        if x.dtype != dtype:
            if not x.dtype.is_floating_point:
                raise TypeError(f"FusedConv2d computes in {dtype} but got a {x.dtype} input; cast the input "
                                f"with .to({dtype})")
            raise TypeError(
                f"FusedConv2d computes in {dtype} but got a {x.dtype} input; cast the input, or the model "
                f"with .to({x.dtype})" + (" (float64 has no fused kernel)" if x.dtype == torch.float64 else "")
            )
        if x.device != self.weight.device:
            raise ValueError(f"FusedConv2d is on {self.weight.device} but got an input on {x.device}")
        if dtype not in _SUPPORTED:
            raise TypeError(f"FusedConv2d: no fused kernel for {dtype}; use float32, float16 or bfloat16")

    def _cache_key(self, x: Tensor) -> tuple:
        """(input regime, master): what a cached weight was made for and from.

        oneDNN packs a weight for the input it will meet: batch 1 and larger batches pack
        differently, and so do different image sizes (the batch beyond 1 does not matter). A weight
        packed for other sizes still gives the right answer, but oneDNN reorders it on every call
        (2-3x slower per layer), so the regime names them. The master part names the tensor the
        weight was made from (object, storage, in-place edits). Off the CPU nothing is packed and
        the image size is left out. The regime ends with the kernel the layer runs (a name of
        tactics.CANDIDATES, "" for oneDNN / the native path), which depends on the batch too (see _path)."""
        w, b = self.weight, self.bias
        regime = (x.dtype, x.device, x.is_contiguous(memory_format=torch.channels_last), x.dim(),
                  x.shape[1] if x.dim() > 1 else -1, x.dim() > 0 and x.shape[0] == 1,
                  tuple(x.shape[2:]) if self.prepack and x.device.type == "cpu" else (), self._path(x))
        return regime, (id(w), 0 if w.is_mkldnn else w.data_ptr(), _version(w), _version(b))

    def _tune_key(self, x: Tensor) -> tuple:
        return (tuple(x.shape), torch.get_num_threads(), self.winograd, self.gemm, x.device.type)

    def _path(self, x: Tensor) -> str:
        """The CPU float32 kernel this layer runs for input x: "winograd", "gemm", ... (tactics.CANDIDATES), or "" (the oneDNN
        convolution; every other device and dtype). With ``tune`` the measured choice for x's
        shape (tactics.choose), or "?" before it is made (a cache miss: _weights makes it);
        without, the rules (tactics.rule_choice: each candidate's ``rule``). On CUDA in float16/bfloat16 with
        ``tune``, the measured CUDA path (tactics.CUDA_ALGOS, "cudnn_fused"); else "" (the op's
        own choice)."""
        if tactics.cuda_tunable(self, x):
            # (nothing is measured or run by choice while set_cuda_conv("cudnn") holds)
            return self._tuned.get(self._tune_key(x), "?") if self.tune and tactics.cuda_backend() == "ours" else ""
        if not tactics.cpu_float32_prepacked(self, x):
            return ""
        if self.tune:
            key = self._tune_key(x)
            name = self._tuned.get(key, "?")
            if key in self._checked and self._checked[key] != self._weights_token():
                return "?"  # checked on other weights
            return name
        name = tactics.rule_choice(self, x)
        return "" if name == tactics.ONEDNN else name

    def _weights_token(self) -> tuple:
        """Which weights these are: the tensors and their in-place edits."""
        w, b = self.weight, self.bias
        return (id(w), 0 if w.is_mkldnn else w.data_ptr(), _version(w), id(b), _version(b))

    def _same_values_new_master(self) -> None:
        """The master was replaced by the same values in another layout: the checks still hold."""
        token = self._weights_token()
        self._checked = {k: token for k in self._checked}

    def _choose(self, x: Tensor, residual: Optional[Tensor]) -> None:
        """Make the tuned choice for x's shape (under the lock, on a cache miss)."""
        key = self._tune_key(x)
        try:
            name, record = tactics.decide(self, x, residual, tune=True)
        except Exception as err:  # noqa: BLE001 - a failed measurement must not fail the forward
            import warnings

            warnings.warn(f"resnet_fused: measuring {self.tune_name or self} failed ({type(err).__name__}: "
                          f"{err}); the rules choose", RuntimeWarning, stacklevel=4)
            name, record = tactics.rule_choice(self, x), {"source": "rule (measuring failed)"}
        self._tuned = {**self._tuned, key: "" if name == tactics.ONEDNN else name}
        if name == tactics.CUDNN_FUSED:
            tactics.note_cudnn_fused()
        checked = {k: v for k, v in self._checked.items() if k != key}
        if any(tactics.weight_dependent(n) for n in [name, *record.get("rejected", {})]):
            checked[key] = self._weights_token()
        self._checked = checked
        if self._tactics_log is not None:
            self._tactics_log.append({
                "layer": self.tune_name, "input": "x".join(map(str, x.shape)), "threads": key[1],
                "choice": name, "source": record.get("source", ""), "times_ms": record.get("times_ms", {}),
                "rejected": record.get("rejected", {}),
            })

    def _memo_key(self, x: Tensor) -> tuple:
        """Everything _cache_key reads, in the few calls it takes to read them (a model calls each
        layer again and again in one input regime: _cache_key's own work was a third of a small
        layer's time on CPU). Objects by identity; the memo pins them, so no id is reused."""
        p = self._parameters
        w, b = p["weight"], p["bias"]
        return (x.shape, x.stride(), x.dtype, x.device, torch.get_num_threads(), id(w), id(b),
                0 if w.is_mkldnn else w.data_ptr(), _version(w), _version(b), id(self._cache), id(self._tuned),
                self.winograd, self.gemm, self.tune, self.prepack, self.compute_dtype)

    def _weights(self, x: Tensor, residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor, str]:
        """The weight in x's dtype and layout (prepacked on CPU) and the bias, cached, and the
        kernel they are for (see _path). The key holds everything a hit relies on, so the input
        checks run on a miss only; the last call's answer is kept apart (_memo_key)."""
        if x.layout != torch.strided:
            raise TypeError(f"FusedConv2d takes a dense (strided) input, got a {x.layout} tensor; "
                            "call .to_dense() first")
        memo = self._memo
        if memo is not None and memo[0] == self._memo_key(x):
            return memo[1]
        found = self._weights_cached(x, residual)
        if x.dim() == 4 and x.shape[1] == self.in_channels and x.dtype == self.dtype:
            p = self._parameters
            self._memo = (self._memo_key(x), found, (p["weight"], p["bias"], self._cache, self._tuned))
        return found

    def _weights_cached(self, x: Tensor, residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor, str]:
        hit = self._cache.get(self._cache_key(x))
        if hit is not None:
            return hit
        self._check_input(x)
        dtype = self.dtype
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            # (a wrong input goes to the op as it is, for the op's own clear error)
            return self.dense_weight().to(dtype), self.bias.to(torch.float32), ""
        cl = _is_channels_last(x)
        with self._lock, torch.no_grad():
            key = self._cache_key(x)  # again: another thread may have changed the master meanwhile
            if key[0][-1] == "?":  # tuning, and no choice yet for this shape
                self._choose(x, residual)
                key = self._cache_key(x)
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            # CPU kernels add the bias in the input's dtype (oneDNN's bias, ATen's conv bias): cast
            # once here rather than on every call. CUDA's epilogue adds a float32 bias; a measured
            # CUDA path takes it as the candidate that was timed did.
            if key[0][-1] in tactics.CUDA_PATHS:
                b = tactics.candidate(key[0][-1]).bias(self, x)
            else:
                b = self.bias.to(dtype if x.device.type == "cpu" else torch.float32)
            master = self.weight
            if master.is_mkldnn and key[0] == self._packed_for:
                w = master  # the master is this regime's packed weight
            elif key[0][-1] in (*tactics.CUDA_PATHS, *tactics.WINOGRAD_PATHS, tactics.GROUPED):
                # (a CUDA path runs the weight its candidate was timed with, never oneDNN's packing)
                w = tactics.candidate(key[0][-1]).prepare(self, x)
            elif key[0][-1] == "gemm":
                # Packed in panels once (the same for every input regime); the panels replace a
                # plain float32 master, as oneDNN's packed weight does below.
                if master.dim() == 5:
                    w = master
                else:
                    w = torch.ops.resnet_fused.gemm_prepack.default(self.dense_weight().to(dtype))
                    if not _is_packed(master) and master.dtype == w.dtype:
                        self._plain_strides = master.stride()
                        invalidate()
                        self._parameters["weight"] = w = nn.Parameter(w, requires_grad=False)
                        self._same_values_new_master()
                        self._packed_for = key[0]
                        self._cache = {}
                        key = self._cache_key(x)
                        del master
                        _return_freed_pages()
            else:
                w = self.dense_weight().to(dtype)
                w = w.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
                if self.prepack and w.device.type == "cpu":
                    w = torch.ops.resnet_fused.prepack_conv2d_weight.default(
                        w, self.stride, self.padding, self.dilation, self.groups, list(x.shape)
                    )
                if w.is_mkldnn and not _is_packed(master) and w.dtype == master.dtype:
                    # Same values, reordered: the packed weight replaces the plain master.
                    invalidate()
                    self._parameters["weight"] = w = nn.Parameter(w, requires_grad=False)
                    self._same_values_new_master()
                    self._packed_for = key[0]
                    self._cache = {}
                    key = self._cache_key(x)
                    del master  # the last reference to the plain master, so that its pages can go
                    _return_freed_pages()
            # At most _CACHED_REGIMES entries (batch 1 and larger batches, each with the kernel
            # measured for it, say): one more replaces the oldest that is not the master itself; a
            # new dtype or device, or a changed master, drops them all. Copy-on-write, so readers
            # never see a dict change.
            entries = [(k, v) for k, v in self._cache.items()
                       if k[0][:2] == key[0][:2] and k[1] == key[1] and k[0] != key[0]]
            if len(entries) >= _CACHED_REGIMES:
                oldest = next((e for e in entries if e[1][0] is not self.weight), entries[0])
                entries.remove(oldest)
            self._cache = dict(entries + [(key, (w, b, key[0][-1]))])
            return w, b, key[0][-1]

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, assume_finite: bool = False) -> Tensor:
        if (residual is not None) != self.residual:
            raise ValueError(
                f"FusedConv2d was fused {'with' if self.residual else 'without'} a residual input, "
                f"got {'one' if residual is not None else 'none'}"
            )
        if capturing_for_serving():
            return self._forward_plain(x, residual, assume_finite)
        if torch.compiler.is_compiling():
            self._check_input(x)
            w = self.weight if self.weight.is_mkldnn else self.dense_weight().to(self.dtype)
            b = self.bias.to(torch.float32)
            path = ""
        else:
            w, b, path = self._weights(x, residual)
        if path == "gemm":
            # (exact NaN semantics whatever assume_finite says: the epilogue is ours)
            if residual is not None and self.inplace_residual:
                torch.ops.resnet_fused.gemm_conv2d_bias_act_.default(residual, x, w, b, self.stride, self.padding,
                                                                     self.relu, self.out_channels)
                return residual
            return torch.ops.resnet_fused.gemm_conv2d_bias_act.default(x, w, b, residual, self.stride, self.padding,
                                                                       self.relu, self.out_channels)
        if path == tactics.CUDNN_FUSED and not (assume_finite and inputs_verified() and tactics.cuda_backend() == "ours"):
            # NaN kept: cuDNN + our epilogue (the bias rounded as cuDNN's fused op takes it)
            path, b = tactics.CUDNN, b.to(torch.float32)
        if path in tactics.CUDA_PATHS or path == tactics.GROUPED:
            # (the candidate the measurement timed runs the layer; the CPU grouped kernel keeps NaN
            # whatever assume_finite says: its epilogue is ours)
            c = tactics.candidate(path)
            if residual is not None and self.inplace_residual and c.writes_residual:
                c.run_(self, x, w, b, residual)
                return residual
            return c.run(self, x, w, b, residual)
        if path in tactics.WINOGRAD_PATHS:
            if not assume_finite:
                # Its transforms subtract inputs: an Inf would come out NaN where the direct
                # convolution gives Inf. Inputs that may hold NaN/Inf take the direct path.
                w = self.dense_weight()
            elif residual is not None and self.inplace_residual:
                tactics.candidate(path).run_(self, x, w, b, residual)
                return residual
            else:
                return tactics.candidate(path).run(self, x, w, b, residual)
        if residual is not None and self.inplace_residual:
            torch.ops.resnet_fused.conv2d_bias_act_.default(
                residual, x, w, b, self.stride, self.padding, self.dilation, self.groups, self.relu, assume_finite
            )
            return residual
        return torch.ops.resnet_fused.conv2d_bias_act.default(
            x, w, b, residual, self.stride, self.padding, self.dilation, self.groups, self.relu, assume_finite
        )

    def _forward_plain(self, x: Tensor, residual: Optional[Tensor], assume_finite: bool) -> Tensor:
        """One op per layer for any input (see capturing_for_serving), on a master that is a plain
        tensor: our matrix products on their panels where the master holds them (hold_for_serving),
        else conv2d_bias_act on the plain weight. Out of place (a graph captured for serving owns its
        buffers). A fused graph passes assume_finite=False here: exact NaN semantics (see
        inputs_finite; the matrix products' epilogue keeps NaN whatever it is told)."""
        if self._serving_winograd is not None:
            # (export / trace with winograd=True: the caller took its transforms' Inf -> NaN)
            self._check_input(x)
            return torch.ops.resnet_fused.winograd_conv2d_bias_act.default(x, self._serving_winograd, self.bias,
                                                                           residual, self.relu, 0, self.out_channels)
        if self.weight.dim() == 5:
            self._check_input(x)
            b = self.bias if self.bias.dtype == torch.float32 else self.bias.to(torch.float32)
            return torch.ops.resnet_fused.gemm_conv2d_bias_act.default(x, self.weight, b, residual, self.stride,
                                                                       self.padding, self.relu, self.out_channels)
        # (under torch.export the weight is a fake tensor that looks plain: _packed_for says
        # whether the real one is an oneDNN tensor, which would land in the exported program)
        if _is_packed(self.weight) or self._packed_for is not None:
            raise RuntimeError(
                "FusedConv2d holds its weight prepacked for oneDNN (the model has run on CPU in float32), "
                "and an exported or traced graph must hold plain tensors: use resnet_fused.export(model, example) "
                "/ resnet_fused.trace(model, example), or call resnet_fused.hold_for_serving(model) (or unpack_weights) before "
                "torch.export.export / torch.jit.trace"
            )
        self._check_input(x)
        w = self.weight if self.weight.dtype == self.dtype else self.weight.to(self.dtype)
        b = self.bias if self.bias.dtype == torch.float32 else self.bias.to(torch.float32)
        return torch.ops.resnet_fused.conv2d_bias_act.default(
            x, w, b, residual, self.stride, self.padding, self.dilation, self.groups, self.relu, assume_finite
        )

    def output_shape(self, input_shape) -> list:
        return conv_output_size(input_shape, (self.out_channels, 0, *self.kernel_size), self.stride, self.padding,
                                self.dilation)


class FusedLinear(FusedConv2d):
    """A classifier head's Linear on globally pooled ``[N, C, 1, 1]`` features, held as a 1x1 conv
    (fuse() makes it; the graph flattens its ``[N, K, 1, 1]`` output). On the CPU it runs as the
    conv layers do: in float32 our matrix products on packed panels, which aten's addmm does not
    have (it reads the plain weight, cold, on every call). On a GPU it is eager's ``F.linear``
    (cuBLAS; TF32 only where ``torch.backends.cuda.matmul`` allows it, as for the Linear it was)."""

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, assume_finite: bool = False) -> Tensor:
        if x.device.type == "cpu" or residual is not None:
            return super().forward(x, residual, assume_finite)
        self._check_input(x)
        key = ("linear", x.dtype, x.device, self._weights_token())
        hit = self._cache.get(key)
        if hit is None:
            w = self.dense_weight().to(dtype=x.dtype).reshape(self.out_channels, self.in_channels)
            hit = (w, self.bias.to(dtype=x.dtype), "linear")  # ((weight, bias, path) as every entry)
            self._cache = {**self._cache, key: hit}
        return torch.nn.functional.linear(x.flatten(1), hit[0], hit[1])[:, :, None, None]


class FusedDual(_Watched):
    """A bottleneck's last 1x1 (``conv``: with the block's residual and ReLU) whose residual is its
    downsample 1x1 (``downsample``: no ReLU) of the block's input; fuse() makes it. On CUDA in
    float16/bfloat16 (channels-last, ``tune``) the pair runs as one product over both reductions
    (our dual kernel: the downsample's output is never written nor read back) where the tactics
    measured that faster than the two layers (tactics.decide_dual); everywhere else, and while a
    graph is captured or compiled, as the two layers, each on its own choice, as before."""

    def __init__(self, conv: FusedConv2d, downsample: FusedConv2d):
        super().__init__()
        self.conv, self.downsample = conv, downsample
        self._choice: dict = {}  # input regime -> tactics.SEPARATE or a dual tile
        self._weights_cache: tuple = ()  # (key, w, b)
        self._lock = threading.Lock()
        self._tactics_log = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_choice"], state["_weights_cache"] = {}, ()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def stride2(self) -> int:
        return int(self.downsample.stride[0])

    @property
    def tune_name(self) -> str:
        return f"{self.conv.tune_name} + {self.downsample.tune_name}"

    def separate(self, y: Tensor, x: Tensor, assume_finite: bool = False) -> Tensor:
        return self.conv(y, self.downsample(x, assume_finite=assume_finite), assume_finite=assume_finite)

    def dual_weights(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """[conv's weight | downsample's] in y's dtype, channels-last, and the sum of their biases
        (float32), cached for the weights they were made from."""
        c, d = self.conv, self.downsample
        key = (y.dtype, y.device, c._weights_token(), d._weights_token())
        if not self._weights_cache or self._weights_cache[0] != key:
            with torch.no_grad():
                w = torch.cat([c.dense_weight(), d.dense_weight()], 1).to(y.dtype)
                w = w.contiguous(memory_format=torch.channels_last)
                b = c.bias.to(torch.float32) + d.bias.to(torch.float32)
            self._weights_cache = (key, w, b)
        return self._weights_cache[1], self._weights_cache[2]

    def _path(self, y: Tensor, x: Tensor, assume_finite: bool) -> str:
        key = (tuple(y.shape), tuple(x.shape), y.dtype, x.dtype, y.device, _is_channels_last(y), _is_channels_last(x),
               tactics.cuda_backend())
        name = self._choice.get(key)
        if name is None:
            with self._lock:
                name = self._choice.get(key)
                if name is None:
                    name, record = tactics.SEPARATE, {}
                    if tactics.dual_applies(self, y, x):
                        name, record = tactics.decide_dual(self, y, x, assume_finite)
                        if self._tactics_log is not None:
                            self._tactics_log.append({
                                "layer": self.tune_name, "input": "x".join(map(str, x.shape)),
                                "threads": torch.get_num_threads(),
                                "choice": name, "source": record.get("source", ""),
                                "times_ms": record.get("times_ms", {}), "rejected": record.get("rejected", {})})
                    if name == tactics.SEPARATE:
                        self._weights_cache = ()  # (the pair's weight is not kept for the two layers)
                    self._choice = {**self._choice, key: name}
        return name

    def forward(self, y: Tensor, x: Tensor, assume_finite: bool = False) -> Tensor:
        if (self.conv.tune and self.downsample.tune and tactics.cuda_tunable(self.conv, y)
                and not capturing_for_serving() and not torch.compiler.is_compiling()):
            name = self._path(y, x, assume_finite)
            if name != tactics.SEPARATE:
                w, b = self.dual_weights(y)
                return next(c for c in tactics.DUAL_CANDIDATES if c.name == name).run(self, y, w, b, x)
        return self.separate(y, x, assume_finite)


class FusedAddReLU(_Watched):
    """``relu(a + b)`` for a residual join that no convolution absorbed. Operands of different
    shapes or dtypes (broadcasting, type promotion) take PyTorch's own ops, so the result is
    always what eager gives."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.dtype in _SUPPORTED
            and a.device == b.device
        ):
            return torch.ops.resnet_fused.add_relu.default(a, b)
        return torch.relu(a + b)


def _our_cpu_pool_takes(x) -> bool:
    """Where our pooling kernels run: a CPU float32 channels-last input, no autograd, not while a
    graph is captured or compiled (there PyTorch's pool is traced instead)."""
    return (isinstance(x, Tensor) and x.device.type == "cpu" and x.dtype == torch.float32 and _is_channels_last(x)
            and not (x.requires_grad and torch.is_grad_enabled())
            and not capturing_for_serving() and not torch.compiler.is_compiling())


class FusedGlobalAvgPool2d(_Watched):
    """``nn.AdaptiveAvgPool2d(1)`` (a ResNet's pool before its classifier) that runs our kernel on a
    CPU float32 channels-last input (``global_avg_pool_nhwc``: one read, each channel summed over
    the pixels in order) and ``F.adaptive_avg_pool2d`` on anything else, or while a graph is
    captured or compiled."""

    def forward(self, x: Tensor) -> Tensor:
        if _our_cpu_pool_takes(x):
            return torch.ops.resnet_fused.global_avg_pool_nhwc.default(x)
        return torch.nn.functional.adaptive_avg_pool2d(x, 1)


class FusedMaxPool2d(_Watched):
    """``nn.MaxPool2d`` (dilation 1, no indices) that runs our channels-last kernel on a CPU
    float32 channels-last input (``max_pool2d_nhwc``: PyTorch's CPU kernel computes indices and
    drops them) and ``F.max_pool2d`` on anything else, or while a graph is captured or compiled.
    The same values either way, NaN propagating as PyTorch's."""

    def __init__(self, kernel_size, stride, padding, ceil_mode: bool = False):
        super().__init__()
        self.kernel_size, self.stride, self.padding = list(kernel_size), list(stride), list(padding)
        self.ceil_mode = bool(ceil_mode)

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d) -> "FusedMaxPool2d":
        def pair(v):
            return [v, v] if isinstance(v, int) else list(v)

        return cls(pair(pool.kernel_size), pair(pool.stride if pool.stride is not None else pool.kernel_size),
                   pair(pool.padding), pool.ceil_mode)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, ceil_mode={self.ceil_mode}"

    def forward(self, x: Tensor) -> Tensor:
        if _our_cpu_pool_takes(x):
            return torch.ops.resnet_fused.max_pool2d_nhwc.default(x, self.kernel_size, self.stride, self.padding,
                                                                  self.ceil_mode)
        return torch.nn.functional.max_pool2d(x, self.kernel_size, self.stride, self.padding, 1, self.ceil_mode)
