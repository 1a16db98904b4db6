"""Property tests of nfkernels.agc_ (docs/design.md §5, unit-wise AGC) against timm's
adaptive_clip_grad written out here in float64, over drawn lists of parameters: shapes (scalar,
1-D, 2-D, 4-D, (O,1,1,1), empty, rows longer than a block), parameter and gradient dtypes (a
gradient may have another dtype than its parameter: torch's ``grad_dtype``), layouts and views,
value scales incl. NaN/Inf, skipped (None) gradients, repeated parameters, param-group forms and
backends. Bad arguments must raise TypeError/ValueError naming them before any gradient is
written."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, strategies as st

import nfkernels as nfk
from nfkernels.ops import agc as agc_ops
from nfk_strategies import (
    backend_runner,
    F32, F64, FLOAT_DTYPES, LOW_PRECISION, assert_matches, assert_unchanged, dim_sizes, dtypes,
    interpreter_mangles, lay_out,
    layouts, names_argument, plain_err, seeds, snapshot, tol_for, values,
)
from nfk_testing import DEVICE, ON_GPU, backends_for

BACKENDS = backends_for(("torch", "triton", "cuda"))

# The interpreter's inf·0 for a unit with ‖G‖ = inf warns.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


# ------------------------------------------------------------------------- float64 oracle

def _unit_norms(x: torch.Tensor) -> torch.Tensor:
    """‖unit‖ per unit (timm: ndim ≤ 1 is one unit, else each dim-0 slice), shaped to broadcast."""
    if x.dim() <= 1:
        return (x * x).sum().sqrt()
    return (x * x).sum(dim=tuple(range(1, x.dim())), keepdim=True).sqrt()


def timm_agc(weight, grad, clip_factor, eps, dtype=F64):
    """timm.utils.agc.adaptive_clip_grad for one parameter, in ``dtype`` (None: each tensor's
    own dtype, the plain-PyTorch bound for fp16/bf16)::

        max_norm = max(‖W_i‖, eps)·λ;  G_i ← G_i if ‖G_i‖ < max_norm else G_i·max_norm/max(‖G_i‖, 1e-6)
    """
    w = weight.detach() if dtype is None else weight.detach().to(dtype)
    g = grad.detach() if dtype is None else grad.detach().to(dtype)
    w_norm = _unit_norms(w)
    max_norm = torch.where(w_norm < eps, torch.full_like(w_norm, eps), w_norm) * clip_factor  # NaN stays
    g_norm = _unit_norms(g)
    floor = torch.where(g_norm < 1e-6, torch.full_like(g_norm, 1e-6), g_norm)
    return torch.where(g_norm < max_norm, g, g * (max_norm / floor)), g_norm < max_norm


# ------------------------------------------------------------------------------ strategies

SHAPES = st.one_of(
    st.just(()),
    st.tuples(dim_sizes(9)),
    st.tuples(dim_sizes(6, allow_zero=True), dim_sizes(7, allow_zero=True)),
    st.tuples(dim_sizes(5), dim_sizes(3), dim_sizes(3), dim_sizes(3)),
    st.tuples(dim_sizes(6), st.just(1), st.just(1), st.just(1)),  # gains (O,1,1,1)
    st.tuples(dim_sizes(3), st.integers(17, 60)),  # rows longer than the (lowered) block
    st.tuples(st.integers(17, 60)),
)


@st.composite
def param_specs(draw, grad_layouts=("contiguous", "channels_last", "transposed", "sliced")):
    shape = draw(SHAPES)
    p_dtype = draw(dtypes())
    g_dtype = draw(st.one_of(st.just(p_dtype), dtypes()))
    return dict(
        shape=shape, p_dtype=p_dtype, g_dtype=g_dtype, seed=draw(seeds()),
        p_kind=draw(st.sampled_from(["normal", "normal", "zeros", "tiny", "huge", "constant", "nonfinite"])),
        g_kind=draw(st.sampled_from(["normal", "normal", "normal", "zeros", "tiny", "huge", "mixed", "nonfinite"])),
        # gradient scale relative to the weight's: units on both sides of the clip threshold
        g_scale=draw(st.sampled_from([1e-4, 3e-3, 1e-2, 0.03, 1.0])),
        p_layout=draw(layouts(len(shape))),
        g_layout=draw(layouts(len(shape), grad_layouts)),
        has_grad=draw(st.integers(0, 9)) > 0,
    )


def make_param(spec, device=DEVICE):
    """(parameter, the storage its gradient views, the storage it views itself): the
    storages are the larger NaN-filled buffers of sliced layouts (else the tensors)."""
    shape = spec["shape"]
    w64 = values(spec["seed"], shape, spec["p_kind"], spec["p_dtype"], spread=0.5)
    p_storage, view = lay_out(w64, spec["p_dtype"], spec["p_layout"], device=device)
    p = torch.nn.Parameter(view)
    if not spec["has_grad"]:
        return p, None, p_storage
    g64 = values(spec["seed"] + 1, shape, spec["g_kind"], spec["g_dtype"], spread=spec["g_scale"])
    if spec["g_kind"] == "normal" and len(shape) >= 2 and shape[0] > 1:  # vary the scale per unit
        g64 = (g64 * torch.logspace(-1, 1, shape[0], dtype=F64).reshape(-1, *([1] * (len(shape) - 1))))
        g64 = g64.to(spec["g_dtype"]).double()
    storage, grad = lay_out(g64, spec["g_dtype"], spec["g_layout"], device=device)
    if spec["g_dtype"] != spec["p_dtype"]:
        p.grad_dtype = None  # torch: a gradient of another dtype than the parameter's
    p.grad = grad
    return p, storage, p_storage


running = backend_runner(agc_ops, ROW_TILE_BYTES=64, MIN_COLS=2, FLAT_BLOCK=4)


def pack(params, form):
    """The ``parameters`` argument in one of the accepted forms."""
    if form == "tensor" and len(params) == 1:
        return params[0]
    if form == "groups":
        half = len(params) // 2
        return [{"params": params[:half], "lr": 0.1}, {"params": params[half:]}]
    if form == "generator":
        return (p for p in params)
    return list(params)


def gaps_of(storage, view):
    """The elements of ``storage`` outside ``view`` (a sliced layout's NaN gaps)."""
    if storage is None or storage.numel() == view.numel() or storage.data_ptr() == 0:
        return None
    mask = torch.ones(storage.numel(), dtype=torch.bool, device=storage.device)
    idx = torch.arange(storage.numel(), device=storage.device).reshape(storage.shape)
    inside = idx.as_strided(view.shape, view.stride(), view.storage_offset() - storage.storage_offset())
    mask[inside.reshape(-1)] = False
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@given(specs=st.lists(param_specs(), min_size=1, max_size=4), repeat=st.booleans(),
       form=st.sampled_from(["list", "groups", "tensor", "generator"]),
       clip_factor=st.sampled_from([0.01, 0.01, 0.1, 1e-3, 0.5]), eps=st.sampled_from([1e-3, 1e-3, 0.0, 1e-6, 0.5]),
       small_blocks=st.booleans())
def test_agc_matches_timm_in_float64(backend, specs, repeat, form, clip_factor, eps, small_blocks):
    assume(not any(interpreter_mangles(backend, [s["p_dtype"], s["g_dtype"]], [s["g_dtype"]]) for s in specs))
    made = [make_param(s) for s in specs]
    params = [p for p, _, _ in made]
    grads = [p.grad for p in params]
    before = [g.detach().clone() if g is not None else None for g in grads]
    gaps = [gaps_of(storage, g) if g is not None else None for (_, storage, _), g in zip(made, grads)]
    gap_values = [storage.detach().reshape(-1)[m].clone() if m is not None else None
                  for (_, storage, _), m in zip(made, gaps)]
    listed = params + params[:1] if repeat else params  # a repeated parameter is clipped once
    with running(backend, small_blocks):
        nfk.agc_(pack(listed, form), clip_factor=clip_factor, eps=eps)

    for i, (spec, p, g, g0) in enumerate(zip(specs, params, grads, before)):
        what = f"param {i} {spec['shape']} p:{spec['p_dtype']} g:{spec['g_dtype']}"
        if g is None:
            assert p.grad is None, f"{what}: a None gradient was filled in"
            continue
        assert p.grad is g, f"{what}: .grad was replaced, not clipped in place"
        assert g.dtype == spec["g_dtype"] and g.shape == p.shape
        want, kept = timm_agc(p, g0, clip_factor, eps)
        low = spec["p_dtype"] in LOW_PRECISION or spec["g_dtype"] in LOW_PRECISION
        plain = None
        if low:
            plain = timm_agc(p, g0, clip_factor, eps, dtype=None)[0].to(spec["g_dtype"])
        tol = tol_for([spec["p_dtype"], spec["g_dtype"]], backend, plain_err(plain, want) if low else None)
        assert_matches(g, want, tol, what)
        # A unit clearly below the threshold is left exactly as it was.
        w_norm, g_norm = _unit_norms(p.detach().double()), _unit_norms(g0.double())
        clearly = (g_norm < 0.99 * torch.clamp(w_norm, min=eps) * clip_factor).expand_as(g0) if g0.numel() else None
        if clearly is not None and clearly.any():
            assert torch.equal(g.detach()[clearly], g0[clearly]), f"{what}: a kept unit changed"
        if gaps[i] is not None:
            storage = made[i][1]
            torch.testing.assert_close(storage.detach().reshape(-1)[gaps[i]], gap_values[i], equal_nan=True,
                                       rtol=0, atol=0, msg=f"{what}: memory outside the gradient view was written")


MIXED_PAIRS = [(p, g) for p in FLOAT_DTYPES for g in FLOAT_DTYPES if p != g]


@pytest.mark.parametrize("backend", BACKENDS)
@given(specs=st.lists(param_specs(), min_size=2, max_size=4),
       pairs=st.lists(st.sampled_from(MIXED_PAIRS), min_size=4, max_size=4))
def test_agc_gradient_dtype_differs_from_parameter(backend, specs, pairs):
    """Every gradient has another dtype than its parameter, the pairs mixed within one call
    (torch allows it through ``grad_dtype``)."""
    specs = [dict(s, p_dtype=pd, g_dtype=gd, has_grad=True, p_kind="normal", g_kind="normal")
             for s, (pd, gd) in zip(specs, pairs)]
    assume(not any(interpreter_mangles(backend, [s["p_dtype"], s["g_dtype"]], [s["g_dtype"]]) for s in specs))
    params = [make_param(s)[0] for s in specs]
    before = [p.grad.detach().clone() for p in params]
    with nfk.use_backend(backend):
        nfk.agc_(params)
    for i, (spec, p, g0) in enumerate(zip(specs, params, before)):
        dts = [spec["p_dtype"], spec["g_dtype"]]
        want, _ = timm_agc(p, g0, 0.01, 1e-3)
        low = any(d in LOW_PRECISION for d in dts)
        plain = timm_agc(p, g0, 0.01, 1e-3, dtype=None)[0].to(dts[1]) if low else None
        assert p.grad.dtype == dts[1]
        assert_matches(p.grad, want, tol_for(dts, backend, plain_err(plain, want) if low else None),
                       f"param {i} {tuple(p.shape)} p:{dts[0]} g:{dts[1]}")


@pytest.mark.parametrize("backend", BACKENDS)
@given(specs=st.lists(param_specs(), min_size=0, max_size=3), shape=st.sampled_from([(4, 3), (5,), (3, 2, 2, 2)]),
       dim=st.integers(0, 3), seed=seeds())
def test_agc_expanded_gradient_raises_before_writing_or_is_clipped(backend, specs, shape, dim, seed):
    """A stride-0 (expand()-ed) gradient after valid ones: either TypeError/ValueError naming it
    with no gradient written, or every gradient clipped correctly (the expanded one included)."""
    dim = dim % len(shape)
    assume(shape[dim] > 1)
    assume(not any(interpreter_mangles(backend, [s["p_dtype"], s["g_dtype"]], [s["g_dtype"]]) for s in specs))
    params = [make_param(dict(s, has_grad=True))[0] for s in specs]
    small = list(shape)
    small[dim] = 1
    p = torch.nn.Parameter(values(seed, shape, "normal", F32).to(DEVICE, F32))
    p.grad = (values(seed + 1, small, "normal", F32) * 5).to(DEVICE, F32).expand(shape)
    params.append(p)
    grads = [q.grad for q in params]
    before = snapshot(grads)
    originals = [g.detach().clone() for g in grads]
    try:
        with nfk.use_backend(backend):
            nfk.agc_(params)
    except (TypeError, ValueError) as err:
        assert names_argument(str(err), f"parameters[{len(params) - 1}]"), str(err)
        assert_unchanged(grads, before, "gradients")
        return
    for i, (q, g0) in enumerate(zip(params, originals)):
        want, _ = timm_agc(q, g0, 0.01, 1e-3)
        dt = [q.dtype, q.grad.dtype]
        low = any(d in LOW_PRECISION for d in dt)
        plain = timm_agc(q, g0, 0.01, 1e-3, dtype=None)[0].to(q.grad.dtype) if low else None
        assert_matches(q.grad, want, tol_for(dt, backend, plain_err(plain, want) if low else None), f"param {i}")


ALIGNMENT_SHAPES = st.one_of(
    SHAPES,
    st.tuples(dim_sizes(5), st.sampled_from([4, 8, 12, 16, 24, 32])),  # row lengths of whole vectors
    st.tuples(st.sampled_from([8, 16, 32, 48, 64])),
)


@given(shapes=st.lists(ALIGNMENT_SHAPES, min_size=1, max_size=6), g_dtype=dtypes(), w_dtype=dtypes(),
       offsets=st.lists(st.integers(0, 9), min_size=12, max_size=12),
       moved=st.lists(st.integers(0, 9), min_size=12, max_size=12))
def test_alignment_hint_holds_for_drawn_shapes_and_offsets(shapes, g_dtype, w_dtype, offsets, moved):
    """What the vector row programs are told about alignment (tl.multiple_of; the interpreter
    ignores it, a GPU would misread silently) holds for every vector row of a table over tensors
    at drawn element offsets into their buffers, before and after readdressing to other offsets;
    rows of other lengths are not vector rows. No kernel runs: the tables only."""
    from test_agc import _at_offset, _check_alignment_promise

    shapes = [s for s in shapes if math.prod(s) > 0]
    assume(shapes)

    def operands(at):
        return [[_at_offset(s, dt, o) for s, o in zip(shapes, at)] for dt in (g_dtype, w_dtype)]

    table = agc_ops.unit_table(operands(offsets))
    itemsizes = (torch.empty(0, dtype=g_dtype).element_size(), torch.empty(0, dtype=w_dtype).element_size())
    layout = table.layout
    assert (layout.rows[layout.vector.start:layout.vector.end, 2] % layout.vector_width == 0).all()
    assert (layout.rows[layout.scalar.start:, 2] % layout.vector_width != 0).all()
    _check_alignment_promise(table, itemsizes)
    if all(o == 0 for o in offsets[:len(shapes)]) and len(layout.row_tensors):
        assert table.align == layout.vector_width  # fresh buffers are 16-byte aligned
    assert table.readdress(operands(moved))
    _check_alignment_promise(table, itemsizes)


# ------------------------------------------------------------------------------ bad input

def _with_grad(p, grad):
    p.grad_dtype = None
    p.grad = grad
    return p


def _shape_mismatch():
    p = torch.nn.Parameter(torch.randn(4, 3, device=DEVICE))
    p.grad = torch.randn(4, 3, device=DEVICE)
    p.data = torch.randn(5, 3, device=DEVICE)  # the gradient keeps the old shape
    return p


def _device_mix():
    """A CUDA parameter with a CPU gradient (only a GPU machine can make one)."""
    if not ON_GPU:
        return None
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    try:
        p.data = p.data.to(DEVICE)
    except RuntimeError:
        return None
    return p


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype) if dtype.is_floating_point or dtype.is_complex \
        else torch.ones(*shape, device=DEVICE, dtype=dtype)


