"""Builds resnet_fused's kernels against the torch that is installed.

    pip install .            (the build backend, _build/backend.py, finds the target's torch)

Build settings (environment variables, printed at build time):
  RESNET_FUSED_CUDA      auto (default): CUDA kernels when torch is a CUDA build and nvcc is found;
                         1: require them (fail if impossible); 0: CPU kernels only.
                         FORCE_CUDA=1 is read as RESNET_FUSED_CUDA=1.
  TORCH_CUDA_ARCH_LIST   GPU architectures to compile for; default "8.0;9.0" (A100, H100/H200).
  CUDA_HOME              the CUDA toolkit (default: found from nvcc on PATH or /usr/local/cuda).
  MAX_JOBS               parallel compile jobs (ninja).
  RESNET_FUSED_DEBUG     1: -O0 -g, no -DNDEBUG.
  RESNET_FUSED_EMU       1: also build resnet_fused._emu, our CUDA kernels compiled by the host
                         compiler and run by the emulator (csrc/emu) on CPU tensors: for tests,
                         needs the CUDA headers (cuda_fp16.h) but no GPU and no CUDA build of torch.
"""

import glob
import os
import site
import sys

from setuptools import find_packages, setup

import shutil

try:
    import torch
except ImportError:
    # (the same line as _build/backend.py's, for `python setup.py ...` run by hand)
    sys.exit("resnet_fused builds against the torch installed in the target environment, and there is none: "
             "install torch first (`pip install torch`, or the CUDA build: https://pytorch.org/get-started/locally/), "
             "then install resnet_fused again")


def _find_cuda_home():
    """CUDA_HOME as given; else the toolkit of the nvcc on PATH (symlinks resolved) or
    /usr/local/cuda, whichever has both bin/nvcc and include/cuda_runtime_api.h (an nvcc
    wrapper script in /usr/local/bin must not make /usr/local the toolkit)."""
    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if given:
        return given
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda*"))
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime_api.h")
        ):
            return home
    return None


if _find_cuda_home() and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _find_cuda_home()  # read by torch.utils.cpp_extension at import

