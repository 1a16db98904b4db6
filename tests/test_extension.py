"""The compiled extension nfkernels._C: it imports without a GPU, lists its functions, links
no libtorch and only the static CUDA runtime, and a call without a device raises a clear
RuntimeError. (Its numerics are checked on a GPU by test_agc.py, test_sgd_agc.py,
test_weight_standardize.py, test_scaled_act.py and test_se_gate.py, whose cases include the
"cuda" backend there.)"""
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

FUNCTIONS = {"agc", "sgd_agc", "device_count", "cuda_runtime_version", "weight_standardize_fwd",
             "weight_standardize_bwd", "scaled_act_fwd", "scaled_act_bwd", "scaled_act_bwd_workspace", "se_pool",
             "se_gate_fwd", "se_gate_bwd_reduce", "se_gate_bwd"}


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
        _C.sgd_agc(0, 0, 0, 0, 1, "float32", 0.1, 0.9, 0.0, 0.01, 1e-3, True, True, True, 0, 0)
    p = torch.nn.Parameter(torch.randn(3, 2))
    p.grad = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="backend 'cuda' runs on CUDA tensors"), nfk.use_backend("cuda"):
        nfk.agc_([p])


# Every kernel entry point with valid arguments (null pointers: it must fail before using them).
CALLS = {
    "weight_standardize_fwd": (0, 0, 0, 0, 0, 0, 4, 27, "float32", "bfloat16", 0.2, 1e-5, False, 0, 0),
    "weight_standardize_bwd": (0, 0, 0, 0, 0, 0, 0, 0, 4, 27, "bfloat16", "float32", 0, 0),
    "scaled_act_fwd": (0, 0, 0, 6, 49, 3, True, "float16", "float32", "gelu_tanh", 1.7, 0, 0),
    "scaled_act_bwd": (0, 0, 0, 0, 0, 0, 6, 49, 3, True, "float16", "", "celu", 1.3, 0, 0),
    "se_pool": (0, 0, 0, 2, 8, 49, True, "bfloat16", "", 0, 0),
    "se_gate_fwd": (0, 0, 0, 0, 0, 0, 2, 8, 49, False, "float64", "float64", "", 0, 0),
    "se_gate_bwd_reduce": (0, 0, 0, 0, 0, 2, 8, 49, False, "float32", "float32", 0, 0),
    "se_gate_bwd": (0, 0, 0, 0, 2, 8, 49, True, "float32", 0, 0),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")
@pytest.mark.parametrize("name", list(CALLS))
def test_new_kernels_without_device_raise_clear_error(name):
    with pytest.raises(RuntimeError, match="no CUDA device"):
        getattr(_C, name)(*CALLS[name])


def test_argument_errors_come_before_the_device():
    with pytest.raises(ValueError, match="unknown activation"):
        _C.scaled_act_fwd(0, 0, 0, 6, 49, 3, True, "float32", "", "swish", 1.0, 0, 0)
    with pytest.raises(TypeError, match="bias must have dtype float16 or float32"):
        _C.scaled_act_fwd(0, 8, 0, 6, 49, 3, True, "float16", "bfloat16", "gelu", 1.0, 0, 0)
    with pytest.raises(ValueError, match="invalid matrix view"):
        _C.scaled_act_bwd_workspace(7, 49, 3, True, "float32")  # 7 rows are not whole (n, c) planes
    assert _C.scaled_act_bwd_workspace(6, 49, 3, True, "float32") == 6  # one partial sum per row


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")
@pytest.mark.parametrize("op", ["weight_standardize", "scaled_act", "se_gate_residual"])
def test_cuda_backend_on_cpu_tensors_is_refused(op):
    x = torch.randn(2, 4, 3, 3)
    call = {"weight_standardize": lambda: nfk.weight_standardize(x), "scaled_act": lambda: nfk.scaled_act(x),
            "se_gate_residual": lambda: nfk.se_gate_residual(x, x)}[op]
    with pytest.raises(RuntimeError, match="backend 'cuda' runs on CUDA tensors"), nfk.use_backend("cuda"):
        call()


@pytest.mark.gpu
def test_bad_dtype_name_is_a_type_error():
    with pytest.raises(TypeError, match="dtype"):
        _C.agc(0, 0, 0, 1, "int8", 0.01, 1e-3, 0, 0)


def _metadata(tensors):
    return [(tuple(t.shape), t.stride(), t.dtype) for t in tensors]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cuda_ops_allocate_like_the_triton_ops(channels_last):
    """The *_cuda ops' fake implementations (their bodies with the _C call skipped) give the
    outputs the Triton ops give: same shapes, strides and dtypes, forward and backward. Runs on
    CPU: only metadata is produced."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.nfkernels
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with FakeTensorMode():
        w = torch.empty(8, 4, 3, 3).contiguous(memory_format=fmt)
        gain = torch.empty(8, 1, 1, 1)
        outs = [op(w, gain, 1.0, 1e-5, False, torch.bfloat16)
                for op in (ops.weight_standardize_fwd, ops.weight_standardize_fwd_cuda)]
        assert _metadata(outs[0]) == _metadata(outs[1])
        _, mean, s0, q = outs[1]
        dout = torch.empty(8, 4, 3, 3, dtype=torch.bfloat16)
        grads = [op(dout, w, gain, mean, s0, q) for op in (ops.weight_standardize_bwd, ops.weight_standardize_bwd_cuda)]
        assert _metadata(grads[0]) == _metadata(grads[1])

        x = torch.empty(2, 6, 5, 7, dtype=torch.float16).contiguous(memory_format=fmt)
        bias = torch.empty(6)
        ys = [op(x, bias, "gelu", 1.7) for op in (ops.scaled_act_fwd, ops.scaled_act_fwd_cuda)]
        assert _metadata([ys[0]]) == _metadata([ys[1]])
        grads = [op(torch.empty_like(x), x, bias, "gelu", 1.7, True)
                 for op in (ops.scaled_act_bwd, ops.scaled_act_bwd_cuda)]
        assert _metadata(grads[0]) == _metadata(grads[1])

        h = torch.empty(2, 6, 5, 7).contiguous(memory_format=fmt)
        w1, w2 = torch.empty(3, 6, 1, 1), torch.empty(6, 3, 1, 1)
        args = (h, torch.empty_like(h), w1, torch.empty(3), w2, torch.empty(6), bias, bias, torch.empty(()),
                torch.empty(2), 0.2, 2.0)
        outs = [op(*args) for op in (ops.se_gate_residual_fwd, ops.se_gate_residual_fwd_cuda)]
        assert _metadata(outs[0]) == _metadata(outs[1])
        _, pool, hidden, gate = outs[1]
        bargs = (torch.empty_like(h), h, w1, w2, bias, torch.empty(()), torch.empty(2), pool, hidden, gate, 0.2, 2.0)
        grads = [op(*bargs) for op in (ops.se_gate_residual_bwd, ops.se_gate_residual_bwd_cuda)]
        assert _metadata(grads[0]) == _metadata(grads[1])
