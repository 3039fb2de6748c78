"""Benchmarks: resnet_fused against eager PyTorch and its peers, side by side in one run.

    python -m resnet_fused.bench                          # resnet50, CPU, fp32, batch 1 and 8
    python -m resnet_fused.bench --device cuda --dtype float16 --batch 1 8 32 128 256
    python -m resnet_fused.bench --layers                 # per-layer: every ResNet-50 conv shape
    python -m resnet_fused.bench --memory                 # peak RSS of eager vs fused, batch 8

Timing: every variant is built and warmed up first (build/compile time reported apart); then
rounds are interleaved, each round running every variant, in a shuffled order, for a block of
--block calls in a row over rotating inputs, on the device's own clock (CUDA events on GPU). A
server runs one model call after call, so the reported median is the steady state: the calls
after the first of each block. The first call of a block, which finds the caches full of the
previous variant's weights and activations, is reported apart as cold_ms. Between blocks the
host idles --settle seconds (CPU): ONNX Runtime's threads spin for tens of ms after a run, and
without the pause they took the cores from the next variant's first call (+45-60 ms on a ResNet-50
batch 1 on 2 cores). Images/s and the max
relative error against a float64 reference come with each. Results go to benchmarks/results/ as
JSON and markdown, with PNG plots.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

import resnet_fused
from resnet_fused import tactics

CPU_VARIANTS = ["eager", "eager_cl", "fx_fuse", "jit_opt", "compile", "compile_max", "fused"]
# The CPU engines a user would pick instead (pip install .[peers]); in the default CPU list when installed.
PEER_VARIANTS = ["onnxruntime", "openvino"]
GPU_VARIANTS = CPU_VARIANTS + ["fused_rules", "fused_cudnn", "compile_ro", "eager_graph", "fused_graph"]
ALL_VARIANTS = GPU_VARIANTS + PEER_VARIANTS
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The checkout's root when this file is src/resnet_fused/bench.py of an editable install.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Results go to the checkout's benchmarks/results when run from an in-place (editable) install,
# else to ./resnet_fused_results.
DEFAULT_OUT = (os.path.join(ROOT, "benchmarks", "results") if os.path.exists(os.path.join(ROOT, ".git"))
               else os.path.join(os.getcwd(), "resnet_fused_results"))


# ---------------------------------------------------------------------------------------------
# Models and environment
# ---------------------------------------------------------------------------------------------
def make_model(name: str, seed: int = 0) -> nn.Module:
    """A torchvision ResNet with random weights and randomised BN statistics (no download)."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.2, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
    return model.eval()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_allocator() -> str:
    """Keep freed memory in the heap for the next call (a serving process's allocator state), and
    say what was set.

    By default glibc gives a large freed block back to the system and takes it again, zeroed page by
    page, on the next call; whether it does depends on the heap's history (its thresholds move as
    blocks are freed), so the same eager model's time differed by a fifth between fresh processes
    (benchmarks/results, commit 6abfac9). Fixing the thresholds (blocks up to 32 MiB from the heap, never trimmed) makes every
    variant reuse its memory, as jemalloc or tcmalloc would: the state that favours none of them."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "default (mallopt refused)"
    return "glibc, blocks up to 32 MiB from the heap, no trimming"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)
    except ImportError:  # a plain counter on stderr
        def gen():
            for i, item in enumerate(iterable):
                if i % max(1, total // 10) == 0:
                    print(f"  {desc}: {i}/{total}", file=sys.stderr, flush=True)
                yield item

        return gen()


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------
def cuda_graphed(model: nn.Module) -> Callable:
    return resnet_fused.cuda_graph(model, copy_outputs=True)


def installed_peers() -> list:
    import importlib.util

    return [v for v in PEER_VARIANTS if importlib.util.find_spec(v) is not None]


def export_onnx(model: nn.Module, example: torch.Tensor) -> str:
    """The float32 model as ONNX (dynamic batch), in a temporary folder, for the CPU peers."""
    import tempfile
    import warnings

    path = os.path.join(tempfile.mkdtemp(prefix="resnet_fused_onnx_"), "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return path


def ort_session_options(threads: int):
    """ONNX Runtime's session options as the benchmark runs it: every graph optimisation, `threads`
    intra-op threads, one inter-op."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def openvino_config(threads: int) -> dict:
    """OpenVINO's CPU config as the benchmark runs it: f32, latency hint, one stream, `threads` threads."""
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
            "NUM_STREAMS": 1}


