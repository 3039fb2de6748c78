"""Replay a fused graph's ops on CPU without the Python between them.

At batch 1 on CPU the Python around each fused layer (the module call, its weight-cache key, the
op's dispatch from Python) costs tens of microseconds once the kernel before has evicted it from
the caches: a few percent of a ResNet-50 forward, where ONNX Runtime's executor is C++. So after a
fused graph has run twice on inputs of one regime (shape, strides, dtype, threads, grad and
inference mode), the next call records the ops it dispatches (a TorchDispatchMode), and later calls
of that regime run that list of ops directly: the same kernels on the same prepared weights, in the
same order, so the same result bit for bit. The list runs in C++ (csrc/replay.cpp: each op's
argument stack built once, the GIL let go), or from Python where an argument has a type the C++
plan is not given.

A recorded run is only replayed while nothing it relied on can have changed:

- the modules: any attribute, parameter, buffer or submodule set on a fused module, and any
  parameter, buffer or submodule registered on any module, moves a process-wide epoch
  (:func:`invalidate`), which drops every recording;
- the tensors: every tensor the ops read that was not made during the call, and every parameter
  and buffer of the graph, must keep its version (in-place edits) and its data (``.data =``);
- data-dependent branches: an op that returned a Python value (the finiteness check's
  ``is_nonzero``) must return the same value again, else the call starts over on the module path;
- hooks: the graph or a module it calls having any hook turns replay off for the call.

Recording happens only where every op is a plain ATen or resnet_fused op and every tensor an op
writes in place was made during the call. ``RESNET_FUSED_REPLAY=0`` turns replay off.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Optional

import torch
from torch import Tensor, fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

_epoch = [0]
_RECORD_AFTER = 2  # normal calls of a regime before the one that records (the first may tune)
_MAX_PLANS = 16  # (input regimes recorded per graph: a dynamically batched server runs several)
enabled = os.environ.get("RESNET_FUSED_REPLAY", "1") != "0"


def invalidate(*_args) -> None:
    """Drop every recorded run (something a recording relied on may have changed)."""
    _epoch[0] += 1


for _register in (nn.modules.module.register_module_module_registration_hook,
                  nn.modules.module.register_module_parameter_registration_hook,
                  nn.modules.module.register_module_buffer_registration_hook):
    _register(invalidate)


class _Diverged(Exception):
    """A replayed data-dependent value differed from the recorded one."""


class _Unreplayable(Exception):
    """An op the recording cannot turn into a step."""


class _Recorder(TorchDispatchMode):
    """Turns each op a call dispatches into a plan step as it runs. It holds the tensors the call
    made by weak reference only (an id with the object it was taken from), so they die when the
    module path lets them go (holding every op's arguments and output to the end, the call that
    records held all of its activations at once, far above the module path's peak)."""

    def __init__(self, x: Tensor):
        super().__init__()
        self.slots = {id(x): (weakref.ref(x), 0)}
        self.nslots = 1
        self.steps: list = []
        self.consts: dict = {}
        self.failed = False

    def slot(self, t: Tensor) -> Optional[int]:
        e = self.slots.get(id(t))
        return e[1] if e is not None and e[0]() is t else None

    def new_slot(self, t: Tensor) -> int:
        self.slots[id(t)] = (weakref.ref(t), self.nslots)
        self.nslots += 1
        return self.nslots - 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.failed:
            return func(*args, **kwargs)
        try:
            step = self.inputs(func, args, kwargs)
        except _Unreplayable:
            self.failed = True
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        try:
            self.steps.append([*step, *self.output(out)])
        except _Unreplayable:
            self.failed = True
        return out

    def inputs(self, func, args, kwargs) -> tuple:
        """(func, args with None where a tensor the call made goes, kwargs, ((position, slot), ...))"""
        if not isinstance(func, torch._ops.OpOverload) or func.namespace not in ("aten", "resnet_fused"):
            raise _Unreplayable
        if any(isinstance(v, Tensor) for v in kwargs.values()):
            raise _Unreplayable
        dyn, args = [], list(args)
        for pos, a in enumerate(args):
            if isinstance(a, Tensor):
                if type(a) not in (Tensor, nn.Parameter):  # (no tensor subclass: FakeTensor, ...)
                    raise _Unreplayable
                slot = self.slot(a)
                if slot is not None:
                    dyn.append((pos, slot))
                    args[pos] = None
                else:
                    self.consts[id(a)] = a
            elif isinstance(a, (list, tuple)) and any(isinstance(e, Tensor) for e in a):
                raise _Unreplayable  # (no op of a ResNet takes a list of tensors)
        # A tensor an op writes in place must be one this call made: never the caller's input or a
        # weight, which a replay would otherwise change.
        for pos, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                if pos >= len(args) or not any(p == pos for p, s in dyn) or dict(dyn)[pos] == 0:
                    raise _Unreplayable
        return func, tuple(args), dict(kwargs), tuple(dyn)

    def output(self, out) -> tuple:
        """(kind, dest): 0 nothing new (None, or an in-place op's argument), 1 a new tensor (its
        slot), 2 a Python value (the value, checked on replay), 3 tensors ([(index, slot), ...])."""
        if out is None:
            return 0, None
        if isinstance(out, Tensor):
            if type(out) is not Tensor:
                raise _Unreplayable
            if self.slot(out) is not None:  # (an in-place op returning its argument: the same slot)
                return 0, None
            return 1, self.new_slot(out)
        if isinstance(out, (bool, int, float)):
            return 2, out
        if isinstance(out, (tuple, list)) and all(isinstance(o, Tensor) and type(o) is Tensor for o in out):
            return 3, [(i, self.new_slot(o)) for i, o in enumerate(out) if self.slot(o) is None]
        raise _Unreplayable


def _version(t: Tensor) -> int:
    # Inference tensors have no version counter; they cannot be changed in place either. (A
    # Parameter made in inference mode keeps having none after `.data =` gives it a normal tensor.)
    if t.is_inference():
        return -1
    try:
        return t._version
    except RuntimeError:
        return -1


class _Plan:
    """One recorded run: steps of (op, positional args, keyword args, where the args' produced tensors
    come from, what its output is, the produced tensors no later step reads), and the tensors it
    relies on, sorted by the checks each needs (see _guards)."""

    __slots__ = ("steps", "nslots", "out", "epoch", "_both", "_version_only", "_data_only", "native")

    def __init__(self, steps, nslots, out, guards, epoch):
        self.steps, self.nslots, self.out, self.epoch = steps, nslots, out, epoch
        self._both, self._version_only, self._data_only = guards
        # The same plan in C++ (torch.classes.resnet_fused.ReplayPlan), or None: then the steps run
        # from Python (set it to None to run them so, e.g. with a step wrapped).
        self.native = _native(self)

    def unchanged(self) -> bool:
        if self.native is not None:
            return self.native.unchanged()
        try:
            for t, v, d in self._both:
                if t._version != v or t.data_ptr() != d:
                    return False
            for t, v in self._version_only:
                if t._version != v:
                    return False
            for t, d in self._data_only:
                if t.data_ptr() != d:
                    return False
        except RuntimeError:  # (a tensor without a version counter now: not replayed, never a failed call)
            return False
        return True

    def run(self, x: Tensor):
        if self.native is not None:
            out = self.native.run(x)
            if out is None:
                raise _Diverged
            return out
        vals: list = [None] * self.nslots
        vals[0] = x
        for func, args, kwargs, dyn, kind, dest, dead in self.steps:
            if dyn:
                args = list(args)
                for pos, slot in dyn:
                    args[pos] = vals[slot]
            # (an OpOverload's own op: its Python __call__ skipped; a wrapper without _op runs as it is)
            r = getattr(func, "_op", func)(*args, **kwargs)
            if kind == 1:
                vals[dest] = r
            elif kind == 2:
                if r != dest:
                    raise _Diverged
            elif kind == 3:
                for i, s in dest:
                    vals[s] = r[i]
            for s in dead:
                vals[s] = None
        return vals[self.out]


# c10::MemoryFormat's values
_MEMORY_FORMATS = {torch.contiguous_format: 0, torch.preserve_format: 1, torch.channels_last: 2,
                   torch.channels_last_3d: 3}


def _native(plan: _Plan):
    """plan's steps and guards as a ReplayPlan (csrc/replay.cpp), or None where one cannot hold them
    (an argument with no value to give, or of a type it is not given: a dtype, layout or device;
    the steps then run from Python)."""
    native = torch.classes.resnet_fused.ReplayPlan()  # (built into _C with every kernel: always there)
    try:
        for func, args, kwargs, dyn, kind, dest, dead in plan.steps:
            stack = []
            for i, a in enumerate(func._schema.arguments):
                if not a.kwarg_only and i < len(args):
                    v = args[i]
                elif a.name in kwargs:
                    v = kwargs[a.name]
                elif a.has_default_value():
                    v = a.default_value
                else:
                    return None
                if isinstance(v, torch.memory_format):
                    v = _MEMORY_FORMATS[v]  # (an enum reaches the C++ side as the int it is there)
                elif isinstance(v, (torch.dtype, torch.layout, torch.device)):
                    return None
                stack.append(v)
            if set(kwargs) - {a.name for a in func._schema.arguments}:
                return None
            pairs = [(0, dest)] if kind == 1 else list(dest) if kind == 3 else []
            native.add_step(func._schema.name, func._schema.overload_name, stack, [v for p in dyn for v in p], kind,
                            dest if kind == 2 else None, [v for p in pairs for v in p], list(dead))
        native.set_output(plan.out)
        for t, _, _ in plan._both:
            native.add_guard(t, True, True)
        for t, _ in plan._version_only:
            native.add_guard(t, True, False)
        for t, _ in plan._data_only:
            native.add_guard(t, False, True)
    except (RuntimeError, ValueError, TypeError):
        return None
    return native


def _record(gm: nn.Module, x: Tensor, call) -> tuple[Any, Optional[_Plan]]:
    """Runs gm on x through `call` (the module path), recording its ops; returns the result and
    the plan, or None where the run cannot be replayed."""
    epoch = _epoch[0]
    rec = _Recorder(x)
    with rec:
        result = call(x)
    if _epoch[0] != epoch or type(result) is not Tensor or rec.failed:
        return result, None
    out_slot = rec.slot(result)
    if out_slot is None:
        return result, None
    steps = rec.steps
    # Each tensor is let go after the last step that reads it, as the module path does: kept to the
    # end, every activation of the call was alive at once, and glibc gave their large blocks back to
    # the OS and faulted them in again (zeroed) on every call.
    last = {}
    for i, (_, _, _, dyn, kind, dest) in enumerate(steps):
        for _, slot in dyn:
            last[slot] = i
        for slot in ([dest] if kind == 1 else [s for _, s in dest] if kind == 3 else []):
            last.setdefault(slot, i)  # (an output nothing reads: let go at once)
    dead = [[] for _ in steps]
    for slot, i in last.items():
        if slot != out_slot:
            dead[i].append(slot)
    steps = [(*step, tuple(d)) for step, d in zip(steps, dead)]
    return result, _Plan(steps, rec.nslots, out_slot, _guards(list(rec.consts.values()) + list(gm.parameters())
                                                              + list(gm.buffers())), epoch)


def _guards(tensors) -> tuple[list, list, list]:
    """The checks each tensor a plan relies on needs, sorted once (asking every tensor what kind it
    is on every call cost several times the checks themselves): (tensor, version, data pointer),
    (tensor, version) for an mkldnn or sparse tensor (no data pointer to read), (tensor, data
    pointer) for an inference tensor (no version counter, ever)."""
    both, version_only, data_only, seen = [], [], [], set()
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        v, pointerless = _version(t), t.is_mkldnn or t.is_sparse
        if v != -1 and not pointerless:
            both.append((t, v, t.data_ptr()))
        elif v != -1:
            version_only.append((t, v))
        elif not pointerless:
            data_only.append((t, t.data_ptr()))
    return both, version_only, data_only


_g = nn.modules.module
_GLOBAL_HOOKS = (_g._global_forward_hooks, _g._global_forward_pre_hooks, _g._global_backward_hooks,
                 _g._global_backward_pre_hooks)


def _hook_dicts(modules) -> list:
    """The hook dicts of `modules` (registering a hook adds to them in place)."""
    return [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                         m._backward_pre_hooks)]


