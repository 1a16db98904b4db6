"""timm's model API on nfkernels.models.NFNet (issue 11): the attributes and methods timm's
train.py, timm.data.resolve_model_data_config and AGC helpers use, timm's model names, and
the errors for what nfkernels does not do.

Expected values are timm's, read from huggingface/pytorch-image-models at commit aa4b5850c154
(timm/models/nfnet.py: NormFreeNet, create_stem, default_cfgs and _dcfg; timm/layers/classifier.py;
timm/models/_features.py; timm/data/config.py), or computed by hand; timm does not import here.
"""
import copy
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import nfkernels as nfk
import nfkernels.models as models
from nfkernels.models import TINY_CONFIG, NFNet, nfnet, paper_regularization
from nfk_testing import assert_close

# Tiny model at 64×64: stem (32 ch, /4; its conv3 has 16 ch at /2), stages 32, 64, 96, 96 ch at
# /4, /8, /16, /32, final conv 192 ch.
IMG = 64
TINY_FEATURES = [(16, IMG // 2), (32, IMG // 4), (64, IMG // 8), (96, IMG // 16), (192, IMG // 32)]


def tiny(num_classes=10, dtype=torch.float64, **cfg):
    """The tiny NFNet with SkipInit gains of 0.5 instead of 0, so every residual branch counts."""
    torch.manual_seed(0)
    model = NFNet(replace(TINY_CONFIG, **cfg), num_classes=num_classes).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skipinit_gain"):
                p.fill_(0.5)
    return model


def images(n=2, dtype=torch.float64, size=IMG):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_agc_parameters_of_a_model_without_classifier():
    """num_classes=0 (timm: no classifier) used to make agc_parameters raise, since the model had
    neither get_classifier() nor an nn.Linear; now every parameter is clipped, as in timm."""
    model = NFNet(TINY_CONFIG, num_classes=0)
    assert nfk.agc_parameters(model) == list(model.parameters())
    assert isinstance(model.head.fc, torch.nn.Identity) and isinstance(model.get_classifier(), torch.nn.Identity)
    with_head = NFNet(TINY_CONFIG, num_classes=10)
    excluded = {id(p) for p in with_head.head.fc.parameters()}
    assert nfk.agc_parameters(with_head) == [p for p in with_head.parameters() if id(p) not in excluded]


def test_headless_model_returns_pooled_features():
    model = tiny(num_classes=0).eval()
    x = images()
    with nfk.use_backend("torch"), torch.no_grad():
        out, feats = model(x), model.forward_features(x)
    assert feats.shape == (2, 192, IMG // 32, IMG // 32)
    assert out.shape == (2, 192)
    assert_close(out, feats.mean((2, 3)), 1e-12, "pooled features")


def test_classifier_api():
    model = tiny(num_classes=10).eval()
    fc = model.get_classifier()
    assert fc is model.head.fc and (fc.in_features, fc.out_features) == (192, 10)
    assert (model.num_classes, model.num_features, model.head_hidden_size, model.in_chans) == (10, 192, 192, 3)
    x = images()
    with nfk.use_backend("torch"), torch.no_grad():
        feats = model.forward_features(x)
        pooled = feats.mean((2, 3))
        assert_close(model.forward_head(feats, pre_logits=True), pooled, 1e-12, "pre_logits")
        assert_close(model.forward_head(feats), F.linear(pooled, fc.weight, fc.bias), 1e-12, "logits")
        assert_close(model(x), F.linear(pooled, fc.weight, fc.bias), 1e-12, "forward")

        model.reset_classifier(5)
        assert model.num_classes == 5 and model.get_classifier().out_features == 5
        assert model.get_classifier().weight.dtype == torch.float64  # made where the model lives
        assert model(x).shape == (2, 5)
        # timm.utils.model_parameters(model, exclude_head=True) drops the last two parameters.
        assert list(model.parameters())[-2:] == [model.head.fc.weight, model.head.fc.bias]

        model.reset_classifier(3, "catavgmax")
        assert model.get_classifier().in_features == 2 * 192
        expected = torch.cat((feats.mean((2, 3)), feats.amax((2, 3))), 1)
        assert_close(model.forward_head(feats, pre_logits=True), expected, 1e-12, "catavgmax")
        model.reset_classifier(2, "max")
        assert_close(model.forward_head(feats, pre_logits=True), feats.amax((2, 3)), 1e-12, "max")
        model.reset_classifier(2, "avgmax")
        assert_close(model.forward_head(feats, pre_logits=True), 0.5 * (feats.mean((2, 3)) + feats.amax((2, 3))),
                     1e-12, "avgmax")

        model.reset_classifier(0, "")  # timm's idiom for the unpooled feature map
        assert model.num_classes == 0 and isinstance(model.get_classifier(), torch.nn.Identity)
        assert_close(model(x), feats, 1e-12, "unpooled")
        model.reset_classifier(0)
        assert model(x).shape == (2, 192, 2, 2)  # global_pool=None keeps the pooling

    with pytest.raises(ValueError, match="global_pool='' .* needs num_classes=0"):
        model.reset_classifier(4)
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(4, "gem")
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        model.reset_classifier(-1, "avg")
    with pytest.raises(TypeError, match="num_classes must be an int"):
        model.reset_classifier(2.0, "avg")
    with pytest.raises(ValueError, match=r"forward_head: x must be forward_features' output, shape \(N, 192, H, W\)"):
        model.forward_head(x)


def test_grad_checkpointing_recomputes_and_matches():
    """set_grad_checkpointing must really checkpoint: torch.utils.checkpoint runs once per stage
    (timm's checkpoint_seq over NormFreeNet.stages), each stage runs again during backward, and
    logits and gradients equal those without it, dropout and stochastic depth included."""
    model = tiny(drop_rate=0.2, drop_path_rate=0.3).train()
    ckpt_model = copy.deepcopy(model)
    ckpt_model.set_grad_checkpointing()
    assert ckpt_model.grad_checkpointing and not model.grad_checkpointing
    x, labels = images(4), torch.tensor([1, 2, 3, 4])

    def run(m):
        calls = []
        hook = m.stages[0].register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(123)
        with nfk.use_backend("torch"):
            logits = m(x)
            F.cross_entropy(logits, labels).backward()
        hook.remove()
        return logits.detach(), {n: p.grad for n, p in m.named_parameters()}, len(calls)

    real_checkpoint, used = torch.utils.checkpoint.checkpoint, []

    def spy(fn, *args, **kwargs):
        used.append(fn)
        return real_checkpoint(fn, *args, **kwargs)

    ref_logits, ref_grads, ref_calls = run(model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.utils.checkpoint, "checkpoint", spy)
        logits, grads, calls = run(ckpt_model)
    assert used == list(ckpt_model.stages)
    assert (ref_calls, calls) == (1, 2)  # stage 0 recomputed in backward
    assert_close(logits, ref_logits, 1e-12, "logits")
    for name, g in ref_grads.items():
        assert_close(grads[name], g, 1e-12, name)

    ckpt_model.set_grad_checkpointing(False)
    used.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.utils.checkpoint, "checkpoint", spy)
        run(ckpt_model)
    assert used == []
    with pytest.raises(TypeError, match="enable must be a bool"):
        model.set_grad_checkpointing("yes")


def test_group_matcher_is_timms():
    model = NFNet(TINY_CONFIG, num_classes=10)
    fine, coarse = model.group_matcher(), model.group_matcher(coarse=True)
    # NormFreeNet.group_matcher in timm/models/nfnet.py.
    assert fine == {"stem": r"^stem", "blocks": [(r"^stages\.(\d+)\.(\d+)", None), (r"^final_conv", (99999,))]}
    assert coarse == {"stem": r"^stem", "blocks": [(r"^stages\.(\d+)", None), (r"^final_conv", (99999,))]}
    for name, _ in model.named_parameters():
        if name.startswith("head."):
            continue
        patterns = [fine["stem"]] + [p for p, _ in fine["blocks"]]
        assert any(re.match(p, name) for p in patterns), name


# timm/models/nfnet.py default_cfgs['dm_nfnet_fX.dm_in1k'] (pool_size, input_size, test_input_size,
# crop_pct; crop_mode 'squash') over _dcfg (bicubic, ImageNet mean/std, first_conv 'stem.conv1',
# classifier 'head.fc', num_classes 1000).
TIMM_DATA = {
    "f0": ((6, 6), (3, 192, 192), (3, 256, 256), 0.9),
    "f1": ((7, 7), (3, 224, 224), (3, 320, 320), 0.91),
    "f2": ((8, 8), (3, 256, 256), (3, 352, 352), 0.92),
    "f3": ((10, 10), (3, 320, 320), (3, 416, 416), 0.94),
    "f4": ((12, 12), (3, 384, 384), (3, 512, 512), 0.951),
    "f5": ((13, 13), (3, 416, 416), (3, 544, 544), 0.954),
    "f6": ((14, 14), (3, 448, 448), (3, 576, 576), 0.956),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("variant", list(TIMM_DATA))
def test_pretrained_cfg_is_timms(variant):
    """What timm.data.resolve_model_data_config(model) reads (timm/data/config.py: input_size or,
    with use_test_size, test_input_size; interpolation; mean; std; crop_pct; crop_mode) and what
    timm's builder and train.py read (num_classes, first_conv, classifier)."""
    pool, size, test_size, crop_pct = TIMM_DATA[variant]
    with torch.device("meta"):
        by_timm_name = getattr(models, f"dm_nfnet_{variant}")()
        by_string = nfnet(f"dm_nfnet_{variant}", num_classes=7)
    for model in (by_timm_name, by_string):
        cfg = model.pretrained_cfg
        assert model.default_cfg is cfg
        assert {k: cfg[k] for k in ("input_size", "test_input_size", "pool_size", "crop_pct", "crop_mode",
                                    "interpolation", "mean", "std", "first_conv", "classifier", "num_classes",
                                    "architecture")} == {
            "input_size": size, "test_input_size": test_size, "pool_size": pool, "crop_pct": crop_pct,
            "crop_mode": "squash", "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "first_conv": "stem.conv1", "classifier": "head.fc", "num_classes": 1000,
            "architecture": f"dm_nfnet_{variant}"}
        first = model.get_submodule(cfg["first_conv"])
        assert first.in_channels == 3 and model.get_submodule(cfg["classifier"]) is model.get_classifier()
        assert "url" not in cfg and "hf_hub_id" not in cfg  # nothing to download from nfkernels
    assert by_string.num_classes == 7  # the model's classes; pretrained_cfg describes timm's weights


def test_pretrained_cfg_of_f7_and_custom_models():
    with torch.device("meta"):
        f7, timm_f7 = nfnet("f7"), models.nfnet_f7()
    # timm has no dm_nfnet_f7: the paper's F7 resolutions, from timm's nfnet_f7 entry (_dcfg defaults).
    for cfg in (f7.pretrained_cfg, timm_f7.pretrained_cfg):
        assert (cfg["input_size"], cfg["test_input_size"], cfg["pool_size"], cfg["crop_pct"]) == (
            (3, 480, 480), (3, 608, 608), (15, 15), 0.9)
    assert "architecture" not in f7.pretrained_cfg and timm_f7.pretrained_cfg["architecture"] == "nfnet_f7"
    custom = NFNet(TINY_CONFIG, num_classes=4).pretrained_cfg  # timm nfnet.py's _dcfg defaults
    assert (custom["input_size"], custom["crop_pct"], custom["interpolation"], custom["mean"], custom["std"]) == (
        (3, 224, 224), 0.9, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    assert models.dm_nfnet_f0 is not models.nfnet_f0 and models.dm_nfnet_f0.__name__ == "dm_nfnet_f0"
    a, b = NFNet(TINY_CONFIG), NFNet(TINY_CONFIG)
    a.pretrained_cfg["crop_pct"] = 1.0
    assert b.pretrained_cfg["crop_pct"] == 0.9  # each model has its own dict


def test_feature_info_is_timms():
    """NormFreeNet.feature_info for the dm_nfnet configs: create_stem('deep_quad') taps stem.conv3
    (out_chs // 2 = 64 channels, reduction 2), then each stage, the last replaced by final_conv."""
    with torch.device("meta"):
        model = models.dm_nfnet_f0()
        feats = models.dm_nfnet_f0(features_only=True)
    assert model.feature_info == [
        dict(num_chs=64, reduction=2, module="stem.conv3"),
        dict(num_chs=256, reduction=4, module="stages.0"),
        dict(num_chs=512, reduction=8, module="stages.1"),
        dict(num_chs=1536, reduction=16, module="stages.2"),
        dict(num_chs=3072, reduction=32, module="final_conv"),
    ]
    for entry in model.feature_info:
        model.get_submodule(entry["module"])
    assert isinstance(feats, models.NFNetFeatures)
    assert feats.feature_info.channels() == [64, 256, 512, 1536, 3072]
    assert feats.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert feats.feature_info.module_name() == ["stem.conv3", "stages.0", "stages.1", "stages.2", "final_conv"]
    assert feats.feature_info.get_dicts(keys=["num_chs"], idx=[1]) == [{"num_chs": 256}]
    assert len(feats.feature_info) == 5 and feats.feature_info[4]["index"] == 4
    # timm's pretrained_cfg_for_features drops the classifier entries.
    assert "num_classes" not in feats.pretrained_cfg and "classifier" not in feats.pretrained_cfg
    assert feats.pretrained_cfg["input_size"] == (3, 192, 192) and feats.default_cfg is feats.pretrained_cfg


def test_features_only_returns_the_feature_maps():
    x = images()
    with nfk.use_backend("torch"), torch.no_grad():
        feats = nfnet("f0", features_only=True, depths=(1, 1, 1, 1), channels=(32, 64, 96, 96), stem_chs=32,
                      group_size=16, num_features=192).to(torch.float64)(x)
        assert [tuple(f.shape) for f in feats] == [(2, c, r, r) for c, r in TINY_FEATURES]

        model = nfnet("f0", features_only=True, out_indices=(1, 3), depths=(1, 1, 1, 1), channels=(32, 64, 96, 96),
                      stem_chs=32, group_size=16, num_features=192).to(torch.float64)
        assert model.feature_info.channels() == [32, 96] and model.feature_info.reduction() == [4, 16]
        assert [tuple(f.shape) for f in model(x)] == [(2, c, r, r) for c, r in (TINY_FEATURES[1], TINY_FEATURES[3])]
        assert not hasattr(model, "final_conv") and not hasattr(model, "stages_3")  # timm stops at the last tap

        last_two = models.NFNetFeatures(tiny(), out_indices=2)  # timm: an int n means the last n features
        assert last_two.feature_info.out_indices == (3, 4)
        assert [tuple(f.shape) for f in last_two(x)] == [(2, c, r, r) for c, r in TINY_FEATURES[3:]]
        assert models.NFNetFeatures(tiny(), out_indices=(-1,)).feature_info.out_indices == (4,)

    with pytest.raises(ValueError, match="increasing"):
        models.NFNetFeatures(tiny(), out_indices=(3, 1))
    with pytest.raises(ValueError, match=r"in \[-5, 5\)"):
        models.NFNetFeatures(tiny(), out_indices=(5,))
    with pytest.raises(ValueError, match="needs features_only|pass features_only=True"):
        nfnet("f0", out_indices=(1,))
    with pytest.raises(TypeError, match="model must be an NFNet"):
        models.NFNetFeatures(torch.nn.Linear(2, 2))


def test_features_only_grad_checkpointing():
    model = models.NFNetFeatures(tiny(drop_path_rate=0.2).train())
    ref = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    x = images()
    outs = []
    for m in (ref, model):
        torch.manual_seed(5)
        with nfk.use_backend("torch"):
            feats = m(x)
            sum(f.square().mean() for f in feats).backward()
        outs.append((feats, {n: p.grad for n, p in m.named_parameters()}))
    for a, b in zip(outs[0][0], outs[1][0]):
        assert_close(b, a, 1e-12, "feature")
    for name, g in outs[0][1].items():
        assert_close(outs[1][1][name], g, 1e-12, name)


def test_timm_nfnet_names_build_timms_own_design():
    """timm's nfnet_fX (not dm_) is another design: γ in the convs, symmetric padding, no SkipInit."""
    with torch.device("meta"):
        for name in ("nfnet_f0", "NFNet_F3", "nfnet_f7"):
            model = nfnet(name)
            assert not any(n.endswith("skipinit_gain") for n, _ in model.named_parameters())
            block = model.stages[0][0]
            assert block.gamma == 1.0 and block.conv2.gamma == pytest.approx(1.7015043497085571)
            assert not block.conv2.same_pad and block.conv2.padding == (1, 1)
            assert paper_regularization(name) == paper_regularization(name[-2:])
        assert tuple(len(s) for s in models.nfnet_f3().stages) == (4, 8, 24, 12)


def test_timm_names():
    assert models.TIMM_NAMES == {**{f"f{i}": f"dm_nfnet_f{i}" for i in range(7)}, "f7": None}
    with torch.device("meta"):
        for i in range(7):  # paper Table 1: F_i has (1, 2, 6, 3)·(i + 1) blocks per stage
            model = nfnet(f"dm_nfnet_f{i}")
            assert tuple(len(s) for s in model.stages) == (i + 1, 2 * (i + 1), 6 * (i + 1), 3 * (i + 1))
        assert tuple(len(s) for s in nfnet("DM_NFNET_F1").stages) == (2, 4, 12, 6)
    assert not hasattr(models, "dm_nfnet_f7")  # timm has none
    assert paper_regularization("dm_nfnet_f1") == {"drop_rate": 0.3, "drop_path_rate": 0.1}
    with pytest.raises(ValueError, match="timm has no dm_nfnet_f7.* variant 'f7'"):
        nfnet("dm_nfnet_f7")
    with pytest.raises(ValueError, match="variant must be one of 'f0' … 'f7' .*'dm_nfnet_f0' … 'dm_nfnet_f6'"):
        nfnet("eca_nfnet_l9")
    with pytest.raises(ValueError, match="paper gives rates for NFNet-F0 … F7 only"):
        paper_regularization("eca_nfnet_l0")
    with pytest.raises(TypeError, match="variant must be a str"):
        nfnet(0)


def test_paper_regularization_unknown_variant():
    with pytest.raises(ValueError, match=r"paper_regularization: variant must be one of 'f0' … 'f7'"):
        paper_regularization("f9")


LOAD_TIMM = 'model.load_state_dict(timm.create_model("dm_nfnet_f0", pretrained=True).state_dict())'


def test_pretrained_true_explains_how_to_load_timm_weights():
    for build in (lambda: models.dm_nfnet_f0(pretrained=True), lambda: models.dm_nfnet_f0(True),
                  lambda: nfnet("f0", pretrained=True)):
        with pytest.raises(ValueError, match="ships and downloads no weights") as info:
            build()
        assert LOAD_TIMM in str(info.value)
    with pytest.raises(ValueError, match=r'timm.create_model\("eca_nfnet_l0", pretrained=True\)'):
        models.eca_nfnet_l0(True)
    with pytest.raises(ValueError, match="timm has no pretrained F7"):
        nfnet("f7", pretrained=True)
    with pytest.raises(ValueError, match="timm has no pretrained weights for nfnet_f0 either"):
        models.nfnet_f0(pretrained=True)
    with pytest.raises(TypeError, match="pretrained must be a bool"):
        models.dm_nfnet_f0(pretrained="yes")
    with torch.device("meta"):
        assert isinstance(models.dm_nfnet_f0(pretrained=False), NFNet)


def test_images_of_the_wrong_shape():
    model = tiny()
    x = images()
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, H, W\); got \(3, 64, 64\).*unsqueeze\(0\)"):
        model(x[0])
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, H, W\); got \(2, 1, 64, 64\)"):
        model(x[:, :1])
    with pytest.raises(ValueError, match=r"got \(2, 64, 64, 3\).*permute"):
        model(x.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model.forward_features(x[0])
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor of shape \(N, 3, H, W\)"):
        model(x.tolist())
    with pytest.raises(ValueError, match=r"NFNetFeatures: x must have shape \(N, 3, H, W\)"):
        models.NFNetFeatures(model)(x[0])
    gray = NFNet(TINY_CONFIG, num_classes=2, in_chans=1)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, H, W\); got \(2, 3, 64, 64\)"):
        gray(x.float())


def test_constructor_argument_errors():
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        NFNet(TINY_CONFIG, num_classes=-1)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        NFNet(TINY_CONFIG, num_classes=True)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        nfnet("f0", True)
    with pytest.raises(ValueError, match="in_chans must be >= 1"):
        NFNet(TINY_CONFIG, in_chans=0)
    with pytest.raises(TypeError, match="cfg must be an NFNetConfig"):
        NFNet("f0")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        NFNet(TINY_CONFIG, global_pool="gem")
    with pytest.raises(TypeError, match="unexpected keyword argument 'output_stride'"):
        nfnet("f0", output_stride=16)
    with torch.device("meta"):
        model = NFNet(TINY_CONFIG, num_classes=0, global_pool="")
        assert model(torch.empty(1, 3, 64, 64)).shape == (1, 192, 2, 2)
