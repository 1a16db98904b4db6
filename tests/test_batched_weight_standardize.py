"""Batched weight standardization (issue 12): many weights in one launch each way, against
independent float64 math; models standardizing all their convs together (one launch per direction)
and giving what the conv-by-conv path gives."""
import collections
import functools
import importlib
import math

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import nfkernels as nfk
from nfkernels.models import NFNetFeatures, TINY_CONFIG
from nfkernels.nn import WSConv2d, freeze_standardized_weights
from nfkernels.ops import _utils
from nfkernels.ops import weight_standardize as ws_op
from nfk_testing import DEVICE, assert_close, backends_for, nfnet_with_live_branches, rel_err, tolerance
from test_weight_standardize import reference  # float64 math from the formula (docs/design.md §5.1)

nfnet_module = importlib.import_module("nfkernels.models.nfnet")  # the package exports a function of that name
pytestmark = pytest.mark.skipif("triton" not in backends_for(("triton",)), reason="Triton cannot run here")
ops = torch.ops.nfkernels

INTERPRETER_BF16_TRUNCATION = 2.0**-7  # the CPU interpreter truncates fp32 to bf16 (nfk_strategies.py)

# (shape, gain, eps mode, gamma, channels_last): mixed fan-ins (27, 1153, 16, 1, 72, 36), conv and
# linear weights, with and without gains, both eps forms.
MIXED = [
    ((8, 3, 3, 3), True, "timm", 1.7, False),
    ((5, 1153), True, "deepmind", 1.0, False),
    ((16, 16, 1, 1), False, "timm", 2.0, False),
    ((4, 1, 1, 1), True, "deepmind", 0.5, False),
    ((6, 8, 3, 3), True, "timm", 1.2, False),
    ((7, 4, 3, 3), True, "deepmind", 0.8, True),
]


def make_case(spec, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    weights, gains, settings = [], [], []
    for shape, with_gain, mode, gamma, channels_last in spec:
        fan_in = math.prod(shape[1:])
        w = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in) + 0.3 * torch.randn(
            shape[0], *([1] * (len(shape) - 1)), generator=g, dtype=torch.float64)
        w = w.to(DEVICE, dtype)
        if channels_last:
            w = w.contiguous(memory_format=torch.channels_last)
        gain = (0.5 + torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g, dtype=torch.float64)).to(
            DEVICE, dtype) if with_gain else None
        weights.append(w.requires_grad_())
        gains.append(gain.requires_grad_() if gain is not None else None)
        settings.append((gamma, 1e-5 if mode == "timm" else 1e-4, mode))
    return weights, gains, settings


def run_batched(weights, gains, settings, out_dtype=None, seed=1):
    outs = ws_op.weight_standardize_batched(weights, gains, [s[0] for s in settings], [s[1] for s in settings],
                                            [s[2] == "deepmind" for s in settings], out_dtype)
    g = torch.Generator().manual_seed(seed)
    douts = [torch.randn(o.shape, generator=g).to(DEVICE, o.dtype) for o in outs]
    params = weights + [gn for gn in gains if gn is not None]
    grads = torch.autograd.grad(outs, params, douts)
    return outs, douts, grads


def run_reference(weights, gains, settings, douts):
    w64 = [w.detach().double().requires_grad_() for w in weights]
    g64 = [g.detach().double().requires_grad_() if g is not None else None for g in gains]
    outs = [reference(w, g, *s) for w, g, s in zip(w64, g64, settings)]
    grads = torch.autograd.grad(outs, w64 + [g for g in g64 if g is not None], [d.double() for d in douts])
    return outs, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixed_weights_match_float64(dtype):
    weights, gains, settings = make_case(MIXED, dtype, seed=0)
    outs, douts, grads = run_batched(weights, gains, settings)
    ref_outs, ref_grads = run_reference(weights, gains, settings, douts)
    tol = tolerance(dtype, "triton")
    for i, (out, ref, w) in enumerate(zip(outs, ref_outs, weights)):
        assert out.shape == w.shape and out.dtype == dtype and layout(out) == layout(w), i
        assert_close(out, ref, tol, f"forward {i}")
    params = weights + [g for g in gains if g is not None]
    for i, (got, want, p) in enumerate(zip(grads, ref_grads, params)):
        assert got.shape == p.shape and got.dtype == p.dtype, i
        assert_close(got, want, tol, f"gradient {i}")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, "out"])
