"""ScaledAct: γ·scale·f(x + b), the NF-scaled activation as a layer (timm GammaAct)."""
from __future__ import annotations

import torch
import torch.nn as nn

from nfkernels.functional import scaled_act
from nfkernels.ops.scaled_act import NF_GAMMA


class ScaledAct(nn.Module):
    """y = gamma · scale · act(x + bias_c), one fused kernel each way.

    ``gamma=None`` takes the activation's NF gain (DeepMind's table, also timm's): it keeps the
    output's variance at 1 for unit-Gaussian inputs. ``scale`` folds a further constant in,
    e.g. the β = 1/expected-std of an NF block. ``forward`` takes an optional per-channel bias so a
    preceding conv's bias is added here instead of by the conv. ``inplace`` is accepted for timm
    compatibility and ignored (the kernel writes a new tensor).
    """

    def __init__(self, act: str = "gelu", gamma: float | None = None, scale: float = 1.0, inplace: bool = False):
        super().__init__()
        if act not in NF_GAMMA:
            raise ValueError(f"ScaledAct: act must be one of {tuple(NF_GAMMA)}; got {act!r}")
        self.act = act
        self.gamma = NF_GAMMA[act] if gamma is None else float(gamma)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return scaled_act(x, bias, act=self.act, gamma=self.gamma, scale=self.scale)

    def extra_repr(self) -> str:
        return f"act={self.act}, gamma={self.gamma}, scale={self.scale}"
