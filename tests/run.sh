#!/usr/bin/env bash
# The test command: set up what is missing, then run the whole suite. Extra arguments go to pytest.
# On a machine without CUDA, Triton kernels run in Triton's interpreter (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-env.sh
exec "${PYTHON:-python3}" -m pytest tests -q "$@"
