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

# Hypothesis profiles for the property suites (tests/test_properties_*.py). "ci" is the default:
# 60 examples per test (the suite takes about 1.5 minutes on 2 CPU cores under the Triton
# interpreter), derandomized (the same examples every run, so CI is reproducible and a failure
# prints its @reproduce_failure blob), no example database, no explain phase. "thorough" draws
# 400 random examples per test: `pytest --hypothesis-profile=thorough tests/test_properties_*.py`
# or NFK_HYPOTHESIS_PROFILE=thorough. NFK_HYPOTHESIS_EXAMPLES=n overrides either budget.
# Hypothesis keeps its example database and failure patches in $HYPOTHESIS_STORAGE_DIRECTORY,
# by default in the system temp folder, not in a .hypothesis/ folder of the working tree.
try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # only the property suites need hypothesis (.ci/setup-env.sh installs it)
    settings = None
if settings is not None:
    import tempfile

    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "nfkernels-hypothesis"))
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    _examples = os.environ.get("NFK_HYPOTHESIS_EXAMPLES")
    settings.register_profile(
        "ci", max_examples=int(_examples or 60), deadline=None, derandomize=True, database=None,
        print_blob=True, suppress_health_check=_slow_ok,
        phases=[p for p in Phase if p is not Phase.explain],  # explaining a failure costs many runs
    )
    settings.register_profile(
        "thorough", max_examples=int(_examples or 400), deadline=None, print_blob=True,
        suppress_health_check=_slow_ok,
    )
    settings.load_profile(os.environ.get("NFK_HYPOTHESIS_PROFILE", "ci"))


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
