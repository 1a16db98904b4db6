"""Channel attention with timm's parameter names, fused with the NF residual when used inside
NFBlock: SqueezeExcite (timm SEModule) and EfficientChannelAttention (timm EcaModule)."""
from __future__ import annotations

import math

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


class EfficientChannelAttention(nn.Module):
    """x · sigmoid(conv1d_k(mean_hw(x))): ECA (Wang et al. 2020, arXiv:1910.03151; timm EcaModule).

    The gate of each channel comes from a 1-D convolution (odd length k, zero padding, no bias)
    over the pooled channels. ``kernel_size`` is used as given when ``channels`` is None; with
    ``channels`` k follows timm's rule t = int(|log2(C) + beta| / gamma), k = max(t or t + 1 so
    that it is odd, 3): 3 below 128 channels, 5 below 2048, 7 from 2048 to 8191. The parameter is
    ``conv.weight`` (1, 1, k), as timm's. The pooling and gating are the fused kernels of
    ``se_gate_residual`` (``eca_weight``), with the residual inside NFBlock."""

    def __init__(self, channels: int | None = None, kernel_size: int = 3, gamma: float = 2, beta: float = 1):
        super().__init__()
        if channels is not None:
            t = int(abs(math.log(channels, 2) + beta) / gamma)
            kernel_size = max(t if t % 2 else t + 1, 3)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or not kernel_size % 2:
            raise ValueError(f"EfficientChannelAttention: kernel_size must be an odd int >= 1; got {kernel_size!r}")
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def gate_residual(self, h, shortcut, *, bias=None, shortcut_bias=None, skip_gain=None, mask=None,
                      alpha=1.0, attn_gain=1.0) -> torch.Tensor:
        """shortcut + shortcut_bias + alpha·skip·mask·attn_gain·ECA(h + bias), fused."""
        return se_gate_residual(h, shortcut, eca_weight=self.conv.weight, bias=bias, shortcut_bias=shortcut_bias,
                                skip_gain=skip_gain, mask=mask, alpha=alpha, attn_gain=attn_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_residual(x, None, alpha=1.0, attn_gain=1.0)


ATTN_LAYERS = ("se", "eca")


def create_attn(attn_layer: str | None, channels: int, **kwargs) -> nn.Module | None:
    """The attention module timm's ``get_attn(attn_layer)(channels, **kwargs)`` builds, fused: "se"
    (SqueezeExcite: rd_ratio, rd_channels, rd_divisor) or "eca" (EfficientChannelAttention:
    kernel_size, gamma, beta); None gives None."""
    if attn_layer is None:
        return None
    if attn_layer == "se":
        return SqueezeExcite(channels, **kwargs)
    if attn_layer == "eca":
        return EfficientChannelAttention(channels, **kwargs)
    raise ValueError(f"create_attn: attn_layer must be one of {ATTN_LAYERS} or None; got {attn_layer!r}")
