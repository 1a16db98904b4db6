#!/usr/bin/env bash
# One call on a CUDA machine: build the extension, run the whole test suite there (compiled
# Triton, CUDA kernels, bf16/fp16 cases), run every benchmark, regenerate the auto table, and
# leave logs and results under $OUT (default ./gpu_out). It uses the machine's Python as it is
# (a prepared GPU machine has no network to fill a project venv from); timm's reference numbers
# ship in tests/data/, and there timm itself can check them (step "data").
#
#   bash bench/gpu_run.sh            # everything
#   bash bench/gpu_run.sh tests      # only the test suite
#   bash bench/gpu_run.sh data       # only the check of tests/data against the installed timm
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
what=${1:-all}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -m pip install -e . --no-deps --no-build-isolation 2>&1 | tail -3 | tee "$OUT/build.log"
python3 -c "import nfkernels._C as c; print('nfkernels._C', c.cuda_runtime_version(), c.device_count())" \
    | tee -a "$OUT/build.log"
status=0
if [ "$what" = all ] || [ "$what" = data ]; then
    python3 tests/data/make_timm_reference.py check 2>&1 | tee "$OUT/reference_data.log" | tail -3 || status=1
fi
if [ "$what" = all ] || [ "$what" = tests ]; then
    python3 -m pytest tests -q -rs 2>&1 | tee "$OUT/tests.log" | tail -25 || status=1
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
    python3 -m bench 2>&1 | tee "$OUT/bench.log" | grep -E "^\[|Error|^Summary|^  bench/|^PNG charts|timm" || status=1
    python3 -m bench.autotable 2>&1 | tee "$OUT/autotable.log"
    tar czf "$OUT/results.tgz" bench/results nfkernels/_autotable.py
fi
exit $status