from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _cuda_mode():
    mode = os.environ.get("RESNET_FUSED_CUDA", "auto").strip().lower()
    if os.environ.get("FORCE_CUDA", "0") == "1":
        mode = "1"
    if mode not in ("auto", "0", "1"):
        sys.exit(f"RESNET_FUSED_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _nvidia_include_dirs():
    """CUDA headers that torch's headers include (cuBLAS, cuSPARSE, cuDNN, ...) ship in the
    nvidia-* pip packages that a CUDA build of torch depends on, not in a minimal toolkit."""
    roots = [os.path.dirname(os.path.dirname(torch.__file__))]
    roots += site.getsitepackages() if hasattr(site, "getsitepackages") else []
    dirs = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if inc not in dirs:
                dirs.append(inc)
    return dirs


def get_extensions():
    mode = _cuda_mode()
    torch_has_cuda = torch.version.cuda is not None
    nvcc_found = cpp_extension.CUDA_HOME is not None
    if mode == "1" and not (torch_has_cuda and nvcc_found):
        sys.exit(
            f"RESNET_FUSED_CUDA=1 but torch {torch.__version__} "
            f"{'has CUDA' if torch_has_cuda else 'is a CPU-only build'} and nvcc was "
            f"{'found at ' + str(cpp_extension.CUDA_HOME) if nvcc_found else 'not found (set CUDA_HOME)'}"
        )
    use_cuda = mode == "1" or (mode == "auto" and torch_has_cuda and nvcc_found)
    debug = os.environ.get("RESNET_FUSED_DEBUG", "0") == "1"

    sources = [os.path.join("csrc", n) for n in ("ops.cpp", "autograd.cpp", "replay.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    opt = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    extra_compile_args = {"cxx": opt + ["-fvisibility=hidden"]}
    extra_link_args = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # ATen's at::parallel_for is a header template whose body is `#pragma omp parallel`:
        # without -fopenmp our kernels' parallel loops compile serial and run on one core. The
        # OpenMP runtime linked is the libgomp.so.1 torch already loaded (same soname).
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    extension = cpp_extension.CppExtension
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "kernels", "*.cu")))
        extra_compile_args["cxx"].append("-DRESNET_FUSED_WITH_CUDA")
        extra_compile_args["nvcc"] = (["-O0", "-G"] if debug else ["-O3", "-DNDEBUG"]) + [
            "--expt-relaxed-constexpr",
            "-lineinfo",
        ]
        include_dirs += _nvidia_include_dirs()
        extension = cpp_extension.CUDAExtension

    print("resnet_fused build settings:")
    print(f"  torch                 {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  RESNET_FUSED_CUDA     {mode} -> {'CPU + CUDA kernels' if use_cuda else 'CPU kernels only'}")
    print(f"  CUDA_HOME             {cpp_extension.CUDA_HOME}")
    if use_cuda:
        print(f"  TORCH_CUDA_ARCH_LIST  {os.environ['TORCH_CUDA_ARCH_LIST']}")
        print(f"  extra CUDA includes   {include_dirs[1:]}")
    print(f"  MAX_JOBS              {os.environ.get('MAX_JOBS', '(ninja default)')}")
    print(f"  RESNET_FUSED_DEBUG    {int(debug)}")
    print(f"  OpenMP                {'-fopenmp (torch parallel loops run on every core)' if extra_link_args else 'no (parallel loops run serially)'}")

    extensions = [
        extension(
            "resnet_fused._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]
    emu = _emu_extension(opt)
    print(f"  RESNET_FUSED_EMU      {os.environ.get('RESNET_FUSED_EMU', '0')} -> "
          f"{'resnet_fused._emu (kernels under the emulator)' if emu else 'no emulator build'}")
    if emu:
        extensions.append(emu)
    return extensions


def _emu_extension(opt):
    """resnet_fused._emu: the CUDA kernels (csrc/cuda/kernels/*.cu) and their launch layer compiled
    as C++ with -DRF_EMU, on the emulator runtime (csrc/emu). Each kernel source is compiled through
    a one-line wrapper under build/emu_src, so that its object file differs from the GPU build's."""
    if os.environ.get("RESNET_FUSED_EMU", "0") != "1":
        return None
    cuda_home = _find_cuda_home()
    cuda_include = os.path.join(cuda_home, "include") if cuda_home else None
    if not cuda_include or not os.path.exists(os.path.join(cuda_include, "cuda_fp16.h")):
        sys.exit("RESNET_FUSED_EMU=1 needs the CUDA headers (cuda_fp16.h); set CUDA_HOME")
    wrap_dir = os.path.join("build", "emu_src")
    os.makedirs(wrap_dir, exist_ok=True)
    wrapped = sorted(glob.glob(os.path.join("csrc", "cuda", "kernels", "*.cu"))) + [os.path.join("csrc", "cuda", "launch.cpp")]
    sources = sorted(glob.glob(os.path.join("csrc", "emu", "*.cpp")))
    for src in wrapped:
        name = os.path.splitext(os.path.basename(src))[0]
        wrapper = os.path.join(wrap_dir, f"{name}.cpp")
        text = f'// generated by setup.py: {src} compiled for the emulator\n#include "{os.path.relpath(src, "csrc")}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        sources.append(wrapper)
    # -O2 even in debug builds: the emulator runs every CUDA thread of a block as a fiber.
    cxx = ["-O2", "-DRF_EMU", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
    if opt[0] == "-O0":
        cxx.append("-g")
    return cpp_extension.CppExtension(
        "resnet_fused._emu",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc"), cuda_include],
        extra_compile_args={"cxx": cxx},
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build, then a check that each extension loads libstdc++ as a shared library. A
    compiler that links it statically into the extension (seen: a GCC 13 wrapper set as CC/CXX on a
    GPU machine's image) gives a copy whose streams crash the process on the first error message
    with a number in it, instead of raising."""

    def run(self):
        super().run()
        if not sys.platform.startswith("linux"):
            return
        for ext in self.extensions:
            path = self.get_ext_fullpath(ext.name)
            try:
                with open(path, "rb") as f:
                    dynamic = b"libstdc++.so" in f.read()
            except OSError:
                continue
            if not dynamic:
                print(f"\nWARNING: {path} has libstdc++ linked in statically (by {os.environ.get('CXX', 'c++')}): "
                      "its error messages may crash the process instead of raising. Build with the system's "
                      "compiler: CC=/usr/bin/gcc CXX=/usr/bin/g++ pip install .\n", file=sys.stderr)


setup(
    name="resnet_fused",
    version="0.1.0",
    packages=find_packages("src", include=["resnet_fused", "resnet_fused.*"]),
    package_dir={"": "src"},
    # The kernels are compiled against this torch's C++ ABI: pip must not swap it for another
    # release under them (any local build, +cpu or +cuXXX, of the same release matches).
    install_requires=[f"torch=={torch.__version__.split('+')[0]}"],
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
