"""NFNet against timm: the tiny dm_nfnet-style reference in tests/data/timm_nfnet_tiny.pt
(timm 1.0.29, float64, randomized parameters) and the paper's parameter counts."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import nfkernels as nfk
from nfkernels.models import TINY_CONFIG, NFNet, NFNetConfig, nfnet, paper_regularization
from nfk_testing import DEVICE, assert_close, backends_for, reference_data_path

BACKENDS = backends_for(("torch", "triton"))


@pytest.fixture(scope="module")
def reference():
    return torch.load(reference_data_path(), weights_only=True)


def tiny_model(reference, dtype=torch.float64) -> NFNet:
    c = reference["cfg"]
    assert (c["stem_type"], c["act_layer"], c["attn_layer"]) == ("deep_quad", "gelu", "se")
    assert c["gamma_in_act"] and c["same_padding"] and c["skipinit"] and c["extra_conv"]
    cfg = NFNetConfig(depths=tuple(c["depths"]), channels=tuple(c["channels"]), stem_chs=c["stem_chs"],
                      group_size=c["group_size"], bottle_ratio=c["bottle_ratio"], num_features=c["num_features"],
                      alpha=c["alpha"], se_rd_ratio=c["attn_kwargs"]["rd_ratio"], std_conv_eps=c["std_conv_eps"])
    model = NFNet(cfg, num_classes=reference["num_classes"]).to(DEVICE, dtype)
    model.load_state_dict(reference["state_dict"], strict=True)
    return model


def run_case(model, case, dtype):
    model.zero_grad(set_to_none=True)
    logits = model(case["x"].to(DEVICE, dtype))
    loss = F.cross_entropy(logits, case["labels"].to(DEVICE))
    loss.backward()
    return logits, loss, {n: p.grad for n, p in model.named_parameters()}


def test_state_dict_matches_timm_names_and_shapes(reference):
    model = tiny_model(reference)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference["state_dict"].items()}
    assert ours == theirs


@pytest.mark.parametrize("case_index", [0, 1], ids=["4x3x64x64", "2x3x57x61_same_padding"])
def test_float64_torch_backend_matches_timm(reference, case_index):
    model = tiny_model(reference).train()
    case = reference["cases"][case_index]
    with nfk.use_backend("torch"):
        logits, loss, grads = run_case(model, case, torch.float64)
    assert_close(logits, case["logits"], 1e-9, "logits")
    assert abs(loss.item() - case["loss"].item()) <= 1e-9 * abs(case["loss"].item())
    assert grads.keys() == case["grads"].keys()
    for name, ref in case["grads"].items():
        assert_close(grads[name], ref, 1e-9, name)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("case_index", [0, 1], ids=["4x3x64x64", "2x3x57x61_same_padding"])
def test_float32_triton_backend_matches_timm(reference, case_index):
    model = tiny_model(reference, torch.float32).train()
    case = reference["cases"][case_index]
    with nfk.use_backend("triton"):
        logits, loss, grads = run_case(model, case, torch.float32)
    assert_close(logits, case["logits"], 1e-4, "logits")
    assert abs(loss.item() - case["loss"].item()) <= 1e-4 * abs(case["loss"].item())
    for name, ref in case["grads"].items():
        assert_close(grads[name], ref, 1e-3, name)


# Paper Table 1 / timm dm_nfnet_f0 … f6 parameter counts, in millions (F7: the paper; timm has no dm_nfnet_f7).
PAPER_DEPTHS = {"f0": (1, 2, 6, 3), "f1": (2, 4, 12, 6), "f2": (3, 6, 18, 9), "f3": (4, 8, 24, 12),
                "f4": (5, 10, 30, 15), "f5": (6, 12, 36, 18), "f6": (7, 14, 42, 21), "f7": (8, 16, 48, 24)}
PAPER_PARAMS_M = {"f0": 71.5, "f1": 132.6, "f2": 193.8, "f3": 254.9, "f4": 316.1, "f5": 377.2, "f6": 438.4,
                  "f7": 499.5}


@pytest.mark.parametrize("variant", list(PAPER_PARAMS_M))
def test_every_variant_builds_with_the_paper_parameter_count(variant):
    with torch.device("meta"):
        model = getattr(nfk.models, f"nfnet_{variant}")()
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 1) == PAPER_PARAMS_M[variant]
    assert len(model.stages) == 4 and tuple(len(s) for s in model.stages) == PAPER_DEPTHS[variant]
    assert model.head.fc.out_features == 1000 and model.num_features == 3072


def test_variant_options_and_errors():
    with torch.device("meta"):
        model = nfnet("F1", num_classes=10, **paper_regularization("f1"))
    assert model.head.fc.out_features == 10
    assert model.cfg.drop_rate == 0.3 and model.cfg.drop_path_rate == 0.1
    rates = [blk.drop_path_rate for stage in model.stages for blk in stage]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    with pytest.raises(ValueError, match="variant must be one of"):
        nfnet("f9")
    with pytest.raises(ValueError, match="flavor must be one of"):
        nfnet("f0", flavor="jax")


def test_deepmind_flavor_uses_official_numerics(reference):
    timm_model = tiny_model(reference).eval()
    cfg = timm_model.cfg
    dm = NFNet(cfg, num_classes=reference["num_classes"], flavor="deepmind").to(DEVICE, torch.float64).eval()
    dm.load_state_dict(reference["state_dict"], strict=True)
    assert dm.act == "gelu_tanh"
    conv = dm.stages[0][0].conv1
    assert (conv.eps_mode, conv.eps) == ("deepmind", 1e-4)
    assert dm.stages[0][0].drop_path_scale_by_keep is False
    x = reference["cases"][0]["x"].to(DEVICE)
    with torch.no_grad(), nfk.use_backend("torch"):
        a, b = timm_model(x), dm(x)
    # Same weights, different numerics: close but not equal (tanh GELU, eps placement).
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-6 < rel < 0.2


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_end_to_end_matches_timm(reference, backend):
    """The whole model in channels_last (weights and activations) gives timm's numbers."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = (1e-9, 1e-9) if backend == "torch" else (1e-4, 1e-3)
    model = tiny_model(reference, dtype).to(memory_format=torch.channels_last).train()
    case = reference["cases"][1]
    x = case["x"].to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    seen = []
    hook = model.stages[-1].register_forward_hook(lambda m, i, o: seen.append(o))
    with nfk.use_backend(backend):
        logits, _, grads = run_case(model, dict(case, x=x), dtype)
    hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert_close(logits, case["logits"], tol[0], "logits")
    for name, ref in case["grads"].items():
        assert_close(grads[name], ref, tol[1], name)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("flavor", ["timm", "deepmind"])
