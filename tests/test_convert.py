"""nfkernels.convert against timm-style modules.

timm is not importable here, so the timm classes are re-implemented below, faithfully to timm's
source (layers/std_conv.py, layers/padding.py, models/nfnet.py, layers/squeeze_excite.py,
layers/drop.py), with timm's class names: convert recognises classes by name and attributes.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nfkernels as nfk
from nfkernels.nn import NFBlock, ScaledAct, SqueezeExcite, WSConv2d
from nfk_testing import DEVICE, assert_close, backends_for

BACKENDS = backends_for(("torch", "triton"))
GELU_GAMMA = 1.7015043497085571


# ----------------------------------------------------------------------------- timm re-implementations
def get_padding(kernel_size, stride=1, dilation=1):
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def pad_same(x, kernel_size, stride, dilation=(1, 1), value=0):
    ih, iw = x.shape[-2:]
    pad_h = max((math.ceil(ih / stride[0]) - 1) * stride[0] + (kernel_size[0] - 1) * dilation[0] + 1 - ih, 0)
    pad_w = max((math.ceil(iw / stride[1]) - 1) * stride[1] + (kernel_size[1] - 1) * dilation[1] + 1 - iw, 0)
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


class ScaledStdConv2d(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=True, gamma=1.0, eps=1e-6, gain_init=1.0):
        if padding is None:
            padding = get_padding(kernel_size, stride, dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2dSame(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding="SAME", dilation=1, groups=1,
                 bias=True, gamma=1.0, eps=1e-6, gain_init=1.0):
        # timm get_padding_value('same'): static when stride 1 and the padding is symmetric.
        is_dynamic = not (stride == 1 and (dilation * (kernel_size - 1)) % 2 == 0)
        padding = 0 if is_dynamic else get_padding(kernel_size, stride, dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.same_pad = is_dynamic
        self.eps = eps

    def forward(self, x):
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def gelu(x, inplace=False):  # timm layers/activations.py
    return F.gelu(x)


def silu(x, inplace=False):
    return F.silu(x, inplace=inplace)


def mish(x, inplace=False):
    return x.mul(F.softplus(x).tanh())


class GammaAct(nn.Module):
    def __init__(self, act_fn=gelu, gamma=1.0, inplace=False):
        super().__init__()
        self.act_fn = act_fn
        self.gamma = gamma
        self.inplace = inplace

    def forward(self, x):
        return self.act_fn(x, inplace=self.inplace).mul_(self.gamma)


class SEModule(nn.Module):
    def __init__(self, channels, rd_ratio=1 / 16, rd_channels=None, add_maxpool=False, bias=True):
        super().__init__()
        self.add_maxpool = add_maxpool
        rd_channels = rd_channels or max(1, int(channels * rd_ratio))
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


class ECAModule(nn.Module):  # a non-SE attention convert must leave alone
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * y.sigmoid().view(x.shape[0], -1, 1, 1)


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep else mask)


class DownsampleAvg(nn.Module):
    def __init__(self, in_chs, out_chs, stride=1, conv_layer=ScaledStdConv2dSame):
        super().__init__()
        self.pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        self.conv = conv_layer(in_chs, out_chs, 1, stride=1)

    def forward(self, x):
        return self.conv(self.pool(x))


class NormFreeBlock(nn.Module):
    def __init__(self, in_chs, out_chs, stride=1, alpha=0.2, beta=1.0, mid_chs=8, groups=1, extra_conv=True,
                 skipinit=True, attn_layer=SEModule, attn_gain=2.0, act_fn=gelu, gamma=GELU_GAMMA,
                 conv_layer=ScaledStdConv2dSame, drop_path_rate=0.0, reg=False):
        super().__init__()
        self.alpha, self.beta, self.attn_gain = alpha, beta, attn_gain
        act = lambda: GammaAct(act_fn, gamma)  # noqa: E731
        self.downsample = DownsampleAvg(in_chs, out_chs, stride, conv_layer) if in_chs != out_chs or stride != 1 else None
        self.act1 = act()
        self.conv1 = conv_layer(in_chs, mid_chs, 1)
        self.act2 = act()
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride, groups=groups)
        self.act2b = act() if extra_conv else None
        self.conv2b = conv_layer(mid_chs, mid_chs, 3, groups=groups) if extra_conv else None
        self.attn = attn_layer(mid_chs) if reg and attn_layer is not None else None
        self.act3 = act()
        self.conv3 = conv_layer(mid_chs, out_chs, 1, gain_init=1.0 if skipinit else 0.0)
        self.attn_last = attn_layer(out_chs) if not reg and attn_layer is not None else None
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.skipinit_gain = nn.Parameter(torch.tensor(0.0)) if skipinit else None

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
        out = out * self.alpha + shortcut
        return out


class TimmStyleNet(nn.Module):
    """Stem convs + GammaActs, NormFreeBlocks (one with reg=True, one with ECA: not fusable), head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ScaledStdConv2dSame(3, 8, 3, stride=2), GammaAct(gelu, GELU_GAMMA),
                                  ScaledStdConv2d(8, 16, 3, eps=1e-5))
        self.stages = nn.Sequential(
            NormFreeBlock(16, 16, beta=1.0),
            NormFreeBlock(16, 24, stride=2, beta=1.02 ** -0.5, groups=2, drop_path_rate=0.1),
            NormFreeBlock(24, 24, beta=1.04 ** -0.5, extra_conv=False, skipinit=False),
            NormFreeBlock(24, 24, reg=True),
            NormFreeBlock(24, 24, attn_layer=ECAModule),
        )
        self.final_conv = ScaledStdConv2d(24, 32, 1)
        self.final_act = GammaAct(silu, 1.7881293296813965)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.final_act(self.final_conv(self.stages(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def randomize_(model, seed=0):
    """Random values everywhere (gains, SkipInit and biases too), so no term vanishes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gain"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))
    return model


def _clone_model(model):
    clone = TimmStyleNet().to(dtype=torch.float64, device=DEVICE)
    clone.load_state_dict(model.state_dict())
    return clone


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_model_matches_timm_outputs_and_gradients(backend):
    torch.manual_seed(0)
    ref = randomize_(TimmStyleNet()).to(dtype=torch.float64, device=DEVICE).eval()
    model = _clone_model(ref).eval()
    params_before = dict(model.named_parameters())
    report = nfk.convert(model)

    # The parameters are the same objects under the same names.
    assert dict(model.named_parameters()) == params_before
    converted = {path: new for path, _, new in report.converted}
    assert converted["stem.0"] == "WSConv2d" and converted["stem.1"] == "ScaledAct"
    assert [converted.get(f"stages.{i}") for i in range(3)] == ["NFBlock"] * 3
    assert isinstance(model.stages[1], NFBlock) and model.stages[1].drop_path_rate == pytest.approx(0.1)
    # reg=True and ECA blocks are reported and left as blocks, their convs/acts/SE converted one by one.
    skipped = dict(report.skipped)
    assert "reg=True" in skipped["stages.3"] and "ECAModule" in skipped["stages.4"]
    assert type(model.stages[3]).__name__ == "NormFreeBlock"
    assert isinstance(model.stages[3].conv2, WSConv2d) and isinstance(model.stages[3].act2, ScaledAct)
    assert isinstance(model.stages[3].attn, SqueezeExcite)
    assert type(model.stages[4].attn_last).__name__ == "ECAModule"
    assert isinstance(model.final_conv, WSConv2d) and model.final_conv.eps == 1e-6
    assert str(report).startswith(f"converted {len(report.converted)} modules")

    x = torch.randn(2, 3, 15, 17, dtype=torch.float64, device=DEVICE)  # odd sizes: dynamic SAME padding
    with nfk.use_backend(backend):
        out = model(x)
    ref_out = ref(x)
    tol = 1e-10 if backend == "torch" else 1e-6
    assert_close(out, ref_out, tol, "logits")
    dout = torch.randn_like(out)
    with nfk.use_backend(backend):
        grads = torch.autograd.grad(out, list(model.parameters()), dout)
    ref_grads = torch.autograd.grad(ref_out, list(ref.parameters()), dout)
    for (name, _), g, rg in zip(model.named_parameters(), grads, ref_grads):
        assert_close(g, rg, tol, name)


def test_convert_reports_what_does_not_fit():
    model = nn.Sequential(
        GammaAct(mish, 2.0),                                   # unknown activation
        SEModule(8, add_maxpool=True),                          # not the plain SE
        NormFreeBlock(8, 8, act_fn=mish, gamma=2.0),            # block with an unknown activation
    )
    report = nfk.convert(model)
    skipped = dict(report.skipped)
    assert "unsupported act_fn" in skipped["0"] and "add_maxpool" in skipped["1"]
    assert "act1" in skipped["2"]
    assert type(model[0]).__name__ == "GammaAct" and type(model[1]).__name__ == "SEModule"
    # Inside the block that stays, the convs and the SE still become fused layers.
    assert isinstance(model[2].conv1, WSConv2d) and isinstance(model[2].attn_last, SqueezeExcite)
    assert ("2.act1", "GammaAct: GammaAct with an unsupported act_fn " + repr(mish)) in report.skipped
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        nfk.convert("resnet")


def test_converted_block_trains_like_timm_with_drop_path():
    """In training with stochastic depth, the same per-sample mask gives the same outputs."""
    torch.manual_seed(1)
    ref = randomize_(nn.Sequential(NormFreeBlock(8, 12, stride=2, drop_path_rate=0.3)), seed=3).double()
    model = nn.Sequential(NormFreeBlock(8, 12, stride=2, drop_path_rate=0.3)).double()
    model.load_state_dict(ref.state_dict())
    nfk.convert(model)
    assert isinstance(model[0], NFBlock) and model.training
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    torch.manual_seed(5)
    ref_out = ref(x)
    torch.manual_seed(5)  # both draw one bernoulli per sample from the same generator state
    out = model(x)
    assert_close(out, ref_out, 1e-10, "train-mode output")


NOTHING_TO_CONVERT = {
    "already_nfkernels": lambda: nn.Sequential(WSConv2d(3, 8, 3)),  # the README's former example
    "plain_torch": lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()),
    "bare_timm_conv": lambda: ScaledStdConv2d(3, 8, 3),  # the root itself is never replaced
}


@pytest.mark.parametrize("name", list(NOTHING_TO_CONVERT))
def test_convert_warns_when_it_converts_nothing(name):
    model = NOTHING_TO_CONVERT[name]()
    with pytest.warns(UserWarning, match="nothing was converted") as record:
        report = nfk.convert(model)
    assert report.converted == [] and len(record) == 1
    message = str(record[0].message)
    for timm_class in ("ScaledStdConv2d", "ScaledStdConv2dSame", "GammaAct", "SEModule", "NormFreeBlock"):
        assert timm_class in message
    assert "nn.Sequential" in message  # how to convert a bare layer
    assert record[0].filename == __file__  # points at the caller's line


def test_convert_warning_mentions_recognised_modules_that_did_not_fit():
    model = nn.Sequential(GammaAct(mish, 2.0))
    with pytest.warns(UserWarning, match=r"nothing was converted in Sequential; 1 recognised timm module"):
        report = nfk.convert(model)
    assert len(report.skipped) == 1


def test_convert_does_not_warn_when_it_converts_something(recwarn):
    nfk.convert(TimmStyleNet())
    twice = nn.Sequential(ScaledStdConv2d(3, 8, 3))
    assert len(nfk.convert(twice).converted) == 1
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    with pytest.warns(UserWarning, match="nothing was converted"):  # converting again finds nothing left
        nfk.convert(twice)

