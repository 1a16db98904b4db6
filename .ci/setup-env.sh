#!/usr/bin/env bash
# The project environment behind the README's two commands (bench/run.sh, tests/run.sh), which
# source this file and then run "$NFK_PYTHON".
#
# - Everything goes into a virtual environment of the project's own, .venv/ in the checkout
#   (NFK_VENV=<dir> puts it elsewhere), so the user's Python is never changed. It is created with
#   --system-site-packages: what the machine already has (torch, triton, timm on a prepared GPU
#   machine without network) is used as it is; only what is missing, or a version the tests cannot
#   use, is installed, into the venv. NFK_VENV=none uses the current interpreter instead (a
#   throwaway CI or GPU machine), installing what is missing into it.
# - nfkernels is installed editable, and reinstalled only when a build input changed (the CUDA
#   sources, the bindings, the build files, whether the extension is wanted, NFK_CUDA_ARCHS); the CMake build
#   folder survives in build/, so even then only what changed is recompiled.
# - The base interpreter is $PYTHON (default python3).
# Idempotent and offline-safe: with everything present it asks pip for nothing.
set -euo pipefail
NFK_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

_nfk_setup() {
    local base=${PYTHON:-python3} venv=${NFK_VENV:-$NFK_ROOT/.venv}
    if [ "$venv" = none ]; then
        NFK_PYTHON=$(command -v "$base")
    else
        if [ ! -x "$venv/bin/python" ]; then
            echo "nfkernels: creating the project environment $venv (NFK_VENV=none uses $base itself)" >&2
            if ! "$base" -m venv --system-site-packages "$venv"; then
                echo "nfkernels: '$base -m venv' failed; install your distribution's venv package" \
                     "(e.g. python3-venv), or run with NFK_VENV=none to use $base directly" >&2
                return 1
            fi
        fi
        NFK_PYTHON=$venv/bin/python
    fi
    export NFK_PYTHON

    local py=$NFK_PYTHON
    pipi() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

    # torch first, pinned: a bare `torch` requirement would pull the multi-GB CUDA build. That is
    # the CPU build, whose Triton runs in the interpreter: numpy<2.4 (below), installed with it so
    # that torch does not import without numpy once.
    "$py" -c "import torch" 2>/dev/null || pipi "torch==2.13.0" "numpy<2.4"

    local missing
    missing=$("$py" - <<'PYEOF'
import importlib.metadata as metadata, importlib.util, platform, re, shutil, os
import torch

def version(dist):
    try:
        return tuple(int(p) for p in re.findall(r"\d+", metadata.version(dist))[:2])
    except metadata.PackageNotFoundError:
        return None

need = []
for module, spec in [("pybind11", "pybind11"), ("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark"),
                     ("hypothesis", "hypothesis>=6"), ("matplotlib", "matplotlib")]:
    if importlib.util.find_spec(module) is None:
        need.append(spec)
if (version("setuptools") or (0,)) < (77, 0):  # pyproject.toml's license and license-files
    need.append("setuptools>=77.0.3")
if importlib.util.find_spec("triton") is None and platform.system() == "Linux":
    # The version torch itself pins (its CUDA builds require triton); CPU builds pin none, and
    # get the Triton the interpreter tests were written against.
    pins = [r.split(";")[0].replace(" ", "") for r in (metadata.requires("torch") or []) if r.startswith("triton")]
    need.append(pins[0] if pins else "triton==3.6.0")
if os.environ.get("NFK_BUILD_CUDA") != "0" and (shutil.which("nvcc") or os.environ.get("NFK_BUILD_CUDA") == "1"):
    need += [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None]
# Triton 3.6's CPU interpreter (how the tests run Triton kernels without a GPU) breaks on numpy>=2.4.
numpy = version("numpy")
if numpy is None:
    need.append("numpy" if torch.cuda.is_available() else "numpy<2.4")
elif not torch.cuda.is_available() and numpy >= (2, 4):
    need.append("numpy<2.4")
print(" ".join(f"'{n}'" for n in need))
PYEOF
)
    if [ -n "$missing" ]; then
        echo "nfkernels: installing into $("$py" -c 'import sys; print(sys.prefix)'): $missing" >&2
        eval "pipi $missing"
    fi

    # Reinstall only when a build input changed, or nfkernels does not resolve to this checkout.
    local want_extension=0
    if [ "${NFK_BUILD_CUDA-}" = 1 ] || { [ "${NFK_BUILD_CUDA-}" != 0 ] && command -v nvcc >/dev/null; }; then
        want_extension=1
    fi
    local stamp_dir=$NFK_ROOT/build stamp inputs installed
    inputs=$( (cd "$NFK_ROOT" && cat setup.py pyproject.toml CMakeLists.txt csrc/* python/*;
               echo "$want_extension ${NFK_CUDA_ARCHS-} $(command -v nvcc || true) $py") | cksum | cut -d' ' -f1)
    stamp=$stamp_dir/install-$(echo "$py" | cksum | cut -d' ' -f1).stamp
    installed=$("$py" -c "import importlib.util as u; s = u.find_spec('nfkernels'); print(s.origin if s else '')")
    if [ "$installed" != "$NFK_ROOT/nfkernels/__init__.py" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ] ||
       { [ $want_extension = 1 ] && ! compgen -G "$NFK_ROOT/nfkernels/_C*.so" >/dev/null; }; then
        echo "nfkernels: installing nfkernels (editable) into $("$py" -c 'import sys; print(sys.prefix)')" >&2
        (cd "$NFK_ROOT" && pipi -e . --no-deps --no-build-isolation)
        mkdir -p "$stamp_dir"
        echo "$inputs" >"$stamp"
    fi
}

_nfk_setup
