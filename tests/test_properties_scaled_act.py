"""Property tests of nfkernels.scaled_act: y = γ·scale·f(x + b_c), dx = dy·γ·scale·f'(x + b_c),
db_c = Σ dx over all dims but 1 (docs/design.md §5), against f and f' written out here in float64 with
their limits at ±inf; shapes, dtypes, layouts, value scales and backends drawn by hypothesis."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

import nfkernels as nfk
from nfkernels.ops import scaled_act as sa_op
from nfk_strategies import (
    backend_runner,
    CL, F32, F64, LOW_PRECISION, Layout, assert_bad_argument_rejected, assert_matches, dim_sizes,
    dout_layouts, dtypes, layouts, leaf_view, make_dout, other_device, plain_err, seeds, tol_for,
    value_kinds, values,
)
from nfk_testing import DEVICE, backends_for

# The interpreter evaluates exp/erf in numpy, which warns on overflow and on inf·0.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_LAMBDA = 1.0507009873554804934193349852946
LEAK = 0.01


def _sigmoid(z):
    e = torch.exp(-z.abs())  # never overflows
    return torch.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _softplus(z):
    return z.clamp(min=0) + torch.log1p(torch.exp(-z.abs()))


def _gelu(z):
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
    return z * cdf, cdf + z * torch.exp(-0.5 * z * z) * INV_SQRT_2PI


def _sech2(u):
    """1 − tanh²(u) = 4e/(1 + e)², e = exp(−2|u|): 1 − t² would cancel where t rounds to ±1."""
    e = torch.exp(-2 * u.abs())
    return 4 * e / (1 + e) ** 2


def _gelu_tanh(z):
    u = SQRT_2_OVER_PI * (z + 0.044715 * z**3)
    t = torch.tanh(u)
    sech2 = _sech2(u)
    return 0.5 * z * (1 + t), 0.5 * (1 + t) + 0.5 * z * sech2 * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)


def _where(cond, a, b):
    return torch.where(cond, a, b)


# f and f' for finite z, written from the definitions (torch ops as arithmetic only).
def _f_and_grad(act, z):
    one, zero = torch.ones_like(z), torch.zeros_like(z)
    if act == "gelu":
        return _gelu(z)
    if act == "gelu_tanh":
        return _gelu_tanh(z)
    if act == "relu":
        return _where(z > 0, z, zero), _where(z > 0, one, zero)
    if act == "relu6":
        return z.clamp(0, 6), _where((z > 0) & (z < 6), one, zero)
    if act == "silu":
        s = _sigmoid(z)
        return z * s, s * (1 + z * (1 - s))
    if act in ("elu", "celu"):  # alpha = 1
        return _where(z > 0, z, torch.expm1(z)), _where(z > 0, one, torch.exp(z))
    if act == "leaky_relu":
        return _where(z > 0, z, LEAK * z), _where(z > 0, one, LEAK * one)
    if act == "selu":
        return (SELU_LAMBDA * _where(z > 0, z, SELU_ALPHA * torch.expm1(z)),
                SELU_LAMBDA * _where(z > 0, one, SELU_ALPHA * torch.exp(z)))
    if act == "sigmoid":  # σ' = σ(z)σ(−z): s(1 − s) would cancel where s rounds to 1
        return _sigmoid(z), _sigmoid(z) * _sigmoid(-z)
    if act == "tanh":
        return torch.tanh(z), _sech2(z)
    if act == "softplus":
        return _softplus(z), _sigmoid(z)
    if act == "softsign":
        return z / (1 + z.abs()), 1 / (1 + z.abs()) ** 2
    if act == "log_sigmoid":
        return -_softplus(-z), _sigmoid(-z)
    if act == "identity":
        return z, one
    raise KeyError(act)


INF = math.inf
# (f(+inf), f'(+inf), f(-inf), f'(-inf)): the limits.
LIMITS = {
    "gelu": (INF, 1.0, 0.0, 0.0), "gelu_tanh": (INF, 1.0, 0.0, 0.0), "relu": (INF, 1.0, 0.0, 0.0),
    "relu6": (6.0, 0.0, 0.0, 0.0), "silu": (INF, 1.0, 0.0, 0.0), "elu": (INF, 1.0, -1.0, 0.0),
    "celu": (INF, 1.0, -1.0, 0.0), "leaky_relu": (INF, 1.0, -INF, LEAK),
    "selu": (INF, SELU_LAMBDA, -SELU_LAMBDA * SELU_ALPHA, 0.0), "sigmoid": (1.0, 0.0, 0.0, 0.0),
    "tanh": (1.0, 0.0, -1.0, 0.0), "softplus": (INF, 1.0, 0.0, 0.0), "softsign": (1.0, 0.0, -1.0, 0.0),
    "log_sigmoid": (0.0, 0.0, -INF, 1.0), "identity": (INF, 1.0, -INF, 1.0),
}
# Where the textbook formula is an indeterminate form at ±inf (inf·0, inf/inf): NaN is accepted
# there besides the limit (torch itself returns NaN for gelu(±inf) in fp32, silu(-inf), softsign(±inf)).
INDETERMINATE = {"gelu": (True, True), "gelu_tanh": (False, True), "silu": (False, True), "softsign": (True, True)}
# Points where f' jumps, with its one-sided values (left, right): either is accepted exactly there.
KINKS = {"relu": {0.0: (0.0, 1.0)}, "relu6": {0.0: (0.0, 1.0), 6.0: (1.0, 0.0)},
         "leaky_relu": {0.0: (LEAK, 1.0)}, "selu": {0.0: (SELU_LAMBDA * SELU_ALPHA, SELU_LAMBDA)}}
ACTS = tuple(LIMITS)


def act_math(act, z):
    """(f(z), f'(z), f'(z⁻), f'(z⁺)) in z's dtype, NaN for NaN, the limits at ±inf."""
    finite = torch.isfinite(z)
    zf = torch.where(finite, z, torch.zeros_like(z))
    f, df = _f_and_grad(act, zf)
    pos_f, pos_d, neg_f, neg_d = LIMITS[act]
    nan = torch.full_like(z, math.nan)
    for value, grad, where in ((pos_f, pos_d, torch.isposinf(z)), (neg_f, neg_d, torch.isneginf(z))):
        f = torch.where(where, torch.full_like(z, value), f)
        df = torch.where(where, torch.full_like(z, grad), df)
    f = torch.where(torch.isnan(z), nan, f)
    df = torch.where(torch.isnan(z), nan, df)
    left, right = df.clone(), df.clone()
    for k, (lo, hi) in KINKS.get(act, {}).items():
        left = torch.where(z == k, torch.full_like(z, lo), left)
        right = torch.where(z == k, torch.full_like(z, hi), right)
    return f, df, left, right


def reference(x, bias, dy, act, coeff, dtype=F64):
    """(y, dx, dx with f'(z⁻), dx with f'(z⁺), z) computed in ``dtype`` (float64: the oracle;
    None: in the inputs' own dtypes, plain PyTorch's error for the fp16/bf16 bound)."""
    z = x if dtype is None else x.to(dtype)
    if bias is not None:
        b = bias if dtype is None else bias.to(dtype)
        z = z + b.reshape(1, -1, *([1] * (x.dim() - 2)))
    f, df, left, right = act_math(act, z)
    dyc = dy.to(z.dtype) * coeff
    dx = dyc * df
    return coeff * f, dx, dyc * left, dyc * right, z


def dbias_of(dx):
    return dx.sum(dim=[d for d in range(dx.dim()) if d != 1]) if dx.numel() else dx.new_zeros(dx.shape[1])


def x_shapes():
    """(N, C, ...) with 2 to 4 dims; N may be 0; sizes 1, odd and a few larger."""
    return st.integers(2, 4).flatmap(lambda nd: st.tuples(
        dim_sizes(3, allow_zero=True), dim_sizes(6), *[dim_sizes(7) for _ in range(nd - 2)]))


@st.composite
def scaled_act_cases(draw, kinds=value_kinds()):
    shape = draw(x_shapes())
    dtype = draw(dtypes())
    case = dict(
        shape=shape, dtype=dtype, seed=draw(seeds()),
        kind=draw(kinds), x_layout=draw(layouts(len(shape))),
        dy_layout=draw(dout_layouts(len(shape))),
        bias=draw(st.sampled_from(["none", "same", "fp32"] if dtype in LOW_PRECISION else ["none", "same"])),
        bias_layout=draw(st.sampled_from(["flat", "sliced", "column"])),
        gamma=draw(st.one_of(st.none(), st.floats(-3, 3).filter(lambda g: abs(g) > 0.05))),
        scale=draw(st.sampled_from([1.0, 0.8, -1.5])),
        small_blocks=draw(st.booleans()),
    )
    return case


def _bias(case, c):
    if case["bias"] == "none":
        return None
    dtype = F32 if case["bias"] == "fp32" else case["dtype"]
    v = values(case["seed"] + 1, (c,), "normal", dtype, spread=0.5)
    if case["bias_layout"] == "sliced":
        return leaf_view(v, dtype, Layout("sliced", 0))
    if case["bias_layout"] == "column":
        return leaf_view(v.reshape(c, 1), dtype, Layout("contiguous"))
    return leaf_view(v, dtype, Layout("contiguous"))


# Small blocks: rows in 16-wide chunks and remainder pieces, channel blocks split over programs.
running = backend_runner(sa_op, TILE_ELEMS=128, MAX_CHUNK=16, MAX_BLOCK_C=4, CPU_PROGRAMS=8, SPLIT_MIN_ELEMS=1,
                         FINISH_ELEMS=8)


BACKENDS = backends_for(("torch", "triton", "cuda"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@given(case=scaled_act_cases())
def test_scaled_act_matches_float64_math(act, backend, case):
    check_against_float64(act, backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@given(case=scaled_act_cases(kinds=st.just("nonfinite")))
def test_scaled_act_non_finite_inputs(act, backend, case):
    """NaN in, NaN out (forward), ±inf to the limits of f, f' (NaN accepted for inf·0 forms)."""
    check_against_float64(act, backend, case)


def check_against_float64(act, backend, case):
    shape, dtype = case["shape"], case["dtype"]
    x64 = values(case["seed"], shape, case["kind"], dtype, spread=3.0, offset=0.05)
    x = leaf_view(x64, dtype, case["x_layout"])
    bias = _bias(case, shape[1])
    gamma = nfk.NF_GAMMA[act] if case["gamma"] is None else case["gamma"]
    coeff = gamma * case["scale"]
    with running(backend, case["small_blocks"]):
        y = nfk.scaled_act(x, bias, act=act, gamma=case["gamma"], scale=case["scale"])
    assert y.shape == x.shape and y.dtype == dtype
    if x.is_contiguous(memory_format=CL) and not x.is_contiguous() and x.dim() == 4:
        assert y.is_contiguous(memory_format=CL), "channels_last input must give a channels_last output"
    dy = make_dout(case["seed"] + 2, shape, dtype, case["dy_layout"])
    with running(backend, case["small_blocks"]):
        y.backward(dy)

    xv, bv = x.detach(), (bias.detach() if bias is not None else None)
    ref_y, ref_dx, left, right, z = reference(xv, bv, dy, act, coeff)
    # At a kink either one-sided derivative is right; take the one the result used.
    kink = (left != right) & ~torch.isnan(z)
    if kink.any() and x.grad is not None:
        got = x.grad.detach().double().cpu()
        closer_left = (got - left.cpu()).abs() <= (got - right.cpu()).abs()
        ref_dx = torch.where(kink, torch.where(closer_left.to(kink.device), left, right), ref_dx)
    ref_db = dbias_of(ref_dx)

    inf_pos, inf_neg = torch.isposinf(z), torch.isneginf(z)
    pos_ok, neg_ok = INDETERMINATE.get(act, (False, False))
    y_nan_ok = (inf_pos & pos_ok) | (inf_neg & neg_ok)
    dx_nan_ok = inf_pos | inf_neg  # f' limits at ±inf come from inf·0 forms: NaN accepted
    dx_skip = torch.isnan(z)  # f'(NaN) is no number: torch gives the branch value, NaN is as good
    channel_dims = [d for d in range(z.dim()) if d != 1]
    db_nan_ok = dx_nan_ok.any(dim=channel_dims) if z.numel() else torch.zeros(shape[1], dtype=torch.bool)
    db_skip = dx_skip.any(dim=channel_dims) if z.numel() else torch.zeros(shape[1], dtype=torch.bool)

    # Rounding allowances at the scale of the math rather than of the result: f and f' are
    # computed in fp32 (fp64), so where they are tiny by cancellation (tanh' = 1 − tanh², a
    # saturated sigmoid, gelu's far tail) an error of a few units of roundoff of |coeff|·min(|z|, 1)
    # and of |dy·coeff| is what the arithmetic allows. (test_saturated_derivatives holds the
    # relative accuracy of some of those tails to account separately.)
    u = 64 * torch.finfo(F64 if dtype == F64 else F32).eps
    zf = torch.where(torch.isfinite(z), z, torch.zeros_like(z)).abs().clamp(max=1.0)
    floor_y = u * abs(coeff) * zf
    floor_dx = u * abs(coeff) * dy.double().abs().to(z.device)
    floor_db = dbias_of(floor_dx)

    low = dtype in LOW_PRECISION
    if low:
        plain_y, plain_dx, _, _, _ = reference(xv, bv, dy, act, coeff, dtype=None)
        plain_dx = plain_dx.to(dtype)
        plain_db = dbias_of(plain_dx.to(bv.dtype if bv is not None else dtype))
    tol = tol_for([dtype], backend, plain_err(plain_y.to(dtype), ref_y) if low else None)
    assert_matches(y, ref_y, tol, f"forward ({act})", nan_ok=y_nan_ok, floor=floor_y)
    tol = tol_for([dtype], backend, plain_err(plain_dx, ref_dx, ~dx_skip) if low else None)
    assert x.grad is not None and x.grad.dtype == dtype
    assert_matches(x.grad, ref_dx, tol, f"dx ({act})", nan_ok=dx_nan_ok, skip=dx_skip, floor=floor_dx)
    if bias is not None:
        assert bias.grad is not None and bias.grad.shape == bias.shape and bias.grad.dtype == bias.dtype
        dtypes_ = [dtype, bias.dtype]
        tol = tol_for(dtypes_, backend, plain_err(plain_db, ref_db, ~db_skip) if low else None)
        assert_matches(bias.grad.reshape(-1), ref_db, tol, f"dbias ({act})", nan_ok=db_nan_ok, skip=db_skip,
                       floor=floor_db)


def test_every_activation_is_covered():
    assert set(ACTS) == set(nfk.NF_GAMMA), "an activation without float64 math here goes untested"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_nan_input_gives_nan_output(backend, act):
    """f(NaN) is NaN for every f: a NaN pre-activation must not come out as a clean 0."""
    x = torch.tensor([[math.nan, -1.0, 2.0, 7.0]], dtype=F32, device=DEVICE)
    with nfk.use_backend(backend):
        y = nfk.scaled_act(x, act=act, gamma=1.0)
    assert torch.isnan(y[0, 0]), f"{act}(NaN) gave {y[0, 0].item()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("act", "z"), [("softplus", 21.0), ("log_sigmoid", -21.0)])
def test_softplus_beyond_twenty_in_float64(backend, act, z):
    """softplus is log1p(exp(z)) for every z (σ(21) = 1 − 7.6e-10), not z itself beyond 20 as
    F.softplus's default threshold makes it: the fp64 bound of docs/design.md §6 holds there."""
    x = torch.full((2, 3), z, dtype=F64, device=DEVICE).requires_grad_(True)
    with nfk.use_backend(backend):
        y = nfk.scaled_act(x, act=act, gamma=1.0)
    y.backward(torch.ones_like(y))
    want_y, want_dx = act_math(act, torch.full((2, 3), z, dtype=F64))[:2]
    assert_matches(y, want_y, tol_for([F64], backend), f"{act}({z:g})")
    assert_matches(x.grad, want_dx, tol_for([F64], backend), f"{act}'({z:g})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(("dtype", "big"), [(F32, 1e30), (F64, 1e300)], ids=["fp32", "fp64"])
def test_huge_finite_inputs_give_finite_results(backend, act, dtype, big, request):
    """Finite inputs far out in the tails (beyond where z², z³ overflow) give the finite values
    and derivatives of f there, never NaN."""
    if backend == "torch" and act == "gelu_tanh":
        request.applymarker(pytest.mark.xfail(strict=True, reason=TORCH_OWN_BACKWARD))
    x = torch.tensor([[big, -big, big / 7, -big / 7]], dtype=dtype, device=DEVICE).requires_grad_(True)
    with nfk.use_backend(backend):
        y = nfk.scaled_act(x, act=act, gamma=1.0)
    y.backward(torch.ones_like(y))
    for name, got in (("forward", y), ("dx", x.grad)):
        assert not torch.isnan(got).any(), f"{act} {name} at ±{big:g}: {got.tolist()}"
    sign = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=F64)
    limits = LIMITS[act]
    want_dx = torch.where(sign > 0, torch.full_like(sign, limits[1]), torch.full_like(sign, limits[3]))
    assert_matches(x.grad, want_dx, tol_for([dtype], backend), f"{act}' at ±{big:g}")


# The torch backend is torch's own functions, with torch's backward formulas: σ' = y(1 − y) and
# tanh' = 1 − y² from the rounded output, softsign' by autograd of z/(1 + |z|), and a gelu_tanh'
# that is 0·inf = NaN beyond |z| ≈ 1e13 (fp32). The kernels are exact there (nfkernels.ops.
# scaled_act's docstring); strict xfail, so that a torch path made exact shows up here.
TORCH_OWN_BACKWARD = "the torch backend inherits torch's own backward formulas in saturated tails"


# Saturated tails where f' is small but well inside the normal range, and accurately computable
# (sech²(z) = 4e/(1 + e)² with e = exp(−2|z|), σ(z)σ(−z), 1/(1 + |z|)²), while a derivative taken
# from the rounded output (1 − y², y(1 − y)) or a composite's autograd cancels.
SATURATED = {F32: [("tanh", 5.0), ("sigmoid", 10.0), ("softsign", 1e4)],
             F64: [("tanh", 12.0), ("sigmoid", 25.0), ("softsign", 1e9)]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "act", "z"), [(d, a, z) for d, cases in SATURATED.items() for a, z in cases],
                         ids=[f"{str(d)[6:]}-{a}({z:g})" for d, cases in SATURATED.items() for a, z in cases])
