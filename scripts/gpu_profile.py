"""One ResNet-50 layer on our CUDA kernel, a few calls, for a profiler to look at (ncu):

    ncu --section SpeedOfLight --section WarpStateStats -k regex:conv_kernel --launch-skip 2 \\
        --launch-count 1 python scripts/gpu_profile.py --layer "l3 3x3 256" --batch 256

--algo picks the path as the tactics do (-1 our kernel's own plan, a tile's number in
resnet_fused.tactics.CUDA_ALGOS, -2 cuDNN + our epilogue). Prints the layer's median time over the calls (CUDA events).
"""

import argparse
import statistics
import sys

import torch

import resnet_fused
from resnet_fused.bench import RESNET50_LAYERS


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", default="l3 3x3 256", help="a name from resnet_fused.bench.RESNET50_LAYERS")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--algo", type=int, default=-1)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    rows = {r[0]: r[1:] for r in RESNET50_LAYERS}
    if args.layer not in rows:
        sys.exit(f"unknown layer {args.layer!r}; one of {sorted(rows)}")
    c, k, ksz, stride, h, residual = rows[args.layer]
    dtype, cl = getattr(torch, args.dtype), torch.channels_last
    pad = ksz // 2
    x = torch.randn(args.batch, c, h, h, device="cuda").to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(k, c, ksz, ksz, device="cuda") / (c * ksz * ksz) ** 0.5).to(dtype).contiguous(memory_format=cl)
    b = torch.randn(k, device="cuda")
    ho = (h + 2 * pad - ksz) // stride + 1
    r = torch.randn(args.batch, k, ho, ho, device="cuda").to(dtype).contiguous(memory_format=cl) if residual else None
    times = []
    for _ in range(args.calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.ops.resnet_fused.cuda_conv2d_bias_act(x, w, b, r, [stride] * 2, [pad] * 2, [1, 1], 1, True, args.algo)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    print(f"{args.layer} batch {args.batch} {args.dtype} algo {args.algo}: median {statistics.median(times):.3f} ms "
          f"over {args.calls} calls")


if __name__ == "__main__":
    assert resnet_fused.cuda_available(), "needs a GPU and a build with CUDA kernels"
    main()
