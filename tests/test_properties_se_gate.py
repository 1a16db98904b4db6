"""Property tests of nfkernels.se_gate_residual (docs/design.md §5, squeeze-excite gate with the
SkipInit residual) against the formula written here in float64 (gradients by autograd through
it), with shapes (incl. N = 0 and H·W = 0), dtypes, layouts, optional arguments, value scales
and backends drawn by hypothesis."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

import nfkernels as nfk
from nfkernels.ops import se_gate as se_op
from nfk_strategies import (
    backend_runner,
    F32, F64, LOW_PRECISION, Layout, assert_bad_argument_rejected, assert_matches, dim_sizes, dout_layouts,
    dtypes, layouts, leaf_view, make_dout, other_device, plain_err, seeds, tol_for, value_kinds,
    values,
)
from nfk_testing import DEVICE, backends_for

BACKENDS = backends_for(("torch", "triton", "cuda"))
PARAMS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "bias", "shortcut_bias", "skip_gain")
DIFFERENTIABLE = ("h", "shortcut") + PARAMS

# The interpreter's arithmetic on huge and NaN/inf values warns (numpy).
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def _sigmoid(z):
    e = torch.exp(-z.abs())  # no overflow, and no inf/inf in its derivative
    return torch.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _matmul_t(a, w):
    """a @ wᵀ in the wider of the two dtypes (fp32 parameters next to fp16/bf16 h)."""
    common = torch.promote_types(a.dtype, w.dtype)
    return a.to(common) @ w.to(common).t()


def formula(t, alpha, attn_gain):
    """out = shortcut + shortcut_bias + α·k·m_n·attn_gain·sigmoid(fc2(relu(fc1(mean_hw hb))))·hb,
    hb = h + bias; without fc1_weight no attn_gain and no sigmoid; absent terms drop out."""
    h = t["h"]
    n, c, hh, ww = h.shape
    hb = h + t["bias"].reshape(1, c, 1, 1) if t["bias"] is not None else h
    scale = torch.full((n, 1, 1, 1), alpha, dtype=hb.dtype, device=hb.device)
    if t["skip_gain"] is not None:
        scale = scale * t["skip_gain"].reshape(())
    if t["mask"] is not None:
        scale = scale * t["mask"].to(hb.dtype).reshape(n, 1, 1, 1)
    if t["fc1_weight"] is not None:
        pooled = hb.sum(dim=(2, 3)) / (hh * ww)
        a = _matmul_t(pooled, t["fc1_weight"].reshape(-1, c))
        if t["fc1_bias"] is not None:
            a = a + t["fc1_bias"].reshape(-1)
        z = _matmul_t(torch.where(a < 0, torch.zeros_like(a), a), t["fc2_weight"].reshape(c, -1))  # relu(NaN) = NaN
        if t["fc2_bias"] is not None:
            z = z + t["fc2_bias"].reshape(-1)
        # float64: a sigmoid whose derivative stays exact where it saturates; in fp16/bf16 (the
        # plain-PyTorch bound) torch.sigmoid, as plain PyTorch code computes it.
        gate = _sigmoid(z) if z.dtype == F64 else torch.sigmoid(z)
        scale = scale * attn_gain * gate.reshape(n, c, 1, 1)
    out = scale * hb
    if t["shortcut"] is not None:
        out = t["shortcut"] + out
    if t["shortcut_bias"] is not None:
        out = out + t["shortcut_bias"].reshape(1, c, 1, 1)
    return out


def reference(t, dout, alpha, attn_gain, dtype=F64):
    """(out, {name: gradient}) of ``formula`` computed in ``dtype`` (None: the inputs' dtypes)."""
    leaves = {}
    for k, v in t.items():
        if v is None:
            leaves[k] = None
            continue
        v = v.detach().clone() if dtype is None else v.detach().to(dtype)
        leaves[k] = v.requires_grad_(k in DIFFERENTIABLE)
    out = formula(leaves, alpha, attn_gain)
    names = [k for k in DIFFERENTIABLE if leaves[k] is not None]
    if t["h"].numel() == 0:  # no output element depends on anything: all gradients are 0
        return out.detach(), {k: torch.zeros_like(leaves[k]) for k in names}
    grads = torch.autograd.grad(out, [leaves[k] for k in names], dout.to(out.dtype), allow_unused=True)
    return out.detach(), {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(names, grads)}


def magnitudes(t, dout, alpha, attn_gain):
    """The scale of every quantity of ``formula`` and its gradients with each term taken by its
    magnitude (|h|, |weights|, |dout|, the gate at most 1 and its slope at most 1/4): the
    rounding a correct fp32 (fp64) implementation makes is relative to these, not to results
    that cancel (sums over H·W and samples of terms of both signs, a saturated gate's slope).
    Returns (forward, {name: gradient scale}); None where H·W = 0 (every gradient is 0)."""
    def mag(x):
        return x.detach().double().abs() if x is not None else None

    h, dy = mag(t["h"]), dout.detach().double().abs().to(t["h"].device)
    n, c, hh, ww = h.shape
    if hh * ww == 0:
        return None, {}
    hb = h + mag(t["bias"]).reshape(1, c, 1, 1) if t["bias"] is not None else h
    unskipped = torch.full((n, 1), abs(alpha), dtype=F64, device=h.device)  # α·m_n
    if t["mask"] is not None:
        unskipped = unskipped * mag(t["mask"]).reshape(n, 1)
    scale = unskipped * mag(t["skip_gain"]).reshape(()) if t["skip_gain"] is not None else unskipped
    s2 = (dy * hb).sum(dim=(2, 3))  # Σ_hw |dout|·|hb|, (N, C)
    grads = {"shortcut": torch.zeros_like(dy), "shortcut_bias": dy.sum(dim=(0, 2, 3))}
    dp = torch.zeros_like(s2)
    coef = scale
    if t["fc1_weight"] is not None:
        w1, w2 = mag(t["fc1_weight"]).reshape(-1, c), mag(t["fc2_weight"]).reshape(c, -1)
        p = hb.mean(dim=(2, 3))
        r = p @ w1.t() + (mag(t["fc1_bias"]).reshape(-1) if t["fc1_bias"] is not None else 0)
        dz = s2 * scale * abs(attn_gain) / 4
        da = dz @ w2
        grads.update(fc2_bias=dz.sum(0), fc2_weight=(dz.t() @ r).reshape(t["fc2_weight"].shape),
                     fc1_bias=da.sum(0), fc1_weight=(da.t() @ p).reshape(t["fc1_weight"].shape))
        dp = da @ w1
        coef = scale * abs(attn_gain)
    dh = dy * coef.reshape(n, 1, 1, 1) + dp.reshape(n, c, 1, 1) / (hh * ww)
    gain = abs(attn_gain) if t["fc1_weight"] is not None else 1.0
    grads.update(h=dh, bias=dh.sum(dim=(0, 2, 3)), skip_gain=(s2 * unskipped * gain).sum())
    fwd = coef.reshape(n, 1, 1, 1) * hb
    if t["shortcut"] is not None:
        fwd = fwd + mag(t["shortcut"])
    if t["shortcut_bias"] is not None:
        fwd = fwd + mag(t["shortcut_bias"]).reshape(1, c, 1, 1)
    return fwd, grads


@st.composite
def se_cases(draw, kinds=value_kinds()):
    dtype = draw(dtypes())
    shape = (draw(dim_sizes(3, allow_zero=True)), draw(dim_sizes(6)),
             draw(st.one_of(dim_sizes(5), st.just(0))), draw(dim_sizes(5)))
    se = draw(st.booleans())
    shortcut = draw(st.sampled_from([True, True, False]))
    return dict(
        shape=shape, dtype=dtype, seed=draw(seeds()), kind=draw(kinds),
        rd=draw(st.integers(1, 3)) if se else None, fc_2d=draw(st.booleans()),
        opt={k: draw(st.booleans()) for k in ("bias", "skip_gain", "mask", "fc1_bias", "fc2_bias")}
        | {"shortcut": shortcut, "shortcut_bias": shortcut and draw(st.booleans())},
        zero_skip=draw(st.booleans()),
        param_dtype=draw(st.sampled_from(["same", "fp32"])) if dtype in LOW_PRECISION else "same",
        h_layout=draw(layouts(4)), shortcut_layout=draw(layouts(4)), dout_layout=draw(dout_layouts(4)),
        alpha=draw(st.sampled_from([0.2, 1.0, -0.7])), attn_gain=draw(st.sampled_from([2.0, 1.0, 0.5])),
        small_blocks=draw(st.booleans()),
    )


def make_inputs(case):
    shape, dtype, seed = case["shape"], case["dtype"], case["seed"]
    n, c = shape[:2]
    pdtype = F32 if case["param_dtype"] == "fp32" else dtype
    opt = case["opt"]
    t = {"h": leaf_view(values(seed, shape, case["kind"], dtype, offset=0.5), dtype, case["h_layout"])}
    t["shortcut"] = (leaf_view(values(seed + 1, shape, "normal", dtype), dtype, case["shortcut_layout"])
                     if opt["shortcut"] else None)

    def param(k, size, scale, offset=0.0):
        v = values(seed + 10 + PARAMS.index(k), size, "normal", pdtype, spread=scale, offset=offset)
        return leaf_view(v, pdtype, Layout("contiguous"))

    rd = case["rd"]
    t.update({k: None for k in PARAMS})
    if rd is not None:
        w1, w2 = ((rd, c), (c, rd)) if case["fc_2d"] else ((rd, c, 1, 1), (c, rd, 1, 1))
        t["fc1_weight"] = param("fc1_weight", w1, 1 / math.sqrt(c))
        t["fc2_weight"] = param("fc2_weight", w2, 1 / math.sqrt(rd))
        t["fc1_bias"] = param("fc1_bias", (rd,), 0.5) if opt["fc1_bias"] else None
        t["fc2_bias"] = param("fc2_bias", (c,), 0.5) if opt["fc2_bias"] else None
    t["bias"] = param("bias", (c,), 0.5) if opt["bias"] else None
    t["shortcut_bias"] = param("shortcut_bias", (c,), 1.0) if opt["shortcut_bias"] else None
    if opt["skip_gain"]:
        t["skip_gain"] = (leaf_view(torch.zeros((), dtype=F64), pdtype, Layout("contiguous")) if case["zero_skip"]
                          else param("skip_gain", (), 0.3, 0.8))
    t["mask"] = None
    if opt["mask"]:
        keep = torch.rand(n, generator=torch.Generator().manual_seed(seed + 5)) < 0.7
        t["mask"] = (keep.to(F32) / 0.7).to(DEVICE)
    return t


# Small blocks also split HW in the reductions (a GPU of 8 SMs, splits of 2 positions or more),
# whose partial sums the finish and per-channel sums kernels add up.
running = backend_runner(se_op, REDUCE_TILE=16, STREAM_TILE=8, MAX_BLOCK_C=4, MIN_SPLIT_HW=2, DEFAULT_SMS=8,
                         FINISH_BLOCK=8, SMALL_BLOCK_C=2, SUMS_TILE=4)


def call(t, **kw):
    return nfk.se_gate_residual(t["h"], t["shortcut"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"],
                                t["fc2_bias"], bias=t["bias"], shortcut_bias=t["shortcut_bias"],
                                skip_gain=t["skip_gain"], mask=t["mask"], **kw)


def check(backend, case):
    dtype, shape = case["dtype"], case["shape"]
    t = make_inputs(case)
    kw = dict(alpha=case["alpha"], attn_gain=case["attn_gain"])
    with running(backend, case["small_blocks"]):
        out = call(t, **kw)
    assert out.shape == shape and out.dtype == dtype
    dout = make_dout(case["seed"] + 3, shape, dtype, case["dout_layout"])
    with running(backend, case["small_blocks"]):
        out.backward(dout)
    detached = {k: (v.detach() if v is not None else None) for k, v in t.items()}
    ref, ref_g = reference(detached, dout, **kw)

    low = dtype in LOW_PRECISION
    if low:
        plain, plain_g = reference(detached, dout, **kw, dtype=None)
    # rounding allowances: 64 units of the accumulation dtype's roundoff of each magnitude
    u = 64 * torch.finfo(F64 if dtype == F64 else F32).eps
    mag_out, mag_g = magnitudes(detached, dout, **kw)
    nonfinite = case["kind"] == "nonfinite"
    # Samples whose h holds NaN/inf: their gate is NaN/inf, which reaches every parameter's
    # gradient; only the input gradients of the other samples are compared there.
    bad = ~torch.isfinite(detached["h"].double()).flatten(1).all(dim=1).cpu()
    tol = tol_for([dtype], backend, plain_err(plain.to(dtype), ref) if low else None)
    assert_matches(out, ref, tol, "forward", floor=u * mag_out if mag_out is not None else None)
    for k, want in ref_g.items():
        got = t[k].grad
        assert got is not None, f"d{k}: no gradient"
        assert got.shape == t[k].shape and got.dtype == t[k].dtype, f"d{k}: {got.shape} {got.dtype}"
        skip = None
        if nonfinite:
            if k not in ("h", "shortcut"):
                continue
            skip = bad.reshape(-1, 1, 1, 1).expand(shape)
        tol = tol_for([t[k].dtype, dtype], backend,
                      plain_err(plain_g[k].to(got.dtype), want, None if skip is None else ~skip) if low else None)
        floor = u * mag_g[k] if k in mag_g else None
        assert_matches(got, want, tol, f"d{k}", skip=skip, floor=floor)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=se_cases(kinds=value_kinds(finite_only=True)))
def test_se_gate_residual_matches_float64_math(backend, case):
    check(backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=se_cases(kinds=st.just("nonfinite")))
def test_se_gate_residual_non_finite_h(backend, case):
    """NaN/inf in h: the output matches float64 math place by place (a sample's NaN spreads
    through its own gate only); the other samples' dh and dshortcut stay exact."""
    check(backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hw", [(0, 3), (4, 0)])
def test_empty_spatial_map_gives_zero_gradients(backend, hw):
    """H·W = 0: the output is empty, so every gradient is exactly 0 (not 0·NaN)."""
    case = dict(shape=(2, 4) + hw, dtype=F64, seed=1, kind="normal", rd=2, fc_2d=False,
                opt=dict(bias=True, skip_gain=True, mask=False, fc1_bias=True, fc2_bias=True, shortcut=True,
                         shortcut_bias=True),
                zero_skip=False, param_dtype="same", h_layout=Layout("contiguous"),
                shortcut_layout=Layout("contiguous"), dout_layout=Layout("contiguous"), alpha=0.2,
                attn_gain=2.0, small_blocks=False)
    t = make_inputs(case)
    with nfk.use_backend(backend):
        out = call(t)
    out.sum().backward()
    for k in PARAMS:
        assert t[k].grad is not None and torch.equal(t[k].grad, torch.zeros_like(t[k])), \
            f"d{k} = {t[k].grad} (must be 0)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
def test_saturated_gates_keep_their_gradient(backend, dtype):
    """Every gate saturated (|z| = 30): σ'(z) = σ(z)σ(−z) ≈ 9.4e-14 is a normal fp32 number, so
    the SE weights' gradients are representable, and must keep their relative accuracy
    (σ(z)(1 − σ(z)) computed from a rounded σ(z) = 1 gives 0 instead)."""
    c, rd = 3, 1
    h = torch.ones(2, c, 2, 2, dtype=dtype, device=DEVICE)
    w1 = torch.full((rd, c, 1, 1), 1.0, dtype=dtype, device=DEVICE, requires_grad=True)
    b1 = torch.zeros(rd, dtype=dtype, device=DEVICE, requires_grad=True)
    w2 = torch.tensor([10.0, -10.0, 10.0], dtype=dtype, device=DEVICE).reshape(c, rd, 1, 1).requires_grad_(True)
    b2 = torch.zeros(c, dtype=dtype, device=DEVICE, requires_grad=True)
    dout = torch.randn(2, c, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64).to(DEVICE, dtype)
    with nfk.use_backend(backend):
        out = nfk.se_gate_residual(h, None, w1, b1, w2, b2)
    out.backward(dout)
    t = {k: None for k in DIFFERENTIABLE + ("mask",)}
    t.update(h=h, fc1_weight=w1.detach(), fc1_bias=b1.detach(), fc2_weight=w2.detach(), fc2_bias=b2.detach())
    _, want = reference(t, dout, alpha=0.2, attn_gain=2.0)
    tol = tol_for([dtype], backend)
    for name, got in (("fc1_weight", w1.grad), ("fc2_weight", w2.grad), ("fc2_bias", b2.grad)):
        assert_matches(got, want[name], tol, f"d{name}")


# ------------------------------------------------------------------------------ bad input

def _valid():
    f = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    return dict(h=f(2, 4, 3, 3), shortcut=f(2, 4, 3, 3), fc1_weight=f(2, 4, 1, 1), fc1_bias=f(2),
                fc2_weight=f(4, 2, 1, 1), fc2_bias=f(4), bias=f(4), shortcut_bias=f(4), skip_gain=f(()),
                mask=torch.ones(2, device=DEVICE), alpha=0.2, attn_gain=2.0)


def _tensor_bads(name, shape_bad):
    return [("not a tensor", lambda a: 1.5 if name != "h" else [[1.0]]),
            ("int dtype", lambda a: a[name].to(torch.int32)),
            ("complex dtype", lambda a: a[name].to(torch.complex64)),
            ("other device", lambda a: a[name].to(other_device())),
            ("sparse", lambda a: a[name].reshape(a[name].shape[0] if a[name].dim() else 1, -1).to_sparse()),
            ("wrong shape", shape_bad)]


BAD = {
    "h": _tensor_bads("h", lambda a: a["h"][:, :, 0]),
    "shortcut": _tensor_bads("shortcut", lambda a: a["shortcut"][:, :, :2])
    + [("other float dtype", lambda a: a["shortcut"].double())],
    "fc1_weight": _tensor_bads("fc1_weight", lambda a: a["fc1_weight"][:, :3]),
    "fc1_bias": _tensor_bads("fc1_bias", lambda a: a["fc1_bias"][:1]),
    "fc2_weight": _tensor_bads("fc2_weight", lambda a: a["fc2_weight"][:3]),
    "fc2_bias": _tensor_bads("fc2_bias", lambda a: a["fc2_bias"][:3]),
    "bias": _tensor_bads("bias", lambda a: a["bias"][:3]) + [("float64", lambda a: a["bias"].double())],
    "shortcut_bias": _tensor_bads("shortcut_bias", lambda a: torch.zeros(5, device=DEVICE)),
    "skip_gain": _tensor_bads("skip_gain", lambda a: torch.ones(2, device=DEVICE)),
    "mask": [("int dtype", lambda a: a["mask"].to(torch.int64)),
             ("bool dtype", lambda a: a["mask"].bool()),
             ("wrong numel", lambda a: a["mask"][:1]),
             ("other device", lambda a: a["mask"].to(other_device()))],
    "alpha": [("NaN", lambda a: math.nan), ("str", lambda a: "0.2"),
              ("None", lambda a: None)],
    "attn_gain": [("inf", lambda a: math.inf), ("bool", lambda a: False)],
}
BAD_CASES = [(arg, i) for arg, items in BAD.items() for i in range(len(items))]


@pytest.mark.parametrize("backend", BACKENDS)
@given(bad=st.sampled_from(BAD_CASES))
def test_bad_arguments_raise_naming_them(bad, backend):
    arg, i = bad
    assert_bad_argument_rejected(BAD, _valid, lambda a: nfk.se_gate_residual(
        a["h"], a["shortcut"], a["fc1_weight"], a["fc1_bias"], a["fc2_weight"], a["fc2_bias"], bias=a["bias"],
        shortcut_bias=a["shortcut_bias"], skip_gain=a["skip_gain"], mask=a["mask"], alpha=a["alpha"],
        attn_gain=a["attn_gain"]), arg, i, backend)
