"""Backend selection: set_backend, use_backend, NFK_BACKEND, and the errors of unavailable ones."""
import os
import subprocess
import sys

import pytest
import torch

import nfkernels as nfk
from nfkernels import _backend


def test_set_and_use_backend_nest_and_restore():
    assert nfk.get_backend() == "auto"
    nfk.set_backend("torch")
    assert nfk.get_backend() == "torch"
    with nfk.use_backend("triton"):
        assert nfk.get_backend() == "triton"
        with nfk.use_backend("CUDA "):  # case and surrounding blanks are forgiven
            assert nfk.get_backend() == "cuda"
        assert nfk.get_backend() == "triton"
    assert nfk.get_backend() == "torch"


def test_invalid_names_raise():
    with pytest.raises(ValueError, match="backend must be one of"):
        nfk.set_backend("jax")
    with pytest.raises(TypeError, match="backend must be a str"):
        nfk.set_backend(None)
    with pytest.raises(ValueError, match="backend must be one of"):
        with nfk.use_backend("tpu"):
            pass


def test_auto_is_torch_on_cpu_and_triton_on_cuda():
    assert _backend.resolve("op", torch.device("cpu")) == "torch"
    assert _backend.resolve("op", torch.device("cuda")) == "triton"
    assert _backend.resolve("op", torch.device("cuda"), supported=("torch",)) == "torch"


def test_explicit_backends_that_cannot_run_raise(monkeypatch):
    monkeypatch.setattr(_backend, "triton_interpreting", lambda: False)
    with nfk.use_backend("triton"), pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        nfk.weight_standardize(torch.randn(4, 3))
    with nfk.use_backend("cuda"), pytest.raises(RuntimeError, match="has no implementation of this op"):
        _backend.resolve("op", torch.device("cpu"), supported=("torch", "triton"))
    with nfk.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' runs on CUDA tensors"):
        nfk.weight_standardize(torch.randn(4, 3))
    monkeypatch.setattr(_backend, "cuda_extension", lambda: None)
    with nfk.use_backend("cuda"), pytest.raises(RuntimeError, match="nfkernels._C"):
        _backend.resolve("agc_", torch.device("cpu"), supported=("torch", "triton", "cuda"))


