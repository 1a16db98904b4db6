"""timm 1.0.29's NormFreeNet (models/nfnet.py) and the layers it uses, re-implemented for the tests.

timm cannot be imported by the tests (it needs torchvision, which has no build for every torch), so
this module rebuilds what ``timm.models.nfnet.NormFreeNet`` builds, with timm's class names,
attribute names, module order and parameter names: ``nfkernels.convert`` recognises timm modules
by ``type(m).__name__`` and attributes, and timm's state dicts load here with ``strict=True``.
``tests/test_timm_nf_reference.py`` checks it against timm's own numbers in tests/data/.

Sources (timm 1.0.29): models/nfnet.py, layers/std_conv.py, layers/padding.py, layers/activations.py,
layers/create_act.py, layers/create_attn.py, layers/squeeze_excite.py, layers/eca.py, layers/drop.py,
layers/classifier.py, layers/adaptive_avgmax_pool.py, layers/helpers.py, utils/agc.py. Left out: device/dtype
arguments, dilation (output_stride other than 32), attention types other than 'se'/'eca', pooling
types other than 'avg'/'', exportable/scriptable activation variants, feature extraction wrappers.
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# ----------------------------------------------------------------------------- layers/helpers.py
def make_divisible(v, divisor=8, min_value=None, round_limit=.9):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:  # round down by no more than 10%
        new_v += divisor
    return new_v


# ----------------------------------------------------------------------------- layers/padding.py
def get_padding(kernel_size, stride=1, dilation=1, **_):
    if any(isinstance(v, (tuple, list)) for v in (kernel_size, stride, dilation)):
        return [get_padding(*a) for a in zip(*(_pair(v) for v in (kernel_size, stride, dilation)))]
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def is_static_pad(kernel_size, stride=1, dilation=1, **_):
    if any(isinstance(v, (tuple, list)) for v in (kernel_size, stride, dilation)):
        return all(is_static_pad(*a) for a in zip(*(_pair(v) for v in (kernel_size, stride, dilation))))
    return stride == 1 and (dilation * (kernel_size - 1)) % 2 == 0


def get_same_padding(x, kernel_size, stride, dilation):
    return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def pad_same(x, kernel_size, stride, dilation=(1, 1), value=0):
    """TF 'SAME' padding of x for a conv: the odd pixel goes to the bottom/right."""
    ih, iw = x.size()[-2:]
    pad_h = get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


def get_padding_value(padding, kernel_size, **kwargs):
    """(padding, is_dynamic): 'same' is static (symmetric ints) when stride 1 allows it."""
    dynamic = False
    if isinstance(padding, str):
        padding = padding.lower()
        if padding == 'same':
            if is_static_pad(kernel_size, **kwargs):
                padding = get_padding(kernel_size, **kwargs)
            else:
                padding, dynamic = 0, True
        elif padding == 'valid':
            padding = 0
        else:
            padding = get_padding(kernel_size, **kwargs)
    return padding, dynamic


# ----------------------------------------------------------------------------- layers/std_conv.py
def _scaled_std_weight(conv):
    return F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None,
                        weight=(conv.gain * conv.scale).view(-1), training=True, momentum=0.,
                        eps=conv.eps).reshape_as(conv.weight)


class ScaledStdConv2d(nn.Conv2d):
    """Conv2d with scaled weight standardization: Ŵ = (W − μ)/sqrt(σ² + eps)·gain·gamma/sqrt(fan_in)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=True, gamma=1.0, eps=1e-6, gain_init=1.0):
        if padding is None:
            padding = get_padding(kernel_size, stride, dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.scale = gamma * self.weight[0].numel() ** -0.5  # gamma / sqrt(fan_in)
        self.eps = eps
        self.gain_init = gain_init
        self.gain = nn.Parameter(torch.empty((self.out_channels, 1, 1, 1)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if hasattr(self, 'gain'):  # nn.Conv2d.__init__'s own call finds no gain yet and does nothing
            nn.init.constant_(self.gain, self.gain_init)
            nn.Conv2d.reset_parameters(self)

    def forward(self, x):
        return F.conv2d(x, _scaled_std_weight(self), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class ScaledStdConv2dSame(nn.Conv2d):
    """ScaledStdConv2d with TF 'SAME' padding: static when possible, else dynamic (same_pad=True)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding='SAME', dilation=1, groups=1,
                 bias=True, gamma=1.0, eps=1e-6, gain_init=1.0):
        padding, is_dynamic = get_padding_value(padding, kernel_size, stride=stride, dilation=dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.same_pad = is_dynamic
        self.eps = eps
        self.gain_init = gain_init
        self.gain = nn.Parameter(torch.empty((self.out_channels, 1, 1, 1)))
        self.reset_parameters()

    reset_parameters = ScaledStdConv2d.reset_parameters  # no zero-argument super() in it, so shareable

    def forward(self, x):
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, _scaled_std_weight(self), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


# ----------------------------------------------------------------------------- layers/activations.py
def swish(x, inplace: bool = False):
    return x.mul_(x.sigmoid()) if inplace else x.mul(x.sigmoid())


def mish(x, inplace: bool = False):
    return x.mul(F.softplus(x).tanh())


def sigmoid(x, inplace: bool = False):
    return x.sigmoid_() if inplace else x.sigmoid()


def tanh(x, inplace: bool = False):
    return x.tanh_() if inplace else x.tanh()


def gelu(x, inplace: bool = False):
    return F.gelu(x)


def gelu_tanh(x, inplace: bool = False):
    return F.gelu(x, approximate='tanh')


def quick_gelu(x, inplace: bool = False):
    return x * torch.sigmoid(1.702 * x)


class Sigmoid(nn.Module):
    """timm's Sigmoid (not nn.Sigmoid): what create_act_layer('sigmoid') gives, e.g. SE/ECA gates."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return x.sigmoid_() if self.inplace else x.sigmoid()


class Tanh(nn.Module):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return x.tanh_() if self.inplace else x.tanh()


class GELU(nn.Module):
    """timm's GELU module (not nn.GELU; the inplace argument is ignored)."""

    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, input):
        return F.gelu(input)


class GELUTanh(nn.Module):
    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, input):
        return F.gelu(input, approximate='tanh')


class QuickGELU(nn.Module):
    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, input):
        return quick_gelu(input)


# ----------------------------------------------------------------------------- layers/create_act.py
# What timm returns when not exporting/scripting (its "memory-efficient" table first, then the default
# one; with a torch that has F.silu/F.mish/F.hardsigmoid/F.hardswish these are the native ones).
_ACT_FNS = dict(
    silu=F.silu, swish=F.silu, mish=F.mish, relu=F.relu, relu6=F.relu6, leaky_relu=F.leaky_relu, elu=F.elu,
    celu=F.celu, selu=F.selu, gelu=gelu, gelu_tanh=gelu_tanh, quick_gelu=quick_gelu, sigmoid=sigmoid,
    tanh=tanh, hard_sigmoid=F.hardsigmoid, hard_swish=F.hardswish, hardsigmoid=F.hardsigmoid,
    hardswish=F.hardswish,
)
_ACT_LAYERS = dict(
    silu=nn.SiLU, swish=nn.SiLU, mish=nn.Mish, relu=nn.ReLU, relu6=nn.ReLU6, leaky_relu=nn.LeakyReLU,
    elu=nn.ELU, celu=nn.CELU, selu=nn.SELU, gelu=GELU, gelu_tanh=GELUTanh, quick_gelu=QuickGELU,
    sigmoid=Sigmoid, tanh=Tanh, hard_sigmoid=nn.Hardsigmoid, hard_swish=nn.Hardswish, hardsigmoid=nn.Hardsigmoid,
    hardswish=nn.Hardswish, identity=nn.Identity,
)


def get_act_fn(name='relu'):
    """Activation function by name (a callable is returned as is; falsy gives None)."""
    if not name:
        return None
    if callable(name):
        return name
    return _ACT_FNS[name.lower()]


def get_act_layer(name='relu'):
    """Activation module class by name (a non-string is returned as is; None/'' gives None)."""
    if name is None:
        return None
    if not isinstance(name, str):
        return name
    if not name:
        return None
    return _ACT_LAYERS[name.lower()]


def create_act_layer(name, inplace=None, **kwargs):
    act_layer = get_act_layer(name)
    if act_layer is None:
        return None
    if inplace is None:
        return act_layer(**kwargs)
    try:
        return act_layer(inplace=inplace, **kwargs)
    except TypeError:  # no inplace argument
        return act_layer(**kwargs)


# ----------------------------------------------------------------------------- models/nfnet.py: activations
# from https://github.com/deepmind/deepmind-research/tree/master/nfnets (timm's _nonlin_gamma)
NONLIN_GAMMA = dict(
    identity=1.0, celu=1.270926833152771, elu=1.2716004848480225, gelu=1.7015043497085571,
    leaky_relu=1.70590341091156, log_sigmoid=1.9193484783172607, log_softmax=1.0002083778381348,
    relu=1.7139588594436646, relu6=1.7131484746932983, selu=1.0008515119552612, sigmoid=4.803835391998291,
    silu=1.7881293296813965, softsign=2.338853120803833, softplus=1.9203323125839233, tanh=1.5939117670059204,
)
_nonlin_gamma = NONLIN_GAMMA


class GammaAct(nn.Module):
    """act_fn(x)·gamma; act_type is a name for get_act_fn or a callable f(x, inplace=...)."""

    def __init__(self, act_type='relu', gamma: float = 1.0, inplace: bool = False):
        super().__init__()
        self.act_fn = get_act_fn(act_type)
        self.gamma = gamma
        self.inplace = inplace

    def forward(self, x):
        return self.act_fn(x, inplace=self.inplace).mul_(self.gamma)


def act_with_gamma(act_type, gamma: float = 1.) -> Callable:
    """A factory ``(inplace=False) -> GammaAct(act_type, gamma, inplace)``, as timm's act_layer."""
    def _create(inplace: bool = False) -> GammaAct:
        return GammaAct(act_type, gamma=gamma, inplace=inplace)
    return _create


# ----------------------------------------------------------------------------- attention
class SEModule(nn.Module):
    """timm layers/squeeze_excite.py: x·gate(fc2(act(bn(fc1(mean_hw x)))))."""

    def __init__(self, channels, rd_ratio=1. / 16, rd_channels=None, rd_divisor=8, add_maxpool=False, bias=True,
                 act_layer=nn.ReLU, norm_layer=None, gate_layer='sigmoid'):
        super().__init__()
        self.add_maxpool = add_maxpool
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias)
        self.bn = norm_layer(rd_channels) if norm_layer else nn.Identity()
        self.act = create_act_layer(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias)
        self.gate = create_act_layer(gate_layer)

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


