"""tests/timm_nf.py is timm: its NormFreeNet reproduces timm 1.0.29's numbers in tests/data/.

Every stored model (timm_nfnet_tiny.pt, and each family of timm_nf_family_tiny.pt) is rebuilt from
its NfCfg fields, loaded strictly with timm's state dict, and rerun in float64 train mode: logits,
mean cross-entropy, every gradient and the AGC-clipped gradients must match timm's. No nfkernels
import: this checks the re-implementation alone, so the tests built on it compare against timm.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nfk_testing import reference_data_path, rel_err
from timm_nf import (STEM_TYPES, EcaModule, GammaAct, NormFreeBlock, NormFreeNet, ScaledStdConv2dSame, SEModule,
                     Sigmoid, adaptive_clip_grad, create_stem, eca_kernel_size)

TOL = 1e-9
CLIP_FACTOR, CLIP_EPS, NOT_CLIPPED = 0.01, 1e-3, "head.fc."  # as tests/data/make_timm_reference.py


def _blobs():
    family = torch.load(reference_data_path("timm_nf_family_tiny.pt"), weights_only=True)
    nfnet_tiny = torch.load(reference_data_path("timm_nfnet_tiny.pt"), weights_only=True)
    return {"timm_nfnet_tiny": nfnet_tiny, **family}


BLOBS = _blobs()


def _model(blob):
    model = NormFreeNet(blob["cfg"], blob["num_classes"]).double()
    model.load_state_dict(blob["state_dict"], strict=True)
    return model.train()


@pytest.mark.parametrize("name", list(BLOBS))
def test_normfreenet_reproduces_timm(name):
    blob = BLOBS[name]
    model = _model(blob)
    if "params" in blob:
        assert sum(p.numel() for p in model.parameters()) == blob["params"]
    assert len(blob["cases"]) == (2 if name == "timm_nfnet_tiny" else 1)
    for i, case in enumerate(blob["cases"]):
        model.zero_grad(set_to_none=True)
        logits = model(case["x"])
        loss = F.cross_entropy(logits, case["labels"])
        loss.backward()
        params = dict(model.named_parameters())
        assert set(params) == set(case["grads"]) == set(case["agc_grads"])
        errors = {"logits": rel_err(logits, case["logits"]), "loss": rel_err(loss, case["loss"])}
        errors |= {f"grad {n}": rel_err(p.grad, case["grads"][n]) for n, p in params.items()}
        adaptive_clip_grad([p for n, p in params.items() if not n.startswith(NOT_CLIPPED)],
                           clip_factor=CLIP_FACTOR, eps=CLIP_EPS)
        errors |= {f"agc {n}": rel_err(p.grad, case["agc_grads"][n]) for n, p in params.items()}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOL, f"{name} case {i}: {worst} relative error {errors[worst]:.2e}"


def test_family_structure_is_timms():
    """The pieces the families differ in, where timm's rules are easy to get wrong."""
    f0 = NormFreeNet(BLOBS["nfnet_f0"]["cfg"], 10)  # gamma in the convs: timm's GELU module as activation
    assert type(f0.stages[0][0].act1).__name__ == "GELU" and not isinstance(f0.stages[0][0].act1, nn.GELU)
    assert f0.stem.conv1.scale == pytest.approx(1.7015043497085571 / 27 ** 0.5)
    tiny = NormFreeNet(BLOBS["timm_nfnet_tiny"]["cfg"], 10)  # gamma in the activations, SAME padding
    block = tiny.stages[1][0]
    assert isinstance(block.act2, GammaAct) and block.act2.inplace and not block.act1.inplace
    assert isinstance(block.conv2, ScaledStdConv2dSame) and block.conv2.same_pad  # stride 2: dynamic
    assert not block.conv2b.same_pad and block.conv2b.padding == (1, 1)
    assert [b.beta for b in tiny.stages[2]] == pytest.approx([1.08 ** -0.5, 1.04 ** -0.5])
    assert tiny.feature_info[0] == dict(num_chs=16, reduction=2, module="stem.conv3")
    assert isinstance(block.attn_last, SEModule) and block.attn_last.fc1.out_channels == 32  # rd_ratio 0.5
    assert type(block.attn_last.gate) is Sigmoid and type(block.attn_last.act) is nn.ReLU

    regnet = NormFreeNet(BLOBS["nf_regnet_b1"]["cfg"], 10)  # attn after conv2, mid from in_chs
    first = regnet.stages[0][0]
    assert first.attn is not None and first.attn_last is None
    assert first.conv1.out_channels == 16  # width 16·0.75 → 16; bottle_ratio 1 for the very first block

    eca = NormFreeNet(BLOBS["nf_ecaresnet50"]["cfg"], 10)
    kernels = [b.attn_last.conv.kernel_size[0] for s in eca.stages for b in s]
    assert kernels == [3, 3, 3, 3, 3, 5]  # channels 32, 64, 64, 96, 96, 128
    assert [eca_kernel_size(c) for c in (8, 16, 32, 64, 96, 128, 256, 512, 1024)] == [3, 3, 3, 3, 3, 5, 5, 5, 5]
    assert isinstance(eca.stages[0][0].attn_last, EcaModule)
    assert isinstance(eca.final_conv, nn.Identity) and not eca.final_act.inplace  # num_features = 0
    assert eca.num_features == 128 and eca.head.fc.in_features == 128


def test_every_stem_type_and_its_stride():
    conv = ScaledStdConv2dSame
    for stem_type in STEM_TYPES:
        stem, stride, feat = create_stem(3, 32, stem_type, conv_layer=conv, act_layer=nn.ReLU)
        out = stem(torch.randn(1, 3, 64, 64))
        assert out.shape == (1, 32, 64 // stride, 64 // stride), stem_type
        assert feat["reduction"] == 2 and feat["module"] in dict(stem.named_modules(prefix="stem")), stem_type
    for stem_type, stride in (("3x3", 2), ("deep", 2), ("7x7_pool", 4), ("deep_quad", 4)):
        model = NormFreeNet(dict(depths=(1, 1, 1, 1), channels=(16, 16, 24, 24), stem_type=stem_type), 3)
        assert model.feature_info[1]["reduction"] == 4 and model.feature_info[-1]["reduction"] == 32
        assert model.stages[0][0].conv2.stride == ((1, 1) if stride == 4 else (2, 2))
        assert model(torch.randn(2, 3, 33, 35)).shape == (2, 3)
    with pytest.raises(NotImplementedError):
        NormFreeNet(dict(depths=(1, 1, 1, 1), channels=(16, 16, 24, 24)), 3, output_stride=16)


def test_drop_path_rates_and_block_defaults():
    model = NormFreeNet(dict(depths=(1, 2, 1, 1), channels=(16, 16, 24, 24)), 3, drop_path_rate=0.4)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])  # linspace over all blocks, float32
    block = NormFreeBlock(16, 16, act_layer=nn.ReLU)  # timm's defaults: reg=True, no downsample
    assert block.downsample is None and block.conv1.out_channels == 4 and block.conv3.gain.abs().sum() == 0
