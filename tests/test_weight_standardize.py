"""weight_standardize against independent float64 math, forward and backward, every backend."""
import math

import pytest
import torch

import nfkernels as nfk
from nfkernels.ops import weight_standardize as ws_op
from nfk_testing import DEVICE, assert_close, backends_for, rel_err, tolerance

BACKENDS = backends_for(("torch", "triton", "cuda"))

SHAPES = {
    "linear_odd": (3, 7),
    "linear_row_1153": (5, 1153),
    "conv3x3": (7, 3, 3, 3),
    "conv1x1_127": (127, 16, 1, 1),
    "grouped3x3": (32, 8, 3, 3),
    "single_unit": (1, 5, 3, 3),
    "fan_in_1_conv": (4, 1, 1, 1),   # N == 1: the compiled kernels see N as a constant
    "fan_in_1_linear": (3, 1),
}


def reference(weight, gain, gamma, eps, mode):
    """Float64 math written from the formula, independent of the library."""
    w = weight.reshape(weight.shape[0], -1)
    n = w.shape[1]
    mean = w.sum(1, keepdim=True) / n
    var = ((w - mean) ** 2).sum(1, keepdim=True) / n
    if mode == "timm":
        out = (w - mean) / torch.sqrt(var + eps) * gamma / math.sqrt(n)
    else:
        out = (w - mean) * gamma / torch.sqrt(torch.clamp(n * var, min=eps))
    if gain is not None:
        out = out * gain.reshape(-1, 1)
    return out.reshape(weight.shape)


def make_inputs(shape, dtype, with_gain, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    fan_in = math.prod(shape[1:])
    w = (torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in) + 0.3 * torch.randn(
        shape[0], *([1] * (len(shape) - 1)), generator=g, dtype=torch.float64))
    gain = (0.5 + torch.rand(shape[0], 1, 1, 1, generator=g, dtype=torch.float64)) if with_gain else None
    if gain is not None and len(shape) == 2:
        gain = gain.view(shape[0], 1)
    dout = torch.randn(shape, generator=g, dtype=torch.float64)
    w = w.to(DEVICE, dtype)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    gain = gain.to(DEVICE, dtype) if gain is not None else None
    return w, gain, dout.to(DEVICE, dtype)


def run_and_grad(weight, gain, dout, backend, **kw):
    weight = weight.detach().requires_grad_(True)
    gain = gain.detach().requires_grad_(True) if gain is not None else None
    with nfk.use_backend(backend):
        out = nfk.weight_standardize(weight, gain, **kw)
    out.backward(dout)
    return out, weight.grad, (gain.grad if gain is not None else None)


def reference_and_grad(weight, gain, dout, gamma, eps, mode):
    w64 = weight.detach().double().requires_grad_(True)
    g64 = gain.detach().double().requires_grad_(True) if gain is not None else None
    out = reference(w64, g64, gamma, eps, mode)
    out.backward(dout.double())
    return out, w64.grad, (g64.grad if g64 is not None else None)