def eca_kernel_size(channels, gamma=2, beta=1):
    """timm's EcaModule kernel size for ``channels``: the odd number near (log2(C) + beta)/gamma, at least 3."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


class EcaModule(nn.Module):
    """timm layers/eca.py: x·gate(conv1d(mean_hw x over channels)), kernel size from channels."""

    def __init__(self, channels=None, kernel_size=3, gamma=2, beta=1, act_layer=None, gate_layer='sigmoid',
                 rd_ratio=1 / 8, rd_channels=None, rd_divisor=8, use_mlp=False):
        super().__init__()
        if channels is not None:
            kernel_size = eca_kernel_size(channels, gamma, beta)
        assert kernel_size % 2 == 1
        padding = (kernel_size - 1) // 2
        if use_mlp:
            if rd_channels is None:
                rd_channels = make_divisible(channels * rd_ratio, divisor=rd_divisor)
            self.conv = nn.Conv1d(1, rd_channels, kernel_size=1, padding=0, bias=True)
            self.act = create_act_layer(act_layer or nn.ReLU)
            self.conv2 = nn.Conv1d(rd_channels, 1, kernel_size=kernel_size, padding=padding, bias=True)
        else:
            self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=padding, bias=False)
            self.act = None
            self.conv2 = None
        self.gate = create_act_layer(gate_layer)

    def forward(self, x):
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = self.conv(y)
        if self.conv2 is not None:
            y = self.conv2(self.act(y))
        y = self.gate(y).view(x.shape[0], -1, 1, 1)
        return x * y.expand_as(x)


def get_attn(attn_type):
    """timm layers/create_attn.py for the types NormFreeNet configs use: 'se', 'eca', 'ecam', True, a class."""
    if isinstance(attn_type, nn.Module):
        return attn_type
    if not attn_type:
        return None
    if isinstance(attn_type, str):
        kind = attn_type.lower()
        if kind == 'se':
            return SEModule
        if kind == 'eca':
            return EcaModule
        if kind == 'ecam':
            return partial(EcaModule, use_mlp=True)
        raise NotImplementedError(f"attention {attn_type!r} is not re-implemented here (only 'se', 'eca')")
    if isinstance(attn_type, bool):
        return SEModule
    return attn_type


# ----------------------------------------------------------------------------- layers/drop.py
def drop_path(x, drop_prob: float = 0., training: bool = False, scale_by_keep: bool = True):
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    random_tensor = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """Stochastic depth per sample: one bernoulli(1 − drop_prob) per sample, scaled by 1/keep."""

    def __init__(self, drop_prob: float = 0., scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self):
        return f'drop_prob={round(self.drop_prob, 3):0.3f}'


def calculate_drop_path_rates(drop_path_rate, depths, stagewise=False):
    """timm's rates: linspace(0, rate, sum(depths)) in torch's default dtype (float32), per block;
    ``stagewise`` splits that same list by stage (it is not constant within a stage)."""
    if isinstance(depths, int):
        if stagewise:
            raise ValueError("stagewise=True requires depths to be a list of stage depths")
        return [x.item() for x in torch.linspace(0, drop_path_rate, depths, device='cpu')]
    total_depth = sum(depths)
    if stagewise:
        return [x.tolist() for x in torch.linspace(0, drop_path_rate, total_depth, device='cpu').split(list(depths))]
    return [x.item() for x in torch.linspace(0, drop_path_rate, total_depth, device='cpu')]


# ----------------------------------------------------------------------------- utils/agc.py
def unitwise_norm(x, norm_type=2.0):
    if x.ndim <= 1:
        return x.norm(norm_type)
    return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


def adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """timm.utils.agc.adaptive_clip_grad: per output unit, grad·min(1, clip·max(‖w‖, eps)/‖g‖), in place."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    for p in parameters:
        if p.grad is None:
            continue
        p_data, g_data = p.detach(), p.grad.detach()
        max_norm = unitwise_norm(p_data, norm_type=norm_type).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g_data, norm_type=norm_type)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(grad_norm < max_norm, g_data, clipped_grad))


