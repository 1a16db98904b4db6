"""The compiled extension nfkernels._C: it imports without a GPU, lists its functions, links
no libtorch and only the static CUDA runtime, and a call without a device raises a clear
RuntimeError. (Its numerics are checked on a GPU by test_agc.py, test_sgd_agc.py,
test_weight_standardize.py, test_scaled_act.py and test_se_gate.py, whose cases include the
"cuda" backend there.)"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

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
             "se_gate_fwd", "se_gate_bwd_reduce", "se_gate_bwd", "se_reduce_splits"}


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
        _C.agc(0, 0, 0, 0, 1, 0, 128, "float32", "float32", 0.01, 1e-3, 0, 0)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _C.sgd_agc(0, 0, 0, 0, 0, 1, 0, 128, "float32", "bfloat16", 0.1, 0.9, 0.0, 0.01, 1e-3, True, True, True, 0, 0)
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
    # min_blocks 1: one split (se_reduce_splits), so no workspace is needed.
    "se_pool": (0, 0, 0, 0, 1, 1, 2, 8, 49, True, "bfloat16", "", 0, 0),
    "se_gate_fwd": (0, 0, 0, 0, 0, "", 0.4, 0, 0, 0, 2, 8, 49, False, "float64", "float64", "", 0, 0),
    "se_gate_bwd_reduce": (0, 0, 0, 0, 0, 0, "", 0.4, 0, 0, 1, 1, 2, 8, 49, False, "float32", "float32", 0, 0),
    "se_gate_bwd": (0, 0, 0, 0, "", 0.4, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 8, 49, True, "float32", 0, 0),
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
    assert _C.scaled_act_bwd_workspace(6, 49, 3, True, "float32") == 0  # one block per channel block: no partials
    # 96×96 maps of 16 channels, batch 32: a block per (channel, sample), partial sums and counters
    assert _C.scaled_act_bwd_workspace(32 * 16, 9216, 16, True, "bfloat16") == 32 * 16 + 16
    # The SE reductions split HW only where the batch and channels give too few blocks; a launch
    # must be handed its plan's split count (its workspace is sized by it).
    assert _C.se_reduce_splits(32, 256, 2304, True, "bfloat16", 264) > 1
    assert _C.se_reduce_splits(32, 256, 2304, False, "bfloat16", 264) == 1
    assert _C.se_reduce_splits(2, 8, 49, True, "bfloat16", 1) == 1
    with pytest.raises(ValueError, match="are not se_reduce_splits"):
        _C.se_pool(0, 0, 0, 0, 1, 2, 2, 8, 49, True, "bfloat16", "", 0, 0)
    splits = _C.se_reduce_splits(32, 256, 2304, True, "bfloat16", 264)
    with pytest.raises(ValueError, match="need a workspace"):
        _C.se_pool(0, 0, 0, 0, 264, splits, 32, 256, 2304, True, "bfloat16", "", 0, 0)
    with pytest.raises(ValueError, match="min_blocks must be at least 1"):
        _C.se_reduce_splits(2, 8, 49, True, "bfloat16", 0)


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
        _C.agc(0, 0, 0, 0, 1, 0, 128, "int8", "float32", 0.01, 1e-3, 0, 0)


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
        w1, w2, eca = torch.empty(3, 6, 1, 1), torch.empty(6, 3, 1, 1), torch.empty(1, 1, 5)
        for se, eca_weight in (((w1, torch.empty(3), w2, torch.empty(6)), None), ((None,) * 4, eca)):  # SE, ECA
            args = (h, torch.empty_like(h), *se, eca_weight, bias, bias, torch.empty(()), torch.empty(2), 0.2, 2.0)
            outs = [op(*args) for op in (ops.se_gate_residual_fwd, ops.se_gate_residual_fwd_cuda)]
            assert _metadata(outs[0]) == _metadata(outs[1])
            _, pool, hidden, logits = outs[1]
            bargs = (torch.empty_like(h), h, se[0], se[2], eca_weight, bias, torch.empty(()), torch.empty(2), pool,
                     hidden, logits, 0.2, 2.0)
            grads = [op(*bargs) for op in (ops.se_gate_residual_bwd, ops.se_gate_residual_bwd_cuda)]
            assert _metadata(grads[0]) == _metadata(grads[1])


# ----------------------------------------------------------------------- bindings on a fake runtime
# python/bindings.cpp compiled against a stand-in CUDA runtime and stand-in kernels, so that
# its device handling and GIL handling run on a machine without a GPU. The stand-ins record
# the current device and whether the GIL was held when a kernel "launched"; the test drives
# and reads them through ctypes.

FAKE_RUNTIME = r"""
#include <Python.h>

