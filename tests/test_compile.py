"""The registered ops (torch.ops.nfkernels.*) work with the rest of PyTorch: opcheck (schema,
autograd registration, fake tensors, AOT dispatch) and torch.compile(fullgraph=True)."""
import pytest
import torch
import torch.nn as nn

import nfkernels as nfk
from nfkernels.models.nfnet import TINY_CONFIG as TINY
from nfkernels.nn import ScaledAct, SqueezeExcite, WSConv2d
from nfk_testing import DEVICE, ON_GPU, assert_close, backends_for, nfnet_with_live_branches

BACKENDS = backends_for(("torch", "triton"))
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
ops = torch.ops.nfkernels


def _t(*shape, dtype, channels_last=False, grad=True):
    t = torch.randn(*shape, dtype=dtype, device=DEVICE)
    if channels_last:
        t = t.to(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_weight_standardize(dtype, channels_last):
    w = _t(5, 3, 3, 3, dtype=dtype, channels_last=channels_last)
    gain = (torch.rand(5, 1, 1, 1, dtype=dtype, device=DEVICE) + 0.5).requires_grad_()
    torch.library.opcheck(ops.weight_standardize_fwd, (w, gain, 1.0, 1e-5, False, None))
    torch.library.opcheck(ops.weight_standardize_fwd, (w, None, 2.0, 1e-4, True, None))
    out, mean, s0, q = ops.weight_standardize_fwd(w, gain, 1.0, 1e-5, False, None)
    dout = torch.randn_like(out)
    torch.library.opcheck(ops.weight_standardize_bwd, (dout, w.detach(), gain.detach(), mean, s0, q))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_scaled_act(dtype, channels_last):
    x = _t(2, 3, 4, 5, dtype=dtype, channels_last=channels_last)
    bias = _t(3, dtype=dtype)
    torch.library.opcheck(ops.scaled_act_fwd, (x, bias, "gelu", 1.7))
    torch.library.opcheck(ops.scaled_act_fwd, (x, None, "silu", 1.2))
    dy = torch.randn_like(x)
    torch.library.opcheck(ops.scaled_act_bwd, (dy, x.detach(), bias.detach(), "gelu", 1.7, True))


def test_registered_ops_on_meta_tensors():
    """The ops themselves (not only the public API, which takes the torch path on meta) give
    outputs on the meta device and launch nothing: their meta implementation is their body."""
    meta = torch.device("meta")
    w, gain = torch.empty(5, 3, 3, 3, device=meta), torch.empty(5, 1, 1, 1, device=meta)
    w_hat, *stats = ops.weight_standardize_fwd(w, gain, 1.0, 1e-5, False, torch.bfloat16)
    assert w_hat.is_meta and w_hat.shape == w.shape and w_hat.dtype == torch.bfloat16
    x = torch.empty(2, 3, 4, 5, device=meta).to(memory_format=torch.channels_last)
    y = ops.scaled_act_fwd(x, torch.empty(3, device=meta), "gelu", 1.7)
    assert y.is_meta and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    dx, dbias = ops.scaled_act_bwd(torch.empty_like(x), x, torch.empty(3, device=meta), "gelu", 1.7, True)
    assert dx.is_meta and dx.shape == x.shape and dbias.shape == (3,)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("attn", ["se", "eca", None])
def test_opcheck_se_gate_residual(dtype, attn):
    n, c, rd = 2, 6, 3
    h, shortcut = _t(n, c, 3, 4, dtype=dtype), _t(n, c, 3, 4, dtype=dtype)
    se = (_t(rd, c, 1, 1, dtype=dtype), _t(rd, dtype=dtype), _t(c, rd, 1, 1, dtype=dtype), _t(c, dtype=dtype))
    if attn != "se":
        se = (None,) * 4
    eca = _t(1, 1, 3, dtype=dtype) if attn == "eca" else None
    bias, sbias, skip = _t(c, dtype=dtype), _t(c, dtype=dtype), _t((), dtype=dtype)
    mask = torch.tensor([0.0, 2.0], dtype=dtype, device=DEVICE)
    args = (h, shortcut, *se, eca, bias, sbias, skip, mask, 0.2, 2.0)
    torch.library.opcheck(ops.se_gate_residual_fwd, args)
    _, pool, hidden, logits = ops.se_gate_residual_fwd(*args)
    detached = [t.detach() if t is not None else None for t in (h, se[0], se[2], eca, bias, skip, mask)]
    torch.library.opcheck(ops.se_gate_residual_bwd,
                          (torch.randn_like(h), *detached, pool, hidden, logits, 0.2, 2.0))


class ConvActSE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = WSConv2d(4, 8, 3, padding="same", stride=2)
        self.act = ScaledAct("gelu", scale=0.9)
        self.se = SqueezeExcite(8, rd_channels=4)

    def forward(self, x):
        return self.se(self.act(self.conv.conv(x, None), self.conv.bias))


def _compare_compiled(model, x, backend, compile_backend):
    with nfk.use_backend(backend):
        ref = model(x)
        ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
        compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    tol = 1e-10 if x.dtype == torch.float64 and backend == "torch" else 1e-5
    assert_close(out, ref, tol, "forward")
    for (name, _), g, rg in zip(model.named_parameters(), grads, ref_grads):
        assert_close(g, rg, tol, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_conv_act_se(backend):
    torch._dynamo.reset()  # the backend choice is baked in at trace time
    torch.manual_seed(0)
    model = ConvActSE().to(DEVICE, torch.float64)
    with torch.no_grad():
        model.conv.gain.uniform_(0.5, 1.5)
        model.conv.bias.normal_()
    _compare_compiled(model, torch.randn(2, 4, 9, 7, dtype=torch.float64, device=DEVICE), backend, "aot_eager")


def _tiny_nfnet(dtype=torch.float32):
    return nfnet_with_live_branches(TINY, dtype)


def test_compile_fullgraph_tiny_nfnet_cpu():
    torch._dynamo.reset()
    _compare_compiled(_tiny_nfnet(torch.float64), torch.randn(2, 3, 33, 35, dtype=torch.float64, device=DEVICE),
                      "torch", "aot_eager")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_inductor_tiny_nfnet_gpu(backend):
    """On CUDA the Triton ops are triton_ops: Inductor sees and schedules the kernels themselves."""
    torch._dynamo.reset()
    _compare_compiled(_tiny_nfnet(), torch.randn(4, 3, 64, 64, device=DEVICE), backend, "inductor")


def test_backend_errors_still_raise_under_compile():
    torch._dynamo.reset()
    f = torch.compile(lambda x: nfk.scaled_act(x), fullgraph=True, backend="eager")
    with nfk.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda'"):
        f(torch.randn(2, 3, device="cpu"))
    torch._dynamo.reset()