# ----------------------------------------------------------------------------- layers/classifier.py
class SelectAdaptivePool2d(nn.Module):
    """Global pooling ('avg': nn.AdaptiveAvgPool2d(1); '': pass-through), then optional flatten."""

    def __init__(self, output_size=1, pool_type='avg', flatten=False):
        super().__init__()
        self.pool_type = pool_type or ''
        if not self.pool_type:
            self.pool = nn.Identity()
        elif self.pool_type.lower() == 'avg':
            self.pool = nn.AdaptiveAvgPool2d(output_size)
        else:
            raise NotImplementedError(f"pool_type {pool_type!r} is not re-implemented here (only 'avg', '')")
        self.flatten = nn.Flatten(1) if flatten else nn.Identity()

    def is_identity(self):
        return not self.pool_type

    def forward(self, x):
        return self.flatten(self.pool(x))

    def feat_mult(self):
        return 1


class ClassifierHead(nn.Module):
    """global_pool (+ flatten), drop (Dropout), fc (Linear, or Identity when num_classes <= 0), flatten."""

    def __init__(self, in_features, num_classes, pool_type='avg', drop_rate=0., use_conv=False):
        super().__init__()
        self.in_features = in_features
        self.use_conv = use_conv
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type) and not use_conv)
        self.drop = nn.Dropout(drop_rate)
        self.fc = self._create_fc(num_classes)
        self.flatten = nn.Flatten(1) if use_conv and pool_type else nn.Identity()

    def _create_fc(self, num_classes):
        if num_classes <= 0:
            return nn.Identity()
        if self.use_conv:
            return nn.Conv2d(self.in_features, num_classes, 1, bias=True)
        return nn.Linear(self.in_features, num_classes, bias=True)

    def reset(self, num_classes, pool_type=None):
        if pool_type is not None and pool_type != self.global_pool.pool_type:
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type) and not self.use_conv)
            self.flatten = nn.Flatten(1) if self.use_conv and pool_type else nn.Identity()
        self.fc = self._create_fc(num_classes)

    def forward(self, x, pre_logits: bool = False):
        x = self.drop(self.global_pool(x))
        if pre_logits:
            return self.flatten(x)
        return self.flatten(self.fc(x))


