"""A few launches of every CUDA kernel we wrote, small enough for compute-sanitizer (memcheck,
racecheck, synccheck, initcheck are 10-100x slower than a plain run). Exit code 1 on a wrong answer.
Inputs are made and references computed on the CPU (float64), so that what the sanitizer sees on
the GPU is our kernels and the copies that feed them, not cuDNN's.

    compute-sanitizer --tool racecheck python scripts/gpu_smoke.py
"""

import sys

import torch
import torch.nn.functional as F

import resnet_fused

CL = torch.channels_last


def main():
    torch.manual_seed(0)
    bad = 0
    cases = [  # n, c, k, kernel, stride, h, residual, groups: every tile, split-K (batch 1, layer4), the stem,
        # the grouped kernels (ResNeXt's 8- and 4-channel groups)
        (2, 64, 256, 1, 1, 14, True, 1), (1, 512, 512, 3, 1, 7, False, 1), (2, 3, 64, 7, 2, 32, False, 1),
        (4, 256, 512, 1, 2, 14, False, 1), (8, 128, 128, 3, 1, 28, True, 1), (2, 256, 256, 3, 1, 14, False, 32),
        (2, 128, 128, 3, 2, 14, False, 32),
    ]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for n, c, k, ksz, stride, h, residual, groups in cases:
            if dtype == torch.float32 and groups > 1:
                continue  # (grouped float32 keeps cuDNN)
            x = torch.randn(n, c, h, h).to(dtype).contiguous(memory_format=CL)
            w = (torch.randn(k, c // groups, ksz, ksz) / (c // groups * ksz * ksz) ** 0.5).to(dtype)
            b = torch.randn(k)
            ho = (h + 2 * (ksz // 2) - ksz) // stride + 1
            r = torch.randn(n, k, ho, ho).to(dtype).contiguous(memory_format=CL) if residual else None
            if dtype == torch.float32:  # our TF32 kernel, asked for by tile (it runs only where tactics chose it)
                out = torch.ops.resnet_fused.cuda_conv2d_bias_act.default(
                    x.cuda(), w.cuda(), b.cuda(), r.cuda() if residual else None, [stride] * 2, [ksz // 2] * 2,
                    [1, 1], 1, True, 1).cpu()
            else:
                out = resnet_fused.ops.conv2d_bias_act(x.cuda(), w.cuda(), b.cuda(), r.cuda() if residual else None,
                                                       stride=stride, padding=ksz // 2, groups=groups, relu=True).cpu()
            ref = F.conv2d(x.double(), w.double(), b.double(), stride, ksz // 2, 1, groups)
            ref = (ref + r.double() if residual else ref).relu()
            err = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1)).item()
            ok = err < (2e-2 if dtype == torch.bfloat16 else 4e-3)  # (TF32: float16's 10-bit mantissa)
            bad += not ok
            print(f"{'ok  ' if ok else 'FAIL'} conv {dtype} n{n} c{c} k{k} g{groups} {ksz}x{ksz}/s{stride} {h}x{h}: "
                  f"rel err {err:.2e}")
    # the dual kernel (a bottleneck's last 1x1 + its stride-2 downsample): both tiles, and split-K at batch 1
    for dtype in (torch.float16, torch.bfloat16):
        for n, c1, c2, k, h2, tile, splits in [(2, 128, 256, 512, 14, 0, -1), (2, 64, 128, 136, 9, 1, -1),
                                               (1, 512, 1024, 2048, 7, 1, 4)]:
            y = torch.randn(n, c1, (h2 + 1) // 2, (h2 + 1) // 2).relu().to(dtype).contiguous(memory_format=CL)
            x = torch.randn(n, c2, h2, h2).relu().to(dtype).contiguous(memory_format=CL)
            w = (torch.randn(k, c1 + c2, 1, 1) / (c1 + c2) ** 0.5).to(dtype).contiguous(memory_format=CL)
            b = torch.randn(k)
            out = torch.ops.resnet_fused.cuda_conv1x1_dual_bias_act.default(y.cuda(), w.cuda(), b.cuda(), x.cuda(), 2,
                                                                            True, tile).cpu()
            ref = (F.conv2d(y.double(), w[:, :c1].double(), b.double())
                   + F.conv2d(x.double(), w[:, c1:].double(), stride=2)).relu()
            err = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1)).item()
            ok = err < (2e-2 if dtype == torch.bfloat16 else 4e-3)
            bad += not ok
            print(f"{'ok  ' if ok else 'FAIL'} dual {dtype} n{n} c{c1}+{c2} k{k} {h2}x{h2} tile {tile}: rel err {err:.2e}")
    a = torch.randn(2, 64, 9, 9, dtype=torch.float16)
    ok = torch.equal(resnet_fused.ops.add_relu(a.cuda(), a.cuda()).cpu(), (a.float() + a.float()).relu().half())
    bad += not ok
    print(f"{'ok  ' if ok else 'FAIL'} epilogue (add_relu)")
    torch.cuda.synchronize()
    print(f"{bad} failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