def plain_torch_in_dtype(weight, gain, dout, gamma, eps, mode):
    """The same formula computed by plain PyTorch ops without upcasting, for the bf16/fp16 bound."""
    w = weight.detach().clone().requires_grad_(True)
    g = gain.detach().clone().requires_grad_(True) if gain is not None else None
    out = reference(w, g, gamma, eps, mode)
    out.backward(dout)
    return out, w.grad, (g.grad if g is not None else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("mode", ["timm", "deepmind"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_backward_matches_float64(backend, shape_name, mode, dtype):
    shape = SHAPES[shape_name]
    eps = 1e-5 if mode == "timm" else 1e-4
    w, gain, dout = make_inputs(shape, dtype, with_gain=True, seed=hash((shape_name, mode)) % 1000)
    out, dw, dg = run_and_grad(w, gain, dout, backend, gamma=1.7, eps=eps, eps_mode=mode)
    ref, ref_dw, ref_dg = reference_and_grad(w, gain, dout, 1.7, eps, mode)
    tol = tolerance(dtype, backend)
    assert out.dtype == dtype and out.shape == w.shape
    assert_close(out, ref, tol, "forward")
    assert_close(dw, ref_dw, tol, "dweight")
    assert_close(dg, ref_dg, tol, "dgain")
    assert dg.shape == gain.shape and dg.dtype == gain.dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_torch(backend, dtype):
    w, gain, dout = make_inputs((24, 8, 3, 3), dtype, with_gain=True, seed=3)
    out, dw, dg = run_and_grad(w, gain, dout, backend, gamma=1.0, eps=1e-5)
    ref, ref_dw, ref_dg = reference_and_grad(w, gain, dout, 1.0, 1e-5, "timm")
    plain, plain_dw, plain_dg = plain_torch_in_dtype(w, gain, dout, 1.0, 1e-5, "timm")
    assert out.dtype == dtype and dw.dtype == dtype and dg.dtype == dtype
    for name, got, want, base in (("forward", out, ref, plain), ("dweight", dw, ref_dw, plain_dw),
                                  ("dgain", dg, ref_dg, plain_dg)):
        assert_close(got, want, tolerance(dtype, backend, rel_err(base, want)), name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_gain(backend):
    w, _, dout = make_inputs((9, 4, 3, 3), torch.float64, with_gain=False, seed=5)
    out, dw, _ = run_and_grad(w, None, dout, backend)
    ref, ref_dw, _ = reference_and_grad(w, None, dout, 1.0, 1e-5, "timm")
    assert_close(out, ref, tolerance(torch.float64, backend), "forward")
    assert_close(dw, ref_dw, tolerance(torch.float64, backend), "dweight")


def assert_fp64_timm_match(w, gain, dout, backend):
    """Forward and both gradients of fp64 ``w`` against timm's formula in float64; returns Ŵ."""
    out, dw, dg = run_and_grad(w, gain, dout, backend)
    ref, ref_dw, ref_dg = reference_and_grad(w, gain, dout, 1.0, 1e-5, "timm")
    tol = tolerance(torch.float64, backend)
    assert_close(out, ref, tol, "forward")
    assert_close(dw, ref_dw, tol, "dweight")
    assert_close(dg, ref_dg, tol, "dgain")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_weight_keeps_layout(backend):
    w, gain, dout = make_inputs((16, 8, 3, 3), torch.float64, with_gain=True, channels_last=True, seed=7)
    out = assert_fp64_timm_match(w, gain, dout, backend)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_1x1_weight_with_contiguous_grad(backend):
    """A 1x1 conv weight in channels_last (strides (8, 1, 8, 8)) and the gradient a convolution
    gives it (strides (8, 1, 1, 1)): one memory order, read as it is."""
    w, gain, dout = make_inputs((16, 8, 1, 1), torch.float64, with_gain=True, seed=8)
    w = torch.empty_strided(w.shape, (8, 1, 8, 8), dtype=w.dtype, device=w.device).copy_(w)  # model.to(channels_last)
    assert w.stride() == (8, 1, 8, 8) and dout.stride() == (8, 1, 1, 1)
    assert_fp64_timm_match(w, gain, dout, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_weight_and_grad(backend):
    w, gain, dout = make_inputs((8, 12, 3, 3), torch.float64, with_gain=True, seed=9)
    w_view = w[:, ::2]  # no dense row view: the op copies, the result is still right
    dout_t = dout[:, ::2].transpose(2, 3).contiguous().transpose(2, 3)  # grad in another layout
    gain = torch.stack([gain, -gain], dim=1).reshape(-1, 1, 1, 1)[::2]  # strided gain: read with its stride
    assert_fp64_timm_match(w_view, gain, dout_t, backend)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("n", [127, 64, 1153])
def test_rows_longer_than_one_block(monkeypatch, n):
    monkeypatch.setattr(ws_op, "MAX_BLOCK", 32)
    w, gain, dout = make_inputs((6, n), torch.float64, with_gain=True, seed=n)
    for mode, eps in (("timm", 1e-5), ("deepmind", 1e-4)):
        out, dw, dg = run_and_grad(w, gain, dout, "triton", eps=eps, eps_mode=mode)
        ref, ref_dw, ref_dg = reference_and_grad(w, gain, dout, 1.0, eps, mode)
        assert_close(out, ref, 1e-6, f"{mode} forward")
        assert_close(dw, ref_dw, 1e-6, f"{mode} dweight")
        assert_close(dg, ref_dg, 1e-6, f"{mode} dgain")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepmind_clamp_branch(backend):
    """Rows with N·σ² < eps take the clamped denominator, whose derivative drops the σ² term."""
    g = torch.Generator().manual_seed(11)
    w = 1.0 + 1e-4 * torch.randn(4, 18, generator=g, dtype=torch.float64)
    w[:2] = torch.randn(2, 18, generator=g, dtype=torch.float64)  # two rows unclamped
    gain = torch.rand(4, 1, generator=g, dtype=torch.float64) + 0.5
    dout = torch.randn(4, 18, generator=g, dtype=torch.float64)
    w, gain, dout = w.to(DEVICE), gain.to(DEVICE), dout.to(DEVICE)
    out, dw, dg = run_and_grad(w, gain, dout, backend, eps=1e-4, eps_mode="deepmind")
    ref, ref_dw, ref_dg = reference_and_grad(w, gain, dout, 1.0, 1e-4, "deepmind")
    tol = tolerance(torch.float64, backend)
    assert_close(out, ref, tol, "forward")
    assert_close(dw, ref_dw, tol, "dweight")
    assert_close(dg, ref_dg, tol, "dgain")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_path(backend):
    w, gain, _ = make_inputs((10, 3, 3, 3), torch.float32, with_gain=True, seed=13)
    with torch.no_grad(), nfk.use_backend(backend):
        out = nfk.weight_standardize(w, gain)
    assert not out.requires_grad
    assert_close(out, reference(w.double(), gain.double(), 1.0, 1e-5, "timm"), 2e-5, "forward")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 3, 3), (4, 0, 3, 3), (4, 0, 1, 1), (0, 5), (3, 0)], ids=str)
@pytest.mark.parametrize("gain_shape", ["timm", "flat"])
@pytest.mark.parametrize("requires", ["both", "gain_only"])
@pytest.mark.parametrize("mode", ["timm", "deepmind"])
def test_empty_weight(backend, shape, gain_shape, requires, mode):
    """No rows (O = 0) or empty rows (fan-in N = 0; issue 10, item 8): Ŵ has no elements, so the
    loss depends on neither weight nor gain and both gradients are zeros of their own shapes."""
    w = torch.empty(shape, device=DEVICE, requires_grad=requires == "both")
    gain_size = (shape[0], *([1] * (len(shape) - 1))) if gain_shape == "timm" else (shape[0],)
    gain = torch.full(gain_size, 1.5, device=DEVICE, requires_grad=True)
    with nfk.use_backend(backend):
        out = nfk.weight_standardize(w, gain, gamma=1.7, eps_mode=mode)
    assert out.shape == w.shape and out.dtype == w.dtype
    out.backward(torch.empty_like(out))
    assert torch.equal(gain.grad, torch.zeros(gain_size, device=DEVICE))
    if requires == "both":
        assert torch.equal(w.grad, torch.zeros(shape, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 3, 3), (4, 0, 3, 3)], ids=str)
def test_empty_weight_out_dtype(backend, shape):
    """As under autocast: Ŵ in bfloat16, gradients back in the parameters' float32."""
    w = torch.empty(shape, device=DEVICE, requires_grad=True)
    gain = torch.ones(shape[0], 1, 1, 1, device=DEVICE, requires_grad=True)
    with nfk.use_backend(backend):
        out = nfk.weight_standardize(w, gain, out_dtype=torch.bfloat16)
    assert out.shape == w.shape and out.dtype == torch.bfloat16
    out.sum().backward()
    assert w.grad.dtype == gain.grad.dtype == torch.float32
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(gain.grad, torch.zeros_like(gain))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
def test_triton_kernels_are_what_runs(count_launches):
    fwd = count_launches(ws_op, "_weight_standardize_fwd_kernel")
    bwd = count_launches(ws_op, "_weight_standardize_bwd_kernel")
    w, gain, dout = make_inputs((4, 3, 3, 3), torch.float32, with_gain=True)
    run_and_grad(w, gain, dout, "triton")
    assert (fwd.count, bwd.count) == (1, 1)
    run_and_grad(w, gain, dout, "torch")
    assert (fwd.count, bwd.count) == (1, 1)


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        nfk.weight_standardize([1.0, 2.0])
    with pytest.raises(TypeError, match="weight must have dtype"):
        nfk.weight_standardize(torch.ones(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="weight must have at least 2 dims"):
        nfk.weight_standardize(torch.randn(5))
    with pytest.raises(ValueError, match="gain must have 4 elements"):
        nfk.weight_standardize(w, torch.ones(3, 1, 1, 1))
    with pytest.raises(TypeError, match="gain has dtype"):
        nfk.weight_standardize(w, torch.ones(4, 1, 1, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps_mode must be one of"):
        nfk.weight_standardize(w, eps_mode="jax")
    with pytest.raises(ValueError, match="eps must be > 0"):
        nfk.weight_standardize(w, eps=0.0)
    with pytest.raises(TypeError, match="gamma must be a real number"):
        nfk.weight_standardize(w, gamma="1")
    with pytest.raises(TypeError, match="dense"):
        nfk.weight_standardize(w.reshape(4, -1).to_sparse())
