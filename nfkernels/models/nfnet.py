"""NFNet-F0 … F7 (Brock et al. 2021, Table 1) built from nfkernels' fused layers, with timm's model API.

Which timm model this is. timm has two NFNet-F families and only one of them is built here:

* timm's ``dm_nfnet_f0`` … ``dm_nfnet_f6`` ("DeepMind weight compatible": GELU with γ in the
  activation, TF-SAME padding, SkipInit, std-conv eps 1e-5) are this architecture. The module
  tree, parameter names and shapes match, so ``model.load_state_dict(timm_model.state_dict())``
  works with strict=True. Build them with ``nfnet("f0")``, ``nfnet("dm_nfnet_f0")``,
  ``dm_nfnet_f0()`` or ``nfnet_f0()``; ``TIMM_NAMES`` maps each variant to its timm name.
* timm's ``nfnet_f0`` … ``nfnet_f7`` are a different architecture: no SkipInit gains (no
  ``stages.*.skipinit_gain``, so their state dicts do not load here), symmetric instead of TF-SAME
  padding and γ folded into the weight standardization (different outputs). ``nfnet("nfnet_f0")``
  therefore raises instead of silently building the dm_ model. This module's functions
  ``nfnet_f0`` … ``nfnet_f7`` predate the timm names and, despite sharing them, build the dm_
  design (``dm_nfnet_f0`` … ``dm_nfnet_f6`` are the same functions under timm's names).
* F7: timm has no ``dm_nfnet_f7`` (so no weights and no data config for it); ``nfnet("f7")`` and
  ``nfnet_f7()`` build the paper's F7 in the dm_ design.

nfkernels ships no weights (``pretrained=True`` raises). To start from timm's ImageNet weights::

    model = nfkernels.models.dm_nfnet_f0()
    model.load_state_dict(timm.create_model("dm_nfnet_f0", pretrained=True).state_dict())

timm's model API, so that timm's training script, ``timm.data.resolve_model_data_config(model)``
and AGC helpers work unchanged: ``num_classes``, ``num_features``, ``head_hidden_size``,
``in_chans``, ``get_classifier()``, ``reset_classifier(num_classes, global_pool=None)``,
``forward_features``, ``forward_head(x, pre_logits=False)``, ``feature_info`` (a list of dicts),
``set_grad_checkpointing(enable=True)``, ``group_matcher(coarse=False)`` and ``pretrained_cfg`` /
``default_cfg`` (timm's published data config of the variant). ``features_only=True`` builds an
:class:`NFNetFeatures`, timm's ``FeatureListNet`` of the same model (same state-dict keys).

Every forward standardizes all conv weights in one launch, and their gradients in one launch
(``nfkernels.nn.begin_batched_standardization``). Set ``model.batched_standardization = False``
to go conv by conv, as a model checkpointed from outside (``checkpoint_wrapper``) must, and as a
DistributedDataParallel run may prefer (each conv's gradient then exists as soon as its backward ran).

``flavor="deepmind"`` switches to the official JAX numerics instead of timm's: tanh-approximated
GELU, the max(N·σ², 1e-4) standardization, and stochastic depth without the 1/keep rescaling.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.utils.checkpoint

from nfkernels.functional import scaled_act
from nfkernels.nn.attn import make_divisible
from nfkernels.nn.block import NFBlock
from nfkernels.nn.conv import (
    WSConv2d,
    batched_checkpoint_context,
    begin_batched_standardization,
    end_batched_standardization,
)
from nfkernels.ops.scaled_act import NF_GAMMA

FLAVORS = ("timm", "deepmind")
POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")


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

# The timm model each variant is state-dict compatible with; None where timm has none.
TIMM_NAMES = {v: f"dm_nfnet_{v}" for v in VARIANTS if v != "f7"} | {"f7": None}
_BY_NAME = {v: v for v in VARIANTS} | {name: v for v, name in TIMM_NAMES.items() if name}
VARIANT_NAMES = tuple(_BY_NAME)

# timm's data configs (timm/models/nfnet.py: _dcfg and default_cfgs['dm_nfnet_fX.dm_in1k']), as
# timm's PretrainedCfg.to_dict() holds them, without the weight locations (url, hf_hub_id):
# nfkernels downloads nothing. Per variant: pool_size, input_size, test_input_size, crop_pct.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_BASE_CFG = dict(custom_load=False, input_size=(3, 224, 224), fixed_input_size=False, interpolation="bicubic",
                 crop_pct=0.9, crop_mode="center", mean=_IMAGENET_MEAN, std=_IMAGENET_STD, num_classes=1000,
                 pool_size=(7, 7), first_conv="stem.conv1", classifier="head.fc", license="apache-2.0")
_DATA_CFGS = {
    "f0": ((6, 6), 192, 256, 0.9),
    "f1": ((7, 7), 224, 320, 0.91),
    "f2": ((8, 8), 256, 352, 0.92),
    "f3": ((10, 10), 320, 416, 0.94),
    "f4": ((12, 12), 384, 512, 0.951),
    "f5": ((13, 13), 416, 544, 0.954),
    "f6": ((14, 14), 448, 576, 0.956),
    # No dm_nfnet_f7 in timm: the paper's F7 resolutions from timm's nfnet_f7 entry (crop 0.9, center).
    "f7": ((15, 15), 480, 608, 0.9),
}


def pretrained_cfg_for(variant: str | None) -> dict:
    """timm's ``pretrained_cfg`` dict for a variant (None: a custom NFNetConfig, which gets the
    defaults of timm's nfnet.py). A fresh dict, so that editing one model's leaves the others'."""
    cfg = copy.deepcopy(_BASE_CFG)
    if variant is None:
        return cfg
    key = _resolve_variant("pretrained_cfg_for", variant)
    pool, size, test_size, crop_pct = _DATA_CFGS[key]
    cfg.update(pool_size=pool, input_size=(3, size, size), test_input_size=(3, test_size, test_size),
               crop_pct=crop_pct)
    if TIMM_NAMES[key] is not None:
        cfg.update(architecture=TIMM_NAMES[key], tag="dm_in1k", crop_mode="squash")
    return cfg