#include "nfkernels.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {
int device_count = 0;
thread_local int current_device = 0;  // the runtime's current device is per thread
int set_device_calls = 0;
int gil_held_at_launch = -1;
int launch_device = -1;
bool fail_launches = false;

cudaError_t launch() {
  gil_held_at_launch = PyGILState_Check();
  launch_device = current_device;
  return fail_launches ? cudaErrorInvalidValue : cudaSuccess;
}
}  // namespace

extern "C" {
cudaError_t cudaGetDeviceCount(int* count) {
  *count = device_count;
  return device_count > 0 ? cudaSuccess : cudaErrorNoDevice;
}
cudaError_t cudaGetDevice(int* device) { *device = current_device; return cudaSuccess; }
cudaError_t cudaSetDevice(int device) {
  ++set_device_calls;
  if (device < 0 || device >= device_count) return cudaErrorInvalidDevice;
  current_device = device;
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "fake CUDA error"; }
cudaError_t cudaRuntimeGetVersion(int* version) { *version = 13000; return cudaSuccess; }
}

EXPORT void fake_reset(int count, int current, int fail) {
  device_count = count;
  current_device = current;
  set_device_calls = 0;
  gil_held_at_launch = -1;
  launch_device = -1;
  fail_launches = fail != 0;
}
EXPORT int fake_current_device() { return current_device; }
EXPORT int fake_set_device_calls() { return set_device_calls; }
EXPORT int fake_gil_held_at_launch() { return gil_held_at_launch; }
EXPORT int fake_launch_device() { return launch_device; }

