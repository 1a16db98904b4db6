"""se_gate_residual against independent float64 math, forward and backward, every backend."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import nfkernels as nfk
from nfkernels import _backend as nfk_backend
from nfkernels.ops import _utils as op_utils, se_gate as se_op
from nfk_testing import DEVICE, assert_close, backends_for, rel_err, tolerance

BACKENDS = backends_for(("torch", "triton", "cuda"))
CL = torch.channels_last

ALL = dict(bias=True, shortcut_bias=True, skip_gain=True, mask=True, fc1_bias=True, fc2_bias=True)
NONE = dict(bias=False, shortcut_bias=False, skip_gain=False, mask=False, fc1_bias=False, fc2_bias=False)
# name: (shape, rd or None for no SE, which optional arguments, channels_last, fc weights 2-D)
CASES = {
    "se_odd_nchw": ((2, 3, 5, 7), 2, ALL, False, False),
    "se_channels_last": ((3, 16, 7, 9), 5, ALL, True, False),
    "se_bare": ((3, 16, 7, 9), 3, NONE, False, False),
    "se_fc2_bias_only_cl": ((2, 6, 4, 4), 4, {**NONE, "fc2_bias": True}, True, True),
    "se_1x1_spatial": ((1, 8, 1, 1), 3, ALL, False, False),
    "se_1x1_spatial_cl": ((1, 8, 1, 1), 3, ALL, True, True),
    "no_se_all": ((2, 3, 5, 7), None, ALL, False, False),
    "no_se_bare_cl": ((3, 16, 7, 9), None, NONE, True, False),
    # The kernels form coef from the logits, mask and skip_gain: each present without the other.
    "se_mask_only": ((3, 5, 4, 3), 2, {**NONE, "mask": True, "fc1_bias": True}, False, False),
    "se_skip_only_cl": ((3, 5, 4, 3), 2, {**NONE, "skip_gain": True, "bias": True}, True, True),
    "no_se_mask_only_cl": ((3, 5, 4, 3), None, {**NONE, "mask": True, "shortcut_bias": True}, True, False),
    "no_se_skip_only": ((3, 5, 4, 3), None, {**NONE, "skip_gain": True}, False, False),
}
# ECA (timm EcaModule) in place of SE. name: (shape, kernel size k, which optional arguments,
# channels_last, weight (k,) rather than (1, 1, k), with a shortcut). H·W odd; k > C in two.
ECA_CASES = {
    "eca_k3_nchw": ((2, 7, 3, 5), 3, ALL, False, False, True),
    "eca_k5_channels_last_1d": ((3, 20, 3, 3), 5, ALL, True, True, True),
    "eca_k1_bare": ((2, 3, 5, 3), 1, NONE, False, False, True),
    "eca_k7_over_3_channels_cl": ((2, 3, 1, 3), 7, ALL, True, False, True),
    "eca_1_channel_no_shortcut": ((3, 1, 3, 5), 3, {**ALL, "shortcut_bias": False}, False, True, False),
    "eca_mask_skip_no_shortcut_cl": ((2, 20, 3, 3), 5, {**NONE, "mask": True, "skip_gain": True}, True, False,
                                     False),
}
# The attention of a test: (rd for SE, k for ECA), at most one of them.
ATTN = {"se": (3, None), "eca": (None, 3), "no_se": (None, None)}


def eca_logits(pooled, w):
    """z = conv1d of pooled (N, C) over channels with zero padding (k − 1) // 2, written as
    pooled @ Tᵀ with the Toeplitz matrix T[c, c + j − (k − 1) // 2] = w_j."""
    c, k = pooled.shape[1], w.numel()
    w, pad = w.reshape(k), (k - 1) // 2
    t = sum(w[j] * torch.diag(pooled.new_ones(c - abs(j - pad)), j - pad) for j in range(k) if abs(j - pad) < c)
    return pooled @ t.t()


def reference(h, shortcut, w1, b1, w2, b2, *, bias, shortcut_bias, skip_gain, mask, alpha, attn_gain,
              eca_weight=None):
    """Float64 math written from the formula, independent of the library."""
    n, c, hh, ww = h.shape
    hb = h + bias.reshape(1, c, 1, 1) if bias is not None else h
    scale = alpha * (skip_gain.reshape(()) if skip_gain is not None else 1.0)
    if mask is not None:
        scale = scale * mask.to(h.dtype).reshape(n, 1, 1, 1)
    if w1 is not None:
        pooled = hb.sum(dim=(2, 3)) / (hh * ww)
        pre = pooled @ w1.reshape(w1.shape[0], c).t()
        if b1 is not None:
            pre = pre + b1
        z = pre.clamp(min=0) @ w2.reshape(c, -1).t()
        if b2 is not None:
            z = z + b2
        scale = scale * attn_gain / (1 + torch.exp(-z)).reshape(n, c, 1, 1)
    if eca_weight is not None:
        z = eca_logits(hb.sum(dim=(2, 3)) / (hh * ww), eca_weight)
        scale = scale * attn_gain / (1 + torch.exp(-z)).reshape(n, c, 1, 1)
    out = scale * hb if shortcut is None else shortcut + scale * hb
    return out + shortcut_bias.reshape(1, c, 1, 1) if shortcut_bias is not None else out


def make_inputs(shape, rd, opts, dtype, channels_last=False, fc_2d=False, seed=0, eca_k=None, eca_1d=False):
    """(tensors, dout): tensors is a dict of the op's arguments; random, non-zero, fixed seed.
    SE with rd, ECA with eca_k (its weight (k,) with eca_1d, else (1, 1, k)), at most one."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]

    def rnd(*size, scale=1.0):
        return scale * torch.randn(*size, generator=g, dtype=torch.float64)

    t = {"h": rnd(*shape) + 0.5, "shortcut": rnd(*shape)}
    if rd is not None:
        t["fc1_weight"] = rnd(rd, c, scale=1 / math.sqrt(c)) if fc_2d else rnd(rd, c, 1, 1, scale=1 / math.sqrt(c))
        t["fc2_weight"] = rnd(c, rd, scale=1 / math.sqrt(rd)) if fc_2d else rnd(c, rd, 1, 1, scale=1 / math.sqrt(rd))
        t["fc1_bias"] = rnd(rd, scale=0.5) if opts["fc1_bias"] else None
        t["fc2_bias"] = rnd(c, scale=0.5) if opts["fc2_bias"] else None
    if eca_k is not None:
        t["eca_weight"] = rnd(eca_k) if eca_1d else rnd(1, 1, eca_k)
    t["bias"] = rnd(c, scale=0.5) if opts["bias"] else None
    t["shortcut_bias"] = rnd(c) if opts["shortcut_bias"] else None
    t["skip_gain"] = 0.5 + torch.rand((), generator=g, dtype=torch.float64) if opts["skip_gain"] else None
    dout = rnd(*shape)
    t = {k: (v.to(DEVICE, dtype) if v is not None else None) for k, v in t.items()}
    if channels_last:
        t["h"], t["shortcut"] = t["h"].contiguous(memory_format=CL), t["shortcut"].contiguous(memory_format=CL)
        dout = dout.contiguous(memory_format=CL)
    # Stochastic depth with keep_prob 0.8: dropped samples are 0, kept ones 1/0.8; float32 always.
    t["mask"] = (torch.tensor([1.25, 0.0, 1.25][:n] if n > 1 else [1.25], dtype=torch.float32, device=DEVICE)
                 if opts["mask"] else None)
    return t, dout.to(DEVICE, dtype)


DIFFERENTIABLE = ("h", "shortcut", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "eca_weight", "bias",
                  "shortcut_bias", "skip_gain")


def call(fn, t, **kw):
    return fn(t["h"], t["shortcut"], t.get("fc1_weight"), t.get("fc1_bias"), t.get("fc2_weight"), t.get("fc2_bias"),
              bias=t["bias"], shortcut_bias=t["shortcut_bias"], skip_gain=t["skip_gain"], mask=t["mask"],
              eca_weight=t.get("eca_weight"), **kw)


def leaves(t, cast=None, requires=DIFFERENTIABLE):
    """Detached copies (optionally cast) of the tensors, with requires_grad on the named ones."""
    out = {}
    for k, v in t.items():
        if v is not None:
            v = v.detach().clone() if cast is None else v.detach().to(cast)
            v.requires_grad_(k in requires)
        out[k] = v
    return out


def grads(t, out, dout):
    out.backward(dout)
    return {k: t[k].grad for k in DIFFERENTIABLE if t.get(k) is not None and t[k].requires_grad}


def run_and_grad(t, dout, backend, requires=DIFFERENTIABLE, **kw):
    t = leaves(t, requires=requires)
    with nfk.use_backend(backend):
        out = call(nfk.se_gate_residual, t, **kw)
    return out, grads(t, out, dout)


def reference_and_grad(t, dout, alpha=0.2, attn_gain=2.0):
    t = leaves(t, cast=torch.float64)
    out = call(lambda *a, **k: reference(*a, **k, alpha=alpha, attn_gain=attn_gain), t)
    return out, grads(t, out, dout.double())


def plain_torch_in_dtype(t, dout):
    """The same formula computed by plain PyTorch ops without upcasting, for the bf16/fp16 bound."""
    t = leaves(t)
    out = call(lambda *a, **k: reference(*a, **k, alpha=0.2, attn_gain=2.0), t)
    return out, grads(t, out, dout)


def assert_all_close(got, want, tol):
    out, g = got
    ref, ref_g = want
    assert_close(out, ref, tol, "forward")
    assert set(g) == set(ref_g)
    for k in ref_g:
        assert_close(g[k], ref_g[k], tol, f"d{k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_backward_matches_float64(backend, case, dtype):
    shape, rd, opts, channels_last, fc_2d = CASES[case]
    t, dout = make_inputs(shape, rd, opts, dtype, channels_last, fc_2d, seed=sum(map(ord, case)))
    out, g = run_and_grad(t, dout, backend)
    assert out.dtype == dtype and out.shape == shape
    if channels_last:
        assert out.is_contiguous(memory_format=CL) and g["h"].is_contiguous(memory_format=CL)
    else:
        assert out.is_contiguous() and g["h"].is_contiguous()
    for k, v in g.items():
        assert v.shape == t[k].shape and v.dtype == dtype, k
    assert_all_close((out, g), reference_and_grad(t, dout), tolerance(dtype, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ECA_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eca_forward_backward_matches_float64(backend, case, dtype):
    """ECA (timm EcaModule: conv1d over the pooled channels, zero padding) in place of SE, every
    gradient against float64 math (the conv as a Toeplitz matrix product)."""
    shape, k, opts, channels_last, weight_1d, with_shortcut = ECA_CASES[case]
    t, dout = make_inputs(shape, None, opts, dtype, channels_last, seed=sum(map(ord, case)), eca_k=k,
                          eca_1d=weight_1d)
    if not with_shortcut:
        t["shortcut"] = None
    out, g = run_and_grad(t, dout, backend)
    assert out.dtype == dtype and out.shape == shape
    assert out.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    assert g["h"].is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    assert set(g) == {k for k in DIFFERENTIABLE if t.get(k) is not None} and "eca_weight" in g
    for name, v in g.items():
        assert v.shape == t[name].shape and v.dtype == dtype, name
    assert_all_close((out, g), reference_and_grad(t, dout), tolerance(dtype, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn", ["se", "eca"])
def test_low_precision_within_twice_plain_torch(backend, dtype, attn):
    rd, eca_k = (4, None) if attn == "se" else (None, 5)
    t, dout = make_inputs((2, 12, 5, 6), rd, ALL, dtype, channels_last=True, seed=3, eca_k=eca_k)
    out, g = run_and_grad(t, dout, backend)
    ref, ref_g = reference_and_grad(t, dout)
    plain, plain_g = plain_torch_in_dtype(t, dout)
    assert out.dtype == dtype and all(v.dtype == dtype for v in g.values())
    assert_close(out, ref, tolerance(dtype, backend, rel_err(plain, ref)), "forward")
    for k in ref_g:
        assert_close(g[k], ref_g[k], tolerance(dtype, backend, rel_err(plain_g[k], ref_g[k])), f"d{k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eca_float32_weight_next_to_bfloat16_h(backend):
    """The autocast case: a float32 eca_weight (the module's parameter) next to bfloat16
    activations is used as is, and its gradient comes back in float32; no worse than the same
    call with the weight rounded to bfloat16 is to plain bfloat16 PyTorch's bound."""
    t, dout = make_inputs((2, 9, 3, 5), None, ALL, torch.bfloat16, seed=4, eca_k=3)
    t["eca_weight"] = t["eca_weight"].float()
    out, g = run_and_grad(t, dout, backend)
    assert out.dtype == torch.bfloat16 and g["eca_weight"].dtype == torch.float32
    assert all(v.dtype == torch.bfloat16 for k, v in g.items() if k != "eca_weight")
    ref, ref_g = reference_and_grad(t, dout)
    t["eca_weight"] = t["eca_weight"].bfloat16()
    plain, plain_g = plain_torch_in_dtype(t, dout)
    assert_close(out, ref, tolerance(torch.bfloat16, backend, rel_err(plain, ref)), "forward")
    for k in ref_g:
        assert_close(g[k], ref_g[k], tolerance(torch.bfloat16, backend, rel_err(plain_g[k], ref_g[k])), f"d{k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_cl", [False, True])
def test_shortcut_and_grad_in_other_layout(backend, h_cl):
    t, dout = make_inputs((2, 6, 5, 3), 3, ALL, torch.float64, channels_last=h_cl, seed=5)
    other = torch.contiguous_format if h_cl else CL
    t["shortcut"] = t["shortcut"].contiguous(memory_format=other)
    dout = dout.contiguous(memory_format=other)
    out, g = run_and_grad(t, dout, backend)
    h_format = CL if h_cl else torch.contiguous_format
    assert out.is_contiguous(memory_format=h_format) and g["h"].is_contiguous(memory_format=h_format)
    assert_all_close((out, g), reference_and_grad(t, dout), tolerance(torch.float64, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_h(backend):
    t, dout = make_inputs((2, 12, 5, 6), 3, ALL, torch.float64, seed=7)
    t["fc1_weight"] = t["fc1_weight"][:, ::2]
    t["fc2_weight"] = t["fc2_weight"][::2]
    for k in ("fc2_bias", "bias", "shortcut_bias"):
        t[k] = t[k][::2]  # strided per-channel parameters are read with their strides
    t["h"] = t["h"][:, ::2]  # neither layout: the op copies, the result is still right
    t["shortcut"] = t["shortcut"][:, 1::2].transpose(2, 3).contiguous().transpose(2, 3)
    dout = dout[:, ::2]
    out, g = run_and_grad(t, dout, backend)
    assert_all_close((out, g), reference_and_grad(t, dout), tolerance(torch.float64, backend))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rd, split", [(5, False), (None, False), (5, True)], ids=["whole_hw", "no_se", "split_hw"])
def test_tiles_smaller_than_the_tensor(monkeypatch, channels_last, rd, split):
    """Channel blocks, HW loops and partial tiles: the masks and the loops over HW; with
    split_hw the reductions also split HW into several splits, the last one partial."""
    monkeypatch.setattr(se_op, "REDUCE_TILE", 16)
    monkeypatch.setattr(se_op, "STREAM_TILE", 8)
    monkeypatch.setattr(se_op, "MAX_BLOCK_C", 4)
    monkeypatch.setattr(se_op, "FINISH_BLOCK", 8)
    monkeypatch.setattr(se_op, "MIN_SPLIT_HW", 5 if split else 10**6)
    monkeypatch.setattr(se_op, "DEFAULT_SMS", 50)  # a smaller GPU: fewer, longer splits, a faster test
    plan = se_op._reduce_plan(3, 10, 63, not channels_last, se_op.PROGRAMS_PER_SM * se_op.DEFAULT_SMS)
    assert (plan.splits > 2 and 63 % plan.split_hw != 0) if split else plan.splits == 1
    t, dout = make_inputs((3, 10, 7, 9), rd, ALL, torch.float64, channels_last, seed=11)
    got = run_and_grad(t, dout, "triton")
    assert_all_close(got, reference_and_grad(t, dout), 1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reductions_split_hw_for_small_batches(backend, channels_last, dtype):
    """Few samples × channels, a large map: both reductions split HW (default plans: Triton's
    _reduce_plan, CUDA's se_reduce_splits), add the splits up in a later kernel, and match float64
    math, forward and backward."""
    shape = (2, 8, 16, 16)
    t, dout = make_inputs(shape, 3, ALL, dtype, channels_last, seed=14)
    h = t["h"]
    splits = se_op._triton_plan(h)[0].splits if backend == "triton" else se_op._cuda_plan(h)[1]
    assert splits > 1
    got = run_and_grad(t, dout, backend)
    assert_all_close(got, reference_and_grad(t, dout), tolerance(dtype, backend))


# NFNet-F0's SE shapes at batch 32 (block outputs: channels, H·W) and an H100's SMs.
F0_SE = [(256, 48 * 48), (512, 24 * 24), (1536, 12 * 12), (1536, 6 * 6)]
H100_SMS = 132


def cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_reduction_plans_fill_an_h100_at_f0_shapes(channels_last):
    """Issue 13: at batch 32 every Triton HW reduction runs at least 2 programs per SM, keeps at
    least 90% of its tiles' lanes busy, and splits HW only where batch × channel blocks alone
    fall short (channels_last stages 0 and 1)."""
    for c, hw in F0_SE:
        plan = se_op._reduce_plan(32, c, hw, not channels_last, 2 * H100_SMS)
        programs = plan.grid[0] * plan.grid[1]
        busy = hw / (cdiv(hw, plan.block_hw) * plan.block_hw) * c / (cdiv(c, plan.block_c) * plan.block_c)
        assert programs >= 2 * H100_SMS and busy >= 0.9, (c, hw, plan)
        assert plan.split_hw % plan.block_hw == 0 and plan.splits == cdiv(hw, plan.split_hw)
        assert (plan.splits > 1) == (32 * cdiv(c, plan.block_c) < 2 * H100_SMS), (c, hw, plan)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_stream_tiles_keep_lanes_busy_at_f0_shapes(channels_last):
    """Issue 13: the Triton streaming kernels' tiles (_blocks) keep at least 90% of their lanes
    busy at F0's SE shapes, within STREAM_TILE, and in NCHW span at least MIN_ROW_RUN positions."""
    for c, hw in F0_SE:
        block_c, block_hw = se_op._blocks(c, hw, not channels_last, se_op.STREAM_TILE)
        busy = hw / (cdiv(hw, block_hw) * block_hw) * c / (cdiv(c, block_c) * block_c)
        assert busy >= 0.9 and block_c * block_hw <= se_op.STREAM_TILE, (c, hw, block_c, block_hw)
        assert channels_last or block_hw >= se_op.MIN_ROW_RUN, (c, hw, block_c, block_hw)


@pytest.mark.skipif(nfk_backend.cuda_extension() is None, reason="nfkernels._C is not built")
def test_cuda_reductions_split_where_blocks_are_few():
    """CUDA's plan (csrc/se_gate.cu plan_reduce), F0 at batch 32 on an H100: channels_last splits
    HW where batch × column tiles give fewer than 2 blocks per SM, NCHW's row bands never do; no
    split where one block is enough."""
    splits = nfk_backend.cuda_extension().se_reduce_splits
    for dtype in ("bfloat16", "float32"):
        assert [splits(32, c, hw, False, dtype, 2 * H100_SMS) for c, hw in F0_SE] == [1, 1, 1, 1]
    assert [splits(32, c, hw, True, "bfloat16", 2 * H100_SMS) for c, hw in F0_SE] == [9, 5, 2, 1]
    assert [splits(32, c, hw, True, "float32", 2 * H100_SMS) for c, hw in F0_SE] == [5, 3, 1, 1]
    assert splits(32, 256, 2304, True, "bfloat16", 1) == 1


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("attn", list(ATTN))
@pytest.mark.parametrize("split", [False, True], ids=["whole_hw", "split_hw"])
def test_channel_sums_loop_over_samples(monkeypatch, attn, split):
    """The per-channel sums over samples (and over hidden units for db1; none with ECA) in
    several blocks, the last one partial, adding S1 and S2 over one or several splits of HW."""
    monkeypatch.setattr(se_op, "SMALL_BLOCK_C", 2)
    monkeypatch.setattr(se_op, "SUMS_TILE", 4)
    monkeypatch.setattr(se_op, "MIN_SPLIT_HW", 2 if split else 10**6)
    rd, eca_k = ATTN[attn]
    t, dout = make_inputs((5, 3, 2, 3), 5 if rd else None, ALL, torch.float64, seed=12, eca_k=eca_k)
    t["mask"] = torch.tensor([1.25, 0.0, 1.25, 1.25, 0.5], dtype=torch.float32, device=DEVICE)
    got = run_and_grad(t, dout, "triton")
    assert_all_close(got, reference_and_grad(t, dout), 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_skip_gain_still_gets_its_gradient(backend):
    """SkipInit starts at 0: the gradient of the gain must not come from dividing by it."""
    t, dout = make_inputs((2, 6, 4, 5), 3, ALL, torch.float64, seed=13)
    t["skip_gain"] = torch.zeros((), dtype=torch.float64, device=DEVICE)
    out, g = run_and_grad(t, dout, backend)
    ref, ref_g = reference_and_grad(t, dout)
    assert ref_g["skip_gain"].abs() > 0
    assert_all_close((out, g), (ref, ref_g), tolerance(torch.float64, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires", [("h",), ("shortcut",), ("skip_gain",), ("fc2_bias", "bias")])
def test_only_some_inputs_require_grad(backend, requires):
    t, dout = make_inputs((2, 6, 3, 5), 3, ALL, torch.float64, channels_last=True, seed=17)
    out, g = run_and_grad(t, dout, backend, requires=requires)
    ref, ref_g = reference_and_grad(t, dout)
    assert set(g) == set(requires)
    tol = tolerance(torch.float64, backend)
    assert_close(out, ref, tol, "forward")
    for k in requires:
        assert_close(g[k], ref_g[k], tol, f"d{k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_and_attn_gain(backend):
    t, dout = make_inputs((2, 6, 3, 3), 3, ALL, torch.float64, seed=19)
    got = run_and_grad(t, dout, backend, alpha=0.7, attn_gain=1.3)
    assert_all_close(got, reference_and_grad(t, dout, alpha=0.7, attn_gain=1.3), tolerance(torch.float64, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_path(backend):
    t, _ = make_inputs((2, 8, 3, 4), 3, ALL, torch.float32, channels_last=True, seed=23)
    with torch.no_grad(), nfk.use_backend(backend):
        out = call(nfk.se_gate_residual, leaves(t))
    assert not out.requires_grad and out.is_contiguous(memory_format=CL)
    assert_close(out, reference_and_grad(t, torch.zeros(out.shape))[0], 2e-5, "forward")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    t, dout = make_inputs((2, 6, 3, 3), 3, NONE, torch.float32, seed=29)
    t["h"], t["shortcut"], dout = t["h"][:0], t["shortcut"][:0], dout[:0]
    out, g = run_and_grad(t, dout, backend)
    assert out.shape == (0, 6, 3, 3)
    assert g["h"].shape == (0, 6, 3, 3) and torch.equal(g["fc1_weight"], torch.zeros_like(t["fc1_weight"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 6, 0, 3), (2, 6, 3, 0), (1, 6, 0, 0)], ids=str)
@pytest.mark.parametrize("attn", list(ATTN))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_empty_spatial(backend, shape, attn, channels_last):
    """H·W = 0 (issue 10, item 7): the output has no elements, so no parameter influences the
    loss and every gradient is exactly 0 (the pooled mean over an empty map must not turn the
    SE or ECA weights' gradients into 0·NaN = NaN)."""
    rd, eca_k = ATTN[attn]
    t, dout = make_inputs(shape, rd, ALL, torch.float32, channels_last, seed=30, eca_k=eca_k)
    out, g = run_and_grad(t, dout, backend)
    assert out.shape == shape and out.dtype == torch.float32
    assert set(g) == {k for k in DIFFERENTIABLE if t.get(k) is not None}
    for k, grad in g.items():
        assert grad.shape == t[k].shape and grad.dtype == t[k].dtype, k
        assert torch.equal(grad, torch.zeros_like(t[k])), f"d{k} is not 0: {grad.flatten()[:4].tolist()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 3, 3), (2, 0, 3, 3)], ids=str)
def test_eca_empty_batch_or_channels(backend, shape):
    """No samples or no channels (k > C = 0 included): the torch path, an empty output and
    zero gradients, eca_weight's too."""
    t, dout = make_inputs(shape, None, ALL, torch.float32, seed=32, eca_k=3)
    t["mask"] = None
    out, g = run_and_grad(t, dout, backend)
    assert out.shape == shape
    assert g["eca_weight"].shape == (1, 1, 3) and torch.equal(g["eca_weight"], torch.zeros_like(t["eca_weight"]))
    assert g["h"].shape == shape


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("attn", list(ATTN))
@pytest.mark.parametrize("split", [False, True], ids=["whole_hw", "split_hw"])
def test_triton_kernels_are_what_runs(count_launches, monkeypatch, attn, split):
    names = ("_se_pool_fwd_kernel", "_se_pool_finish_kernel", "_se_gate_fwd_kernel", "_se_gate_bwd_reduce_kernel",
             "_se_gate_bwd_dz_kernel", "_se_gate_bwd_kernel", "_se_gate_bwd_sums_kernel")
    counters = [count_launches(se_op, name) for name in names]
    monkeypatch.setattr(se_op, "MIN_SPLIT_HW", 2 if split else 10**6)
    rd, eca_k = ATTN[attn]
    t, dout = make_inputs((2, 6, 3, 3), rd, ALL, torch.float32, seed=31, eca_k=eca_k)
    run_and_grad(t, dout, "triton")
    se = attn != "no_se"  # no attention: nothing to pool, no dz; ECA's kernels are SE's
    expected = [int(se), int(se and split), 1, 1, int(se and split), 1, 1]
    assert [c.count for c in counters] == expected
    run_and_grad(t, dout, "torch")
    assert [c.count for c in counters] == expected


class LaunchCounter(TorchDispatchMode):
    """Records what would launch a device kernel: every aten op but views (unless they copied)
    and allocations, and every Triton launch (through ``se_op.launch``; the interpreter's own
    tensor bookkeeping during a launch is not counted). The registered ops run their bodies
    under the counter, so the ops inside them count, not the registered op itself."""

    ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                   torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default}
    BODIES = {"se_gate_residual_fwd": se_op._se_gate_residual_fwd, "se_gate_residual_bwd": se_op._se_gate_residual_bwd}

    def __init__(self, monkeypatch):
        super().__init__()
        self.launches = []
        self._in_kernel = False
        launch = se_op.launch

        def counted(kernel, grid, *args, **meta):
            self.launches.append(kernel.__name__)
            self._in_kernel = True
            try:
                launch(kernel, grid, *args, **meta)
            finally:
                self._in_kernel = False

        monkeypatch.setattr(se_op, "launch", counted)
        # Poisoning fills every output with NaN: a launch of the tests' own making.
        monkeypatch.setattr(op_utils, "POISON_OUTPUTS", False)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "nfkernels":
            with self:
                return self.BODIES[func._opname](*args, **kwargs)
        out = func(*args, **kwargs)
        # Inside the ops, composite ops that may alias (to, reshape, contiguous) arrive undecomposed:
        # they launch when they copy.
        copied = func.is_view and out.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr()
        if not self._in_kernel and func not in self.ALLOCATIONS and (copied or not func.is_view):
            self.launches.append(str(func))
        return out

    def take(self):
        launches, self.launches = self.launches, []
        return launches


# (attention, every optional argument) -> the most launches of the forward, of the backward
# (fp32), HW split in the reductions: around the pooling (+ finish), gate, backward reduction
# (+ dz's finish), backward streaming and per-channel sums kernels, dk's sum and, with SE, the
# MLP's matmuls (fc1 with its relu when it has a bias) and relu's backward; with ECA the conv's
# pad, product and sum, and in the backward w reversed and a pad, product and sum for each of dp
# and dw. Unsplit, one fewer each way with attention.
MAX_LAUNCHES = {("se", True): (5, 10), ("se", False): (6, 9), ("eca", True): (6, 12), ("eca", False): (6, 11),
                ("no_se", True): (1, 4), ("no_se", False): (1, 3)}


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("attn, full", list(MAX_LAUNCHES), ids=str)
@pytest.mark.parametrize("split", [False, True], ids=["whole_hw", "split_hw"])
def test_launches_per_block(monkeypatch, attn, full, split):
    """One SE (or ECA) block's forward and backward in a few launches: the gate's scalars are
    formed inside the kernels, the splits of HW are added up in kernels that run anyway where
    they can, and nothing is zero-filled for the gradients of pool, hidden and logits, which
    nobody asks for (materialize_grads off)."""
    monkeypatch.setattr(se_op, "MIN_SPLIT_HW", 2 if split else 10**6)
    rd, eca_k = ATTN[attn]
    t, dout = make_inputs((2, 6, 3, 3), rd, ALL if full else NONE, torch.float32, seed=43, eca_k=eca_k)
    if not full:
        t["shortcut"] = None
    t = leaves(t)
    inputs = [t[k] for k in DIFFERENTIABLE if t.get(k) is not None]
    counter = LaunchCounter(monkeypatch)
    with nfk.use_backend("triton"), counter:
        out = call(nfk.se_gate_residual, t)
        forward = counter.take()
        got = torch.autograd.grad(out, inputs, dout)
        backward = counter.take()
    max_forward, max_backward = MAX_LAUNCHES[attn, full]
    if attn != "no_se" and not split:
        max_forward, max_backward = max_forward - 1, max_backward - 1
    assert len(forward) <= max_forward, forward
    assert len(backward) <= max_backward, backward
    assert not any("zero" in op or "fill" in op for op in backward), backward
    _, want = reference_and_grad(t, dout)
    for k, g in zip([k for k in DIFFERENTIABLE if t.get(k) is not None], got):
        assert_close(g, want[k], tolerance(torch.float32, "triton"), f"d{k}")


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
def test_backward_skips_what_nobody_asked_for(monkeypatch):
    """Only the shortcut wants a gradient: it is dout itself, and nothing launches. Without a
    gradient of out (materialize_grads off gives None) no gradient flows at all."""
    t, dout = make_inputs((2, 6, 3, 3), 3, ALL, torch.float32, seed=47)
    t = leaves(t, requires=("shortcut",))
    counter = LaunchCounter(monkeypatch)
    with nfk.use_backend("triton"), counter:
        out = call(nfk.se_gate_residual, t)
        counter.take()
        (dshortcut,) = torch.autograd.grad(out, [t["shortcut"]], dout)
        assert counter.take() == []
    assert torch.equal(dshortcut, dout)
    backward = se_op._backward_through(se_op.se_gate_residual_bwd)
    assert backward(None, None, None, None, None) == (None,) * 13


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_timm_normfreeblock_tail(backend):
    """timm NormFreeBlock.forward's tail, written literally (conv3 -> SEModule ×attn_gain ->
    drop_path -> ×skipinit_gain -> ×alpha + shortcut), against the fused op fed the conv
    outputs without their biases; gradients flow back into the convs' parameters and input."""
    g = torch.Generator().manual_seed(37)

    def rnd(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_(True)

    n, cin, c, rd = 4, 5, 8, 3
    x = rnd(n, cin, 6, 7)
    conv3_w, conv3_b = rnd(c, cin, 1, 1, scale=0.5), rnd(c, scale=0.3)
    down_w, down_b = rnd(c, cin, 1, 1, scale=0.5), rnd(c, scale=0.3)
    fc1_w, fc1_b = rnd(rd, c, 1, 1, scale=0.4), rnd(rd)
    fc2_w, fc2_b = rnd(c, rd, 1, 1, scale=0.5), rnd(c)
    skipinit_gain = torch.tensor(0.6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    params = (x, conv3_w, conv3_b, down_w, down_b, fc1_w, fc1_b, fc2_w, fc2_b, skipinit_gain)
    keep_prob, alpha, attn_gain = 0.75, 0.2, 2.0
    random_tensor = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64, device=DEVICE).view(n, 1, 1, 1)
    dout = torch.randn(n, c, 6, 7, generator=g, dtype=torch.float64).to(DEVICE)

    # timm: shortcut = self.downsample(x); out = self.conv3(out); out = self.attn_gain * self.attn_last(out)
    shortcut = F.conv2d(x, down_w, down_b)
    out = F.conv2d(x, conv3_w, conv3_b)
    x_se = out.mean((2, 3), keepdim=True)
    x_se = F.conv2d(x_se, fc1_w, fc1_b)
    x_se = F.relu(x_se)
    x_se = F.conv2d(x_se, fc2_w, fc2_b)
    out = attn_gain * (out * x_se.sigmoid())
    out = out.div(keep_prob) * random_tensor  # timm drop_path with scale_by_keep
    out = out * skipinit_gain
    want = out * alpha + shortcut
    want_grads = torch.autograd.grad(want, params, dout)

    with nfk.use_backend(backend):
        got = nfk.se_gate_residual(
            F.conv2d(x, conv3_w), F.conv2d(x, down_w), fc1_w, fc1_b, fc2_w, fc2_b, bias=conv3_b,
            shortcut_bias=down_b, skip_gain=skipinit_gain, mask=(random_tensor / keep_prob).view(n),
            alpha=alpha, attn_gain=attn_gain)
    got_grads = torch.autograd.grad(got, params, dout)
    tol = tolerance(torch.float64, backend)
    assert_close(got, want, tol, "forward")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close(a, b, tol, f"grad of parameter {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_timm_eca_normfreeblock_tail(backend):
    """timm's EcaModule (non-mlp form, as in eca_nfnet_l* and nf_ecaresnet*) written literally
    (mean -> conv1d over channels -> sigmoid) in NormFreeBlock's tail, against the fused op fed
    the conv outputs without their biases; gradients flow back into the convs, the ECA weight
    (an nn.Conv1d(1, 1, 5, bias=False) weight: k = 5 > C = 4) and the input."""
    g = torch.Generator().manual_seed(38)

    def rnd(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_(True)

    n, cin, c, k = 3, 5, 4, 5
    x = rnd(n, cin, 5, 3)
    conv3_w, conv3_b = rnd(c, cin, 1, 1, scale=0.5), rnd(c, scale=0.3)
    down_w, down_b = rnd(c, cin, 1, 1, scale=0.5), rnd(c, scale=0.3)
    eca_w = rnd(1, 1, k, scale=0.7)
    skipinit_gain = torch.tensor(0.6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    params = (x, conv3_w, conv3_b, down_w, down_b, eca_w, skipinit_gain)
    keep_prob, alpha, attn_gain = 0.75, 0.2, 2.0
    random_tensor = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64, device=DEVICE).view(n, 1, 1, 1)
    dout = torch.randn(n, c, 5, 3, generator=g, dtype=torch.float64).to(DEVICE)

    shortcut = F.conv2d(x, down_w, down_b)
    out = F.conv2d(x, conv3_w, conv3_b)
    # timm EcaModule.forward: y = x.mean((2, 3)).view(x.shape[0], 1, -1); y = self.conv(y);
    # y = self.gate(y).view(x.shape[0], -1, 1, 1); return x * y.expand_as(x)
    y = out.mean((2, 3)).view(n, 1, -1)
    y = F.conv1d(y, eca_w, padding=(k - 1) // 2)
    out = attn_gain * (out * y.sigmoid().view(n, -1, 1, 1).expand_as(out))
    out = out.div(keep_prob) * random_tensor
    out = out * skipinit_gain
    want = out * alpha + shortcut
    want_grads = torch.autograd.grad(want, params, dout)

    with nfk.use_backend(backend):
        got = nfk.se_gate_residual(
            F.conv2d(x, conv3_w), F.conv2d(x, down_w), bias=conv3_b, shortcut_bias=down_b, skip_gain=skipinit_gain,
            mask=(random_tensor / keep_prob).view(n), alpha=alpha, attn_gain=attn_gain, eca_weight=eca_w)
    got_grads = torch.autograd.grad(got, params, dout)
    tol = tolerance(torch.float64, backend)
    assert_close(got, want, tol, "forward")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close(a, b, tol, f"grad of parameter {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_without_shortcut_is_a_plain_gate(backend, channels_last):
    """shortcut=None: out = alpha·k·m·attn_gain·SE-gate·hb, as a standalone SE layer needs."""
    t, dout = make_inputs((2, 6, 5, 3), 4, {**ALL, "shortcut_bias": False}, torch.float64, channels_last, seed=21)
    t["shortcut"] = None
    ours = leaves(t)
    with nfk.use_backend(backend):
        out = call(nfk.se_gate_residual, ours, alpha=1.0, attn_gain=1.0)
    ref_in = leaves(t)
    ref = call(reference, ref_in, alpha=1.0, attn_gain=1.0)
    tol = tolerance(torch.float64, backend)
    assert_close(out, ref, tol, "forward")
    assert out.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    got, want = grads(ours, out, dout), grads(ref_in, ref, dout)
    assert got.keys() == want.keys()
    for k in want:
        assert_close(got[k], want[k], tol, f"d{k}")


def test_bad_inputs_raise_clear_errors():
    h, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    w1, w2 = torch.randn(2, 4, 1, 1), torch.randn(4, 2, 1, 1)
    f = nfk.se_gate_residual
    with pytest.raises(TypeError, match="h must be a torch.Tensor"):
        f([1.0], s)
    with pytest.raises(TypeError, match="h must have dtype"):
        f(torch.ones(2, 4, 3, 3, dtype=torch.int32), s)
    with pytest.raises(ValueError, match="h must be 4-D"):
        f(torch.randn(2, 4, 3), s)
    with pytest.raises(ValueError, match="shortcut_bias was given without shortcut"):
        f(h, None, shortcut_bias=torch.randn(4))
    with pytest.raises(ValueError, match="shortcut must have h's shape"):
        f(h, torch.randn(2, 4, 3, 4))
    with pytest.raises(ValueError, match="fc2_weight was given without fc1_weight"):
        f(h, s, None, None, w2)
    with pytest.raises(ValueError, match="fc2_weight is required"):
        f(h, s, w1)
    with pytest.raises(ValueError, match="fc1_weight must have shape"):
        f(h, s, torch.randn(2, 5, 1, 1), None, w2)
    with pytest.raises(ValueError, match="fc1_weight must have shape"):
        f(h, s, torch.randn(2, 4, 3, 3), None, w2)
    with pytest.raises(ValueError, match=r"fc2_weight must have shape \(4, 2\)"):
        f(h, s, w1, None, torch.randn(4, 3, 1, 1))
    with pytest.raises(ValueError, match="fc1_bias must have 2 elements"):
        f(h, s, w1, torch.randn(4), w2)
    with pytest.raises(ValueError, match="fc2_bias must have 4 elements"):
        f(h, s, w1, None, w2, torch.randn(2))
    with pytest.raises(ValueError, match="bias must have 4 elements"):
        f(h, s, bias=torch.randn(3))
    with pytest.raises(ValueError, match="shortcut_bias must have 4 elements"):
        f(h, s, shortcut_bias=torch.randn(5))
    with pytest.raises(ValueError, match="skip_gain must have 1 elements"):
        f(h, s, skip_gain=torch.ones(2))
    with pytest.raises(ValueError, match="mask must have 2 elements"):
        f(h, s, mask=torch.ones(3))
    with pytest.raises(TypeError, match="mask must have dtype"):
        f(h, s, mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="skip_gain has dtype"):
        f(h, s, skip_gain=torch.ones((), dtype=torch.float64))
    with pytest.raises(TypeError, match="shortcut has dtype"):
        f(h, s.half())
    with pytest.raises(TypeError, match="alpha must be a real number"):
        f(h, s, alpha="0.2")
    with pytest.raises(ValueError, match="attn_gain must be finite"):
        f(h, s, attn_gain=float("nan"))
    with pytest.raises(TypeError, match="dense"):
        f(h.to_sparse(), s)
    # mask may have any floating dtype
    out = f(h, s, mask=torch.ones(2, dtype=torch.float64))
    assert out.dtype == h.dtype


def test_eca_bad_inputs_raise_clear_errors():
    h, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    w1, w2, eca = torch.randn(2, 4, 1, 1), torch.randn(4, 2, 1, 1), torch.randn(1, 1, 3)
    f = nfk.se_gate_residual
    with pytest.raises(TypeError, match="eca_weight must be a torch.Tensor"):
        f(h, s, eca_weight=[0.1, 0.2, 0.3])
    with pytest.raises(TypeError, match="eca_weight must have dtype"):
        f(h, s, eca_weight=torch.ones(1, 1, 3, dtype=torch.int64))
    for bad in (torch.randn(1, 3), torch.randn(2, 1, 3), torch.randn(1, 2, 3), torch.randn(1, 1, 1, 3)):
        with pytest.raises(ValueError, match=r"eca_weight must have shape \(1, 1, k\)"):
            f(h, s, eca_weight=bad)
    for bad in (torch.randn(1, 1, 4), torch.randn(2), torch.randn(0)):
        with pytest.raises(ValueError, match="eca_weight must have an odd kernel size"):
            f(h, s, eca_weight=bad)
    with pytest.raises(ValueError, match="eca_weight was given together with fc1_weight, fc2_weight"):
        f(h, s, w1, None, w2, eca_weight=eca)
    with pytest.raises(ValueError, match="eca_weight was given together with fc2_bias"):
        f(h, s, None, None, None, torch.randn(4), eca_weight=eca)
    with pytest.raises(ValueError, match="eca_weight is on meta"):
        f(h, s, eca_weight=torch.empty(1, 1, 3, device="meta"))
    with pytest.raises(TypeError, match="eca_weight has dtype torch.float64"):
        f(h, s, eca_weight=eca.double())
    with pytest.raises(TypeError, match="eca_weight has dtype torch.float16"):
        f(h.bfloat16(), s.bfloat16(), eca_weight=eca.half())
    # float32 next to float16/bfloat16 h (autocast), and (k,): accepted; k > C too
    assert f(h.half(), s.half(), eca_weight=eca).dtype == torch.float16
    assert f(h, s, eca_weight=torch.randn(7)).shape == h.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_grad_from_sum(backend):
    """out.sum().backward() hands the op a stride-0 gradient."""
    t, _ = make_inputs((2, 6, 3, 5), 3, ALL, torch.float64, channels_last=True, seed=41)
    t = leaves(t)
    with nfk.use_backend(backend):
        call(nfk.se_gate_residual, t).sum().backward()
    ref = leaves(t, cast=torch.float64)
    call(lambda *a, **k: reference(*a, **k, alpha=0.2, attn_gain=2.0), ref).sum().backward()
    for k in DIFFERENTIABLE:
        if t.get(k) is not None:
            assert_close(t[k].grad, ref[k].grad, tolerance(torch.float64, backend), f"d{k}")
