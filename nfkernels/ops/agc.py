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
row of a ``UnitTable``: a device-side int64 table of rows ``(tensor index, first element of the
row within its tensor, length)``, which depends only on the shapes and is built once, and a small
table of each tensor's operands' offsets ``bases[tensor] = (grad offset, weight offset)`` in
elements from the group's first gradient and first weight (so every gradient of a group shares
one dtype, and every weight another, which may differ: torch allows fp32 parameters with bf16
gradients). One launch clips all rows, one program per row. Callers keep their tables (see
nfkernels.clip): when only addresses change (``zero_grad(set_to_none=True)`` gives new gradients
every step) only ``bases``, a few bytes per tensor, is rebuilt; a CUDA graph captured after one
eager step replays it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from nfkernels.ops._triton import tl, triton

from nfkernels.ops._library import cuda_launch, launch
from nfkernels.ops._utils import device_guard, dim0_rows, next_power_of_2

GRAD_NORM_FLOOR = 1e-6  # timm's grad_norm.clamp(min=1e-6)

# Rows longer than this are streamed in chunks of this size. Tests lower it.
MAX_BLOCK = 2048


@triton.jit
def _agc_kernel(g_ptr, w_ptr, rows_ptr, bases_ptr, clip_factor: tl.float64, eps: tl.float64,
                ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """One program clips one unit: G_i ← G_i · λ‖W_i‖*/max(‖G_i‖, 1e-6) unless ‖G_i‖ < λ‖W_i‖*.

    ``rows_ptr`` rows are (tensor, first element of the row in that tensor, length); ``bases_ptr``
    rows are the tensor's (grad offset, weight offset) in elements from g_ptr / w_ptr, each in its
    own pointer's element type (the two dtypes may differ). Squared norms
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
    tensor = tl.load(rows_ptr + unit * 3)
    row_start = tl.load(rows_ptr + unit * 3 + 1)
    length = tl.load(rows_ptr + unit * 3 + 2)
    g_start = tl.load(bases_ptr + tensor * 2) + row_start
    w_start = tl.load(bases_ptr + tensor * 2 + 1) + row_start
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


def has_dense_units(t: torch.Tensor) -> bool:
    """Whether each unit of ``t`` (timm's rule) is one dense block of memory, unit k starting
    k·(unit length) elements after ``t.data_ptr()``: what a fused launch's rows address."""
    if t.dim() <= 1:
        return t.is_contiguous()
    return dim0_rows(t) is not None


def acc_dtype_for(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 when any operand is fp64, else fp32: the precision the math of a unit runs in."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def unit_count(t: torch.Tensor) -> int:
    """How many units ``t`` has under timm's rule (ndim ≤ 1: one)."""
    return t.shape[0] if t.dim() > 1 else 1


@dataclass
class UnitTable:
    """The device tables of one fused launch over tensors whose units are dense rows (module
    docstring): ``rows`` (n_rows, 3) from the shapes, ``bases`` (n_tensors, n_operands) from the
    addresses, both int64 on ``device``; ``max_len`` sizes the kernel's block.

    Tables read by a captured CUDA graph must outlive it: once used during capture they are kept
    for the life of the process (``_CAPTURED``), whatever replaces them.
    """

    rows: torch.Tensor
    bases: torch.Tensor
    addresses: tuple[int, ...]
    n_rows: int
    max_len: int
    captured: bool = False
    # CUDA streams (handles) the tables have been read on. Work on a stream other than the one
    # that allocated them is invisible to the caching allocator until record_stream says so;
    # without it, a replaced table's memory could be handed out while a kernel there still reads it.
    streams: set = field(default_factory=set)

    def readdress(self, operands: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Point ``bases`` at ``operands`` (same shapes as when built, new addresses); False when
        an operand's offset is not a whole number of elements (then the caller regroups)."""
        addresses = _addresses(operands)
        if addresses == self.addresses:
            return True
        offsets = _offsets(operands, addresses)
        if offsets is None:
            return False
        device = self.bases.device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "nfkernels: the tensors' addresses changed, and the fused launch's table of them cannot be "
                "rebuilt during CUDA graph capture; run one eager step with the same tensors right before "
                "capturing, and keep the gradients in place (zero_grad(set_to_none=False))")
        # A captured graph keeps reading the old bases (kept in _CAPTURED); the new one is not captured yet.
        self.captured = False
        self.streams = set()
        self.bases = _to_device(offsets, device)
        self.addresses = addresses
        _note_allocation(self)
        return True

    def use(self) -> "UnitTable":
        """Mark a launch that reads the tables on the current stream (or into a graph being captured)."""
        if self.rows.device.type != "cuda":
            return self
        if torch.cuda.is_current_stream_capturing():
            if not self.captured:
                self.captured = True
                _CAPTURED.extend((self.rows, self.bases))
            return self
        stream = torch.cuda.current_stream(self.rows.device)
        if not self.captured and stream.cuda_stream not in self.streams:
            self.rows.record_stream(stream)
            self.bases.record_stream(stream)
            self.streams.add(stream.cuda_stream)
        return self


# Tables read by captured CUDA graphs: never freed (a graph holds raw addresses).
_CAPTURED: list[torch.Tensor] = []


def _addresses(operands: Sequence[Sequence[torch.Tensor]]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for tensors in operands for t in tensors)


def _offsets(operands: Sequence[Sequence[torch.Tensor]], addresses: tuple[int, ...]) -> np.ndarray | None:
    """(n_tensors, n_operands) element offsets from each operand's first tensor, or None when
    one is not a whole number of elements."""
    n_tensors = len(operands[0])
    byte_offsets = np.array(addresses, dtype=np.int64).reshape(len(operands), n_tensors)
    byte_offsets -= byte_offsets[:, :1]
    itemsizes = np.array([tensors[0].element_size() for tensors in operands], dtype=np.int64)[:, None]
    if (byte_offsets % itemsizes).any():
        return None
    return np.ascontiguousarray((byte_offsets // itemsizes).T)


def _to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host int64 table on ``device`` without blocking the host (pinned memory on CUDA); refused
    during CUDA graph capture, where the captured copy would read host memory the graph does not own."""
    table = torch.from_numpy(host)
    if device.type != "cuda":
        return table.to(device)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "nfkernels: the table of this fused launch is not built yet and cannot be built during CUDA "
            "graph capture; run one eager step with the same tensors before capturing")
    return table.pin_memory().to(device, non_blocking=True)


def _note_allocation(table: UnitTable) -> None:
    if table.rows.device.type == "cuda":  # allocated on the current stream, which the allocator knows about
        table.streams.add(torch.cuda.current_stream(table.rows.device).cuda_stream)


def unit_table(operands: Sequence[Sequence[torch.Tensor]]) -> UnitTable | None:
    """The tables of a fused launch over ``operands`` (one list per operand, item i of each
    list being tensor i's operand: same shape, units dense and laid out alike); None when an
    operand's offset from its first tensor is not a whole number of elements."""
    addresses = _addresses(operands)
    offsets = _offsets(operands, addresses)
    if offsets is None:
        return None
    device = operands[0][0].device
    units = np.array([unit_count(t) for t in operands[0]], dtype=np.int64)
    lengths = np.array([t.numel() for t in operands[0]], dtype=np.int64) // np.maximum(units, 1)
    tensor_of_row = np.repeat(np.arange(len(units), dtype=np.int64), units)
    first_row = np.repeat(np.cumsum(units) - units, units)
    row_lengths = lengths[tensor_of_row]
    rows = np.stack([tensor_of_row, (np.arange(len(tensor_of_row)) - first_row) * row_lengths, row_lengths], axis=1)
    table = UnitTable(_to_device(np.ascontiguousarray(rows), device), _to_device(offsets, device), addresses,
                      len(rows), int(lengths.max(initial=1)))
    _note_allocation(table)
    return table


def group_key(t: torch.Tensor) -> tuple:
    """Tensors sharing this key can be addressed by element offsets from one base pointer."""
    return (t.device, t.dtype, t.data_ptr() % t.element_size())


def block_size(max_len: int) -> int:
    return max(16, min(next_power_of_2(max_len), MAX_BLOCK))


def agc_triton(table: UnitTable, grad0: torch.Tensor, weight0: torch.Tensor, clip_factor: float, eps: float) -> None:
    """One launch of ``_agc_kernel`` over every row of ``table``, whose first gradient and weight
    are ``grad0`` and ``weight0`` (the bases' origins)."""
    table.use()
    with device_guard(grad0):
        launch(
            _agc_kernel, (table.n_rows,), grad0, weight0, table.rows, table.bases, clip_factor, eps,
            ACC_FP64=acc_dtype_for(grad0.dtype, weight0.dtype) == torch.float64, BLOCK=block_size(table.max_len),
            num_warps=4, traceable=False,
        )


def agc_cuda(table: UnitTable, grad0: torch.Tensor, weight0: torch.Tensor, clip_factor: float, eps: float) -> None:
    """The same launch through the CUDA kernel of nfkernels._C (csrc/agc.cu)."""
    table.use()
    cuda_launch("agc", grad0.device, grad0, weight0, table.rows, table.bases, table.n_rows, grad0.dtype,
                weight0.dtype, clip_factor, eps)


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