def _hooked(gm: nn.Module, hook_dicts: list) -> bool:
    # (gm's own dicts looked up each call: they are not in hook_dicts, see _called_modules)
    return (any(_GLOBAL_HOOKS) or any(hook_dicts) or bool(gm._forward_hooks or gm._forward_pre_hooks
                                                           or gm._backward_hooks or gm._backward_pre_hooks))


def _called_modules(gm: fx.GraphModule) -> list:
    """Every module gm's graph calls, with their submodules (whose hooks a call would run); gm's own
    hooks are checked apart (gm holds this list)."""
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for m in gm.get_submodule(node.target).modules():
                if m is not gm:
                    found[id(m)] = m
    return list(found.values())


class _Replayer:
    """A graph module's recordings, per input regime. Not copied or pickled with the module."""

    def __init__(self):
        self.lock = threading.Lock()
        self.plans: dict = {}
        self.counts: dict = {}
        self.epoch = _epoch[0]
        self.modules: list = []
        self.hook_dicts: list = []

    def __deepcopy__(self, memo):
        return _Replayer()

    def __reduce__(self):
        return (_Replayer, ())

    def regime(self, x: Tensor) -> tuple:
        return (x.shape, x.stride(), x.dtype, torch.get_num_threads(), torch.is_grad_enabled(),
                torch.is_inference_mode_enabled(), x.requires_grad, x.is_inference())

    def call(self, gm: nn.Module, x: Tensor, call):
        if self.epoch != _epoch[0]:
            with self.lock:
                self.plans, self.counts, self.epoch = {}, {}, _epoch[0]
                self.modules = []
        key = self.regime(x)
        plan = self.plans.get(key)
        if plan is not None and plan.epoch == _epoch[0] and not _hooked(gm, self.hook_dicts) and plan.unchanged():
            try:
                return plan.run(x)
            except _Diverged:
                return call(x)
        if not self.modules:
            self.modules = _called_modules(gm)
            self.hook_dicts = _hook_dicts(self.modules)
        n = self.counts.get(key, 0)
        if n < _RECORD_AFTER or _hooked(gm, self.hook_dicts):
            self.counts = {**self.counts, key: n + 1}
            return call(x)
        result, plan = _record(gm, x, call)
        with self.lock:
            self.counts = {**self.counts, key: -(1 << 30)} if plan is None else self.counts
            if plan is not None and plan.epoch == _epoch[0] == self.epoch:
                plans = dict(list(self.plans.items())[-(_MAX_PLANS - 1):])
                plans[key] = plan
                self.plans = plans
        return result


