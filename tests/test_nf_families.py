"""Every timm NormFreeNet family against timm: tests/data/timm_nf_family_tiny.pt holds, per family
(eca_nfnet_l0, nfnet_l0, nfnet_f0, nf_regnet_b1, nf_resnet50, nf_seresnet50, nf_ecaresnet50), a
small timm 1.0.29 model of that family's exact config (depths and widths shrunk), its float64
state dict, and timm's logits, loss, gradients and AGC-clipped gradients for one odd-sized input.

Each family is checked two ways: nfkernels' own model (``nfkernels.models``, the family's config
with the same fields shrunk) and a timm-layout model (tests/timm_nf.py, timm's NormFreeNet
re-implemented and itself checked against the same data in test_timm_nf_reference.py) after
``nfkernels.convert``, which must fuse every block. Bounds (the issue's): float64 on the torch
path 1e-9; float32 with the Triton kernels 1e-4 for the logits, 1e-3 for the gradients, NCHW and
channels_last.
"""
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F

import nfkernels as nfk
from nfkernels.models import MODEL_CFGS, NFNet, NFNetConfig, NFNetFeatures, config_from_timm, nfnet
from nfkernels.nn import NFBlock, WSConv2d
from nfk_testing import DEVICE, assert_close, backends_for, reference_data_path
from timm_nf import NormFreeNet

BACKENDS = backends_for(("torch", "triton"))
FAMILIES = ("eca_nfnet_l0", "nfnet_l0", "nfnet_f0", "nf_regnet_b1", "nf_resnet50", "nf_seresnet50", "nf_ecaresnet50")
NOT_CLIPPED = "head.fc."  # the data's AGC leaves the classifier out, as timm's train.py
# What the data's script shrank (tests/data/make_timm_reference.py, FAMILY_SHRINK).
SHRUNK = ("depths", "channels", "stem_chs", "group_size", "num_features")


@pytest.fixture(scope="module")
def families():
    return torch.load(reference_data_path("timm_nf_family_tiny.pt"), weights_only=True)


def nfkernels_model(blob, dtype) -> NFNet:
    """The family's nfkernels constructor, with the fields the data shrank set to its values."""
    name, cfg = blob["timm_config_of"], config_from_timm(blob["cfg"])
    model = nfnet(name, num_classes=blob["num_classes"], **{f: getattr(cfg, f) for f in SHRUNK}).double()
    model.load_state_dict(blob["state_dict"], strict=True)
    return model.to(DEVICE, dtype)


def converted_timm_model(blob, dtype) -> NormFreeNet:
    model = NormFreeNet(blob["cfg"], num_classes=blob["num_classes"]).double()
    model.load_state_dict(blob["state_dict"], strict=True)
    report = nfk.convert(model)
    n_blocks = sum(len(stage) for stage in model.stages)
    assert report.blocks_fused == n_blocks and not report.blocks_left, str(report)
    assert sum(isinstance(m, NFBlock) for m in model.modules()) == n_blocks
    return model.to(DEVICE, dtype)


BUILDERS = {"nfkernels": nfkernels_model, "converted timm": converted_timm_model}


def run_case(model, case, dtype, memory_format=torch.contiguous_format):
    model = model.to(memory_format=memory_format).train()
    model.zero_grad(set_to_none=True)
    x = case["x"].to(DEVICE, dtype).contiguous(memory_format=memory_format)
    logits = model(x)
    loss = F.cross_entropy(logits, case["labels"].to(DEVICE))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    nfk.agc_([p for n, p in model.named_parameters() if not n.startswith(NOT_CLIPPED)], clip_factor=0.01, eps=1e-3)
    clipped = {n: p.grad for n, p in model.named_parameters()}
    return logits, loss, grads, clipped


def check(case, logits, loss, grads, clipped, logits_tol, grad_tol):
    assert_close(logits, case["logits"], logits_tol, "logits")
    assert abs(loss.item() - case["loss"].item()) <= logits_tol * abs(case["loss"].item())
    assert grads.keys() == case["grads"].keys()
    for name, ref in case["grads"].items():
        assert_close(grads[name], ref, grad_tol, name)
    for name, ref in case["agc_grads"].items():
        assert_close(clipped[name], ref, grad_tol, f"{name} (AGC)")


