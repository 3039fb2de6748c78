"""Exporting a fused model for serving: torch.export (and from it AOTInductor) and TorchScript.

A fused model captured by torch.export or torch.jit.trace calls one resnet_fused op per fused
layer (see ``modules.capturing_for_serving``): on CPU in float32 our matrix products on their
packed panels (``FusedConv2d.hold_for_serving``), elsewhere conv2d_bias_act on the plain weight. The
graph holds plain tensors only and runs wherever ``import resnet_fused`` has loaded the kernels.
"""

from __future__ import annotations

import contextlib
from typing import Union

import torch
from torch import Tensor, nn

from . import tactics
from .modules import FusedConv2d


def _each_layer(model: nn.Module, caller: str, method: str) -> nn.Module:
    """Calls FusedConv2d.<method>() on every fused layer of ``model`` (for the function ``caller``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}() takes an nn.Module, got {type(model).__name__}")
    for m in model.modules():
        if isinstance(m, FusedConv2d):
            getattr(m, method)()
    return model


def unpack_weights(model: nn.Module) -> nn.Module:
    """Every fused layer of ``model`` holds its master weight as a plain tensor again (CPU float32
    layers hold it prepacked for oneDNN once they have run; they repack on their next eager call).
    One way to make such a model exportable with ``torch.export.export`` yourself (see hold_for_serving)."""
    return _each_layer(model, "unpack_weights", "unpack")


def hold_for_serving(model: nn.Module) -> nn.Module:
    """Every fused layer of ``model`` holds its master weight as an exported graph should (see
    ``FusedConv2d.hold_for_serving``): :func:`export` and :func:`trace` do this first. The model
    itself keeps running (a layer whose eager choice is another kernel repacks on its next call)."""
    return _each_layer(model, "hold_for_serving", "hold_for_serving")


@contextlib.contextmanager
def _held_for_serving(model: nn.Module, args: tuple, winograd: bool):
    """Within: the model's weights held for serving (hold_for_serving), and with ``winograd`` each
    fused layer that runs Winograd on the example (as the model chose for its batch) carries its
    transformed weight into the graph being captured (see FusedConv2d._forward_plain)."""
    layers = [m for m in model.modules() if isinstance(m, FusedConv2d)]
    if not winograd:
        hold_for_serving(model)
        yield
        return

    def take(layer, inputs):
        x, residual = inputs[0], inputs[1] if len(inputs) > 1 else None
        w, _, path = layer._weights(x, residual)
        if path in tactics.WINOGRAD_PATHS:  # (the graph runs the kernel's own schedule, for any batch)
            layer._serving_winograd = w.clone()  # (a normal tensor, whatever mode made the cached one)

    hooks = [m.register_forward_pre_hook(take) for m in layers]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    try:
        hold_for_serving(model)  # (after the eager run, which may have packed some masters again)
        yield
    finally:
        for m in layers:
            m._serving_winograd = None


def _example_args(example) -> tuple:
    args = (example,) if isinstance(example, Tensor) else tuple(example) if isinstance(example, (tuple, list)) else None
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError(f"example must be a tensor or a tuple of tensors (the model's inputs), got {type(example).__name__}")
    return args


def export(model: nn.Module, example: Union[Tensor, tuple], dynamic_batch: bool = True,
           winograd: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a fused model with its weights held for serving, and (``dynamic_batch``)
    dim 0 of every input dynamic, from 1 up. An example of batch 1 is repeated to batch 2 for
    tracing (export would otherwise take 1 as a constant).

    The result runs (``ep.module()(x)``), saves and loads (``torch.export.save`` / ``load``; load
    it after ``import resnet_fused``), and packages with AOTInductor
    (``torch._inductor.aoti_compile_and_package(ep)``).

    ``winograd=True``: the layers that run Winograd in the model at the example's batch run it in the
    graph too (faster; the same answers as the model on finite inputs), but an Inf in the input
    can come out NaN where eager gives Inf: for inputs known finite (images)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export() takes an nn.Module, got {type(model).__name__}")
    args = _example_args(example)
    if dynamic_batch and any(a.dim() == 0 for a in args):
        raise ValueError("dynamic_batch=True needs every input to have a batch dimension (dim 0)")
    dynamic_shapes = None
    if dynamic_batch:
        args = tuple(torch.cat([a, a]) if a.shape[0] == 1 else a for a in args)
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in args)
    with _held_for_serving(model, _example_args(example), winograd), torch.no_grad():
        return torch.export.export(model, args, dynamic_shapes=dynamic_shapes)


def trace(model: nn.Module, example: Union[Tensor, tuple], winograd: bool = False) -> torch.jit.ScriptModule:
    """TorchScript of a fused model for LibTorch servers (``torch.jit.trace``; any batch size runs).
    Save it with ``.save(path)``; a C++ server loads it with ``torch::jit::load`` after
    ``dlopen``ing resnet_fused's ``_C*.so`` for the ops (tests/libtorch_load.cpp does).
    ``winograd``: as for :func:`export`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() takes an nn.Module, got {type(model).__name__}")
    args = _example_args(example)
    with _held_for_serving(model, args, winograd), torch.no_grad():
        # check_trace=False: its check reruns the model eagerly, where layers take other kernels
        # (Winograd, matrix products) than the traced graph's, and compares at 1e-5: rounding
        # differences read as a broken trace. The tests hold traces to eager's accuracy rule instead.
        return torch.jit.trace(model, args if len(args) > 1 else args[0], check_trace=False)
