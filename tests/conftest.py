"""Test set-up. On a machine without CUDA, Triton kernels run in Triton's CPU interpreter; the
variable must be set before triton is first imported, hence here, before nfkernels loads."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every buffer a kernel allocates starts as NaN, so an unwritten element fails its comparison.
os.environ["NFK_POISON"] = "1"

import pytest  # noqa: E402

import nfkernels  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped with a reason elsewhere)")
    config.addinivalue_line("markers", "slow: heavy case, run on the GPU machine or with --runslow")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow on CPU too")


def pytest_collection_modifyitems(config, items):
    on_gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slow" in item.keywords and not (on_gpu or config.getoption("--runslow")):
            item.add_marker(pytest.mark.skip(reason="heavy case: runs on a CUDA GPU or with --runslow"))


@pytest.fixture(autouse=True)
def _fresh_backend():
    """Each test starts on "auto" and leaves no backend behind."""
    nfkernels.set_backend("auto")
    yield
    nfkernels.set_backend("auto")


class LaunchCounter:
    """Stands in for a @triton.jit kernel and counts its launches (kernel[grid](...) calls)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.count = 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.count += 1
            return launch(*args, **kwargs)

        return counted


@pytest.fixture
def count_launches(monkeypatch):
    """count_launches(module, "kernel_name") -> LaunchCounter installed in place of the kernel."""

    def install(module, name):
        counter = LaunchCounter(getattr(module, name))
        monkeypatch.setattr(module, name, counter)
        return counter

    return install
