"""Unit-wise Adaptive Gradient Clipping (Brock et al. 2021, arXiv:2102.06171, §4.1; timm
``timm/utils/agc.py`` ``adaptive_clip_grad``).

Units (timm's rule): a tensor with ndim ≤ 1 is one unit; otherwise each slice along dim 0 (one
output unit of a conv or linear weight) is a unit. For unit i with weight W_i, gradient G_i and
clip factor λ::

    ‖W_i‖* = max(‖W_i‖, eps)
    G_i ← G_i                                    if ‖G_i‖ < λ‖W_i‖*
    G_i ← G_i · λ‖W_i‖* / max(‖G_i‖, 1e-6)       otherwise

The test is timm's ``torch.where(grad_norm < max_norm, ...)``; at equality the factor is 1.
Non-finite values propagate as they do in timm: NaN in W_i or G_i makes the unit all-NaN, and
‖G_i‖ = inf scales it by 0 (finite entries become 0, infinite ones NaN), so a non-finite gradient
stays non-finite for loss scalers to see; other units are untouched. No derivative: AGC edits
gradients in place, outside autograd.

Fused layout: every unit of every tensor in a (device, gradient dtype, weight dtype) group is one
row of a device-side int64 table ``(grad offset, weight offset, length)``, offsets counted in
elements from the first gradient and the first weight of the group (so every gradient of a group
shares one dtype, and every weight another, which may differ: torch allows fp32 parameters with
bf16 gradients). One launch clips all rows, one program per row. The table is cached, keyed by
the tensors' addresses, shapes and dtypes, so a training loop whose gradients stay in place builds
it once; a CUDA graph captured after one eager step replays it.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Sequence

import torch
from nfkernels.ops._triton import tl, triton

from nfkernels.ops._library import cuda_launch
from nfkernels.ops._utils import device_guard, dim0_rows, next_power_of_2

GRAD_NORM_FLOOR = 1e-6  # timm's grad_norm.clamp(min=1e-6)

# Rows longer than this are streamed in chunks of this size. Tests lower it.
MAX_BLOCK = 2048

# Distinct parameter sets whose row tables stay cached (a model, its EMA copy, eval clones...).
TABLE_CACHE_SIZE = 32


@triton.jit
def _agc_kernel(g_ptr, w_ptr, table_ptr, clip_factor: tl.float64, eps: tl.float64, ACC_FP64: tl.constexpr,
                BLOCK: tl.constexpr):
    """One program clips one unit: G_i ← G_i · λ‖W_i‖*/max(‖G_i‖, 1e-6) unless ‖G_i‖ < λ‖W_i‖*.

    ``table_ptr`` rows are (grad offset, weight offset, length) in elements from g_ptr / w_ptr,
    each offset in its own pointer's element type (the two dtypes may differ). Squared norms
    accumulate in fp32 (fp64 when either operand is fp64). The where() forms of the two
    max() keep NaN (tl.maximum would return the other operand), as torch's clamp does in timm.
    A kept unit is not written, so it costs one read of W_i and G_i.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    # The scalars arrive as fp64 (an unannotated Python float would be fp32 and round fp64 math);
    # fp32 kernels narrow them once so that the per-element math stays fp32.
    if not ACC_FP64:
        clip_factor = tl.cast(clip_factor, tl.float32)
        eps = tl.cast(eps, tl.float32)
    unit = tl.program_id(0).to(tl.int64)
    g_start = tl.load(table_ptr + unit * 3)
    w_start = tl.load(table_ptr + unit * 3 + 1)
    length = tl.load(table_ptr + unit * 3 + 2)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    g_sq = tl.zeros([BLOCK], dtype=acc_dtype)
    w_sq = tl.zeros([BLOCK], dtype=acc_dtype)
    for start in range(0, length, BLOCK):
        mask = start + cols < length
        g = tl.load(g_ptr + g_start + start + cols, mask=mask, other=0.0).to(acc_dtype)
        w = tl.load(w_ptr + w_start + start + cols, mask=mask, other=0.0).to(acc_dtype)
        g_sq += g * g
        w_sq += w * w
    g_norm = tl.sqrt(tl.sum(g_sq, axis=0))
    w_norm = tl.sqrt(tl.sum(w_sq, axis=0))
    max_norm = clip_factor * tl.where(w_norm < eps, eps, w_norm)
    clip_unit = tl.where(g_norm < max_norm, 0, 1)
    if clip_unit == 1:
        scale = max_norm / tl.where(g_norm < 1e-6, 1e-6, g_norm)
        for start in range(0, length, BLOCK):
            mask = start + cols < length
            offs = g_ptr + g_start + start + cols
            g = tl.load(offs, mask=mask, other=0.0).to(acc_dtype)
            tl.store(offs, (g * scale).to(g_ptr.dtype.element_ty), mask=mask)


def unit_rows(t: torch.Tensor) -> torch.Tensor | None:
    """The (units, unit length) view of ``t``'s memory under timm's unit rule, or None when a
    unit is not one dense block (then the caller works on a dense copy)."""
    if t.dim() <= 1:
        return t.view(1, -1) if t.is_contiguous() else None
    return dim0_rows(t)


