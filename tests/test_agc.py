"""nfkernels.agc_ and agc_parameters against timm's adaptive_clip_grad, written out here in
float64 (timm/utils/agc.py), on every backend that can run here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nfkernels as nfk
from nfkernels.ops import agc as agc_ops
from nfk_testing import DEVICE, ON_GPU, assert_close, backends_for, reference_data_path, rel_err

BACKENDS = backends_for(("torch", "triton", "cuda"))


def timm_unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    if x.ndim <= 1:
        return x.norm(2.0)
    return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


def timm_adaptive_clip_grad(grads, weights, clip_factor=0.01, eps=1e-3):
    """timm.utils.agc.adaptive_clip_grad on float64 copies; returns the clipped gradients."""
    out = []
    for w, g in zip(weights, grads):
        w, g = w.detach().double(), g.detach().double()
        max_norm = timm_unitwise_norm(w).clamp_(min=eps).mul_(clip_factor)
        grad_norm = timm_unitwise_norm(g)
        clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
        out.append(torch.where(grad_norm < max_norm, g, clipped))
    return out


def random_params(dtype, device=DEVICE, seed=0):
    """1-D, 2-D, 4-D (contiguous and channels_last), (O,1,1,1) gains, a scalar, a zero weight, a
    zero gradient, an empty tensor and a strided (non-dense) gradient; gradient scales chosen so
    that some units are clipped and some kept."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    specs = [
        ((6, 3, 3, 3), 0.2, 0.01),
        ((5, 7), 1.0, 0.02),
        ((9,), 0.5, 0.004),
        ((), 0.8, 0.05),
        ((4, 1, 1, 1), 1.0, 0.02),
        ((3, 5), 0.0, 0.01),  # zero weight: ‖W‖* = eps
        ((7,), 1.0, 0.0),  # zero gradient
        ((0, 4), 1.0, 1.0),  # empty
        ((1,), 1.0, 0.5),
    ]
    params = []
    for shape, w_scale, g_scale in specs:
        p = torch.nn.Parameter(randn(*shape, scale=w_scale).to(device))
        p.grad = randn(*shape, scale=g_scale).to(device) * (1 + torch.arange(p.numel(), dtype=dtype, device=device).reshape(shape) % 3)
        params.append(p)
    w = randn(4, 3, 3, 2, scale=0.3).to(device).to(memory_format=torch.channels_last)
    p = torch.nn.Parameter(w)
    p.grad = randn(4, 3, 3, 2, scale=0.01).to(device)  # contiguous grad, channels_last weight
    params.append(p)
    p = torch.nn.Parameter(randn(8, scale=0.5).to(device))
    p.grad = randn(16, scale=0.02).to(device)[::2]  # not dense: clipped through a copy
    params.append(p)
    params.append(torch.nn.Parameter(randn(3, 4).to(device)))  # no grad: skipped
    return params


