"""python -m resnet_fused: fuse a ResNet-50, check that fused and eager agree, time both.

    python -m resnet_fused [--model resnet50] [--device cpu|cuda] [--dtype float32] [--batch 1 8]
"""

import argparse
import copy
import statistics
import time

import torch

import resnet_fused
from resnet_fused.bench import DTYPES, Timer, device_name, make_model


def main():
    p = argparse.ArgumentParser(prog="python -m resnet_fused", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if resnet_fused.cuda_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float32 on CPU, float16 on GPU")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    dtype = DTYPES[args.dtype or ("float16" if args.device == "cuda" else "float32")]

    print(f"{args.model} with random weights and BN statistics on {device_name(args.device)}, {dtype}")
    model = make_model(args.model)
    fused = resnet_fused.fuse(model).to(args.device, dtype)
    print(fused.fuse_report.__str__().splitlines()[1])
    eager = copy.deepcopy(model).to(args.device, dtype).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model).double()
    timer = Timer(args.device)
    for batch in args.batch:
        x = torch.randn(batch, 3, 224, 224)
        xd = x.to(args.device, dtype)
        with torch.inference_mode():
            ref = reference(x.double())
            out_f = fused(xd).double().cpu()
            out_e = eager(xd.contiguous(memory_format=torch.channels_last)).double().cpu()
            err = lambda o: ((o - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
            same_top1 = torch.equal(out_f.argmax(1), out_e.argmax(1))
            print(f"batch {batch}: max rel error vs float64: fused {err(out_f):.2e}, eager {err(out_e):.2e}; "
                  f"top-1 {'identical' if same_top1 else 'DIFFERS'}")
            times = {"eager (channels_last)": [], "fused": []}
            fns = {"eager (channels_last)": lambda: eager(xd.contiguous(memory_format=torch.channels_last)),
                   "fused": lambda: fused(xd)}
            for fn in fns.values():
                fn()
            for _ in range(args.runs):
                for name, fn in fns.items():
                    times[name].append(timer(lambda _: fn(), None))
        med = {k: statistics.median(v) for k, v in times.items()}
        print("  " + ", ".join(f"{k} {v:.2f} ms ({batch / v * 1e3:.0f} img/s)" for k, v in med.items()) +
              f"  -> fused is {med['eager (channels_last)'] / med['fused']:.2f}x eager")


if __name__ == "__main__":
    main()