def test_saturated_derivatives(backend, dtype, act, z, request):
    """f'(z) keeps the relative accuracy of docs/design.md §6 in a saturated tail, for a tensor whose
    every element sits there (the property tests allow rounding at the scale of |dy| instead)."""
    if backend == "torch":
        request.applymarker(pytest.mark.xfail(strict=True, reason=TORCH_OWN_BACKWARD))
    x = torch.full((2, 3), z, dtype=dtype, device=DEVICE).requires_grad_(True)
    with nfk.use_backend(backend):
        y = nfk.scaled_act(x, act=act, gamma=1.0)
    y.backward(torch.ones_like(y))
    want = act_math(act, torch.full((2, 3), z, dtype=F64))[1]
    assert_matches(x.grad, want, tol_for([dtype], backend), f"{act}'({z:g}) in {dtype}")


# ------------------------------------------------------------------------------ bad input

def _valid():
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    return dict(x=x, bias=torch.randn(4, device=DEVICE), act="gelu", gamma=None, scale=1.0)


BAD = {
    "x": [("not a tensor", lambda a: [[1.0, 2.0]]),
          ("int dtype", lambda a: a["x"].to(torch.int32)),
          ("complex dtype", lambda a: a["x"].to(torch.complex64)),
          ("1-D", lambda a: a["x"].reshape(-1)),
          ("sparse", lambda a: a["x"].to_sparse())],
    "bias": [("not a tensor", lambda a: [0.0] * 4),
             ("wrong numel", lambda a: a["bias"][:3]),
             ("int dtype", lambda a: a["bias"].to(torch.int64)),
             ("float64 next to float32 x", lambda a: a["bias"].double()),
             ("other device", lambda a: a["bias"].to(other_device())),
             ("sparse", lambda a: a["bias"].to_sparse())],
    "act": [("unknown", lambda a: "swish"), ("not a str", lambda a: 3),
            ("None", lambda a: None)],
    "gamma": [("NaN", lambda a: math.nan), ("inf", lambda a: math.inf),
              ("str", lambda a: "1.7"), ("bool", lambda a: True),
              ("tensor", lambda a: torch.ones(2))],
    "scale": [("NaN", lambda a: math.nan), ("-inf", lambda a: -math.inf),
              ("None", lambda a: None), ("complex", lambda a: 1j)],
}
BAD_CASES = [(arg, i) for arg, items in BAD.items() for i in range(len(items))]


@pytest.mark.parametrize("backend", BACKENDS)
@given(bad=st.sampled_from(BAD_CASES))
def test_bad_arguments_raise_naming_them(bad, backend):
    arg, i = bad
    assert_bad_argument_rejected(BAD, _valid, lambda a: nfk.scaled_act(a["x"], a["bias"], act=a["act"], gamma=a["gamma"], scale=a["scale"]), arg, i, backend)
