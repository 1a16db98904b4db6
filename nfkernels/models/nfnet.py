"""NFNet-F0 … F7 (Brock et al. 2021, Table 1) built from nfkernels' fused layers.

The module tree, parameter names and shapes follow timm's ``NormFreeNet`` with the ``dm_nfnet_fX``
configurations (DeepMind-weight compatible: GELU with γ in the activation, TF-SAME padding,
SkipInit, std-conv eps 1e-5), so ``model.load_state_dict(timm_model.state_dict())`` works with
strict=True. ``flavor="deepmind"`` switches to the official JAX numerics instead: tanh-approximated
GELU, the max(N·σ², 1e-4) standardization, and stochastic depth without the 1/keep rescaling.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from nfkernels.functional import scaled_act
from nfkernels.nn.attn import make_divisible
from nfkernels.nn.block import NFBlock
from nfkernels.nn.conv import WSConv2d
from nfkernels.ops.scaled_act import NF_GAMMA

FLAVORS = ("timm", "deepmind")


@dataclass(frozen=True)
class NFNetConfig:
    """Architecture of an NFNet (the fields of timm's NfCfg that the F family uses)."""

    depths: tuple[int, ...]
    channels: tuple[int, ...] = (256, 512, 1536, 1536)
    stem_chs: int = 128
    group_size: int = 128
    bottle_ratio: float = 0.5
    num_features: int = 3072
    alpha: float = 0.2
    attn_gain: float = 2.0
    se_rd_ratio: float = 0.5
    act: str = "gelu"
    std_conv_eps: float = 1e-5
    ch_div: int = 8
    skipinit: bool = True
    same_padding: bool = True
    extra_conv: bool = True
    drop_rate: float = 0.0          # dropout before the classifier
    drop_path_rate: float = 0.0     # stochastic depth, linearly increasing over blocks


# A miniature of the F family (same block design, one block per stage, narrow): CPU runs, tests
# and examples.
TINY_CONFIG = NFNetConfig(depths=(1, 1, 1, 1), channels=(32, 64, 96, 96), stem_chs=32, group_size=16,
                          num_features=192)

# Paper Table 1 depths; dropout rates are the paper's (F0 0.2 … F7 0.5), stochastic depth 0.1 for
# all variants as in the official training configuration. Widths are shared by all variants.
VARIANTS = {
    "f0": ((1, 2, 6, 3), 0.2),
    "f1": ((2, 4, 12, 6), 0.3),
    "f2": ((3, 6, 18, 9), 0.4),
    "f3": ((4, 8, 24, 12), 0.4),
    "f4": ((5, 10, 30, 15), 0.5),
    "f5": ((6, 12, 36, 18), 0.5),
    "f6": ((7, 14, 42, 21), 0.5),
    "f7": ((8, 16, 48, 24), 0.5),
}
PAPER_DROP_PATH_RATE = 0.1


class Stem(nn.Sequential):
    """The 4-conv 'deep_quad' stem: 3×3 convs (stride 2, 1, 1, 2) with scaled activations between."""

    def __init__(self, in_chans: int, out_chs: int, act: str, gamma: float, **conv_kw):
        widths = (out_chs // 8, out_chs // 4, out_chs // 2, out_chs)
        layers = OrderedDict()
        for i, (c, s) in enumerate(zip(widths, (2, 1, 1, 2))):
            layers[f"conv{i + 1}"] = WSConv2d(in_chans, c, 3, stride=s, **conv_kw)
            in_chans = c
        super().__init__(layers)
        self.act, self.gamma = act, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = list(self)
        for conv in convs[:-1]:
            x = scaled_act(conv.conv(x, None), conv.bias, act=self.act, gamma=self.gamma)
        return convs[-1](x)


class ClassifierHead(nn.Module):
    """Global average pool, dropout, linear classifier (timm ClassifierHead, pool 'avg')."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.mean((2, 3))))


class NFNet(nn.Module):
    """Normalizer-Free Network: stem, four stages of NFBlocks, final 1×1 conv, scaled act, head."""

    def __init__(self, cfg: NFNetConfig, num_classes: int = 1000, in_chans: int = 3, flavor: str = "timm"):
        super().__init__()
        if flavor not in FLAVORS:
            raise ValueError(f"NFNet: flavor must be one of {FLAVORS}; got {flavor!r}")
        self.cfg, self.flavor, self.num_classes = cfg, flavor, num_classes
        deepmind = flavor == "deepmind"
        act = "gelu_tanh" if deepmind and cfg.act == "gelu" else cfg.act
        self.act, self.gamma = act, NF_GAMMA[act]
        conv_kw = dict(eps=1e-4 if deepmind else cfg.std_conv_eps, eps_mode=flavor,
                       padding="same" if cfg.same_padding else None)
        stem_chs = make_divisible(cfg.stem_chs, cfg.ch_div)
        self.stem = Stem(in_chans, stem_chs, act, self.gamma, **conv_kw)

        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace(0, rate, total)
        prev_chs, expected_var, block_id, stages = stem_chs, 1.0, 0, []
        for stage_idx, depth in enumerate(cfg.depths):
            out_chs = make_divisible(cfg.channels[stage_idx], cfg.ch_div)
            blocks = []
            for block_idx in range(depth):
                blocks.append(NFBlock(
                    prev_chs, out_chs, stride=(1 if stage_idx == 0 else 2) if block_idx == 0 else 1,
                    alpha=cfg.alpha, beta=expected_var ** -0.5, bottle_ratio=cfg.bottle_ratio,
                    group_size=cfg.group_size, ch_div=cfg.ch_div, extra_conv=cfg.extra_conv,
                    skipinit=cfg.skipinit, attn_layer="se", attn_kwargs=dict(rd_ratio=cfg.se_rd_ratio),
                    attn_gain=cfg.attn_gain, act=act, gamma=self.gamma, same_padding=cfg.same_padding,
                    eps=conv_kw["eps"], eps_mode=flavor, drop_path_rate=rates[block_id],
                    drop_path_scale_by_keep=not deepmind))
                if block_idx == 0:
                    expected_var = 1.0  # the shortcut is re-projected: variance restarts at 1
                expected_var += cfg.alpha ** 2
                prev_chs, block_id = out_chs, block_id + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = make_divisible(cfg.num_features, cfg.ch_div)
        self.final_conv = WSConv2d(prev_chs, self.num_features, 1, **conv_kw)
        self.head = ClassifierHead(self.num_features, num_classes, cfg.drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's initialisation: fc N(0, 0.01), convs Kaiming-normal (fan-in, linear), zero biases."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and "fc" in name:
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return scaled_act(self.final_conv.conv(x, None), self.final_conv.bias, act=self.act, gamma=self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def nfnet(variant: str, num_classes: int = 1000, *, flavor: str = "timm", drop_rate: float | None = None,
          drop_path_rate: float | None = None, in_chans: int = 3, **cfg_overrides) -> NFNet:
    """Build NFNet-``variant`` ("f0" … "f7"). ``drop_rate``/``drop_path_rate`` default to 0 (as timm's
    dm_nfnet_fX); pass ``"paper"`` rates via :func:`paper_regularization`. Other NFNetConfig fields
    can be overridden by keyword."""
    key = variant.lower().removeprefix("nfnet_")
    if key not in VARIANTS:
        raise ValueError(f"nfnet: variant must be one of {tuple(VARIANTS)}; got {variant!r}")
    depths, _ = VARIANTS[key]
    cfg = NFNetConfig(depths=depths)
    overrides = dict(cfg_overrides)
    if drop_rate is not None:
        overrides["drop_rate"] = drop_rate
    if drop_path_rate is not None:
        overrides["drop_path_rate"] = drop_path_rate
    return NFNet(replace(cfg, **overrides), num_classes=num_classes, in_chans=in_chans, flavor=flavor)


def paper_regularization(variant: str) -> dict[str, float]:
    """The paper's dropout and stochastic-depth rates for a variant, as keyword arguments."""
    return {"drop_rate": VARIANTS[variant.lower().removeprefix("nfnet_")][1], "drop_path_rate": PAPER_DROP_PATH_RATE}


def _factory(variant: str):
    def build(num_classes: int = 1000, **kw) -> NFNet:
        return nfnet(variant, num_classes, **kw)

    build.__name__ = f"nfnet_{variant}"
    build.__doc__ = f"NFNet-{variant.upper()} (timm dm_nfnet_{variant}-compatible). Keywords as for nfnet()."
    return build


nfnet_f0, nfnet_f1, nfnet_f2, nfnet_f3 = (_factory(v) for v in ("f0", "f1", "f2", "f3"))
nfnet_f4, nfnet_f5, nfnet_f6, nfnet_f7 = (_factory(v) for v in ("f4", "f5", "f6", "f7"))