# ----------------------------------------------------------------------------- models/nfnet.py: blocks
class DownsampleAvg(nn.Module):
    """Shortcut: pool (AvgPool2d(2, stride, ceil_mode, no pad count) or Identity), then a 1x1 conv."""

    def __init__(self, in_chs, out_chs, stride=1, dilation=1, first_dilation=None, conv_layer=ScaledStdConv2d):
        super().__init__()
        if dilation > 1:
            raise NotImplementedError("dilation (output_stride < 32) is not re-implemented here")
        if stride > 1:
            self.pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
        else:
            self.pool = nn.Identity()
        self.conv = conv_layer(in_chs, out_chs, 1, stride=1)

    def forward(self, x):
        return self.conv(self.pool(x))


class NormFreeBlock(nn.Module):
    """timm's pre-activation NF bottleneck block (reg=True: RegNet style, attn between conv2(b) and
    conv3, mid channels from in_chs; reg=False: attn_last after conv3, mid channels from out_chs)."""

    def __init__(self, in_chs, out_chs=None, stride=1, dilation=1, first_dilation=None, alpha=1.0, beta=1.0,
                 bottle_ratio=0.25, group_size=None, ch_div=1, reg=True, extra_conv=False, skipinit=False,
                 attn_layer=None, attn_gain=2.0, act_layer=None, conv_layer=ScaledStdConv2d, drop_path_rate=0.):
        super().__init__()
        first_dilation = first_dilation or dilation
        out_chs = out_chs or in_chs
        mid_chs = make_divisible(in_chs * bottle_ratio if reg else out_chs * bottle_ratio, ch_div)
        groups = 1 if not group_size else mid_chs // group_size
        if group_size and group_size % ch_div == 0:
            mid_chs = group_size * groups  # correct mid_chs if group_size divisible by ch_div
        self.alpha = alpha
        self.beta = beta
        self.attn_gain = attn_gain

        if in_chs != out_chs or stride != 1 or dilation != first_dilation:
            self.downsample = DownsampleAvg(in_chs, out_chs, stride=stride, dilation=dilation,
                                            first_dilation=first_dilation, conv_layer=conv_layer)
        else:
            self.downsample = None

        self.act1 = act_layer()
        self.conv1 = conv_layer(in_chs, mid_chs, 1)
        self.act2 = act_layer(inplace=True)
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride, dilation=first_dilation, groups=groups)
        if extra_conv:
            self.act2b = act_layer(inplace=True)
            self.conv2b = conv_layer(mid_chs, mid_chs, 3, stride=1, dilation=dilation, groups=groups)
        else:
            self.act2b = None
            self.conv2b = None
        self.attn = attn_layer(mid_chs) if reg and attn_layer is not None else None
        self.act3 = act_layer()
        self.conv3 = conv_layer(mid_chs, out_chs, 1, gain_init=1. if skipinit else 0.)
        self.attn_last = attn_layer(out_chs) if not reg and attn_layer is not None else None
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.skipinit_gain = nn.Parameter(torch.tensor(0.)) if skipinit else None

    def forward(self, x):
        out = self.act1(x) * self.beta
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(out))
        if self.conv2b is not None:
            out = self.conv2b(self.act2b(out))
        if self.attn is not None:
            out = self.attn_gain * self.attn(out)
        out = self.conv3(self.act3(out))
        if self.attn_last is not None:
            out = self.attn_gain * self.attn_last(out)
        out = self.drop_path(out)
        if self.skipinit_gain is not None:
            out.mul_(self.skipinit_gain)
        return out * self.alpha + shortcut


