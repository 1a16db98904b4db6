"""nfkernels.optim.SGD_AGC against torch.optim.SGD preceded by timm's AGC loop (written out in
float64 in test_agc.py), step for step, on every backend that can run here."""
from __future__ import annotations

import copy

import pytest
import torch

import nfkernels as nfk
from nfkernels.ops import agc as agc_ops
from nfkernels.ops import sgd_agc as sgd_ops
from nfkernels.optim import SGD_AGC, nfnet_param_groups
from nfk_testing import DEVICE, assert_close, backends_for
from test_agc import timm_adaptive_clip_grad

BACKENDS = backends_for(("torch", "triton", "cuda"))


def make_params(dtype, seed=0):
    """Conv weight (one channels_last), gains (O,1,1,1), bias, SkipInit scalar, linear, a
    zero-initialised weight; sizes small enough for the interpreter."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 3, 3, 3), (6, 1, 1, 1), (6,), (), (5, 6), (5,), (4, 2, 3, 1)]
    params = [torch.nn.Parameter((torch.randn(s, generator=gen, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE))
              for s in shapes]
    params[-1] = torch.nn.Parameter(params[-1].detach().to(memory_format=torch.channels_last))
    params.append(torch.nn.Parameter(torch.zeros(3, 4, dtype=dtype, device=DEVICE)))
    return params


def random_grads(params, gen):
    """Gradients of mixed scale, so some units are clipped and some kept at every step."""
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.02
        if p.dim() > 1:
            g = g * torch.linspace(0.05, 3.0, p.shape[0], dtype=torch.float64).view(-1, *([1] * (p.dim() - 1)))
        out.append(g.to(p.dtype).to(DEVICE))
    return out


def reference_run(params, groups_spec, grads_per_step, **kw):
    """torch.optim.SGD on float64 copies, timm's AGC applied to each clipped group first."""
    ref = [torch.nn.Parameter(p.detach().double().clone()) for p in params]
    groups = [{**opts, "params": [ref[i] for i in idx]} for idx, opts in groups_spec]
    clipped = [[ref[i] for i in idx] for idx, opts in groups_spec if opts.get("clipping", True)]
    clipped = [p for grp in clipped for p in grp]
    for opts_idx in groups:
        opts_idx.pop("clipping", None)
    opt = torch.optim.SGD(groups, **kw)
    for grads in grads_per_step:
        for p, g in zip(ref, grads):
            p.grad = g.double().clone()
        new = timm_adaptive_clip_grad([p.grad for p in clipped], clipped)
        for p, g in zip(clipped, new):
            p.grad.copy_(g)
        opt.step()
    return ref


def run_ours(params, groups_spec, grads_per_step, backend, **kw):
    groups = [{**opts, "params": [params[i] for i in idx]} for idx, opts in groups_spec]
    opt = SGD_AGC(groups, **kw)
    with nfk.use_backend(backend):
        for grads in grads_per_step:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    return opt


