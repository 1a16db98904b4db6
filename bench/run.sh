#!/usr/bin/env bash
# The main job: set up the project environment (.ci/setup-env.sh: .venv/, built once), then run
# the benchmarks in it (full on a CUDA GPU, a small CPU fallback elsewhere). Results land in
# bench/results/. Extra arguments go to `python -m bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup-env.sh
exec "$NFK_PYTHON" -m bench "$@"
