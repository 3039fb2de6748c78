"""fuse(model): trace a ResNet-style network with torch.fx, fold every BatchNorm into the conv
before it, absorb the ReLU and the residual join into the conv's epilogue, and route every conv
through torch.ops.resnet_fused.

Patterns (each a small match on the graph, in this order):
  conv -> bn                      fold (bn has running stats, conv output has one user)
  fused_conv -> relu              absorb the ReLU
  fused_conv -> add(., other)     absorb the residual (the add's only producer of that operand)
     -> relu                      ... and the ReLU after it
  add(a, b) -> relu               FusedAddReLU (a join no conv could absorb)
  1x1 fused_conv(y, residual=1x1 downsample(x))
                                  FusedDual (on CUDA, one product over both reductions where faster)
  conv (anything left)            FusedConv2d with the conv's own bias
What does not match is left as it is, and the report says why.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .fold import can_fold, fold_conv_bn, master_dtype
from .replay import as_replayed
from .modules import (FusedAddReLU, FusedConv2d, FusedDual, FusedGlobalAvgPool2d, FusedLinear, FusedMaxPool2d,
                      InputsFinite, ToChannelsLast, check_state_dict)

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, torch.nn.functional.relu}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_INPLACE_ADDS = {operator.iadd}
_INPLACE_ADD_METHODS = {"add_"}


@dataclasses.dataclass
class FuseReport:
    """What fuse() did: each fused layer with its pattern, each thing left with the reason."""

    fused: list = dataclasses.field(default_factory=list)  # (name, pattern)
    left: list = dataclasses.field(default_factory=list)  # (name, reason)
    untraced: list = dataclasses.field(default_factory=list)  # (module path, error)
    # kernel choices (CPU or CUDA), one dict per layer and input regime, as fuse(tune=True) makes them:
    # {"layer", "input", "threads", "choice", "source" ("measured" | "cache" | ...), "times_ms", "rejected"}
    tactics: list = dataclasses.field(default_factory=list)

    def tactics_table(self) -> str:
        """The kernel choices as a table: layer, input, choice, where it came from, times (ms)."""
        lines = []
        for t in self.tactics:
            times = ", ".join(f"{n} {ms:.3f}" for n, ms in sorted(t["times_ms"].items(), key=lambda kv: kv[1]))
            rej = "".join(f"; {n} rejected: {why}" for n, why in t.get("rejected", {}).items())
            lines.append(f"    {t['layer']} [{t['input']}, {t['threads']} threads]: {t['choice']} "
                         f"({t['source']}{': ' + times + ' ms' if times else ''}{rej})")
        return "\n".join(lines)

    def counts(self) -> dict:
        out: dict = {}
        for _, pattern in self.fused:
            out[pattern] = out.get(pattern, 0) + 1
        return out

    def __str__(self) -> str:
        lines = ["resnet_fused.fuse report"]
        counts = ", ".join(f"{n} x {p}" for p, n in sorted(self.counts().items()))
        lines.append(f"  fused: {len(self.fused)} layers ({counts or 'none'})")
        for name, pattern in self.fused:
            lines.append(f"    {name}: {pattern}")
        lines.append(f"  left as they are: {len(self.left)}")
        for name, reason in self.left:
            lines.append(f"    {name}: {reason}")
        for path, err in self.untraced:
            lines.append(f"  not traceable as a whole, submodules fused one by one: {path or '<root>'} ({err})")
        if self.tactics:
            lines.append(f"  CPU kernels chosen: {len(self.tactics)}")
            lines.append(self.tactics_table())
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    """torch.nn modules and our fused modules are leaves; user modules are traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (FusedConv2d, FusedDual, FusedAddReLU, FusedMaxPool2d, FusedGlobalAvgPool2d, ToChannelsLast,
                          InputsFinite)):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(module)
    name = module.__class__.__name__ if isinstance(module, nn.Module) else module.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _modules(gm: fx.GraphModule) -> dict:
    return dict(gm.named_modules())


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, module)


def _is_module(node: fx.Node, modules: dict, cls) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), cls)


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    if node.op == "call_method":
        return node.target in _RELU_METHODS and len(node.args) == 1
    return False


