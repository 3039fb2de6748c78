"""What ptxas says about every kernel we compile: registers, stack frame, spills, barriers, per
architecture, and the dynamic shared memory each launch asks for. Written to
csrc/cuda/kernels/resources.txt (committed, so that a change shows its diff).

    python scripts/kernel_resources.py            # rewrite the file
    python scripts/kernel_resources.py --check    # fail on a spill or a stack frame, or a stale file

Needs nvcc (CUDA_HOME or /usr/local/cuda); no GPU, no torch.
"""

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "csrc", "cuda", "kernels")
OUT = os.path.join(KERNELS, "resources.txt")
ARCHS = ["sm_80", "sm_90"]


def cuda_home():
    for home in [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def short_name(mangled, home):
    filt = os.path.join(home, "bin", "cu++filt")
    filt = filt if os.path.exists(filt) else shutil.which("c++filt")
    name = subprocess.run([filt, mangled], capture_output=True, text=True).stdout.strip() if filt else mangled
    name = re.sub(r"^void ", "", name)
    name = name.replace("resnet_fused::cuda::", "").replace("(anonymous namespace)::", "")
    name = re.sub(r"\(Tile\)(\d)", lambda m: ["128x128", "128x64", "64x64", "128x128k64", "256x128"][int(m.group(1))], name)
    name = re.sub(r"\(DType\)(\d)", lambda m: ["f32", "f16", "bf16"][int(m.group(1))], name)
    return re.sub(r"\(.*\)$", "", name).replace("igemm::", "").replace("__half", "f16").replace("__nv_bfloat16", "bf16")


def ptxas(source, arch, home):
    nvcc = os.path.join(home, "bin", "nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++17", "-O3", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "--expt-relaxed-constexpr",
               f"-I{os.path.join(ROOT, 'csrc')}", source, "-o", os.path.join(tmp, "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"nvcc failed on {source} ({arch}):\n{proc.stderr[-3000:]}")
    rows, current = [], None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2)}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?", line)
        if m and current is not None:
            current.update(regs=int(m.group(1)), barriers=int(m.group(2) or 0), smem=int(m.group(3) or 0))
            rows.append(current)
            current = None
    return rows


DYNAMIC_SMEM = r"""
#include <cstdio>
#include "cuda/kernels/implicit_gemm.cuh"
using namespace resnet_fused::cuda;
int main() {
  std::printf("conv_kernel<128x128,*> %zu\nconv_kernel<128x64,*> %zu\nconv_kernel<64x64,*> %zu\n"
              "conv_kernel<128x128k64,*> %zu\nconv_kernel<256x128,*> %zu\n",
              igemm::smem_bytes<Tile::k128x128>(), igemm::smem_bytes<Tile::k128x64>(), igemm::smem_bytes<Tile::k64x64>(),
              igemm::smem_bytes<Tile::k128x128k64>(), igemm::smem_bytes<Tile::k256x128>());
}
"""


def dynamic_smem(home):
    """The dynamic shared memory of each conv tile, from the kernel's own constants (host build)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "smem.cpp"), os.path.join(tmp, "smem")
        with open(src, "w") as f:
            f.write(DYNAMIC_SMEM)
        subprocess.run([cxx, "-std=c++17", "-DRF_EMU", f"-I{os.path.join(ROOT, 'csrc')}",
                        f"-I{os.path.join(home, 'include')}", src, "-o", exe], check=True, capture_output=True)
        return subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split("\n")


def report(home):
    sources = sorted(glob.glob(os.path.join(KERNELS, "*.cu")))
    jobs = [(s, a) for s in sources for a in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda j: (j, ptxas(j[0], j[1], home)), jobs))
    version = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    version = re.search(r"release [\d.]+, V[\d.]+", version).group(0)
    lines = [
        "# ptxas -v for every kernel in csrc/cuda/kernels (scripts/kernel_resources.py; nvcc " + version + ").",
        "# A spill or a stack frame fails CI. Dynamic shared memory is per launch (below the table).",
        f"{'kernel':48s} {'arch':6s} {'regs':>4s} {'stack':>5s} {'spill st/ld':>11s} {'smem':>5s} {'bar':>3s}",
    ]
    rows = []
    for (source, _), found in results:
        for r in found:
            r["name"] = short_name(r["kernel"], home)
            r["file"] = os.path.basename(source)
            rows.append(r)
    rows.sort(key=lambda r: (r["name"], r["arch"]))
    for r in rows:
        lines.append(f"{r['name']:48s} {r['arch']:6s} {r['regs']:4d} {r['stack']:5d} "
                     f"{str(r['spill_st']) + '/' + str(r['spill_ld']):>11s} {r['smem']:5d} {r['barriers']:3d}")
    lines.append("")
    lines.append("# dynamic shared memory per block (bytes)")
    lines += [ln for ln in dynamic_smem(home) if ln.strip()]
    return "\n".join(lines) + "\n", rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail on spills/stack frames or a stale committed file")
    args = ap.parse_args()
    home = cuda_home()
    if home is None:
        sys.exit("nvcc not found (set CUDA_HOME)")
    text, rows = report(home)
    bad = [r for r in rows if r["stack"] or r["spill_st"] or r["spill_ld"]]
    if args.check:
        problems = [f"{r['name']} ({r['arch']}): {r['stack']} bytes stack frame, {r['spill_st']}/{r['spill_ld']} bytes "
                    f"spilled" for r in bad]
        committed = open(OUT).read() if os.path.exists(OUT) else ""
        if committed != text:
            problems.append(f"{os.path.relpath(OUT, ROOT)} is stale: run python scripts/kernel_resources.py and commit it")
        if problems:
            print(text)
            sys.exit("\n".join(problems))
        print(f"{len(rows)} kernels x archs: no spills, no stack frames; {os.path.relpath(OUT, ROOT)} up to date")
        return
    with open(OUT, "w") as f:
        f.write(text)
    print(text)
    if bad:
        sys.exit(f"{len(bad)} kernels spill or use a stack frame")


if __name__ == "__main__":
    main()
