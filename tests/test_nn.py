"""Drop-in layers against the same layers written from plain torch ops (timm's formulation)."""
import math

import pytest
import torch
import torch.nn.functional as F

import nfkernels as nfk
from nfkernels.nn import NFBlock, ScaledAct, SqueezeExcite, WSConv2d
from nfk_testing import DEVICE, assert_close, backends_for, tolerance

BACKENDS = backends_for(("torch", "triton"))
GELU_GAMMA = 1.7015043497085571  # DeepMind's table, written here independently of the library


# ------------------------------------------------------------------ plain-torch references (timm)
def ref_standardize(weight, gain, eps):
    """timm ScaledStdConv2d: F.batch_norm over the (1, O, fan_in) view, weight = gain / sqrt(fan_in)."""
    return F.batch_norm(weight.reshape(1, weight.shape[0], -1), None, None,
                        weight=(gain * weight[0].numel() ** -0.5).view(-1), training=True, momentum=0.0,
                        eps=eps).reshape_as(weight)


def tf_same_pad(x, k, s, d=1):
    """TensorFlow SAME padding of the last two dims, from its definition."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def ref_conv(x, conv, bias=True, eps=1e-5):
    w = ref_standardize(conv.weight, conv.gain, eps)
    k, s = conv.kernel_size[0], conv.stride[0]
    if conv.same_pad:
        x = tf_same_pad(x, k, s)
    return F.conv2d(x, w, conv.bias if bias else None, conv.stride, conv.padding, conv.dilation, conv.groups)


def ref_act(x):
    return F.gelu(x) * GELU_GAMMA


def ref_se(x, se):
    p = x.mean((2, 3), keepdim=True)
    return x * torch.sigmoid(se.fc2(F.relu(se.fc1(p))))


def ref_block(x, blk, mask=None):
    """timm NormFreeBlock.forward (reg=False) transcribed with plain ops."""
    out = ref_act(x) * blk.beta
    shortcut = x
    if blk.downsample is not None:
        pooled = blk.downsample.pool(out)
        shortcut = ref_conv(pooled, blk.downsample.conv)
    out = ref_conv(out, blk.conv1)
    out = ref_conv(ref_act(out), blk.conv2)
    if blk.conv2b is not None:
        out = ref_conv(ref_act(out), blk.conv2b)
    out = ref_conv(ref_act(out), blk.conv3)
    if blk.attn_last is not None:
        out = blk.attn_gain * ref_se(out, blk.attn_last)
    if mask is not None:
        out = out * mask.view(-1, 1, 1, 1).to(out.dtype)
    if blk.skipinit_gain is not None:
        out = out * blk.skipinit_gain
    return out * blk.alpha + shortcut


def randomize_(module, seed):
    """Random non-trivial parameters: every branch contributes (no zero gains or skipinit)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gain") or name.endswith("skipinit_gain"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(fan_in))
    return module


def grads_of(module, x, fn, dout):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(module, x)
    out.backward(dout)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def compare(module, x, ours, theirs, backend, what):
    module = module.to(DEVICE, torch.float64)
    x = x.to(DEVICE, torch.float64)
    with torch.no_grad():
        probe = theirs(module, x)
    dout = torch.randn(probe.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(DEVICE)
    with nfk.use_backend(backend):
        out, dx, dparams = grads_of(module, x, ours, dout)
    ref, ref_dx, ref_dparams = grads_of(module, x, theirs, dout)
    tol = tolerance(torch.float64, backend)
    assert_close(out, ref, tol, f"{what} forward")
    assert_close(dx, ref_dx, tol, f"{what} dx")
    for name, g in ref_dparams.items():
        assert_close(dparams[name], g, tol, f"{what} d{name}")
    return out


# ------------------------------------------------------------------------------------ WSConv2d
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2),
    dict(kernel_size=1),
    dict(kernel_size=3, groups=4),
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=3, stride=2, padding="same"),
    dict(kernel_size=5, stride=2, padding="SAME", bias=False),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_wsconv2d_matches_timm_formulation(backend, kw):
    conv = randomize_(WSConv2d(8, 12, **kw), seed=1)
    x = torch.randn(2, 8, 11, 9, generator=torch.Generator().manual_seed(2))
    compare(conv, x, lambda m, t: m(t), lambda m, t: ref_conv(t, m), backend, "WSConv2d")