def test_low_precision_within_twice_plain_rounding(out_dtype, weight_dtype):
    """fp32 weights written out in a low dtype (autocast), and low-precision weights themselves."""
    dtype = out_dtype if weight_dtype == "out" else weight_dtype
    weights, gains, settings = make_case(MIXED[:4], dtype, seed=2)
    outs, douts, grads = run_batched(weights, gains, settings, out_dtype=out_dtype)
    ref_outs, ref_grads = run_reference(weights, gains, settings, douts)
    extra = INTERPRETER_BF16_TRUNCATION if out_dtype == torch.bfloat16 and DEVICE.type == "cpu" else 0.0
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert out.dtype == out_dtype
        plain = rel_err(ref.to(out_dtype), ref)  # at least the error of rounding the exact result
        assert_close(out, ref, tolerance(out_dtype, "triton", plain) + extra, f"forward {i}")
    params = weights + [g for g in gains if g is not None]
    for i, (got, want, p) in enumerate(zip(grads, ref_grads, params)):
        assert got.dtype == p.dtype
        # dŴ arrives in the low dtype, exactly as the reference sees it; the math runs in fp32.
        plain = rel_err(want.to(dtype), want)
        assert_close(got, want, tolerance(dtype, "triton", plain if dtype != torch.float32 else None)
                     + (extra if dtype == torch.bfloat16 else 0.0), f"gradient {i}")


@pytest.mark.parametrize("max_block", [16, 32])
def test_rows_longer_than_one_block_are_streamed(monkeypatch, count_launches, max_block):
    monkeypatch.setattr(ws_op, "MAX_BLOCK", max_block)
    fwd = count_launches(ws_op, "_weight_standardize_fwd_kernel")
    bwd = count_launches(ws_op, "_weight_standardize_bwd_kernel")
    spec = [((3, 127), True, "timm", 1.0, False), ((2, 64), False, "deepmind", 1.3, False),
            ((4, 9), True, "deepmind", 1.0, False), ((2, 1153), True, "timm", 0.7, False)]
    weights, gains, settings = make_case(spec, torch.float64, seed=3)
    outs, douts, grads = run_batched(weights, gains, settings)
    ref_outs, ref_grads = run_reference(weights, gains, settings, douts)
    assert (fwd.count, bwd.count) == (1, 1)
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert_close(out, ref, 1e-6, f"forward {i}")
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        assert_close(got, want, 1e-6, f"gradient {i}")


def test_one_launch_each_way_and_cached_table(count_launches):
    fwd = count_launches(ws_op, "_weight_standardize_fwd_kernel")
    bwd = count_launches(ws_op, "_weight_standardize_bwd_kernel")
    weights, gains, settings = make_case(MIXED, torch.float32, seed=4)
    first, _, _ = run_batched(weights, gains, settings)
    cached = len(ws_op._table_cache)
    again, _, _ = run_batched(weights, gains, settings)
    assert (fwd.count, bwd.count) == (2, 2)
    assert len(ws_op._table_cache) == cached  # same weights, same table
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_non_dense_weights_and_gains_are_copied():
    """A weight without dense rows and a strided gain are read from copies: still right."""
    weights, gains, settings = make_case(MIXED[:3], torch.float64, seed=5)
    base = torch.randn(8, 6, 3, 3, dtype=torch.float64, device=DEVICE)
    weights[0] = base[:, ::2].requires_grad_()  # (8, 3, 3, 3), rows not dense
    gains[0] = torch.rand(16, 1, 1, 1, dtype=torch.float64, device=DEVICE)[::2].add(0.5).requires_grad_()
    outs, douts, grads = run_batched(weights, gains, settings)
    ref_outs, ref_grads = run_reference(weights, gains, settings, douts)
    for out, ref in zip(outs, ref_outs):
        assert_close(out, ref, 1e-6, "forward")
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, 1e-6, "gradient")


