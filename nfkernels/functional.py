"""The public functional API (DESIGN.md §4): validate arguments, pick a backend, call the op."""
from __future__ import annotations

import torch

from nfkernels import _backend
from nfkernels._checks import (
    check_choice,
    check_float,
    check_numel,
    check_optional_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from nfkernels.ops import weight_standardize as _ws

EPS_MODES = ("timm", "deepmind")


def weight_standardize(
    weight: torch.Tensor,
    gain: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    eps: float = 1e-5,
    eps_mode: str = "timm",
) -> torch.Tensor:
    """Scaled Weight Standardization of a conv or linear weight, one unit per output row.

    ``weight`` has shape (O, ...) with N = weight[0].numel() (the fan-in); ``gain`` is optional
    with O elements (timm's shape is (O, 1, 1, 1)). With μ, σ² the per-row mean and biased
    variance::

        eps_mode="timm":      Ŵ = (W − μ) / sqrt(σ² + eps) · gain · gamma / sqrt(N)
        eps_mode="deepmind":  Ŵ = (W − μ) · gain · gamma / sqrt(max(N·σ², eps))

    "timm" matches timm's ScaledStdConv2d (NFNets use eps=1e-5) and is needed for timm weights;
    "deepmind" matches the official JAX code (which uses eps=1e-4). Statistics are computed in
    fp32 (fp64 for fp64 weights); the result has weight's dtype, shape and memory layout.
    Differentiable with respect to weight and gain.
    """
    op = "weight_standardize"
    check_tensor(op, "weight", weight, min_ndim=2)
    check_optional_tensor(op, "gain", gain)
    check_numel(op, "gain", gain, weight.shape[0], "one per output unit, weight.shape[0]")
    check_same_device(op, weight=weight, gain=gain)
    check_same_dtype(op, weight=weight, gain=gain)
    gamma = check_float(op, "gamma", gamma)
    eps = check_float(op, "eps", eps, positive=True)
    deepmind = check_choice(op, "eps_mode", eps_mode, EPS_MODES) == "deepmind"
    backend = _backend.resolve(op, weight.device)
    if weight.numel() == 0:
        return weight.clone()
    if backend == "torch":
        return _ws.weight_standardize_torch(weight, gain, gamma, eps, deepmind)
    return _ws.weight_standardize_triton(weight, gain, gamma, eps, deepmind)
