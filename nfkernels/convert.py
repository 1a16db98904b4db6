"""``nfkernels.convert(model)``: swap timm's NF layers for the fused ones, in place.

timm is not a dependency, so its classes are recognised by class name and checked by the
attributes their forward uses (timm ``layers/std_conv.py``, ``layers/activations.py``, GammaAct in
``models/nfnet.py``, ``layers/squeeze_excite.py`` SEModule, ``layers/eca.py`` EcaModule,
``models/nfnet.py`` NormFreeBlock):

    ScaledStdConv2d, ScaledStdConv2dSame  ->  nn.WSConv2d    (gamma = scale·sqrt(fan_in), same eps)
    GammaAct                              ->  nn.ScaledAct   (act from act_fn.__name__, its gamma)
    SEModule                              ->  nn.SqueezeExcite (keeps the fc1/fc2 modules)
    EcaModule                             ->  nn.EfficientChannelAttention (keeps the 1-D conv)
    NormFreeBlock                         ->  nn.NFBlock     (attention after conv3, or after the
                                                              3×3 convs with reg=True, or none)

A block's activations may be GammaAct (γ in the activation: dm_nfnet) or plain activation modules
(γ in the convs: timm's other NF models), torch's (ReLU, SiLU, GELU, …) or timm's (GELU,
GELUTanh, …), by module; every family timm ships (dm_nfnet, nfnet, nfnet_l, eca_nfnet_l,
nf_regnet, nf_resnet, nf_seresnet, nf_ecaresnet) fuses every block. The activations of timm's
stem and ``final_act`` are left as they are: single elementwise ops, with nothing to fuse into.

Parameters are carried over as the same ``nn.Parameter`` objects (an optimizer built before the
conversion still updates the converted model). A model with WSConv2d after the conversion
standardizes all their weights together on each call (``nn.batch_weight_standardization``: one
launch forward, one backward, instead of one per conv each way). Anything that does not fit exactly is left as it
is and reported with the reason; a block that cannot be fused still has its convs, activations
and SE converted one by one (timm's block forward calls them as plain modules).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from nfkernels.nn.act import ScaledAct
from nfkernels.nn.attn import EfficientChannelAttention, SqueezeExcite
from nfkernels.nn.block import DownsampleAvg, NFBlock
from nfkernels.nn.conv import WSConv2d, batch_weight_standardization
from nfkernels.ops.scaled_act import NF_GAMMA

STD_CONV_NAMES = ("ScaledStdConv2d", "ScaledStdConv2dSame")

# Activation names as timm's act functions / torch modules spell them, to nfkernels' names.
_ACT_ALIASES = {name: name for name in NF_GAMMA} | {"swish": "silu", "logsigmoid": "log_sigmoid"}
# timm's activation modules (layers/activations.py), by class name: not torch's classes.
_TIMM_ACT_MODULES = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "Swish": "silu", "SwishMe": "silu", "Sigmoid": "sigmoid",
                     "Tanh": "tanh"}
# Plain torch activation modules (γ = 1), e.g. a block whose γ lives in its convs instead.
_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.ReLU6: "relu6", nn.ELU: "elu", nn.CELU: "celu",
                nn.SELU: "selu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Softsign: "softsign",
                nn.Identity: "identity"}


class NotConvertible(Exception):
    """Why one module cannot become its fused equivalent (becomes a report entry)."""


@dataclass
class ConversionReport:
    """What ``convert`` did: ``converted`` lists (module path, timm class, nfkernels class);
    ``skipped`` lists (module path, reason) for every recognised timm module left unchanged."""

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def blocks_fused(self) -> int:
        """timm NormFreeBlocks that became fused NFBlocks."""
        return sum(timm_cls == "NormFreeBlock" for _, timm_cls, _ in self.converted)

    @property
    def blocks_left(self) -> list[tuple[str, str]]:
        """(path, reason) of the timm NormFreeBlocks left unfused."""
        return [(path, reason) for path, reason in self.skipped if reason.startswith("NormFreeBlock:")]

    def __str__(self) -> str:
        blocks = self.blocks_fused + len(self.blocks_left)
        lines = [f"converted {len(self.converted)} modules, skipped {len(self.skipped)}"
                 + (f"; fused {self.blocks_fused} of {blocks} NormFreeBlocks" if blocks else "")]
        lines += [f"  skipped {path or '<root>'}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def _class_name(m: object) -> str:
    return type(m).__name__


def _as_float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


# ----------------------------------------------------------------------------- single modules

def convert_std_conv(conv: nn.Module) -> WSConv2d:
    """timm ScaledStdConv2d / ScaledStdConv2dSame -> WSConv2d with the same parameters.

    timm: Ŵ = batch_norm(W, weight=gain·scale, eps) with scale = gamma·fan_in^-0.5, i.e.
    (W − μ)/sqrt(σ² + eps)·gain·gamma/sqrt(fan_in): WSConv2d's eps_mode="timm" with the same eps."""
    if not isinstance(conv, nn.Conv2d) or not all(hasattr(conv, a) for a in ("gain", "scale", "eps")):
        raise NotConvertible("not a ScaledStdConv2d (needs an nn.Conv2d with gain, scale and eps)")
    if isinstance(conv.padding, str):
        raise NotConvertible(f"string padding {conv.padding!r} (timm resolves padding to ints)")
    if conv.padding_mode != "zeros":
        raise NotConvertible(f"padding_mode {conv.padding_mode!r} (only 'zeros' is supported)")
    if not isinstance(conv.gain, torch.Tensor) or conv.gain.numel() != conv.out_channels:
        raise NotConvertible("gain is not a per-output-channel tensor")
    fan_in = conv.weight[0].numel()
    gamma = _as_float(conv.scale) * math.sqrt(fan_in)
    with torch.device("meta"):  # parameters are replaced below: allocate nothing
        new = WSConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                       bias=conv.bias is not None, gamma=gamma, eps=float(conv.eps), eps_mode="timm")
    new.weight, new.bias, new.gain = conv.weight, conv.bias, conv.gain
    new.same_pad = bool(getattr(conv, "same_pad", False))  # dynamic TF-SAME padding (ScaledStdConv2dSame)
    new.train(conv.training)
    return new