PAPER_GROUPS = [([0, 4, 6, 7], {"weight_decay": 5e-5}), ([1, 2, 3], {"weight_decay": 0.0}),
                ([5], {"weight_decay": 0.0, "clipping": False})]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [dict(momentum=0.9, nesterov=True), dict(momentum=0.9, nesterov=False), dict(momentum=0.0, nesterov=False)],
    ids=["nesterov", "heavy-ball", "no-momentum"],
)
def test_tracks_torch_sgd_with_timm_agc(backend, options):
    """float64, 25 steps, the paper's groups (decay on weights, none on gains/biases/SkipInit,
    no clipping on the classifier bias)."""
    params = make_params(torch.float64)
    gen = torch.Generator().manual_seed(1)
    steps = [random_grads(params, gen) for _ in range(25)]
    ref = reference_run(params, PAPER_GROUPS, steps, lr=0.4, **options)
    run_ours(params, PAPER_GROUPS, steps, backend, lr=0.4, **options)
    for i, (p, r) in enumerate(zip(params, ref)):
        assert_close(p, r, 1e-10 if backend == "torch" else 1e-6, f"param {i} {tuple(p.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("small_blocks", [False, True], ids=["blocks", "small-blocks"])
def test_fp32_few_steps(backend, small_blocks, monkeypatch):
    """With small blocks, the gains and the SkipInit scalar span several single-element programs,
    and the rows (whole 16-byte vectors or not) several row programs of several iterations."""
    if small_blocks:
        for knob, value in dict(ROW_TILE_BYTES=64, MIN_COLS=2, FLAT_BLOCK=4).items():
            monkeypatch.setattr(agc_ops, knob, value)
    params = make_params(torch.float32)
    gen = torch.Generator().manual_seed(2)
    steps = [random_grads(params, gen) for _ in range(4)]
    ref = reference_run(params, [(list(range(8)), {})], steps, lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-4)
    run_ours(params, [(list(range(8)), {})], steps, backend, lr=0.2, weight_decay=1e-4)
    for i, (p, r) in enumerate(zip(params, ref)):
        assert_close(p, r, 2e-5, f"param {i}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_one_launch_per_group(backend, count_launches):
    counter = count_launches(sgd_ops, "_sgd_agc_kernel") if backend == "triton" else None
    params = make_params(torch.float64)
    gen = torch.Generator().manual_seed(3)
    opt = run_ours(params, PAPER_GROUPS, [random_grads(params, gen) for _ in range(2)], backend, lr=0.1)
    if counter is not None:
        assert counter.count == 2 * len(PAPER_GROUPS)
    assert all("momentum_buffer" in opt.state[p] for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_and_interchange(backend):
    params = make_params(torch.float64)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    gen = torch.Generator().manual_seed(4)
    steps = [random_grads(params, gen) for _ in range(6)]
    opt = run_ours(params, PAPER_GROUPS, steps[:3], backend, lr=0.3)
    state = copy.deepcopy(opt.state_dict())
    # the twin takes the same first three steps, then resumes from the saved state
    run_ours(twin, PAPER_GROUPS, steps[:3], "torch", lr=0.3)
    resumed = SGD_AGC([{"params": [twin[i] for i in idx], **o} for idx, o in PAPER_GROUPS], lr=1.0)
    resumed.load_state_dict(state)
    assert resumed.param_groups[2]["clipping"] is False and resumed.param_groups[0]["lr"] == 0.3
    with nfk.use_backend(backend):
        for grads in steps[3:]:
            for p, q, g in zip(params, twin, grads):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            resumed.step()
    for p, q in zip(params, twin):
        assert_close(q, p, 1e-12)
    # torch.optim.SGD reads our momentum buffers, and we read its state dict
    sgd = torch.optim.SGD([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.3, momentum=0.9,
                          nesterov=True)
    flat = SGD_AGC(params, lr=0.3)
    flat_state = flat.state_dict()
    sgd.load_state_dict({"state": state["state"], "param_groups": [{**sgd.state_dict()["param_groups"][0]}]})
    flat.load_state_dict(sgd.state_dict())
    assert flat.param_groups[0]["clipping"] is True and flat.param_groups[0]["clip_factor"] == 0.01
    assert flat_state["param_groups"][0]["clipping"] is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_laid_out_unlike_param(backend):
    """A channels_last parameter with a contiguous gradient, and a strided 1-D parameter."""
    w = torch.nn.Parameter(torch.randn(4, 3, 2, 2, dtype=torch.float64, device=DEVICE).to(memory_format=torch.channels_last))
    v = torch.nn.Parameter(torch.randn(12, dtype=torch.float64, device=DEVICE)[::2])
    gen = torch.Generator().manual_seed(5)
    steps = [[(torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64) * 0.05).to(DEVICE).contiguous(),
              (torch.randn(6, generator=gen, dtype=torch.float64) * 0.05).to(DEVICE)] for _ in range(3)]
    ref = reference_run([w, v], [([0, 1], {})], steps, lr=0.5, momentum=0.9, nesterov=True)
    run_ours([w, v], [([0, 1], {})], steps, backend, lr=0.5)
    assert_close(w, ref[0], 1e-6)
    assert_close(v, ref[1], 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_1x1_conv_weight_whose_grad_differs_only_on_size_1_strides_is_fused(backend):
    """A channels_last 1x1 conv weight, strides (3, 1, 3, 3), with the gradient cuDNN and the CPU
    convolution give it, strides (3, 1, 1, 1): the same memory order, so the fused step takes it
    (it went to the torch path at every NFNet 1x1 conv, 29 of F0's weights in channels_last)."""
    w = torch.nn.Parameter(torch.randn(8, 3, 1, 1, dtype=torch.float64, device=DEVICE).to(memory_format=torch.channels_last))
    assert w.stride() == (3, 1, 3, 3)
    gen = torch.Generator().manual_seed(15)
    steps = [[(torch.randn(8, 3, 1, 1, generator=gen, dtype=torch.float64) * 0.05).to(DEVICE)] for _ in range(3)]
    assert steps[0][0].stride() == (3, 1, 1, 1)
    ref = reference_run([w], [([0], {})], steps, lr=0.5, momentum=0.9, nesterov=True)
    opt = run_ours([w], [([0], {})], steps, backend, lr=0.5)
    assert_close(w, ref[0], 1e-6)
    if backend != "torch":
        (plan,) = opt._plans.values()
        assert not plan.unfused and len(plan.launches) == 1


def test_nfnet_param_groups():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 4, 3)
            self.conv.gain = torch.nn.Parameter(torch.ones(4, 1, 1, 1))
            self.skipinit_gain = torch.nn.Parameter(torch.zeros(()))

    model = torch.nn.Module()
    model.block = Block()
    model.head = torch.nn.Module()
    model.head.fc = torch.nn.Linear(4, 3)
    groups = nfnet_param_groups(model, weight_decay=2e-5)
    by_key = {(g["weight_decay"] != 0, g["clipping"]): {id(p) for p in g["params"]} for g in groups}
    conv, fc = model.block.conv, model.head.fc
    assert by_key[(True, True)] == {id(conv.weight)}
    assert by_key[(False, True)] == {id(conv.bias), id(conv.gain), id(model.block.skipinit_gain)}
    assert by_key[(True, False)] == {id(fc.weight)} and by_key[(False, False)] == {id(fc.bias)}
    SGD_AGC(groups, lr=0.1)  # the groups are valid options


def test_bad_options():
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match="lr"):
        SGD_AGC([p], lr=-0.1)
    with pytest.raises(ValueError, match="nesterov"):
        SGD_AGC([p], lr=0.1, momentum=0.0)
    with pytest.raises(ValueError, match="clip_factor"):
        SGD_AGC([p], lr=0.1, clip_factor=-1.0)
    with pytest.raises(TypeError, match="clipping"):
        SGD_AGC([p], lr=0.1, clipping="no")
    with pytest.raises(ValueError, match=r"weight_decay \(param_groups\[1\]\)"):
        SGD_AGC([{"params": [p]}, {"params": [torch.nn.Parameter(torch.randn(2))], "weight_decay": -1.0}], lr=0.1)
    opt = SGD_AGC([p], lr=0.1)
    p.grad = torch.randn(3, 2).to_sparse()
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\]\.grad"):
        opt.step()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params_on_gpu(backend, dtype):
    if backend not in BACKENDS:
        pytest.skip("nfkernels._C not built")
    params = make_params(dtype)
    gen = torch.Generator().manual_seed(6)
    steps = [random_grads(params, gen) for _ in range(3)]
    ref = reference_run(params, [(list(range(8)), {})], steps, lr=0.1, momentum=0.9, nesterov=True)
    run_ours(params, [(list(range(8)), {})], steps, backend, lr=0.1)
    for p, r in zip(params, ref):
        assert_close(p, r, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture(backend):
    if backend not in BACKENDS:
        pytest.skip("nfkernels._C not built")
    params = make_params(torch.float32)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    gen = torch.Generator().manual_seed(7)
    steps = [random_grads(params, gen) for _ in range(4)]
    static = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static):
        p.grad = g
    opt = SGD_AGC(params, lr=0.1)
    with nfk.use_backend(backend):
        for g, s in zip(static, steps[0]):
            g.copy_(s)
        opt.step()  # eager first step: momentum buffers and row tables exist before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
    for grads in steps[1:]:
        for g, s in zip(static, grads):
            g.copy_(s)
        graph.replay()
    ref = reference_run(twin, [(list(range(8)), {})], steps, lr=0.1, momentum=0.9, nesterov=True)
    for p, r in zip(params, ref):
        assert_close(p, r, 2e-5)


def test_loading_sgd_state_with_unsupported_options_raises():
    p = torch.nn.Parameter(torch.randn(3, 2))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    opt = nfk.optim.SGD_AGC([torch.nn.Parameter(torch.randn(3, 2))], lr=0.1)
    with pytest.raises(ValueError, match="dampening=0.5"):
        opt.load_state_dict(sgd.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_dtype_differs_from_param_dtype(backend):
    """Parameters whose gradients have another dtype (``grad_dtype``), mixed with ones that do
    not, in one group: two momentum steps against float64 torch.optim.SGD + timm's AGC (issue 10,
    defect 2: gradients were read with the parameter's element type)."""
    from test_agc import GRAD_DTYPE_TOL, MIXED_DTYPES, _param_with_grad

    gen = torch.Generator().manual_seed(8)
    shapes = [(5, 3, 2, 2), (7, 9), (11,), ()]
    params = [_param_with_grad(shapes[i % len(shapes)], w_dtype, g_dtype, gen)
              for i, (w_dtype, g_dtype) in enumerate(MIXED_DTYPES)]
    steps = [[p.grad.clone() for p in params]]
    steps.append([(g.double() * 1.7).to(g.dtype) for g in steps[0]])
    ref = reference_run(params, [(list(range(len(params))), {})], steps, lr=0.3, momentum=0.9, nesterov=True,
                        weight_decay=1e-3)
    run_ours(params, [(list(range(len(params))), {})], steps, backend, lr=0.3, weight_decay=1e-3)
    for p, r, (w_dtype, g_dtype) in zip(params, ref, MIXED_DTYPES):
        assert p.dtype == w_dtype
        tol = max(GRAD_DTYPE_TOL[w_dtype], GRAD_DTYPE_TOL[g_dtype])
        assert_close(p, r, tol, f"param {w_dtype}, grad {g_dtype}")


def test_parameter_listed_twice_is_rejected():
    """Two programs would update the same memory (issue 10, defect 10)."""
    p, q = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))
    with pytest.warns(UserWarning, match="duplicate"), \
            pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\] is the same tensor as .*\[0\]"):
        SGD_AGC([p, q, p], lr=0.1)
    opt = SGD_AGC([q], lr=0.1)
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match=r"param_groups\[1\]"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