def test_environment_variable_sets_the_default():
    code = "import nfkernels as n; print(n.get_backend())"
    env = {**os.environ, "NFK_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"


def test_invalid_environment_variable_warns_at_import_and_raises_where_an_op_runs():
    """An invalid NFK_BACKEND must neither break ``import nfkernels`` nor be ignored silently."""
    code = """
import warnings
warnings.simplefilter("error", RuntimeWarning)
try:
    import nfkernels
except RuntimeWarning as warning:
    print("WARNED:", warning)
warnings.resetwarnings()
import torch
import nfkernels as nfk
try:
    nfk.weight_standardize(torch.randn(4, 3, 3, 3), torch.ones(4, 1, 1, 1))
except ValueError as error:
    print("RAISED:", error)
nfk.set_backend("torch")
print("OVERRIDDEN:", nfk.weight_standardize(torch.randn(4, 3, 3, 3), torch.ones(4, 1, 1, 1)).shape)
"""
    env = {**os.environ, "NFK_BACKEND": "nonsense"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.strip().splitlines())
    for key in ("WARNED", "RAISED"):
        assert "NFK_BACKEND='nonsense'" in lines[key] and "expected one of" in lines[key], lines
    assert lines["OVERRIDDEN"] == "torch.Size([4, 3, 3, 3])"


# ----------------------------------------------------------------------------- "auto" on CUDA


class FakeExtension:
    """Stands in for nfkernels._C: its CUDA runtime sees `devices` GPUs."""

    def __init__(self, devices: int):
        self.devices = devices

    def device_count(self) -> int:
        return self.devices

    def cuda_runtime_version(self) -> int:
        return 13000


@pytest.fixture
def fake_gpu(monkeypatch):
    """resolve() as on a machine with a GPU called "NVIDIA H100 80GB HBM3" and the extension."""
    from nfkernels import _autotable

    extension = FakeExtension(1)
    monkeypatch.setattr(_backend, "cuda_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(_backend, "cuda_extension", lambda: extension)
    monkeypatch.setattr(_autotable, "TABLE", {
        "": {"scaled_act": "triton", "weight_standardize": "triton"},
        "NVIDIA H100": {"scaled_act": "cuda"},
        "NVIDIA H100 80GB": {"weight_standardize": "cuda", "scaled_act": "triton"},
        "NVIDIA A100": {"se_gate_residual": "cuda"},
    })
    return monkeypatch


ALL = ("torch", "triton", "cuda")


def test_auto_follows_the_table_longest_prefix_first(fake_gpu):
    cuda = torch.device("cuda", 0)
    assert _backend.resolve("weight_standardize", cuda, supported=ALL) == "cuda"  # "NVIDIA H100 80GB"
    assert _backend.resolve("scaled_act", cuda, supported=ALL) == "triton"  # the longer prefix wins
    assert _backend.resolve("se_gate_residual", cuda, supported=ALL) == "triton"  # A100's entry: no match
    assert _backend.resolve("agc_", cuda, supported=ALL) == "triton"  # no entry anywhere: the default
    assert _backend.resolve("weight_standardize", torch.device("cpu"), supported=ALL) == "torch"
    fake_gpu.setattr(_backend, "cuda_device_name", lambda device: "nvidia h100 PCIe")  # case-insensitive
    assert _backend.resolve("scaled_act", cuda, supported=ALL) == "cuda"


def test_auto_needs_the_backend_it_picks(fake_gpu):
    cuda = torch.device("cuda", 0)
    assert _backend.resolve("weight_standardize", cuda, supported=("torch", "triton")) == "triton"
    fake_gpu.setattr(_backend, "cuda_extension", lambda: None)
    assert _backend.resolve("weight_standardize", cuda, supported=ALL) == "triton"
    fake_gpu.setattr(_backend, "cuda_extension", lambda: FakeExtension(1))
    fake_gpu.setattr(_backend, "triton_available", lambda: False)
    assert _backend.resolve("agc_", cuda, supported=ALL) == "cuda"  # the only kernels there are
    assert _backend.resolve("agc_", cuda, supported=("torch", "triton")) == "torch"


def test_auto_skips_an_extension_whose_runtime_sees_no_gpu(fake_gpu):
    """torch sees a GPU but the extension's CUDA runtime does not (a driver older than that
    runtime needs): "auto" must not pick kernels that cannot launch."""
    cuda = torch.device("cuda", 0)
    blind = FakeExtension(0)
    fake_gpu.setattr(_backend, "cuda_extension", lambda: blind)
    assert _backend.resolve("weight_standardize", cuda, supported=ALL) == "triton"  # the table says cuda
    fake_gpu.setattr(_backend, "triton_available", lambda: False)
    assert _backend.resolve("agc_", cuda, supported=ALL) == "torch"


def test_explicit_cuda_with_a_blind_extension_names_the_cause(fake_gpu):
    fake_gpu.setattr(_backend, "cuda_extension", lambda: FakeExtension(0))
    nfk.set_backend("cuda")
    with pytest.raises(RuntimeError, match=r"CUDA runtime 13\.0.*sees no GPU.*driver"):
        _backend.resolve("agc_", torch.device("cuda", 0), supported=ALL)


def test_extension_device_count_is_asked_once(fake_gpu):
    calls = []

    class Counting(FakeExtension):
        def device_count(self):
            calls.append(1)
            return super().device_count()

    extension = Counting(1)
    fake_gpu.setattr(_backend, "cuda_extension", lambda: extension)
    for _ in range(3):
        assert _backend.resolve("weight_standardize", torch.device("cuda", 0), supported=ALL) == "cuda"
    assert len(calls) == 1


def test_explicit_backend_ignores_the_table(fake_gpu):
    with nfk.use_backend("triton"):
        assert _backend.resolve("weight_standardize", torch.device("cuda", 0), supported=ALL) == "triton"


def test_shipped_table_is_triton_until_measured():
    from nfkernels import _autotable

    assert set(_autotable.TABLE) == {""}
    assert set(_autotable.TABLE[""].values()) == {"triton"}


def test_bench_autotable_picks_the_faster_provider(tmp_path):
    import json

    from bench import autotable

    def result(device, rows):
        return {"meta": {"device": device}, "rows": [
            {"case": case, "provider": provider, "ms": ms} for case, provider, ms in rows]}

    files = {
        "scaled_act_nvidia-h100.json": result("NVIDIA H100 80GB HBM3", [
            ("a fwd", "nfkernels triton", 2.0), ("a fwd", "nfkernels cuda", 1.0),
            ("b fwd", "nfkernels triton", 1.0), ("b fwd", "nfkernels cuda", 1.5), ("b fwd", "eager", 0.1)]),
        "se_gate_nvidia-h100.json": result("NVIDIA H100 80GB HBM3", [
            ("a fwd", "nfkernels triton", 1.0), ("a fwd", "nfkernels cuda", 3.0)]),
        "weight_standardize_nvidia-h100.json": result("NVIDIA H100 80GB HBM3", [
            ("a fwd", "nfkernels triton", 1.0)]),  # no cuda row: not decided
        "scaled_act_cpu.json": result("CPU (x86_64, 2 threads)", [
            ("a fwd", "nfkernels triton", 9.0), ("a fwd", "nfkernels cuda", 1.0)]),
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    table = autotable.build_table(sorted(tmp_path.glob("*.json")))
    assert table["NVIDIA H100 80GB HBM3"] == {"scaled_act": "cuda", "se_gate_residual": "triton"}
    assert set(table) == {"", "NVIDIA H100 80GB HBM3"}
    assert set(table[""].values()) == {"triton"}
    namespace = {}
    exec(autotable.render(table, "test"), namespace)  # the rendered block is the Python it claims
    assert namespace["TABLE"] == table