def activation_of(module: nn.Module) -> tuple[str, float]:
    """(nfkernels activation name, gamma) computed by a timm GammaAct or a plain torch activation."""
    if _class_name(module) == "GammaAct":
        fn = getattr(module, "act_fn", None)
        name = _ACT_ALIASES.get(getattr(fn, "__name__", None))
        if name is None:
            raise NotConvertible(f"GammaAct with an unsupported act_fn {fn!r}")
        return name, float(module.gamma)
    if isinstance(module, nn.GELU):
        return ("gelu" if module.approximate == "none" else "gelu_tanh"), 1.0
    if not isinstance(module, tuple(_ACT_MODULES)) and _class_name(module) in _TIMM_ACT_MODULES:
        return _TIMM_ACT_MODULES[_class_name(module)], 1.0
    if isinstance(module, nn.LeakyReLU) and module.negative_slope == 0.01:
        return "leaky_relu", 1.0
    for cls, name in _ACT_MODULES.items():
        if type(module) is cls:
            return name, 1.0
    raise NotConvertible(f"unsupported activation {_class_name(module)}")


def convert_gamma_act(module: nn.Module) -> ScaledAct:
    """timm GammaAct (act_fn(x)·gamma) -> ScaledAct(act, gamma)."""
    act, gamma = activation_of(module)
    return ScaledAct(act, gamma=gamma).train(module.training)


def _check_1x1(name: str, conv: object) -> None:
    if not (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1 and conv.dilation == (1, 1)):
        raise NotConvertible(f"{name} is not a plain 1x1 nn.Conv2d")


def convert_se(se: nn.Module) -> SqueezeExcite:
    """timm SEModule (x·sigmoid(fc2(relu(bn(fc1(mean_hw x)))))) -> SqueezeExcite with the same fc1/fc2.

    Fits when bn is Identity, act is ReLU, gate is sigmoid and add_maxpool is off."""
    if getattr(se, "add_maxpool", False):
        raise NotConvertible("SEModule with add_maxpool=True")
    for name in ("fc1", "fc2"):
        _check_1x1(name, getattr(se, name, None))
    if not isinstance(getattr(se, "bn", nn.Identity()), nn.Identity):
        raise NotConvertible("SEModule with a norm layer (bn is not Identity)")
    if type(getattr(se, "act", None)) is not nn.ReLU:
        raise NotConvertible(f"SEModule act is {_class_name(getattr(se, 'act', None))}, not ReLU")
    if type(getattr(se, "gate", None)) is not nn.Sigmoid and _class_name(getattr(se, "gate", None)) != "Sigmoid":
        raise NotConvertible(f"SEModule gate is {_class_name(getattr(se, 'gate', None))}, not sigmoid")
    if se.fc2.in_channels != se.fc1.out_channels or se.fc2.out_channels != se.fc1.in_channels:
        raise NotConvertible("SEModule fc1/fc2 shapes do not chain")
    with torch.device("meta"):
        new = SqueezeExcite(se.fc1.in_channels, rd_channels=se.fc1.out_channels)
    new.fc1, new.fc2 = se.fc1, se.fc2
    return new.train(se.training)


