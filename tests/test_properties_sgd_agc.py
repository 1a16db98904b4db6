"""Property tests of nfkernels.optim.SGD_AGC: one or two steps against torch.optim.SGD's update
rule (no dampening) preceded by timm's AGC, both written out here in float64, over drawn
parameters (shapes, parameter and gradient dtypes, layouts and views incl. stride-0 gradients,
value scales incl. NaN/Inf), param groups and hyper-parameters, and backends. Bad arguments must
raise TypeError/ValueError naming them, with nothing written."""
from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import assume, given, strategies as st

import nfkernels as nfk
from nfkernels.optim import SGD_AGC
from nfk_strategies import (
    F32, F64, FLOAT_DTYPES, LOW_PRECISION, Layout, assert_matches, assert_unchanged, interpreter_mangles, lay_out,
    layouts, names_argument, plain_err, seeds, snapshot, tol_for, values,
)
from nfk_testing import DEVICE, ON_GPU, backends_for
from test_properties_agc import gaps_of, make_param, param_specs, running, timm_agc

BACKENDS = backends_for(("torch", "triton", "cuda"))

# The interpreter's arithmetic on NaN/inf units warns (numpy); so does torch.optim for a
# parameter listed twice (which SGD_AGC then refuses or de-duplicates).
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate:UserWarning")]

# Parameters are written in place: no stride-0 parameter (that is a bad argument, tested below).
PARAM_LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced")
GRAD_LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced", "expanded")


def sgd_step_reference(p, g, buf, opts, dtype=F64):
    """One step of torch.optim.SGD (dampening 0) after timm's AGC, for one parameter, in
    ``dtype`` (None: p's and g's own dtypes, promoted, rounded back to p's dtype: plain PyTorch).
    Returns (new p, new buf)::

        g ← agc(g);  g ← g + wd·p;  buf ← g (first step) or m·buf + g
        nesterov: g ← g + m·buf, else g ← buf;  p ← p − lr·g
    """
    work = torch.promote_types(p.dtype, g.dtype) if dtype is None else dtype
    pw, d = p.to(work), g.to(work)
    if opts["clipping"]:
        d = timm_agc(pw, d, opts["clip_factor"], opts["eps"], dtype=work)[0]
    if opts["weight_decay"] != 0:
        d = d + opts["weight_decay"] * pw
    m = opts["momentum"]
    if m != 0:
        buf = d.clone() if buf is None else m * buf.to(work) + d
        d = d + m * buf if opts["nesterov"] else buf
    new_p = pw - opts["lr"] * d
    if dtype is None:
        return new_p.to(p.dtype), (buf.to(p.dtype) if buf is not None else None)
    return new_p, buf


@st.composite
def group_options(draw):
    momentum = draw(st.sampled_from([0.9, 0.9, 0.0, 0.5]))
    return dict(lr=draw(st.sampled_from([0.1, 0.5, 0.0, 1.3])), momentum=momentum,
                nesterov=momentum != 0 and draw(st.booleans()),
                weight_decay=draw(st.sampled_from([0.0, 1e-4, 0.1])),
                clip_factor=draw(st.sampled_from([0.01, 0.01, 0.1])), eps=draw(st.sampled_from([1e-3, 0.0, 1e-6])),
                clipping=draw(st.sampled_from([True, True, False])))


@st.composite
def sgd_cases(draw):
    specs = draw(st.lists(param_specs(grad_layouts=GRAD_LAYOUTS), min_size=1, max_size=3))
    specs = [dict(s, p_layout=draw(layouts(len(s["shape"]), PARAM_LAYOUTS)), has_grad=True) for s in specs]
    n_groups = draw(st.integers(1, min(2, len(specs))))
    split = draw(st.integers(1, len(specs))) if n_groups == 2 else len(specs)
    split = min(split, len(specs) - 1) if n_groups == 2 else split
    groups = [list(range(split))] + ([list(range(split, len(specs)))] if n_groups == 2 else [])
    steps = draw(st.integers(1, 2))
    # per step and parameter: whether it has a gradient, and a seed for it
    grads = [[(draw(st.integers(0, 7)) > 0, draw(seeds())) for _ in specs] for _ in range(steps)]
    return dict(specs=specs, groups=groups, options=[draw(group_options()) for _ in groups], grads=grads,
                small_blocks=draw(st.booleans()))


