"""Our Winograd kernel's two schedules on this CPU, on ResNet-50's Winograd shapes: chunked (1) against
three passes (2), and which one the kernel's own rule (0) runs.

The rule was measured on one machine (csrc/cpu/winograd.cpp: three_passes); tuning measures both
schedules wherever the rule runs chunks. This shows, shape by shape, where a CPU disagrees with
the rule: the two schedules interleaved in one process, shuffled each round, caches flushed before
every call, medians. Prints a markdown table and writes it to --out.

    python scripts/winograd_schedules.py --rounds 21 --out benchmarks/results/cpu_winograd_schedules_zen3.md
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import resnet_fused  # noqa: F401 - registers the ops
from resnet_fused import bench

# (layer, channels, input size, stride, tile): ResNet-50's 3x3s that Winograd can run
SHAPES = [("layer1 3x3", 64, 56, 1, 2), ("layer1 3x3 F(4x4)", 64, 56, 1, 4), ("layer2 3x3", 128, 28, 1, 2),
          ("layer2 3x3 F(4x4)", 128, 28, 1, 4), ("layer3 3x3", 256, 14, 1, 2), ("layer2.0 3x3 stride 2", 128, 56, 2, 2),
          ("layer3.0 3x3 stride 2", 256, 28, 2, 2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ops = torch.ops.resnet_fused
    flush = torch.empty((64 << 20) // 4)
    lines = [f"# Winograd schedules, {args.threads} threads", "",
             f"cpu: {bench.cpu_name()}; commit {bench.git_commit()}; {args.rounds} rounds interleaved, caches flushed "
             "before each call, medians", "",
             "| layer | batch | chunked ms | three passes ms | chunked / three passes | the rule runs |",
             "|---|---:|---:|---:|---:|---|"]
    print("\n".join(lines), flush=True)
    with torch.inference_mode():
        for batch in args.batch:
            for name, c, h, stride, tile in SHAPES:
                x = torch.randn(batch, c, h, h).contiguous(memory_format=torch.channels_last)
                u = ops.winograd_prepack(torch.randn(c, c, 3, 3) * (3 * c) ** -0.5, tile, stride, True)  # (as fused runs it)
                b = torch.randn(c)
                times = {1: [], 2: []}
                for _ in range(args.rounds):
                    order = list(times)
                    random.shuffle(order)
                    for schedule in order:
                        flush.add_(1)
                        t0 = time.perf_counter()
                        ops.winograd_conv2d_bias_act(x, u, b, None, True, schedule, c)
                        times[schedule].append(time.perf_counter() - t0)
                chunked, passes = (statistics.median(times[s]) * 1e3 for s in (1, 2))
                rule = "three passes" if ops.winograd_schedule(list(x.shape), list(u.shape), c) == 2 else "chunked"
                line = f"| {name} | {batch} | {chunked:.3f} | {passes:.3f} | {chunked / passes:.2f} | {rule} |"
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