def _variant_list() -> str:
    return "'f0' … 'f7' (NFNet-F0 … F7) or timm's names 'dm_nfnet_f0' … 'dm_nfnet_f6'"


def _resolve_variant(op: str, variant: object) -> str:
    """The VARIANTS key for a variant name. timm's nfnet_fX names get their own error: they exist,
    and are easy to mistake for ours, but name another architecture."""
    if not isinstance(variant, str):
        raise TypeError(f"{op}: variant must be a str such as 'f0' or 'dm_nfnet_f0'; got {type(variant).__name__}")
    name = variant.strip().lower()
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name.startswith("nfnet_") and name.removeprefix("nfnet_") in VARIANTS:
        f = name.removeprefix("nfnet_")
        raise ValueError(
            f"{op}: {variant!r} is timm's {name}, a different architecture from the one built here: timm's "
            "nfnet_f* have no SkipInit gains (their state dicts lack stages.*.skipinit_gain), pad symmetrically "
            "instead of TF-SAME and fold γ into the weight standardization. nfkernels builds timm's "
            f"DeepMind-compatible dm_nfnet_f* design: ask for {f!r}"
            + (f" or {TIMM_NAMES[f]!r}" if TIMM_NAMES[f] else " (timm has no dm_nfnet_f7)")
            + f". Variants: {_variant_list()}")
    if name == "dm_nfnet_f7":
        raise ValueError(f"{op}: timm has no dm_nfnet_f7 (nor weights for it); the paper's F7 in the dm_nfnet "
                         f"design is variant 'f7'. Variants: {_variant_list()}")
    raise ValueError(f"{op}: variant must be one of {_variant_list()}; got {variant!r}")


def _check_int(op: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}; got {value}")
    return value