def step_grad(spec, has, seed):
    """A gradient for ``spec``'s parameter at one step (None: no gradient this step)."""
    if not has:
        return None
    g64 = values(seed, spec["shape"], spec["g_kind"], spec["g_dtype"], spread=spec["g_scale"])
    return lay_out(g64, spec["g_dtype"], spec["g_layout"])[1]


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=sgd_cases())
def test_sgd_agc_matches_torch_sgd_with_timm_agc(backend, case):
    specs = case["specs"]
    assume(not any(interpreter_mangles(backend, [s["p_dtype"], s["g_dtype"]], [s["p_dtype"]]) for s in specs))
    made = [make_param(s) for s in specs]
    params = [p for p, _, _ in made]
    for p in params:
        p.grad = None
    # a sliced parameter: the memory around it must stay as it is
    param_gaps = []
    for p, _, storage in made:
        mask = gaps_of(storage, p)
        param_gaps.append((storage, mask, storage.detach().reshape(-1)[mask].clone()) if mask is not None else None)
    opts = case["options"]
    opt = SGD_AGC([{"params": [params[i] for i in idx], **o} for idx, o in zip(case["groups"], opts)], lr=0.1)
    option_of = {i: o for idx, o in zip(case["groups"], opts) for i in idx}

    ref_p = [p.detach().double().clone() for p in params]
    ref_buf = [None] * len(params)
    # Magnitudes of the same steps with every term made positive (|p| + lr·|d|...): rounding
    # where p − lr·d cancels is relative to them, not to the result.
    mag_p = [p.detach().double().abs() for p in params]
    mag_buf = [None] * len(params)
    plain_p = [p.detach().clone() for p in params]
    plain_buf = [None] * len(params)
    for step in case["grads"]:
        grads = [step_grad(s, has, seed) for s, (has, seed) in zip(specs, step)]
        for p, g in zip(params, grads):
            if g is not None and g.dtype != p.dtype:
                p.grad_dtype = None
            p.grad = g
        before = snapshot([g for g in grads if g is not None])
        with running(backend, case["small_blocks"]):
            opt.step()
        assert_unchanged([g for g in grads if g is not None], before, "gradients (SGD_AGC must not modify .grad)")
        for i, g in enumerate(grads):
            if g is None:
                continue
            clipped = timm_agc(ref_p[i], g.double(), option_of[i]["clip_factor"], option_of[i]["eps"])[0] \
                if option_of[i]["clipping"] else g.double()
            mag_p[i], mag_buf[i] = sgd_step_reference(mag_p[i], clipped.abs(), mag_buf[i],
                                                      dict(option_of[i], lr=-option_of[i]["lr"], clipping=False))
            ref_p[i], ref_buf[i] = sgd_step_reference(ref_p[i], g.double(), ref_buf[i], option_of[i])
            # p and its buffer are stored in p's dtype between steps: the float64 values rounded
            # to it are the best result (an fp64 gradient may step an fp32 parameter past its
            # range, or below it).
            ref_p[i] = ref_p[i].to(specs[i]["p_dtype"]).double()
            if ref_buf[i] is not None:
                ref_buf[i] = ref_buf[i].to(specs[i]["p_dtype"]).double()
            plain_p[i], plain_buf[i] = sgd_step_reference(plain_p[i], g, plain_buf[i], option_of[i], dtype=None)

    for i, (spec, p) in enumerate(zip(specs, params)):
        what = f"param {i} {spec['shape']} p:{spec['p_dtype']} g:{spec['g_dtype']} {option_of[i]}"
        low = spec["p_dtype"] in LOW_PRECISION or spec["g_dtype"] in LOW_PRECISION
        roundings = 2 * len(case["grads"])  # p and its buffer, each step
        tol = tol_for([spec["p_dtype"], spec["g_dtype"]], backend, plain_err(plain_p[i], ref_p[i]) if low else None,
                      roundings)
        assert p.dtype == spec["p_dtype"]
        # 64 roundings of the accumulation dtype and 4 of p's dtype per step, relative to them
        u = len(case["grads"]) * (64 * torch.finfo(F64 if spec["p_dtype"] == spec["g_dtype"] == F64 else F32).eps
                                  + 4 * torch.finfo(spec["p_dtype"]).eps)
        assert_matches(p, ref_p[i], tol, what, floor=u * mag_p[i])
        buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
        if ref_buf[i] is not None:
            assert buf is not None, f"{what}: no momentum buffer"
            tol = tol_for([spec["p_dtype"], spec["g_dtype"]], backend,
                          plain_err(plain_buf[i], ref_buf[i]) if low else None, roundings)
            assert_matches(buf, ref_buf[i], tol, f"{what}: momentum buffer", floor=u * mag_buf[i])
        if param_gaps[i] is not None:
            base, mask, old = param_gaps[i]
            torch.testing.assert_close(base.detach().reshape(-1)[mask], old, equal_nan=True, rtol=0, atol=0,
                                       msg=f"{what}: memory outside the parameter view was written")