def test_opcheck_batched_ops():
    weights, gains, settings = make_case(MIXED[2:5], torch.float32, seed=6)
    present = [g for g in gains if g is not None]
    args = (weights, present, [g is not None for g in gains], [s[0] for s in settings], [s[1] for s in settings],
            [s[2] == "deepmind" for s in settings])
    torch.library.opcheck(ops.weight_standardize_batched_fwd, (*args, None))
    flat, mean, s0, q = ops.weight_standardize_batched_fwd(*args, torch.float16)
    detached = ([w.detach() for w in weights], [g.detach() for g in present], *args[2:])
    torch.library.opcheck(ops.weight_standardize_batched_bwd, (torch.randn_like(flat), *detached, mean, s0, q))


def test_no_autograd_zero_fills(monkeypatch):
    """Item 1: μ, s0 and q get no zero-filled gradients (nor anything else) in either backward."""
    monkeypatch.setattr(_utils, "POISON_OUTPUTS", False)  # poisoning fills outputs with NaN itself
    weights, gains, settings = make_case(MIXED[:3], torch.float32, seed=7)
    single = nfk.weight_standardize
    with nfk.use_backend("triton"):
        outs = [single(w, g, gamma=s[0], eps=s[1], eps_mode=s[2]) for w, g, s in zip(weights, gains, settings)]
        outs += ws_op.weight_standardize_batched(weights, gains, [s[0] for s in settings],
                                                 [s[1] for s in settings], [s[2] == "deepmind" for s in settings])
    loss = sum(o.sum() for o in outs)
    with torch.profiler.profile() as prof:
        loss.backward()
    names = {e.key for e in prof.key_averages()}  # (fill_ is backward()'s own ones_like seed)
    assert not names & {"aten::zeros", "aten::zeros_like", "aten::zero_"}, names


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="weights must not be empty"):
        ops.weight_standardize_batched_fwd([], [], [], [], [], [], None)
    with pytest.raises(TypeError, match="one batch takes one device and dtype"):
        ws_op.weight_standardize_batched([w, w.double()], [None, None], [1.0, 1.0], [1e-5, 1e-5], [False, False])
    with pytest.raises(ValueError, match="must have 4 elements"):
        ws_op.weight_standardize_batched([w], [torch.ones(3, device=DEVICE)], [1.0], [1e-5], [False])
    with pytest.raises(TypeError, match="it must be"):
        ws_op.weight_standardize_batched([w], [torch.ones(4, device=DEVICE).double()], [1.0], [1e-5], [False])
    with pytest.raises(ValueError, match="at least 2 dims and elements"):
        ws_op.weight_standardize_batched([w, torch.empty(0, 3, device=DEVICE)], [None, None], [1.0, 1.0],
                                         [1e-5, 1e-5], [False, False])
    with pytest.raises(ValueError, match=r"epss\[0\] must be > 0"):
        ws_op.weight_standardize_batched([w], [None], [1.0], [0.0], [False])
    with pytest.raises(ValueError, match="one entry per weight"):
        ws_op.weight_standardize_batched([w], [None], [1.0, 2.0], [1e-5], [False])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        nfk.nn.batch_weight_standardization("model")


# ----------------------------------------------------------------------------- models


# TINY_CONFIG narrowed further: the Triton interpreter's cost grows with the channel counts.
MICRO_CONFIG = replace(TINY_CONFIG, channels=(16, 16, 32, 32), stem_chs=16, group_size=8, num_features=32)