def test_invalid_group_added_later_is_not_kept():
    """add_param_group raises on a bad group and leaves the optimizer as it was."""
    p, q = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))
    opt = SGD_AGC([p], lr=0.1)
    with pytest.raises(ValueError, match=r"lr \(param_groups\[1\]\)"):
        opt.add_param_group({"params": [q], "lr": -1.0})
    assert len(opt.param_groups) == 1
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    before = q.detach().clone()
    opt.step()
    assert torch.equal(q.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_gradient_in_a_later_group_updates_nothing(backend):
    """Every group is validated before any is stepped (issue 10, defect 9's rule for SGD_AGC)."""
    params = make_params(torch.float64)
    gen = torch.Generator().manual_seed(9)
    for p, g in zip(params, random_grads(params, gen)):
        p.grad = g
    bad = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64, device=DEVICE))
    bad.grad = torch.randn(3, 2, dtype=torch.float64, device=DEVICE).to_sparse()
    opt = SGD_AGC([{"params": params}, {"params": [bad]}], lr=0.1)
    before = [p.detach().clone() for p in params]
    with nfk.use_backend(backend), pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\]\.grad"):
        opt.step()
    for p, old in zip(params, before):
        assert torch.equal(p.detach(), old)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_gradient_is_read_and_expanded_param_rejected(backend):
    """The gradient is only read, so a stride-0 view of it works; the parameter is written in
    place, so a stride-0 parameter is a ValueError naming it, before anything is written."""
    gen = torch.Generator().manual_seed(10)
    w = torch.nn.Parameter(torch.randn(4, 6, generator=gen, dtype=torch.float64).to(DEVICE))
    grad = (torch.randn(1, 6, generator=gen, dtype=torch.float64) * 0.05).to(DEVICE).expand(4, 6)
    ref = reference_run([w], [([0], {})], [[grad]], lr=0.5, momentum=0.9, nesterov=True)
    run_ours([w], [([0], {})], [[grad]], backend, lr=0.5)
    assert_close(w, ref[0], 1e-10 if backend == "torch" else 1e-6)
    fine = torch.nn.Parameter(torch.randn(3, dtype=torch.float64, device=DEVICE))
    fine.grad = torch.ones_like(fine)
    expanded = torch.nn.Parameter(torch.randn(1, 5, dtype=torch.float64, device=DEVICE).expand(3, 5))
    expanded.grad = torch.ones(3, 5, dtype=torch.float64, device=DEVICE)
    opt = SGD_AGC([fine, expanded], lr=0.1)
    before = fine.detach().clone()
    with nfk.use_backend(backend), pytest.raises(ValueError, match=r"\['params'\]\[1\] has elements that share memory"):
        opt.step()
    assert torch.equal(fine.detach(), before)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("set_to_none", [True, False], ids=["new-grads", "grads-in-place"])
