"""Build and install nfkernels. Install PyTorch first (see README): a bare `torch` requirement
on a machine without torch would pull the CUDA build.

The CUDA extension nfkernels._C (csrc/ + python/, built by CMake and Ninja) is built when nvcc
is found; it needs no GPU to build or import. Environment variables:
  NFK_BUILD_CUDA=0   never build it (pure Python: torch and Triton backends only)
  NFK_BUILD_CUDA=1   always build it (fail if nvcc is missing)
  NFK_CUDA_ARCHS     semicolon list of architectures, default "75;80;90" (+ PTX of the last)
The metadata lives in pyproject.toml; `pip install .` gets pybind11, cmake and ninja from its
[build-system] table. `pip install -e . --no-build-isolation` uses the ones installed instead.

CMake builds in build/cmake-<python tag>/ inside the checkout, which survives between installs,
so a reinstall recompiles only what changed (an editable install would otherwise build in a fresh
temporary folder and recompile every kernel, a minute or more).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    return next((c for c in candidates if c and Path(c).is_file()), None)


def want_cuda_extension() -> bool:
    setting = os.environ.get("NFK_BUILD_CUDA", "").strip()
    if setting not in ("", "0", "1"):
        sys.exit(f"NFK_BUILD_CUDA must be 0, 1 or unset; got {setting!r}")
    if setting == "0":
        print("nfkernels: NFK_BUILD_CUDA=0, skipping the CUDA extension (pure-Python install)")
        return False
    if find_nvcc() is None:
        if setting == "1":
            sys.exit("nfkernels: NFK_BUILD_CUDA=1 but nvcc was not found (put it on PATH or set CUDA_HOME)")
        print("nfkernels: nvcc not found, skipping the CUDA extension (pure-Python install; "
              "the 'cuda' backend will be unavailable)")
        return False
    return True


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with Ninja, then places the module where build_ext
    (or an editable install, which builds in place) expects it: inside nfkernels/."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        nvcc = find_nvcc()
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DNFK_CUDA_ARCHS={os.environ.get('NFK_CUDA_ARCHS', '75;80;90')}",
        ]
        subprocess.run(configure, check=True)
        jobs = str(self.parallel or os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)
        built = next(build_dir.glob("_C*.so"), None) or next(build_dir.glob("_C*.pyd"))
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)


setup(
    ext_modules=[CMakeExtension("nfkernels._C")] if want_cuda_extension() else [],
    cmdclass={"build_ext": CMakeBuild},
)