STEM_TYPES = ('', 'deep', 'deep_tiered', 'deep_quad', '3x3', '7x7', 'deep_pool', '3x3_pool', '7x7_pool')


def create_stem(in_chs, out_chs, stem_type='', conv_layer=None, act_layer=None, preact_feature=True):
    """(nn.Sequential stem, stem stride, stem feature info dict), as timm's create_stem."""
    stem_stride = 2
    stem_feature = dict(num_chs=out_chs, reduction=2, module='stem.conv')
    stem = OrderedDict()
    assert stem_type in STEM_TYPES
    if 'deep' in stem_type:
        if 'quad' in stem_type:  # 4 deep conv stack as in NFNet-F models
            assert 'pool' not in stem_type
            stem_chs = (out_chs // 8, out_chs // 4, out_chs // 2, out_chs)
            strides = (2, 1, 1, 2)
            stem_stride = 4
            stem_feature = dict(num_chs=out_chs // 2, reduction=2, module='stem.conv3')
        else:
            if 'tiered' in stem_type:
                stem_chs = (3 * out_chs // 8, out_chs // 2, out_chs)  # 'T' resnets
            else:
                stem_chs = (out_chs // 2, out_chs // 2, out_chs)  # 'D' resnets
            strides = (2, 1, 1)
            stem_feature = dict(num_chs=out_chs // 2, reduction=2, module='stem.conv2')
        last_idx = len(stem_chs) - 1
        for i, (c, s) in enumerate(zip(stem_chs, strides)):
            stem[f'conv{i + 1}'] = conv_layer(in_chs, c, kernel_size=3, stride=s)
            if i != last_idx:
                stem[f'act{i + 2}'] = act_layer(inplace=True)
            in_chs = c
    elif '3x3' in stem_type:  # as in RegNet
        stem['conv'] = conv_layer(in_chs, out_chs, kernel_size=3, stride=2)
    else:  # 7x7 as in ResNet
        stem['conv'] = conv_layer(in_chs, out_chs, kernel_size=7, stride=2)
    if 'pool' in stem_type:
        stem['pool'] = nn.MaxPool2d(3, stride=2, padding=1)
        stem_stride = 4
    return nn.Sequential(stem), stem_stride, stem_feature


# ----------------------------------------------------------------------------- models/nfnet.py: the net
@dataclass
class NfCfg:
    """timm's NfCfg (the blobs' ``cfg`` holds these fields, lists for tuples)."""
    depths: Tuple[int, int, int, int]
    channels: Tuple[int, int, int, int]
    alpha: float = 0.2
    stem_type: str = '3x3'
    stem_chs: Optional[int] = None
    group_size: Optional[int] = None
    attn_layer: Optional[str] = None
    attn_kwargs: Optional[Dict[str, Any]] = None
    attn_gain: float = 2.0
    width_factor: float = 1.0
    bottle_ratio: float = 0.5
    num_features: int = 0  # out channels of the final conv; no final conv if 0
    ch_div: int = 8
    reg: bool = False
    extra_conv: bool = False
    gamma_in_act: bool = False
    same_padding: bool = False
    std_conv_eps: float = 1e-5
    skipinit: bool = False
    zero_init_fc: bool = False
    act_layer: str = 'silu'


NF_CFG_FIELDS = tuple(f.name for f in dataclasses.fields(NfCfg))


def as_nf_cfg(cfg) -> NfCfg:
    """An NfCfg from an NfCfg or a dict of its fields (lists become tuples; unknown keys raise)."""
    if isinstance(cfg, NfCfg):
        return cfg
    return NfCfg(**{k: tuple(v) if isinstance(v, list) else v for k, v in dict(cfg).items()})


class NormFreeNet(nn.Module):
    """timm's NormFreeNet: ``NormFreeNet(cfg, num_classes=1000, in_chans=3, global_pool='avg',
    output_stride=32, drop_rate=0., drop_path_rate=0., **cfg_overrides)``; cfg an NfCfg or a dict of
    its fields. Modules: stem, stages (Sequential of Sequentials of NormFreeBlock), final_conv
    (conv or Identity), final_act, head (ClassifierHead with head.fc)."""

    def __init__(self, cfg, num_classes=1000, in_chans=3, global_pool='avg', output_stride=32, drop_rate=0.,
                 drop_path_rate=0., **kwargs):
        super().__init__()
        if output_stride != 32:
            raise NotImplementedError("only output_stride=32 is re-implemented (no dilation)")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        cfg = replace(as_nf_cfg(cfg), **kwargs)
        self.cfg = cfg
        assert cfg.act_layer in NONLIN_GAMMA, f"Please add non-linearity constants for activation ({cfg.act_layer})."
        conv_layer = ScaledStdConv2dSame if cfg.same_padding else ScaledStdConv2d
        if cfg.gamma_in_act:
            act_layer = act_with_gamma(cfg.act_layer, gamma=NONLIN_GAMMA[cfg.act_layer])
            conv_layer = partial(conv_layer, eps=cfg.std_conv_eps)
        else:
            act_layer = get_act_layer(cfg.act_layer)
            conv_layer = partial(conv_layer, gamma=NONLIN_GAMMA[cfg.act_layer], eps=cfg.std_conv_eps)
        attn_layer = partial(get_attn(cfg.attn_layer), **cfg.attn_kwargs) if cfg.attn_layer else None

        stem_chs = make_divisible((cfg.stem_chs or cfg.channels[0]) * cfg.width_factor, cfg.ch_div)
        self.stem, stem_stride, stem_feat = create_stem(in_chans, stem_chs, cfg.stem_type, conv_layer=conv_layer,
                                                        act_layer=act_layer)

        self.feature_info = [stem_feat]
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, cfg.depths, stagewise=True)
        prev_chs = stem_chs
        net_stride = stem_stride
        dilation = 1
        expected_var = 1.0
        stages = []
        for stage_idx, stage_depth in enumerate(cfg.depths):
            stride = 1 if stage_idx == 0 and stem_stride > 2 else 2
            if net_stride >= output_stride and stride > 1:
                dilation *= stride
                stride = 1
            net_stride *= stride
            first_dilation = 1 if dilation in (1, 2) else 2

            blocks = []
            for block_idx in range(stage_depth):
                first_block = block_idx == 0 and stage_idx == 0
                out_chs = make_divisible(cfg.channels[stage_idx] * cfg.width_factor, cfg.ch_div)
                blocks += [NormFreeBlock(
                    in_chs=prev_chs, out_chs=out_chs, alpha=cfg.alpha, beta=1. / expected_var ** 0.5,
                    stride=stride if block_idx == 0 else 1, dilation=dilation, first_dilation=first_dilation,
                    group_size=cfg.group_size, bottle_ratio=1. if cfg.reg and first_block else cfg.bottle_ratio,
                    ch_div=cfg.ch_div, reg=cfg.reg, extra_conv=cfg.extra_conv, skipinit=cfg.skipinit,
                    attn_layer=attn_layer, attn_gain=cfg.attn_gain, act_layer=act_layer, conv_layer=conv_layer,
                    drop_path_rate=drop_path_rates[stage_idx][block_idx],
                )]
                if block_idx == 0:
                    expected_var = 1.  # reset after the first block of each stage
                expected_var += cfg.alpha ** 2
                first_dilation = dilation
                prev_chs = out_chs
            self.feature_info += [dict(num_chs=prev_chs, reduction=net_stride, module=f'stages.{stage_idx}')]
            stages += [nn.Sequential(*blocks)]
        self.stages = nn.Sequential(*stages)

        if cfg.num_features:
            self.num_features = make_divisible(cfg.width_factor * cfg.num_features, cfg.ch_div)
            self.final_conv = conv_layer(prev_chs, self.num_features, 1)
            self.feature_info[-1] = dict(num_chs=self.num_features, reduction=net_stride, module='final_conv')
        else:
            self.num_features = prev_chs
            self.final_conv = nn.Identity()
        self.final_act = act_layer(inplace=cfg.num_features > 0)

        self.head_hidden_size = self.num_features
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=self.drop_rate)

        for n, m in self.named_modules():
            if 'fc' in n and isinstance(m, nn.Linear):
                if cfg.zero_init_fc:
                    nn.init.zeros_(m.weight)
                else:
                    nn.init.normal_(m.weight, 0., .01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='linear')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_features(self, x):
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self.stages:  # timm's checkpoint_seq(self.stages, x): one segment per stage
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
        else:
            x = self.stages(x)
        x = self.final_conv(x)
        return self.final_act(x)

    def forward_head(self, x, pre_logits: bool = False):
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
