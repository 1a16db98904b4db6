"""The compiled extension nfkernels._C: it imports without a GPU, lists its functions, links
no libtorch and only the static CUDA runtime, and a call without a device raises a clear
RuntimeError. (Its numerics are checked on a GPU by test_agc.py and test_sgd_agc.py.)"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

import nfkernels as nfk
from nfkernels import _backend

_C = _backend.cuda_extension()
REQUIRED = os.environ.get("NFK_BUILD_CUDA") == "1"  # CI sets it where nvcc exists
pytestmark = pytest.mark.skipif(
    _C is None and not REQUIRED,
    reason="nfkernels._C is not built (pip install -e . --no-build-isolation with nvcc on PATH)",
)


def test_extension_is_built():
    assert _C is not None, "NFK_BUILD_CUDA=1 but nfkernels._C does not import"

FUNCTIONS = {"agc", "sgd_agc", "device_count", "cuda_runtime_version"}


def test_imports_and_lists_functions():
    assert FUNCTIONS <= {name for name in dir(_C) if not name.startswith("_")}
    assert _C.cuda_runtime_version() >= 11000
    for name in FUNCTIONS:
        assert getattr(_C, name).__doc__


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not available")
def test_links_neither_libtorch_nor_shared_cudart():
    dynamic = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line for line in dynamic.splitlines() if "NEEDED" in line]
    assert needed and not any(lib in line for line in needed for lib in ("libtorch", "libc10", "libcudart", "libcuda."))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")
def test_call_without_device_raises_clear_error():
    assert _C.device_count() == 0
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _C.agc(0, 0, 0, 1, "float32", 0.01, 1e-3, 0, 0)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _C.sgd_agc(0, 0, 0, 0, 1, "float32", 0.1, 0.9, 0.0, 0.01, 1e-3, True, True, False, True, 0, 0)
    p = torch.nn.Parameter(torch.randn(3, 2))
    p.grad = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="backend 'cuda' runs on CUDA tensors"), nfk.use_backend("cuda"):
        nfk.agc_([p])


@pytest.mark.gpu
def test_bad_dtype_name_is_a_type_error():
    with pytest.raises(TypeError, match="dtype"):
        _C.agc(0, 0, 0, 1, "int8", 0.01, 1e-3, 0, 0)