def test_wsconv2d_parameters_match_timm_names_and_shapes():
    conv = WSConv2d(16, 32, 3, stride=2, padding="same", groups=2)
    shapes = {n: tuple(p.shape) for n, p in conv.named_parameters()}
    assert shapes == {"weight": (32, 8, 3, 3), "bias": (32,), "gain": (32, 1, 1, 1)}
    assert conv.same_pad and conv.padding == (0, 0)
    assert WSConv2d(4, 4, 3, padding="same").padding == (1, 1)  # stride 1: static, symmetric
    assert WSConv2d(4, 4, 3, stride=2).padding == (1, 1)        # timm get_padding
    with pytest.raises(ValueError, match="padding must be"):
        WSConv2d(4, 4, 3, padding="valid")


def test_wsconv2d_recomputes_standardized_weight_by_default_and_follows_every_change():
    """No implicit cache (issue 11, item 5): in eval without grad each call standardizes the weight
    it sees, whether it was changed in place, by load_state_dict or through .data."""
    conv = randomize_(WSConv2d(4, 6, 3), seed=3).eval()
    with torch.no_grad():
        first = conv.standardized_weight()
        assert conv.standardized_weight() is not first  # recomputed, nothing kept
        conv.weight.mul_(2.0).add_(0.5)              # in place, as an optimizer step does
        assert_close(conv.standardized_weight(), ref_standardize(conv.weight, conv.gain, 1e-5), 2e-5, "in place")
        conv.gain.mul_(3.0)
        assert_close(conv.standardized_weight(), ref_standardize(conv.weight, conv.gain, 1e-5), 2e-5, "gain")
        conv.load_state_dict({k: v * 0.5 for k, v in conv.state_dict().items()})
        assert_close(conv.standardized_weight(), ref_standardize(conv.weight, conv.gain, 1e-5), 2e-5, "after load")
        conv.weight.data[:, 0].mul_(-3.0)             # bypasses the version counters
        assert_close(conv.standardized_weight(), ref_standardize(conv.weight, conv.gain, 1e-5), 2e-5, "after .data")
    w = conv.standardized_weight()
    assert w.requires_grad  # with grad enabled Ŵ stays in the autograd graph


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_standardized_weights_give_the_plain_torch_block(backend):
    """freeze_standardized_weights(model) freezes every WSConv2d of a block (downsample included);
    the frozen block still computes timm's block, and unfreezing undoes it."""
    blk = randomize_(NFBlock(**BLOCK_CONFIGS["nfnet_downsample_stride2_same"]), seed=14).double().eval()
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    assert nfk.nn.freeze_standardized_weights(blk) == 5  # conv1, conv2, conv2b, conv3, downsample.conv
    with torch.no_grad(), nfk.use_backend(backend):
        out = blk(x)
    with torch.no_grad():
        ref = ref_block(x, blk)
    assert_close(out, ref, tolerance(torch.float64, backend), "frozen block")
    assert nfk.nn.unfreeze_standardized_weights(blk) == 5
    assert not any(m.standardized_weight_frozen for m in blk.modules() if isinstance(m, WSConv2d))


# ----------------------------------------------------------------------------- ScaledAct, SE
@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_act_layer(backend):
    act = ScaledAct("gelu", scale=0.8)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, device=DEVICE)
    bias = torch.randn(5, dtype=torch.float64, device=DEVICE)
    with nfk.use_backend(backend):
        out = act(x, bias)
    assert_close(out, GELU_GAMMA * 0.8 * F.gelu(x + bias.view(1, -1, 1, 1)), tolerance(torch.float64, backend), "act")
    assert ScaledAct("relu").gamma == pytest.approx(1.7139588594436646)
    with pytest.raises(ValueError, match="act must be one of"):
        ScaledAct("swish")


