"""Every timm NormFreeNet family built from nfkernels' fused layers, with timm's names and model API.

One class, :class:`NFNet`, builds any configuration timm's ``NormFreeNet`` does (at output stride
32); its module tree, parameter names and shapes are timm's, so that
``model.load_state_dict(timm_model.state_dict())`` works with strict=True and gives timm's
outputs and gradients. The constructors carry timm's model names (``MODEL_NAMES``):

* ``dm_nfnet_f0`` … ``dm_nfnet_f6``: NFNet-F0 … F6 as DeepMind built them (GELU with γ in the
  activation, TF-SAME padding, SkipInit, SE). ``nfnet("f0")`` … ``nfnet("f7")`` are the paper's
  variants in this design (F7 has no timm counterpart: timm has no ``dm_nfnet_f7``).
* ``nfnet_f0`` … ``nfnet_f7``: timm's own NFNet-F (γ folded into the weight standardization,
  symmetric padding, no SkipInit); ``nfnet_l0`` and ``eca_nfnet_l0`` … ``l3``: the lighter SiLU
  versions with SE or ECA attention (timm's most used pretrained NFNets).
* ``nf_regnet_b0`` … ``b5``: NF-RegNets (3×3 stem, width factor 0.75, attention after the grouped
  3×3 conv, ``reg=True``).
* ``nf_resnet26/50/101``, ``nf_seresnet26/50/101``, ``nf_ecaresnet26/50/101``: NF-ResNets (ReLU, 7×7
  stem with max pool, no final conv) without attention, with SE, with ECA.

nfkernels ships no weights (``pretrained=True`` raises). To start from timm's ImageNet weights::

    model = nfkernels.models.eca_nfnet_l0()
    model.load_state_dict(timm.create_model("eca_nfnet_l0", pretrained=True).state_dict())

timm's model API, so that timm's training script, ``timm.data.resolve_model_data_config(model)``
and AGC helpers work unchanged: ``num_classes``, ``num_features``, ``head_hidden_size``,
``in_chans``, ``get_classifier()``, ``reset_classifier(num_classes, global_pool=None)``,
``forward_features``, ``forward_head(x, pre_logits=False)``, ``feature_info`` (a list of dicts),
``set_grad_checkpointing(enable=True)``, ``group_matcher(coarse=False)`` and ``pretrained_cfg`` /
``default_cfg`` (timm's published data config of the model). ``features_only=True`` builds an
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
from nfkernels.nn.attn import ATTN_LAYERS, make_divisible
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
STEM_TYPES = ("", "deep", "deep_tiered", "deep_quad", "3x3", "7x7", "deep_pool", "3x3_pool", "7x7_pool")


@dataclass(frozen=True)
class NFNetConfig:
    """Architecture of a normalizer-free network: timm's NfCfg, with the defaults of NFNet-F in
    DeepMind's design (dm_nfnet). Where timm's NfCfg differs: ``act`` is its ``act_layer``, and
    its ``attn_kwargs`` are ``se_rd_ratio``/``se_rd_divisor`` (SE's; ECA takes none in timm's
    models). ``num_features=0``: no final 1×1 conv (NF-ResNets). ``gamma_in_act``: the activation
    gain γ is applied in each activation (DeepMind) rather than folded into every conv's weight
    standardization (timm's other models); the two differ by rounding only. :func:`config_from_timm`
    turns a timm NfCfg (or its dict) into one of these."""

    depths: tuple[int, ...]
    channels: tuple[int, ...] = (256, 512, 1536, 1536)
    stem_chs: int | None = 128        # None: channels[0]
    group_size: int | None = 128      # None: plain (ungrouped) 3×3 convs
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
    stem_type: str = "deep_quad"
    attn_layer: str | None = "se"   # "se", "eca" or None
    se_rd_divisor: int = 8
    width_factor: float = 1.0
    reg: bool = False               # NF-RegNet blocks: bottleneck from in_chs, attention after the 3×3 conv
    gamma_in_act: bool = True
    zero_init_fc: bool = False


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

# The timm model each paper variant is state-dict compatible with; None where timm has none.
TIMM_NAMES = {v: f"dm_nfnet_{v}" for v in VARIANTS if v != "f7"} | {"f7": None}


# timm's model_cfgs (timm/models/nfnet.py: _dm_nfnet_cfg, _nfnet_cfg, _nfreg_cfg, _nfres_cfg).
def _nfnet_cfg(depths, channels=(256, 512, 1536, 1536), group_size=128, bottle_ratio=0.5, feat_mult=2.0,
               act="gelu", attn_layer="se", se_rd_ratio=0.5) -> NFNetConfig:
    return NFNetConfig(depths=depths, channels=channels, group_size=group_size, bottle_ratio=bottle_ratio,
                       num_features=int(channels[-1] * feat_mult), act=act, attn_layer=attn_layer,
                       se_rd_ratio=se_rd_ratio, skipinit=False, same_padding=False, gamma_in_act=False)


def _nfreg_cfg(depths, channels=(48, 104, 208, 440)) -> NFNetConfig:
    return NFNetConfig(depths=depths, channels=channels, stem_type="3x3", stem_chs=None, group_size=8,
                       width_factor=0.75, bottle_ratio=2.25, num_features=1280 * channels[-1] // 440, reg=True,
                       act="silu", extra_conv=False, skipinit=False, same_padding=False, gamma_in_act=False)


def _nfres_cfg(depths, attn_layer=None) -> NFNetConfig:
    return NFNetConfig(depths=depths, channels=(256, 512, 1024, 2048), stem_type="7x7_pool", stem_chs=64,
                       bottle_ratio=0.25, group_size=None, act="relu", attn_layer=attn_layer,
                       se_rd_ratio=1 / 16 if attn_layer == "se" else 0.5, num_features=0, extra_conv=False,
                       skipinit=False, same_padding=False, gamma_in_act=False)


_L = dict(group_size=64, bottle_ratio=0.25, act="silu")
MODEL_CFGS: dict[str, NFNetConfig] = (
    {f"dm_nfnet_{v}": NFNetConfig(depths=VARIANTS[v][0]) for v in VARIANTS if v != "f7"}
    | {f"nfnet_{v}": _nfnet_cfg(VARIANTS[v][0]) for v in VARIANTS}
    | {"nfnet_l0": _nfnet_cfg((1, 2, 6, 3), feat_mult=1.5, se_rd_ratio=0.25, **_L)}
    | {f"eca_nfnet_l{i}": _nfnet_cfg(VARIANTS[f"f{i}"][0], feat_mult=1.5 if i == 0 else 2.0, attn_layer="eca", **_L)
       for i in range(4)}
    | {"nf_regnet_b0": _nfreg_cfg((1, 3, 6, 6)), "nf_regnet_b1": _nfreg_cfg((2, 4, 7, 7)),
       "nf_regnet_b2": _nfreg_cfg((2, 4, 8, 8), (56, 112, 232, 488)),
       "nf_regnet_b3": _nfreg_cfg((2, 5, 9, 9), (56, 128, 248, 528)),
       "nf_regnet_b4": _nfreg_cfg((2, 6, 11, 11), (64, 144, 288, 616)),
       "nf_regnet_b5": _nfreg_cfg((3, 7, 14, 14), (80, 168, 336, 704))}
    | {f"nf_{kind}resnet{d}": _nfres_cfg(depths, attn)
       for kind, attn in (("", None), ("se", "se"), ("eca", "eca"))
       for d, depths in ((26, (2, 2, 2, 2)), (50, (3, 4, 6, 3)), (101, (3, 4, 23, 3)))}
)
MODEL_NAMES = tuple(MODEL_CFGS)
# The paper's variant names build the dm_nfnet design; "f7", the paper's F7, has no timm name.
_CFG_OF = MODEL_CFGS | {"f7": NFNetConfig(depths=VARIANTS["f7"][0])}
VARIANT_NAMES = tuple(VARIANTS) + MODEL_NAMES

# timm's data configs (timm/models/nfnet.py: _dcfg and default_cfgs), as timm's
# PretrainedCfg.to_dict() holds them, without the weight locations (url, hf_hub_id): nfkernels
# downloads nothing. Per model: (pool_size, input_size, test_input_size or None, crop_pct, extra).
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_BASE_CFG = dict(custom_load=False, input_size=(3, 224, 224), fixed_input_size=False, interpolation="bicubic",
                 crop_pct=0.9, crop_mode="center", mean=_IMAGENET_MEAN, std=_IMAGENET_STD, num_classes=1000,
                 pool_size=(7, 7), first_conv="stem.conv1", classifier="head.fc", license="apache-2.0")
_F_SIZES = {"f0": ((6, 6), 192, 256), "f1": ((7, 7), 224, 320), "f2": ((8, 8), 256, 352),
            "f3": ((10, 10), 320, 416), "f4": ((12, 12), 384, 512), "f5": ((13, 13), 416, 544),
            "f6": ((14, 14), 448, 576), "f7": ((15, 15), 480, 608)}
_DM_CROP = {"f0": 0.9, "f1": 0.91, "f2": 0.92, "f3": 0.94, "f4": 0.951, "f5": 0.954, "f6": 0.956}
_STEM_CONV = dict(first_conv="stem.conv")
_DATA_CFGS = (
    {f"dm_nfnet_{v}": (*_F_SIZES[v], _DM_CROP[v], dict(tag="dm_in1k", crop_mode="squash")) for v in _DM_CROP}
    | {f"nfnet_{v}": (*_F_SIZES[v], 0.9, {}) for v in _F_SIZES}
    # No dm_nfnet_f7 in timm: the paper's F7 takes the resolutions of timm's nfnet_f7 entry.
    | {"f7": (*_F_SIZES["f7"], 0.9, {})}
    | {"nfnet_l0": ((7, 7), 224, 288, 0.9, dict(tag="ra2_in1k", test_crop_pct=1.0)),
       "eca_nfnet_l0": ((7, 7), 224, 288, 0.9, dict(tag="ra2_in1k", test_crop_pct=1.0)),
       "eca_nfnet_l1": ((8, 8), 256, 320, 0.9, dict(tag="ra2_in1k", test_crop_pct=1.0)),
       "eca_nfnet_l2": ((10, 10), 320, 384, 0.9, dict(tag="ra3_in1k", test_crop_pct=1.0)),
       "eca_nfnet_l3": ((11, 11), 352, 448, 0.9, dict(test_crop_pct=1.0)),
       "nf_regnet_b0": ((6, 6), 192, 256, 0.9, _STEM_CONV),
       "nf_regnet_b1": ((8, 8), 256, 288, 0.9, dict(_STEM_CONV, tag="ra2_in1k")),
       "nf_regnet_b2": ((8, 8), 240, 272, 0.9, _STEM_CONV),
       "nf_regnet_b3": ((9, 9), 288, 320, 0.9, _STEM_CONV),
       "nf_regnet_b4": ((10, 10), 320, 384, 0.9, _STEM_CONV),
       "nf_regnet_b5": ((12, 12), 384, 456, 0.9, _STEM_CONV),
       "nf_resnet50": ((8, 8), 256, 288, 0.94, dict(_STEM_CONV, tag="ra2_in1k"))}
    | {f"nf_{kind}resnet{d}": ((7, 7), 224, None, 0.9, _STEM_CONV)
       for kind in ("", "se", "eca") for d in (26, 50, 101) if f"nf_{kind}resnet{d}" != "nf_resnet50"}
)


def pretrained_cfg_for(variant: str | None) -> dict:
    """timm's ``pretrained_cfg`` dict for a model name (None: a custom NFNetConfig, which gets the
    defaults of timm's nfnet.py). A fresh dict, so that editing one model's leaves the others'."""
    cfg = copy.deepcopy(_BASE_CFG)
    if variant is None:
        return cfg
    key = _resolve_variant("pretrained_cfg_for", variant)
    pool, size, test_size, crop_pct, extra = _DATA_CFGS[key]
    cfg.update(pool_size=pool, input_size=(3, size, size), crop_pct=crop_pct, **copy.deepcopy(extra))
    if test_size is not None:
        cfg["test_input_size"] = (3, test_size, test_size)
    if key in MODEL_CFGS:
        cfg["architecture"] = key
    return cfg


def _variant_list() -> str:
    return ("'f0' … 'f7' (NFNet-F0 … F7 in DeepMind's design) or one of timm's NormFreeNet names: "
            "'dm_nfnet_f0' … 'dm_nfnet_f6', 'nfnet_f0' … 'nfnet_f7', 'nfnet_l0', "
            "'eca_nfnet_l0' … 'eca_nfnet_l3', "
            "'nf_regnet_b0' … 'nf_regnet_b5', 'nf_resnet26/50/101', 'nf_seresnet26/50/101', 'nf_ecaresnet26/50/101'")


def _resolve_variant(op: str, variant: object) -> str:
    """The _CFG_OF key for a model name ('f0' … 'f7' or a timm name, any case)."""
    if not isinstance(variant, str):
        raise TypeError(f"{op}: variant must be a str such as 'f0' or 'eca_nfnet_l0'; got {type(variant).__name__}")
    name = variant.strip().lower()
    if name in _CFG_OF:
        return name
    if name in VARIANTS:
        return TIMM_NAMES[name]
    if name == "dm_nfnet_f7":
        raise ValueError(f"{op}: timm has no dm_nfnet_f7 (nor weights for it); the paper's F7 in the dm_nfnet "
                         f"design is variant 'f7', timm's own design is 'nfnet_f7'")
    raise ValueError(f"{op}: variant must be one of {_variant_list()}; got {variant!r}")


def config_from_timm(cfg) -> NFNetConfig:
    """The NFNetConfig of a timm ``NfCfg`` (or of a dict of its fields, e.g. ``dataclasses.asdict``):
    ``NFNet(config_from_timm(timm.models.nfnet.model_cfgs[name]))`` is timm's model. Raises
    ValueError for what NFNet does not build (attention kwargs other than SE's rd_ratio and
    rd_divisor, an attention layer other than "se" and "eca", an unknown activation)."""
    op = "config_from_timm"
    if not isinstance(cfg, dict):
        if not hasattr(cfg, "__dataclass_fields__"):
            raise TypeError(f"{op}: cfg must be a timm NfCfg or a dict of its fields; got {type(cfg).__name__}")
        cfg = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    cfg = dict(cfg)
    attn_kwargs = dict(cfg.pop("attn_kwargs", None) or {})
    attn_layer = cfg.get("attn_layer")
    known = {"rd_ratio", "rd_divisor"} if attn_layer == "se" else set()
    if set(attn_kwargs) - known:
        raise ValueError(f"{op}: attn_kwargs {sorted(set(attn_kwargs) - known)} of attn_layer {attn_layer!r} "
                         f"are not supported (SE takes rd_ratio and rd_divisor; ECA takes none)")
    # SEModule's defaults; without SE the fields keep NFNetConfig's (they are unused).
    out = dict(se_rd_ratio=attn_kwargs.get("rd_ratio", 1 / 16), se_rd_divisor=attn_kwargs.get("rd_divisor", 8)) \
        if attn_layer == "se" else {}
    if "act_layer" in cfg:
        cfg["act"] = cfg.pop("act_layer")
    names = {f.name for f in fields(NFNetConfig)}
    unknown = set(cfg) - names
    if unknown:
        raise ValueError(f"{op}: unknown NfCfg fields {sorted(unknown)}")
    # timm's NfCfg defaults, where ours (DeepMind's F design) differ.
    timm_defaults = dict(stem_type="3x3", stem_chs=None, group_size=None, attn_layer=None, bottle_ratio=0.5,
                         num_features=0, extra_conv=False, gamma_in_act=False, same_padding=False, skipinit=False,
                         act="silu")
    merged = {**timm_defaults, **out, **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}}
    return NFNetConfig(**merged)


