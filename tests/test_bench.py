"""The benchmark's own machinery: what it sets up before timing."""

import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc's allocator only")

# In a fresh process: free a 24 MB block and report whether the RSS fell back (memory returned to
# the system), with or without the benchmark's steady allocator set first.
_CHILD = """
import sys
import torch
from resnet_fused import bench

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

said = bench.steady_allocator() if sys.argv[1] == "steady" else "default"
t = torch.ones(6 << 20)  # 24 MiB, touched
held = rss_kb()
del t
print(said)
print(held - rss_kb() > 16 << 10)
"""


@glibc
@pytest.mark.parametrize("mode", ["steady", "default"])
def test_steady_allocator_keeps_freed_blocks(mode):
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    said, returned = out.stdout.split("\n")[:2]
    if mode == "steady":
        assert said.startswith("glibc"), said
        assert returned == "False", "a freed 24 MB block left the process: the thresholds did not take"
    else:
        # (the default gives it back: what made eager's time depend on the process's heap history)
        assert returned == "True"


def test_markdown_names_the_allocator():
    from resnet_fused import bench

    base = {"device": "cpu", "torch": "x", "commit": "c", "created": "now", "records": []}
    assert "allocator steady" in bench.markdown({**base, "allocator": "glibc, no trimming"})
    assert "allocator" not in bench.markdown({**base, "allocator": "default"})


def test_blocks_are_apart_on_cpu(monkeypatch):
    """--settle: the host idles between blocks (ONNX Runtime's threads spin after a run and took the
    cores from the next variant's first call), once per block, and the results say so."""
    pytest.importorskip("torchvision")
    from resnet_fused import bench

    slept = []
    monkeypatch.setattr(bench.time, "sleep", slept.append)
    result = bench.main(["--model", "resnet18", "--image-size", "32", "--batch", "1", "--runs", "4", "--block", "2",
                         "--variants", "eager", "fused", "--no-save", "--settle", "0.25"])
    assert slept.count(0.25) == 4 * 2  # 4 rounds (4 steady runs, one per block of 2) of 2 variants
    assert "blocks 0.25 s apart" in bench.markdown(result)
