"""Shared test utilities: devices, backends, tolerances (docs/design.md §6)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nfkernels import _backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def backends_for(supported=("torch", "triton", "cuda")) -> list[str]:
    """Backends that can run here: torch always, triton compiled or interpreted, cuda on a GPU."""
    out = ["torch"]
    if "triton" in supported and (ON_GPU or _backend.triton_interpreting()):
        out.append("triton")
    if "cuda" in supported and ON_GPU and _backend.cuda_extension_usable():
        out.append("cuda")
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf so it can never pass."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    assert out64.shape == ref64.shape, (out64.shape, ref64.shape)
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


# Relative-error bounds for a kernel against independent float64 math.
TOL = {torch.float64: 1e-6, torch.float32: 2e-5}
TORCH_FP64_TOL = 1e-10


def tolerance(dtype: torch.dtype, backend: str, plain_torch_err: float | None = None) -> float:
    """fp64/fp32: fixed bounds; fp16/bf16: twice plain PyTorch's own error in that dtype + atol."""
    if dtype == torch.float64:
        return TORCH_FP64_TOL if backend == "torch" else TOL[dtype]
    if dtype == torch.float32:
        return TOL[dtype]
    assert plain_torch_err is not None, "low precision needs plain PyTorch's error to compare with"
    return 2.0 * plain_torch_err + 2e-3


def assert_close(out, ref, tol, what=""):
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


REFERENCE_DATA_DIR = Path(__file__).resolve().parent / "data"


def reference_data_path(name: str = "timm_nfnet_tiny.pt") -> Path:
    """timm's numbers for small NFNets (docs/design.md §6), shipped in tests/data/ with the script
    that makes and checks them. Missing data fails the tests that need it rather than skipping them."""
    path = REFERENCE_DATA_DIR / name
    if not path.exists():
        pytest.fail(f"reference data {path} is missing: it ships with the repository (tests/data/README.md)")
    return path


def nfnet_with_live_branches(config, dtype=torch.float32, num_classes: int = 10):
    """An NFNet of ``config`` on DEVICE (seeded), with SkipInit gains and biases drawn from
    N(0, 0.5²): at their zero init they would hide most of the network from a comparison."""
    from nfkernels.models import NFNet

    torch.manual_seed(0)
    model = NFNet(config, num_classes=num_classes).to(DEVICE, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skipinit_gain") or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model
