"""Tune a ResNet-50 (torchvision's topology, built here: no torchvision needed) on the CPU or a
GPU and print how long it took and what each layer chose.

    python scripts/tune_resnet50.py [--batch 8] [--size 224] [--json out.json]
    python scripts/tune_resnet50.py --device cuda --dtype float16 --batch 256 --compare 20

Uses a fresh cache directory unless RESNET_FUSED_CACHE_DIR is set, so it measures every layer.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for i, (n, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = 4 * width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--compare", type=int, default=0, metavar="REPS",
                   help="then time the tuned model against the rules' (tune=False) side by side, REPS calls each")
    args = p.parse_args()
    os.environ.setdefault("RESNET_FUSED_CACHE_DIR", tempfile.mkdtemp(prefix="resnet_fused_tune_"))
    import resnet_fused
    from resnet_fused import tactics

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = ResNet50().eval()
    x = torch.randn(args.batch, 3, args.size, args.size).to(device, dtype)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    fused = resnet_fused.fuse(model).to(device, dtype)
    t0 = time.perf_counter()
    resnet_fused.tune(fused, x)
    sync()
    tuning = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        fused(x)
    sync()
    after = time.perf_counter() - t0
    rows = fused.fuse_report.tactics
    print(f"machine: {tactics.machine_id(tactics.machine_key(device))}")
    print(f"tuning: {tuning:.1f} s for {len(rows)} layers at batch {args.batch}, {args.size}x{args.size} "
          f"({tactics.stats()['measured']} measured); the next forward: {after * 1e3:.0f} ms")
    print(fused.fuse_report.tactics_table())
    counts = {}
    for r in rows:
        counts[r["choice"]] = counts.get(r["choice"], 0) + 1
    print("choices:", counts)
    compare = None
    if args.compare:
        import statistics

        rules = resnet_fused.fuse(model, tune=False).to(device, dtype)
        models = {"tuned": fused, "rules": rules}
        times = {k: [] for k in models}
        with torch.inference_mode():
            rules(x)  # (packs its weights)
            for _ in range(args.compare):
                for k, m in models.items():
                    sync()
                    t0 = time.perf_counter()
                    m(x)
                    sync()
                    times[k].append(time.perf_counter() - t0)
        compare = {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()}
        print(f"forward, median of {args.compare} interleaved calls (ms):", compare)
    if args.json:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        with open(args.json, "w") as f:
            json.dump({"machine": tactics.machine_key(device), "dtype": args.dtype, "commit": commit or None, "batch": args.batch, "size": args.size,
                       "tuning_s": round(tuning, 2), "forward_ms": compare, "layers": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
