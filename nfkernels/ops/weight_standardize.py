"""Scaled Weight Standardization (Brock et al. 2021, arXiv:2102.06171, §3 and Appendix; timm
``ScaledStdConv2d``; DeepMind ``nfnets/base.py`` ``WSConv2D``).

For each output unit i (row W_i of length N = fan-in = W[0].numel()), with mean μ_i and biased
variance σ²_i, gain g_i (1 without a gain) and a fixed scale γ:

    timm:      Ŵ_ij = (W_ij − μ_i) · g_i · γ / (sqrt(N) · sqrt(σ²_i + eps))
    deepmind:  Ŵ_ij = (W_ij − μ_i) · g_i · γ / sqrt(max(N · σ²_i, eps))

Both are Ŵ = s_i · (W − μ_i) with s_i = g_i · s0_i, and s0_i = γ·r_i/sqrt(N) (timm) or γ·r_i
(deepmind), r_i the reciprocal square root above. With u = W − μ, a_i = Σ_j dŴ_ij u_ij and
q_i = r_i²/N (timm), r_i² (deepmind, unclamped) or 0 (deepmind, clamped at eps):

    dW_ij = s_i · (dŴ_ij − mean_j dŴ_ij − q_i · a_i · u_ij),     dg_i = s0_i · a_i

(the timm form equals docs/design.md §5's c·r·(dŴ − mean dŴ − x̂·mean(dŴ ⊙ x̂))).

Two kernel sets run this math behind the same autograd formula: the Triton kernels below
(``torch.ops.nfkernels.weight_standardize_fwd`` / ``_bwd``) and the CUDA kernels of
csrc/weight_standardize.cu (``..._fwd_cuda`` / ``..._bwd_cuda``); both save (μ, s0, q) per row.

Batched form (``torch.ops.nfkernels.weight_standardize_batched_fwd`` / ``_bwd``): the weights of
many convs (one device, one weight dtype, one Ŵ dtype; fan-ins, gammas, eps and eps modes may
differ) in one launch each way, through the same two Triton kernels with ``BATCHED`` set: each
program finds its row's offsets and parameters in a device-side int64 table (``_BatchTable``),
built on the host once per set of weights (cached by their addresses, shapes and settings, so a
training loop whose parameters stay in place builds it once). Ŵ comes back as one flat buffer
holding every weight's Ŵ in that weight's memory order (a custom op's outputs may not alias each
other), which ``weight_standardize_batched`` splits into views laid out like the weights; the
backward takes the one flat dŴ autograd gathers from those views and writes every dW (one flat
buffer, split the same way) and dgain in one launch. The CUDA kernels have no batched form (a
known gap): the "cuda" backend standardizes conv by conv.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from nfkernels.ops._triton import tl, triton

from nfkernels.ops._library import NAMESPACE, cuda_launch, define_cuda_op, define_op, kernels_are_compiled, launch
from nfkernels.ops._utils import (
    contiguous_dim0_rows,
    device_guard,
    dim0_rows,
    new_empty,
    new_empty_like,
    next_power_of_2,
    same_layout,
)

# Rows up to this many elements stay in registers (one read of W); longer rows are streamed in
# chunks of this size (two reads). NFNet rows are at most 1536 long. Tests lower it.
MAX_BLOCK = 4096

# Distinct weight sets whose batched tables stay cached (a model, its EMA copy, eval clones...).
TABLE_CACHE_SIZE = 32


@triton.jit
def _reciprocal_std(m2, n_total, eps, deepmind):
    """(r, q) of the module docstring from a row's M2 = N·σ²: r = 1/sqrt(max(M2, eps)) and
    q = r² (0 where clamped) in deepmind mode, r = 1/sqrt(M2/N + eps) and q = r²/N in timm mode.
    ``deepmind`` may be a per-row value: both forms are a few scalar operations."""
    r = 1.0 / tl.sqrt(tl.where(deepmind, tl.maximum(m2, eps), m2 / n_total + eps))
    q = tl.where(deepmind, tl.where(m2 > eps, r * r, 0.0), r * r / n_total)
    return r, q


@triton.jit
def _weight_standardize_fwd_kernel(
    w_ptr, gain_ptr, out_ptr, mean_ptr, s0_ptr, q_ptr, table_ptr,
    N, gamma_scaled, eps,
    HAS_GAIN: tl.constexpr, DEEPMIND: tl.constexpr, BATCHED: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """One program standardizes one row: Ŵ = (W − μ)·g·s0 (module docstring for s0 and q).

    One weight (BATCHED false): row i of its (O, N) view, N, gamma_scaled (γ/sqrt(N) in timm
    mode, γ in deepmind mode), eps and the mode are arguments. Many weights (BATCHED): row i's
    weight offset (from w_ptr), gain offset (from gain_ptr; −1 without a gain), Ŵ offset (from
    out_ptr), N, mode, gamma_scaled and eps are row i of ``table_ptr`` (``_BatchTable``), the
    last two as float64 bits. Statistics accumulate in fp32 (fp64 for fp64 weights). Long rows
    combine per-chunk (mean, M2) pairs (Chan, Golub & LeVeque 1979) so the variance never
    suffers the E[x²] − E[x]² cancellation.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    if BATCHED:
        entry = table_ptr + row * 7
        w_start = tl.load(entry)
        gain_at = tl.load(entry + 1)
        out_start = tl.load(entry + 2)
        n = tl.load(entry + 3)
        deepmind = tl.load(entry + 4) != 0
        gamma_scaled = tl.load(entry + 5).to(tl.float64, bitcast=True).to(acc_dtype)
        eps = tl.load(entry + 6).to(tl.float64, bitcast=True).to(acc_dtype)
        gain = tl.load(gain_ptr + tl.maximum(gain_at, 0), mask=gain_at >= 0, other=1.0).to(acc_dtype)
    else:
        n = N
        w_start = row * N
        out_start = w_start
        deepmind = DEEPMIND
        gain = 1.0
        if HAS_GAIN:
            gain = tl.load(gain_ptr + row).to(acc_dtype)
    cols = tl.arange(0, BLOCK)
    n_total = tl.cast(n, acc_dtype)  # n.to() would fail where the JIT specializes N == 1 to a constant
    if ONE_TILE:
        mask = cols < n
        x = tl.load(w_ptr + w_start + cols, mask=mask, other=0.0).to(acc_dtype)
        mean = tl.sum(x, axis=0) / n_total
        centered = tl.where(mask, x - mean, 0.0)
        m2 = tl.sum(centered * centered, axis=0)
    else:
        mean = tl.zeros([], dtype=acc_dtype)
        m2 = tl.zeros([], dtype=acc_dtype)
        count = tl.zeros([], dtype=acc_dtype)
        for start in range(0, n, BLOCK):
            mask = start + cols < n
            x = tl.load(w_ptr + w_start + start + cols, mask=mask, other=0.0).to(acc_dtype)
            n_chunk = tl.minimum(n - start, BLOCK).to(acc_dtype)
            mean_chunk = tl.sum(x, axis=0) / n_chunk
            centered = tl.where(mask, x - mean_chunk, 0.0)
            m2_chunk = tl.sum(centered * centered, axis=0)
            new_count = count + n_chunk
            delta = mean_chunk - mean
            mean = mean + delta * (n_chunk / new_count)
            m2 = m2 + m2_chunk + delta * delta * (count * n_chunk / new_count)
            count = new_count
    r, q = _reciprocal_std(m2, n_total, eps, deepmind)
    s0 = gamma_scaled * r
    scale = s0 * gain
    if ONE_TILE:
        tl.store(out_ptr + out_start + cols, (centered * scale).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n, BLOCK):
            mask = start + cols < n
            x = tl.load(w_ptr + w_start + start + cols, mask=mask, other=0.0).to(acc_dtype)
            tl.store(out_ptr + out_start + start + cols, ((x - mean) * scale).to(out_ptr.dtype.element_ty),
                     mask=mask)
    # Per-row statistics for the backward (three scalars per row: negligible next to Ŵ).
    tl.store(mean_ptr + row, mean)
    tl.store(s0_ptr + row, s0)
    tl.store(q_ptr + row, q)


