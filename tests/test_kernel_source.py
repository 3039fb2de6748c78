"""Rules our CUDA kernel sources keep so that the emulator runs them unchanged, and what the
compiler says about them (csrc/cuda/kernels/resources.txt, checked against a fresh ptxas run)."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "kernels", "*.cu*"))) + sorted(
    glob.glob(os.path.join(ROOT, "csrc", "cuda", "kernels", "*.h")))


def code(path):
    """The source without comments and string literals."""
    text = open(path).read()
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=os.path.basename)
def test_kernels_use_only_the_arch_layer(path):
    src = code(path)
    assert not re.search(r"\basm\b|__asm__", src), "raw asm in a kernel: put the instruction in csrc/cuda/arch"
    assert "__shared__" not in src, "a static __shared__ array: the emulator needs dynamic shared memory"
    assert "<<<" not in src, "a raw launch: use rf::arch::launch (checked launch, emulator)"
    assert not re.search(r"\b__syncthreads\s*\(", src), "use rf::arch::syncthreads"
    assert not re.search(r"\b__(shfl|ldg|ballot|any|all)\w*\s*\(", src), "warp/cache intrinsics go through csrc/cuda/arch"


def test_rules_can_fail(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text('__global__ void k() { asm volatile("bar.sync 0;"); }\n')
    with pytest.raises(AssertionError, match="raw asm"):
        test_kernels_use_only_the_arch_layer(str(bad))


def nvcc_available():
    return any(os.path.exists(os.path.join(h, "bin", "nvcc")) for h in [os.environ.get("CUDA_HOME") or "", "/usr/local/cuda"])


@pytest.mark.skipif(not nvcc_available(), reason="nvcc not found")
def test_no_spills_and_resources_file_current():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kernel_resources.py"), "--check"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