def check_against_timm(params, grads_before, tol, clip_factor=0.01, eps=1e-3):
    expected = timm_adaptive_clip_grad(grads_before, [p.detach() for p in params], clip_factor, eps)
    for i, (p, ref) in enumerate(zip(params, expected)):
        assert_close(p.grad, ref, tol, f"param {i} {tuple(p.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_agc_matches_timm(backend, dtype):
    params = random_params(dtype)
    with_grad = [p for p in params if p.grad is not None]
    before = [p.grad.clone() for p in with_grad]
    with nfk.use_backend(backend):
        nfk.agc_(params)
    tol = 1e-10 if dtype == torch.float64 else 2e-6
    check_against_timm(with_grad, before, tol)
    assert params[-1].grad is None
    # the set really exercises both branches
    kept = [torch.equal(p.grad, b) for p, b in zip(with_grad, before) if p.numel()]
    assert any(kept) and not all(kept)


# Triton's interpreter has no bf16 arithmetic.
LOW_PRECISION = [
    (backend, dtype) for backend in BACKENDS for dtype in (torch.float16, torch.bfloat16)
    if ON_GPU or backend != "triton" or dtype != torch.bfloat16
]


@pytest.mark.parametrize(("backend", "dtype"), LOW_PRECISION)
def test_agc_low_precision(backend, dtype):
    """fp16/bf16 gradients, norms in fp32: within twice plain PyTorch's own error in that dtype."""
    params = random_params(dtype)
    with_grad = [p for p in params if p.grad is not None and p.numel()]
    before = [p.grad.clone() for p in with_grad]
    expected = timm_adaptive_clip_grad(before, [p.detach() for p in with_grad])
    plain = [g.clone() for g in before]  # timm's loop run in the low dtype itself
    for p, g in zip(with_grad, plain):
        max_norm = timm_unitwise_norm(p.detach()).clamp(min=1e-3) * 0.01
        gn = timm_unitwise_norm(g)
        g.copy_(torch.where(gn < max_norm, g, g * (max_norm / gn.clamp(min=1e-6))))
    with nfk.use_backend(backend):
        nfk.agc_(params)
    for p, ref, g_plain in zip(with_grad, expected, plain):
        assert_close(p.grad, ref, 2 * rel_err(g_plain, ref) + 2e-3, f"{tuple(p.shape)}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_agc_many_programs_and_one_launch_per_group(backend, monkeypatch, count_launches):
    """With small blocks, single-element units (gains, scalars) span several flat programs and
    rows of mixed lengths several row programs, each streamed in several iterations; fp32 and
    fp64 tensors make two launches, each running both kinds of programs."""
    monkeypatch.setattr(agc_ops, "ROW_TILE_BYTES", 64)
    monkeypatch.setattr(agc_ops, "MIN_COLS", 2)
    monkeypatch.setattr(agc_ops, "FLAT_BLOCK", 4)
    gen = torch.Generator().manual_seed(3)
    shapes = [((3, 37), torch.float32), ((53,), torch.float32), ((7, 1, 1, 1), torch.float32), ((), torch.float32),
              ((5, 2), torch.float32), ((2, 5, 7), torch.float64), ((40,), torch.float64), ((6, 1), torch.float64),
              ((1,), torch.float64), ((9, 3), torch.float64)]
    params = []
    for shape, dtype in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype).to(DEVICE))
        g = torch.randn(shape, generator=gen, dtype=dtype) * 0.02
        if len(shape) > 1:  # units on both sides of the threshold
            g = g * torch.linspace(0.2, 200.0, shape[0], dtype=dtype).view(-1, *([1] * (len(shape) - 1)))
        p.grad = g.to(DEVICE)
        params.append(p)
    before = [p.grad.clone() for p in params]
    counter = count_launches(agc_ops, "_agc_kernel") if backend == "triton" else None
    with nfk.use_backend(backend):
        nfk.agc_(params)
    if counter is not None:
        assert counter.count == 2
    for p, ref in zip(params, timm_adaptive_clip_grad(before, params)):
        assert_close(p.grad, ref, 2e-6, f"{tuple(p.shape)}")
    kept = [torch.equal(p.grad[i], b[i]) for p, b in zip(params, before) if p.dim() > 1 for i in range(p.shape[0])]
    assert any(kept) and not all(kept)


def _layout_of(params, itemsizes=(4, 4)):
    units = np.array([agc_ops.unit_count(p) for p in params], dtype=np.int64)
    lengths = np.array([p.numel() for p in params], dtype=np.int64) // np.maximum(units, 1)
    return agc_ops.row_layout(units, lengths, itemsizes)