def _check_bool(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool; got {type(value).__name__}")
    return value


def _check_pool(op: str, pool_type: object, num_classes: int) -> str:
    if not isinstance(pool_type, str) or pool_type not in POOL_TYPES:
        raise ValueError(f"{op}: global_pool must be one of {POOL_TYPES}; got {pool_type!r}")
    if pool_type == "" and num_classes > 0:
        # A linear classifier needs one vector per image (timm asserts the same).
        raise ValueError(f"{op}: global_pool='' (no pooling) needs num_classes=0; got num_classes={num_classes}")
    return pool_type


def _check_images(op: str, x: object, in_chans: int) -> None:
    """A wrong layout fails deep inside a conv with a message about weights; name the input instead."""
    expected = f"(N, {in_chans}, H, W)"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor of shape {expected}; got {type(x).__name__}")
    if x.dim() == 4 and x.shape[1] == in_chans:
        return
    hint = ""
    if x.dim() == 3 and x.shape[0] == in_chans:
        hint = " (one unbatched image? add the batch dimension: x.unsqueeze(0))"
    elif x.dim() == 4 and x.shape[-1] == in_chans:
        hint = (" (channels in the last dimension? permute to (N, C, H, W): x.permute(0, 3, 1, 2); "
                "channels_last memory format keeps that shape)")
    raise ValueError(f"{op}: x must have shape {expected}; got {tuple(x.shape)}{hint}")


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


class GlobalPool(nn.Module):
    """timm's SelectAdaptivePool2d (flattened) for the pool types a classifier head can ask for.
    No parameters, like timm's, so state dicts are the same whatever the pool type."""

    def __init__(self, pool_type: str = "avg"):
        super().__init__()
        self.pool_type = pool_type

    def feat_mult(self) -> int:
        """catavgmax concatenates two poolings: the classifier sees twice the channels."""
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "":
            return x
        if self.pool_type == "avg":
            return x.mean((2, 3))
        if self.pool_type == "max":
            return x.amax((2, 3))
        avg, mx = x.mean((2, 3)), x.amax((2, 3))
        return 0.5 * (avg + mx) if self.pool_type == "avgmax" else torch.cat((avg, mx), 1)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


class ClassifierHead(nn.Module):
    """Global pool, dropout, linear classifier (timm's ClassifierHead; num_classes=0: no classifier)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0, pool_type: str = "avg"):
        super().__init__()
        self.in_features = in_features
        self.global_pool = GlobalPool(pool_type)
        self.drop = nn.Dropout(drop_rate)
        self.fc = self._fc(num_classes)

    def _fc(self, num_classes: int, **factory) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        return nn.Linear(self.in_features * self.global_pool.feat_mult(), num_classes, **factory)

    def reset(self, num_classes: int, pool_type: str | None = None, *, like: torch.Tensor) -> None:
        """A new classifier with PyTorch's default nn.Linear init, as timm's reset gives; it is made
        on ``like``'s device and dtype, so a reset model stays where it was moved or cast."""
        if pool_type is not None:
            self.global_pool = GlobalPool(pool_type)
        self.fc = self._fc(num_classes, device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)


class _DefaultCfgAlias:
    """timm's older name ``default_cfg`` for ``pretrained_cfg``: both name the same dict, as in timm."""

    pretrained_cfg: dict

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, value: dict) -> None:
        self.pretrained_cfg = value


