"""Property tests of nfkernels.weight_standardize (docs/design.md §5, Scaled Weight Standardization)
against the formula written here in float64 (gradients by autograd through it), with shapes,
dtypes, layouts and views, value scales, eps modes and backends drawn by hypothesis."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, strategies as st

import nfkernels as nfk
from nfkernels.ops import weight_standardize as ws_op
from nfk_strategies import (
    backend_runner,
    F32, F64, LOW_PRECISION, Layout, assert_bad_argument_rejected, assert_matches, dim_sizes, dout_layouts,
    dtypes, interpreter_mangles, layouts, leaf_view, make_dout, other_device, plain_err, seeds,
    tol_for, value_kinds, values,
)
from nfk_testing import DEVICE, backends_for

BACKENDS = backends_for(("torch", "triton", "cuda"))

# The interpreter's arithmetic on NaN/inf rows warns (numpy).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def reference(w, gain, dout, gamma, eps, mode, dtype=F64):
    """(Ŵ, dW, dgain) from the formula, computed in ``dtype`` (None: the inputs' dtypes)::

        timm:      Ŵ = (W − μ)/sqrt(σ² + eps) · g · γ/sqrt(N)
        deepmind:  Ŵ = (W − μ) · g · γ/sqrt(max(N σ², eps))
    """
    cast = (lambda t: t.detach().clone()) if dtype is None else (lambda t: t.detach().to(dtype))
    w = cast(w).requires_grad_(True)
    g = cast(gain).requires_grad_(True) if gain is not None else None
    o = w.shape[0]
    n = w[0].numel() if o else math.prod(w.shape[1:])
    if w.numel() == 0:  # nothing depends on anything: zero gradients
        return (w.detach().clone(), torch.zeros_like(w),
                torch.zeros_like(g) if g is not None else None)
    rows = w.reshape(o, n)
    # Shifted by each row's first element (the same math): exact for constant rows, where the
    # unshifted W − μ would leave rounding noise of |W|·2^-53 and a variance made of it.
    shifted = rows - rows[:, :1].detach()
    centered = shifted - shifted.sum(1, keepdim=True) / n
    var = (centered**2).sum(1, keepdim=True) / n
    if mode == "timm":
        out = centered / torch.sqrt(var + eps) * (gamma / math.sqrt(n))
    else:
        out = centered * gamma / torch.sqrt(torch.clamp(n * var, min=eps))
    if g is not None:
        out = out * g.reshape(o, 1)
    out = out.reshape(w.shape)
    inputs = [w] + ([g] if g is not None else [])
    grads = torch.autograd.grad(out, inputs, dout.to(out.dtype))
    return out.detach(), grads[0], (grads[1] if g is not None else None)


def rounding_floor(w, gain, dout, gamma, eps, mode, acc_dtype):
    """Per-element allowances for the rounding that accumulating in ``acc_dtype`` cannot avoid
    where W − μ cancels (rows far from zero mean, constant rows): the result is accurate relative
    to |W|, not to |W − μ|. With s the row's scale (Ŵ = (W − μ)/s · g · γ/sqrt(N)), the magnitude
    of each term of Ŵ, dW and dgain with |W| in place of W − μ, times 64 units of roundoff."""
    if w.numel() == 0:
        return None, None, None
    u = 64 * torch.finfo(acc_dtype).eps
    o = w.shape[0]
    rows = w.detach().double().reshape(o, -1).cpu()
    n = rows.shape[1]
    shifted = rows - rows[:, :1]
    var = ((shifted - shifted.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True)
    if mode == "timm":
        s_inv = 1 / torch.sqrt(var + eps)
    else:
        s_inv = math.sqrt(n) / torch.sqrt(torch.clamp(n * var, min=eps))
    c = abs(gamma) / math.sqrt(n)
    g = gain.detach().double().reshape(o, 1).abs().cpu() if gain is not None else torch.ones(o, 1, dtype=F64)
    x_abs = rows.abs() * s_inv
    dy = dout.detach().double().reshape(o, -1).abs().cpu()
    fwd = u * x_abs * c * g
    dw = u * c * g * s_inv * (dy + dy.mean(1, keepdim=True) + x_abs * (dy * x_abs).mean(1, keepdim=True))
    dgain = u * c * (dy * x_abs).sum(1)
    return fwd.reshape(w.shape), dw.reshape(w.shape), dgain


def weight_shapes():
    return st.one_of(
        st.tuples(dim_sizes(7, allow_zero=True), dim_sizes(9, allow_zero=True)),  # linear (O, N)
        st.tuples(dim_sizes(6, allow_zero=True), dim_sizes(4, allow_zero=True), dim_sizes(3), dim_sizes(3)),
        st.tuples(dim_sizes(4), dim_sizes(3), dim_sizes(5)),  # conv1d
        st.tuples(dim_sizes(3), st.integers(17, 70)),  # rows longer than a (lowered) block
    )


@st.composite
def ws_cases(draw, kinds=value_kinds()):
    shape = draw(weight_shapes())
    dtype = draw(dtypes())
    mode = draw(st.sampled_from(["timm", "deepmind"]))
    return dict(
        shape=shape, dtype=dtype, seed=draw(seeds()), kind=draw(kinds),
        row_offset=draw(st.sampled_from([0.0, 0.0, 0.3, 4.0])),
        w_layout=draw(layouts(len(shape))), dout_layout=draw(dout_layouts(len(shape))),
        gain=draw(st.sampled_from(["none", "timm", "flat", "sliced"])),
        gamma=draw(st.sampled_from([1.0, 1.7, -0.5])),
        mode=mode,
        eps=draw(st.sampled_from([1e-5, 1e-4, 1e-2]) if mode == "timm" else st.sampled_from([1e-4, 1e-6, 0.5])),
        out_dtype=draw(st.sampled_from([None, None, None, F32, torch.bfloat16])),
        small_blocks=draw(st.booleans()),
    )


def make_gain(case, o):
    if case["gain"] == "none":
        return None
    dtype = case["dtype"]
    v = values(case["seed"] + 3, (o,), "normal", dtype, spread=0.5, offset=1.0)
    if case["gain"] == "timm":
        shape = (o, 1, 1, 1) if len(case["shape"]) == 4 else (o, 1)
        return leaf_view(v.reshape(shape), dtype, Layout("contiguous"))
    return leaf_view(v, dtype, Layout("sliced" if case["gain"] == "sliced" else "contiguous", 0))


running = backend_runner(ws_op, MAX_BLOCK=16)


def check(backend, case):
    shape, dtype, mode = case["shape"], case["dtype"], case["mode"]
    assume(not interpreter_mangles(backend, [dtype], [case["out_dtype"]]))
    w64 = values(case["seed"], shape, case["kind"], dtype)
    if w64.dim() and w64.shape[0]:
        w64 = (w64 + case["row_offset"] * values(case["seed"] + 1, (shape[0],) + (1,) * (len(shape) - 1),
                                                   "normal", F64)).to(dtype).double()
    w = leaf_view(w64, dtype, case["w_layout"])
    gain = make_gain(case, shape[0])
    out_dtype = case["out_dtype"]
    with running(backend, case["small_blocks"]):
        out = nfk.weight_standardize(w, gain, gamma=case["gamma"], eps=case["eps"], eps_mode=mode, out_dtype=out_dtype)
    res_dtype = out_dtype or dtype
    assert out.shape == w.shape and out.dtype == res_dtype
    dout = make_dout(case["seed"] + 2, shape, res_dtype, case["dout_layout"])
    with running(backend, case["small_blocks"]):
        out.backward(dout)

    args = (w.detach(), gain.detach() if gain is not None else None, dout, case["gamma"], case["eps"], mode)
    ref, ref_dw, ref_dg = reference(*args)
    acc = F64 if dtype == F64 else F32
    floor_y, floor_dw, floor_dg = rounding_floor(*args, acc)
    low = dtype in LOW_PRECISION or res_dtype in LOW_PRECISION
    if low:  # plain PyTorch in the weight's dtype (what the fp16/bf16 bound is relative to)
        p_y, p_dw, p_dg = reference(*args, dtype=None)
        p_y = p_y.to(res_dtype)
    if res_dtype != dtype:  # the best out_dtype can hold (tiny fp64 values underflow in fp32)
        ref = ref.to(res_dtype).double()
    tol = tol_for([dtype, res_dtype], backend, plain_err(p_y, ref) if low else None)
    assert_matches(out, ref, tol, f"forward ({mode})", floor=floor_y)
    assert w.grad is not None and w.grad.dtype == dtype and w.grad.shape == w.shape, "dweight"
    low_w = dtype in LOW_PRECISION
    tol = tol_for([dtype], backend, plain_err(p_dw, ref_dw) if low_w else None)
    assert_matches(w.grad, ref_dw, tol, f"dweight ({mode})", floor=floor_dw)
    if gain is not None:
        assert gain.grad is not None, "gain got no gradient (dropped from autograd)"
        assert gain.grad.shape == gain.shape and gain.grad.dtype == gain.dtype
        tol = tol_for([dtype], backend, plain_err(p_dg, ref_dg) if low_w else None)
        assert_matches(gain.grad.reshape(-1), ref_dg.reshape(-1), tol, f"dgain ({mode})", floor=floor_dg)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=ws_cases(kinds=value_kinds(finite_only=True)))
def test_weight_standardize_matches_float64_math(backend, case):
    check(backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=ws_cases(kinds=st.just("nonfinite")))
def test_weight_standardize_non_finite_rows(backend, case):
    """A row holding NaN or ±inf is NaN throughout (its mean or variance is), in Ŵ, dW and
    dgain alike; every other row is exactly as without it."""
    check(backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 3, 3), (4, 0, 3, 3), (3, 0), (0, 5)])
def test_empty_weight_keeps_gain_in_autograd(backend, shape):
    """Nothing depends on an empty Ŵ: both gradients exist and are zeros."""
    w = torch.empty(shape, device=DEVICE, requires_grad=True)
    gain = torch.rand(shape[0], device=DEVICE, requires_grad=True)
    with nfk.use_backend(backend):
        out = nfk.weight_standardize(w, gain)
    out.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape
    assert gain.grad is not None, "gain dropped from autograd"
    assert torch.equal(gain.grad, torch.zeros_like(gain))


# ------------------------------------------------------------------------------ bad input

def _valid():
    return dict(weight=torch.randn(4, 3, 3, 3, device=DEVICE), gain=torch.rand(4, 1, 1, 1, device=DEVICE),
                gamma=1.0, eps=1e-5, eps_mode="timm", out_dtype=None)


BAD = {
    "weight": [("not a tensor", lambda a: [[1.0, 2.0]]),
               ("int dtype", lambda a: a["weight"].to(torch.int32)),
               ("complex dtype", lambda a: a["weight"].to(torch.complex64)),
               ("1-D", lambda a: a["weight"].reshape(-1)),
               ("sparse", lambda a: a["weight"].reshape(4, -1).to_sparse())],
    "gain": [("not a tensor", lambda a: [1.0] * 4),
             ("wrong numel", lambda a: a["gain"][:3]),
             ("int dtype", lambda a: a["gain"].to(torch.int64)),
             ("other float dtype", lambda a: a["gain"].double()),
             ("other device", lambda a: a["gain"].to(other_device())),
             ("sparse", lambda a: a["gain"].reshape(4).to_sparse())],
    "gamma": [("NaN", lambda a: math.nan), ("inf", lambda a: math.inf),
              ("str", lambda a: "1"), ("bool", lambda a: True)],
    "eps": [("zero", lambda a: 0.0), ("negative", lambda a: -1e-5),
            ("NaN", lambda a: math.nan), ("inf", lambda a: math.inf),
            ("str", lambda a: "1e-5"), ("None", lambda a: None)],
    "eps_mode": [("unknown", lambda a: "jax"), ("not a str", lambda a: 1)],
    "out_dtype": [("int", lambda a: torch.int32), ("str", lambda a: "float32"),
                  ("complex", lambda a: torch.complex64)],
}
BAD_CASES = [(arg, i) for arg, items in BAD.items() for i in range(len(items))]


@pytest.mark.parametrize("backend", BACKENDS)
@given(bad=st.sampled_from(BAD_CASES))
def test_bad_arguments_raise_naming_them(bad, backend):
    arg, i = bad
    assert_bad_argument_rejected(BAD, _valid, lambda a: nfk.weight_standardize(
        a["weight"], a["gain"], gamma=a["gamma"], eps=a["eps"], eps_mode=a["eps_mode"], out_dtype=a["out_dtype"]), arg, i, backend)