def _lanes_launched(layout):
    """Lanes of a launch over ``layout``, from its rows as they are (not assuming their order): a
    flat program's FLAT units, a row program's block times the iterations of its longest row."""
    lanes = -(-layout.n_singles // layout.flat_block) * layout.flat_block
    for region in (layout.vector, layout.scalar):
        for first in range(region.start, region.end, region.rows):
            longest = int(layout.rows[first:min(first + region.rows, region.end), 2].max())
            lanes += -(-longest // region.cols) * region.rows * region.cols
    return lanes


def test_units_binned_and_lanes_busy_at_nfnet_f0_shapes():
    """Issue 13: at NFNet-F0's shapes one program per unit left 70% of the lanes idle (44,924 of
    112,573 units are single elements). Every unit must appear once: the single-element ones
    first, then the rows whose lengths are whole 16-byte vectors, then the others (the stem's
    27-element rows), each longest first (a row program streams up to its first row's length); at
    least 90% of the lanes launched must hold an element, for agc_ and for each of the paper's
    SGD_AGC param groups."""
    from nfkernels.models import nfnet
    from nfkernels.optim import nfnet_param_groups

    with torch.device("meta"):
        model = nfnet("f0")
    clipped = nfk.agc_parameters(model)
    groups = [g["params"] for g in nfnet_param_groups(model, 5e-5)]
    for params in [clipped] + groups:
        layout = _layout_of(params)
        rows = layout.rows
        expected = sorted((t, k * (p.numel() // agc_ops.unit_count(p)), p.numel() // agc_ops.unit_count(p))
                          for t, p in enumerate(params) for k in range(agc_ops.unit_count(p)))
        assert sorted(map(tuple, rows.tolist())) == expected
        singles, vector, scalar = layout.n_singles, layout.vector, layout.scalar
        assert (rows[:singles, 2] == 1).all()
        assert vector.start == singles and vector.end == scalar.start and scalar.end == len(rows)
        assert (rows[vector.start:vector.end, 2] % layout.vector_width == 0).all()
        assert (rows[scalar.start:, 2] % layout.vector_width != 0).all() and (rows[scalar.start:, 2] > 1).all()
        for region in (vector, scalar):
            assert (np.diff(rows[region.start:region.end, 2]) <= 0).all()
        elements = sum(p.numel() for p in params)
        lanes = _lanes_launched(layout)
        assert layout.lanes() == (elements, lanes)
        assert elements / lanes >= 0.9, f"{elements / lanes:.3f} of the lanes busy, {len(params)} tensors"
    layout = _layout_of(clipped)
    assert layout.n_singles == 44924
    assert layout.scalar.end - layout.scalar.start == 16  # the stem's first conv: 3x3x3 inputs


def _check_alignment_promise(table, itemsizes):
    """What the vector row programs are told (tl.multiple_of(·, table.align)), checked row by row
    from the table's own addresses: each row starts align-element aligned in every operand, as an
    address and as an offset from the operand's first tensor, and has a multiple of align
    elements. (The interpreter ignores the hint; on a GPU a false one would silently misread.)"""
    layout, align = table.layout, table.align
    n_tensors = len(table.addresses) // len(itemsizes)
    addresses = np.array(table.addresses, dtype=np.int64).reshape(len(itemsizes), n_tensors)
    for tensor, start, length in layout.rows[layout.vector.start:layout.vector.end].tolist():
        assert length % align == 0
        for operand, itemsize in enumerate(itemsizes):
            at = int(addresses[operand, tensor]) + start * itemsize
            assert at % (align * itemsize) == 0, (tensor, start, operand, align)
            assert (at - int(addresses[operand, 0])) // itemsize % align == 0


def _at_offset(shape, dtype, offset, fill=1.0):
    """A tensor of ``shape`` that starts ``offset`` elements into a fresh buffer."""
    numel = math.prod(shape)
    return torch.full((numel + offset,), fill, dtype=dtype, device=DEVICE)[offset:].view(shape)


@pytest.mark.parametrize(("g_dtype", "w_dtype", "vector"), [
    (torch.float32, torch.float32, 4), (torch.float16, torch.float16, 8), (torch.float64, torch.float64, 2),
    (torch.bfloat16, torch.float32, 8), (torch.float32, torch.float64, 4)])
def test_alignment_hint_only_where_it_holds(g_dtype, w_dtype, vector):
    """align is the whole 16-byte vector of the narrowest operand when every vector row (length a
    multiple of it) is aligned; smaller, down to 1 (scalar accesses), when an address is not;
    rows of other lengths, and tensors of single-element units, go to programs without the hint
    and do not lower it (unless they are the base); it follows the addresses when they change."""
    shapes = [(6, 1, 1, 1), (4, 8, 2), (16,), (3, 24)]

    def table_at(offsets, shapes=shapes):
        grads = [_at_offset(s, g_dtype, o) for s, o in zip(shapes, offsets)]
        weights = [_at_offset(s, w_dtype, o) for s, o in zip(shapes, offsets)]
        return agc_ops.unit_table([grads, weights]), (grads, weights)

    itemsizes = (torch.empty(0, dtype=g_dtype).element_size(), torch.empty(0, dtype=w_dtype).element_size())
    table, _ = table_at([0, 0, 0, 0])
    assert table.align == vector
    _check_alignment_promise(table, itemsizes)
    table, _ = table_at([0, 3, 0, 0])  # a weight at an odd element offset
    assert table.align == 1
    _check_alignment_promise(table, itemsizes)
    table, _ = table_at([0, 2, 2, 2])  # every row tensor two elements in
    assert table.align == 2
    _check_alignment_promise(table, itemsizes)
    others = [(16,), (6, 1, 1, 1), (5, 3), (4, 8, 2)]
    table, _ = table_at([0, 1, 1, 0], others)  # only the gains and the 3-element rows are off
    assert table.align == vector
    assert table.layout.scalar.end - table.layout.scalar.start == 5
    _check_alignment_promise(table, itemsizes)
    table, _ = table_at([0, 0, 0, 0])
    odd = [[_at_offset(s, dt, 1) for s in shapes] for dt in (g_dtype, w_dtype)]
    assert table.readdress(odd) and table.align == 1
    _check_alignment_promise(table, itemsizes)
    aligned = [[_at_offset(s, dt, 0) for s in shapes] for dt in (g_dtype, w_dtype)]
    assert table.readdress(aligned) and table.align == vector
    _check_alignment_promise(table, itemsizes)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_plan_and_tables_kept_while_layouts_stay(backend):
    """A second call on the same tensors reuses the plan and both tables; a gradient at a new
    address (zero_grad(set_to_none=True) gives one every step) only rebuilds the small table of
    addresses, and the clip is still exact; a parameter list of other shapes gets its own plan."""
    from nfkernels import clip as clip_module

    params = random_params(torch.float32, seed=5)[:3]
    with nfk.use_backend(backend):
        nfk.agc_(params)
        plan = clip_module._agc_plans[tuple(map(id, params))]
        (launch,) = plan.launches
        rows, bases = launch.table.rows, launch.table.bases
        nfk.agc_(params)
        assert clip_module._agc_plans[tuple(map(id, params))] is plan
        assert launch.table.rows is rows and launch.table.bases is bases
        fresh = params[0].grad.clone() * 50  # new storage, clipped
        params[0].grad = fresh.clone()
        nfk.agc_(params)
        assert clip_module._agc_plans[tuple(map(id, params))] is plan
        assert launch.table.rows is rows and launch.table.bases is not bases
        assert_close(params[0].grad, timm_adaptive_clip_grad([fresh], [params[0]])[0], 2e-6)
        others = random_params(torch.float32, seed=6)[3:6]
        nfk.agc_(others)
        assert clip_module._agc_plans[tuple(map(id, others))] is not plan


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_gradients_set_to_none_each_step_build_no_new_rows(backend, monkeypatch):
    """torch's default zero_grad(set_to_none=True): every step's gradients are new tensors. The
    row table is built once; each step is still exact."""
    built = []
    real = agc_ops.unit_table
    monkeypatch.setattr(agc_ops, "unit_table", lambda operands: built.append(1) or real(operands))
    params = [p for p in random_params(torch.float32, seed=7) if p.grad is not None]
    with nfk.use_backend(backend):
        for step in range(3):
            for p in params:  # a new gradient laid out like the old one, as autograd makes it
                g = p.grad
                p.grad = torch.empty_strided(g.shape, g.stride(), dtype=g.dtype, device=g.device).copy_(g * (1 + step))
            before = [p.grad.clone() for p in params]
            nfk.agc_(params)
            for p, ref in zip(params, timm_adaptive_clip_grad(before, params)):
                assert_close(p.grad, ref, 2e-6, f"step {step}, {tuple(p.shape)}")
    assert len(built) == 1


def _tree_module(named: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose named_parameters() are ``named`` (dotted names become submodules)."""
    root = torch.nn.Module()
    for name, value in named.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(value.clone()))
    return root


@pytest.mark.parametrize("backend", BACKENDS)
def test_agc_on_timm_nfnet_tiny(backend):
    """The clipped gradients timm computed for a real NFNet (all but head.fc.*). The interpreter
    takes seconds per case, so it checks the first case only."""
    data = torch.load(reference_data_path(), weights_only=True)
    model = _tree_module(data["state_dict"]).to(DEVICE)
    params = dict(model.named_parameters())
    interpreted = backend == "triton" and not ON_GPU
    for case in data["cases"][:1] if interpreted else data["cases"]:
        for name, p in params.items():
            p.grad = case["grads"][name].clone().to(DEVICE)
        with nfk.use_backend(backend):
            nfk.agc_(nfk.agc_parameters(model, exclude=["head.fc"]))
        for name, p in params.items():
            expected = case["agc_grads"][name] if not name.startswith("head.fc") else case["grads"][name]
            assert_close(p.grad, expected.to(DEVICE), 1e-10, name)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf·0
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_gradients(backend):
    """NaN in a unit → that unit all NaN; ‖G‖ = inf → finite entries 0, inf entries NaN;
    other units exactly as timm. The same result as timm's loop, NaN for NaN."""
    w = torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64, device=DEVICE))
    g = torch.randn(4, 6, dtype=torch.float64, device=DEVICE) * 0.05
    g[1, 2] = float("nan")
    g[2, 0] = float("inf")
    bias = torch.nn.Parameter(torch.randn(5, dtype=torch.float64, device=DEVICE))
    w_nan = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64, device=DEVICE))
    w_nan.data[0, 1] = float("nan")
    w.grad, bias.grad = g.clone(), torch.full((5,), float("nan"), dtype=torch.float64, device=DEVICE)
    w_nan.grad = torch.randn(3, 2, dtype=torch.float64, device=DEVICE) * 1e-6
    params = [w, bias, w_nan]
    before = [p.grad.clone() for p in params]
    with nfk.use_backend(backend):
        nfk.agc_(params)
    for p, ref in zip(params, timm_adaptive_clip_grad(before, params)):
        torch.testing.assert_close(p.grad, ref, equal_nan=True, rtol=1e-12, atol=0)
    assert torch.isnan(w.grad[1]).all() and torch.isfinite(w.grad[[0, 3]]).all()
    assert w.grad[2, 0].isnan() and (w.grad[2, 1:] == 0).all()
    assert torch.isnan(w_nan.grad[0]).all() and torch.isfinite(w_nan.grad[1:]).all()


def test_accepts_tensor_iterable_and_param_groups():
    params = random_params(torch.float64, seed=7)[:4]
    before = [p.grad.clone() for p in params]
    expected = timm_adaptive_clip_grad(before, params)
    nfk.agc_(params[0])
    nfk.agc_(iter([params[1]]))
    nfk.agc_([{"params": [params[2]], "lr": 0.1}, {"params": params[3]}])
    for p, ref in zip(params, expected):
        assert_close(p.grad, ref, 1e-12)
    # a repeated parameter is clipped once
    q = random_params(torch.float64, seed=7)[0]
    nfk.agc_([q, q])
    assert_close(q.grad, expected[0], 1e-12)


def test_agc_parameters_helper():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    assert nfk.agc_parameters(model) == [model[0].weight, model[0].bias]
    assert nfk.agc_parameters(model, exclude=["2.weight"]) == [model[0].weight, model[0].bias, model[2].bias]
    assert nfk.agc_parameters(model, exclude=lambda name, p: p.dim() <= 1) == [model[0].weight, model[2].weight]

    class WithClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)
            self.proj = torch.nn.Linear(2, 2)

        def get_classifier(self):
            return self.fc

    m = WithClassifier()
    assert nfk.agc_parameters(m) == [m.proj.weight, m.proj.bias]
    with pytest.raises(TypeError, match="exclude"):
        nfk.agc_parameters(model, exclude="head.fc")
    with pytest.raises(ValueError, match="classifier"):
        nfk.agc_parameters(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="model"):
        nfk.agc_parameters([model[0].weight])