def convert_eca(eca: nn.Module) -> EfficientChannelAttention:
    """timm EcaModule (x·sigmoid(conv1d(mean_hw x))) -> EfficientChannelAttention with the same conv.

    Fits the paper's form timm's NF models use: a bias-free nn.Conv1d(1, 1, k), odd k, zero padding
    (k − 1)/2, stride and dilation 1, sigmoid gate; not timm's use_mlp experiment (conv2) nor
    CecaModule's circular padding."""
    conv = getattr(eca, "conv", None)
    if getattr(eca, "conv2", None) is not None or getattr(eca, "act", None) is not None:
        raise NotConvertible("EcaModule with use_mlp=True (conv, act, conv2) is not fused")
    if not (type(conv) is nn.Conv1d and conv.in_channels == 1 and conv.out_channels == 1 and conv.bias is None
            and conv.kernel_size[0] % 2 == 1 and conv.padding == ((conv.kernel_size[0] - 1) // 2,)
            and conv.stride == (1,) and conv.dilation == (1,) and conv.groups == 1
            and conv.padding_mode == "zeros"):
        raise NotConvertible("conv is not a bias-free nn.Conv1d(1, 1, k) with odd k and zero padding (k - 1)/2")
    gate = getattr(eca, "gate", None)
    if type(gate) is not nn.Sigmoid and _class_name(gate) != "Sigmoid":
        raise NotConvertible(f"EcaModule gate is {_class_name(gate)}, not sigmoid")
    with torch.device("meta"):
        new = EfficientChannelAttention(kernel_size=conv.kernel_size[0])
    new.conv = conv
    return new.train(eca.training)


_ATTN_CONVERTERS = {"SEModule": convert_se, "EcaModule": convert_eca}


def _as_attn(name: str, attn: nn.Module | None) -> nn.Module | None:
    if attn is None or isinstance(attn, (SqueezeExcite, EfficientChannelAttention)):
        return attn
    converter = _ATTN_CONVERTERS.get(_class_name(attn))
    if converter is None:
        raise NotConvertible(f"{name} is {_class_name(attn)}; only SEModule and EcaModule are fused")
    try:
        return converter(attn)
    except NotConvertible as err:
        raise NotConvertible(f"{name}: {err}") from None


def _drop_path_of(module: nn.Module | None) -> tuple[float, bool]:
    """(rate, scale_by_keep) of timm's DropPath, or (0, True) for Identity/None."""
    if module is None or isinstance(module, nn.Identity):
        return 0.0, True
    if _class_name(module) == "DropPath" and hasattr(module, "drop_prob"):
        return float(module.drop_prob), bool(getattr(module, "scale_by_keep", True))
    raise NotConvertible(f"drop_path is {_class_name(module)}, not timm's DropPath")


def _as_ws_conv(name: str, conv: nn.Module | None) -> WSConv2d | None:
    if conv is None or isinstance(conv, WSConv2d):
        return conv
    if _class_name(conv) not in STD_CONV_NAMES:
        raise NotConvertible(f"{name} is {_class_name(conv)}, not a ScaledStdConv2d")
    try:
        return convert_std_conv(conv)
    except NotConvertible as err:
        raise NotConvertible(f"{name}: {err}") from None


def convert_block(block: nn.Module) -> NFBlock:
    """timm NormFreeBlock -> NFBlock, or NotConvertible with the first piece that does not fit.

    timm forward: out = act1(x)·β; shortcut = downsample(out) or x; out = conv2(act2(conv1(out)));
    [out = conv2b(act2b(out))]; [out = attn_gain·attn(out)] (reg=True); out = conv3(act3(out));
    [out = attn_gain·attn_last(out)]; drop_path; ·skipinit_gain; out·α + shortcut. NFBlock needs
    the four activations to be one (act, γ)."""
    acts = [(name, getattr(block, name)) for name in ("act1", "act2", "act2b", "act3")
            if getattr(block, name, None) is not None]
    kinds = set()
    for name, module in acts:
        try:
            kinds.add(activation_of(module))
        except NotConvertible as err:
            raise NotConvertible(f"{name}: {err}") from None
    if len(kinds) != 1:
        raise NotConvertible(f"the block's activations differ: {sorted(kinds)}")
    act, gamma = kinds.pop()
    if (getattr(block, "conv2b", None) is None) != (getattr(block, "act2b", None) is None):
        raise NotConvertible("conv2b and act2b must be both present or both absent")
    attn = _as_attn("attn", getattr(block, "attn", None))
    attn_last = _as_attn("attn_last", getattr(block, "attn_last", None))
    downsample = getattr(block, "downsample", None)
    if downsample is not None:
        if not hasattr(downsample, "pool") or not hasattr(downsample, "conv"):
            raise NotConvertible(f"downsample is {_class_name(downsample)}, not DownsampleAvg (pool, conv)")
        downsample = DownsampleAvg.from_parts(downsample.pool, _as_ws_conv("downsample.conv", downsample.conv))
    drop_path_rate, scale_by_keep = _drop_path_of(getattr(block, "drop_path", None))
    skip = getattr(block, "skipinit_gain", None)
    if skip is not None and (not isinstance(skip, torch.Tensor) or skip.numel() != 1):
        raise NotConvertible("skipinit_gain is not a scalar tensor")
    new = NFBlock.from_parts(
        conv1=_as_ws_conv("conv1", block.conv1), conv2=_as_ws_conv("conv2", block.conv2),
        conv2b=_as_ws_conv("conv2b", getattr(block, "conv2b", None)), conv3=_as_ws_conv("conv3", block.conv3),
        downsample=downsample, attn_last=attn_last, skipinit_gain=skip, alpha=_as_float(block.alpha),
        beta=_as_float(block.beta), attn_gain=_as_float(block.attn_gain), act=act, gamma=gamma,
        drop_path_rate=drop_path_rate, drop_path_scale_by_keep=scale_by_keep, attn=attn)
    return new.train(block.training)


# ----------------------------------------------------------------------------- the walk

_CONVERTERS = {
    "NormFreeBlock": convert_block,
    "ScaledStdConv2d": convert_std_conv,
    "ScaledStdConv2dSame": convert_std_conv,
    "GammaAct": convert_gamma_act,
    **_ATTN_CONVERTERS,
}


def _convert_children(parent: nn.Module, prefix: str, report: ConversionReport) -> None:
    for name, child in list(parent.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        converter = _CONVERTERS.get(_class_name(child))
        if converter is not None:
            try:
                new = converter(child)
            except NotConvertible as err:
                report.skipped.append((path, f"{_class_name(child)}: {err}"))
            else:
                setattr(parent, name, new)
                report.converted.append((path, _class_name(child), _class_name(new)))
                continue
        _convert_children(child, path, report)


def convert(model: nn.Module) -> ConversionReport:
    """Replace timm's ScaledStdConv2d(Same), GammaAct, SEModule, EcaModule and NormFreeBlock inside
    ``model`` by nfkernels' WSConv2d, ScaledAct, SqueezeExcite, EfficientChannelAttention and NFBlock
    (the module docstring lists what fits), in place, keeping the parameter
    objects; outputs and gradients are unchanged (up to rounding), and every call of ``model``
    standardizes all its conv weights in one launch (``nn.batch_weight_standardization``; timm's
    ``grad_checkpointing`` makes training calls go conv by conv). Returns a ConversionReport whose
    ``skipped`` lists (module path, reason) for what was left alone, and ``blocks_fused`` /
    ``blocks_left`` say how many NormFreeBlocks were fused. ``model`` itself is converted
    only through its children; pass a container to convert a bare block.

    Converting nothing is almost always a mistake (a model that is not timm's, already converted,
    or a bare layer passed as ``model``), and the report alone is easy to ignore: it warns
    (UserWarning)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module; got {type(model).__name__}")
    report = ConversionReport()
    _convert_children(model, "", report)
    if any(isinstance(m, WSConv2d) for m in model.modules()):
        batch_weight_standardization(model)
    if not report.converted:
        skipped = (f"; {len(report.skipped)} recognised timm module(s) did not fit (see the report's skipped)"
                   if report.skipped else "")
        warnings.warn(
            f"convert: nothing was converted in {type(model).__name__}{skipped}. convert replaces timm's "
            f"{', '.join(_CONVERTERS)} (recognised by class name) among the model's submodules; the "
            "model passed in is not replaced itself (wrap a bare layer in nn.Sequential), and "
            "nfkernels layers are left as they are.", UserWarning, stacklevel=2)
    return report
