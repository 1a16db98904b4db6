"""timm's reference numbers ship with the repository (tests/data/), and the script that makes and
checks them describes exactly the models in the files."""
import importlib.util
from pathlib import Path

import torch

from nfk_testing import REFERENCE_DATA_DIR, reference_data_path

REPO = Path(__file__).resolve().parents[1]


def load_maker():
    spec = importlib.util.spec_from_file_location("make_timm_reference", REFERENCE_DATA_DIR / "make_timm_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_data_lives_inside_the_checkout_and_is_tracked_by_git():
    import subprocess
    for name in ("timm_nfnet_tiny.pt", "timm_nf_family_tiny.pt"):
        path = reference_data_path(name)
        assert path.resolve().is_relative_to(REPO), path
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path.relative_to(REPO))], cwd=REPO,
                                 capture_output=True, text=True)
        if tracked.returncode == 128 and "not a git repository" in tracked.stderr:
            continue  # an exported tree (sdist, archive): being here is what counts
        assert tracked.returncode == 0, f"{path} is not tracked by git: a fresh clone would lack it"


def _as_lists(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def test_nfnet_tiny_is_the_model_the_script_makes():
    maker = load_maker()
    blob = torch.load(reference_data_path(), weights_only=True)
    assert blob["cfg"] == _as_lists(maker.NFNET_TINY_CFG) and blob["num_classes"] == maker.NUM_CLASSES
    assert [tuple(case["x"].shape) for case in blob["cases"]] == list(maker.NFNET_TINY_INPUTS)
    for case in blob["cases"]:
        assert set(case) == {"x", "labels", "logits", "loss", "grads", "agc_grads"}
        assert set(case["grads"]) == set(case["agc_grads"]) == set(blob["state_dict"])
        assert all(t.dtype == torch.float64 for t in case["grads"].values())
        clipped = [n for n in case["grads"] if not torch.equal(case["grads"][n], case["agc_grads"][n])]
        assert clipped and not any(n.startswith(maker.NOT_CLIPPED) for n in clipped)


def test_family_is_the_models_the_script_makes():
    maker = load_maker()
    family = torch.load(reference_data_path("timm_nf_family_tiny.pt"), weights_only=True)
    assert set(family) == set(maker.FAMILY_SHRINK)
    for name, blob in family.items():
        assert blob["timm_config_of"] == name
        for field, value in maker.FAMILY_SHRINK[name].items():
            assert blob["cfg"][field] == (list(value) if isinstance(value, tuple) else value), (name, field)
        assert blob["params"] == sum(t.numel() for t in blob["state_dict"].values())
        assert [tuple(case["x"].shape) for case in blob["cases"]] == list(maker.FAMILY_INPUTS)
