"""Per-layer time of a ResNet (resnet50 by default) fp32 on CPU: each fused layer against OpenVINO's and ONNX Runtime's node for it.

The must-show table of issue 16 ("where a goal is missed: on which layers"): fused layers timed
op by op inside the replayed forward (the path a served model runs: resnet_fused.replay), OpenVINO's
nodes with its own PERF_COUNT profiler (real time), ONNX Runtime's with its profiler (the node's
kernel time), the three interleaved in one process, same thread count. Prints a markdown table and
writes it to --out.

    python scripts/per_layer_peers.py --batch 1 --rounds 30 --out benchmarks/results/cpu_layers_peers_b1.md
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import time

import torch

import resnet_fused
from resnet_fused import bench
from resnet_fused.modules import FusedConv2d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", help="any torchvision ResNet by name")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    allocator = bench.steady_allocator()  # (as the benchmark times: see its docstring)
    model = bench.make_model(args.model)
    x = torch.randn(args.batch, 3, 224, 224)

    import openvino as ov

    path = bench.export_onnx(model, x)
    compiled = ov.Core().compile_model(path, "CPU", {**bench.openvino_config(args.threads), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    import onnxruntime as ort

    so = bench.ort_session_options(args.threads)  # (as the benchmark runs it, with the profiler on)
    so.enable_profiling = True
    # (its threads otherwise spin after each run, taking the cores from the fused model timed next)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.profile_file_prefix = os.path.join(os.path.dirname(path), "ort_profile")
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    fused_t = collections.defaultdict(list)
    kernels = {}
    with torch.inference_mode():
        fused = resnet_fused.fuse(model)
        names = {}
        for name, m in fused.named_modules():
            if isinstance(m, FusedConv2d):
                # (a FusedDual pair's two layers, as the model's own names: convN.conv, convN.downsample)
                names[m] = re.sub(r"\.conv\d\.downsample$", ".downsample.0", re.sub(r"(\.conv\d)\.conv$", r"\1", name))
        for _ in range(3):
            fused(x)
            request.infer({0: x.numpy()})
            session.run(None, {"x": x.numpy()})
        plan, native = time_replayed_layers(fused, x, names, fused_t)
        fused_t.clear()
        ov_t = collections.defaultdict(list)
        ov_kind = {}
        whole = {"fused": [], "fused_native": [], "openvino": [], "onnxruntime": []}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fused(x)
            whole["fused"].append(time.perf_counter() - t0)
            if native is not None:  # the same plan on its C++ executor, no op timed: the model as served
                plan.native, timed_plan = native, plan.native
                t0 = time.perf_counter()
                fused(x)
                whole["fused_native"].append(time.perf_counter() - t0)
                plan.native = timed_plan
            t0 = time.perf_counter()
            request.infer({0: x.numpy()})
            whole["openvino"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            session.run(None, {"x": x.numpy()})
            whole["onnxruntime"].append(time.perf_counter() - t0)
            for info in request.get_profiling_info():
                if info.node_type in ("Convolution", "Pooling", "MaxPool", "AvgPool", "FullyConnected",
                                      "Reorder", "Eltwise", "Reduce", "MatMul") or "Conv" in info.node_type:
                    key = info.node_name
                    ov_t[key].append(info.real_time.total_seconds())
                    ov_kind[key] = (info.node_type, info.exec_type)
        for m, name in names.items():
            path_ = next(iter(m._cache.values()))[2] if m._cache else ""
            kernels[name] = path_ or "onednn"

    ort_t = onnxruntime_node_times(session.end_profiling(), warmup=3)

    def med(v):
        v = sorted(v)
        return v[len(v) // 2] * 1e3

    # OpenVINO node per fused layer: the Convolution node whose name carries the layer's path.
    ov_conv = {}
    for key, (ntype, etype) in ov_kind.items():
        path_ = key.replace("/", ".").replace("downsample.downsample.0", "downsample.0")
        m = re.search(r"((?:layer\d\.\d+\.)?(?:conv\d|downsample\.0))", path_)
        if ntype in ("Convolution", "GroupConvolution") and m:
            ov_conv.setdefault(m.group(1), key)
    lines = [f"# {args.model} fp32 per layer, batch {args.batch}, {args.threads} threads", "",
             f"cpu: {bench.cpu_name()}; commit {bench.git_commit()}; openvino {ov.__version__}; "
             f"{args.rounds} rounds interleaved, medians; host allocator: {allocator}", "",
             f"whole forward: fused {med(whole['fused']):.2f} ms (replayed from Python, its ops timed; "
             f"{med(whole['fused_native']) if whole['fused_native'] else float('nan'):.2f} ms on the C++ executor, "
             "none timed), openvino "
             f"{med(whole['openvino']):.2f} ms (with PERF_COUNT on), onnxruntime {med(whole['onnxruntime']):.2f} ms "
             f"(with its profiler on; onnxruntime {ort.__version__}); the whole-model comparison without them "
             "is the benchmark's (python -m resnet_fused.bench)", "",
             "fused ms: the layer's op in the replayed forward; OV ms, ORT ms: the node's own time", "",
             "| layer | fused kernel | fused ms | OV ms | OV exec | ORT ms | fused/OV | fused/ORT |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    tf = to = tr = 0.0
    for name in sorted(fused_t, key=lambda n: list(names.values()).index(n)):
        key = ov_conv.get(name)
        f = med(fused_t[name])
        o = med(ov_t[key]) if key else float("nan")
        r = med(ort_t[name]) if name in ort_t else float("nan")
        tf += f
        to += o if key else 0.0
        tr += r if name in ort_t else 0.0
        lines.append(f"| {name} | {kernels.get(name, '')} | {f:.3f} | {o:.3f} | {ov_kind[key][1] if key else ''} | "
                     f"{r:.3f} | {f / o:.2f} | {f / r:.2f} |")
    other = sum(med(v) for k, v in ov_t.items() if k not in ov_conv.values())
    ort_other = sum(med(v) for k, v in ort_t.items() if k not in fused_t)
    lines += [f"| **all convs** | | {tf:.2f} | {to:.2f} | | {tr:.2f} | {tf / to:.2f} | {tf / tr:.2f} |",
              f"| everything else (fused: forward minus its convs; OV, ORT: their other nodes) | | "
              f"{med(whole['fused']) - tf:.2f} | {other:.2f} | | {ort_other:.2f} | | |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


def time_replayed_layers(fused, x, names: dict, times: dict) -> tuple:
    """Make the fused model replay on x, and wrap each op of its recorded run that belongs to a
    fused layer with a timer appending to times[layer name]. Which layer an op belongs to comes
    from one run on the module path (replay off) with hooks that mark the layer being run: the
    recording is that run's ops in the same order. The steps then run from Python's executor (the
    C++ one cannot be wrapped), which adds a few microseconds of host time per op to the forward.
    Returns the plan and the C++ executor it had (None where none), which it no longer runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from resnet_fused import replay

    for _ in range(4):
        fused(x)
    plans = fused.__dict__.get("_replayer").plans if "_replayer" in fused.__dict__ else {}
    if len(plans) != 1:
        raise SystemExit(f"per_layer_peers: expected one recorded run of the fused model, found {len(plans)}")
    plan = next(iter(plans.values()))
    current, ops = [None], []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append((func, current[0]))
            return func(*args, **(kwargs or {}))

    hooks = []
    for m, name in names.items():
        hooks.append(m.register_forward_pre_hook(lambda mod, a, n=name: current.__setitem__(0, n)))
        hooks.append(m.register_forward_hook(lambda mod, a, o: current.__setitem__(0, None)))
    was, replay.enabled = replay.enabled, False
    try:
        with Ops():
            fused(x)
    finally:
        replay.enabled = was
        for h in hooks:
            h.remove()
    if [f for f, _ in ops] != [s[0] for s in plan.steps]:
        raise SystemExit("per_layer_peers: the module path's ops are not the recorded run's")

    def timed(func, name):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            times[name].append(time.perf_counter() - t0)
            return out
        return call

    plan.steps = [(timed(s[0], name), *s[1:]) if name else s for s, (_, name) in zip(plan.steps, ops)]
    native, plan.native = plan.native, None  # (the Python executor, whose steps can be wrapped)
    return plan, native


def onnxruntime_node_times(profile: str, warmup: int) -> dict:
    """ONNX Runtime's per-node kernel times (seconds, one list per node, the first `warmup` runs
    dropped) from its profiler's JSON, its convolutions keyed by the torchvision layer they come
    from. Its fused Conv nodes are named by the tensor they write: a block's relu / relu_1 (after
    conv1 / conv2), convN/Conv or downsample.0/Conv (the residual add is fused into them)."""
    with open(profile) as f:
        events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[warmup]["ts"] if len(runs) > warmup else 0
    times = collections.defaultdict(list)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        name = e["name"][: -len("_kernel_time")]
        m = re.match(r"/(?:(layer\d)/\1\.(\d+)/)?(relu|relu_1|conv\d|downsample/downsample\.0)/(?:Relu|Conv)_output_0",
                     name)
        if m and e["args"].get("op_name") == "Conv":
            layer, block, what = m.groups()
            what = {"relu": "conv1", "relu_1": "conv2", "downsample/downsample.0": "downsample.0"}.get(what, what)
            name = f"{layer}.{block}.{what}" if layer else what
        times[name].append(e["dur"] * 1e-6)
    return times


if __name__ == "__main__":
    main()
