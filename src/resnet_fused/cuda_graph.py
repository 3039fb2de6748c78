"""Run a model as CUDA graphs: one capture per (shape, dtype, memory format), replayed.

At batch 1 a ResNet-50 is launch-bound: replaying one graph replaces ~60 kernel launches and
all the Python between them with one launch.

    g = resnet_fused.cuda_graph(resnet_fused.fuse(model).cuda().half())
    y = g(x)          # captures on the first call for x's shape, replays after

Outputs are copied out of the graph's static buffer by default, so a later call can never
overwrite a result the caller still holds (``copy_outputs=False`` returns the static buffer
itself: faster, valid until the next call with the same shape). Captured shapes are bounded
(``max_graphs``, least recently used dropped). Each capture and replay runs on the caller's
current stream; calls are serialised by a lock, so several threads can share one instance.
On CPU inputs the model just runs. Where a layer runs cuDNN's fused op (a tuned fp16/bf16
model), each call checks its input finite first (one synchronisation) and runs the model eagerly
on one that is not, so that NaN and Inf come out as eager's.
"""

from __future__ import annotations

import collections
import contextlib
import threading

import torch
from torch import Tensor, nn

from .modules import capture_with_checked_inputs, inputs_finite, runs_cudnn_fused


class _Captured:
    def __init__(self, model: nn.Module, x: Tensor, warmup: int, pool):
        self.static_in = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):  # lazy init (cuDNN plans, our weight caches, tuning) outside capture
                model(self.static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        # Layers that chose cuDNN's fused op (its ReLU maps NaN to 0) record it only if every
        # replay's input is checked finite first (forward does; a non-finite one runs eagerly).
        self.check_finite = runs_cudnn_fused(model)
        self.graph = torch.cuda.CUDAGraph()
        checked = capture_with_checked_inputs() if self.check_finite else contextlib.nullcontext()
        with torch.inference_mode(), checked, torch.cuda.graph(self.graph, pool=pool):
            self.static_out = model(self.static_in)
        if not isinstance(self.static_out, Tensor):
            raise TypeError("cuda_graph() supports models that return one tensor")


class CUDAGraphModule(nn.Module):
    """See the module docstring. ``model`` must be in eval mode and inference-only."""

    def __init__(self, model: nn.Module, max_graphs: int = 8, copy_outputs: bool = True, warmup: int = 3):
        super().__init__()
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.model = model
        self.max_graphs = max_graphs
        self.copy_outputs = copy_outputs
        self.warmup = warmup
        self._graphs: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = None
        self._last_done = None

    def _key(self, x: Tensor):
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return (tuple(x.shape), x.dtype, x.device, cl, x.is_contiguous())

    def captured_shapes(self) -> list:
        return [k[0] for k in self._graphs]

    def reset(self) -> None:
        """Drops every captured graph (after the model's weights changed, for instance)."""
        with self._lock:
            self._graphs.clear()

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"cuda_graph(): expected a tensor input, got {type(x).__name__}")
        if not x.is_cuda:
            return self.model(x)
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("cuda_graph(): inference only, but the input requires grad")
        key = self._key(x)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                if len(self._graphs) >= self.max_graphs:
                    self._graphs.popitem(last=False)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                entry = _Captured(self.model, x, self.warmup, self._pool)
                self._graphs[key] = entry
            else:
                self._graphs.move_to_end(key)
            if entry.check_finite and not inputs_finite(x):
                return self.model(x)  # the exact path: NaN where eager has NaN
            stream = torch.cuda.current_stream(x.device)
            if self._last_done is not None:
                # Graphs share one memory pool and their static buffers: a call from another
                # stream must not start before the previous replay (and its copy-out) ended.
                stream.wait_event(self._last_done)
            entry.static_in.copy_(x)
            entry.graph.replay()
            out = entry.static_out.clone() if self.copy_outputs else entry.static_out
            self._last_done = torch.cuda.Event()
            self._last_done.record(stream)
            return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_graphs"] = collections.OrderedDict()
        state["_pool"] = None
        state["_last_done"] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def cuda_graph(model: nn.Module, max_graphs: int = 8, copy_outputs: bool = True) -> CUDAGraphModule:
    """Wraps ``model`` (a fused model, or any inference model) to run as CUDA graphs."""
    if model.training:
        raise RuntimeError("cuda_graph() needs a model in eval mode: call model.eval() first")
    return CUDAGraphModule(model, max_graphs=max_graphs, copy_outputs=copy_outputs)
