#!/usr/bin/env bash
# Installs what a fresh machine lacks, then nfkernels itself (editable, building the CUDA
# extension when nvcc is present). Idempotent and offline-safe: it only asks pip for what is
# missing, so it also runs on a GPU machine without network where everything is preinstalled.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
pipi() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch first, pinned: a bare `torch` requirement would pull the multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || pipi "torch==2.13.0"

missing=$("$PY" - <<'PYEOF'
import importlib.metadata, importlib.util, shutil
import torch
need = []
for module, spec in [("triton", "triton==3.6.0"), ("pybind11", "pybind11"), ("pytest", "pytest"),
                     ("pytest_benchmark", "pytest-benchmark"), ("hypothesis", "hypothesis>=6")]:
    if importlib.util.find_spec(module) is None:
        need.append(spec)
for tool in ("cmake", "ninja"):
    if shutil.which(tool) is None:
        need.append(tool)
# Triton 3.6's CPU interpreter (how the tests run Triton kernels without a GPU) breaks on numpy>=2.4.
interpreter_numpy = "numpy<2.4" if not torch.cuda.is_available() else "numpy"
try:
    numpy_version = tuple(int(p) for p in importlib.metadata.version("numpy").split(".")[:2])
except importlib.metadata.PackageNotFoundError:
    need.append(interpreter_numpy)
else:
    if interpreter_numpy != "numpy" and numpy_version >= (2, 4):
        need.append(interpreter_numpy)
print(" ".join(f"'{n}'" for n in need))
PYEOF
)
if [ -n "$missing" ]; then
    eval "pipi $missing"
fi
pipi -e . --no-deps --no-build-isolation
