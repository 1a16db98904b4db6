"""scaled_act against independent float64 math, forward and backward, every backend."""
import math

import pytest
import torch

import nfkernels as nfk
from nfkernels.ops import scaled_act as sa_op
from nfk_testing import DEVICE, assert_close, backends_for, rel_err, tolerance

BACKENDS = backends_for(("torch", "triton", "cuda"))

# The interpreter runs tl.sigmoid's exp in numpy, which warns when exp(−x) overflows to inf for
# very negative x; the sigmoid is then exactly 0, as on a GPU.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_LAMBDA = 1.0507009873554804934193349852946


def _sigmoid(z):
    return 1.0 / (1.0 + torch.exp(-z))


def _softplus(z):
    return torch.clamp(z, min=0) + torch.log1p(torch.exp(-z.abs()))


# f written from the formulas (not the library's table of torch functions); gradients come from
# autograd through these expressions.
FORMULAS = {
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh(SQRT_2_OVER_PI * (z + 0.044715 * z**3))),
    "relu": lambda z: torch.where(z > 0, z, 0 * z),
    "silu": lambda z: z * _sigmoid(z),
    "relu6": lambda z: torch.where(z > 6, 0 * z + 6, torch.where(z > 0, z, 0 * z)),
    "elu": lambda z: torch.where(z > 0, z, torch.expm1(z)),
    "celu": lambda z: torch.where(z > 0, z, torch.expm1(z)),
    "leaky_relu": lambda z: torch.where(z > 0, z, 0.01 * z),
    "selu": lambda z: SELU_LAMBDA * torch.where(z > 0, z, SELU_ALPHA * torch.expm1(z)),
    "sigmoid": _sigmoid,
    "tanh": torch.tanh,
    "softplus": _softplus,
    "softsign": lambda z: z / (1 + z.abs()),
    "log_sigmoid": lambda z: -_softplus(-z),
    "identity": lambda z: z,
}
ACTS = list(FORMULAS)

SHAPES = {
    "nchw_odd": ((2, 3, 5, 7), False),
    "one_by_one": ((1, 7, 1, 1), False),
    "linear_127": ((3, 127), False),
    "channels_last_odd": ((2, 5, 9, 13), True),
}


def reference(x, bias, act, gamma, scale):
    z = x if bias is None else x + bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    return gamma * scale * FORMULAS[act](z)


def make_inputs(shape, dtype, with_bias=True, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Spread 3 so relu6's upper clamp and the saturating tails are exercised; never zero.
    x = 3.0 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.05
    bias = 0.5 * torch.randn(shape[1], generator=g, dtype=torch.float64) if with_bias else None
    dout = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.to(DEVICE, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = bias.to(DEVICE, dtype) if bias is not None else None
    return x, bias, dout.to(DEVICE, dtype)


def run_and_grad(x, bias, dout, backend, **kw):
    x = x.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True) if bias is not None else None
    with nfk.use_backend(backend):
        out = nfk.scaled_act(x, bias, **kw)
    out.backward(dout)
    return out, x.grad, (bias.grad if bias is not None else None)


def reference_and_grad(x, bias, dout, act, gamma, scale):
    x64 = x.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True) if bias is not None else None
    out = reference(x64, b64, act, gamma, scale)
    out.backward(dout.double())
    return out, x64.grad, (b64.grad if b64 is not None else None)


def plain_torch_in_dtype(x, bias, dout, act, gamma, scale):
    """The same formula computed by plain PyTorch ops without upcasting, for the bf16/fp16 bound."""
    xx = x.detach().clone().requires_grad_(True)
    bb = bias.detach().clone().requires_grad_(True) if bias is not None else None
    out = reference(xx, bb, act, gamma, scale)
    out.backward(dout)
    return out, xx.grad, (bb.grad if bb is not None else None)


