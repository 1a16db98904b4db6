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
    env["NFK_BACKEND"] = "nonsense"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "NFK_BACKEND" in out.stderr