def acc_dtype_for(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 when any operand is fp64, else fp32: the precision the math of a unit runs in."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


@dataclass
class RowTable:
    """Device-side table of unit rows for one group of same-dtype tensors on one device.

    Each row of ``table`` holds one int64 offset per operand (in elements from that operand's
    first tensor) followed by the row length; ``max_len`` sizes the kernel's block.
    """

    table: torch.Tensor
    n_rows: int
    max_len: int
    captured: bool = False  # read by a captured CUDA graph: must outlive it, never evicted
    # CUDA streams (handles) the table has been read on. Work on a stream other than the one that
    # allocated it is invisible to the caching allocator until record_stream says so; without it,
    # an evicted table's memory could be handed out while a kernel there still reads it.
    streams: set = field(default_factory=set)

    def record_use(self) -> None:
        """Tell the caching allocator about a launch on the current stream (once per stream)."""
        if self.table.device.type != "cuda" or self.captured:  # captured tables are never freed
            return
        stream = torch.cuda.current_stream(self.table.device)
        if stream.cuda_stream not in self.streams:
            self.table.record_stream(stream)
            self.streams.add(stream.cuda_stream)


_table_cache: collections.OrderedDict[tuple, RowTable] = collections.OrderedDict()


def _table_key(tensor_lists: Sequence[Sequence[torch.Tensor]]) -> tuple:
    return tuple(
        (rows[0].dtype,) + tuple((t.data_ptr(), t.shape[0], t.shape[1]) for t in rows) for rows in tensor_lists
    ) + (tensor_lists[0][0].device,)


def row_table(tensor_lists: Sequence[Sequence[torch.Tensor]]) -> RowTable:
    """The cached RowTable of the unit-row views in ``tensor_lists`` (one list per operand, all
    lists of equal length, item k of every list describing the same unit rows).

    Built on the host and copied without blocking it (pinned memory); building while a CUDA
    graph is being captured is refused, because the captured copy would read host memory whose
    lifetime the graph does not own.
    """
    key = _table_key(tensor_lists)
    device = tensor_lists[0][0].device
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    cached = _table_cache.get(key)
    if cached is not None:
        _table_cache.move_to_end(key)
        cached.captured = cached.captured or capturing
        cached.record_use()
        return cached
    if capturing:
        raise RuntimeError(
            "nfkernels: the row table for these tensors is not built yet and cannot be built during CUDA "
            "graph capture; run one eager step with the same tensors before capturing"
        )
    columns = []
    lengths = []
    for rows in tensor_lists:
        base = rows[0].data_ptr()
        itemsize = rows[0].element_size()
        starts = []
        for r in rows:
            first = (r.data_ptr() - base) // itemsize
            starts.append(torch.arange(r.shape[0], dtype=torch.int64) * r.shape[1] + first)
        columns.append(torch.cat(starts))
    for r in tensor_lists[0]:
        lengths.append(torch.full((r.shape[0],), r.shape[1], dtype=torch.int64))
    host = torch.stack(columns + [torch.cat(lengths)], dim=1).contiguous()
    if device.type == "cuda":
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    entry = RowTable(table, host.shape[0], max(r.shape[1] for r in tensor_lists[0]))
    if device.type == "cuda":  # allocated on the current stream, which the allocator knows about
        entry.streams.add(torch.cuda.current_stream(device).cuda_stream)
    _table_cache[key] = entry
    evictable = [k for k, e in _table_cache.items() if not e.captured]
    for old in evictable[: max(0, len(_table_cache) - TABLE_CACHE_SIZE)]:
        del _table_cache[old]
    return entry


def group_key(t: torch.Tensor) -> tuple:
    """Tensors sharing this key can be addressed by element offsets from one base pointer."""
    return (t.device, t.dtype, t.data_ptr() % t.element_size())


def block_size(max_len: int) -> int:
    return max(16, min(next_power_of_2(max_len), MAX_BLOCK))


def agc_triton(weight_rows: list[torch.Tensor], grad_rows: list[torch.Tensor], clip_factor: float, eps: float) -> None:
    """One launch of ``_agc_kernel`` over all rows: one device, the gradients sharing one dtype and
    alignment, the weights another."""
    entry = row_table([grad_rows, weight_rows])
    g0, w0 = grad_rows[0], weight_rows[0]
    with device_guard(g0):
        _agc_kernel[(entry.n_rows,)](
            g0, w0, entry.table, clip_factor, eps,
            ACC_FP64=acc_dtype_for(g0.dtype, w0.dtype) == torch.float64, BLOCK=block_size(entry.max_len),
            num_warps=4,
        )


def agc_cuda(weight_rows: list[torch.Tensor], grad_rows: list[torch.Tensor], clip_factor: float, eps: float) -> None:
    """The same launch through the CUDA kernel of nfkernels._C (csrc/agc.cu)."""
    entry = row_table([grad_rows, weight_rows])
    g0, w0 = grad_rows[0], weight_rows[0]
    cuda_launch("agc", g0.device, g0, w0, entry.table, entry.n_rows, g0.dtype, w0.dtype, clip_factor, eps)


def unit_norms(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """‖unit‖ for each unit of ``t`` in dtype ``acc``, shaped to broadcast against t."""
    x = t.to(acc)
    if t.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, t.dim())), keepdim=True)


def clip_scale(w_norm: torch.Tensor, g_norm: torch.Tensor, clip_factor: float, eps: float) -> torch.Tensor:
    """The factor each unit's gradient is multiplied by: 1 if kept, else λ‖W‖*/max(‖G‖, 1e-6)."""
    max_norm = w_norm.clamp(min=eps) * clip_factor  # clamp keeps NaN, like timm's clamp_
    clipped = max_norm / g_norm.clamp(min=GRAD_NORM_FLOOR)
    return torch.where(g_norm < max_norm, torch.ones_like(clipped), clipped)


def agc_torch(weights: list[torch.Tensor], grads: list[torch.Tensor], clip_factor: float, eps: float) -> None:
    """Plain PyTorch reference (the CPU path), any float dtypes, norms in fp32 (fp64 when the
    weight or the gradient is fp64)."""
    for w, g in zip(weights, grads):
        acc = acc_dtype_for(w.dtype, g.dtype)
        scale = clip_scale(unit_norms(w, acc), unit_norms(g, acc), clip_factor, eps)
        g.copy_(g.to(acc) * scale)
