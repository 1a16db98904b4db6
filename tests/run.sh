#!/usr/bin/env bash
# The test command: set up the project environment (.ci/setup-env.sh: .venv/, built once), then
# run the whole suite in it. Extra arguments go to pytest. On a machine without CUDA, Triton
# kernels run in Triton's interpreter (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup-env.sh
exec "$NFK_PYTHON" -m pytest tests -q "$@"
