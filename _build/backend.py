"""The build backend: setuptools', building against the torch of the environment being installed into.

The kernels must be compiled against the very torch that will load them (same version, CPU-only or
CUDA build), so torch is not a build requirement that pip could fetch into its isolated build
environment (it would fetch another torch: the newest, CPU or CUDA at random). pip runs this
backend with the target environment's interpreter (sys.executable) but hides that environment's
site-packages behind a PYTHONPATH/PYTHONNOUSERSITE overlay; so, when torch is not importable
here, the target interpreter is asked, without that overlay, where its torch lives, and that
directory is appended to sys.path (after the build environment's own setuptools) before
setup.py is run. With --no-build-isolation torch is importable directly and nothing changes.

No torch at all: one line saying to install it first, and exit status 1 (no traceback).
"""

import importlib.util
import os
import subprocess
import sys

from setuptools import build_meta as _setuptools

NO_TORCH = (
    "resnet_fused builds against the torch installed in the target environment, and there is none: "
    "install torch first (`pip install torch`, or the CUDA build: https://pytorch.org/get-started/locally/), "
    "then install resnet_fused again"
)

_FIND_TORCH = (
    "import importlib.util, os; s = importlib.util.find_spec('torch'); "
    "print(os.path.dirname(os.path.dirname(s.origin)) if s and s.origin else '')"
)


def _target_site_packages():
    """The directory holding the target interpreter's torch, asked without pip's overlay; or None."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        done = subprocess.run([sys.executable, "-c", _FIND_TORCH], env=env, capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    path = done.stdout.strip()
    return path if done.returncode == 0 and path and os.path.isdir(path) else None


def _ensure_torch():
    if importlib.util.find_spec("torch") is not None:
        return
    path = _target_site_packages()
    if path is None:
        sys.exit(NO_TORCH)
    if path not in sys.path:
        sys.path.append(path)
    importlib.invalidate_caches()
    if importlib.util.find_spec("torch") is None:
        sys.exit(NO_TORCH)


def _with_torch(hook):
    def wrapped(*args, **kwargs):
        _ensure_torch()
        return hook(*args, **kwargs)

    wrapped.__name__ = hook.__name__
    wrapped.__doc__ = hook.__doc__
    return wrapped


# setuptools' hooks run setup.py, which imports torch: each finds it first. None asks for torch
# as a build requirement (setup.py names none).
get_requires_for_build_wheel = _with_torch(_setuptools.get_requires_for_build_wheel)
get_requires_for_build_sdist = _with_torch(_setuptools.get_requires_for_build_sdist)
prepare_metadata_for_build_wheel = _with_torch(_setuptools.prepare_metadata_for_build_wheel)
build_wheel = _with_torch(_setuptools.build_wheel)
build_sdist = _with_torch(_setuptools.build_sdist)
get_requires_for_build_editable = _with_torch(_setuptools.get_requires_for_build_editable)
prepare_metadata_for_build_editable = _with_torch(_setuptools.prepare_metadata_for_build_editable)
build_editable = _with_torch(_setuptools.build_editable)
