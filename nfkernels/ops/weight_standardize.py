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
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from nfkernels.ops._triton import tl, triton

from nfkernels.ops._library import cuda_launch, define_cuda_op, define_op, kernels_are_compiled, launch
from nfkernels.ops._utils import contiguous_dim0_rows, new_empty, new_empty_like, next_power_of_2

# Rows up to this many elements stay in registers (one read of W); longer rows are streamed in
# chunks of this size (two reads). NFNet rows are at most 1536 long. Tests lower it.
MAX_BLOCK = 4096


@triton.jit
def _weight_standardize_fwd_kernel(
    w_ptr, gain_ptr, out_ptr, mean_ptr, s0_ptr, q_ptr,
    N, gamma_scaled, eps,
    HAS_GAIN: tl.constexpr, DEEPMIND: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """One program standardizes one row: Ŵ = (W − μ)·g·s0 (module docstring for s0 and q).

    gamma_scaled is γ/sqrt(N) in timm mode and γ in deepmind mode. Statistics accumulate in
    fp32 (fp64 for fp64 weights). Long rows combine per-chunk (mean, M2) pairs (Chan, Golub &
    LeVeque 1979) so the variance never suffers the E[x²] − E[x]² cancellation.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    cols = tl.arange(0, BLOCK)
    n_total = tl.cast(N, acc_dtype)  # N.to() would fail where the JIT specializes N == 1 to a constant
    if ONE_TILE:
        mask = cols < N
        x = tl.load(w_ptr + base + cols, mask=mask, other=0.0).to(acc_dtype)
        mean = tl.sum(x, axis=0) / n_total
        centered = tl.where(mask, x - mean, 0.0)
        m2 = tl.sum(centered * centered, axis=0)
    else:
        mean = tl.zeros([], dtype=acc_dtype)
        m2 = tl.zeros([], dtype=acc_dtype)
        count = tl.zeros([], dtype=acc_dtype)
        for start in range(0, N, BLOCK):
            mask = start + cols < N
            x = tl.load(w_ptr + base + start + cols, mask=mask, other=0.0).to(acc_dtype)
            n_chunk = tl.minimum(N - start, BLOCK).to(acc_dtype)
            mean_chunk = tl.sum(x, axis=0) / n_chunk
            centered = tl.where(mask, x - mean_chunk, 0.0)
            m2_chunk = tl.sum(centered * centered, axis=0)
            new_count = count + n_chunk
            delta = mean_chunk - mean
            mean = mean + delta * (n_chunk / new_count)
            m2 = m2 + m2_chunk + delta * delta * (count * n_chunk / new_count)
            count = new_count
    if DEEPMIND:
        denom = tl.maximum(m2, eps)  # N·σ² = M2
        r = 1.0 / tl.sqrt(denom)
        q = tl.where(m2 > eps, r * r, 0.0)
    else:
        r = 1.0 / tl.sqrt(m2 / n_total + eps)
        q = r * r / n_total
    s0 = gamma_scaled * r
    scale = s0
    if HAS_GAIN:
        scale = s0 * tl.load(gain_ptr + row).to(acc_dtype)
    if ONE_TILE:
        tl.store(out_ptr + base + cols, (centered * scale).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, N, BLOCK):
            mask = start + cols < N
            x = tl.load(w_ptr + base + start + cols, mask=mask, other=0.0).to(acc_dtype)
            tl.store(out_ptr + base + start + cols, ((x - mean) * scale).to(out_ptr.dtype.element_ty), mask=mask)
    # Per-row statistics for the backward (three scalars per row: negligible next to Ŵ).
    tl.store(mean_ptr + row, mean)
    tl.store(s0_ptr + row, s0)
    tl.store(q_ptr + row, q)


@triton.jit
def _weight_standardize_bwd_kernel(
    dout_ptr, w_ptr, gain_ptr, mean_ptr, s0_ptr, q_ptr, dw_ptr, dgain_ptr,
    N,
    HAS_GAIN: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """One program per row: dW = s·(dŴ − mean(dŴ) − q·a·u), dg = s0·a with a = Σ dŴ·u, u = W − μ.

    Uses the forward's saved per-row μ, s0, q; accumulates in fp32 (fp64 for fp64 weights).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    cols = tl.arange(0, BLOCK)
    n_total = tl.cast(N, acc_dtype)  # N.to() would fail where the JIT specializes N == 1 to a constant
    mean = tl.load(mean_ptr + row)
    s0 = tl.load(s0_ptr + row)
    q = tl.load(q_ptr + row)
    scale = s0
    if HAS_GAIN:
        scale = s0 * tl.load(gain_ptr + row).to(acc_dtype)
    if ONE_TILE:
        mask = cols < N
        dy = tl.load(dout_ptr + base + cols, mask=mask, other=0.0).to(acc_dtype)
        u = tl.where(mask, tl.load(w_ptr + base + cols, mask=mask, other=0.0).to(acc_dtype) - mean, 0.0)
        sum_dy = tl.sum(dy, axis=0)
        sum_dy_u = tl.sum(dy * u, axis=0)
        dw = scale * (dy - sum_dy / n_total - (q * sum_dy_u) * u)
        tl.store(dw_ptr + base + cols, dw.to(dw_ptr.dtype.element_ty), mask=mask)
    else:
        sum_dy = tl.zeros([], dtype=acc_dtype)
        sum_dy_u = tl.zeros([], dtype=acc_dtype)
        for start in range(0, N, BLOCK):
            mask = start + cols < N
            dy = tl.load(dout_ptr + base + start + cols, mask=mask, other=0.0).to(acc_dtype)
            x = tl.load(w_ptr + base + start + cols, mask=mask, other=0.0).to(acc_dtype)
            u = tl.where(mask, x - mean, 0.0)
            sum_dy += tl.sum(dy, axis=0)
            sum_dy_u += tl.sum(dy * u, axis=0)
        for start in range(0, N, BLOCK):
            mask = start + cols < N
            dy = tl.load(dout_ptr + base + start + cols, mask=mask, other=0.0).to(acc_dtype)
            u = tl.load(w_ptr + base + start + cols, mask=mask, other=0.0).to(acc_dtype) - mean
            dw = scale * (dy - sum_dy / n_total - (q * sum_dy_u) * u)
            tl.store(dw_ptr + base + start + cols, dw.to(dw_ptr.dtype.element_ty), mask=mask)
    if HAS_GAIN:
        tl.store(dgain_ptr + row, s0 * sum_dy_u)


def _block_config(n: int) -> tuple[int, bool, int]:
    block = min(next_power_of_2(n), MAX_BLOCK)
    num_warps = 4 if block <= 1024 else 8
    return block, n <= block, num_warps


def _gamma_scaled(gamma: float, n: int, deepmind: bool) -> float:
    return gamma if deepmind else gamma / math.sqrt(n)


def _fwd_buffers(weight: torch.Tensor, out_dtype: Optional[torch.dtype]):
    """(weight or a contiguous copy, its rows, Ŵ, Ŵ's rows, μ, s0, q): the forward's outputs,
    allocated by the same code for every kernel set and for fake tensors."""
    weight, rows = contiguous_dim0_rows(weight)
    # Same strides as weight, so its row view lines up; the kernel stores in out's dtype.
    out = new_empty_like(weight, dtype=out_dtype or weight.dtype)
    out_rows = contiguous_dim0_rows(out)[1]
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    mean, s0, q = (new_empty(rows.shape[0], device=weight.device, dtype=acc_dtype) for _ in range(3))
    return weight, rows, out, out_rows, mean, s0, q


def _bwd_buffers(dout: torch.Tensor, weight: torch.Tensor, gain: Optional[torch.Tensor], acc_dtype: torch.dtype):
    """(weight's rows, dout's rows, dW, dW's rows, dgain or None): the backward's operands in
    weight's memory order and its outputs."""
    weight, rows = contiguous_dim0_rows(weight)
    # dout must share weight's memory order so that row j of both holds the same elements.
    if dout.stride() != weight.stride():
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
        rows, _flat(gain) if gain is not None else rows, out_rows, mean, s0, q,
        n, _gamma_scaled(gamma, n, deepmind), eps,
        HAS_GAIN=gain is not None, DEEPMIND=deepmind,
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
        dout_rows, rows, _flat(gain) if has_gain else rows, mean, s0, q, dw_rows, dgain if has_gain else mean,
        n,
        HAS_GAIN=has_gain, ACC_FP64=mean.dtype == torch.float64, BLOCK=block, ONE_TILE=one_tile,
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
    ctx.save_for_backward(weight, gain, mean, s0, q)


def _backward_through(bwd_op):
    def backward(ctx, dout, _dmean, _ds0, _dq):
        """dW = s·(dŴ − mean(dŴ) − q·a·u), dg = s0·a (module docstring); none for the constants."""
        weight, gain, mean, s0, q = ctx.saved_tensors
        dw, dgain = bwd_op(dout, weight, gain, mean, s0, q)
        return dw, (dgain if gain is not None else None), None, None, None, None

    return backward


weight_standardize_fwd.register_autograd(_backward_through(weight_standardize_bwd), setup_context=_setup_context)
weight_standardize_fwd_cuda.register_autograd(_backward_through(weight_standardize_bwd_cuda),
                                              setup_context=_setup_context)


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
