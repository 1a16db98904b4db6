"""nfkernels.convert against timm-style modules.

timm is not importable here, so its classes come from tests/timm_nf.py, a faithful re-implementation
of timm 1.0.29's NormFreeNet and its layers with timm's class names (convert recognises classes by
name and attributes), checked against timm's own numbers by tests/test_timm_nf_reference.py.
"""
import pytest
import torch
import torch.nn as nn

import nfkernels as nfk
from nfkernels.nn import NFBlock, ScaledAct, SqueezeExcite, WSConv2d
from nfk_testing import DEVICE, assert_close, backends_for
from timm_nf import (NONLIN_GAMMA, GammaAct, NormFreeBlock, ScaledStdConv2d, ScaledStdConv2dSame, SEModule,
                     act_with_gamma, gelu, mish)

BACKENDS = backends_for(("torch", "triton"))
GELU_GAMMA = NONLIN_GAMMA["gelu"]


# ----------------------------------------------------------------------------- test models
class ECAModule(nn.Module):  # a non-SE attention convert must leave alone
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * y.sigmoid().view(x.shape[0], -1, 1, 1)


def nf_block(in_chs, out_chs, stride=1, alpha=0.2, beta=1.0, mid_chs=8, groups=1, extra_conv=True,
             skipinit=True, attn_layer=SEModule, act_fn=gelu, gamma=GELU_GAMMA, conv_layer=ScaledStdConv2dSame,
             drop_path_rate=0.0, reg=False):
    """timm's NormFreeBlock with mid_chs channels in `groups` groups, an NFNet-F style block by default
    (SAME padding, extra conv, SkipInit, SE, γ in the activations)."""
    block = NormFreeBlock(in_chs, out_chs, stride=stride, alpha=alpha, beta=beta,
                          bottle_ratio=mid_chs / (in_chs if reg else out_chs),
                          group_size=mid_chs // groups if groups > 1 else None, ch_div=1, reg=reg,
                          extra_conv=extra_conv, skipinit=skipinit, attn_layer=attn_layer,
                          act_layer=act_with_gamma(act_fn, gamma), conv_layer=conv_layer,
                          drop_path_rate=drop_path_rate)
    assert block.conv1.out_channels == mid_chs and block.conv2.groups == groups
    return block


class TimmStyleNet(nn.Module):
    """Stem convs + GammaActs, NormFreeBlocks (one with reg=True, one with an attention module convert
    does not know), head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ScaledStdConv2dSame(3, 8, 3, stride=2), GammaAct("gelu", GELU_GAMMA),
                                  ScaledStdConv2d(8, 16, 3, eps=1e-5))
        self.stages = nn.Sequential(
            nf_block(16, 16, beta=1.0),
            nf_block(16, 24, stride=2, beta=1.02 ** -0.5, groups=2, drop_path_rate=0.1),
            nf_block(24, 24, beta=1.04 ** -0.5, extra_conv=False, skipinit=False),
            nf_block(24, 24, reg=True),
            nf_block(24, 24, attn_layer=ECAModule),
        )
        self.final_conv = ScaledStdConv2d(24, 32, 1)
        self.final_act = GammaAct("silu", NONLIN_GAMMA["silu"])
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
    assert [converted.get(f"stages.{i}") for i in range(4)] == ["NFBlock"] * 4
    assert isinstance(model.stages[1], NFBlock) and model.stages[1].drop_path_rate == pytest.approx(0.1)
    assert isinstance(model.stages[3].attn, SqueezeExcite) and model.stages[3].attn_last is None  # reg=True
    # A block with an attention convert does not know is reported and left as a block, its convs and
    # activations converted one by one.
    skipped = dict(report.skipped)
    assert "attn_last is ECAModule; only SEModule and EcaModule are fused" in skipped["stages.4"]
    assert type(model.stages[4]).__name__ == "NormFreeBlock"
    assert isinstance(model.stages[4].conv2, WSConv2d) and isinstance(model.stages[4].act2, ScaledAct)
    assert type(model.stages[4].attn_last).__name__ == "ECAModule"
    assert report.blocks_fused == 4 and [path for path, _ in report.blocks_left] == ["stages.4"]
    assert "fused 4 of 5 NormFreeBlocks" in str(report)
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
        nf_block(8, 8, act_fn=mish, gamma=2.0),            # block with an unknown activation
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
    ref = randomize_(nn.Sequential(nf_block(8, 12, stride=2, drop_path_rate=0.3)), seed=3).double()
    model = nn.Sequential(nf_block(8, 12, stride=2, drop_path_rate=0.3)).double()
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