# (description, builder of the bad item, name suffix): the item is listed at position j; the
# message of the TypeError/ValueError must name parameters[j] + suffix.
BAD_ITEMS = [
    ("a float", lambda: 3.0, ""),
    ("a str", lambda: "weight", ""),
    ("None", lambda: None, ""),
    ("an int parameter", lambda: _with_grad(_t(3, dtype=torch.int64), _t(3, dtype=torch.int64)), ""),
    ("a complex parameter", lambda: _with_grad(torch.nn.Parameter(_t(3, dtype=torch.complex64)),
                                               _t(3, dtype=torch.complex64)), ""),
    ("a sparse gradient", lambda: _with_grad(torch.nn.Parameter(_t(5, 3)), _t(5, 3).to_sparse()), ".grad"),
    ("an int gradient", lambda: _with_grad(torch.nn.Parameter(_t(5)), _t(5, dtype=torch.int32)), ".grad"),
    ("a bool gradient", lambda: _with_grad(torch.nn.Parameter(_t(5)), _t(5, dtype=torch.bool)), ".grad"),
    ("a complex gradient", lambda: _with_grad(torch.nn.Parameter(_t(5)), _t(5, dtype=torch.complex64)), ".grad"),
    ("a gradient of another shape", _shape_mismatch, ".grad"),
    ("a gradient on another device", _device_mix, ".grad"),
    ("a dict without 'params'", lambda: {"lr": 0.1}, ""),
]