class NFNet(_DefaultCfgAlias, nn.Module):
    """Normalizer-Free Network: stem, four stages of NFBlocks, final 1×1 conv, scaled act, head.

    The constructor takes timm NormFreeNet's ``num_classes`` (0: no classifier, ``head.fc`` is an
    Identity and the model returns pooled features), ``in_chans`` and ``global_pool``; dropout and
    stochastic depth live in ``cfg``. See the module docstring for the timm API it implements.
    """

    def __init__(self, cfg: NFNetConfig, num_classes: int = 1000, in_chans: int = 3, flavor: str = "timm",
                 global_pool: str = "avg"):
        super().__init__()
        op = "NFNet"
        if not isinstance(cfg, NFNetConfig):
            raise TypeError(f"{op}: cfg must be an NFNetConfig; got {type(cfg).__name__}")
        _check_int(op, "num_classes", num_classes, 0)
        _check_int(op, "in_chans", in_chans, 1)
        if flavor not in FLAVORS:
            raise ValueError(f"NFNet: flavor must be one of {FLAVORS}; got {flavor!r}")
        _check_pool(op, global_pool, num_classes)
        self.cfg, self.flavor, self.num_classes, self.in_chans = cfg, flavor, num_classes, in_chans
        self.drop_rate = cfg.drop_rate
        self.grad_checkpointing = False
        deepmind = flavor == "deepmind"
        act = "gelu_tanh" if deepmind and cfg.act == "gelu" else cfg.act
        self.act, self.gamma = act, NF_GAMMA[act]
        conv_kw = dict(eps=1e-4 if deepmind else cfg.std_conv_eps, eps_mode=flavor,
                       padding="same" if cfg.same_padding else None)
        stem_chs = make_divisible(cfg.stem_chs, cfg.ch_div)
        self.stem = Stem(in_chans, stem_chs, act, self.gamma, **conv_kw)
        # timm taps the deep_quad stem at conv3 (before its activation), at stride 2.
        self.feature_info = [dict(num_chs=stem_chs // 2, reduction=2, module="stem.conv3")]

        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace(0, rate, total)
        prev_chs, expected_var, block_id, stages, net_stride = stem_chs, 1.0, 0, [], 4
        for stage_idx, depth in enumerate(cfg.depths):
            out_chs = make_divisible(cfg.channels[stage_idx], cfg.ch_div)
            stride = 1 if stage_idx == 0 else 2
            net_stride *= stride
            blocks = []
            for block_idx in range(depth):
                blocks.append(NFBlock(
                    prev_chs, out_chs, stride=stride if block_idx == 0 else 1,
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
            self.feature_info.append(dict(num_chs=prev_chs, reduction=net_stride, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = make_divisible(cfg.num_features, cfg.ch_div)
        self.head_hidden_size = self.num_features
        self.final_conv = WSConv2d(prev_chs, self.num_features, 1, **conv_kw)
        # As in timm, the final conv's output replaces the last stage's as the deepest feature.
        self.feature_info[-1] = dict(num_chs=self.num_features, reduction=net_stride, module="final_conv")
        self.head = ClassifierHead(self.num_features, num_classes, cfg.drop_rate, global_pool)
        self.pretrained_cfg = pretrained_cfg_for(None)
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

    def get_classifier(self) -> nn.Module:
        """The final classifier, which AGC leaves unclipped (an Identity when num_classes=0)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (fine-tuning on other classes; 0 removes it) and optionally the
        pooling; the new layer has PyTorch's default init, as after timm's reset_classifier."""
        op = "reset_classifier"
        _check_int(op, "num_classes", num_classes, 0)
        if global_pool is not None:
            _check_pool(op, global_pool, num_classes)
        elif self.head.global_pool.pool_type == "" and num_classes > 0:
            _check_pool(op, "", num_classes)
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, like=self.final_conv.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory: each stage's activations are recomputed in backward instead
        of stored (torch.utils.checkpoint per stage, as timm's checkpoint_seq does for NFNets)."""
        self.grad_checkpointing = _check_bool("set_grad_checkpointing", "enable", enable)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (layer-wise LR decay, freezing): the stem, then one group per
        block (per stage when coarse), the final conv last; the head is left to the caller."""
        _check_bool("group_matcher", "coarse", coarse)
        return dict(stem=r"^stem",
                    blocks=[(r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None),
                            (r"^final_conv", (99999,))])

    def _stages(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            context_fn = batched_checkpoint_context()
            for stage in self.stages:
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False, context_fn=context_fn)
            return x
        return self.stages(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Separate from the head so that timm-style code (pooling of its own, pre_logits, dense
        tasks) can take the activated final-conv map, (N, num_features, H/32, W/32).

        Every conv weight is standardized at the start, in one launch (nfkernels.nn.conv's
        ``begin_batched_standardization``), and every gradient of them in one launch."""
        _check_images("NFNet", x, self.in_chans)
        token = begin_batched_standardization(self)
        try:
            x = self._stages(self.stem(x))
            return scaled_act(self.final_conv.conv(x, None), self.final_conv.bias, act=self.act, gamma=self.gamma)
        finally:
            end_batched_standardization(token)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout and classifier on forward_features' output; ``pre_logits`` stops before the
        classifier (the embedding timm's distillation and retrieval code use)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.num_features:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"forward_head: x must be forward_features' output, shape (N, {self.num_features}, H, W); "
                             f"got {got}")
        return self.head(x, pre_logits=_check_bool("forward_head", "pre_logits", pre_logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class FeatureInfo:
    """timm's FeatureInfo for a features_only model: the tapped feature_info entries (each with
    its ``index``) and the accessors timm's detection/segmentation code calls on it."""

    def __init__(self, info: list[dict], out_indices: tuple[int, ...]):
        self.info = [dict(entry, index=i) for i, entry in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | list[int] | tuple[int, ...] | None = None):
        """``key`` of each output (idx None), of one entry (an int) or of listed entries."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: list[str] | None = None, idx: int | list[int] | tuple[int, ...] | None = None):
        pick = (lambda e: e) if keys is None else (lambda e: {k: e[k] for k in keys})
        if idx is None:
            return [pick(self.info[i]) for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [pick(self.info[i]) for i in idx]
        return pick(self.info[idx])

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


def _check_out_indices(out_indices: object, n: int) -> tuple[int, ...]:
    """timm's forms (an int: the last that many; indices, negative from the end) as ascending
    non-negative indices: the features come back in network order, so another order would make
    feature_info.channels() disagree with the list."""
    op = "features_only"
    if isinstance(out_indices, int) and not isinstance(out_indices, bool):
        if not 1 <= out_indices <= n:
            raise ValueError(f"{op}: out_indices as an int counts the last features, 1 … {n}; got {out_indices}")
        return tuple(range(n - out_indices, n))
    if not isinstance(out_indices, (tuple, list)) or not out_indices:
        raise TypeError(f"{op}: out_indices must be an int or a non-empty tuple of ints in [-{n}, {n}); "
                        f"got {out_indices!r}")
    normalized = []
    for i in out_indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{op}: out_indices must hold ints; got {type(i).__name__}")
        if not -n <= i < n:
            raise ValueError(f"{op}: out_indices entries must be in [-{n}, {n}) ({n} features); got {i}")
        normalized.append(i % n)
    if any(a >= b for a, b in zip(normalized, normalized[1:])):
        raise ValueError(f"{op}: out_indices must be increasing without repeats (features come in network order); "
                         f"got {tuple(out_indices)}")
    return tuple(normalized)


class NFNetFeatures(_DefaultCfgAlias, nn.Module):
    """An NFNet's feature pyramid: timm's ``features_only=True`` model (FeatureListNet).

    ``forward`` returns the list of feature maps at ``feature_info.out_indices`` (default all five:
    stem.conv3 at stride 2, stages.0–2 at 4, 8, 16 and final_conv at 32). As in timm the stem and
    final-conv taps are the conv outputs before their activation, modules after the last tap are
    dropped, and the modules are registered under timm's names (stem_conv1 … stem_conv4,
    stages_0 …, final_conv), so a timm features_only state dict loads with strict=True::

        feats = nfkernels.models.dm_nfnet_f0(features_only=True)
        feats.load_state_dict(timm.create_model("dm_nfnet_f0", features_only=True, pretrained=True).state_dict())

    ``feature_info`` is a :class:`FeatureInfo` (``channels()``, ``reduction()``, ``module_name()``).
    """

    def __init__(self, model: NFNet, out_indices: int | tuple[int, ...] = (0, 1, 2, 3, 4)):
        super().__init__()
        if not isinstance(model, NFNet):
            raise TypeError(f"NFNetFeatures: model must be an NFNet; got {type(model).__name__}")
        n_stages = len(model.stages)
        indices = _check_out_indices(out_indices, len(model.feature_info))
        self.feature_info = FeatureInfo(copy.deepcopy(model.feature_info), indices)
        self.in_chans, self.act, self.gamma = model.in_chans, model.act, model.gamma
        self.grad_checkpointing = False
        last = indices[-1]
        stem_convs = list(model.stem)[: 3 if last == 0 else 4]
        for i, conv in enumerate(stem_convs):
            self.add_module(f"stem_conv{i + 1}", conv)
        n_used = 0 if last == 0 else (n_stages if last == len(model.feature_info) - 1 else last)
        for s in range(n_used):
            self.add_module(f"stages_{s}", model.stages[s])
        if last == len(model.feature_info) - 1:
            self.final_conv = model.final_conv
        self._n_stem, self._n_stages = len(stem_convs), n_used
        cfg = copy.deepcopy(model.pretrained_cfg)
        for key in ("num_classes", "classifier", "global_pool"):  # timm's pretrained_cfg_for_features
            cfg.pop(key, None)
        self.pretrained_cfg = cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in backward instead of storing them."""
        self.grad_checkpointing = _check_bool("set_grad_checkpointing", "enable", enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_images("NFNetFeatures", x, self.in_chans)
        token = begin_batched_standardization(self)  # every conv weight in one launch, as NFNet
        try:
            return self._features(x)
        finally:
            end_batched_standardization(token)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, feats = set(self.feature_info.out_indices), []
        for i in range(self._n_stem):
            conv = getattr(self, f"stem_conv{i + 1}")
            if i < 2:
                x = scaled_act(conv.conv(x, None), conv.bias, act=self.act, gamma=self.gamma)
            elif i == 2:
                x = conv(x)
                if 0 in taps:
                    feats.append(x)
                if self._n_stem > 3:
                    x = scaled_act(x, None, act=self.act, gamma=self.gamma)
            else:
                x = conv(x)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        context_fn = batched_checkpoint_context() if checkpointing else None
        for s in range(self._n_stages):
            stage = getattr(self, f"stages_{s}")
            x = (torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False, context_fn=context_fn)
                 if checkpointing else stage(x))
            if s + 1 in taps and s + 1 < len(self.feature_info) - 1:
                feats.append(x)
        if hasattr(self, "final_conv"):
            feats.append(self.final_conv(x))
        return feats


def _build(op: str, variant: str, num_classes: int = 1000, *, pretrained: bool = False, flavor: str = "timm",
           drop_rate: float | None = None, drop_path_rate: float | None = None, in_chans: int = 3,
           global_pool: str = "avg", features_only: bool = False, out_indices: object = None,
           **cfg_overrides) -> NFNet | NFNetFeatures:
    key = _resolve_variant(op, variant)
    _check_int(op, "num_classes", num_classes, 0)
    if _check_bool(op, "pretrained", pretrained):
        timm_name = TIMM_NAMES[key]
        how = (f"to start from timm's ImageNet weights, build the model and load them: "
               f'model.load_state_dict(timm.create_model("{timm_name}", pretrained=True).state_dict())'
               if timm_name else "timm has no pretrained F7 either (no dm_nfnet_f7)")
        raise ValueError(f"{op}: pretrained=True is not supported: nfkernels ships and downloads no weights; {how}")
    _check_bool(op, "features_only", features_only)
    if out_indices is not None and not features_only:
        raise ValueError(f"{op}: out_indices selects features of a features_only=True model; "
                         "pass features_only=True too")
    known = {f.name for f in fields(NFNetConfig)}
    for name in cfg_overrides:
        if name not in known:
            raise TypeError(f"{op}: unexpected keyword argument {name!r} (NFNetConfig fields: {sorted(known)})")
    overrides = dict(cfg_overrides)
    if drop_rate is not None:
        overrides["drop_rate"] = drop_rate
    if drop_path_rate is not None:
        overrides["drop_path_rate"] = drop_path_rate
    cfg = replace(NFNetConfig(depths=VARIANTS[key][0]), **overrides)
    model = NFNet(cfg, num_classes=0 if features_only else num_classes, in_chans=in_chans, flavor=flavor,
                  global_pool=global_pool)
    model.pretrained_cfg = pretrained_cfg_for(key)
    if features_only:
        return NFNetFeatures(model, (0, 1, 2, 3, 4) if out_indices is None else out_indices)
    return model


def nfnet(variant: str, num_classes: int = 1000, *, pretrained: bool = False, flavor: str = "timm",
          drop_rate: float | None = None, drop_path_rate: float | None = None, in_chans: int = 3,
          global_pool: str = "avg", features_only: bool = False, out_indices: int | tuple[int, ...] | None = None,
          **cfg_overrides) -> NFNet | NFNetFeatures:
    """Build NFNet-``variant``: "f0" … "f7" or timm's "dm_nfnet_f0" … "dm_nfnet_f6" (timm's
    "nfnet_f0" … is another architecture and raises). ``drop_rate``/``drop_path_rate`` default to 0
    (as timm's dm_nfnet_fX); the paper's rates come from :func:`paper_regularization`. Other
    NFNetConfig fields can be overridden by keyword. ``features_only=True`` (with timm's
    ``out_indices``) returns an :class:`NFNetFeatures`; ``pretrained=True`` raises, since nfkernels
    has no weights (see the module docstring for loading timm's)."""
    return _build("nfnet", variant, num_classes, pretrained=pretrained, flavor=flavor, drop_rate=drop_rate,
                  drop_path_rate=drop_path_rate, in_chans=in_chans, global_pool=global_pool,
                  features_only=features_only, out_indices=out_indices, **cfg_overrides)


def paper_regularization(variant: str) -> dict[str, float]:
    """The paper's dropout and stochastic-depth rates for a variant, as keyword arguments: timm's
    dm_nfnet defaults are 0, which under-regularizes a from-scratch ImageNet run."""
    key = _resolve_variant("paper_regularization", variant)
    return {"drop_rate": VARIANTS[key][1], "drop_path_rate": PAPER_DROP_PATH_RATE}


def _factory(variant: str):
    def build(num_classes: int = 1000, *, pretrained: bool = False, **kw) -> NFNet | NFNetFeatures:
        return _build(f"nfnet_{variant}", variant, num_classes, pretrained=pretrained, **kw)

    build.__name__ = build.__qualname__ = f"nfnet_{variant}"
    timm_name = TIMM_NAMES[variant]
    build.__doc__ = (f"NFNet-{variant.upper()} in timm's dm_nfnet design "
                     + (f"(state-dict compatible with timm's {timm_name}; not timm's nfnet_{variant}, "
                        "a different architecture). " if timm_name else
                        f"(timm has no dm_nfnet_{variant}; not timm's nfnet_{variant}, a different architecture). ")
                     + "Keywords as for nfnet().")
    return build


def _timm_factory(variant: str):
    def build(pretrained: bool = False, **kw) -> NFNet | NFNetFeatures:
        return _build(TIMM_NAMES[variant], variant, pretrained=pretrained, **kw)

    build.__name__ = build.__qualname__ = TIMM_NAMES[variant]
    build.__doc__ = (f"NFNet-{variant.upper()} under timm's name and signature ({TIMM_NAMES[variant]}"
                     "(pretrained=False, **kwargs)), for code written against timm's entry points. "
                     "Keywords as for nfnet().")
    return build


nfnet_f0, nfnet_f1, nfnet_f2, nfnet_f3 = (_factory(v) for v in ("f0", "f1", "f2", "f3"))
nfnet_f4, nfnet_f5, nfnet_f6, nfnet_f7 = (_factory(v) for v in ("f4", "f5", "f6", "f7"))
dm_nfnet_f0, dm_nfnet_f1, dm_nfnet_f2, dm_nfnet_f3 = (_timm_factory(v) for v in ("f0", "f1", "f2", "f3"))
dm_nfnet_f4, dm_nfnet_f5, dm_nfnet_f6 = (_timm_factory(v) for v in ("f4", "f5", "f6"))