@pytest.mark.parametrize("backend", BACKENDS)
def test_squeeze_excite_standalone(backend):
    se = randomize_(SqueezeExcite(16, rd_ratio=0.5), seed=4)
    assert se.fc1.weight.shape == (8, 16, 1, 1) and se.fc2.weight.shape == (16, 8, 1, 1)
    x = torch.randn(3, 16, 5, 7, generator=torch.Generator().manual_seed(5))
    compare(se, x, lambda m, t: m(t), lambda m, t: ref_se(t, m), backend, "SqueezeExcite")


# ------------------------------------------------------------------------------------- NFBlock
BLOCK_CONFIGS = {
    "nfnet_downsample_stride2_same": dict(in_chs=16, out_chs=32, stride=2, alpha=0.2, beta=0.9, bottle_ratio=0.5,
                                          group_size=8, extra_conv=True, skipinit=True, attn_layer="se",
                                          attn_kwargs=dict(rd_ratio=0.5), same_padding=True),
    "nfnet_identity_shortcut": dict(in_chs=32, out_chs=32, alpha=0.2, beta=0.7, bottle_ratio=0.5, group_size=8,
                                    extra_conv=True, skipinit=True, attn_layer="se", attn_kwargs=dict(rd_ratio=0.5),
                                    same_padding=True),
    "resnet_style_no_se_no_skipinit": dict(in_chs=16, out_chs=24, stride=1, alpha=0.2, bottle_ratio=0.25),
    "proj_stride1": dict(in_chs=16, out_chs=32, stride=1, alpha=0.2, bottle_ratio=0.5, group_size=8,
                         extra_conv=True, skipinit=True, attn_layer="se", attn_kwargs=dict(rd_ratio=0.5)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BLOCK_CONFIGS))
def test_nfblock_equals_plain_torch_block(backend, name):
    blk = randomize_(NFBlock(**BLOCK_CONFIGS[name]), seed=6).eval()
    x = torch.randn(2, blk.conv1.in_channels, 9, 7, generator=torch.Generator().manual_seed(7))
    compare(blk, x, lambda m, t: m(t), lambda m, t: ref_block(t, m), backend, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nfblock_channels_last(backend):
    blk = randomize_(NFBlock(**BLOCK_CONFIGS["nfnet_downsample_stride2_same"]), seed=8).eval()
    x = torch.randn(2, 16, 9, 7, generator=torch.Generator().manual_seed(9)).contiguous(
        memory_format=torch.channels_last)
    out = compare(blk, x, lambda m, t: m(t), lambda m, t: ref_block(t, m), backend, "channels_last")
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nfblock_stochastic_depth_in_training(backend, monkeypatch):
    cfg = dict(BLOCK_CONFIGS["nfnet_identity_shortcut"], drop_path_rate=0.5)
    blk = randomize_(NFBlock(**cfg), seed=10).train()
    mask = torch.tensor([0.0, 2.0, 2.0], dtype=torch.float64, device=DEVICE)  # kept samples scaled by 1/keep
    monkeypatch.setattr(blk, "_drop_path_mask", lambda x: mask)
    x = torch.randn(3, 32, 5, 5, generator=torch.Generator().manual_seed(11))
    compare(blk, x, lambda m, t: m(t), lambda m, t: ref_block(t, m, mask), backend, "drop_path")


def test_nfblock_drop_path_mask_statistics():
    blk = NFBlock(8, 8, drop_path_rate=0.25).train()
    x = torch.randn(4000, 8, 1, 1)
    torch.manual_seed(0)
    mask = blk._drop_path_mask(x)
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    assert abs((mask > 0).float().mean().item() - 0.75) < 0.03
    blk.drop_path_scale_by_keep = False
    assert blk._drop_path_mask(x).unique().tolist() == [0.0, 1.0]
    assert blk.eval()._drop_path_mask(x) is None


def test_nfblock_parameter_names_match_timm():
    blk = NFBlock(**BLOCK_CONFIGS["nfnet_downsample_stride2_same"])
    names = {n: tuple(p.shape) for n, p in blk.named_parameters()}
    assert names["skipinit_gain"] == ()
    assert names["downsample.conv.weight"] == (32, 16, 1, 1)
    assert names["conv2.weight"] == (16, 8, 3, 3)   # mid 16 channels, groups 2 of 8
    assert names["attn_last.fc1.weight"] == (16, 32, 1, 1)
    assert names["attn_last.fc2.bias"] == (32,)
    assert names["conv3.gain"] == (32, 1, 1, 1)


def test_wsconv2d_weight_from_inference_mode_is_not_reused_for_autograd():
    conv = randomize_(WSConv2d(4, 6, 3), seed=12).eval().requires_grad_(False)
    x = torch.randn(1, 4, 5, 5)
    with torch.inference_mode():
        conv(x)
    x.requires_grad_(True)
    conv(x).sum().backward()  # frozen parameters, gradient for the input: needs a normal Ŵ
    ref_dx = torch.nn.grad.conv2d_input(x.shape, ref_standardize(conv.weight, conv.gain, 1e-5),
                                        torch.ones(1, 6, 5, 5), padding=1)
    assert_close(x.grad, ref_dx, 2e-5, "dx")


def test_wsconv2d_compiles_in_eval_without_graph_breaks():
    conv = randomize_(WSConv2d(4, 6, 3), seed=13).eval()
    x = torch.randn(2, 4, 7, 7)
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), nfk.use_backend("torch"):
        assert_close(compiled(x), conv(x), 1e-6, "compiled eval")