namespace nfk {
cudaError_t agc(DType, DType, void*, const void*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, double,
                double, cudaStream_t) {
  return launch();
}
cudaError_t sgd_agc(DType, DType, void*, const void*, void*, const int64_t*, const int64_t*, int64_t, int64_t,
                    int64_t, const SgdAgcOptions&, cudaStream_t) {
  return launch();
}
cudaError_t weight_standardize_fwd(DType, DType, const void*, const void*, void*, void*, void*, void*, int64_t,
                                   int64_t, double, double, bool, cudaStream_t) { return launch(); }
cudaError_t weight_standardize_bwd(DType, DType, const void*, const void*, const void*, const void*, const void*,
                                   const void*, void*, void*, int64_t, int64_t, cudaStream_t) { return launch(); }
cudaError_t scaled_act_fwd(DType, Activation, const void*, ChannelParam, void*, const MatrixView&, double,
                           cudaStream_t) { return launch(); }
int64_t scaled_act_bwd_workspace(DType, const MatrixView& view) { return view.rows; }
cudaError_t scaled_act_bwd(DType, Activation, const void*, const void*, ChannelParam, void*, void*, void*,
                           const MatrixView&, double, cudaStream_t) { return launch(); }
int64_t se_reduce_splits(DType, const SeShape&, int64_t min_blocks) { return min_blocks > 1 ? 2 : 1; }
cudaError_t se_pool(DType, const void*, ChannelParam, void*, void*, int64_t, int64_t, const SeShape&, cudaStream_t) {
  return launch();
}
cudaError_t se_gate_fwd(DType, const void*, const void*, const SeGate&, ChannelParam, ChannelParam, void*,
                        const SeShape&, cudaStream_t) { return launch(); }
cudaError_t se_gate_bwd_reduce(DType, const void*, const void*, ChannelParam, const SeGate&, const SeGradSums&,
                               int64_t, const SeShape&, cudaStream_t) { return launch(); }
cudaError_t se_gate_bwd(DType, const void*, const SeGate&, const SeGradSums&, const void*, const void*, int64_t, void*,
                        void*, void*, void*, void*, void*, const SeShape&, cudaStream_t) { return launch(); }
}  // namespace nfk
"""

ROOT = Path(__file__).resolve().parents[1]


def _cuda_include_dir() -> Path | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").is_file()),
                None)


@pytest.fixture(scope="module")
def fake_bindings(tmp_path_factory):
    """(module, control): python/bindings.cpp linked against FAKE_RUNTIME, and ctypes access to
    the fake's state."""
    import ctypes
    import importlib.util
    import sysconfig

    import pybind11

    compiler = shutil.which("c++") or shutil.which("g++")
    cuda_include = _cuda_include_dir()
    if compiler is None or cuda_include is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (set CUDA_HOME) to build the bindings on a fake runtime")
    build = tmp_path_factory.mktemp("fake_bindings")
    (build / "fake_runtime.cpp").write_text(FAKE_RUNTIME)
    target = build / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    # -Bsymbolic: the bindings must call these stand-ins even where torch has loaded the real
    # libcudart with global symbols.
    subprocess.run(
        [compiler, "-std=c++17", "-O0", "-shared", "-fPIC", "-fvisibility=hidden", "-Wl,-Bsymbolic",
         f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}",
         f"-I{cuda_include}", str(ROOT / "python" / "bindings.cpp"), str(build / "fake_runtime.cpp"),
         "-o", str(target)],
        check=True, capture_output=True, text=True)
    spec = importlib.util.spec_from_file_location("_C", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, ctypes.CDLL(str(target))


LAUNCHES = {
    **CALLS,
    "agc": (0, 0, 0, 0, 1, 0, 128, "bfloat16", "float32", 0.01, 1e-3, 0, 0),
    "sgd_agc": (0, 0, 0, 0, 0, 1, 0, 128, "float32", "bfloat16", 0.1, 0.9, 0.0, 0.01, 1e-3, True, True, True, 0, 0),
}


def _on_device(args, device):
    return (*args[:-2], device, args[-1])  # every launch ends with (device, stream)


def test_every_launching_binding_is_checked_on_the_fake_runtime(fake_bindings):
    module, _ = fake_bindings
    launching = {name for name in dir(module) if re.search(r"\bstream\b", getattr(module, name).__doc__ or "")}
    assert launching == set(LAUNCHES)


@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_launch_releases_the_gil(fake_bindings, name):
    module, fake = fake_bindings
    fake.fake_reset(1, 0, 0)
    getattr(module, name)(*LAUNCHES[name])
    assert fake.fake_gil_held_at_launch() == 0, f"nfkernels._C.{name} holds the GIL while it launches"


@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_launch_on_another_device_restores_the_current_device(fake_bindings, name):
    module, fake = fake_bindings
    fake.fake_reset(2, 0, 0)
    getattr(module, name)(*_on_device(LAUNCHES[name], 1))
    assert fake.fake_launch_device() == 1
    assert fake.fake_current_device() == 0, f"nfkernels._C.{name} on device 1 left device 1 current"
    fake.fake_reset(2, 0, 1)  # the kernel fails: the error propagates and the device is restored
    with pytest.raises(RuntimeError, match=f"nfkernels._C.{name}: CUDA error: fake CUDA error"):
        getattr(module, name)(*_on_device(LAUNCHES[name], 1))
    assert fake.fake_current_device() == 0
    fake.fake_reset(2, 1, 0)  # already current: no switch at all
    getattr(module, name)(*_on_device(LAUNCHES[name], 1))
    assert fake.fake_launch_device() == 1 and fake.fake_set_device_calls() == 0


def test_fake_runtime_without_device_raises_clear_error(fake_bindings):
    module, fake = fake_bindings
    fake.fake_reset(0, 0, 0)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        module.agc(*LAUNCHES["agc"])
    fake.fake_reset(2, 0, 0)
    with pytest.raises(ValueError, match="device index 2 out of range"):
        module.agc(*_on_device(LAUNCHES["agc"], 2))
    assert fake.fake_current_device() == 0 and fake.fake_launch_device() == -1


# ------------------------------------------------------------------------------- on real GPUs


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (an op on cuda:1, cuda:0 current)")
def test_op_on_second_gpu_keeps_the_current_device():
    torch.cuda.set_device(0)
    x = torch.randn(2, 6, 5, 7, device="cuda:1")
    p = torch.nn.Parameter(torch.randn(8, 4, 3, 3, device="cuda:1"))
    p.grad = torch.randn_like(p) * 10  # large enough that every unit is clipped
    grad = p.grad.clone()
    with nfk.use_backend("cuda"):
        y = nfk.scaled_act(x)
        assert torch.cuda.current_device() == 0, "a CUDA-backend op on cuda:1 changed the current device"
        nfk.agc_([p])
        assert torch.cuda.current_device() == 0, "a CUDA-backend op on cuda:1 changed the current device"
    torch.cuda.synchronize(1)
    with nfk.use_backend("torch"):
        torch.testing.assert_close(y, nfk.scaled_act(x))
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = grad
        nfk.agc_([q])
    torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.gpu
def test_launches_from_threads_give_the_right_results():
    """Launches release the GIL, so several Python threads launch at once: each gets its own
    result."""
    from concurrent.futures import ThreadPoolExecutor

    xs = [torch.randn(4, 16, 9, 9, device="cuda") for _ in range(8)]

    def run(x):
        with nfk.use_backend("cuda"):
            return [nfk.scaled_act(x, act="silu") for _ in range(20)][-1]

    with ThreadPoolExecutor(4) as pool:
        ys = list(pool.map(run, xs))
    torch.cuda.synchronize()
    with nfk.use_backend("torch"):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(y, nfk.scaled_act(x, act="silu"))