def _add_operands(node: fx.Node) -> Optional[tuple]:
    """(a, b) when node is a plain two-tensor add (no alpha), else None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        pass
    else:
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    if a is b:
        return None
    return a, b


def _mutates_first(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _INPLACE_ADDS) or (
        node.op == "call_method" and node.target in _INPLACE_ADD_METHODS
    )


def _conv_padding(conv: nn.Conv2d) -> Optional[list]:
    """Symmetric explicit padding of a conv, or None when it has none (asymmetric 'same')."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return [0, 0]
        pads = []
        for d, k in zip(conv.dilation, conv.kernel_size):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return pads
    return list(conv.padding)


def _conv_unfusable_reason(conv: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding is fused)"
    if _conv_padding(conv) is None:
        return "padding='same' needs asymmetric padding here"
    if conv.weight.dtype == torch.float64:
        return "float64 conv (the fused kernels are float32/float16/bfloat16)"
    return None


def _fresh_and_dead_after(other: fx.Node, join: fx.Node, graph: fx.Graph, modules: dict) -> bool:
    """Whether `other` may be overwritten by `join`: it is a tensor one of our fused ops made
    (a fresh buffer, or a residual buffer that was itself dead after its own join, never a
    view, a parameter or the caller's input), and every other reader runs before `join`."""
    if not (other.op == "call_module" and isinstance(modules.get(other.target), (FusedConv2d, FusedAddReLU))):
        return False
    order = {n: i for i, n in enumerate(graph.nodes)}
    return all(u is join or order[u] < order[join] for u in other.users)


def _globally_pooled(node, modules: dict) -> Optional[fx.Node]:
    """The [N, C, 1, 1] node that ``node`` flattens to [N, C], when it is a flatten (torch.flatten /
    .flatten(1) / nn.Flatten / .view or .reshape(x.size(0), -1)) of a global average pool
    (nn.AdaptiveAvgPool2d or F.adaptive_avg_pool2d to 1x1); else None."""
    if not isinstance(node, fx.Node):
        return None
    src = None
    args, kwargs = node.args, node.kwargs
    if node.op == "call_function" and node.target is torch.flatten or node.op == "call_method" and node.target == "flatten":
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        if start == 1 and end == -1:
            src = args[0]
    elif node.op == "call_module" and type(modules.get(node.target)) is nn.Flatten:
        m = modules[node.target]
        if m.start_dim == 1 and m.end_dim == -1:
            src = args[0]
    elif node.op == "call_method" and node.target in ("view", "reshape") and len(args) == 3 and not kwargs:
        size = args[1]
        if (args[2] == -1 and isinstance(size, fx.Node) and size.op == "call_method" and size.target == "size"
                and size.args == (args[0], 0)):
            src = args[0]
    if not isinstance(src, fx.Node):
        return None
    if src.op == "call_module" and type(modules.get(src.target)) is nn.AdaptiveAvgPool2d:
        out = modules[src.target].output_size
    elif src.op == "call_function" and src.target is F.adaptive_avg_pool2d and len(src.args) == 2:
        out = src.args[1]
    elif (_spatial_mean_args(src) or (None, False))[1]:  # x.mean((2, 3), keepdim=True)
        out = 1
    else:
        return None
    return src if out in (1, (1, 1), [1, 1]) else None


def _spatial_mean_args(node) -> Optional[tuple]:
    """(x, keepdim) when ``node`` is x.mean((2, 3)) / torch.mean(x, dim=[-2, -1], keepdim=...): a
    global average pool written as a mean; else None."""
    if not isinstance(node, fx.Node) or not (
            node.op == "call_method" and node.target == "mean" or node.op == "call_function" and node.target is torch.mean):
        return None
    args, kwargs = node.args, node.kwargs
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if len(args) > 3 or set(kwargs) - {"dim", "keepdim"} or not isinstance(args[0], fx.Node):
        return None
    if not isinstance(dims, (tuple, list)) or sorted(dims) not in ([2, 3], [-2, -1]) or not isinstance(keepdim, bool):
        return None
    return args[0], keepdim


def _spatial_mean_of(node) -> Optional[fx.Node]:
    """x when ``node`` is a spatial mean of x not kept 4-D ([N, C] out, see _spatial_mean_args)."""
    found = _spatial_mean_args(node)
    return found[0] if found is not None and not found[1] else None