@pytest.mark.parametrize("backend", BACKENDS)
@given(specs=st.lists(param_specs(), min_size=0, max_size=3), bad=st.sampled_from(range(len(BAD_ITEMS))),
       at_end=st.booleans(), data=st.data())
def test_agc_bad_parameter_raises_naming_it_and_writes_nothing(backend, specs, bad, at_end, data):
    desc, build, suffix = BAD_ITEMS[bad]
    item = build()
    assume(item is not None or desc == "None")
    params = [make_param(dict(s, has_grad=True))[0] for s in specs]
    j = len(params) if at_end else data.draw(st.integers(0, len(params)), label="position")
    listed = params[:j] + [item] + params[j:]
    grads = [p.grad for p in params]
    before = snapshot(grads)
    with nfk.use_backend(backend), pytest.raises((TypeError, ValueError)) as info:
        nfk.agc_(listed)
    assert names_argument(str(info.value), f"parameters[{j}]{suffix}"), f"{desc}: not named: {info.value}"
    assert_unchanged(grads, before, "gradients")


BAD_HYPER = [
    ("clip_factor", 0.0), ("clip_factor", -0.01), ("clip_factor", math.nan),
    ("clip_factor", math.inf), ("clip_factor", "0.01"), ("clip_factor", True),
    ("clip_factor", None), ("eps", -1e-3), ("eps", math.nan),
    ("eps", math.inf), ("eps", "1e-3"), ("eps", [1e-3]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@given(specs=st.lists(param_specs(), min_size=1, max_size=3), bad=st.sampled_from(BAD_HYPER))
def test_agc_bad_hyper_parameters(backend, specs, bad):
    name, value = bad
    params = [make_param(dict(s, has_grad=True))[0] for s in specs]
    grads = [p.grad for p in params]
    before = snapshot(grads)
    with nfk.use_backend(backend), pytest.raises((TypeError, ValueError)) as info:
        nfk.agc_(params, **{name: value})
    assert names_argument(str(info.value), name), f"{name}={value!r}: not named: {info.value}"
    assert_unchanged(grads, before, "gradients")


@pytest.mark.parametrize("parameters", [42, "weights", None, 1.5, torch.float32])
def test_agc_parameters_of_the_wrong_type(parameters):
    with pytest.raises((TypeError, ValueError)) as info:
        nfk.agc_(parameters)
    assert names_argument(str(info.value), "parameters"), str(info.value)
