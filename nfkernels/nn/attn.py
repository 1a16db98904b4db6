"""SqueezeExcite: timm's SEModule (same parameter names), fused with the NF residual when used
inside NFBlock."""
from __future__ import annotations

import torch
import torch.nn as nn

from nfkernels.functional import se_gate_residual


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of ``divisor``, never below round_limit·v."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class SqueezeExcite(nn.Module):
    """x · sigmoid(fc2(relu(fc1(mean_hw(x))))) with 1×1-conv fc layers (timm SEModule).

    ``rd_channels`` defaults to make_divisible(channels · rd_ratio, rd_divisor, round_limit=0) as in
    timm. Inside NFBlock the gate, the ×attn_gain, SkipInit, stochastic depth and the residual add
    run as one fused op (``se_gate_residual``); used alone, ``forward`` runs the same op with no
    shortcut term.
    """

    def __init__(self, channels: int, rd_ratio: float = 1 / 16, rd_channels: int | None = None, rd_divisor: int = 8):
        super().__init__()
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)

    def gate_residual(self, h, shortcut, *, bias=None, shortcut_bias=None, skip_gain=None, mask=None,
                      alpha=1.0, attn_gain=1.0) -> torch.Tensor:
        """shortcut + shortcut_bias + alpha·skip·mask·attn_gain·SE(h + bias), fused."""
        return se_gate_residual(h, shortcut, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                bias=bias, shortcut_bias=shortcut_bias, skip_gain=skip_gain, mask=mask,
                                alpha=alpha, attn_gain=attn_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_residual(x, None, alpha=1.0, attn_gain=1.0)