def test_bad_inputs():
    p = torch.nn.Parameter(torch.randn(3, 4))
    p.grad = torch.randn(3, 4)
    with pytest.raises(ValueError, match="clip_factor"):
        nfk.agc_([p], clip_factor=-0.01)
    with pytest.raises(ValueError, match="eps"):
        nfk.agc_([p], eps=-1.0)
    with pytest.raises(TypeError, match="clip_factor"):
        nfk.agc_([p], clip_factor="0.01")
    with pytest.raises(TypeError, match=r"parameters\[1\]"):
        nfk.agc_([p, 3.0])
    with pytest.raises(TypeError, match="parameters"):
        nfk.agc_(42)
    with pytest.raises(TypeError, match="'params'"):
        nfk.agc_([{"lr": 0.1}])
    sparse = torch.nn.Parameter(torch.randn(5, 3))
    sparse.grad = torch.randn(5, 3).to_sparse()
    with pytest.raises(TypeError, match=r"parameters\[0\]\.grad"):
        nfk.agc_([sparse])
    ints = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"parameters"):
        ints.grad = torch.zeros(3, dtype=torch.int64)
        nfk.agc_(ints)
    if not ON_GPU:
        with pytest.raises(RuntimeError, match="cuda"), nfk.use_backend("cuda"):
            nfk.agc_([p])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_agc_cuda_graph_capture(backend):
    if backend == "cuda" and "cuda" not in BACKENDS:
        pytest.skip("nfkernels._C not built")
    params = random_params(torch.float32)[:6]
    grads = [p.grad for p in params]
    originals = [g.clone() for g in grads]
    with nfk.use_backend(backend):
        nfk.agc_(params)  # warm-up: compiles the kernel and builds the row table
        for g, o in zip(grads, originals):
            g.copy_(o)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            nfk.agc_(params)
    for g, o in zip(grads, originals):
        g.copy_(o * 3)
    graph.replay()
    torch.cuda.synchronize()
    expected = timm_adaptive_clip_grad([o * 3 for o in originals], params)
    for p, ref in zip(params, expected):
        assert_close(p.grad, ref, 2e-6)


