"""NFBlock: timm's NormFreeBlock (the NFNet/NF-ResNet bottleneck) built from the fused ops."""
from __future__ import annotations

import torch
import torch.nn as nn

from nfkernels.functional import scaled_act, se_gate_residual
from nfkernels.nn.attn import ATTN_LAYERS, create_attn, make_divisible
from nfkernels.nn.conv import WSConv2d
from nfkernels.ops.scaled_act import NF_GAMMA


class DownsampleAvg(nn.Module):
    """Shortcut projection: 2×2 average pool (ceil mode, padding not counted) when strided, then
    a 1×1 WSConv2d (timm DownsampleAvg; dilated variants are not supported)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, **conv_kw):
        super().__init__()
        self.pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        self.conv = WSConv2d(in_chs, out_chs, 1, stride=1, **conv_kw)

    @classmethod
    def from_parts(cls, pool: nn.Module, conv: WSConv2d) -> "DownsampleAvg":
        """A DownsampleAvg around existing modules (e.g. those of a converted timm block)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.pool, module.conv = pool, conv
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class NFBlock(nn.Module):
    """Normalizer-free pre-activation bottleneck (Brock et al. 2021, §4; timm NormFreeBlock).

        h   = act(x) · β                      (γ·β folded into one scaled activation)
        sc  = x, or DownsampleAvg(h)
        out = conv2b(act(conv2(act(conv1(h)))))          (conv2b only with extra_conv)
        out = attn_gain · attn(out)                      (reg=True: attention after the 3×3 convs)
        out = conv3(act(out))
        y   = sc + α · skipinit_gain · drop_path(attn_gain · attn_last(out))   (reg=False)

    Each conv's bias is added inside the next fused kernel (activation, or the attention gate for
    conv2/conv2b with reg and for conv3 and the downsample conv), and the gate, ×attn_gain,
    SkipInit, stochastic depth and the residual add are one kernel. ``attn_layer`` is "se"
    (SqueezeExcite), "eca" (EfficientChannelAttention) or None; ``attn_kwargs`` go to it. With
    ``reg`` (timm's NF-RegNets) the bottleneck width comes from ``in_chs`` instead of ``out_chs``
    and the attention gates the 3×3 output (fused, without a residual) instead of conv3's.
    Parameter names and shapes equal timm's NormFreeBlock, so timm state dicts load with strict=True.

    ``act``/``gamma``: activation name and the gain applied in the activation (None takes the NF
    table value; timm's ``gamma_in_act=True`` models, dm_nfnet); ``conv_gamma``: the gain folded
    into every conv's weight standardization instead (timm's other NF models: gamma=1 in the
    activation, conv_gamma the table value). ``same_padding`` uses TF-style SAME convs (timm's
    ScaledStdConv2dSame, as in dm_nfnet); ``drop_path_scale_by_keep`` scales kept samples by
    1/keep_prob like timm (DeepMind's JAX code does not).
    """

    def __init__(self, in_chs: int, out_chs: int | None = None, stride: int = 1, alpha: float = 1.0,
                 beta: float = 1.0, bottle_ratio: float = 0.25, group_size: int | None = None, ch_div: int = 1,
                 reg: bool = False, extra_conv: bool = False, skipinit: bool = False, attn_layer: str | None = None,
                 attn_kwargs: dict | None = None, attn_gain: float = 2.0, act: str = "gelu",
                 gamma: float | None = None, conv_gamma: float = 1.0, same_padding: bool = False, eps: float = 1e-5,
                 eps_mode: str = "timm", drop_path_rate: float = 0.0, drop_path_scale_by_keep: bool = True):
        super().__init__()
        out_chs = out_chs or in_chs
        if attn_layer is not None and attn_layer not in ATTN_LAYERS:
            raise ValueError(f"NFBlock: attn_layer must be one of {ATTN_LAYERS} or None; got {attn_layer!r}")
        _check_act_and_rate(act, drop_path_rate)
        mid_chs = make_divisible((in_chs if reg else out_chs) * bottle_ratio, ch_div)
        groups = 1 if not group_size else mid_chs // group_size
        if group_size and group_size % ch_div == 0:
            mid_chs = group_size * groups
        self._set_scalars(alpha, beta, attn_gain, act, NF_GAMMA[act] if gamma is None else gamma, drop_path_rate,
                          drop_path_scale_by_keep)
        conv_kw = dict(eps=eps, eps_mode=eps_mode, padding="same" if same_padding else None, gamma=conv_gamma)

        self.downsample = DownsampleAvg(in_chs, out_chs, stride, **conv_kw) if (in_chs != out_chs or stride != 1) else None
        self.conv1 = WSConv2d(in_chs, mid_chs, 1, **conv_kw)
        self.conv2 = WSConv2d(mid_chs, mid_chs, 3, stride=stride, groups=groups, **conv_kw)
        self.conv2b = WSConv2d(mid_chs, mid_chs, 3, groups=groups, **conv_kw) if extra_conv else None
        self.attn = create_attn(attn_layer, mid_chs, **(attn_kwargs or {})) if reg else None
        self.conv3 = WSConv2d(mid_chs, out_chs, 1, gain_init=1.0 if skipinit else 0.0, **conv_kw)
        self.attn_last = None if reg else create_attn(attn_layer, out_chs, **(attn_kwargs or {}))
        self.skipinit_gain = nn.Parameter(torch.tensor(0.0)) if skipinit else None

    def _set_scalars(self, alpha, beta, attn_gain, act, gamma, drop_path_rate, drop_path_scale_by_keep) -> None:
        self.alpha, self.beta, self.attn_gain = float(alpha), float(beta), float(attn_gain)
        self.act, self.gamma = act, float(gamma)
        self.drop_path_rate, self.drop_path_scale_by_keep = float(drop_path_rate), bool(drop_path_scale_by_keep)

    @classmethod
    def from_parts(cls, *, conv1: WSConv2d, conv2: WSConv2d, conv2b: WSConv2d | None, conv3: WSConv2d,
                   downsample: DownsampleAvg | None, attn_last: nn.Module | None,
                   skipinit_gain: nn.Parameter | None, alpha: float, beta: float, attn_gain: float, act: str,
                   gamma: float, drop_path_rate: float = 0.0, drop_path_scale_by_keep: bool = True,
                   attn: nn.Module | None = None) -> "NFBlock":
        """An NFBlock around existing modules and parameters (no new parameters are created): the
        attributes of a timm NormFreeBlock, as ``nfkernels.convert`` builds it (``attn`` for
        reg=True blocks, ``attn_last`` otherwise; each a SqueezeExcite or EfficientChannelAttention).
        Computes what ``forward`` documents with these pieces."""
        _check_act_and_rate(act, drop_path_rate)
        for name, module in (("attn", attn), ("attn_last", attn_last)):
            if module is not None and not hasattr(module, "gate_residual"):
                raise TypeError(f"NFBlock: {name} must be a SqueezeExcite or EfficientChannelAttention; "
                                f"got {type(module).__name__}")
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block._set_scalars(alpha, beta, attn_gain, act, gamma, drop_path_rate, drop_path_scale_by_keep)
        block.downsample = downsample
        block.conv1, block.conv2, block.conv2b = conv1, conv2, conv2b
        block.attn = attn
        block.conv3 = conv3
        block.attn_last = attn_last
        block.skipinit_gain = skipinit_gain
        return block

    def _act(self, x: torch.Tensor, bias: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
        return scaled_act(x, bias, act=self.act, gamma=self.gamma, scale=scale)

    def _drop_path_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.training or self.drop_path_rate == 0.0:
            return None
        keep = 1.0 - self.drop_path_rate
        # fp64 for fp64 activations (1/keep exact to double precision), else fp32 (never bf16/fp16).
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        mask = x.new_empty(x.shape[0], dtype=dtype).bernoulli_(keep)
        return mask / keep if self.drop_path_scale_by_keep else mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self._act(x, None, self.beta)
        shortcut, shortcut_bias = x, None
        if self.downsample is not None:
            shortcut = self.downsample.conv.conv(self.downsample.pool(pre), None)
            shortcut_bias = self.downsample.conv.bias
        out = self.conv1.conv(pre, None)
        out = self.conv2.conv(self._act(out, self.conv1.bias), None)
        bias = self.conv2.bias
        if self.conv2b is not None:
            out = self.conv2b.conv(self._act(out, bias), None)
            bias = self.conv2b.bias
        if self.attn is not None:  # the 3×3 output gated, its bias inside the gate, no residual
            out, bias = self.attn.gate_residual(out, None, bias=bias, alpha=1.0, attn_gain=self.attn_gain), None
        out = self.conv3.conv(self._act(out, bias), None)
        fused = dict(bias=self.conv3.bias, shortcut_bias=shortcut_bias, skip_gain=self.skipinit_gain,
                     mask=self._drop_path_mask(out), alpha=self.alpha)
        if self.attn_last is not None:
            return self.attn_last.gate_residual(out, shortcut, attn_gain=self.attn_gain, **fused)
        return se_gate_residual(out, shortcut, **fused)


def _check_act_and_rate(act: str, drop_path_rate: float) -> None:
    if act not in NF_GAMMA:
        raise ValueError(f"NFBlock: act must be one of {tuple(NF_GAMMA)}; got {act!r}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"NFBlock: drop_path_rate must be in [0, 1); got {drop_path_rate}")