# ------------------------------------------------------------------ meta device (issue 10, item 12)
META_LAYERS = {
    # name: (builder, input shape, output shape)
    "wsconv2d": (lambda: WSConv2d(4, 8, 3), (2, 4, 9, 9), (2, 8, 9, 9)),
    "wsconv2d_same_static": (lambda: WSConv2d(4, 8, 3, padding="same"), (2, 4, 9, 9), (2, 8, 9, 9)),
    "wsconv2d_same_dynamic": (lambda: WSConv2d(4, 8, 3, stride=2, padding="same"), (2, 4, 9, 10), (2, 8, 5, 5)),
    "wsconv2d_deepmind_grouped": (lambda: WSConv2d(4, 8, 3, groups=2, eps=1e-4, eps_mode="deepmind"),
                                  (2, 4, 6, 6), (2, 8, 6, 6)),
    "scaled_act": (lambda: ScaledAct("relu6", scale=0.5), (2, 4, 9, 9), (2, 4, 9, 9)),
    "squeeze_excite": (lambda: SqueezeExcite(8, rd_ratio=0.5), (2, 8, 5, 5), (2, 8, 5, 5)),
    "nfblock": (lambda: NFBlock(8, 16, stride=2, alpha=0.2, beta=0.9, group_size=4, ch_div=4, extra_conv=True,
                                skipinit=True, attn_layer="se", same_padding=True, drop_path_rate=0.25),
                (3, 8, 9, 9), (3, 16, 5, 5)),
    "nfblock_identity_shortcut": (lambda: NFBlock(8, 8, attn_layer=None), (2, 8, 6, 6), (2, 8, 6, 6)),
}


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(META_LAYERS))
def test_layers_run_on_meta_device(name, dtype, backend):
    """Built under torch.device("meta"), every layer runs forward and backward there with any
    backend set (no data, so the torch path computes the shapes); each parameter gets a meta
    gradient of its own shape and dtype, and the no-grad path runs too, with frozen standardized
    weights as well."""
    build, in_shape, out_shape = META_LAYERS[name]
    with torch.device("meta"):
        layer = build().to(dtype).train()
        x = torch.randn(in_shape, dtype=dtype, requires_grad=True)
    with nfk.use_backend(backend):
        out = layer(x)
        assert (out.shape, out.dtype, out.device.type) == (out_shape, dtype, "meta")
        out.backward(torch.ones_like(out))
        with torch.no_grad():
            assert layer.eval()(x).shape == out_shape
            nfk.nn.freeze_standardized_weights(layer)
            assert layer(x).shape == out_shape
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.device.type == "meta"
    for pname, p in layer.named_parameters():
        assert p.grad is not None, pname
        assert (p.grad.shape, p.grad.dtype, p.grad.device.type) == (p.shape, dtype, "meta"), pname