def test_default_arguments_are_the_papers():
    import inspect

    sig = inspect.signature(nfk.agc_)
    assert sig.parameters["clip_factor"].default == 0.01 and math.isclose(sig.parameters["eps"].default, 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_plan_does_not_keep_gradients_alive(backend):
    """After zero_grad(set_to_none=True) the old gradients must be freed: a cached plan holding
    them would double the gradients' memory."""
    import gc

    params = [p for p in random_params(torch.float32, seed=8) if p.grad is not None]
    with nfk.use_backend(backend):
        nfk.agc_(params)
    storages = [p.grad.untyped_storage() for p in params]
    for p in params:
        p.grad = None
    gc.collect()
    # Only this test's reference to each old gradient's memory is left.
    assert [torch._C._storage_Use_Count(st._cdata) for st in storages] == [1] * len(storages)


def test_tables_read_by_a_captured_graph_are_never_freed():
    """A CUDA graph holds the raw addresses of the tables it read: readdressing a captured table
    must keep the old addresses table alive (the new one is not captured)."""
    keep = [torch.randn(3, 4)]
    table = agc_ops.unit_table([keep])
    table.captured = True  # as use() marks it during capture
    agc_ops._CAPTURED.extend((table.rows, table.bases))
    captured_bases = table.bases
    assert table.readdress([[torch.randn(3, 4)]])
    assert table.bases is not captured_bases and not table.captured
    assert any(t is captured_bases for t in agc_ops._CAPTURED)


def _param_with_grad(shape, w_dtype, g_dtype, gen, w_scale=0.5, g_scale=0.02):
    """A parameter of dtype w_dtype whose .grad has dtype g_dtype (torch allows this through
    ``grad_dtype``, e.g. fp32 master weights with bf16 gradients)."""
    p = torch.nn.Parameter((torch.randn(shape, generator=gen, dtype=torch.float64) * w_scale).to(w_dtype).to(DEVICE))
    p.grad_dtype = g_dtype
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * g_scale
    if len(shape) > 1:  # unit scales from kept to clipped
        g = g * torch.linspace(0.05, 3.0, shape[0], dtype=torch.float64).view(-1, *([1] * (len(shape) - 1)))
    p.grad = g.to(g_dtype).to(DEVICE)
    return p


# bf16 arithmetic is not in Triton's interpreter; fp16 stands in for the 16-bit cases there.
HALF = torch.float16 if not ON_GPU else torch.bfloat16
MIXED_DTYPES = [  # (weight dtype, gradient dtype); pairs sharing a gradient dtype but not a weight
    (torch.float32, torch.float32), (torch.float64, torch.float32), (HALF, torch.float32),
    (torch.float32, HALF), (HALF, HALF), (torch.float64, HALF),
    (torch.float32, torch.float64), (torch.float64, torch.float64), (HALF, torch.float64),
]
GRAD_DTYPE_TOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_agc_grad_dtype_differs_from_param_dtype(backend):
    """Weights and gradients of different dtypes in one call: each unit clipped from its own
    weight's norm (issue 10, defect 1: weights were read with the gradient's element type)."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(5, 3, 2, 2), (7, 9), (11,), ()]
    params = [_param_with_grad(shapes[i % len(shapes)], w_dtype, g_dtype, gen)
              for i, (w_dtype, g_dtype) in enumerate(MIXED_DTYPES)]
    before = [p.grad.clone() for p in params]
    with nfk.use_backend(backend):
        nfk.agc_(params)
    expected = timm_adaptive_clip_grad(before, [p.detach() for p in params])
    for p, ref, old in zip(params, expected, before):
        assert p.grad.dtype == old.dtype
        assert_close(p.grad, ref, GRAD_DTYPE_TOL[p.grad.dtype], f"weight {p.dtype}, grad {p.grad.dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_agc_rejects_overlapping_gradient_before_writing(backend):
    """An expanded (stride-0) gradient cannot be clipped in place unit by unit: a ValueError that
    names it, raised before any earlier parameter is clipped (issue 10, defect 9)."""
    gen = torch.Generator().manual_seed(12)
    params = [_param_with_grad((4, 6), torch.float64, torch.float64, gen, g_scale=1.0) for _ in range(2)]
    bad = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float64, device=DEVICE))
    bad.grad = torch.randn(1, 5, dtype=torch.float64, device=DEVICE).expand(3, 5)
    before = [p.grad.clone() for p in params]
    with nfk.use_backend(backend), pytest.raises(ValueError, match=r"parameters\[2\]\.grad .*share memory"):
        nfk.agc_(params + [bad])
    for p, old in zip(params, before):
        assert torch.equal(p.grad, old)
    # An expanded *weight* is only read: it is clipped against as usual.
    w = torch.nn.Parameter(torch.randn(1, 5, dtype=torch.float64, device=DEVICE).expand(3, 5))
    w.grad = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    old = w.grad.clone()
    with nfk.use_backend(backend):
        nfk.agc_(w)
    assert_close(w.grad, timm_adaptive_clip_grad([old], [w.detach()])[0], 1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_evicted_row_table_outlives_a_launch_on_another_stream(backend, monkeypatch):
    """A plan's tables built on one stream, read by a launch queued late on a side stream, then
    evicted with the plan: their memory must not be handed out (and overwritten) before that
    launch has read it (issue 10, defect 5: evicted tables were freed without record_stream)."""
    if backend not in BACKENDS:
        pytest.skip("nfkernels._C not built")
    from nfkernels import clip as clip_module

    monkeypatch.setattr(clip_module, "_agc_plans", type(clip_module._agc_plans)())
    monkeypatch.setattr(clip_module, "PLAN_CACHE_SIZE", 1)
    gen = torch.Generator().manual_seed(13)
    params = [_param_with_grad((4096, 8), torch.float32, torch.float32, gen, g_scale=1.0)]
    others = [_param_with_grad((4096, 8), torch.float32, torch.float32, gen, g_scale=1.0)]
    before = params[0].grad.clone()
    with nfk.use_backend(backend):
        nfk.agc_(params)  # builds tables A on the default stream
        params[0].grad.copy_(before)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(500_000_000)  # the clip below runs long after the host moves on
            nfk.agc_(params)  # reads tables A on the side stream
        nfk.agc_(others)  # builds tables B and evicts A (its plan) on the default stream
        # Table A's rows (4096 of 3 int64): the allocator would hand out its block, were it free.
        reused = torch.zeros(4096 * 3, dtype=torch.int64, device=DEVICE)
        torch.cuda.synchronize()
    del reused
    expected = timm_adaptive_clip_grad([before], [params[0].detach()])[0]
    assert_close(params[0].grad, expected, 2e-6)