def test_plan_built_once_and_steps_exact(backend, set_to_none, monkeypatch):
    """The step's plan and row tables are built on the first step only, whether the gradients stay
    in place (zero_grad(set_to_none=False)) or are new tensors every step (torch's default); with
    gradients in place not even the table of addresses is rebuilt. Every step stays exact."""
    built = []
    real = agc_ops.unit_table
    monkeypatch.setattr(agc_ops, "unit_table", lambda operands: built.append(1) or real(operands))
    params = make_params(torch.float64, seed=21)
    gen = torch.Generator().manual_seed(22)
    grads_per_step = [random_grads(params, gen) for _ in range(4)]
    expected = reference_run(params, PAPER_GROUPS, grads_per_step, lr=0.1, momentum=0.9, nesterov=True)
    opt = SGD_AGC([{**opts, "params": [params[i] for i in idx]} for idx, opts in PAPER_GROUPS],
                  lr=0.1, momentum=0.9, nesterov=True)
    bases = None
    with nfk.use_backend(backend):
        for step, grads in enumerate(grads_per_step):
            for p, g in zip(params, grads):
                if set_to_none or p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            opt.step()
            now = [launch.table.bases for plan in opt._plans.values() for launch in plan.launches]
            if step > 0 and not set_to_none:
                assert all(a is b for a, b in zip(now, bases))
            bases = now
    assert len(built) == len(PAPER_GROUPS)
    for p, ref in zip(params, expected):
        assert_close(p, ref, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_options_changed_between_steps(backend):
    """Momentum switched off and clipping toggled after the first step (a new plan), lr edited
    by a scheduler (read every step): the steps still match torch.optim.SGD with timm's AGC."""
    params = make_params(torch.float64, seed=23)[:3]
    gen = torch.Generator().manual_seed(24)
    grads = [random_grads(params, gen) for _ in range(3)]
    opt = SGD_AGC(params, lr=0.1, momentum=0.9, nesterov=False)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    settings = [dict(), dict(lr=0.05, clipping=False), dict(lr=0.02, momentum=0.0, clipping=True)]
    with nfk.use_backend(backend):
        for step, (step_grads, change) in enumerate(zip(grads, settings)):
            opt.param_groups[0].update(change)
            for key in ("lr", "momentum"):
                if key in change:
                    ref_opt.param_groups[0][key] = change[key]
            for p, r, g in zip(params, ref, step_grads):
                p.grad = g.clone()
                r.grad = g.clone()
            if opt.param_groups[0]["clipping"]:
                for r, g in zip(ref, timm_adaptive_clip_grad([r.grad for r in ref], ref)):
                    r.grad.copy_(g)
            opt.step()
            ref_opt.step()
            for p, r in zip(params, ref):
                assert_close(p, r, 1e-12, f"step {step}")


def test_state_has_no_entries_for_parameters_without_gradients():
    params = make_params(torch.float32)[:3]
    params[0].grad = torch.zeros_like(params[0])
    opt = SGD_AGC(params, lr=0.1)
    opt.step()
    opt.step()
    assert list(opt.state_dict()["state"]) == [0]