def test_builds_and_trains_on_meta_device(flavor, backend):
    """Issue 10, item 12: an NFNet built under torch.device("meta") (FSDP2's deferred init, FLOP
    counters, shape inference) runs forward and backward there, in training mode with dropout and
    stochastic depth, and every parameter gets a meta gradient of its shape and dtype."""
    with torch.device("meta"):
        model = NFNet(replace(TINY_CONFIG, drop_rate=0.2, drop_path_rate=0.1), num_classes=10, flavor=flavor)
        x = torch.randn(2, 3, 33, 31)
        labels = torch.randint(0, 10, (2,))
    model.train()
    with nfk.use_backend(backend):
        logits = model(x)
        assert (logits.shape, logits.dtype, logits.device.type) == ((2, 10), torch.float32, "meta")
        F.cross_entropy(logits, labels).backward()
    for name, p in model.named_parameters():
        assert p.device.type == "meta" and p.grad is not None, name
        assert (p.grad.shape, p.grad.dtype, p.grad.device.type) == (p.shape, p.dtype, "meta"), name


def timm_std_conv_same(x, conv):
    """timm's ScaledStdConv2dSame as dm_nfnet uses it (gamma_in_act: γ is in the activation),
    written out: W standardized over (in, kh, kw) with the biased variance and eps 1e-5, times
    gain / sqrt(fan_in), after TensorFlow SAME padding."""
    w = conv.weight
    mean, var = w.mean((1, 2, 3), keepdim=True), w.var((1, 2, 3), unbiased=False, keepdim=True)
    w_hat = (w - mean) / torch.sqrt(var + 1e-5) * conv.gain / math.sqrt(w[0].numel())
    k, s = w.shape[-1], conv.stride[0]
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), w_hat, conv.bias, s, 0, 1, conv.groups)


def timm_features_key(key):
    """The state-dict key in timm's FeatureListNet (timm/models/_features.py, _module_list with
    flatten_sequential=True, as nfnet.py's _create_normfreenet asks): the children of first-level
    Sequentials (stem, stages) move up, their names joined with '_'."""
    top, rest = key.split(".", 1)
    if top in ("stem", "stages"):
        child, rest = rest.split(".", 1)
        return f"{top}_{child}.{rest}"
    return key


def test_features_only_is_timms_feature_list_net(reference):
    """features_only: timm's state-dict layout (so timm's features_only weights load strictly),
    its modules up to the last tap only, and the feature maps at timm's taps: the stem's conv3 and
    the final conv before their activations, stages 0-2 as they leave the stage."""
    timm_sd = {timm_features_key(k): v for k, v in reference["state_dict"].items() if not k.startswith("head.")}
    model = tiny_model(reference)
    fresh = nfk.models.NFNetFeatures(NFNet(model.cfg, num_classes=reference["num_classes"]).to(DEVICE, torch.float64))
    assert set(fresh.state_dict()) == set(timm_sd)
    fresh.load_state_dict(timm_sd, strict=True)
    fresh.eval()
    two = nfk.models.NFNetFeatures(tiny_model(reference), out_indices=(0, 1))
    assert set(two.state_dict()) == {k for k in timm_sd if k.startswith(("stem_conv", "stages_0."))}
    one = nfk.models.NFNetFeatures(tiny_model(reference), out_indices=(0,))
    assert set(one.state_dict()) == {k for k in timm_sd if k.startswith(("stem_conv1.", "stem_conv2.", "stem_conv3."))}

    x = reference["cases"][0]["x"].to(DEVICE)
    model.eval()
    stage_out = []
    hooks = [stage.register_forward_hook(lambda m, i, o: stage_out.append(o)) for stage in model.stages]
    gamma = 1.7015043497085571  # GELU's γ in timm's _nonlin_gamma (DeepMind's table)
    with torch.no_grad(), nfk.use_backend("torch"):
        model(x)
        for h in hooks:
            h.remove()
        h = x
        for conv in (model.stem.conv1, model.stem.conv2):
            h = gamma * F.gelu(timm_std_conv_same(h, conv))
        expected = [timm_std_conv_same(h, model.stem.conv3), *stage_out[:3],
                    timm_std_conv_same(stage_out[3], model.final_conv)]
        feats = fresh(x)
        assert [tuple(f.shape) for f in feats] == [(4, 16, 32, 32), (4, 32, 16, 16), (4, 64, 8, 8), (4, 96, 4, 4),
                                                   (4, 192, 2, 2)]
        for i, (f, e) in enumerate(zip(feats, expected)):
            assert_close(f, e, 1e-9, f"feature {i}")
        assert_close(two(x)[1], stage_out[0], 1e-9, "out_indices=(0, 1)")
