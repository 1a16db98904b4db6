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
gradients). Callers keep their tables (see nfkernels.clip): when only addresses change
(``zero_grad(set_to_none=True)`` gives new gradients every step) only ``bases``, a few bytes per
tensor, is rebuilt; a CUDA graph captured after one eager step replays it.

One launch clips all rows, in three kinds of programs chosen by program id, so that nearly every
lane of every program works on an element (NFNet-F0: 44,924 of its 112,573 units are single
elements, the gains; the other rows are 27 to 3,072 elements long). The table holds, each region
sorted by decreasing length (stable: rows of one tensor stay in memory order):

- the single-element units (gains, scalars): a "flat" program takes ``FLAT_BLOCK`` of them, one
  per lane (‖W_i‖ = |w|, ‖G_i‖ = |g|);
- the "vector" rows, whose lengths are whole 16-byte vectors of the narrowest operand: a row
  program takes a few consecutive rows (a block of 16 bytes per thread and operand) and streams
  them ``cols`` elements at a time, in two passes (norms, then the scale); ``cols`` is chosen per
  table from the lengths (the widest power of two within 5% of the fewest lanes), and sorted rows
  end at about the same iteration;
- the other rows (F0: the stem's 27-element rows), likewise, without vector accesses.

The second pass re-reads what the first read, from cache if the rows in flight fit: at F0 a
program holds 2 rows of up to 1,536 elements and 16 programs fit on an SM, so the rows in flight
take up to ~50 MB for 132 SMs, the H100's L2 (8 rows of 128 columns per program: 4 times that);
and the second pass runs backwards, the most recently read block first, so that what a program
re-reads first is what is likeliest to be still in L1 or L2.

Alignment: a vector row of a tensor starts at a multiple of its length, so when the tensors'
addresses (all operands, and the base pointers') are multiples of ``align`` elements (known from
the addresses, recomputed when they change) every vector row is, and the vector programs are told
so (``tl.multiple_of``): they load and store 16-byte vectors. Otherwise (a view at an odd offset)
they run with scalar accesses: a hint that does not hold would be silent corruption.
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

# Launch geometry (module docstring). Tests lower them, so that small tensors span many programs.
# A vector row program's block (rows x cols) holds ROW_TILE_BYTES of its widest operand: one
# 16-byte access per thread (4 warps), so that few rows are in flight per SM and the second pass
# finds them in cache (module docstring).
ROW_TILE_BYTES = 2048
FLAT_BLOCK = 128  # single-element units per flat program: one per thread
MIN_COLS = 8  # the narrowest row block tried (shorter rows share a program with more rows)
COLS_SLACK = 1.05  # a wider row block may launch this many times the fewest lanes
# Row programs without vector accesses take this many times fewer rows: Triton then lays a
# thread's elements out one per row, and every row a thread touches keeps its offsets and
# addresses (64-bit) in registers (an fp32 SGD_AGC tile of 8 x 128: 168 registers; 2 x 128: 32).
UNALIGNED_SHRINK = 4
NUM_WARPS = 4
# The registers ptxas may use (.maxnreg). Without a cap it aims at full occupancy, 32 registers
# for 128 threads, and spills to meet it (4-8 bytes in some fp32/fp64 specializations). 64 gives 8
# programs per SM: at F0, 16 rows in flight (~26 MB, within L2) and 32 KB of loads in flight.
MAX_REGISTERS = 64


@triton.jit
def agc_factor(w_norm, g_norm, clip_factor, eps):
    """(factor, clipped) per unit: factor = λ‖W‖*/max(‖G‖, 1e-6) where clipped, else 1; clipped =
    not ‖G‖ < λ‖W‖*. The where() forms of the two max() keep NaN (tl.maximum would return the
    other operand), as torch's clamp does in timm; the floor is built in the norms' dtype (a
    literal would be an fp32 constant)."""
    max_norm = clip_factor * tl.where(w_norm < eps, eps, w_norm)
    clipped = ~(g_norm < max_norm)  # NaN norms clip: the unit becomes NaN, as in timm
    floor = tl.full([], 1e-6, g_norm.dtype)
    factor = tl.where(clipped, max_norm / tl.where(g_norm < floor, floor, g_norm), 1.0)
    return factor, clipped


@triton.jit(do_not_specialize=["n_singles", "vector_end", "n_units"])
def _agc_kernel(g_ptr, w_ptr, rows_ptr, bases_ptr, n_singles, vector_end, n_units, clip_factor: tl.float64,
                eps: tl.float64, ACC_FP64: tl.constexpr, FLAT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                ALIGN: tl.constexpr, SCALAR_ROWS: tl.constexpr, SCALAR_COLS: tl.constexpr):
    """Clips units: G_i ← G_i · λ‖W_i‖*/max(‖G_i‖, 1e-6) unless ‖G_i‖ < λ‖W_i‖* (module docstring).

    ``rows_ptr`` rows are (tensor, first element of the row in that tensor, length): the
    ``n_singles`` single-element units, then up to ``vector_end`` the rows whose lengths are
    multiples of a 16-byte vector, then up to ``n_units`` the others, each by decreasing length;
    ``bases_ptr`` rows are the tensor's (grad offset, weight offset) in elements from g_ptr / w_ptr,
    each in its own pointer's element type (the two dtypes may differ). The first cdiv(n_singles,
    FLAT) programs clip FLAT single-element units each, one per lane; then programs of ROWS vector
    rows, COLS elements of each row per iteration, told that every row start (in both operands)
    and length is a multiple of ALIGN; then programs of SCALAR_ROWS other rows, SCALAR_COLS
    elements per iteration. Row programs run two passes (norms, then the scale, which re-reads
    G_i from cache). Squared norms accumulate in fp32 (fp64 when either operand is fp64), in a
    fixed order. A kept unit is not written, so it costs one read of W_i and G_i.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    # The scalars arrive as fp64 (an unannotated Python float would be fp32 and round fp64 math);
    # fp32 kernels narrow them once so that the per-element math stays fp32.
    if not ACC_FP64:
        clip_factor = tl.cast(clip_factor, tl.float32)
        eps = tl.cast(eps, tl.float32)
    pid = tl.program_id(0)
    n_flat = tl.cdiv(n_singles, FLAT)
    n_vector = tl.cdiv(vector_end - n_singles, ROWS)
    # The kinds of programs live in their own functions: Triton requires a variable set in both
    # branches of an if to have one type in both.
    if pid < n_flat:
        _agc_singles(g_ptr, w_ptr, rows_ptr, bases_ptr, pid.to(tl.int64) * FLAT, n_singles, clip_factor, eps,
                     acc_dtype, FLAT)
    elif pid < n_flat + n_vector:
        _agc_rows(g_ptr, w_ptr, rows_ptr, bases_ptr, n_singles + (pid - n_flat).to(tl.int64) * ROWS, vector_end,
                  clip_factor, eps, acc_dtype, ROWS, COLS, ALIGN)
    else:
        _agc_rows(g_ptr, w_ptr, rows_ptr, bases_ptr, vector_end + (pid - n_flat - n_vector).to(tl.int64) * SCALAR_ROWS,
                  n_units, clip_factor, eps, acc_dtype, SCALAR_ROWS, SCALAR_COLS, 1)


@triton.jit
def _agc_singles(g_ptr, w_ptr, rows_ptr, bases_ptr, first, n_singles, clip_factor, eps, acc_dtype: tl.constexpr,
                 FLAT: tl.constexpr):
    """Clips the single-element units first .. first + FLAT - 1 (below n_singles), one per lane."""
    unit = first + tl.arange(0, FLAT)
    live = unit < n_singles
    tensor = tl.load(rows_ptr + unit * 3, mask=live, other=0)
    start = tl.load(rows_ptr + unit * 3 + 1, mask=live, other=0)
    g_at = g_ptr + (tl.load(bases_ptr + tensor * 2, mask=live, other=0) + start)
    w_at = w_ptr + (tl.load(bases_ptr + tensor * 2 + 1, mask=live, other=0) + start)
    g = tl.load(g_at, mask=live, other=0.0).to(acc_dtype)
    w = tl.load(w_at, mask=live, other=0.0).to(acc_dtype)
    factor, clipped = agc_factor(tl.abs(w), tl.abs(g), clip_factor, eps)
    tl.store(g_at, (g * factor).to(g_ptr.dtype.element_ty), mask=live & clipped)


@triton.jit
def _row_norms(w_ptr, w_start, g_ptr, g_start, length, longest, acc_dtype: tl.constexpr, ROWS: tl.constexpr,
               COLS: tl.constexpr):
    """(‖W‖, ‖G‖) of ROWS rows starting at w_start / g_start with ``length`` elements each (0: no
    row), walked in COLS-wide blocks up to ``longest``; squares summed in acc_dtype."""
    cols = tl.arange(0, COLS)
    g_sq = tl.zeros([ROWS, COLS], dtype=acc_dtype)
    w_sq = tl.zeros([ROWS, COLS], dtype=acc_dtype)
    for start in range(0, longest, COLS):
        offs = start + cols
        mask = offs[None, :] < length[:, None]
        g = tl.load(g_ptr + (g_start[:, None] + offs[None, :]), mask=mask, other=0.0).to(acc_dtype)
        w = tl.load(w_ptr + (w_start[:, None] + offs[None, :]), mask=mask, other=0.0).to(acc_dtype)
        g_sq += g * g
        w_sq += w * w
    return tl.sqrt(tl.sum(w_sq, axis=1)), tl.sqrt(tl.sum(g_sq, axis=1))


@triton.jit
def _agc_rows(g_ptr, w_ptr, rows_ptr, bases_ptr, first, end, clip_factor, eps, acc_dtype: tl.constexpr,
              ROWS: tl.constexpr, COLS: tl.constexpr, ALIGN: tl.constexpr):
    """Clips the rows first .. first + ROWS - 1 (below end): norms, then the clipped rows' scale."""
    row = first + tl.arange(0, ROWS)
    live = row < end
    tensor = tl.load(rows_ptr + row * 3, mask=live, other=0)
    row_start = tl.load(rows_ptr + row * 3 + 1, mask=live, other=0)
    length = tl.load(rows_ptr + row * 3 + 2, mask=live, other=0)  # 0: no row, nothing read
    g_start = tl.load(bases_ptr + tensor * 2, mask=live, other=0) + row_start
    w_start = tl.load(bases_ptr + tensor * 2 + 1, mask=live, other=0) + row_start
    if ALIGN > 1:
        g_start = tl.multiple_of(g_start, ALIGN)
        w_start = tl.multiple_of(w_start, ALIGN)
        length = tl.multiple_of(length, ALIGN)
    longest = tl.load(rows_ptr + first * 3 + 2)  # the table's rows are sorted, longest first
    cols = tl.arange(0, COLS)
    w_norm, g_norm = _row_norms(w_ptr, w_start, g_ptr, g_start, length, longest, acc_dtype, ROWS, COLS)
    factor, clipped = agc_factor(w_norm, g_norm, clip_factor, eps)
    clipped = clipped & live
    # Kept rows are masked off: neither read again nor written; a program that keeps all its rows
    # runs no second pass. Last block first: the likeliest still in cache.
    steps = tl.where(tl.max(clipped.to(tl.int32), axis=0) != 0, tl.cdiv(longest, COLS), 0)
    for step in range(0, steps):
        offs = (steps - 1 - step) * COLS + cols
        mask = (offs[None, :] < length[:, None]) & clipped[:, None]
        g_at = g_ptr + (g_start[:, None] + offs[None, :])
        g = tl.load(g_at, mask=mask, other=0.0).to(acc_dtype)
        tl.store(g_at, (g * factor[:, None]).to(g_ptr.dtype.element_ty), mask=mask)


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


@dataclass(frozen=True)
class RowRegion:
    """Rows ``start`` .. ``end`` - 1 of a table, in programs of ``rows`` rows of ``cols`` elements."""

    start: int
    end: int
    cols: int
    rows: int

    def programs(self, rows: int | None = None) -> int:
        return -(-(self.end - self.start) // (rows or self.rows))


@dataclass(frozen=True)
class RowLayout:
    """The shape-only part of a fused launch (module docstring): ``rows`` (n_units, 3) on the host,
    in three regions: the ``n_singles`` single-element units, in flat programs of ``flat_block``;
    then the ``vector`` rows, whose lengths are multiples of ``vector_width`` (the elements of a
    16-byte access of the narrowest operand), and then the other, ``scalar`` rows, each by
    decreasing length. ``row_tensors`` are the tensors with vector rows, whose addresses decide
    whether those rows are aligned; ``cuda_cols`` sizes the CUDA kernel's lane groups (all rows)."""

    rows: np.ndarray
    n_singles: int
    flat_block: int
    vector: RowRegion
    scalar: RowRegion
    vector_width: int
    row_tensors: np.ndarray
    cuda_cols: int

    @property
    def n_units(self) -> int:
        return len(self.rows)

    def lanes(self) -> tuple[int, int]:
        """(elements, lanes launched) of a launch of the Triton kernels with aligned vector rows:
        a flat program's lanes are its units, a row program's are its block times its iterations
        (over its longest row, its first)."""
        lanes = -(-self.n_singles // self.flat_block) * self.flat_block
        for region in (self.vector, self.scalar):
            longest = self.rows[region.start:region.end:region.rows, 2]
            lanes += int((-(-longest // region.cols)).sum()) * region.rows * region.cols
        return int(self.rows[:, 2].sum()), lanes


def row_layout(units: np.ndarray, lengths: np.ndarray, itemsizes: Sequence[int] = (4,)) -> RowLayout:
    """The layout of tensors with ``units[t]`` units of ``lengths[t]`` elements each (int64 arrays),
    for operands of ``itemsizes`` bytes per element. Vector row programs move ROW_TILE_BYTES of the
    widest operand per iteration; the other row programs UNALIGNED_SHRINK times fewer elements."""
    tile = max(1, ROW_TILE_BYTES // max(itemsizes))
    vector_width = 16 // min(itemsizes)
    tensor_of_row = np.repeat(np.arange(len(units), dtype=np.int64), units)
    first_row = np.repeat(np.cumsum(units) - units, units)
    row_lengths = lengths[tensor_of_row]
    rows = np.stack([tensor_of_row, (np.arange(len(tensor_of_row)) - first_row) * row_lengths, row_lengths], axis=1)
    single = row_lengths == 1
    vector = ~single & (row_lengths % vector_width == 0)
    # Stable: rows of one length keep their memory order.
    rows = np.ascontiguousarray(rows[np.lexsort((-row_lengths, ~vector, ~single))])
    n_singles, n_vector = int(np.count_nonzero(single)), int(np.count_nonzero(vector))
    regions = []
    for start, end, region_tile in ((n_singles, n_singles + n_vector, tile),
                                    (n_singles + n_vector, len(rows), max(1, tile // UNALIGNED_SHRINK))):
        cols = _row_cols(rows[start:end, 2], region_tile)
        regions.append(RowRegion(start, end, cols, max(1, region_tile // cols)))
    return RowLayout(rows, n_singles, FLAT_BLOCK, *regions, vector_width,
                     np.unique(rows[n_singles:n_singles + n_vector, 0]),
                     _row_cols(np.sort(rows[n_singles:, 2])[::-1], tile))


def _row_cols(lengths: np.ndarray, tile: int) -> int:
    """The row programs' block width for rows of ``lengths`` (sorted, longest first) in tiles of
    ``tile`` elements: the widest power of two within COLS_SLACK of the fewest lanes (a wider
    block streams a row in fewer iterations, and a program takes fewer rows)."""
    narrowest = min(MIN_COLS, tile)
    if not len(lengths):
        return narrowest
    widest = max(narrowest, min(tile, next_power_of_2(int(lengths[0]))))
    lanes = {}
    cols = narrowest
    while cols <= widest:
        rows = max(1, tile // cols)
        lanes[cols] = rows * int((-(-lengths[::rows] // cols)).sum()) * cols
        cols *= 2
    fewest = min(lanes.values())
    return max(c for c, n in lanes.items() if n <= COLS_SLACK * fewest)


@dataclass
class UnitTable:
    """The device tables of one fused launch over tensors whose units are dense rows (module
    docstring): ``rows`` (n_units, 3) from the shapes (``layout``), ``bases`` (n_tensors,
    n_operands) from the addresses, both int64 on ``device``; ``align``, what the row programs may
    assume of their rows' alignment (elements), follows the addresses.

    Tables read by a captured CUDA graph must outlive it: once used during capture they are kept
    for the life of the process (``_CAPTURED``), whatever replaces them.
    """

    rows: torch.Tensor
    bases: torch.Tensor
    addresses: tuple[int, ...]
    layout: RowLayout
    align: int
    captured: bool = False
    # CUDA streams (handles) the tables have been read on. Work on a stream other than the one
    # that allocated them is invisible to the caching allocator until record_stream says so;
    # without it, a replaced table's memory could be handed out while a kernel there still reads it.
    streams: set = field(default_factory=set)

    @property
    def n_units(self) -> int:
        return self.layout.n_units

    def readdress(self, operands: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Point ``bases`` at ``operands`` (same shapes as when built, new addresses); False when
        an operand's offset is not a whole number of elements (then the caller regroups)."""
        addresses = _addresses(operands)
        if addresses == self.addresses:
            return True
        placed = _placement(operands, addresses)
        if placed is None:
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
        self.bases = _to_device(placed[0], device)
        self.align = _row_align(self.layout, *placed[1:])
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


def _placement(operands: Sequence[Sequence[torch.Tensor]],
               addresses: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """((n_tensors, n_operands) element offsets from each operand's first tensor, the (n_operands,
    n_tensors) byte addresses, the operands' itemsizes), or None when an offset is not a whole
    number of elements."""
    n_tensors = len(operands[0])
    byte_addresses = np.array(addresses, dtype=np.int64).reshape(len(operands), n_tensors)
    byte_offsets = byte_addresses - byte_addresses[:, :1]
    itemsizes = np.array([tensors[0].element_size() for tensors in operands], dtype=np.int64)
    if (byte_offsets % itemsizes[:, None]).any():
        return None
    return np.ascontiguousarray((byte_offsets // itemsizes[:, None]).T), byte_addresses, itemsizes


def _row_align(layout: RowLayout, byte_addresses: np.ndarray, itemsizes: np.ndarray) -> int:
    """The largest power of two A, at most the layout's vector width, such that every vector row
    starts A-element aligned in every operand, as an address and as an offset from the operand's
    first tensor (the kernel's base pointer), and has a multiple of A elements: the tensors'
    addresses and the base's are multiples of A·itemsize (a tensor's rows start at multiples of
    its row length, a multiple of the vector width). 1 without vector rows."""
    if not len(layout.row_tensors):
        return 1

    def aligned_elements(addresses: np.ndarray) -> int:
        # The largest power of two dividing every address of an operand, in its elements.
        ored = np.bitwise_or.reduce(addresses, axis=1).tolist()
        return min((a & -a) // size for a, size in zip(ored, itemsizes.tolist()))

    # Host time per step: all the tensors first (one reduction, and usually all aligned).
    align = aligned_elements(byte_addresses)
    if align < layout.vector_width:
        align = aligned_elements(np.concatenate([byte_addresses[:, :1], byte_addresses[:, layout.row_tensors]], axis=1))
    return max(1, min(layout.vector_width, align))


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
    placed = _placement(operands, addresses)
    if placed is None:
        return None
    device = operands[0][0].device
    units = np.array([unit_count(t) for t in operands[0]], dtype=np.int64)
    lengths = np.array([t.numel() for t in operands[0]], dtype=np.int64) // np.maximum(units, 1)
    layout = row_layout(units, lengths, placed[2].tolist())
    table = UnitTable(_to_device(layout.rows, device), _to_device(placed[0], device), addresses, layout,
                      _row_align(layout, *placed[1:]))
    _note_allocation(table)
    return table


def group_key(t: torch.Tensor) -> tuple:
    """Tensors sharing this key can be addressed by element offsets from one base pointer."""
    return (t.device, t.dtype, t.data_ptr() % t.element_size())


def triton_geometry(table: UnitTable) -> tuple[tuple[int], tuple[int, int], dict]:
    """(grid, (end of the single-element units, end of the vector rows), block constexprs) of a
    launch of the Triton kernels over ``table``."""
    layout = table.layout
    vector, scalar = layout.vector, layout.scalar
    rows = vector.rows if table.align > 1 else max(1, vector.rows // UNALIGNED_SHRINK)
    programs = -(-layout.n_singles // layout.flat_block) + vector.programs(rows) + scalar.programs()
    return ((programs,), (layout.n_singles, vector.end),
            dict(FLAT=layout.flat_block, ROWS=rows, COLS=vector.cols, ALIGN=table.align, SCALAR_ROWS=scalar.rows,
                 SCALAR_COLS=scalar.cols))


def agc_triton(table: UnitTable, grad0: torch.Tensor, weight0: torch.Tensor, clip_factor: float, eps: float) -> None:
    """One launch of ``_agc_kernel`` over every row of ``table``, whose first gradient and weight
    are ``grad0`` and ``weight0`` (the bases' origins)."""
    table.use()
    grid, ends, blocks = triton_geometry(table)
    with device_guard(grad0):
        launch(
            _agc_kernel, grid, grad0, weight0, table.rows, table.bases, *ends, table.n_units, clip_factor, eps,
            ACC_FP64=acc_dtype_for(grad0.dtype, weight0.dtype) == torch.float64, **blocks, num_warps=NUM_WARPS,
            maxnreg=MAX_REGISTERS, traceable=False,
        )


def agc_cuda(table: UnitTable, grad0: torch.Tensor, weight0: torch.Tensor, clip_factor: float, eps: float) -> None:
    """The same launch through the CUDA kernel of nfkernels._C (csrc/agc.cu), which sizes its own
    blocks from the row programs' width (and checks alignment row by row)."""
    table.use()
    cuda_launch("agc", grad0.device, grad0, weight0, table.rows, table.bases, table.n_units, table.layout.n_singles,
                table.layout.cuda_cols, grad0.dtype, weight0.dtype, clip_factor, eps)


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
