"""The main job (python -m bench) runs its CPU fallback end to end and writes its tables."""
import json

import pytest
import torch

from bench import __main__ as bench_main
from bench.common import RESULTS_DIR, device_slug


def test_main_job_runs_and_writes_results():
    assert bench_main.main(["--quick"]) == 0
    slug = device_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    for name in ("weight_standardize", "scaled_act_nchw", "se_gate_nchw"):
        result = json.loads((RESULTS_DIR / f"{name}_{slug}.json").read_text())
        providers = {row["provider"] for row in result["rows"]}
        assert "eager" in providers and any(p.startswith("nfkernels ") for p in providers)
        assert all(row["ms"] > 0 and row["GB/s"] > 0 for row in result["rows"])
        assert (RESULTS_DIR / f"{name}_{slug}.md").exists()
    step = json.loads((RESULTS_DIR / f"train_step_tiny_nchw_{slug}.json").read_text())
    losses = {row["provider"]: row["loss_step0"] for row in step["rows"]}
    assert losses["nfkernels"] == pytest.approx(losses["reference"], rel=1e-5)  # same weights, same batch