def check_all(got, want, tol):
    for name, g, w in zip(("forward", "dx", "dbias"), got, want):
        if w is None:
            assert g is None, name
        else:
            assert_close(g, w, tol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_backward_matches_float64(backend, act, shape_name, dtype):
    shape, channels_last = SHAPES[shape_name]
    seed = ACTS.index(act) * 10 + list(SHAPES).index(shape_name)
    x, bias, dout = make_inputs(shape, dtype, channels_last=channels_last, seed=seed)
    gamma = nfk.NF_GAMMA[act]
    got = run_and_grad(x, bias, dout, backend, act=act, scale=0.8)
    want = reference_and_grad(x, bias, dout, act, gamma, 0.8)
    assert got[0].dtype == dtype and got[0].shape == x.shape
    assert got[2].shape == bias.shape and got[2].dtype == bias.dtype
    if channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[1].is_contiguous(memory_format=torch.channels_last)
    else:
        assert got[0].is_contiguous() and got[1].is_contiguous()
    check_all(got, want, tolerance(dtype, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_without_bias(backend, act, channels_last):
    x, _, dout = make_inputs((2, 4, 3, 5), torch.float64, with_bias=False, channels_last=channels_last, seed=21)
    got = run_and_grad(x, None, dout, backend, act=act, gamma=1.3, scale=0.9)
    want = reference_and_grad(x, None, dout, act, 1.3, 0.9)
    check_all(got, want, tolerance(torch.float64, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_torch(backend, act, dtype):
    x, bias, dout = make_inputs((3, 6, 5, 4), dtype, channels_last=True, seed=3)
    gamma = nfk.NF_GAMMA[act]
    got = run_and_grad(x, bias, dout, backend, act=act)
    want = reference_and_grad(x, bias, dout, act, gamma, 1.0)
    plain = plain_torch_in_dtype(x, bias, dout, act, gamma, 1.0)
    for name, g, w, base in zip(("forward", "dx", "dbias"), got, want, plain):
        assert g.dtype == dtype, name
        assert_close(g, w, tolerance(dtype, backend, rel_err(base, w)), name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_channels_last", [False, True], ids=["x_nchw", "x_channels_last"])
def test_grad_in_other_memory_format(backend, x_channels_last):
    x, bias, dout = make_inputs((2, 6, 4, 3), torch.float64, channels_last=x_channels_last, seed=31)
    other = torch.contiguous_format if x_channels_last else torch.channels_last
    dout = dout.contiguous(memory_format=other)
    got = run_and_grad(x, bias, dout, backend, act="silu")
    want = reference_and_grad(x, bias, dout, "silu", nfk.NF_GAMMA["silu"], 1.0)
    fmt = torch.channels_last if x_channels_last else torch.contiguous_format
    assert got[1].is_contiguous(memory_format=fmt)
    check_all(got, want, tolerance(torch.float64, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["3d_nlc", "5d_channels_last_3d", "strided_slice"])
def test_other_layouts(backend, case):
    if case == "3d_nlc":
        x, bias, dout = make_inputs((3, 5, 7), torch.float64, seed=41)
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channel innermost: runs without a copy
    elif case == "5d_channels_last_3d":
        x, bias, dout = make_inputs((2, 3, 3, 4, 5), torch.float64, seed=42)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    else:
        x, bias, dout = make_inputs((2, 8, 5, 6), torch.float64, seed=43)
        x, dout = x[:, ::2], dout[:, ::2]  # no dense view: the op copies, the result is still right
        bias = bias[::2]  # a strided bias is read with its stride
    got = run_and_grad(x, bias, dout, backend, act="gelu_tanh", scale=1.1)
    want = reference_and_grad(x, bias, dout, "gelu_tanh", nfk.NF_GAMMA["gelu_tanh"], 1.1)
    if case == "5d_channels_last_3d":
        assert got[0].is_contiguous(memory_format=torch.channels_last_3d)
    check_all(got, want, tolerance(torch.float64, backend))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("bias_grad", [True, False], ids=["bias_grad", "bias_frozen"])
def test_many_tiles_and_row_groups(monkeypatch, channels_last, bias_grad):
    """Small blocks: several column tiles per row, several row tiles per dbias row group."""
    monkeypatch.setattr(sa_op, "TILE_ELEMS", 16)
    monkeypatch.setattr(sa_op, "MAX_BLOCK_K", 4)
    monkeypatch.setattr(sa_op, "MAX_ROW_GROUPS", 3)
    x, bias, dout = make_inputs((2, 5, 9, 13), torch.float64, channels_last=channels_last, seed=51)
    xx = x.detach().requires_grad_(True)
    bb = bias.detach().requires_grad_(bias_grad)
    with nfk.use_backend("triton"):
        out = nfk.scaled_act(xx, bb, act="elu", scale=0.7)
    out.backward(dout)
    want = reference_and_grad(x, bias, dout, "elu", nfk.NF_GAMMA["elu"], 0.7)
    assert_close(out, want[0], 1e-6, "forward")
    assert_close(xx.grad, want[1], 1e-6, "dx")
    if bias_grad:
        assert_close(bb.grad, want[2], 1e-6, "dbias")
    else:
        assert bb.grad is None


# f'(NaN) as torch's elementwise backward formulas define it (its CUDA kernels, and its CPU
# kernels' scalar loops): they test z ≤ 0 (relu; relu6 also z ≥ 6; elu, celu, selu) or z > 0
# (leaky_relu) and take the other branch when the comparison is false, as it is for NaN. The
# smooth activations give NaN. f(NaN) is NaN for every activation.
GRAD_AT_NAN = {act: math.nan for act in FORMULAS}
GRAD_AT_NAN.update(relu=1.0, relu6=1.0, elu=1.0, celu=1.0, leaky_relu=0.01, selu=SELU_LAMBDA, identity=1.0)
# torch's vectorized CPU backward of these gives 0 (relu6) or NaN (elu, celu, selu) at NaN inside
# the SIMD body and the formula's value in the scalar tail, so the torch backend on CPU tensors
# has no single f'(NaN) there to check.
TORCH_CPU_NAN_GRAD_VARIES = {"relu6", "elu", "celu", "selu"}

TORCH_FUNCTIONS = {
    "gelu": torch.nn.functional.gelu, "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "relu": torch.relu, "silu": torch.nn.functional.silu, "relu6": torch.nn.functional.relu6,
    "elu": torch.nn.functional.elu, "celu": torch.nn.functional.celu,
    "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.01), "selu": torch.selu, "sigmoid": torch.sigmoid,
    "tanh": torch.tanh, "softplus": torch.nn.functional.softplus, "softsign": torch.nn.functional.softsign,
    "log_sigmoid": torch.nn.functional.logsigmoid, "identity": lambda z: z,
}


@pytest.mark.parametrize("act", ACTS)
def test_nan_table_is_torchs(act):
    """GRAD_AT_NAN is torch's own answer: one element, so torch's scalar formula runs."""
    z = torch.tensor([math.nan], dtype=torch.float64, requires_grad=True)
    y = TORCH_FUNCTIONS[act](z)
    y.backward(torch.ones_like(y))
    assert y.isnan().all()
    torch.testing.assert_close(z.grad, torch.tensor([GRAD_AT_NAN[act]], dtype=torch.float64), equal_nan=True,
                               rtol=0, atol=0)


def assert_nan_where_expected(got, want, tol, what, check=None):
    """NaN exactly where want has NaN, and the rest within tol (only where ``check``, if given)."""
    check = torch.ones_like(want, dtype=torch.bool) if check is None else check
    got_nan, want_nan = got.isnan() & check, want.isnan() & check
    same_nans = torch.equal(got_nan, want_nan)
    assert same_nans, f"{what}: {int(got_nan.sum())} NaNs where {int(want_nan.sum())} are expected"
    finite = ~want.isnan() & check
    assert_close(got[finite], want[finite], tol, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_propagates_like_torch(backend, act, channels_last, dtype):
    """NaN inputs give NaN outputs and torch's f'(NaN) in dx (issue 10, item 6); the other
    elements are unaffected. A max/min or `z > 0 ? z : 0` form would turn NaN into 0."""
    x, bias, dout = make_inputs((2, 3, 4, 5), dtype, channels_last=channels_last, seed=81)
    nan_at = torch.zeros(x.shape, dtype=torch.bool, device=DEVICE)
    nan_at[0, 1, 2, :3] = True
    nan_at[1, 1, 0, 4] = True
    x = x.masked_fill(nan_at, math.nan)
    gamma, scale = nfk.NF_GAMMA[act], 0.8
    got = run_and_grad(x, bias, dout, backend, act=act, scale=scale)
    out64, dx64, _ = reference_and_grad(x.masked_fill(nan_at, 1.0), bias, dout, act, gamma, scale)
    out64 = out64.detach().masked_fill(nan_at, math.nan)
    dx64 = torch.where(nan_at, dout.double() * (gamma * scale * GRAD_AT_NAN[act]), dx64)
    db64 = dx64.sum(dim=(0, 2, 3))  # NaN in channel 1 exactly when f'(NaN) is NaN
    tol = tolerance(dtype, backend)
    assert_nan_where_expected(got[0], out64, tol, "forward")
    if backend == "torch" and DEVICE.type == "cpu" and act in TORCH_CPU_NAN_GRAD_VARIES:
        assert_nan_where_expected(got[1], dx64, tol, "dx", check=~nan_at)
        assert_nan_where_expected(got[2], db64, tol, "dbias", check=torch.arange(3, device=DEVICE) != 1)
    else:
        assert_nan_where_expected(got[1], dx64, tol, "dx")
        assert_nan_where_expected(got[2], db64, tol, "dbias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gamma_defaults_to_nf_table(backend):
    table = {"gelu": 1.7015043497085571, "relu": 1.7139588594436646, "silu": 1.7881293296813965,
             "gelu_tanh": 1.7015043497085571}
    for act, gamma in table.items():
        assert nfk.NF_GAMMA[act] == gamma
    x, bias, _ = make_inputs((2, 3, 4, 4), torch.float64, seed=61)
    with nfk.use_backend(backend):
        for act, gamma in table.items():
            out = nfk.scaled_act(x, bias, act=act)
            assert_close(out, reference(x, bias, act, gamma, 1.0), tolerance(torch.float64, backend), act)
        out = nfk.scaled_act(x, bias, act="relu", gamma=2.5, scale=0.5)
        assert_close(out, reference(x, bias, "relu", 2.5, 0.5), tolerance(torch.float64, backend), "explicit")
        out = nfk.scaled_act(x)  # default act is exact gelu with its NF gain
        assert_close(out, reference(x, None, "gelu", table["gelu"], 1.0), tolerance(torch.float64, backend), "default")
    assert set(nfk.NF_GAMMA) == set(FORMULAS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_path(backend):
    x, bias, _ = make_inputs((4, 3, 3, 3), torch.float32, seed=71)
    with torch.no_grad(), nfk.use_backend(backend):
        out = nfk.scaled_act(x.requires_grad_(True), bias, act="softplus")
    assert not out.requires_grad
    assert_close(out, reference(x.double(), bias.double(), "softplus", nfk.NF_GAMMA["softplus"], 1.0), 2e-5, "fwd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    x = torch.empty(0, 3, 4, 4, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, requires_grad=True)
    with nfk.use_backend(backend):
        out = nfk.scaled_act(x, bias)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(bias.grad, torch.zeros(3, device=DEVICE))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
def test_triton_kernels_are_what_runs(count_launches):
    fwd = count_launches(sa_op, "_scaled_act_fwd_kernel")
    bwd = count_launches(sa_op, "_scaled_act_bwd_kernel")
    x, bias, dout = make_inputs((2, 3, 4, 4), torch.float32)
    run_and_grad(x, bias, dout, "triton")
    assert (fwd.count, bwd.count) == (1, 1)
    run_and_grad(x, bias, dout, "torch")
    assert (fwd.count, bwd.count) == (1, 1)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        nfk.scaled_act([1.0, 2.0])
    with pytest.raises(TypeError, match="x must have dtype"):
        nfk.scaled_act(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="x must have at least 2 dims"):
        nfk.scaled_act(torch.randn(5))
    with pytest.raises(ValueError, match="bias must have 4 elements"):
        nfk.scaled_act(x, torch.ones(3))
    with pytest.raises(TypeError, match="bias has dtype"):
        nfk.scaled_act(x, torch.ones(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        nfk.scaled_act(x, [0.0] * 4)
    with pytest.raises(ValueError, match=r"act must be one of \(.*'gelu_tanh'"):
        nfk.scaled_act(x, act="swish")
    with pytest.raises(TypeError, match="gamma must be a real number"):
        nfk.scaled_act(x, gamma="1")
    with pytest.raises(TypeError, match="scale must be a real number"):
        nfk.scaled_act(x, scale=None)
    with pytest.raises(ValueError, match="scale must be finite"):
        nfk.scaled_act(x, scale=float("nan"))
    with pytest.raises(TypeError, match="dense"):
        nfk.scaled_act(x.reshape(2, -1).to_sparse())
