"""SGD with unit-wise Adaptive Gradient Clipping, fused (Brock et al. 2021, arXiv:2102.06171,
§4.1 and Appendix; torch.optim.SGD semantics; clipping as timm's ``adaptive_clip_grad``).

Per unit row (units as in nfkernels.ops.agc), with learning rate η, momentum m, weight decay
wd and the AGC factor s_i = 1 if ‖G_i‖ < λ‖W_i‖*, else λ‖W_i‖*/max(‖G_i‖, 1e-6)::

    g ← s_i · g;  g ← g + wd·p;  buf ← m·buf + g  (buf ← g on the first step)
    nesterov: g ← g + m·buf, else g ← buf;  p ← p − η·g

A unit row fits in registers or cache, so one program reads p, g and buf once from memory
(the norm pass and the update pass touch the same row back to back) and writes p and buf once:
the bytes of torch's fused SGD alone. The gradient itself is left unclipped in memory.
"""
from __future__ import annotations

import torch
from nfkernels.ops._triton import tl, triton

from nfkernels.ops._library import cuda_launch, launch
from nfkernels.ops._utils import device_guard
from nfkernels.ops.agc import UnitTable, acc_dtype_for, block_size, clip_scale, unit_norms


@triton.jit
def _sgd_agc_kernel(
    p_ptr, g_ptr, buf_ptr, rows_ptr, bases_ptr,
    lr: tl.float64, momentum: tl.float64, weight_decay: tl.float64, clip_factor: tl.float64, eps: tl.float64,
    CLIP: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program updates one unit row: AGC factor from ‖W_i‖, ‖G_i‖, then the SGD step.

    ``rows_ptr`` rows are (tensor, first element of the row in that tensor, length); ``bases_ptr``
    rows are the tensor's (param, grad, buffer) offsets in elements from p_ptr / g_ptr / buf_ptr
    (the gradient's dtype may differ from the parameter's, which the buffer shares). Arithmetic in fp32 (fp64 when the parameter or the gradient is fp64); p and
    buf are stored in the parameter dtype. Without weight decay p is not added (0·inf would be NaN).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    # The scalars arrive as fp64 (an unannotated Python float would be fp32 and round fp64 math);
    # fp32 kernels narrow them once so that the per-element math stays fp32.
    if not ACC_FP64:
        lr, momentum = tl.cast(lr, tl.float32), tl.cast(momentum, tl.float32)
        weight_decay = tl.cast(weight_decay, tl.float32)
        clip_factor, eps = tl.cast(clip_factor, tl.float32), tl.cast(eps, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    tensor = tl.load(rows_ptr + row * 3)
    row_start = tl.load(rows_ptr + row * 3 + 1)
    length = tl.load(rows_ptr + row * 3 + 2)
    p_start = tl.load(bases_ptr + tensor * 3) + row_start
    g_start = tl.load(bases_ptr + tensor * 3 + 1) + row_start
    buf_start = tl.load(bases_ptr + tensor * 3 + 2) + row_start
    cols = tl.arange(0, BLOCK).to(tl.int64)
    scale = 1.0
    if CLIP:
        g_sq = tl.zeros([BLOCK], dtype=acc_dtype)
        w_sq = tl.zeros([BLOCK], dtype=acc_dtype)
        for start in range(0, length, BLOCK):
            mask = start + cols < length
            g = tl.load(g_ptr + g_start + start + cols, mask=mask, other=0.0).to(acc_dtype)
            w = tl.load(p_ptr + p_start + start + cols, mask=mask, other=0.0).to(acc_dtype)
            g_sq += g * g
            w_sq += w * w
        g_norm = tl.sqrt(tl.sum(g_sq, axis=0))
        w_norm = tl.sqrt(tl.sum(w_sq, axis=0))
        max_norm = clip_factor * tl.where(w_norm < eps, eps, w_norm)  # where() keeps NaN
        scale = tl.where(g_norm < max_norm, 1.0, max_norm / tl.where(g_norm < 1e-6, 1e-6, g_norm))
    for start in range(0, length, BLOCK):
        mask = start + cols < length
        p = tl.load(p_ptr + p_start + start + cols, mask=mask, other=0.0).to(acc_dtype)
        d = tl.load(g_ptr + g_start + start + cols, mask=mask, other=0.0).to(acc_dtype) * scale
        if HAS_WEIGHT_DECAY:
            d += weight_decay * p
        if HAS_MOMENTUM:
            buf = momentum * tl.load(buf_ptr + buf_start + start + cols, mask=mask, other=0.0).to(acc_dtype) + d
            tl.store(buf_ptr + buf_start + start + cols, buf.to(buf_ptr.dtype.element_ty), mask=mask)
            if NESTEROV:
                d = d + momentum * buf
            else:
                d = buf
        tl.store(p_ptr + p_start + start + cols, (p - lr * d).to(p_ptr.dtype.element_ty), mask=mask)


def sgd_agc_fused(backend: str, table: UnitTable, p0: torch.Tensor, g0: torch.Tensor, b0: torch.Tensor, *, lr,
                  momentum, weight_decay, nesterov, clip, clip_factor, eps) -> None:
    """One launch over every row of ``table``, whose first parameter, gradient and momentum buffer
    are p0, g0, b0 (the bases' origins; the parameters, and the buffers, of one launch share a
    dtype, the gradients another that may differ; each tensor's three operands are laid out
    alike). Without momentum ``b0`` is ``p0`` and is never written."""
    table.use()
    has_momentum = momentum != 0
    if backend == "triton":
        with device_guard(p0):
            launch(
                _sgd_agc_kernel, (table.n_rows,),
                p0, g0, b0, table.rows, table.bases, lr, momentum, weight_decay, clip_factor, eps,
                CLIP=clip, HAS_WEIGHT_DECAY=weight_decay != 0, HAS_MOMENTUM=has_momentum,
                NESTEROV=nesterov, ACC_FP64=acc_dtype_for(p0.dtype, g0.dtype) == torch.float64,
                BLOCK=block_size(table.max_len), num_warps=4, traceable=False,
            )
        return
    cuda_launch("sgd_agc", p0.device, p0, g0, b0, table.rows, table.bases, table.n_rows, p0.dtype, g0.dtype,
                lr, momentum, weight_decay, clip_factor, eps, clip, has_momentum, nesterov)


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