@pytest.mark.parametrize("backend", BACKENDS)
@given(spec=param_specs(grad_layouts=GRAD_LAYOUTS), options=group_options())
def test_sgd_agc_parameter_listed_twice(backend, spec, options):
    """[p, p] in one group: a ValueError/TypeError when the optimizer is built, or one update,
    exactly as with [p] (never two updates, nor two programs racing on p)."""
    spec = dict(spec, has_grad=True)
    assume(spec["p_layout"].kind != "expanded")
    assume(not interpreter_mangles(backend, [spec["p_dtype"], spec["g_dtype"]], [spec["p_dtype"]]))
    p = make_param(spec)[0]
    g = p.grad
    try:
        opt = SGD_AGC([p, p], **options)
    except (TypeError, ValueError) as err:  # naming the second entry
        assert re.search(r"params'?\]?\[1\]", str(err)), str(err)
        return
    p0 = p.detach().clone()
    with nfk.use_backend(backend):
        opt.step()
    want, _ = sgd_step_reference(p0.double(), g.double(), None, options)
    low = spec["p_dtype"] in LOW_PRECISION or spec["g_dtype"] in LOW_PRECISION
    plain = sgd_step_reference(p0, g, None, options, dtype=None)[0] if low else None
    assert_matches(p, want, tol_for([spec["p_dtype"], spec["g_dtype"]], backend,
                                    plain_err(plain, want) if low else None), "a parameter listed twice")


MIXED_PAIRS = [(p, g) for p in FLOAT_DTYPES for g in FLOAT_DTYPES if p != g]


@pytest.mark.parametrize("backend", BACKENDS)
@given(specs=st.lists(param_specs(), min_size=2, max_size=4), pairs=st.lists(st.sampled_from(MIXED_PAIRS), min_size=4,
       max_size=4), options=group_options())
def test_sgd_agc_gradient_dtype_differs_from_parameter(backend, specs, pairs, options):
    """Every gradient has another dtype than its parameter, the pairs mixed within one param
    group (torch allows it through ``grad_dtype``): two steps."""
    specs = [dict(s, p_dtype=pd, g_dtype=gd, has_grad=True, p_kind="normal", g_kind="normal",
                  p_layout=Layout("contiguous"), g_layout=Layout("contiguous")) for s, (pd, gd) in zip(specs, pairs)]
    assume(not any(interpreter_mangles(backend, [s["p_dtype"], s["g_dtype"]], [s["p_dtype"]]) for s in specs))
    params = [make_param(s)[0] for s in specs]
    first = [p.grad for p in params]
    second = [g.flip(0) * 3 if g.dim() else g * 3 for g in first]
    opt = SGD_AGC(params, **options)
    refs = [(p.detach().double().clone(), None) for p in params]
    plains = [(p.detach().clone(), None) for p in params]
    for grads in (first, second):
        for p, g in zip(params, grads):
            p.grad = g
        with nfk.use_backend(backend):
            opt.step()
        refs = [tuple(t.to(p.dtype).double() if t is not None else None
                      for t in sgd_step_reference(r, g.double(), b, options))
                for p, (r, b), g in zip(params, refs, grads)]
        plains = [sgd_step_reference(w, g, b, options, dtype=None) for (w, b), g in zip(plains, grads)]
    for i, (spec, p, (want, _), (plain, _)) in enumerate(zip(specs, params, refs, plains)):
        dts = [spec["p_dtype"], spec["g_dtype"]]
        assert p.dtype == spec["p_dtype"]
        low = any(d in LOW_PRECISION for d in dts)
        tol = tol_for(dts, backend, plain_err(plain, want) if low else None, roundings=4)
        assert_matches(p, want, tol, f"param {i} {tuple(p.shape)} p:{dts[0]} g:{dts[1]}")


