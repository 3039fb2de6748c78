"""The emulator and our kernels built with ThreadSanitizer, and with AddressSanitizer +
UndefinedBehaviorSanitizer, running tests/emu/driver.cpp (self-tests, the epilogue kernel and the
fused convolution against float64 references, blocks on several OS threads). No torch involved:
a plain C++ program, so that the sanitizers see only our code."""

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def cuda_include():
    for home in [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]:
        if home and os.path.exists(os.path.join(home, "include", "cuda_fp16.h")):
            return os.path.join(home, "include")
    return None


SANITIZERS = {
    "thread": ["-fsanitize=thread"],
    "address+undefined": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
}
REPORTS = ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    """Both builds, compiled side by side (about 20 s each on 2 cores)."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    inc = cuda_include()
    if not cxx or not inc:
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h)")
    out = tmp_path_factory.mktemp("sanitizers")
    sources = [os.path.join(ROOT, "tests", "emu", "driver.cpp"), os.path.join(CSRC, "emu", "runtime.cpp"),
               os.path.join(CSRC, "emu", "selftest.cpp"), "-x", "c++",
               os.path.join(CSRC, "cuda", "kernels", "epilogue.cu")]
    sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "kernels", "implicit_gemm*.cu")))
    procs = {}
    for name, flags in SANITIZERS.items():
        exe = str(out / name.replace("+", "_"))
        cmd = [cxx, "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", *flags, "-DRF_EMU", f"-I{CSRC}", f"-I{inc}",
               "-Wno-unknown-pragmas", *sources, "-o", exe, "-lpthread"]
        procs[name] = (exe, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    built = {}
    for name, (exe, proc) in procs.items():
        log, _ = proc.communicate()
        assert proc.returncode == 0, f"{name} build failed:\n{log[-3000:]}"
        built[name] = exe
    return built


@pytest.mark.parametrize("sanitizer", list(SANITIZERS))
def test_emulator_runs_clean_under(binaries, sanitizer):
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1", ASAN_OPTIONS="detect_leaks=1",
               UBSAN_OPTIONS="print_stacktrace=1")
    proc = subprocess.run([binaries[sanitizer]], capture_output=True, text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    reports = [line for line in log.splitlines() if any(r in line for r in REPORTS)]
    assert not reports, f"{sanitizer}: " + "\n".join(reports[:5]) + "\n" + log[-4000:]
    assert proc.returncode == 0 and "\n0 failed" in log, log[-4000:]