class FusedGraphModule(fx.GraphModule):
    """The GraphModule fuse() returns: on CPU, its calls after the first few of an input regime
    replay the recorded ops (see the module docstring)."""

    def _call_impl(self, *args, **kwargs):
        if (enabled and len(args) == 1 and not kwargs and type(args[0]) is Tensor and args[0].device.type == "cpu"
                and args[0].layout == torch.strided and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing() and not _serving()):
            replayer = self.__dict__.get("_replayer")
            if replayer is None:
                replayer = self.__dict__["_replayer"] = _Replayer()
            parent = super()._call_impl
            return replayer.call(self, args[0], parent)
        return super()._call_impl(*args, **kwargs)

    def __setattr__(self, name, value):
        invalidate()
        super().__setattr__(name, value)

    def __reduce__(self):
        fn, args = super().__reduce__()
        return (_rebuild, (fn, args))


def _serving() -> bool:
    from .modules import capturing_for_serving

    return capturing_for_serving()


def _rebuild(fn, args):
    from .modules import check_state_dict

    gm = as_replayed(fn(*args))
    gm.register_load_state_dict_pre_hook(check_state_dict)  # (fx rebuilds the module without its hooks)
    return gm


def as_replayed(gm: fx.GraphModule) -> FusedGraphModule:
    """gm as a FusedGraphModule (the same modules, graph and attributes)."""
    new = FusedGraphModule(gm, gm.graph, class_name=type(gm).__name__)
    for k, v in gm.__dict__.items():
        if k not in new.__dict__:
            new.__dict__[k] = v
    return new