def test_sgd_agc_parameter_in_two_groups():
    p = torch.nn.Parameter(torch.randn(3, 2, device=DEVICE))
    with pytest.raises((TypeError, ValueError)):
        SGD_AGC([{"params": [p]}, {"params": [p], "weight_decay": 0.1}], lr=0.1)


# ------------------------------------------------------------------------------ bad input

BAD_OPTIONS = [
    ("lr", -0.1), ("lr", math.nan), ("lr", math.inf), ("lr", "0.1"),
    ("lr", None), ("lr", True),
    ("momentum", -0.9), ("momentum", math.nan), ("momentum", "0.9"),
    ("weight_decay", -1e-4), ("weight_decay", math.nan), ("weight_decay", math.inf),
    ("clip_factor", 0.0), ("clip_factor", -0.01), ("clip_factor", math.nan),
    ("clip_factor", None),
    ("eps", -1e-3), ("eps", math.nan), ("eps", "1e-3"),
    ("nesterov", "yes"), ("nesterov", 1), ("clipping", "no"),
    ("clipping", None),
]


@given(bad=st.sampled_from(BAD_OPTIONS), where=st.sampled_from(["defaults", "group", "add_param_group"]))
def test_sgd_agc_bad_options_raise_naming_them(bad, where):
    name, value = bad
    p = torch.nn.Parameter(torch.randn(3, 2, device=DEVICE))
    q = torch.nn.Parameter(torch.randn(4, device=DEVICE))
    opt = SGD_AGC([p], lr=0.1) if where == "add_param_group" else None
    with pytest.raises((TypeError, ValueError)) as info:
        if where == "defaults":
            SGD_AGC([p], **{"lr": 0.1, name: value})
        elif where == "group":
            SGD_AGC([{"params": [p]}, {"params": [q], name: value}], lr=0.1)
        else:
            opt.add_param_group({"params": [q], name: value})
    assert names_argument(str(info.value), name), f"{name}={value!r}: not named: {info.value}"
    if opt is not None:
        assert len(opt.param_groups) == 1, "a rejected param group stayed in the optimizer"


def test_sgd_agc_nesterov_needs_momentum():
    p = torch.nn.Parameter(torch.randn(3, 2, device=DEVICE))
    with pytest.raises((TypeError, ValueError)) as info:
        SGD_AGC([p], lr=0.1, momentum=0.0, nesterov=True)
    assert names_argument(str(info.value), "nesterov"), str(info.value)


def _corrupt(kind, p):
    """Makes p (a parameter with a gradient) a bad argument of step(); returns the name suffix
    the error must name, or None where this machine cannot build the case."""
    if kind == "sparse grad":
        p.grad = p.grad.to_sparse() if p.dim() else None
        return ".grad" if p.dim() else None
    if kind == "int grad":
        p.grad_dtype = None
        p.grad = torch.ones(p.shape, dtype=torch.int32, device=p.device)
        return ".grad"
    if kind == "complex grad":
        p.grad_dtype = None
        p.grad = torch.ones(p.shape, dtype=torch.complex64, device=p.device)
        return ".grad"
    if kind == "grad of another shape":
        p.data = torch.zeros((p.shape[0] + 1,) + tuple(p.shape[1:]) if p.dim() else (2,), dtype=p.dtype,
                             device=p.device)  # the gradient keeps the old shape
        return ".grad"
    if kind == "grad on another device":
        if not ON_GPU:
            return None
        try:
            p.data = p.data.cpu()  # the gradient stays on the GPU
        except RuntimeError:
            return None
        return ".grad"
    if kind == "expanded parameter":
        if p.dim() == 0 or p.shape[0] < 2:
            return None
        small = p.detach()[:1].clone()
        g = p.grad
        p.data = small.expand(p.shape)
        p.grad = g
        return ""
    raise KeyError(kind)


