"""Per-layer time of a ResNet (resnet50 by default) fp32 on CPU: each fused layer against OpenVINO's node for it.

The must-show table of issue 16 ("where a goal is missed: on which layers"): fused layers timed
with forward hooks (the module's Python included), OpenVINO's nodes with its own PERF_COUNT
profiler (real time), the two interleaved in one process, same thread count. Prints a markdown
table and writes it to --out.

    python scripts/per_layer_peers.py --batch 1 --rounds 30 --out benchmarks/results/cpu_layers_peers_b1.md
"""

from __future__ import annotations

import argparse
import collections
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
    compiled = ov.Core().compile_model(path, "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32",
        "NUM_STREAMS": 1, "PERF_COUNT": True})
    request = compiled.create_infer_request()

    fused_t = collections.defaultdict(list)
    kernels = {}
    with torch.inference_mode():
        fused = resnet_fused.fuse(model)
        names = {}
        for name, m in fused.named_modules():
            if isinstance(m, FusedConv2d):
                names[m] = name
                m.register_forward_pre_hook(lambda mod, a: setattr(mod, "_t0", time.perf_counter()))
                m.register_forward_hook(lambda mod, a, o: fused_t[names[mod]].append(time.perf_counter() - mod._t0))
        for _ in range(3):
            fused(x)
            request.infer({0: x.numpy()})
        fused_t.clear()
        ov_t = collections.defaultdict(list)
        ov_kind = {}
        whole = {"fused": [], "openvino": []}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fused(x)
            whole["fused"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            request.infer({0: x.numpy()})
            whole["openvino"].append(time.perf_counter() - t0)
            for info in request.get_profiling_info():
                if info.node_type in ("Convolution", "Pooling", "MaxPool", "AvgPool", "FullyConnected",
                                      "Reorder", "Eltwise", "Reduce", "MatMul") or "Conv" in info.node_type:
                    key = info.node_name
                    ov_t[key].append(info.real_time.total_seconds())
                    ov_kind[key] = (info.node_type, info.exec_type)
        for m, name in names.items():
            path_ = next(iter(m._cache.values()))[2] if m._cache else ""
            kernels[name] = path_ or "onednn"

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
             f"whole forward: fused {med(whole['fused']):.2f} ms (with the hooks), openvino "
             f"{med(whole['openvino']):.2f} ms (with PERF_COUNT on); the whole-model comparison without either "
             "is the benchmark's (python -m resnet_fused.bench)", "",
             "fused ms: the FusedConv2d module (its Python included); OV ms: the node's own time", "",
             "| layer | fused kernel | fused ms | OV ms | OV exec | fused/OV |", "|---|---|---:|---:|---|---:|"]
    tf = to = 0.0
    for name in sorted(fused_t, key=lambda n: list(names.values()).index(n)):
        key = ov_conv.get(name)
        f = med(fused_t[name])
        o = med(ov_t[key]) if key else float("nan")
        tf += f
        to += o if key else 0.0
        lines.append(f"| {name} | {kernels.get(name, '')} | {f:.3f} | {o:.3f} | {ov_kind[key][1] if key else ''} | "
                     f"{f / o:.2f} |")
    other = sum(med(v) for k, v in ov_t.items() if k not in ov_conv.values())
    lines += [f"| **all convs** | | {tf:.2f} | {to:.2f} | | {tf / to:.2f} |",
              f"| everything else (fused: forward minus its convs; OV: its other nodes) | | "
              f"{med(whole['fused']) - tf:.2f} | {other:.2f} | | |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