def _check_config(op: str, cfg: NFNetConfig) -> None:
    if cfg.stem_type not in STEM_TYPES:
        raise ValueError(f"{op}: cfg.stem_type must be one of {STEM_TYPES}; got {cfg.stem_type!r}")
    if cfg.attn_layer is not None and cfg.attn_layer not in ATTN_LAYERS:
        raise ValueError(f"{op}: cfg.attn_layer must be one of {ATTN_LAYERS} or None; got {cfg.attn_layer!r}")
    if cfg.act not in NF_GAMMA:
        raise ValueError(f"{op}: cfg.act must be one of {tuple(NF_GAMMA)}; got {cfg.act!r}")
    if len(cfg.depths) != len(cfg.channels):
        raise ValueError(f"{op}: cfg.depths and cfg.channels must have one entry per stage; got "
                         f"{len(cfg.depths)} and {len(cfg.channels)}")


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
    """timm's ``create_stem``: 'deep_quad' (3×3 convs, strides 2, 1, 1, 2: NFNet-F/L), 'deep' and
    'deep_tiered' (three 3×3 convs), '3x3' (NF-RegNet), '7x7' or '' (NF-ResNet), and the '_pool'
    forms that end in a 3×3/2 max pool. Scaled activations (the previous conv's bias fused in)
    between the convs, none after the last; module names as timm's (conv1 …, or conv; pool)."""

    def __init__(self, in_chans: int, out_chs: int, stem_type: str, act: str, act_gamma: float, **conv_kw):
        layers = OrderedDict()
        if "deep" in stem_type:
            if "quad" in stem_type:
                widths, strides = (out_chs // 8, out_chs // 4, out_chs // 2, out_chs), (2, 1, 1, 2)
            elif "tiered" in stem_type:
                widths, strides = (3 * out_chs // 8, out_chs // 2, out_chs), (2, 1, 1)
            else:
                widths, strides = (out_chs // 2, out_chs // 2, out_chs), (2, 1, 1)
            for i, (c, s) in enumerate(zip(widths, strides)):
                layers[f"conv{i + 1}"] = WSConv2d(in_chans, c, 3, stride=s, **conv_kw)
                in_chans = c
        else:
            layers["conv"] = WSConv2d(in_chans, out_chs, 3 if "3x3" in stem_type else 7, stride=2, **conv_kw)
        if "pool" in stem_type:
            layers["pool"] = nn.MaxPool2d(3, stride=2, padding=1)
        super().__init__(layers)
        self.act, self.gamma = act, act_gamma
        self.stride = 4 if "quad" in stem_type or "pool" in stem_type else 2
        # timm's stem feature: the conv at stride 2, before its activation.
        tap = "conv3" if "quad" in stem_type else "conv2" if "deep" in stem_type else "conv"
        self.feature_info = dict(num_chs=getattr(self, tap).out_channels, reduction=2, module=f"stem.{tap}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = [m for m in self if isinstance(m, WSConv2d)]
        for conv in convs[:-1]:
            x = scaled_act(conv.conv(x, None), conv.bias, act=self.act, gamma=self.gamma)
        x = convs[-1](x)
        return self.pool(x) if hasattr(self, "pool") else x


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
    """Normalizer-Free Network (timm NormFreeNet): stem, stages of NFBlocks, final 1×1 conv (none
    when ``cfg.num_features`` is 0), activation, head.

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
        _check_config(op, cfg)
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
        # γ in every activation (DeepMind), or folded into every conv's standardization (timm).
        self.act, self.gamma = act, NF_GAMMA[act] if cfg.gamma_in_act else 1.0
        conv_kw = dict(eps=1e-4 if deepmind else cfg.std_conv_eps, eps_mode=flavor,
                       padding="same" if cfg.same_padding else None,
                       gamma=1.0 if cfg.gamma_in_act else NF_GAMMA[act])
        stem_chs = make_divisible((cfg.stem_chs or cfg.channels[0]) * cfg.width_factor, cfg.ch_div)
        self.stem = Stem(in_chans, stem_chs, cfg.stem_type, act, self.gamma, **conv_kw)
        self.feature_info = [dict(self.stem.feature_info)]

        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace(0, rate, total)
        attn_kwargs = dict(rd_ratio=cfg.se_rd_ratio, rd_divisor=cfg.se_rd_divisor) if cfg.attn_layer == "se" else {}
        prev_chs, expected_var, block_id, stages, net_stride = stem_chs, 1.0, 0, [], self.stem.stride
        for stage_idx, depth in enumerate(cfg.depths):
            stride = 1 if stage_idx == 0 and self.stem.stride > 2 else 2
            net_stride *= stride
            out_chs = make_divisible(cfg.channels[stage_idx] * cfg.width_factor, cfg.ch_div)
            blocks = []
            for block_idx in range(depth):
                blocks.append(NFBlock(
                    prev_chs, out_chs, stride=stride if block_idx == 0 else 1,
                    alpha=cfg.alpha, beta=expected_var ** -0.5,
                    bottle_ratio=1.0 if cfg.reg and stage_idx == 0 and block_idx == 0 else cfg.bottle_ratio,
                    group_size=cfg.group_size, ch_div=cfg.ch_div, reg=cfg.reg, extra_conv=cfg.extra_conv,
                    skipinit=cfg.skipinit, attn_layer=cfg.attn_layer, attn_kwargs=attn_kwargs,
                    attn_gain=cfg.attn_gain, act=act, gamma=self.gamma, conv_gamma=conv_kw["gamma"],
                    same_padding=cfg.same_padding, eps=conv_kw["eps"], eps_mode=flavor,
                    drop_path_rate=rates[block_id], drop_path_scale_by_keep=not deepmind))
                if block_idx == 0:
                    expected_var = 1.0  # the shortcut is re-projected: variance restarts at 1
                expected_var += cfg.alpha ** 2
                prev_chs, block_id = out_chs, block_id + 1
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=prev_chs, reduction=net_stride, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)
        if cfg.num_features:
            self.num_features = make_divisible(cfg.width_factor * cfg.num_features, cfg.ch_div)
            self.final_conv = WSConv2d(prev_chs, self.num_features, 1, **conv_kw)
            # As in timm, the final conv's output replaces the last stage's as the deepest feature.
            self.feature_info[-1] = dict(num_chs=self.num_features, reduction=net_stride, module="final_conv")
        else:  # NF-ResNets: the last stage's output, activated, goes to the head
            self.num_features = prev_chs
            self.final_conv = nn.Identity()
        self.head_hidden_size = self.num_features
        self.head = ClassifierHead(self.num_features, num_classes, cfg.drop_rate, global_pool)
        self.pretrained_cfg = pretrained_cfg_for(None)
        self.pretrained_cfg["first_conv"] = f"stem.{next(iter(self.stem._modules))}"  # conv1 or conv
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's initialisation: fc N(0, 0.01) (zeros with cfg.zero_init_fc), convs Kaiming-normal
        (fan-in, linear), zero biases; ECA's 1-D conv keeps PyTorch's default, as in timm."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and "fc" in name:
                if self.cfg.zero_init_fc:
                    nn.init.zeros_(m.weight)
                else:
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
        tasks) can take the activated final-conv map (the last stage's without a final conv),
        (N, num_features, H/32, W/32).

        Every conv weight is standardized at the start, in one launch (nfkernels.nn.conv's
        ``begin_batched_standardization``), and every gradient of them in one launch."""
        _check_images("NFNet", x, self.in_chans)
        token = begin_batched_standardization(self)
        try:
            x = self._stages(self.stem(x))
            if isinstance(self.final_conv, WSConv2d):
                return scaled_act(self.final_conv.conv(x, None), self.final_conv.bias, act=self.act, gamma=self.gamma)
            return scaled_act(x, None, act=self.act, gamma=self.gamma)  # no final conv (NF-ResNets)
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
    the stem's tap at stride 2 — stem.conv3 of the deep_quad stem, stem.conv2 of the other deep
    stems, stem.conv otherwise —, stages.0–2 and final_conv at 32, or stages.3 where there is no
    final conv). As in timm the stem and final-conv taps are the conv outputs before their
    activation (and before the stem's pool), modules after the last tap are dropped, and the
    modules are registered under timm's flattened names (stem_conv1 …, stem_pool, stages_0 …,
    final_conv), so a timm features_only state dict loads with strict=True::

        feats = nfkernels.models.dm_nfnet_f0(features_only=True)
        feats.load_state_dict(timm.create_model("dm_nfnet_f0", features_only=True, pretrained=True).state_dict())

    ``feature_info`` is a :class:`FeatureInfo` (``channels()``, ``reduction()``, ``module_name()``).
    """

    def __init__(self, model: NFNet, out_indices: int | tuple[int, ...] = (0, 1, 2, 3, 4)):
        super().__init__()
        if not isinstance(model, NFNet):
            raise TypeError(f"NFNetFeatures: model must be an NFNet; got {type(model).__name__}")
        n_stages, n_feats = len(model.stages), len(model.feature_info)
        indices = _check_out_indices(out_indices, n_feats)
        self.feature_info = FeatureInfo(copy.deepcopy(model.feature_info), indices)
        self.in_chans, self.act, self.gamma = model.in_chans, model.act, model.gamma
        self.grad_checkpointing = False
        last = indices[-1]
        stem_layers = list(model.stem.named_children())
        self._stem_tap = model.stem.feature_info["module"].removeprefix("stem.")
        if last == 0:  # nothing after the stem's tap
            stem_layers = stem_layers[: [name for name, _ in stem_layers].index(self._stem_tap) + 1]
        for name, layer in stem_layers:
            self.add_module(f"stem_{name}", layer)
        self._stem_names = [name for name, _ in stem_layers]
        self._has_final = isinstance(model.final_conv, WSConv2d)
        n_used = 0 if last == 0 else (n_stages if last == n_feats - 1 else last)
        for s in range(n_used):
            self.add_module(f"stages_{s}", model.stages[s])
        if self._has_final and last == n_feats - 1:
            self.final_conv = model.final_conv
        self._n_stages = n_used
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
        convs = [name for name in self._stem_names if isinstance(getattr(self, f"stem_{name}"), WSConv2d)]
        for name in self._stem_names:
            layer = getattr(self, f"stem_{name}")
            if not isinstance(layer, WSConv2d):  # the pool
                x = layer(x)
            elif name != self._stem_tap and name != convs[-1]:
                x = scaled_act(layer.conv(x, None), layer.bias, act=self.act, gamma=self.gamma)
            else:
                x = layer(x)
                if name == self._stem_tap and 0 in taps:
                    feats.append(x)
                if name != convs[-1]:
                    x = scaled_act(x, None, act=self.act, gamma=self.gamma)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        context_fn = batched_checkpoint_context() if checkpointing else None
        n_feats = len(self.feature_info)
        for s in range(self._n_stages):
            stage = getattr(self, f"stages_{s}")
            x = (torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False, context_fn=context_fn)
                 if checkpointing else stage(x))
            if s + 1 in taps and (s + 1 < n_feats - 1 or not self._has_final):
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
        if "tag" in _DATA_CFGS[key][4]:
            how = (f"to start from timm's ImageNet weights, build the model and load them: "
                   f'model.load_state_dict(timm.create_model("{key}", pretrained=True).state_dict())')
        elif key == "f7":
            how = "timm has no pretrained F7 either (no dm_nfnet_f7, and no weights for its nfnet_f7)"
        else:
            how = f"timm has no pretrained weights for {key} either"
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
    cfg = replace(_CFG_OF[key], **overrides)
    model = NFNet(cfg, num_classes=0 if features_only else num_classes, in_chans=in_chans, flavor=flavor,
                  global_pool=global_pool)
    model.pretrained_cfg = pretrained_cfg_for(key)
    if features_only:
        return NFNetFeatures(model, tuple(range(len(model.feature_info))) if out_indices is None else out_indices)
    return model


def nfnet(variant: str, num_classes: int = 1000, *, pretrained: bool = False, flavor: str = "timm",
          drop_rate: float | None = None, drop_path_rate: float | None = None, in_chans: int = 3,
          global_pool: str = "avg", features_only: bool = False, out_indices: int | tuple[int, ...] | None = None,
          **cfg_overrides) -> NFNet | NFNetFeatures:
    """Build a model by name: the paper's "f0" … "f7" (NFNet-F in DeepMind's design; "f0" … "f6"
    are timm's dm_nfnet_f0 … f6) or any of timm's NormFreeNet names in ``MODEL_NAMES``
    ("eca_nfnet_l0", "nf_regnet_b1", "nf_resnet50", …; case-insensitive). ``drop_rate`` /
    ``drop_path_rate`` default to 0 (as timm's); the paper's rates for F0–F7 come from
    :func:`paper_regularization`. Other NFNetConfig fields can be overridden by keyword.
    ``features_only=True`` (with timm's ``out_indices``) returns an :class:`NFNetFeatures`;
    ``pretrained=True`` raises, since nfkernels has no weights (see the module docstring for
    loading timm's)."""
    return _build("nfnet", variant, num_classes, pretrained=pretrained, flavor=flavor, drop_rate=drop_rate,
                  drop_path_rate=drop_path_rate, in_chans=in_chans, global_pool=global_pool,
                  features_only=features_only, out_indices=out_indices, **cfg_overrides)


def paper_regularization(variant: str) -> dict[str, float]:
    """The paper's dropout and stochastic-depth rates for an NFNet-F variant ("f0" … "f7",
    "dm_nfnet_fX" or timm's "nfnet_fX"), as keyword arguments: timm's defaults are 0, which
    under-regularizes a from-scratch ImageNet run."""
    op = "paper_regularization"
    key = _resolve_variant(op, variant)
    f = key.removeprefix("dm_").removeprefix("nfnet_")
    if f not in VARIANTS:
        raise ValueError(f"{op}: the paper gives rates for NFNet-F0 … F7 only ('f0' … 'f7', 'dm_nfnet_f0' … "
                         f"'dm_nfnet_f6', 'nfnet_f0' … 'nfnet_f7'); got {variant!r}")
    return {"drop_rate": VARIANTS[f][1], "drop_path_rate": PAPER_DROP_PATH_RATE}


def _describe(name: str) -> str:
    if name.startswith("dm_nfnet_f"):
        return f"NFNet-{name[-2:].upper()} in DeepMind's design (timm's {name})"
    if name.startswith("nfnet_f"):
        return f"timm's own NFNet-{name[-2:].upper()} ({name}: γ in the convs, no SkipInit; not DeepMind's dm_nfnet)"
    return f"timm's {name}"


def _timm_factory(name: str):
    def build(pretrained: bool = False, **kw) -> NFNet | NFNetFeatures:
        return _build(name, name, pretrained=pretrained, **kw)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{_describe(name)}, built from nfkernels' fused layers, with timm's name and signature "
                     f"({name}(pretrained=False, **kwargs)); state-dict compatible with timm's {name}. "
                     "Keywords as for nfnet().")
    return build


for _name in MODEL_NAMES:
    globals()[_name] = _timm_factory(_name)
del _name

__all__ = ["FeatureInfo", "MODEL_CFGS", "MODEL_NAMES", "NFNet", "NFNetConfig", "NFNetFeatures", "STEM_TYPES",
           "TIMM_NAMES", "TINY_CONFIG", "VARIANTS", "VARIANT_NAMES", "config_from_timm", "nfnet",
           "paper_regularization", "pretrained_cfg_for", *MODEL_NAMES]
