#!/usr/bin/env bash
# The main job: set up what is missing, then run the benchmarks (full on a CUDA GPU, a small
# CPU fallback elsewhere). Results land in bench/results/. Extra arguments go to `python -m bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-env.sh
exec "${PYTHON:-python3}" -m bench "$@"