def micro_nfnet(dtype=torch.float32):
    return nfnet_with_live_branches(MICRO_CONFIG, dtype)


class WSLaunches:
    """Counts the weight-standardization kernel launches (batched or not), by wrapping ``launch``."""

    def __init__(self, monkeypatch):
        self.counts = collections.Counter()
        real = ws_op.launch

        def counted(kernel, grid, *args, **meta):
            name = getattr(kernel, "fn", kernel).__name__
            self.counts[("batched " if meta.get("BATCHED") else "") + name.removeprefix("_weight_standardize_")] += 1
            return real(kernel, grid, *args, **meta)

        monkeypatch.setattr(ws_op, "launch", counted)

    def take(self) -> dict:
        counts, self.counts = dict(self.counts), collections.Counter()
        return counts


def conv_by_conv(monkeypatch):
    """The per-conv path: models do not batch."""
    monkeypatch.setattr(nfnet_module, "begin_batched_standardization", lambda model: None)


def train_step(model, x):
    model.zero_grad(set_to_none=True)
    with nfk.use_backend("triton"):
        out = model(x)
        loss = sum(o.square().mean() for o in out) if isinstance(out, list) else F.cross_entropy(
            out, torch.arange(out.shape[0], device=DEVICE) % out.shape[1])
        loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def test_nfnet_one_launch_per_direction_equals_conv_by_conv(monkeypatch):
    model = micro_nfnet()
    n_convs = sum(isinstance(m, WSConv2d) for m in model.modules())
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    launches = WSLaunches(monkeypatch)
    out, grads = train_step(model, x)
    assert launches.take() == {"batched fwd_kernel": 1, "batched bwd_kernel": 1}
    conv_by_conv(monkeypatch)
    ref_out, ref_grads = train_step(model, x)
    assert launches.take() == {"fwd_kernel": n_convs, "bwd_kernel": n_convs}
    assert_close(out, ref_out, 1e-6, "logits")
    for name, g in ref_grads.items():
        assert_close(grads[name], g, 1e-5, name)


def test_nfnet_checkpointed_channels_last_float64(monkeypatch):
    """Checkpointed stages are recomputed in backward with the forward's batch (no launch of
    their own), channels_last weights keep their layout; equal to conv by conv without either."""
    model = micro_nfnet(torch.float64).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    model.set_grad_checkpointing()
    launches = WSLaunches(monkeypatch)
    out, grads = train_step(model, x)
    assert launches.take() == {"batched fwd_kernel": 1, "batched bwd_kernel": 1}
    model.set_grad_checkpointing(False)
    conv_by_conv(monkeypatch)
    ref_out, ref_grads = train_step(model, x)
    assert_close(out, ref_out, 1e-12, "logits")
    for name, g in ref_grads.items():
        assert_close(grads[name], g, 1e-12, name)
        assert layout(grads[name]) == layout(g), name


def layout(t):
    """The strides that matter (a dim of size 1 has any)."""
    return [stride for stride, size in zip(t.stride(), t.shape) if size > 1]


def test_features_only_autocast_eval_and_frozen(monkeypatch):
    launches = WSLaunches(monkeypatch)
    feats = NFNetFeatures(micro_nfnet(), out_indices=(1, 2))
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    out, _ = train_step(feats, x)
    assert launches.take() == {"batched fwd_kernel": 1, "batched bwd_kernel": 1}

    model = micro_nfnet()
    with nfk.use_backend("triton"):
        ref = model(x)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):  # Ŵ written in bf16 by the one launch
            low = model(x)
        assert launches.take() == {"batched fwd_kernel": 2}
        assert rel_err(low, ref) < 2e-2
        model.eval()
        with torch.no_grad():
            model(x)
            assert launches.take() == {"batched fwd_kernel": 1}
            freeze_standardized_weights(model)
            launches.take()
            assert torch.equal(model(x), model(x))
            assert launches.take() == {}  # frozen: no standardization at all


