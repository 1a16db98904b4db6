"""Autocast, gradient checkpointing and eval-mode caching with the fused layers."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import nfkernels as nfk
from nfkernels.models.nfnet import NFNet, TINY_CONFIG as TINY
from nfkernels.nn import NFBlock, WSConv2d
from nfk_testing import DEVICE, assert_close, backends_for, rel_err

BACKENDS = backends_for(("torch", "triton"))
AMP_DTYPE = torch.bfloat16 if DEVICE.type == "cpu" else torch.float16


def _tiny_nfnet(dtype=torch.float32):
    torch.manual_seed(0)
    model = NFNet(TINY, num_classes=10).to(DEVICE, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skipinit_gain") or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_standardize_out_dtype(backend):
    w = torch.randn(6, 4, 3, 3, device=DEVICE, requires_grad=True)
    gain = (torch.rand(6, 1, 1, 1, device=DEVICE) + 0.5).requires_grad_()
    low = torch.float16  # the interpreter stores fp16; bf16 arithmetic is not available there
    with nfk.use_backend(backend):
        out = nfk.weight_standardize(w, gain, out_dtype=low)
        ref = nfk.weight_standardize(w, gain)
    assert out.dtype == low and out.shape == w.shape
    assert_close(out, ref, 1e-3, "fp16 Ŵ from fp32 statistics")
    dout = torch.randn_like(out)
    with nfk.use_backend(backend):
        dw, dgain = torch.autograd.grad(out, (w, gain), dout)
        rdw, rdgain = torch.autograd.grad(ref, (w, gain), dout.float())
    assert dw.dtype == torch.float32 and dgain.dtype == torch.float32
    assert_close(dw, rdw, 1e-5, "dW")
    assert_close(dgain, rdgain, 1e-5, "dgain")
    with pytest.raises(TypeError, match="out_dtype must be"):
        nfk.weight_standardize(w, out_dtype=torch.int8)


def test_wsconv2d_writes_standardized_weight_in_autocast_dtype():
    conv = WSConv2d(4, 8, 3).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=AMP_DTYPE):
        assert conv.standardized_weight().dtype == AMP_DTYPE
        y = conv(torch.randn(2, 4, 6, 6, device=DEVICE))
        with torch.no_grad():  # the eval cache is keyed on the dtype too
            assert conv.standardized_weight().dtype == AMP_DTYPE
    assert y.dtype == AMP_DTYPE
    assert conv.standardized_weight().dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_may_be_fp32_next_to_low_precision_activations(backend):
    x = torch.randn(2, 6, 4, 4, device=DEVICE).half().requires_grad_()
    bias = torch.randn(6, device=DEVICE, requires_grad=True)
    with nfk.use_backend(backend):
        y = nfk.scaled_act(x, bias)
        y.float().sum().backward()
    assert y.dtype == torch.float16 and bias.grad.dtype == torch.float32
    assert_close(y, nfk.scaled_act(x.detach().float(), bias.detach()), 2e-3, "fp16 x, fp32 bias")
    with pytest.raises(TypeError, match="bias has dtype"):
        nfk.scaled_act(x, bias.double())


def test_tiny_nfnet_under_autocast_is_close_to_fp32():
    model = _tiny_nfnet()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.sum(), list(model.parameters()))
    with torch.autocast(DEVICE.type, dtype=AMP_DTYPE):
        out = model(x)
    grads = torch.autograd.grad(out.float().sum(), list(model.parameters()))
    assert rel_err(out, ref) < 2e-2
    assert all(g.dtype == p.dtype for g, p in zip(grads, model.parameters()))
    assert rel_err(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])) < 5e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointed_block_gives_same_gradients(backend):
    torch.manual_seed(0)
    blk = NFBlock(8, 16, stride=2, alpha=0.2, beta=0.9, group_size=4, extra_conv=True, skipinit=True,
                  attn_layer="se", attn_kwargs=dict(rd_ratio=0.5), same_padding=True).to(DEVICE, torch.float64)
    with torch.no_grad():
        blk.skipinit_gain.fill_(0.7)
        for name, p in blk.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    params = [x, *blk.parameters()]
    with nfk.use_backend(backend):
        ref = torch.autograd.grad(blk(x).square().sum(), params)
        out = checkpoint(blk, x, use_reentrant=False)
        grads = torch.autograd.grad(out.square().sum(), params)
    for g, r in zip(grads, ref):
        assert_close(g, r, 1e-12, "checkpointed gradient")


def test_eval_no_grad_equals_train_forward():
    model = _tiny_nfnet()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    train_out = model.train()(x)  # drop rates are 0: train and eval compute the same function
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)  # the second uses the cached standardized weights
    assert_close(first, train_out, 1e-6, "eval vs train")
    assert torch.equal(first, second)