STEP_BAD = ["sparse grad", "int grad", "complex grad", "grad of another shape", "grad on another device",
            "expanded parameter"]


@pytest.mark.parametrize("backend", BACKENDS)
@given(specs=st.lists(param_specs(), min_size=1, max_size=3), n_groups=st.integers(1, 2), warm=st.booleans(),
       bad=st.sampled_from(STEP_BAD), data=st.data())
def test_sgd_agc_bad_gradient_raises_naming_it_and_writes_nothing(backend, specs, n_groups, warm, bad, data):
    """A bad parameter or gradient anywhere (often in the last group): step() raises naming it,
    and no parameter, gradient or existing momentum buffer of any group changes."""
    specs = [dict(s, has_grad=True, p_kind="normal", g_kind="normal",
                  p_layout=s["p_layout"] if s["p_layout"].kind != "expanded" else Layout("contiguous")) for s in specs]
    assume(not any(interpreter_mangles(backend, [s["p_dtype"], s["g_dtype"]], [s["p_dtype"]]) for s in specs))
    specs.append(dict(specs[-1], shape=(3, 4), p_layout=Layout("contiguous"), g_layout=Layout("contiguous")))
    params = [make_param(s)[0] for s in specs]
    split = len(params) - 1 if n_groups == 2 else len(params)
    groups = [params[:split]] + ([params[split:]] if n_groups == 2 else [])
    opt = SGD_AGC([{"params": g} for g in groups], lr=0.1, weight_decay=1e-4)
    with nfk.use_backend(backend):
        if warm:  # momentum buffers exist
            opt.step()
    k = data.draw(st.one_of(st.just(len(params) - 1), st.integers(0, len(params) - 1)), label="bad parameter")
    victim = params[k]
    suffix = _corrupt(bad, victim)
    assume(suffix is not None)
    gi = 0 if k < split else 1
    j = k if gi == 0 else k - split
    others = [p for i, p in enumerate(params) if i != k]
    watched = others + [p.grad for p in others]
    before = snapshot(watched)
    buffers = {id(p): opt.state[p]["momentum_buffer"].clone() for p in others
               if p in opt.state and "momentum_buffer" in opt.state[p]}
    with nfk.use_backend(backend), pytest.raises((TypeError, ValueError)) as info:
        opt.step()
    name = f"param_groups[{gi}]['params'][{j}]{suffix}"
    assert names_argument(str(info.value), name), f"{bad}: {name} not named: {type(info.value).__name__}: {info.value}"
    assert_unchanged(watched, before, "parameters and gradients")
    for p in others:
        if id(p) in buffers:
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], buffers[id(p)], rtol=0, atol=0,
                                       equal_nan=True)
        elif p in opt.state and "momentum_buffer" in opt.state[p]:
            assert not opt.state[p]["momentum_buffer"].any(), "a new momentum buffer holds a step"


@pytest.mark.parametrize("backend", BACKENDS)
@given(name=st.sampled_from(["lr", "momentum", "weight_decay", "clip_factor", "eps"]),
       value=st.sampled_from([math.nan, -1.0, math.inf]))
def test_sgd_agc_options_changed_after_construction_are_checked_by_step(backend, name, value):
    """A scheduler or user writing a NaN/negative option into param_groups: step() refuses it
    (naming it) instead of writing NaN into every parameter."""
    assume(not (name == "momentum" and value == math.inf))
    p = torch.nn.Parameter(torch.randn(4, 3, device=DEVICE))
    p.grad = torch.randn(4, 3, device=DEVICE)
    opt = SGD_AGC([p], lr=0.1)
    opt.param_groups[0][name] = value
    before = snapshot([p])
    with nfk.use_backend(backend), pytest.raises((TypeError, ValueError)) as info:
        opt.step()
    assert names_argument(str(info.value), name), str(info.value)
    assert_unchanged([p], before, "parameter")