def _fuse_graph(gm: fx.GraphModule, report: FuseReport, prefix: str, prepack: bool, channels_last: bool) -> None:
    graph = gm.graph
    modules = _modules(gm)
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pattern: dict = {}  # conv target -> pattern name

    # 1. conv (-> bn): every plain conv becomes a FusedConv2d, BN folded where it can be.
    for node in list(graph.nodes):
        if not _is_module(node, modules, nn.Conv2d):
            continue
        conv = modules[node.target]
        why = _conv_unfusable_reason(conv)
        if why is None and calls[node.target] > 1:
            why = f"the conv module is called {calls[node.target]} times (weights shared)"
        if why is not None:
            report.left.append((prefix + node.target, why))
            continue
        bn = None
        users = list(node.users)
        if len(users) == 1 and _is_module(users[0], modules, nn.modules.batchnorm._BatchNorm):
            bn_node = users[0]
            bn_mod = modules[bn_node.target]
            ok, why = can_fold(bn_mod)
            if ok and calls[bn_node.target] > 1:
                ok, why = False, f"the BatchNorm module is called {calls[bn_node.target]} times"
            if ok:
                bn = bn_mod
                bn_node.replace_all_uses_with(node)
                graph.erase_node(bn_node)
            else:
                report.left.append((prefix + bn_node.target, f"not folded: {why}"))
        elif len(users) > 1:
            nxt = [u for u in users if _is_module(u, modules, nn.modules.batchnorm._BatchNorm)]
            if nxt:
                report.left.append((prefix + nxt[0].target, "not folded: the conv output has several users"))
        w, b = fold_conv_bn(conv, bn)
        if channels_last:
            # the layout the layer will run in: then the master needs no second, NHWC copy
            w = w.contiguous(memory_format=torch.channels_last)
        fused = FusedConv2d.from_conv(conv, w, b, _conv_padding(conv), folded_bn=bn is not None, prepack=prepack)
        fused.to(conv.weight.device)
        if conv.weight.dtype != fused.weight.dtype:  # a half/bf16 model computes in its own dtype
            fused.compute_dtype = conv.weight.dtype
        _set_module(gm, node.target, fused)
        # The folded copy replaces the conv's weight: let the original go now rather than when
        # fuse() returns, so the two never sit in memory together (a copy fuse() made, or the
        # caller's own with inplace=True, whose folded convs are then spent).
        conv.weight = None
        conv.bias = None
        pattern[node.target] = "conv+bn" if bn is not None else "conv"
    modules = _modules(gm)

    # 1b. Global average pool (or a mean over H and W) -> flatten -> Linear (a classifier head):
    #     the Linear becomes a 1x1 FusedConv2d on the pooled [N, C, 1, 1] map, flattened after it,
    #     so that it holds its weight packed as a conv does (on CPU float32: our matrix products
    #     on packed panels, reading the weight once; aten's addmm reads the plain weight cold on
    #     every call).
    for node in list(graph.nodes):
        if not (node.op == "call_module" and type(modules.get(node.target)) is nn.Linear) or calls[node.target] > 1:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        pooled, averaged = _globally_pooled(node.args[0], modules), _spatial_mean_of(node.args[0])
        if pooled is None and averaged is None:
            continue
        lin = modules[node.target]
        mdt = master_dtype(lin.weight.dtype)
        w = lin.weight.detach().to(mdt).reshape(lin.out_features, lin.in_features, 1, 1)
        b = None if lin.bias is None else lin.bias.detach().to(mdt)
        fused = FusedLinear(lin.in_features, lin.out_features, (1, 1), weight=w, bias=b, prepack=prepack)
        fused.to(lin.weight.device)
        if lin.weight.dtype != fused.weight.dtype:
            fused.compute_dtype = lin.weight.dtype
        _set_module(gm, node.target, fused)
        with graph.inserting_before(node):
            if pooled is not None:
                conv_node = graph.call_module(node.target, (pooled,))
                # (the model's own flatten, on the conv's output: .view(x.size(0), -1) of an empty
                # batch raises in the fused model as in the original)
                flat = graph.node_copy(node.args[0], lambda n: conv_node if n is pooled else n)
            else:  # x.mean((2, 3)) -> Linear: the same mean kept 4-D, the conv, then flattened
                pooled = graph.call_method("mean", (averaged, (2, 3)), {"keepdim": True})
                conv_node = graph.call_module(node.target, (pooled,))
                flat = graph.call_function(torch.flatten, (conv_node, 1))
        node.replace_all_uses_with(flat)
        graph.erase_node(node)
        pattern[node.target] = "linear"
    modules = _modules(gm)

    def fused_conv(node) -> Optional[FusedConv2d]:
        if node.op == "call_module" and isinstance(modules.get(node.target), FusedConv2d) and node.target in pattern:
            return modules[node.target]
        return None

    # 2. fused_conv -> add(., other) (-> relu): the residual join goes into the conv's epilogue.
    for node in list(graph.nodes):
        ops = _add_operands(node)
        if ops is None:
            continue
        for i, cand in enumerate(ops):
            mod = fused_conv(cand)
            if mod is None or mod.relu or mod.residual or len(cand.users) != 1:
                continue
            other = ops[1 - i]
            if _mutates_first(node) and i == 1 and len(other.users) > 1:
                continue  # `other += conv(...)` mutates a tensor that is read elsewhere
            users = list(node.users)
            relu_node = users[0] if len(users) == 1 and _is_relu(users[0], modules) else None
            anchor = relu_node or node
            with graph.inserting_before(anchor):
                new = graph.call_module(cand.target, (cand.args[0], other))
            anchor.replace_all_uses_with(new)
            if relu_node is not None:
                graph.erase_node(relu_node)
            graph.erase_node(node)
            graph.erase_node(cand)
            mod.residual = True
            mod.relu = relu_node is not None
            # In place when nothing reads the residual after the join and it is a tensor this
            # graph computed (never the caller's input, never a parameter).
            mod.inplace_residual = _fresh_and_dead_after(other, new, graph, modules)
            pattern[cand.target] += "+add" + ("+relu" if mod.relu else "")
            break

    # 3. fused_conv -> relu.
    for node in list(graph.nodes):
        mod = fused_conv(node)
        if mod is None or mod.relu or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if _is_relu(user, modules) and user.args[0] is node:
            user.replace_all_uses_with(node)
            graph.erase_node(user)
            mod.relu = True
            pattern[node.target] += "+relu"

    # 4. add -> relu that no conv absorbed.
    n_add_relu = 0
    for node in list(graph.nodes):
        ops = _add_operands(node)
        if ops is None or len(node.users) != 1:
            continue
        relu_node = next(iter(node.users))
        if not _is_relu(relu_node, modules):
            report.left.append((prefix + node.name, "add not followed by a ReLU and no conv could absorb it"))
            continue
        if any(o.op in ("get_attr", "placeholder") for o in ops):
            report.left.append((prefix + node.name, "add of a parameter or a model input: left to PyTorch"))
            continue
        if _mutates_first(node) and len(ops[0].users) > 1:
            report.left.append((prefix + node.name, "in-place add of a tensor that is read elsewhere"))
            continue
        name = "add_relu" if n_add_relu == 0 else f"add_relu_{n_add_relu}"
        while hasattr(gm, name):
            n_add_relu += 1
            name = f"add_relu_{n_add_relu}"
        n_add_relu += 1
        gm.add_module(name, FusedAddReLU())
        with graph.inserting_before(relu_node):
            new = graph.call_module(name, ops)
        relu_node.replace_all_uses_with(new)
        graph.erase_node(relu_node)
        graph.erase_node(node)
        report.fused.append((prefix + name, "add+relu"))

    # 4b. Max pools (dilation 1, no indices): our channels-last CPU kernel, which skips the
    #     indices PyTorch's CPU kernel computes and drops.
    for node in list(graph.nodes):
        if not (node.op == "call_module" and type(modules.get(node.target)) is nn.MaxPool2d):
            continue
        pool = modules[node.target]
        dilation = pool.dilation if isinstance(pool.dilation, int) else max(pool.dilation)
        if pool.return_indices or dilation != 1:
            report.left.append((prefix + node.target, "max pool with indices or dilation: left to PyTorch"))
            continue
        _set_module(gm, node.target, FusedMaxPool2d.from_pool(pool))
        report.fused.append((prefix + node.target, "maxpool"))
    #     Global average pools (nn.AdaptiveAvgPool2d(1), after 1b has read them): ours too, one read
    #     of the input where aten's takes several passes' time at batch 1.
    for node in list(graph.nodes):
        if not (node.op == "call_module" and type(modules.get(node.target)) is nn.AdaptiveAvgPool2d):
            continue
        if modules[node.target].output_size not in (1, (1, 1), [1, 1]):
            continue
        _set_module(gm, node.target, FusedGlobalAvgPool2d())
        report.fused.append((prefix + node.target, "avgpool"))
    modules = _modules(gm)

    # 5. Channels-last activations end to end: one conversion where a fused chain starts (a
    #    no-op on a tensor that is channels_last already), none between fused layers.
    if channels_last:
        produced_by_fused = set()
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(
                modules.get(node.target), (FusedConv2d, FusedAddReLU, ToChannelsLast)
            ):
                produced_by_fused.add(node)
        converted: dict = {}
        for node in list(graph.nodes):
            if fused_conv(node) is None or pattern[node.target] == "linear":
                continue  # (a classifier's [N, C, 1, 1] input is both layouts at once)
            src = node.args[0]
            if isinstance(src, fx.Node) and src not in produced_by_fused:
                if src not in converted:
                    if not hasattr(gm, "to_channels_last"):
                        gm.add_module("to_channels_last", ToChannelsLast())
                    with graph.inserting_after(src):
                        converted[src] = graph.call_module("to_channels_last", (src,))
                node.replace_input_with(src, converted[src])

    # 6. One finiteness check of the graph's inputs per call: when they are finite, the CPU
    #    convs may fuse their ReLU as a oneDNN post-op; NaN/Inf inputs get eager's semantics.
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    fused_calls = [n for n in graph.nodes if fused_conv(n) is not None]
    if placeholders and fused_calls:
        if not hasattr(gm, "inputs_finite"):
            gm.add_module("inputs_finite", InputsFinite())
        with graph.inserting_after(placeholders[-1]):
            finite = graph.call_module("inputs_finite", tuple(placeholders))
        for n in fused_calls:
            n.kwargs = {**n.kwargs, "assume_finite": finite}

    # 7. A bottleneck's last 1x1 whose residual is its downsample 1x1 (read by nothing else): the
    #    pair becomes one FusedDual, which on CUDA may run both as one product (see FusedDual).
    def plain_1x1(mod, stride_one: bool) -> bool:
        return (type(mod) is FusedConv2d and tuple(mod.kernel_size) == (1, 1) and list(mod.padding) == [0, 0]
                and list(mod.dilation) == [1, 1] and mod.groups == 1 and mod.stride[0] == mod.stride[1]
                and (not stride_one or mod.stride[0] == 1))

    for node in list(graph.nodes):
        conv = fused_conv(node)
        if conv is None or not conv.residual or len(node.args) != 2 or not plain_1x1(conv, True):
            continue
        other = node.args[1]
        ds = fused_conv(other) if isinstance(other, fx.Node) else None
        if ds is None or ds.relu or ds.residual or len(other.users) != 1 or not plain_1x1(ds, False):
            continue
        dual = FusedDual(conv, ds)
        dual.downsample_name = prefix + other.target
        _set_module(gm, node.target, dual)
        with graph.inserting_before(node):
            new = graph.call_module(node.target, (node.args[0], other.args[0]), dict(node.kwargs))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(other)

    for target, pat in pattern.items():
        report.fused.append((prefix + target, pat))
    for node in graph.nodes:
        if _is_module(node, modules, nn.modules.batchnorm._BatchNorm) and not any(
            n == prefix + node.target for n, _ in report.left
        ):
            report.left.append((prefix + node.target, "BatchNorm with no conv before it"))
        elif _is_relu(node, modules):
            src = node.args[0]
            what = src.target if src.op == "call_module" else src.name
            report.left.append((prefix + node.name, f"ReLU after {what}, which is not a fused conv"))
    graph.eliminate_dead_code()
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _fuse_module(module: nn.Module, report: FuseReport, prefix: str, prepack: bool, channels_last: bool):
    if isinstance(module, (FusedConv2d, FusedDual, FusedAddReLU)):
        return module
    try:
        gm = _trace(module)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: go one level down
        report.untraced.append((prefix.rstrip("."), f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"))
        for name, child in list(module.named_children()):
            setattr(module, name, _fuse_module(child, report, f"{prefix}{name}.", prepack, channels_last))
        return module
    _fuse_graph(gm, report, prefix, prepack, channels_last)
    return as_replayed(gm)


def fuse(
    model: nn.Module,
    *,
    inplace: bool = False,
    verbose: bool = False,
    memory_format: Optional[torch.memory_format] = torch.channels_last,
    prepack: bool = True,
    winograd: bool = True,
    gemm: bool = True,
    tune: bool = True,
) -> nn.Module:
    """Returns a module that computes what ``model`` computes in eval mode, with BatchNorm folded
    into the convolutions and each conv(+BN)(+add)(+ReLU) chain run as one fused op; a classifier
    head (global average pool -> flatten -> Linear) runs its Linear as a 1x1 layer on packed
    weights (:class:`~resnet_fused.modules.FusedLinear`).

    Args:
        model: a network in eval mode (``model.eval()``). Left untouched unless ``inplace``.
        inplace: reuse ``model``'s modules instead of copying it first (saves the copy's memory);
            ``model`` is spent: its folded convs give up their weights.
        verbose: print the report of what was fused and what was left, and why.
        memory_format: ``torch.channels_last`` (default) converts activations once where a fused
            chain starts, so every fused layer runs in NHWC; ``None`` keeps the input's layout.
        prepack: on CPU, reorder each weight once into oneDNN's blocked layout.
        winograd: on CPU in float32 (with ``prepack``), run the 3x3 stride-1 layers where it
            measured faster and costs little memory (``tactics.Winograd.rule``: at least 32
            channels, enough tiles, a transformed weight of at most 4 MiB) as Winograd
            F(2x2, 3x3); its error against float64 is below the direct convolution's. With
            ``tune``, F(4x4, 3x3) is measured too and kept only where its error met the accuracy
            rule. ``False`` runs every layer as a direct convolution.
        gemm: on CPU in float32 (with ``prepack``), run the 1x1 layers with no padding on
            AVX-512 CPUs (``tactics.Gemm.rule``) as matrix products on our register-tile
            kernel with the epilogue in registers, instead of oneDNN's convolution. ``False``
            leaves them to oneDNN.
        tune: on CPU in float32 (with ``prepack``), pick each layer's kernel (oneDNN, Winograd
            F(2x2) or F(4x4), matrix products; ``winograd``/``gemm`` still turn theirs off) by
            measuring them on the first input of each regime (batch size, image size, thread
            count) and keeping the fastest that meets the accuracy rule; cached in memory and on
            disk per machine (:mod:`resnet_fused.tactics`). On CUDA in float16/bfloat16 the
            same between our kernel's tile shapes, cuDNN + our epilogue and cuDNN's fused op.
            ``False``: the rules above choose, and nothing is measured, read or written.

    The result has a ``fuse_report`` attribute (a :class:`FuseReport`). It is inference-only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse() takes an nn.Module, got {type(model).__name__}")
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            "fuse() needs a model in eval mode: BatchNorm folding uses the running statistics. "
            f"Call model.eval() first ({len(training)} module(s) in training mode, e.g. {training[0]!r})."
        )
    if memory_format not in (None, torch.channels_last, torch.contiguous_format):
        raise ValueError(f"memory_format must be torch.channels_last or None, got {memory_format}")
    # Real tensors (not inference tensors) even when called under inference_mode, so that the
    # fused model's weights can later be loaded into (load_state_dict copies in place).
    with torch.inference_mode(False), torch.no_grad():
        if not inplace:
            model = copy.deepcopy(model)
        report = FuseReport()
        fused = _fuse_module(model, report, "", prepack, memory_format == torch.channels_last)
    fused.eval()
    for name, m in fused.named_modules():
        if isinstance(m, FusedConv2d):
            m.winograd = winograd
            m.gemm = gemm
            m.tune = tune
            m.tune_name = name
            m._tuned = {}
            m._tactics_log = report.tactics
    for name, m in fused.named_modules():
        if isinstance(m, FusedDual):  # (its two layers keep their names in the model)
            m.conv.tune_name, m.downsample.tune_name = name, m.downsample_name
            m._choice = {}
            m._tactics_log = report.tactics
    for p in fused.parameters():
        p.requires_grad_(False)  # inference-only: nothing of it is trained
    fused.register_load_state_dict_pre_hook(check_state_dict)
    fused.fuse_report = report
    if verbose:
        print(report)
    return fused
