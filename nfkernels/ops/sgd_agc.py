"""SGD with unit-wise Adaptive Gradient Clipping, fused (Brock et al. 2021, arXiv:2102.06171,
§4.1 and Appendix; torch.optim.SGD semantics; clipping as timm's ``adaptive_clip_grad``).

Per unit row (units as in nfkernels.ops.agc), with learning rate η, momentum m, weight decay
wd and the AGC factor s_i = 1 if ‖G_i‖ < λ‖W_i‖*, else λ‖W_i‖*/max(‖G_i‖, 1e-6)::

    g ← s_i · g;  g ← g + wd·p;  buf ← m·buf + g  (buf ← g on the first step)
    nesterov: g ← g + m·buf, else g ← buf;  p ← p − η·g

One launch per table (nfkernels.ops.agc.UnitTable), with agc_'s kinds of programs: single-
element units (gains) one per lane, and rows streamed a block at a time, several rows per
program (16-byte accesses where the rows are aligned). A row program's rows fit in cache, so it
reads p, g and buf once from memory (the norm pass and the update pass touch the same rows back
to back) and writes p and buf once: the bytes of torch's fused SGD alone. The gradient itself is
left unclipped in memory.
"""
from __future__ import annotations

import torch
from nfkernels.ops._triton import tl, triton

from nfkernels.ops._library import cuda_launch, launch
from nfkernels.ops._utils import device_guard
from nfkernels.ops.agc import (MAX_REGISTERS, NUM_WARPS, UnitTable, _row_norms, acc_dtype_for, agc_factor, clip_scale,
                               triton_geometry, unit_norms)