def build_peer(name: str, model: nn.Module, example: torch.Tensor) -> Callable:
    """ONNX Runtime (every graph optimisation) or OpenVINO (f32, latency hint) on the CPU, each with
    torch's thread count; both fold BN and fuse bias, residual and ReLU into their convolutions."""
    threads = torch.get_num_threads()
    path = export_onnx(copy.deepcopy(model).float().eval(), example.float())
    if name == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(path, ort_session_options(threads), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", openvino_config(threads))
    request = compiled.create_infer_request()

    def run(x):
        request.infer({0: x.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run


def on_cudnn(fn: Callable) -> Callable:
    """fn run with resnet_fused's CUDA convolutions on cuDNN + epilogue (resnet_fused.set_cuda_conv)."""
    def run(*args, **kwargs):
        previous = resnet_fused.set_cuda_conv("cudnn")
        try:
            return fn(*args, **kwargs)
        finally:
            resnet_fused.set_cuda_conv(previous)
    return run


def build_variant(name: str, model: nn.Module, dtype: torch.dtype, device: str, example: torch.Tensor):
    """Returns (callable, input memory format) for one variant; the model is copied."""
    m = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    cl = torch.channels_last
    nchw = torch.contiguous_format
    if name in PEER_VARIANTS:
        if device != "cpu" or dtype != torch.float32:
            raise ValueError(f"{name} runs here on the CPU in float32 only")
        return build_peer(name, model, example), nchw
    if name == "eager":
        return m, nchw
    if name == "eager_cl":
        return m.to(memory_format=cl), cl
    if name == "fx_fuse":
        from torch.fx.experimental.optimization import fuse as fx_fuse

        return fx_fuse(m), nchw
    if name == "jit_opt":
        with torch.no_grad():
            scripted = torch.jit.script(m)
            return torch.jit.optimize_for_inference(scripted), nchw
    if name in ("compile", "compile_max", "compile_ro"):
        import torch._inductor.config as inductor_config

        if name == "compile_max":
            inductor_config.freezing = True
            return torch.compile(m, mode="max-autotune"), nchw
        inductor_config.freezing = False
        return torch.compile(m, mode="reduce-overhead" if name == "compile_ro" else None), nchw
    if name == "fused":
        # folded from the float32 model, then cast: the way to get a half/bf16 fused model
        return resnet_fused.fuse(model).to(device=device, dtype=dtype), nchw
    if name == "fused_rules":
        # the fused model without measuring: our kernel wherever it applies (tune=False)
        return resnet_fused.fuse(model, tune=False).to(device=device, dtype=dtype), nchw
    if name == "fused_cudnn":
        # the same fused model with every conv on cuDNN + our epilogue pass instead of our kernel
        return on_cudnn(resnet_fused.fuse(model).to(device=device, dtype=dtype)), nchw
    if name == "eager_graph":
        return cuda_graphed(m.to(memory_format=cl)), cl
    if name == "fused_graph":
        return cuda_graphed(resnet_fused.fuse(model).to(device=device, dtype=dtype)), nchw
    raise ValueError(f"unknown variant {name!r}")


class Timer:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable, x) -> float:
        """Milliseconds for one call, on the device's clock."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn(x)
        return (time.perf_counter() - t0) * 1e3


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run_model_benchmark(args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    variants = args.variants or (GPU_VARIANTS if device == "cuda" else CPU_VARIANTS + (
        installed_peers() if dtype == torch.float32 else []))
    model = make_model(args.model)
    records = []
    builds = {}
    for batch in args.batch:
        n_rot = args.rotate
        gen = torch.Generator().manual_seed(batch)
        inputs_cpu = [torch.randn(batch, 3, args.image_size, args.image_size, generator=gen) for _ in range(n_rot)]
        with torch.inference_mode():
            ref = copy.deepcopy(model).double()(inputs_cpu[0].double())
        fns, errs = {}, {}
        for v in variants:
            t0 = time.perf_counter()
            try:
                fn, fmt = build_variant(v, model, dtype, device, inputs_cpu[0])
                xs = [x.to(device=device, dtype=dtype).contiguous(memory_format=fmt) for x in inputs_cpu]
                with torch.inference_mode():
                    for _ in range(args.warmup):  # includes compilation / capture for the peers
                        out = fn(xs[0])
                    if device == "cuda":
                        torch.cuda.synchronize()
                fns[v] = (fn, xs, fmt)
                errs[v] = max_rel_err(out, ref)
                builds.setdefault(v, round(time.perf_counter() - t0, 2))
                print(f"[batch {batch}] {v}: ready in {time.perf_counter() - t0:.1f}s, "
                      f"max rel err {errs[v]:.2e}", file=sys.stderr, flush=True)
            except Exception as err:  # noqa: BLE001 - a peer that fails is reported, not fatal
                print(f"[batch {batch}] {v}: FAILED ({type(err).__name__}: {str(err)[:200]})", file=sys.stderr)
                builds.setdefault(v, f"failed: {type(err).__name__}: {str(err)[:200]}")
        timer = Timer(device)
        times = {v: [] for v in fns}  # steady state: the calls after the first of each block
        cold = {v: [] for v in fns}  # the first call of each block, right after another variant ran
        runs = args.runs if args.runs else max(5, min(50, int(20 / max(batch, 1) ** 0.5)))
        rounds = -(-runs // (args.block - 1))
        order = list(fns)
        rng = random.Random(batch)
        with torch.inference_mode():
            i = 0
            for _ in progress(range(rounds), rounds, f"batch {batch}"):
                rng.shuffle(order)
                for v in order:
                    fn, xs, _ = fns[v]
                    for k in range(args.block):
                        (cold if k == 0 else times)[v].append(timer(fn, xs[i % len(xs)]))
                        i += 1
                    if device == "cpu" and args.settle > 0:
                        time.sleep(args.settle)
        for v in fns:
            ms = statistics.median(times[v])
            records.append({
                "model": args.model, "batch": batch, "dtype": args.dtype,
                "memory_format": "channels_last" if fns[v][2] == torch.channels_last else "nchw",
                "variant": v, "ms": round(ms, 4), "img_s": round(batch / ms * 1e3, 2),
                "max_rel_err": errs[v], "runs": len(times[v]),
                "p10_ms": round(sorted(times[v])[len(times[v]) // 10], 4),
                "p90_ms": round(sorted(times[v])[(len(times[v]) * 9) // 10], 4),
                "cold_ms": round(statistics.median(cold[v]), 4), "cold_runs": len(cold[v]),
            })
        del fns
    return {"records": records, "build_s": builds}


# ---------------------------------------------------------------------------------------------
# Per-layer benchmark
# ---------------------------------------------------------------------------------------------
RESNET50_LAYERS = [  # (name, C, K, kernel, stride, H, residual)
    ("stem 7x7/2", 3, 64, 7, 2, 224, False),
    ("l1 1x1 64-64", 64, 64, 1, 1, 56, False),
    ("l1 3x3 64", 64, 64, 3, 1, 56, False),
    ("l1 1x1 64-256 +res", 64, 256, 1, 1, 56, True),
    ("l1 1x1 256-64", 256, 64, 1, 1, 56, False),
    ("l2 1x1 256-128", 256, 128, 1, 1, 56, False),
    ("l2 3x3/2 128", 128, 128, 3, 2, 56, False),
    ("l2 3x3 128", 128, 128, 3, 1, 28, False),
    ("l2 1x1 128-512 +res", 128, 512, 1, 1, 28, True),
    ("l2 ds 1x1/2 256-512", 256, 512, 1, 2, 56, False),
    ("l2 1x1 512-128", 512, 128, 1, 1, 28, False),
    ("l3 3x3/2 256", 256, 256, 3, 2, 28, False),
    ("l3 3x3 256", 256, 256, 3, 1, 14, False),
    ("l3 1x1 256-1024 +res", 256, 1024, 1, 1, 14, True),
    ("l3 ds 1x1/2 512-1024", 512, 1024, 1, 2, 28, False),
    ("l3 1x1 1024-256", 1024, 256, 1, 1, 14, False),
    ("l4 3x3/2 512", 512, 512, 3, 2, 14, False),
    ("l4 3x3 512", 512, 512, 3, 1, 7, False),
    ("l4 1x1 512-2048 +res", 512, 2048, 1, 1, 7, True),
    ("l4 ds 1x1/2 1024-2048", 1024, 2048, 1, 2, 14, False),
    ("l4 1x1 2048-512", 2048, 512, 1, 1, 7, False),
]
# ResNeXt-50 32x4d's grouped 3x3s (32 groups of 4, 8, 16, 32 channels), with their groups last: its
# 1x1s and stem are ResNet-50's shapes at other widths.
RESNEXT50_GROUPED_LAYERS = [
    ("l1 3x3 128 g32", 128, 128, 3, 1, 56, False, 32),
    ("l2 3x3/2 256 g32", 256, 256, 3, 2, 56, False, 32),
    ("l2 3x3 256 g32", 256, 256, 3, 1, 28, False, 32),
    ("l3 3x3/2 512 g32", 512, 512, 3, 2, 28, False, 32),
    ("l3 3x3 512 g32", 512, 512, 3, 1, 14, False, 32),
    ("l4 3x3/2 1024 g32", 1024, 1024, 3, 2, 14, False, 32),
    ("l4 3x3 1024 g32", 1024, 1024, 3, 1, 7, False, 32),
]
LAYER_TABLES = {"resnet50": RESNET50_LAYERS, "resnext50_32x4d": RESNEXT50_GROUPED_LAYERS}


def measure_peaks(device: str, dtype: torch.dtype, timer: Timer) -> dict:
    """The two ceilings, measured here: copy bandwidth and a large matrix product's rate."""
    n = 1 << 26 if device == "cuda" else 1 << 24
    src = torch.randn(n, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    bw = []
    for _ in range(10):
        bw.append(2 * src.numel() * src.element_size() / (timer(lambda t: dst.copy_(t), src) * 1e-3))
    m = 8192 if device == "cuda" else 1024
    a = torch.randn(m, m, device=device, dtype=dtype)
    fl = []
    # (float32 convolutions on CUDA run on TF32 tensor cores while cuDNN allows it, PyTorch's
    # default, but a matrix product only while matmul allows it: the ceiling follows the convs)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        for _ in range(10):
            fl.append(2 * m ** 3 / (timer(lambda t: torch.mm(t, t), a) * 1e-3))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return {"bytes_per_s": max(bw), "flops_per_s": max(fl)}


def run_layer_benchmark(args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    timer = Timer(device)
    peaks = measure_peaks(device, dtype, timer)
    batch = args.batch[0]
    rows = []
    esize = torch.tensor([], dtype=dtype).element_size()
    if args.model not in LAYER_TABLES:
        raise SystemExit(f"--layers has tables for {sorted(LAYER_TABLES)}, not {args.model}")
    table = LAYER_TABLES[args.model]
    for name, c, k, kernel, stride, h, residual, *grouping in progress(table, len(table), "layers"):
        groups = grouping[0] if grouping else 1
        pad = kernel // 2
        relu = " ds " not in name  # (a downsample has no ReLU: cuDNN's fused op cannot run it)
        act = torch.relu if relu else (lambda t: t)
        conv = nn.Conv2d(c, k, kernel, stride, pad, bias=False, groups=groups)
        bn = nn.BatchNorm2d(k).eval()
        with torch.no_grad():
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
        chain = nn.Sequential(conv, bn).eval().to(device=device, dtype=dtype)
        chain_cl = copy.deepcopy(chain).to(memory_format=torch.channels_last)
        w, b = resnet_fused.fold_conv_bn(conv, bn)
        fused = resnet_fused.FusedConv2d.from_conv(conv, w, b, [pad, pad], folded_bn=True)
        fused.relu, fused.residual = relu, residual
        fused = fused.to(device=device, dtype=dtype)
        x = torch.randn(batch, c, h, h, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        ho = (h + 2 * pad - kernel) // stride + 1
        r = torch.randn(batch, k, ho, ho, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        xn, rn = x.contiguous(), r.contiguous()
        cands = {
            "eager": lambda _: act(chain(xn) + rn) if residual else act(chain(xn)),
            "eager_cl": lambda _: act(chain_cl(x) + r) if residual else act(chain_cl(x)),
            # as a fused model calls it (its input checked finite once per forward)
            "fused": lambda _: fused(x, r, assume_finite=True) if residual else fused(x, assume_finite=True),
        }
        if device == "cpu" and fused._path(x):
            # the same layer as oneDNN's convolution, where fused runs our Winograd or matrix-product
            # kernel (the roofline floor counts direct multiplies, which Winograd does fewer of)
            onednn = copy.deepcopy(fused)
            onednn.winograd = onednn.gemm = False
            if residual:
                cands["fused_onednn"] = lambda _: onednn(x, r, assume_finite=True)
            else:
                cands["fused_onednn"] = lambda _: onednn(x, assume_finite=True)
        if device == "cuda":
            cands["fused_cudnn"] = on_cudnn(cands["fused"])
            wf = w.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            bf = b.to(device=device, dtype=dtype)
            if dtype == torch.float32 and groups == 1 and torch.backends.cudnn.allow_tf32:
                # our TF32 kernel itself (a fused model runs it only where the tactics chose it)
                algo, bd = tactics.fixed_cuda_tile(groups, c, dtype), b.to(device=device, dtype=torch.float32)
                cands["ours_tf32"] = lambda _: torch.ops.resnet_fused.cuda_conv2d_bias_act.default(
                    x, wf, bd, r if residual else None, [stride] * 2, [pad] * 2, [1, 1], groups, relu, algo)
            if relu and residual:
                cands["cudnn_fused"] = lambda _: torch.cudnn_convolution_add_relu(
                    x, wf, r, 1.0, bf, [stride] * 2, [pad] * 2, [1, 1], groups)
            elif relu:
                cands["cudnn_fused"] = lambda _: torch.cudnn_convolution_relu(
                    x, wf, bf, [stride] * 2, [pad] * 2, [1, 1], groups)
        flops = 2 * batch * k * ho * ho * c // groups * kernel * kernel
        nbytes = esize * (x.numel() + w.numel() + batch * k * ho * ho * (2 if residual else 1))
        floor_ms = max(flops / peaks["flops_per_s"], nbytes / peaks["bytes_per_s"]) * 1e3
        bound = "compute" if flops / peaks["flops_per_s"] > nbytes / peaks["bytes_per_s"] else "memory"
        times = {v: [] for v in cands}
        with torch.inference_mode():
            for fn in cands.values():
                for _ in range(3):
                    fn(None)
            for _ in range(args.runs or 20):
                for v, fn in cands.items():
                    times[v].append(timer(fn, None))
        for v, ts in times.items():
            ms = statistics.median(ts)
            rows.append({"layer": name, "batch": batch, "dtype": args.dtype, "variant": v, "ms": round(ms, 4),
                         "floor_ms": round(floor_ms, 4), "bound": bound, "x_floor": round(ms / floor_ms, 2),
                         "gflop": round(flops / 1e9, 3), "mbytes": round(nbytes / 1e6, 3)})
    return {"layers": rows, "peaks": peaks}


# ---------------------------------------------------------------------------------------------
# Memory: peak RSS in a fresh process per variant
# ---------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


_MEMORY_CALLS = 6  # fused: tuning, the module path, the call that records (replay), replays


def _memory_child(variant: str, model: str, batch: int) -> None:
    """Peak RSS of building the model (and fusing it) and running it, in MB: the process's own
    peak (VmHWM), reset after the imports so that the libraries' load does not hide it, and
    the same less the RSS at that reset (what the model and its inference add)."""
    x = torch.randn(batch, 3, 224, 224)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    m = make_model(model)
    if variant.startswith("fused"):
        m = resnet_fused.fuse(m, inplace=True, prepack=variant != "fused_noprepack")
    with torch.inference_mode():
        for _ in range(_MEMORY_CALLS):
            m(x)
    peak = _status_kb("VmHWM")
    print(json.dumps({"variant": variant, "peak_rss_mb": peak / 1024, "added_mb": (peak - base) / 1024}))


def run_memory(args, repeats: int = 3) -> dict:
    """Each variant in `repeats` fresh processes, interleaved; the median is reported. One process
    alone is not a measurement: glibc's heap (per-thread arenas, its moving mmap threshold) makes
    the same program's peak RSS vary by 15% from run to run here."""
    runs = {v: [] for v in ("eager", "fused", "fused_noprepack")}
    for _ in range(repeats):
        for v in runs:
            res = subprocess.run([sys.executable, "-m", "resnet_fused.bench", "--memory-child", v, "--model",
                                  args.model, "--batch", str(args.batch[-1]), "--threads", str(torch.get_num_threads())],
                                 capture_output=True, text=True, check=True)
            runs[v].append(json.loads(res.stdout.strip().splitlines()[-1]))
    med = lambda v, k: round(statistics.median(r[k] for r in runs[v]), 1)  # noqa: E731
    return {"peak_rss_mb": {v: med(v, "peak_rss_mb") for v in runs},
            "peak_added_mb": {v: med(v, "added_mb") for v in runs},
            "peak_added_mb_runs": {v: [round(r["added_mb"], 1) for r in rs] for v, rs in runs.items()},
            "memory_repeats": repeats, "memory_batch": args.batch[-1], "memory_calls": _MEMORY_CALLS}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}  \ntorch {result['torch']}, commit {result['commit']}, {result['created']}"]
    if result.get("allocator", "default") != "default":
        lines[0] += f"  \ntimed with the host allocator steady: {result['allocator']} (--default-allocator: not)"
    if result.get("settle_s"):
        lines[0] += f"; blocks {result['settle_s']} s apart (--settle)"
    lines.append("")
    recs = result.get("records", [])
    if recs:
        batches = sorted({r["batch"] for r in recs})
        variants = list(dict.fromkeys(r["variant"] for r in recs))
        lines.append(f"{recs[0]['model']}, {recs[0]['dtype']}: median ms per batch (images/s), steady state; "
                     "speed-up of fused over each variant")
        lines.append("")
        lines.append("| variant | " + " | ".join(f"batch {b}" for b in batches) + " | max rel err |")
        lines.append("|---|" + "---|" * (len(batches) + 1))
        by = {(r["variant"], r["batch"]): r for r in recs}
        for v in variants:
            cells = []
            for b in batches:
                r = by.get((v, b))
                f = by.get(("fused", b))
                if r is None:
                    cells.append("-")
                    continue
                ratio = f" **{r['ms'] / f['ms']:.2f}x**" if f and v != "fused" else ""
                cells.append(f"{r['ms']:.2f} ({r['img_s']:.0f}/s){ratio}")
            err = max(by[(v, b)]["max_rel_err"] for b in batches if (v, b) in by)
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {err:.1e} |")
        if any("cold_ms" in r for r in recs):
            lines.append("")
            lines.append("Cold calls (the first of each block, right after another variant): median ms; "
                         "speed-up of fused")
            lines.append("")
            lines.append("| variant | " + " | ".join(f"batch {b}" for b in batches) + " |")
            lines.append("|---|" + "---|" * len(batches))
            for v in variants:
                cells = []
                for b in batches:
                    r, f = by.get((v, b)), by.get(("fused", b))
                    if r is None or "cold_ms" not in r:
                        cells.append("-")
                        continue
                    ratio = f" **{r['cold_ms'] / f['cold_ms']:.2f}x**" if f and v != "fused" else ""
                    cells.append(f"{r['cold_ms']:.2f}{ratio}")
                lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if result.get("layers"):
        lines.append("")
        lines.append(f"Per layer (batch {result['layers'][0]['batch']}, {result['layers'][0]['dtype']}): "
                     "median ms, and times the roofline floor")
        lines.append("")
        variants = list(dict.fromkeys(r["variant"] for r in result["layers"]))
        lines.append("| layer | floor ms (bound) | " + " | ".join(variants) + " |")
        lines.append("|---|---|" + "---|" * len(variants))
        by = {(r["layer"], r["variant"]): r for r in result["layers"]}
        for layer in dict.fromkeys(r["layer"] for r in result["layers"]):
            first = by[(layer, variants[0])]
            cells = [f"{by[(layer, v)]['ms']:.3f} ({by[(layer, v)]['x_floor']:.1f}x)" if (layer, v) in by else "-"
                     for v in variants]
            lines.append(f"| {layer} | {first['floor_ms']:.3f} ({first['bound']}) | " + " | ".join(cells) + " |")
    if result.get("peak_rss_mb"):
        lines.append("")
        lines.append(f"Peak RSS at batch {result['memory_batch']} (median of {result.get('memory_repeats', 1)} "
                     "fresh processes each, glibc's default allocator; "
                     f"model built, fused and run {result.get('memory_calls', 3)} times): " + ", ".join(f"{k} {v:.0f} MB" for k, v in result["peak_rss_mb"].items()) +
                     "; above the RSS after imports: " +
                     ", ".join(f"{k} {v:.0f} MB" for k, v in result.get("peak_added_mb", {}).items()))
    if result.get("build_s"):
        lines.append("")
        lines.append("Build / compile + warm-up time (s): " +
                     ", ".join(f"{k} {v}" for k, v in result["build_s"].items()))
    return "\n".join(lines) + "\n"


def plot(result: dict, stem: str) -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return []
    paths = []
    recs = result.get("records", [])
    if recs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for v in dict.fromkeys(r["variant"] for r in recs):
            pts = sorted((r["batch"], r["img_s"]) for r in recs if r["variant"] == v)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v,
                    linewidth=2.5 if v.startswith("fused") else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("images / s")
        ax.set_title(f"{recs[0]['model']} {recs[0]['dtype']} on {result['device']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(stem + "_throughput.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if result.get("layers"):
        rows = result["layers"]
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        fig, ax = plt.subplots(figsize=(9, 5))
        width = 0.8 / (len(variants) + 1)
        by = {(r["layer"], r["variant"]): r for r in rows}
        for i, v in enumerate(variants):
            ax.barh([j + i * width for j in range(len(layers))], [by[(l, v)]["ms"] if (l, v) in by else 0 for l in layers], width,
                    label=v)
        ax.barh([j + len(variants) * width for j in range(len(layers))], [by[(l, variants[0])]["floor_ms"] for l in layers],
                width, label="roofline floor", color="black", alpha=0.4)
        ax.set_yticks([j + width * len(variants) / 2 for j in range(len(layers))])
        ax.set_yticklabels(layers, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms")
        ax.set_title(f"ResNet-50 layers, batch {rows[0]['batch']} {rows[0]['dtype']}, {result['device']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(stem + "_layers.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m resnet_fused.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="any torchvision ResNet by name (default resnet50)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"default: all of {GPU_VARIANTS} that run on the device, and on CPU in float32 the "
                        f"installed peers of {PEER_VARIANTS}")
    p.add_argument("--runs", type=int, default=None, help="timed steady-state runs per variant (default: by batch)")
    p.add_argument("--block", type=int, default=3,
                   help="calls of one variant in a row per round (at least 2); the first of each block is "
                        "reported apart as cold_ms: another variant's weights had just gone through the caches")
    p.add_argument("--settle", type=float, default=0.1,
                   help="seconds the host idles between blocks on CPU (another runtime's spinning threads settle)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rotate", type=int, default=4, help="distinct inputs rotated through")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--layers", action="store_true", help="per-layer benchmark instead of whole models")
    p.add_argument("--memory", action="store_true", help="also measure peak RSS of eager vs fused (CPU)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--default-allocator", action="store_true",
                   help="time under glibc's default thresholds (see steady_allocator) rather than fixed ones")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child, args.model, args.batch[-1])
        return {}
    if args.device == "cuda" and not resnet_fused.cuda_available():
        p.error("--device cuda: no CUDA device, or resnet_fused was built without CUDA kernels")
    if args.block < 2:
        p.error("--block must be at least 2: the first call of a block is the cold one")
    bad = set(args.variants or []) - set(ALL_VARIANTS)
    if bad:
        p.error(f"unknown variants {sorted(bad)}; choose from {ALL_VARIANTS}")

    allocator = "default" if args.default_allocator or args.device != "cpu" else steady_allocator()
    result = {
        "device": device_name(args.device),
        "allocator": allocator,
        "settle_s": args.settle if args.device == "cpu" and not args.layers else 0,
        "torch": torch.__version__,
        "commit": git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "records": [],
    }
    if args.layers:
        result.update(run_layer_benchmark(args))
    else:
        result.update(run_model_benchmark(args))
    if args.memory:
        result.update(run_memory(args))
    text = markdown(result)
    print(text)
    if not args.no_save:
        os.makedirs(args.out, exist_ok=True)
        kind = ("layers" if args.model == "resnet50" else f"layers_{args.model}") if args.layers else args.model
        dev = "gpu" if args.device == "cuda" else "cpu"
        stem = os.path.join(args.out, f"{dev}_{kind}_{args.dtype}{('_' + args.tag) if args.tag else ''}")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(text)
        for path in plot(result, stem):
            print(f"wrote {path}", file=sys.stderr)
        print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