@triton.jit
def _weight_standardize_bwd_kernel(
    dout_ptr, w_ptr, gain_ptr, mean_ptr, s0_ptr, q_ptr, dw_ptr, dgain_ptr, table_ptr,
    N,
    HAS_GAIN: tl.constexpr, BATCHED: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    """One program per row: dW = s·(dŴ − mean(dŴ) − q·a·u), dg = s0·a with a = Σ dŴ·u, u = W − μ.

    Rows as in the forward kernel (BATCHED: dŴ and dW at the Ŵ offset of the table, in flat
    buffers). Uses the forward's saved per-row μ, s0, q; accumulates in fp32 (fp64 for fp64
    weights).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    if BATCHED:
        entry = table_ptr + row * 7
        w_start = tl.load(entry)
        gain_at = tl.load(entry + 1)
        grad_start = tl.load(entry + 2)
        n = tl.load(entry + 3)
        gain = tl.load(gain_ptr + tl.maximum(gain_at, 0), mask=gain_at >= 0, other=1.0).to(acc_dtype)
    else:
        n = N
        w_start = row * N
        grad_start = w_start
        gain = 1.0
        if HAS_GAIN:
            gain = tl.load(gain_ptr + row).to(acc_dtype)
    cols = tl.arange(0, BLOCK)
    n_total = tl.cast(n, acc_dtype)  # n.to() would fail where the JIT specializes N == 1 to a constant
    mean = tl.load(mean_ptr + row)
    s0 = tl.load(s0_ptr + row)
    q = tl.load(q_ptr + row)
    scale = s0 * gain
    if ONE_TILE:
        mask = cols < n
        dy = tl.load(dout_ptr + grad_start + cols, mask=mask, other=0.0).to(acc_dtype)
        u = tl.where(mask, tl.load(w_ptr + w_start + cols, mask=mask, other=0.0).to(acc_dtype) - mean, 0.0)
        sum_dy = tl.sum(dy, axis=0)
        sum_dy_u = tl.sum(dy * u, axis=0)
        dw = scale * (dy - sum_dy / n_total - (q * sum_dy_u) * u)
        tl.store(dw_ptr + grad_start + cols, dw.to(dw_ptr.dtype.element_ty), mask=mask)
    else:
        sum_dy = tl.zeros([], dtype=acc_dtype)
        sum_dy_u = tl.zeros([], dtype=acc_dtype)
        for start in range(0, n, BLOCK):
            mask = start + cols < n
            dy = tl.load(dout_ptr + grad_start + start + cols, mask=mask, other=0.0).to(acc_dtype)
            x = tl.load(w_ptr + w_start + start + cols, mask=mask, other=0.0).to(acc_dtype)
            u = tl.where(mask, x - mean, 0.0)
            sum_dy += tl.sum(dy, axis=0)
            sum_dy_u += tl.sum(dy * u, axis=0)
        for start in range(0, n, BLOCK):
            mask = start + cols < n
            dy = tl.load(dout_ptr + grad_start + start + cols, mask=mask, other=0.0).to(acc_dtype)
            u = tl.load(w_ptr + w_start + start + cols, mask=mask, other=0.0).to(acc_dtype) - mean
            dw = scale * (dy - sum_dy / n_total - (q * sum_dy_u) * u)
            tl.store(dw_ptr + grad_start + start + cols, dw.to(dw_ptr.dtype.element_ty), mask=mask)
    if BATCHED:  # 0 for a row without a gain, so that the whole output is defined
        tl.store(dgain_ptr + row, tl.where(gain_at >= 0, s0 * sum_dy_u, 0.0))
    elif HAS_GAIN:
        tl.store(dgain_ptr + row, s0 * sum_dy_u)


def _block_config(n: int) -> tuple[int, bool, int]:
    block = min(next_power_of_2(n), MAX_BLOCK)
    num_warps = 4 if block <= 1024 else 8
    return block, n <= block, num_warps


def _gamma_scaled(gamma: float, n: int, deepmind: bool) -> float:
    return gamma if deepmind else gamma / math.sqrt(n)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_buffers(weight: torch.Tensor, out_dtype: Optional[torch.dtype]):
    """(weight or a contiguous copy, its rows, Ŵ, Ŵ's rows, μ, s0, q): the forward's outputs,
    allocated by the same code for every kernel set and for fake tensors."""
    weight, rows = contiguous_dim0_rows(weight)
    # Same strides as weight, so its row view lines up; the kernel stores in out's dtype.
    out = new_empty_like(weight, dtype=out_dtype or weight.dtype)
    out_rows = contiguous_dim0_rows(out)[1]
    acc_dtype = _acc_dtype(weight.dtype)
    mean, s0, q = (new_empty(rows.shape[0], device=weight.device, dtype=acc_dtype) for _ in range(3))
    return weight, rows, out, out_rows, mean, s0, q


def _bwd_buffers(dout: torch.Tensor, weight: torch.Tensor, gain: Optional[torch.Tensor], acc_dtype: torch.dtype):
    """(weight's rows, dout's rows, dW, dW's rows, dgain or None): the backward's operands in
    weight's memory order and its outputs."""
    weight, rows = contiguous_dim0_rows(weight)
    # dout must share weight's memory order so that row j of both holds the same elements.
    if not same_layout(dout, weight):
        dout = torch.empty_like(weight, dtype=dout.dtype).copy_(dout)
    dout_rows = contiguous_dim0_rows(dout)[1]
    dw = new_empty_like(weight)
    dw_rows = contiguous_dim0_rows(dw)[1]
    dgain = new_empty(rows.shape[0], device=weight.device, dtype=acc_dtype) if gain is not None else None
    return rows, dout_rows, dw, dw_rows, dgain


def _dgain_result(dgain: Optional[torch.Tensor], gain: Optional[torch.Tensor], dw: torch.Tensor) -> torch.Tensor:
    """dgain in gain's shape and dtype, or an empty tensor without a gain (an op cannot return None)."""
    return dgain.to(gain.dtype).view(gain.shape) if gain is not None else dw.new_empty(0)


def _weight_standardize_fwd(
    weight: torch.Tensor, gain: Optional[torch.Tensor], gamma: float, eps: float, deepmind: bool,
    out_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns (Ŵ laid out like ``weight`` in ``out_dtype`` (None:
    weight's dtype), μ, s0, q), the last three per row in the accumulation dtype for backward."""
    weight, rows, out, out_rows, mean, s0, q = _fwd_buffers(weight, out_dtype)
    n_rows, n = rows.shape
    block, one_tile, num_warps = _block_config(n)
    launch(
        _weight_standardize_fwd_kernel, (n_rows,),
        rows, _flat(gain) if gain is not None else rows, out_rows, mean, s0, q, mean,
        n, _gamma_scaled(gamma, n, deepmind), eps,
        HAS_GAIN=gain is not None, DEEPMIND=deepmind, BATCHED=False,
        ACC_FP64=mean.dtype == torch.float64, BLOCK=block, ONE_TILE=one_tile, num_warps=num_warps,
    )
    return out, mean, s0, q


def _weight_standardize_bwd(
    dout: torch.Tensor, weight: torch.Tensor, gain: Optional[torch.Tensor], mean: torch.Tensor,
    s0: torch.Tensor, q: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns (dW laid out like ``weight`` in weight's dtype, dgain in
    gain's shape and dtype, or an empty tensor without a gain: an op cannot return None)."""
    rows, dout_rows, dw, dw_rows, dgain = _bwd_buffers(dout, weight, gain, mean.dtype)
    n_rows, n = rows.shape
    has_gain = gain is not None
    block, one_tile, num_warps = _block_config(n)
    launch(
        _weight_standardize_bwd_kernel, (n_rows,),
        dout_rows, rows, _flat(gain) if has_gain else rows, mean, s0, q, dw_rows, dgain if has_gain else mean, mean,
        n,
        HAS_GAIN=has_gain, BATCHED=False, ACC_FP64=mean.dtype == torch.float64, BLOCK=block, ONE_TILE=one_tile,
        num_warps=num_warps,
    )
    return dw, _dgain_result(dgain, gain, dw)


def _flat(gain: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """gain as a dense vector: the CUDA kernels index it by row."""
    return gain.reshape(-1).contiguous() if gain is not None else None


def _weight_standardize_fwd_cuda(
    weight: torch.Tensor, gain: Optional[torch.Tensor], gamma: float, eps: float, deepmind: bool,
    out_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_weight_standardize_fwd`` through the CUDA kernel of nfkernels._C (same outputs)."""
    weight, rows, out, out_rows, mean, s0, q = _fwd_buffers(weight, out_dtype)
    n_rows, n = rows.shape
    cuda_launch(
        "weight_standardize_fwd", weight.device,
        rows, _flat(gain), out_rows, mean, s0, q, n_rows, n, weight.dtype, out.dtype,
        _gamma_scaled(gamma, n, deepmind), eps, deepmind,
    )
    return out, mean, s0, q


def _weight_standardize_bwd_cuda(
    dout: torch.Tensor, weight: torch.Tensor, gain: Optional[torch.Tensor], mean: torch.Tensor,
    s0: torch.Tensor, q: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_weight_standardize_bwd`` through the CUDA kernel of nfkernels._C (same outputs)."""
    rows, dout_rows, dw, dw_rows, dgain = _bwd_buffers(dout, weight, gain, mean.dtype)
    n_rows, n = rows.shape
    cuda_launch(
        "weight_standardize_bwd", weight.device,
        dout_rows, rows, _flat(gain), mean, s0, q, dw_rows, dgain, n_rows, n, dout_rows.dtype, rows.dtype,
    )
    return dw, _dgain_result(dgain, gain, dw)


_COMPILED = kernels_are_compiled(_weight_standardize_fwd_kernel)
weight_standardize_fwd = define_op("weight_standardize_fwd", _weight_standardize_fwd, compiled=_COMPILED)
weight_standardize_bwd = define_op("weight_standardize_bwd", _weight_standardize_bwd, compiled=_COMPILED)
weight_standardize_fwd_cuda = define_cuda_op("weight_standardize_fwd_cuda", _weight_standardize_fwd_cuda)
weight_standardize_bwd_cuda = define_cuda_op("weight_standardize_bwd_cuda", _weight_standardize_bwd_cuda)


def _setup_context(ctx, inputs, output):
    weight, gain = inputs[:2]
    _, mean, s0, q = output
    ctx.mark_non_differentiable(mean, s0, q)
    # μ, s0, q never get gradients, and Ŵ's may be absent: no zero-filled stand-ins to allocate.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(weight, gain, mean, s0, q)


def _backward_through(bwd_op):
    def backward(ctx, dout, _dmean, _ds0, _dq):
        """dW = s·(dŴ − mean(dŴ) − q·a·u), dg = s0·a (module docstring); none for the constants,
        nor without a gradient for Ŵ."""
        if dout is None:
            return None, None, None, None, None, None
        weight, gain, mean, s0, q = ctx.saved_tensors
        dw, dgain = bwd_op(dout, weight, gain, mean, s0, q)
        return dw, (dgain if gain is not None else None), None, None, None, None

    return backward


weight_standardize_fwd.register_autograd(_backward_through(weight_standardize_bwd), setup_context=_setup_context)
weight_standardize_fwd_cuda.register_autograd(_backward_through(weight_standardize_bwd_cuda),
                                              setup_context=_setup_context)


# ----------------------------------------------------------------------------- batched


@dataclass
class _BatchTable:
    """Device-side int64 table of a batched launch: one row per weight row, holding (weight row
    start, gain element or −1, Ŵ row start, N, deepmind, gamma_scaled, eps), the offsets in
    elements from the lowest-addressed weight (``weights[w_base]``), the lowest-addressed gain
    (``gains[g_base]``) and the flat Ŵ, so never negative; the last two as float64 bits.
    ``total`` is the length of the flat Ŵ, ``max_n`` the longest row (it sizes the block)."""

    table: torch.Tensor
    n_rows: int
    total: int
    max_n: int
    w_base: int
    g_base: int
    captured: bool = False  # read by a captured CUDA graph: must outlive it, never evicted
    # CUDA streams (handles) the table has been read on. Work on a stream other than the one that
    # allocated it is invisible to the caching allocator until record_stream says so; without it,
    # an evicted table's memory could be handed out while a kernel there still reads it.
    streams: set = field(default_factory=set)

    def use(self) -> "_BatchTable":
        """Mark a launch that reads the table on the current stream (or into a graph being captured)."""
        if self.table.device.type != "cuda":
            return self
        if torch.cuda.is_current_stream_capturing():
            self.captured = True
            return self
        stream = torch.cuda.current_stream(self.table.device)
        if not self.captured and stream.cuda_stream not in self.streams:
            self.table.record_stream(stream)
            self.streams.add(stream.cuda_stream)
        return self


_table_cache: collections.OrderedDict[tuple, _BatchTable] = collections.OrderedDict()


def _has_data(t: torch.Tensor) -> bool:
    """False for fake and meta tensors: the op body then only allocates (it is its own fake)."""
    return not (t.is_meta or is_fake(t))


def _table_key(weights, gains, has_gain, gammas, epss, deepmind) -> tuple:
    # Addresses, shapes and strides decide the offsets and the row layout; the settings the
    # per-row parameters. Whatever changes any of them (a cast, .to(), .data =) gets a new table.
    return (tuple([(w.data_ptr(), w.shape, w.stride()) for w in weights]),
            tuple([(g.data_ptr(), g.shape, g.stride()) for g in gains]),
            tuple(has_gain), tuple(gammas), tuple(epss), tuple(deepmind), weights[0].dtype, weights[0].device)


def _check_batch(op: str, weights, gains, has_gain, gammas, epss, deepmind) -> None:
    """TypeError/ValueError for what the batched kernels cannot take (checked once per table)."""
    if not len(weights) == len(has_gain) == len(gammas) == len(epss) == len(deepmind):
        raise ValueError(f"{op}: weights, has_gain, gammas, epss and deepmind must have one entry per weight")
    if sum(has_gain) != len(gains):
        raise ValueError(f"{op}: gains must hold one tensor per True in has_gain; got {len(gains)} for "
                         f"{sum(has_gain)}")
    first = weights[0]
    gain_iter = iter(gains)
    for i, w in enumerate(weights):
        if w.device != first.device or w.dtype != first.dtype:
            raise TypeError(f"{op}: weights[{i}] is {w.dtype} on {w.device} but weights[0] is {first.dtype} on "
                            f"{first.device}; one batch takes one device and dtype")
        if w.dim() < 2 or w.numel() == 0:
            raise ValueError(f"{op}: weights[{i}] must have at least 2 dims and elements; got shape {tuple(w.shape)}")
        if not epss[i] > 0:
            raise ValueError(f"{op}: epss[{i}] must be > 0; got {epss[i]}")
        if has_gain[i]:
            g = next(gain_iter)
            if g.device != w.device or g.dtype != w.dtype:
                raise TypeError(f"{op}: the gain of weights[{i}] is {g.dtype} on {g.device}; it must be "
                                f"{w.dtype} on {w.device}, as its weight")
            if g.numel() != w.shape[0]:
                raise ValueError(f"{op}: the gain of weights[{i}] must have {w.shape[0]} elements (one per "
                                 f"output unit); got shape {tuple(g.shape)}")


def _addressable(tensors: Sequence[torch.Tensor], dense) -> tuple[list[torch.Tensor], bool]:
    """``tensors``, with a copy in place of each one whose rows are not dense (``dense``) or whose
    address is not a whole number of elements (its offset from another would not be either); and
    whether none needed one."""
    out = []
    for t in tensors:
        if not dense(t):
            t = t.contiguous()
        elif t.data_ptr() % t.element_size():
            t = torch.empty_like(t).copy_(t)
        out.append(t)
    return out, all(a is b for a, b in zip(out, tensors))


def _offsets_from_lowest(tensors) -> tuple[np.ndarray, int]:
    """(each tensor's offset in elements from the lowest-addressed one, that one's index)."""
    addresses = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
    base = int(addresses.argmin())
    return (addresses - addresses[base]) // tensors[0].element_size(), base


def _build_table(weights, gains, has_gain, gammas, epss, deepmind) -> _BatchTable:
    units = np.array([w.shape[0] for w in weights], dtype=np.int64)
    lengths = np.array([w.numel() for w in weights], dtype=np.int64) // units
    w_first, w_base = _offsets_from_lowest(weights)
    g_first = np.full(len(weights), -1, dtype=np.int64)
    g_base = 0
    if gains:
        g_first[np.array(has_gain, dtype=bool)], g_base = _offsets_from_lowest(gains)
    out_first = np.cumsum(units * lengths) - units * lengths
    flags = np.array(deepmind, dtype=np.int64)
    scaled = np.array([_gamma_scaled(gm, int(n), bool(dm)) for gm, n, dm in zip(gammas, lengths, flags)])
    owner = np.repeat(np.arange(len(weights)), units)
    within = np.arange(len(owner)) - np.repeat(np.cumsum(units) - units, units)  # row index inside its weight
    row_n = lengths[owner]
    gain_rows = np.where(g_first[owner] >= 0, g_first[owner] + within, -1)
    host = np.stack([
        w_first[owner] + within * row_n, gain_rows, out_first[owner] + within * row_n, row_n, flags[owner],
        scaled[owner].astype(np.float64).view(np.int64), np.asarray(epss, dtype=np.float64)[owner].view(np.int64),
    ], axis=1)
    device = weights[0].device
    table = torch.from_numpy(np.ascontiguousarray(host))
    table = table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table.to(device)
    entry = _BatchTable(table, len(owner), int((units * lengths).sum()), int(lengths.max()), w_base, g_base)
    if device.type == "cuda":  # allocated on the current stream, which the allocator knows about
        entry.streams.add(torch.cuda.current_stream(device).cuda_stream)
    return entry


def _batch_operands(op: str, weights, gains, has_gain, gammas, epss, deepmind):
    """(weights, gains, table) for a batched launch: the tensors themselves with their cached
    table, or, where a weight's rows are not dense or an offset not whole, copies with a table of
    their own (correct, but built and copied anew on every call)."""
    key = _table_key(weights, gains, has_gain, gammas, epss, deepmind)
    cached = _table_cache.get(key)
    if cached is not None:
        _table_cache.move_to_end(key)
        return weights, gains, cached.use()
    _check_batch(op, weights, gains, has_gain, gammas, epss, deepmind)
    device = weights[0].device
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{op}: the table for these weights is not built yet and cannot be built during CUDA graph "
            "capture; run one eager step with the same weights before capturing")
    weights, weights_in_place = _addressable(weights, lambda w: dim0_rows(w) is not None)
    gains, gains_in_place = _addressable(gains, torch.Tensor.is_contiguous) if gains else (gains, True)
    entry = _build_table(weights, gains, has_gain, gammas, epss, deepmind)
    if weights_in_place and gains_in_place:
        _table_cache[key] = entry
        evictable = [k for k, e in _table_cache.items() if not e.captured]
        for old in evictable[: max(0, len(_table_cache) - TABLE_CACHE_SIZE)]:
            del _table_cache[old]
    return weights, gains, entry.use()


def _first_weight(weights: list[torch.Tensor]) -> torch.Tensor:
    if not weights:
        raise ValueError("weight_standardize_batched: weights must not be empty")
    return weights[0]


def _batch_sizes(weights) -> tuple[int, int]:
    """(rows, elements) of all weights: the sizes of the outputs, from shapes alone (fake tensors)."""
    return sum(w.shape[0] for w in weights), sum(w.numel() for w in weights)


def _weight_standardize_batched_fwd(
    weights: list[torch.Tensor], gains: list[torch.Tensor], has_gain: list[bool], gammas: list[float],
    epss: list[float], deepmind: list[bool], out_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch of the forward kernel over every row of ``weights`` (one device and dtype, none
    empty). Weight i has a gain when ``has_gain[i]`` (the next tensor of ``gains``: a list of
    tensors, so that autograd can return their gradients), scale ``gammas[i]``, ``epss[i]`` and
    the deepmind form when ``deepmind[i]``. Returns (the flat Ŵ of all weights, each in its
    weight's memory order, in ``out_dtype`` (None: the weights' dtype), μ, s0, q per row)."""
    first = _first_weight(weights)
    acc_dtype = _acc_dtype(first.dtype)
    if not _has_data(first):
        n_rows, total = _batch_sizes(weights)
        out = new_empty(total, device=first.device, dtype=out_dtype or first.dtype)
        return (out, *(new_empty(n_rows, device=first.device, dtype=acc_dtype) for _ in range(3)))
    op = "weight_standardize_batched"
    weights, gains, table = _batch_operands(op, weights, gains, has_gain, gammas, epss, deepmind)
    out = new_empty(table.total, device=first.device, dtype=out_dtype or first.dtype)
    mean, s0, q = (new_empty(table.n_rows, device=first.device, dtype=acc_dtype) for _ in range(3))
    block, one_tile, num_warps = _block_config(table.max_n)
    with device_guard(first):
        launch(
            _weight_standardize_fwd_kernel, (table.n_rows,),
            weights[table.w_base], gains[table.g_base] if gains else out, out, mean, s0, q, table.table,
            0, 0.0, 0.0,
            HAS_GAIN=bool(gains), DEEPMIND=False, BATCHED=True,
            ACC_FP64=acc_dtype == torch.float64, BLOCK=block, ONE_TILE=one_tile, num_warps=num_warps,
        )
    return out, mean, s0, q


def _weight_standardize_batched_bwd(
    dout: torch.Tensor, weights: list[torch.Tensor], gains: list[torch.Tensor], has_gain: list[bool],
    gammas: list[float], epss: list[float], deepmind: list[bool], mean: torch.Tensor, s0: torch.Tensor,
    q: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of the backward kernel over every row (arguments as the forward's, ``dout`` the
    flat dŴ). Returns (the flat dW in the weights' dtype and the forward's element order, dgain
    per row in the accumulation dtype: 0 for rows without a gain)."""
    first = _first_weight(weights)
    if not _has_data(first):
        _, total = _batch_sizes(weights)
        return new_empty(total, device=first.device, dtype=first.dtype), new_empty_like(mean)
    op = "weight_standardize_batched"
    weights, gains, table = _batch_operands(op, weights, gains, has_gain, gammas, epss, deepmind)
    dout = dout.contiguous()  # e.g. an expanded gradient of a sum
    dw = new_empty(table.total, device=first.device, dtype=first.dtype)
    dgain = new_empty_like(mean)
    block, one_tile, num_warps = _block_config(table.max_n)
    with device_guard(first):
        launch(
            _weight_standardize_bwd_kernel, (table.n_rows,),
            dout, weights[table.w_base], gains[table.g_base] if gains else dw, mean, s0, q, dw, dgain, table.table,
            0,
            HAS_GAIN=bool(gains), BATCHED=True, ACC_FP64=mean.dtype == torch.float64, BLOCK=block,
            ONE_TILE=one_tile, num_warps=num_warps,
        )
    return dw, dgain


def _opaque_op(name: str, fn):
    # Opaque even where the kernels are compiled: the table is built from the inputs' addresses,
    # which a traced (fake) body cannot read. The body is its own fake implementation (no launch).
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
    op.register_fake(fn)
    return op


weight_standardize_batched_fwd = _opaque_op("weight_standardize_batched_fwd", _weight_standardize_batched_fwd)
weight_standardize_batched_bwd = _opaque_op("weight_standardize_batched_bwd", _weight_standardize_batched_bwd)


def _view_rows_as(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``flat`` (like.numel() elements in the memory order of like's rows, as the batched kernels
    read and write them) viewed with like's shape and layout."""
    if like.is_contiguous() or dim0_rows(like) is None:  # a non-dense weight was read from a contiguous copy
        return flat.view(like.shape)
    order = (0, *sorted(range(1, like.dim()), key=lambda d: -like.stride(d)))  # dim0_rows' order
    return flat.view([like.shape[d] for d in order]).permute(sorted(range(like.dim()), key=order.__getitem__))


def _split_rows_like(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The flat buffer of a batched op cut into one view per tensor, each laid out like it."""
    return [_view_rows_as(piece, t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _batched_setup_context(ctx, inputs, output):
    weights, gains, has_gain, gammas, epss, deepmind, _ = inputs
    _, mean, s0, q = output
    ctx.mark_non_differentiable(mean, s0, q)
    ctx.set_materialize_grads(False)  # no zero-filled dŴ when none of the Ŵ views was used
    ctx.settings = (has_gain, gammas, epss, deepmind)
    ctx.n_weights, ctx.n_gains = len(weights), len(gains)
    ctx.save_for_backward(*weights, *gains, mean, s0, q)


def _batched_backward(ctx, dout, _dmean, _ds0, _dq):
    """Every dW and dg of the module docstring from the one flat dŴ, in one launch."""
    if dout is None:
        return None, None, None, None, None, None, None
    saved = ctx.saved_tensors
    weights, gains = saved[:ctx.n_weights], saved[ctx.n_weights:ctx.n_weights + ctx.n_gains]
    mean, s0, q = saved[-3:]
    has_gain = ctx.settings[0]
    dw, dgain_rows = weight_standardize_batched_bwd(dout, list(weights), list(gains), *ctx.settings, mean, s0, q)
    per_weight = dgain_rows.split([w.shape[0] for w in weights])
    dgains = [d.to(g.dtype).view(g.shape) for d, g in zip((d for d, h in zip(per_weight, has_gain) if h), gains)]
    return _split_rows_like(dw, weights), dgains, None, None, None, None, None


weight_standardize_batched_fwd.register_autograd(_batched_backward, setup_context=_batched_setup_context)


def weight_standardize_batched(
    weights: Sequence[torch.Tensor], gains: Sequence[Optional[torch.Tensor]], gammas: Sequence[float],
    epss: Sequence[float], deepmind: Sequence[bool], out_dtype: Optional[torch.dtype] = None,
) -> list[torch.Tensor]:
    """Ŵ of every weight (each with its optional gain, gamma, eps and form), one Triton launch
    forward and one backward: views of one flat buffer, each laid out like its weight and
    differentiable in weight and gain. All weights share a device and a dtype and have elements;
    Ŵ is written in ``out_dtype`` (None: the weights' dtype)."""
    present = [g for g in gains if g is not None]
    has_gain = [g is not None for g in gains]
    flat = weight_standardize_batched_fwd(list(weights), present, has_gain, [float(g) for g in gammas],
                                          [float(e) for e in epss], [bool(d) for d in deepmind], out_dtype)[0]
    return _split_rows_like(flat, weights)


def weight_standardize_triton(weight, gain, gamma, eps, deepmind, out_dtype=None):
    """The Triton path (``torch.ops.nfkernels.weight_standardize_fwd``), differentiable in weight
    and gain; arguments validated by ``nfkernels.weight_standardize``."""
    return weight_standardize_fwd(weight, gain, gamma, eps, deepmind, out_dtype)[0]


def weight_standardize_cuda(weight, gain, gamma, eps, deepmind, out_dtype=None):
    """The CUDA path (``torch.ops.nfkernels.weight_standardize_fwd_cuda``), as the Triton path."""
    return weight_standardize_fwd_cuda(weight, gain, gamma, eps, deepmind, out_dtype)[0]


def weight_standardize_empty(weight, gain, out_dtype=None):
    """Ŵ for a weight without elements (O = 0 rows, or rows of N = 0): an empty tensor of weight's
    shape in ``out_dtype`` (None: weight's dtype). No element of Ŵ depends on weight or
    gain, so both gradients are zeros; Ŵ still depends on both in the graph, so that backward
    returns those zeros (μ and σ² of an empty row, and 1/sqrt(N), are undefined: no kernel runs)."""
    out = weight.to(out_dtype or weight.dtype, copy=True)
    if gain is not None:
        # Broadcasting gain over the empty Ŵ adds nothing; its gradient is a sum over no elements.
        out = out + gain.reshape(weight.shape[0], *([1] * (weight.dim() - 1))).to(out.dtype)
    return out


def weight_standardize_torch(weight, gain, gamma, eps, deepmind, out_dtype=None):
    """Plain PyTorch reference (the CPU path): the same formula from torch ops, any dtype; the
    result in ``out_dtype`` (None: weight's dtype), autograd for the gradients."""
    n = math.prod(weight.shape[1:])
    w = weight if weight.dtype == torch.float64 else weight.float()
    if not deepmind and n > 1 and weight.is_contiguous():
        # timm's own formulation: batch norm over the (1, O, N) view is one fused kernel each way
        # (about 3x faster on a CPU than the composition below); it needs N > 1 and keeps layout
        # only for contiguous weights.
        affine = torch.full((weight.shape[0],), gamma / math.sqrt(n), dtype=w.dtype, device=w.device)
        if gain is not None:
            affine = affine * gain.reshape(-1).to(w.dtype)
        out = F.batch_norm(w.reshape(1, weight.shape[0], n), None, None, weight=affine, training=True,
                           momentum=0.0, eps=eps)
        return out.reshape(weight.shape).to(out_dtype or weight.dtype)
    var, mean = torch.var_mean(w, dim=tuple(range(1, weight.dim())), unbiased=False, keepdim=True)
    if deepmind:
        scale = gamma * torch.rsqrt(torch.clamp_min(n * var, eps))
    else:
        scale = (gamma / math.sqrt(n)) * torch.rsqrt(var + eps)
    if gain is not None:
        scale = scale * gain.reshape(scale.shape).to(w.dtype)
    return ((w - mean) * scale).to(out_dtype or weight.dtype)