def test_converted_and_plain_models(monkeypatch):
    """convert() makes a model batch (through forward hooks); a lone WSConv2d and a model called
    conv by conv outside its forward keep their own launches."""
    launches = WSLaunches(monkeypatch)
    torch.manual_seed(0)
    net = torch.nn.Sequential(WSConv2d(3, 8, 3), torch.nn.GELU(), WSConv2d(8, 4, 1, eps_mode="deepmind"))
    x = torch.randn(2, 3, 9, 9, device=DEVICE)
    net.to(DEVICE)
    with nfk.use_backend("triton"):
        ref = net(x)
        ref_grads = torch.autograd.grad(ref.sum(), list(net.parameters()))
        assert launches.take() == {"fwd_kernel": 2, "bwd_kernel": 2}
        assert nfk.nn.batch_weight_standardization(net) is net
        nfk.nn.batch_weight_standardization(net)  # twice: no second pair of hooks
        out = net(x)
        grads = torch.autograd.grad(out.sum(), list(net.parameters()))
        assert launches.take() == {"batched fwd_kernel": 1, "batched bwd_kernel": 1}
        net[0](x)  # a conv called on its own
        assert launches.take() == {"fwd_kernel": 1}
    assert_close(out, ref, 1e-6, "output")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, 1e-5, "gradient")
    with nfk.use_backend("torch"):  # the reference backend: no kernel at all
        net(x).sum().backward()
    assert launches.take() == {}


def test_convert_installs_batching(monkeypatch):
    from test_convert import TimmStyleNet, randomize_

    model = randomize_(TimmStyleNet()).to(DEVICE)
    nfk.convert(model)
    launches = WSLaunches(monkeypatch)
    with nfk.use_backend("triton"):
        model(torch.randn(1, 3, 15, 17, device=DEVICE)).sum().backward()
    assert launches.take() == {"batched fwd_kernel": 1, "batched bwd_kernel": 1}
    model.grad_checkpointing = True  # timm's flag: its checkpoint_seq would recompute outside the batch
    with nfk.use_backend("triton"):
        model(torch.randn(1, 3, 15, 17, device=DEVICE))
    assert launches.take() == {"fwd_kernel": sum(isinstance(m, WSConv2d) for m in model.modules())}


def test_compiled_nfnet_standardizes_conv_by_conv():
    """torch.compile(fullgraph=True) traces the batched model's forward (the batch is skipped)."""
    torch._dynamo.reset()
    model = micro_nfnet(torch.float64)
    x = torch.randn(2, 3, 17, 19, dtype=torch.float64, device=DEVICE)
    with nfk.use_backend("triton"):
        ref = model(x)
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    assert_close(out, ref, 1e-10, "compiled logits")


def test_opt_out_for_blocks_checkpointed_from_outside(monkeypatch):
    """``model.batched_standardization = False``: conv by conv, so blocks checkpointed from outside
    (as checkpoint_wrapper does) recompute exactly what they saved; same results as batched."""
    from torch.utils.checkpoint import checkpoint

    model = micro_nfnet()
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    out, grads = train_step(model, x)
    for stage in model.stages:
        for block in stage:
            block.forward = functools.partial(
                lambda mod, fwd, inp: checkpoint(fwd, inp, use_reentrant=False), block, block.forward)
    model.batched_standardization = False
    launches = WSLaunches(monkeypatch)
    ref_out, ref_grads = train_step(model, x)
    n_convs = sum(isinstance(m, WSConv2d) for m in model.modules())
    counts = launches.take()
    assert set(counts) == {"fwd_kernel", "bwd_kernel"} and counts["bwd_kernel"] == n_convs
    assert counts["fwd_kernel"] > n_convs  # the blocks' convs again, in their recomputation
    assert_close(out, ref_out, 1e-6, "logits")
    for name, g in ref_grads.items():
        assert_close(grads[name], g, 1e-5, name)
