"""How nfkernels installs: `pip install .` anywhere (pyproject.toml names what the build needs),
triton optional, the metadata users look for, and the README's commands building only once."""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import nfkernels

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_isolated_builds_get_what_setup_py_needs():
    """pip builds in an isolated environment: without these, `pip install .` fails where nvcc exists."""
    requires = " ".join(PYPROJECT["build-system"]["requires"])
    for tool in ("setuptools", "pybind11", "cmake", "ninja"):
        assert tool in requires
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"


def test_triton_is_not_a_hard_requirement():
    """Triton has Linux wheels only, and torch's CUDA builds pin their own: an unconditional
    requirement would make nfkernels uninstallable on macOS/Windows and could fight torch's pin."""
    project = PYPROJECT["project"]
    assert not any(req.replace(" ", "").startswith("triton") for req in project["dependencies"])
    assert [r for r in project["optional-dependencies"]["triton"] if r.startswith("triton")]
    assert nfkernels.__version__ == project["version"]


def build_wheel(tmp_path: Path, *extra: str, env=None) -> Path:
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-w", str(out), "-q", *extra],
                   check=True, env=env, capture_output=True, text=True, timeout=900)
    (wheel,) = out.glob("nfkernels-*.whl")
    return wheel


def test_a_pure_python_wheel_carries_the_metadata_users_look_for(tmp_path):
    env = {**os.environ, "NFK_BUILD_CUDA": "0"}
    wheel = build_wheel(tmp_path, "--no-build-isolation", env=env)
    assert wheel.name.endswith("-py3-none-any.whl")  # no CUDA extension: installable anywhere
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "nfkernels/py.typed" in names and "nfkernels/ops/_triton.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: BSD-3-Clause" in metadata and "Project-URL: Paper" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: triton")]
    assert requires and all('extra == "triton"' in line for line in requires), requires
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc: the CUDA extension is built only where it exists")
def test_pip_install_dot_builds_the_extension_in_an_isolated_environment(tmp_path):
    """What a user's `pip install .` does where nvcc exists (about 3 minutes: every kernel)."""
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        assert any(n.startswith("nfkernels/_C") and n.endswith(".so") for n in archive.namelist())


def _install_time() -> float:
    dist = importlib.metadata.distribution("nfkernels")
    return Path(dist._path).stat().st_mtime_ns  # the .dist-info folder pip rewrites on every install


def test_setup_env_installs_nfkernels_once(tmp_path):
    """The README's commands source .ci/setup-env.sh; with nothing changed it must not reinstall
    (before, every run reinstalled and recompiled the CUDA extension: a minute or more)."""
    env = {**os.environ, "NFK_VENV": "none", "PYTHON": sys.executable}
    run = ["bash", "-c", f"source {REPO / '.ci' / 'setup-env.sh'} && echo \"$NFK_PYTHON\""]
    first = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    assert Path(first.stdout.strip()).resolve() == Path(sys.executable).resolve()
    installed = _install_time()
    second = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr
    assert "installing" not in second.stderr, second.stderr
    assert _install_time() == installed, "the second run reinstalled nfkernels"