@triton.jit(do_not_specialize=["n_singles", "vector_end", "n_units"])
def _sgd_agc_kernel(
    p_ptr, g_ptr, buf_ptr, rows_ptr, bases_ptr, n_singles, vector_end, n_units,
    lr: tl.float64, momentum: tl.float64, weight_decay: tl.float64, clip_factor: tl.float64, eps: tl.float64,
    CLIP: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, ACC_FP64: tl.constexpr, FLAT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    ALIGN: tl.constexpr, SCALAR_ROWS: tl.constexpr, SCALAR_COLS: tl.constexpr,
):
    """Updates units: the AGC factor from ‖W_i‖, ‖G_i‖, then the SGD step (module docstring).

    ``rows_ptr``, ``n_singles``, ``vector_end``, ``n_units``, the three kinds of programs and the
    block constexprs are as in nfkernels.ops.agc._agc_kernel; ``bases_ptr`` rows are the tensor's
    (param, grad, buffer) offsets in elements from p_ptr / g_ptr / buf_ptr (the gradient's dtype
    may differ from the parameter's, which the buffer shares). A row program's norm pass reads p
    and g, its update pass re-reads them (from cache) with buf. Arithmetic in fp32 (fp64 when the
    parameter or the gradient is fp64); p and buf are stored in the parameter dtype. Without
    weight decay p is not added (0·inf would be NaN).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    # The scalars arrive as fp64 (an unannotated Python float would be fp32 and round fp64 math);
    # fp32 kernels narrow them once so that the per-element math stays fp32.
    if not ACC_FP64:
        lr, momentum = tl.cast(lr, tl.float32), tl.cast(momentum, tl.float32)
        weight_decay = tl.cast(weight_decay, tl.float32)
        clip_factor, eps = tl.cast(clip_factor, tl.float32), tl.cast(eps, tl.float32)
    pid = tl.program_id(0)
    n_flat = tl.cdiv(n_singles, FLAT)
    n_vector = tl.cdiv(vector_end - n_singles, ROWS)
    if pid < n_flat:  # each kind of program in its own function, as in _agc_kernel
        _sgd_agc_singles(p_ptr, g_ptr, buf_ptr, rows_ptr, bases_ptr, pid.to(tl.int64) * FLAT, n_singles, lr, momentum,
                         weight_decay, clip_factor, eps, CLIP, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, acc_dtype,
                         FLAT)
    elif pid < n_flat + n_vector:
        _sgd_agc_rows(p_ptr, g_ptr, buf_ptr, rows_ptr, bases_ptr, n_singles + (pid - n_flat).to(tl.int64) * ROWS,
                      vector_end, lr, momentum, weight_decay, clip_factor, eps, CLIP, HAS_WEIGHT_DECAY, HAS_MOMENTUM,
                      NESTEROV, acc_dtype, ROWS, COLS, ALIGN)
    else:
        _sgd_agc_rows(p_ptr, g_ptr, buf_ptr, rows_ptr, bases_ptr,
                      vector_end + (pid - n_flat - n_vector).to(tl.int64) * SCALAR_ROWS, n_units, lr, momentum,
                      weight_decay, clip_factor, eps, CLIP, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, acc_dtype,
                      SCALAR_ROWS, SCALAR_COLS, 1)


@triton.jit
def _sgd_agc_singles(p_ptr, g_ptr, buf_ptr, rows_ptr, bases_ptr, first, n_singles, lr, momentum, weight_decay,
                     clip_factor, eps, CLIP: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                     NESTEROV: tl.constexpr, acc_dtype: tl.constexpr, FLAT: tl.constexpr):
    """Steps the single-element units first .. first + FLAT - 1 (below n_singles), one per lane."""
    unit = first + tl.arange(0, FLAT)
    live = unit < n_singles
    tensor = tl.load(rows_ptr + unit * 3, mask=live, other=0)
    start = tl.load(rows_ptr + unit * 3 + 1, mask=live, other=0)
    p_at = p_ptr + (tl.load(bases_ptr + tensor * 3, mask=live, other=0) + start)
    g_at = g_ptr + (tl.load(bases_ptr + tensor * 3 + 1, mask=live, other=0) + start)
    buf_at = buf_ptr + (tl.load(bases_ptr + tensor * 3 + 2, mask=live, other=0) + start)
    p = tl.load(p_at, mask=live, other=0.0).to(acc_dtype)
    d = tl.load(g_at, mask=live, other=0.0).to(acc_dtype)
    if CLIP:
        factor, _ = agc_factor(tl.abs(p), tl.abs(d), clip_factor, eps)
        d = d * factor
    _sgd_update(p, d, p_at, buf_at, live, lr, momentum, weight_decay, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV)


@triton.jit
def _sgd_agc_rows(p_ptr, g_ptr, buf_ptr, rows_ptr, bases_ptr, first, end, lr, momentum, weight_decay, clip_factor,
                  eps, CLIP: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                  NESTEROV: tl.constexpr, acc_dtype: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                  ALIGN: tl.constexpr):
    """Steps the rows first .. first + ROWS - 1 (below end): norms, then the update pass."""
    row = first + tl.arange(0, ROWS)
    live = row < end
    tensor = tl.load(rows_ptr + row * 3, mask=live, other=0)
    row_start = tl.load(rows_ptr + row * 3 + 1, mask=live, other=0)
    length = tl.load(rows_ptr + row * 3 + 2, mask=live, other=0)  # 0: no row, nothing read
    p_start = tl.load(bases_ptr + tensor * 3, mask=live, other=0) + row_start
    g_start = tl.load(bases_ptr + tensor * 3 + 1, mask=live, other=0) + row_start
    buf_start = tl.load(bases_ptr + tensor * 3 + 2, mask=live, other=0) + row_start
    if ALIGN > 1:
        p_start = tl.multiple_of(p_start, ALIGN)
        g_start = tl.multiple_of(g_start, ALIGN)
        buf_start = tl.multiple_of(buf_start, ALIGN)
        length = tl.multiple_of(length, ALIGN)
    longest = tl.load(rows_ptr + first * 3 + 2)  # the table's rows are sorted, longest first
    cols = tl.arange(0, COLS)
    if CLIP:
        w_norm, g_norm = _row_norms(p_ptr, p_start, g_ptr, g_start, length, longest, acc_dtype, ROWS, COLS)
        factor, _ = agc_factor(w_norm, g_norm, clip_factor, eps)
    steps = tl.cdiv(longest, COLS)
    for step in range(0, steps):  # last block first: after the norm pass, the likeliest in cache
        offs = (steps - 1 - step) * COLS + cols
        mask = offs[None, :] < length[:, None]
        p_at = p_ptr + (p_start[:, None] + offs[None, :])
        p = tl.load(p_at, mask=mask, other=0.0).to(acc_dtype)
        d = tl.load(g_ptr + (g_start[:, None] + offs[None, :]), mask=mask, other=0.0).to(acc_dtype)
        if CLIP:
            d = d * factor[:, None]
        _sgd_update(p, d, p_at, buf_ptr + (buf_start[:, None] + offs[None, :]), mask, lr, momentum, weight_decay,
                    HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV)


@triton.jit
def _sgd_update(p, d, p_at, buf_at, mask, lr, momentum, weight_decay, HAS_WEIGHT_DECAY: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    """d ← d + wd·p; buf ← m·buf + d; d ← d + m·buf (nesterov) or buf; p ← p − lr·d, stored at
    p_at and buf_at (in their own dtypes) where ``mask``."""
    if HAS_WEIGHT_DECAY:
        d += weight_decay * p
    if HAS_MOMENTUM:
        buf = momentum * tl.load(buf_at, mask=mask, other=0.0).to(p.dtype) + d
        tl.store(buf_at, buf.to(buf_at.dtype.element_ty), mask=mask)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    tl.store(p_at, (p - lr * d).to(p_at.dtype.element_ty), mask=mask)


def sgd_agc_fused(backend: str, table: UnitTable, p0: torch.Tensor, g0: torch.Tensor, b0: torch.Tensor, *, lr,
                  momentum, weight_decay, nesterov, clip, clip_factor, eps) -> None:
    """One launch over every row of ``table``, whose first parameter, gradient and momentum buffer
    are p0, g0, b0 (the bases' origins; the parameters, and the buffers, of one launch share a
    dtype, the gradients another that may differ; each tensor's three operands are laid out
    alike). Without momentum ``b0`` is ``p0`` and is never written."""
    table.use()
    has_momentum = momentum != 0
    if backend == "triton":
        grid, ends, blocks = triton_geometry(table)
        with device_guard(p0):
            launch(
                _sgd_agc_kernel, grid,
                p0, g0, b0, table.rows, table.bases, *ends, table.n_units,
                lr, momentum, weight_decay, clip_factor, eps,
                CLIP=clip, HAS_WEIGHT_DECAY=weight_decay != 0, HAS_MOMENTUM=has_momentum,
                NESTEROV=nesterov, ACC_FP64=acc_dtype_for(p0.dtype, g0.dtype) == torch.float64, **blocks,
                num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS, traceable=False,
            )
        return
    cuda_launch("sgd_agc", p0.device, p0, g0, b0, table.rows, table.bases, table.n_units, table.layout.n_singles,
                table.layout.cuda_cols, p0.dtype, g0.dtype, lr, momentum, weight_decay, clip_factor, eps, clip,
                has_momentum, nesterov)


def sgd_agc_torch(param, grad, buf, *, lr, momentum, weight_decay, nesterov, clip, clip_factor, eps):
    """Plain PyTorch reference for one parameter (the CPU path), in place on ``param`` and on
    ``buf`` (the momentum buffer, zero before the first step; None without momentum)."""
    acc = acc_dtype_for(param.dtype, grad.dtype)
    p = param.to(acc)
    d = grad.to(acc)
    if clip:
        d = d * clip_scale(unit_norms(param, acc), unit_norms(grad, acc), clip_factor, eps)
    if weight_decay != 0:
        d = d + weight_decay * p
    if momentum != 0:
        new_buf = momentum * buf.to(acc) + d
        buf.copy_(new_buf)
        d = d + momentum * new_buf if nesterov else new_buf
    param.copy_(p - lr * d)