@pytest.mark.parametrize("family", FAMILIES)
def test_constructor_is_timms_config(families, family):
    """nfkernels.models.<family> is timm's model_cfgs[<family>]: the data's config differs from it
    only in the fields its script shrank."""
    ours = MODEL_CFGS[family]
    timm_cfg = config_from_timm(families[family]["cfg"])
    for f in fields(NFNetConfig):
        if f.name not in SHRUNK + ("drop_rate", "drop_path_rate"):
            assert getattr(ours, f.name) == getattr(timm_cfg, f.name), f.name
    assert replace(ours, **{f: getattr(timm_cfg, f) for f in SHRUNK}) == timm_cfg


@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_float64_torch_backend_matches_timm(families, family, builder):
    blob = families[family]
    model = BUILDERS[builder](blob, torch.float64)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in blob["state_dict"].items()}
    with nfk.use_backend("torch"):
        outs = run_case(model, blob["cases"][0], torch.float64)
    check(blob["cases"][0], *outs, 1e-9, 1e-9)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_float32_triton_kernels_match_timm(families, family, builder, memory_format):
    blob = families[family]
    model = BUILDERS[builder](blob, torch.float32)
    with nfk.use_backend("triton"):
        outs = run_case(model, blob["cases"][0], torch.float32, memory_format)
    if memory_format == torch.channels_last:
        assert outs[0].shape == blob["cases"][0]["logits"].shape
    check(blob["cases"][0], *outs, 1e-4, 1e-3)


def test_convert_report_names_every_block(families):
    blob = families["nf_regnet_b1"]
    model = NormFreeNet(blob["cfg"], num_classes=blob["num_classes"])
    report = nfk.convert(model)
    assert f"fused {report.blocks_fused} of {report.blocks_fused} NormFreeBlocks" in str(report)
    assert all(isinstance(block, NFBlock) and block.attn is not None for stage in model.stages for block in stage)


@pytest.mark.parametrize("family", ["nf_regnet_b1", "nf_resnet50", "eca_nfnet_l0"])
def test_features_only_taps_timms_modules(families, family):
    """timm's FeatureListNet of each stem and head: the stem's conv tap (before its activation and
    pool), every stage, and the final conv, or the last stage where there is none (NF-ResNets)."""
    blob = families[family]
    model = nfkernels_model(blob, torch.float64)
    feats_model = NFNetFeatures(model)
    x = blob["cases"][0]["x"].to(DEVICE)
    with nfk.use_backend("torch"), torch.no_grad():
        feats = feats_model(x)
        stem = model.stem
        tap = getattr(stem, stem.feature_info["module"].removeprefix("stem."))
        expected = [tap(x) if tap is stem[0] else None]
        y = stem(x)
        for stage in model.stages:
            y = stage(y)
            expected.append(y)
        if isinstance(model.final_conv, WSConv2d):
            expected[-1] = model.final_conv(y)
    assert [f.shape[1] for f in feats] == feats_model.feature_info.channels()
    for i, (got, want) in enumerate(zip(feats, expected)):
        assert got.shape[-2] == -(-x.shape[-2] // feats_model.feature_info.reduction()[i])
        if want is not None:
            assert_close(got, want, 1e-12, f"feature {i}")
    expected_keys = {k for k in model.state_dict() if not k.startswith("head.")}
    names = {k.replace("stem.", "stem_", 1).replace("stages.", "stages_", 1) for k in expected_keys}
    assert set(feats_model.state_dict()) == names


def test_config_errors_name_the_field(families):
    cfg = dict(families["nf_seresnet50"]["cfg"])
    with pytest.raises(ValueError, match=r"attn_kwargs \['use_mlp'\] of attn_layer 'eca' are not supported"):
        config_from_timm({**cfg, "attn_layer": "eca", "attn_kwargs": {"use_mlp": True}})
    with pytest.raises(ValueError, match=r"unknown NfCfg fields \['output_stride'\]"):
        config_from_timm({**cfg, "output_stride": 16})
    with pytest.raises(TypeError, match="cfg must be a timm NfCfg or a dict"):
        config_from_timm("nf_resnet50")
    good = config_from_timm(cfg)
    assert (good.se_rd_ratio, good.attn_layer, good.stem_type, good.act) == (1 / 16, "se", "7x7_pool", "relu")
    with torch.device("meta"):
        for field, value, message in (("stem_type", "5x5", "cfg.stem_type must be one of"),
                                      ("attn_layer", "cbam", "cfg.attn_layer must be one of"),
                                      ("act", "mish", "cfg.act must be one of"),
                                      ("channels", (8, 16), "one entry per stage")):
            with pytest.raises(ValueError, match=message):
                NFNet(replace(good, **{field: value}))
