"""Scaled activations with a fused per-channel bias (Brock et al. 2021, arXiv:2101.08692 and
arXiv:2102.06171; DeepMind ``nfnets/base.py`` ``nonlinearities``; timm ``_nonlin_gamma``).

For x of shape (N, C, ...) and a bias b with C elements, broadcast over channel dim 1::

    y      = γ · scale · f(x + b_c)
    dx     = dy · γ · scale · f'(x + b_c)
    dbias_c = Σ over every dim but 1 of dx

γ is the NF gain of f (``NF_GAMMA``: the value that keeps a unit-Gaussian input's output at unit
variance, 1/std(f(z)) for z ~ N(0, 1), from DeepMind's table, which timm copies). In an NF block the caller passes
scale = β (1 / expected std), so γ·β·f(x + b) replaces a separate bias add, activation and scale.

The activations, z = x + b (σ the logistic sigmoid, Φ/φ the standard normal cdf/pdf)::

    gelu         z·Φ(z)                               Φ(z) + z·φ(z)          (exact, erf)
    gelu_tanh    ½z(1 + t), t = tanh(u),              ½(1 + t) + ½z(1 − t²)·u'
                 u = √(2/π)(z + 0.044715z³)           u' = √(2/π)(1 + 3·0.044715z²)
    relu         max(z, 0)                            [z > 0]
    silu         z·σ(z)                               σ(z)(1 + z(1 − σ(z)))
    relu6        min(max(z, 0), 6)                    [0 < z < 6]
    elu, celu    z if z > 0 else expm1(z)             1 if z > 0 else exp(z)   (α = 1)
    leaky_relu   z if z > 0 else 0.01z                1 if z > 0 else 0.01
    selu         λ(z if z > 0 else α·expm1(z))        λ(1 if z > 0 else α·exp(z))
    sigmoid      σ(z)                                 σ(z)(1 − σ(z))
    tanh         tanh(z)                              1 − tanh²(z)
    softplus     max(z, 0) + log1p(exp(−|z|))         σ(z)
    softsign     z / (1 + |z|)                        1 / (1 + |z|)²
    log_sigmoid  min(z, 0) − log1p(exp(−|z|))         σ(−z)
    identity     z                                    1

Gradients at the kinks (z = 0, z = 6) follow torch: the derivative there is 0 for relu/relu6
and the z ≤ 0 branch elsewhere. NaN follows torch too: f(NaN) = NaN for every activation, and
f'(NaN) is what torch's elementwise backward formulas give (its CUDA kernels; its vectorized CPU
kernels are not self-consistent at NaN): they test z ≤ 0 (relu, relu6 also z ≥ 6, elu, celu,
selu) or z > 0 (leaky_relu), which NaN fails, so f'(NaN) = 1 for relu, relu6, elu, celu, λ for
selu, 0.01 for leaky_relu, and NaN for the smooth activations. The kernels write the branches
in those same comparisons (tl.maximum/tl.minimum and ``z > 0 ? z : 0`` would return 0 for NaN).

Derivatives in saturated tails are formed without cancellation in the kernels (σ'(z) =
e/(1 + e)² with e = e^−|z|, tanh' = 4e/(1 + e)² with e = e^−2|z|, softsign' = 1/(1 + |z|)²), and
gelu_tanh' stays finite for any finite z. The torch path uses torch's own functions and their
backward formulas, which torch takes from the rounded output (σ' = y(1 − y), tanh' = 1 − y²) or
from a composite's autograd (softsign), and whose gelu_tanh' is NaN beyond |z| ≈ 1e13 (fp32):
its derivatives there have only the absolute accuracy of the dtype, not the relative accuracy of
docs/design.md §6. Softplus and log_sigmoid are exact on both paths (the torch path uses logaddexp,
not F.softplus, whose threshold of 20 is off by up to 2e-9).

Triton's libdevice (tanh, log1p, expm1) does not run under TRITON_INTERPRET=1, so the kernels
build those from tl.exp/tl.log with accuracy-preserving forms (see _expm1, _log1p, _tanh).
Compiled kernels take the Python float γ·scale as an fp32 argument, so fp64 results agree with
float64 math to ~1e-7 relative there (the interpreter keeps it fp64).

Work split (_plan): x is walked as (N, C, HW) with channels on dim 1, NCHW as (N, C, H·W) and
channels-last or (N, C) as (pixels, C, 1). A program covers a block of channels and a share of
their rows, in tiles whose width is a power of two that fits the row: NFNet's H·W are 9·2^k
(2304 = 4·512 + 256, 36 = 2·16 + 4), which a next-power-of-two tile would pad by up to 44%. The
backward finishes dbias in the kernel: a channel block's program writes it, or, when the block is
split over several programs, the one that finishes last adds their partial sums (fixed order):
one kernel launch per call each way, plus a zeroed counter (torch.zeros) for a split backward.

The CUDA kernels of csrc/scaled_act_fwd.cu and _bwd.cu (``torch.ops.nfkernels.scaled_act_fwd_cuda``
/ ``_bwd_cuda``) run the same math on the same (N, C, HW) view, behind the same autograd formula,
with their own split (make_act_plan in csrc/activations.cuh): each thread walks vectors of its
own channels (8-byte vectors where 16-byte ones do not fit the rows, as at H·W = 36 in bf16).
They take coeff in the accumulation dtype and finish dbias the same way, counters zeroed by the
launcher (cudaMemsetAsync).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from nfkernels.ops._triton import tl, triton

from nfkernels.ops._library import cuda_launch, define_cuda_op, define_op, dtype_name, kernels_are_compiled, launch
from nfkernels.ops._utils import new_empty, new_empty_like, next_power_of_2

# NF gains γ (DeepMind nfnets/base.py; timm _nonlin_gamma). gelu_tanh is DeepMind's own gelu.
NF_GAMMA = {
    "gelu": 1.7015043497085571,
    "gelu_tanh": 1.7015043497085571,
    "relu": 1.7139588594436646,
    "silu": 1.7881293296813965,
    "relu6": 1.7131484746932983,
    "elu": 1.2716004848480225,
    "celu": 1.270926833152771,
    "leaky_relu": 1.70590341091156,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "tanh": 1.5939117670059204,
    "softplus": 1.9203323125839233,
    "softsign": 2.338853120803833,
    "log_sigmoid": 1.9193484783172607,
    "identity": 1.0,
}
ACTIVATIONS = tuple(NF_GAMMA)

LEAKY_RELU_SLOPE = 0.01  # the kernels spell it, and selu's λ and α, as literals

# Tile geometry (see _plan). A tile is [BLOCK_N, BLOCK_C, width] of the (N, C, HW) view with about
# TILE_ELEMS elements (16 per thread of NUM_WARPS warps; for fp64 an eighth, one 16-byte vector per
# thread: its erf, exp and division subroutines take many registers, and spilled with more), width
# a power of two: a row of H·W elements is covered by H·W // CHUNK tiles CHUNK wide plus one tile
# per set bit of the rest, so no lane idles on padding. Channels-last tiles hold at most
# MAX_BLOCK_C channels, so the dbias partial sums stay few next to dx. Tests lower these.
TILE_ELEMS = 2048
MAX_CHUNK = 1024
MAX_BLOCK_C = 64
NUM_WARPS = 4
# Programs the launchers aim for, per streaming multiprocessor: fewer leave the memory system
# idle. (CPU_PROGRAMS in all under the interpreter, which runs programs one after the other; tests
# raise it to split channel blocks.) A backward that splits a channel block's work over several
# programs pays for it with a zeroed counter and the last program's finish, so it splits only
# blocks of at least SPLIT_MIN_ELEMS elements and only while under half the target.
PROGRAMS_PER_SM = 4
CPU_PROGRAMS = 1
SPLIT_MIN_ELEMS = 8 * 2048
# The last program of a split channel block adds the partial sums FINISH_ELEMS at a time.
FINISH_ELEMS = 2048
# A row piece narrower than this many bytes reads part of a 32-byte sector per row: avoided
# unless the row itself is that short.
MIN_SEGMENT_BYTES = 32


@triton.jit
def _expm1(z):
    """exp(z) − 1 without cancellation near 0: Kahan's (u − 1)·z / log(u), u = exp(z), whose
    ratio cancels the rounding error of u. Used for |z| < 1 only, where log(u) is safe."""
    u = tl.exp(z)
    um1 = u - 1.0
    near_zero = tl.abs(z) < 1.0
    # u rounds to exactly 1 only for |z| under an ulp, where expm1(z) = z; elsewhere log(u) ≠ 0.
    exact_one = um1 == 0.0
    log_u = tl.log(tl.where(near_zero & ~exact_one, u, 2.0))
    return tl.where(near_zero, tl.where(exact_one, z, um1 * z / log_u), um1)


@triton.jit
def _log1p(e):
    """log(1 + e) for e ≥ 0 without losing e when it is tiny (Goldberg 1991, Thm 4)."""
    u = 1.0 + e
    um1 = u - 1.0
    return tl.where(um1 == 0.0, e, tl.log(u) * (e / tl.where(um1 == 0.0, 1.0, um1)))


@triton.jit
def _tanh(z):
    """tanh(z) = sign(z)·(−m)/(2 + m), m = expm1(−2|z|) ∈ (−1, 0]: no overflow, no cancellation."""
    m = _expm1(-2.0 * tl.abs(z))
    t = -m / (2.0 + m)
    return tl.where(z < 0.0, -t, t)


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    """f(z) for the activation named by ACT (formulas in the module docstring)."""
    if ACT == "gelu":
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        # ½(1 + tanh(u)) = σ(2u): no cancellation where tanh(u) ≈ −1.
        y = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    elif ACT == "relu":
        # Comparisons false for NaN keep z, so NaN propagates (tl.maximum would return 0).
        y = tl.where(z < 0.0, 0.0, z)
    elif ACT == "silu":
        y = z * tl.sigmoid(z)
    elif ACT == "relu6":
        y = tl.where(z < 0.0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif ACT == "elu" or ACT == "celu":
        y = tl.where(z > 0.0, z, _expm1(z))
    elif ACT == "leaky_relu":
        y = tl.where(z > 0.0, z, 0.01 * z)
    elif ACT == "selu":
        y = 1.0507009873554805 * tl.where(z > 0.0, z, 1.6732632423543772 * _expm1(z))
    elif ACT == "sigmoid":
        y = tl.sigmoid(z)
    elif ACT == "tanh":
        y = _tanh(z)
    elif ACT == "softplus":
        # max(z, 0) drops NaN, the log1p term keeps it.
        y = tl.maximum(z, 0.0) + _log1p(tl.exp(-tl.abs(z)))
    elif ACT == "softsign":
        y = z / (1.0 + tl.abs(z))
    elif ACT == "log_sigmoid":
        y = tl.minimum(z, 0.0) - _log1p(tl.exp(-tl.abs(z)))
    else:  # identity
        y = z
    return y


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """f'(z) for the activation named by ACT (formulas in the module docstring)."""
    if ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        g = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == "gelu_tanh":
        # With s = σ(2u) = ½(1 + tanh u): f = z·s and f' = s + z·2s(1 − s)·u'. Beyond |z| = 1e6
        # f' is exactly 1 or 0 (s(1 − s) underflows to 0), but z³ and z² would overflow there and
        # make 0·inf = NaN: the clamp (a where(), which keeps NaN) keeps them finite.
        zc = tl.where(z > 1e6, 1e6, tl.where(z < -1e6, -1e6, z))
        s = tl.sigmoid(1.5957691216057308 * (zc + 0.044715 * zc * zc * zc))
        du = 0.7978845608028654 * (1.0 + 0.134145 * zc * zc)
        g = s + 2.0 * zc * s * (1.0 - s) * du
    elif ACT == "relu":
        # Written as torch's backward tests it (z ≤ 0), so that f'(NaN) = 1 as in torch.
        g = tl.where(z <= 0.0, 0.0, 1.0)
    elif ACT == "silu":
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    elif ACT == "relu6":
        g = tl.where((z <= 0.0) | (z >= 6.0), 0.0, 1.0)
    elif ACT == "elu" or ACT == "celu":
        g = tl.where(z <= 0.0, tl.exp(z), 1.0)
    elif ACT == "leaky_relu":
        # A scalar 0.01 would be typed fp32 and round fp64 gradients; this one has z's dtype.
        g = tl.where(z > 0.0, 1.0, tl.full(z.shape, 0.01, z.dtype))
    elif ACT == "selu":
        g = 1.0507009873554805 * tl.where(z <= 0.0, 1.6732632423543772 * tl.exp(z), 1.0)
    elif ACT == "sigmoid":
        # σ(z)σ(−z) = e/(1 + e)², e = exp(−|z|): s(1 − s) would cancel where σ(z) rounds to 1.
        e = tl.exp(-tl.abs(z))
        g = e / ((1.0 + e) * (1.0 + e))
    elif ACT == "tanh":
        # 1 − tanh²(z) = 4e/(1 + e)², e = exp(−2|z|): stays accurate where tanh(z) rounds to ±1.
        e = tl.exp(-2.0 * tl.abs(z))
        g = 4.0 * e / ((1.0 + e) * (1.0 + e))
    elif ACT == "softplus":
        g = tl.sigmoid(z)
    elif ACT == "softsign":
        d = 1.0 + tl.abs(z)
        g = 1.0 / (d * d)
    elif ACT == "log_sigmoid":
        g = tl.sigmoid(-z)
    else:  # identity
        g = tl.full(z.shape, 1.0, z.dtype)
    return g


@triton.jit
def _fwd_tile(x_ptr, y_ptr, rows, row_mask, b, col0, coeff, ACT: tl.constexpr, ACC: tl.constexpr,
              WIDTH: tl.constexpr):
    """y = coeff·f(x + b) on columns [col0, col0 + WIDTH) of the rows."""
    offsets = rows[:, :, None] + (col0 + tl.arange(0, WIDTH))[None, None, :]
    mask = row_mask[:, :, None]
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC) + b
    tl.store(y_ptr + offsets, (_act_fwd(z, ACT) * coeff).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(dy_ptr, x_ptr, dx_ptr, rows, row_mask, b, col0, coeff, ACT: tl.constexpr, ACC: tl.constexpr,
              WIDTH: tl.constexpr):
    """dx = dy·coeff·f'(x + b) on columns [col0, col0 + WIDTH) of the rows; returns each row's
    sum of dx over those columns ([BLOCK_N, BLOCK_C], 0 on masked rows)."""
    offsets = rows[:, :, None] + (col0 + tl.arange(0, WIDTH))[None, None, :]
    mask = row_mask[:, :, None]
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC) + b
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
    dx = tl.where(mask, dy * _act_grad(z, ACT) * coeff, 0.0)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    return tl.sum(dx, axis=2)


@triton.jit
def _partial_rows(partial_ptr, g0, c, c_mask, C, groups, ROWS: tl.constexpr):
    """partial[g0 + i, c] for i < ROWS ([ROWS, BLOCK_C], 0 past the last group), read with .cg:
    from L2, where the other programs' stores are, never from a stale L1 line."""
    g = g0 + tl.arange(0, ROWS)
    return tl.load(partial_ptr + g[:, None] * C + c[None, :], mask=(g < groups)[:, None] & c_mask[None, :], other=0.0,
                   cache_modifier=".cg")


@triton.jit
def _scaled_act_fwd_kernel(
    x_ptr, bias_ptr, y_ptr,
    N, C, coeff, iters_per_group, groups,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_FP64: tl.constexpr, HW: tl.constexpr, C_ALIGN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK: tl.constexpr,
):
    """y = coeff · f(x + b_c) for x seen as (N, C, HW), channel dim 1 (coeff = γ·scale).

    Program (channel block, group) covers channels [BLOCK_C·block, +BLOCK_C) and its group's
    share of the block's iterations, one (n step of BLOCK_N samples, column chunk) each; the last
    chunk of a row also covers the row's remainder, one tile per set bit of HW % CHUNK. Math in
    fp32 (fp64 for fp64 inputs).
    """
    acc_dtype: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    group = pid % groups
    c = (pid // groups) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if HAS_BIAS:
        b = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)[None, :, None]
    else:
        b = tl.zeros([1, BLOCK_C, 1], dtype=acc_dtype)
    NUM_CHUNKS: tl.constexpr = HW // CHUNK
    REST: tl.constexpr = HW % CHUNK
    first = group * iters_per_group
    end = tl.minimum(first + iters_per_group, tl.cdiv(N, BLOCK_N) * NUM_CHUNKS)
    for it in range(first, end):
        chunk = it % NUM_CHUNKS
        # The (n, c) rows of this step, [BLOCK_N, BLOCK_C]. C_ALIGN divides C: it tells the compiler
        # that channels-last rows start at multiples of it, so their loads vectorize when C is not a
        # multiple of 16. (Written out here: the interpreter pays for every jit helper call.)
        n = (it // NUM_CHUNKS) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = (tl.multiple_of(n.to(tl.int64) * C, C_ALIGN) * HW)[:, None] + (c.to(tl.int64) * HW)[None, :]
        row_mask = (n < N)[:, None] & c_mask[None, :]
        _fwd_tile(x_ptr, y_ptr, rows, row_mask, b, chunk * CHUNK, coeff, ACT, acc_dtype, CHUNK)
        if REST > 0:
            if chunk == NUM_CHUNKS - 1:
                for bit in tl.static_range(0, 11):
                    if (REST >> bit) & 1:
                        _fwd_tile(x_ptr, y_ptr, rows, row_mask, b, HW - (REST & ((2 << bit) - 1)), coeff, ACT,
                                  acc_dtype, 1 << bit)


@triton.jit
def _scaled_act_bwd_kernel(
    dy_ptr, x_ptr, bias_ptr, dx_ptr, dbias_ptr, partial_ptr, counter_ptr,
    N, C, coeff, iters_per_group, groups,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, ACC_FP64: tl.constexpr,
    HW: tl.constexpr, C_ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK: tl.constexpr,
    SPLIT: tl.constexpr, FINISH_ROWS: tl.constexpr, FINISH_STEPS: tl.constexpr,
):
    """dx = dy · coeff · f'(x + b_c) and, when BIAS_GRAD, dbias_c = Σ of dx over dims 0 and 2,
    for x seen as (N, C, HW), with the programs of _scaled_act_fwd_kernel.

    dbias is finished here, in a fixed order (no float atomics): each program sums its rows per
    channel (row sums, then a tree over the block's rows). Unless SPLIT, a program is its channel
    block's only one and writes dbias. With SPLIT, the ``groups`` programs of a block each write
    partial[group, c], then count themselves in counter[block] (zeroed per call; the barrier and
    the acq_rel atomic order every thread's partial store before the count); the one that counts
    last adds partial[0..groups) for the block's channels in an order set by ``groups`` alone,
    whichever program it is.
    """
    acc_dtype: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    group = pid % groups
    block = pid // groups
    c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if HAS_BIAS:
        b = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)[None, :, None]
    else:
        b = tl.zeros([1, BLOCK_C, 1], dtype=acc_dtype)
    NUM_CHUNKS: tl.constexpr = HW // CHUNK
    REST: tl.constexpr = HW % CHUNK
    row_sums = tl.zeros([BLOCK_N, BLOCK_C], dtype=acc_dtype)
    first = group * iters_per_group
    end = tl.minimum(first + iters_per_group, tl.cdiv(N, BLOCK_N) * NUM_CHUNKS)
    for it in range(first, end):
        chunk = it % NUM_CHUNKS
        n = (it // NUM_CHUNKS) * BLOCK_N + tl.arange(0, BLOCK_N)  # rows as in _scaled_act_fwd_kernel
        rows = (tl.multiple_of(n.to(tl.int64) * C, C_ALIGN) * HW)[:, None] + (c.to(tl.int64) * HW)[None, :]
        row_mask = (n < N)[:, None] & c_mask[None, :]
        row_sums += _bwd_tile(dy_ptr, x_ptr, dx_ptr, rows, row_mask, b, chunk * CHUNK, coeff, ACT, acc_dtype, CHUNK)
        if REST > 0:
            if chunk == NUM_CHUNKS - 1:
                for bit in tl.static_range(0, 11):
                    if (REST >> bit) & 1:
                        row_sums += _bwd_tile(dy_ptr, x_ptr, dx_ptr, rows, row_mask, b, HW - (REST & ((2 << bit) - 1)),
                                              coeff, ACT, acc_dtype, 1 << bit)
    if BIAS_GRAD:
        channel_sums = tl.sum(row_sums, axis=0)
        if SPLIT:
            tl.store(partial_ptr + group * C + c, channel_sums, mask=c_mask)
            tl.debug_barrier()  # every thread's partial store precedes the release below
            if tl.atomic_add(counter_ptr + block, 1, sem="acq_rel") == groups - 1:
                # The last program adds FINISH_ROWS groups at a time, elementwise, then across
                # rows once. A step or two are unrolled (a loop here made ptxas spill a few bytes
                # at some shapes); more are a loop (unrolled, their loads took 150 registers).
                total = tl.zeros([FINISH_ROWS, BLOCK_C], dtype=acc_dtype)
                if FINISH_STEPS <= 2:
                    for step in tl.static_range(FINISH_STEPS):
                        total += _partial_rows(partial_ptr, step * FINISH_ROWS, c, c_mask, C, groups, FINISH_ROWS)
                else:
                    for g0 in tl.range(0, groups, FINISH_ROWS, num_stages=1):
                        total += _partial_rows(partial_ptr, g0, c, c_mask, C, groups, FINISH_ROWS)
                tl.store(dbias_ptr + c, tl.sum(total, axis=0).to(dbias_ptr.dtype.element_ty), mask=c_mask)
        else:
            tl.store(dbias_ptr + c, channel_sums.to(dbias_ptr.dtype.element_ty), mask=c_mask)


def _matrix_view(t: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """A (R, K) row-major view of ``t``'s memory and whether the channel is row % C (else the
    column); None when ``t`` is neither contiguous nor channels-last-like (channel innermost).

    Both are logical views, so two tensors of one shape whose results agree in (shape, flag)
    map element (r, k) to the same logical index whatever their strides.
    """
    n, c = t.shape[:2]
    spatial = math.prod(t.shape[2:])
    if t.is_contiguous():
        if spatial == 1:  # (N, C) or 1×1 maps: rows of C channels use the tile's width
            return t.view(n, c), False
        return t.view(n * c, spatial), True
    channel_last = t.permute(0, *range(2, t.dim()), 1)
    if channel_last.is_contiguous():
        return channel_last.view(n * spatial, c), False
    return None


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(x or a contiguous copy of it, its (R, K) view, channel_on_rows)."""
    view = _matrix_view(x)
    if view is None:
        x = x.contiguous()
        view = _matrix_view(x)
    return x, *view


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Plan(NamedTuple):
    """The launch geometry of one call (see _plan)."""
    n: int  # samples (NCHW) or pixels (channels-last, (N, C)): dim 0 of the (N, C, HW) view
    c: int
    hw: int
    block_n: int
    block_c: int
    chunk: int
    channel_blocks: int
    groups: int  # programs per channel block
    iters_per_group: int
    c_align: int


def _vector_width(esize: int, width: int, align: int) -> int:
    """Elements per access of a tile ``width`` wide whose row starts are multiples of ``align``."""
    return max(1, min(16 // esize, width, align))


def _issued_fraction(hw: int, esize: int, chunk: int, rows: int) -> float:
    """Useful / issued element slots of a row of ``hw`` in CHUNK tiles plus the remainder's
    tiles, ``rows`` rows each: a tile of fewer elements than NUM_WARPS·32 threads times their
    vector width leaves the rest of the threads repeating the same elements."""
    threads, align = 32 * NUM_WARPS, hw & -hw
    widths = [chunk] * (hw // chunk) + [1 << bit for bit in range(chunk.bit_length()) if (hw % chunk) >> bit & 1]
    issued = sum(max(rows * w, threads * _vector_width(esize, w, align)) for w in widths)
    return rows * hw / issued


def _tile_elems(esize: int) -> int:
    return TILE_ELEMS // 8 if esize == 8 else TILE_ELEMS


def _chunk(hw: int, esize: int) -> int:
    """CHUNK for rows of ``hw``: the widest power of two (at most MAX_CHUNK and a tile, row pieces
    at least MIN_SEGMENT_BYTES) whose tiles keep within 5% as many lanes busy as the best. (The
    same under the interpreter, which has no lanes: what tests/test_kernels_compile.py records
    there is what a GPU launches.)"""
    if hw == 1:
        return 1
    widest = min(1 << (hw.bit_length() - 1), MAX_CHUNK, _tile_elems(esize))
    narrowest = min(widest, max(1, MIN_SEGMENT_BYTES // esize))
    candidates = [1 << k for k in range(narrowest.bit_length() - 1, widest.bit_length())]
    scores = {ch: _issued_fraction(hw, esize, ch, max(1, _tile_elems(esize) // ch)) for ch in candidates}
    best = max(scores.values())
    return max(ch for ch, s in scores.items() if s >= best - 0.05)


def _programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return CPU_PROGRAMS


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _plan(n: int, c: int, hw: int, esize: int, device: torch.device, *, reduces: bool) -> _Plan:
    """Tiles and programs for an (n, c, hw) tensor of ``esize``-byte elements.

    NCHW (hw > 1): CHUNK from _chunk, and the tile's TILE_ELEMS // CHUNK rows go to samples first
    (up to all of them), then to channels, so that channel blocks are many and each one's work a
    few tiles. Channels-last (hw = 1): BLOCK_C is C's largest power-of-two divisor (no masked
    lane) unless that is narrower than a 32-byte sector (then C rounded up to a power of two),
    capped at MAX_BLOCK_C. Each channel block is split over ``groups`` programs when there are
    too few blocks for the device; a reduction (``reduces``) first narrows its NCHW channel blocks
    and splits only when that is not enough and the split pays for its finish.
    """
    target = _programs_target(device)
    if hw > 1:
        chunk = _chunk(hw, esize)
        rows = max(1, _tile_elems(esize) // chunk)
        block_n = min(rows, next_power_of_2(n))
        block_c = min(rows // block_n, next_power_of_2(c))
        # A reduction narrows its channel blocks, down to one channel, before it splits them:
        # more programs that still each finish their channels' sums (at 32×768×6×6, 384 programs
        # instead of 192), with no counter or finish. The tiles shrink, and stay full.
        while reduces and block_c > 1 and 2 * triton.cdiv(c, block_c) < target:
            block_c //= 2
    else:
        chunk = 1
        divisor = c & -c
        block_c = divisor if divisor * esize >= MIN_SEGMENT_BYTES or divisor == c else next_power_of_2(c)
        block_c = min(block_c, MAX_BLOCK_C, _tile_elems(esize))
        block_n = min(max(1, _tile_elems(esize) // block_c), next_power_of_2(n))
    channel_blocks = triton.cdiv(c, block_c)
    iters = triton.cdiv(n, block_n) * (hw // chunk)
    groups = max(1, min(iters, triton.cdiv(target, channel_blocks)))
    if reduces and (2 * channel_blocks >= target or n * block_c * hw < SPLIT_MIN_ELEMS):
        groups = 1
    iters_per_group = max(1, triton.cdiv(iters, groups))
    groups = max(1, triton.cdiv(iters, iters_per_group))
    return _Plan(n, c, hw, block_n, block_c, chunk, channel_blocks, groups, iters_per_group, min(16, c & -c))


def _nch(x_rows: torch.Tensor, channel_on_rows: bool, n_channels: int) -> tuple[int, int, int]:
    """(N, C, HW) of the (R, K) view: (R / C, C, K) with channels on rows, else (R, K, 1)."""
    n_rows, n_cols = x_rows.shape
    return (n_rows // n_channels, n_channels, n_cols) if channel_on_rows else (n_rows, n_cols, 1)


def _fwd_buffers(x: torch.Tensor):
    """(dense x, its (R, K) view, channel_on_rows, y, y's view): y has the dense x's strides, so
    its (R, K) view lines up."""
    x, x_rows, channel_on_rows = _dense(x)
    y = new_empty_like(x)
    return x, x_rows, channel_on_rows, y, _matrix_view(y)[0]


def _bwd_buffers(dy: torch.Tensor, x: torch.Tensor):
    """(dense x, its view, channel_on_rows, dy's view mapping (r, k) to x's element, dx, its view)."""
    x, x_rows, channel_on_rows = _dense(x)
    dy_view = _matrix_view(dy)
    if dy_view is None or dy_view[1] != channel_on_rows or dy_view[0].shape != x_rows.shape:
        dy = torch.empty_like(x, dtype=dy.dtype).copy_(dy)
        dy_view = _matrix_view(dy)
    dx = new_empty_like(x)
    return x, x_rows, channel_on_rows, dy_view[0], dx, _matrix_view(dx)[0]


def _scaled_act_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], act: str, coeff: float) -> torch.Tensor:
    """Launch the forward kernel (one launch): y = coeff·f(x + b_c), laid out like x (or, when x
    is neither NCHW- nor channels-last-dense, like its contiguous copy)."""
    x, x_rows, channel_on_rows, y, y_rows = _fwd_buffers(x)
    if x.numel() == 0:
        return y
    p = _plan(*_nch(x_rows, channel_on_rows, x.shape[1]), x.element_size(), x.device, reduces=False)
    launch(
        _scaled_act_fwd_kernel, (p.channel_blocks * p.groups,),
        x_rows, _flat(bias) if bias is not None else x_rows, y_rows,
        p.n, p.c, coeff, p.iters_per_group, p.groups,
        ACT=act, HAS_BIAS=bias is not None, ACC_FP64=x.dtype == torch.float64, HW=p.hw, C_ALIGN=p.c_align,
        BLOCK_N=p.block_n, BLOCK_C=p.block_c, CHUNK=p.chunk, num_warps=NUM_WARPS,
    )
    return y


def _scaled_act_bwd(
    dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], act: str, coeff: float, need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: one launch, plus a zeroed counter when the dbias of a channel
    block is split over several programs. Returns (dx laid out like the dense ``x``, dbias in
    bias's shape and dtype, or an empty tensor when not asked for: an op cannot return None)."""
    x, x_rows, channel_on_rows, dy_rows, dx, dx_rows = _bwd_buffers(dy, x)
    bias_grad = bias is not None and need_bias_grad
    if x.numel() == 0:
        return dx, (torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device) if bias_grad else dx.new_empty(0))
    p = _plan(*_nch(x_rows, channel_on_rows, x.shape[1]), x.element_size(), x.device, reduces=bias_grad)
    dbias = partial = counter = None
    split = bias_grad and p.groups > 1
    if bias_grad:
        dbias = new_empty(p.c, device=x.device, dtype=bias.dtype)
    finish_rows = min(next_power_of_2(p.groups), max(1, FINISH_ELEMS // p.block_c)) if split else 1
    if split:
        partial = new_empty((p.groups, p.c), device=x.device, dtype=_acc_dtype(x.dtype))
        counter = torch.zeros(p.channel_blocks, device=x.device, dtype=torch.int32)
    launch(
        _scaled_act_bwd_kernel, (p.channel_blocks * p.groups,),
        dy_rows, x_rows, _flat(bias) if bias is not None else x_rows, dx_rows,
        dbias if bias_grad else dx_rows, partial if split else dx_rows, counter if split else dx_rows,
        p.n, p.c, coeff, p.iters_per_group, p.groups,
        ACT=act, HAS_BIAS=bias is not None, BIAS_GRAD=bias_grad, ACC_FP64=x.dtype == torch.float64, HW=p.hw,
        C_ALIGN=p.c_align, BLOCK_N=p.block_n, BLOCK_C=p.block_c, CHUNK=p.chunk, SPLIT=split,
        FINISH_ROWS=finish_rows, FINISH_STEPS=triton.cdiv(p.groups, finish_rows) if split else 1, num_warps=NUM_WARPS,
    )
    return dx, (dbias.view(bias.shape) if bias_grad else dx.new_empty(0))


def _flat(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """bias as a dense vector: the CUDA kernels index it by channel."""
    return bias.reshape(-1).contiguous() if bias is not None else None


def _scaled_act_fwd_cuda(x: torch.Tensor, bias: Optional[torch.Tensor], act: str, coeff: float) -> torch.Tensor:
    """``_scaled_act_fwd`` through the CUDA kernel of nfkernels._C (same output, one launch)."""
    x, x_rows, channel_on_rows, y, y_rows = _fwd_buffers(x)
    n_rows, n_cols = x_rows.shape
    cuda_launch(
        "scaled_act_fwd", x.device,
        x_rows, _flat(bias), y_rows, n_rows, n_cols, x.shape[1], channel_on_rows, x.dtype,
        dtype_name(bias.dtype if bias is not None else None), act, coeff,
    )
    return y


def _scaled_act_bwd_cuda(
    dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], act: str, coeff: float, need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_scaled_act_bwd`` through the CUDA kernel of nfkernels._C (same outputs): one launch,
    dbias finished inside it in bias's dtype; a workspace (partial sums, counters it zeroes)
    only when the kernel splits a channel block."""
    from nfkernels import _backend

    x, x_rows, channel_on_rows, dy_rows, dx, dx_rows = _bwd_buffers(dy, x)
    n_rows, n_cols = x_rows.shape
    n_channels = x.shape[1]
    bias_grad = bias is not None and need_bias_grad
    dbias = workspace = None
    if bias_grad:
        size = _backend.cuda_extension().scaled_act_bwd_workspace(
            n_rows, n_cols, n_channels, channel_on_rows, dtype_name(x.dtype))
        workspace = new_empty(size, device=x.device, dtype=_acc_dtype(x.dtype)) if size else None
        dbias = new_empty(n_channels, device=x.device, dtype=bias.dtype)
    cuda_launch(
        "scaled_act_bwd", x.device,
        # The kernels read dy in x's dtype, which autograd already gives (the cast is then a no-op).
        dy_rows.to(x.dtype), x_rows, _flat(bias), dx_rows, dbias, workspace, n_rows, n_cols, n_channels,
        channel_on_rows, x.dtype, dtype_name(bias.dtype if bias is not None else None), act, coeff,
    )
    return dx, (dbias.view(bias.shape) if bias_grad else dx.new_empty(0))


_COMPILED = kernels_are_compiled(_scaled_act_fwd_kernel)
scaled_act_fwd = define_op("scaled_act_fwd", _scaled_act_fwd, compiled=_COMPILED)
scaled_act_bwd = define_op("scaled_act_bwd", _scaled_act_bwd, compiled=_COMPILED)
scaled_act_fwd_cuda = define_cuda_op("scaled_act_fwd_cuda", _scaled_act_fwd_cuda)
scaled_act_bwd_cuda = define_cuda_op("scaled_act_bwd_cuda", _scaled_act_bwd_cuda)


def _setup_context(ctx, inputs, output):
    x, bias, act, coeff = inputs
    ctx.save_for_backward(x, bias)
    ctx.act, ctx.coeff = act, coeff


def _backward_through(bwd_op):
    def backward(ctx, dy):
        """dx = dy·coeff·f'(x + b_c), dbias_c = Σ over all dims but 1 of dx (module docstring)."""
        x, bias = ctx.saved_tensors
        need_bias_grad = bias is not None and ctx.needs_input_grad[1]
        dx, dbias = bwd_op(dy, x, bias, ctx.act, ctx.coeff, need_bias_grad)
        return dx, (dbias if need_bias_grad else None), None, None

    return backward


scaled_act_fwd.register_autograd(_backward_through(scaled_act_bwd), setup_context=_setup_context)
scaled_act_fwd_cuda.register_autograd(_backward_through(scaled_act_bwd_cuda), setup_context=_setup_context)


def scaled_act_triton(x, bias, act, gamma, scale):
    """The Triton path (``torch.ops.nfkernels.scaled_act_fwd``): y = gamma·scale·f(x + b_c),
    differentiable in x and bias; arguments validated by ``nfkernels.scaled_act``."""
    return scaled_act_fwd(x, bias, act, gamma * scale)


def scaled_act_cuda(x, bias, act, gamma, scale):
    """The CUDA path (``torch.ops.nfkernels.scaled_act_fwd_cuda``), as the Triton path."""
    return scaled_act_fwd_cuda(x, bias, act, gamma * scale)


_TORCH_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "relu6": F.relu6,
    "elu": F.elu,
    "celu": F.celu,
    "leaky_relu": lambda z: F.leaky_relu(z, LEAKY_RELU_SLOPE),
    "selu": F.selu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    # log(1 + e^z) = logaddexp(z, 0), exact in both directions: F.softplus returns z itself
    # beyond its threshold of 20 (off by up to 2e-9, and f' = 1 instead of σ(z) there).
    "softplus": lambda z: torch.logaddexp(z, z.new_zeros(())),
    "softsign": F.softsign,
    # −softplus(−z) rather than F.logsigmoid, which returns channels_last inputs as NCHW.
    "log_sigmoid": lambda z: -torch.logaddexp(-z, z.new_zeros(())),
    "identity": lambda z: z,
}


def scaled_act_torch(x, bias, act, gamma, scale):
    """Plain PyTorch reference (the CPU path): the same formula from torch ops, computed in fp32
    for fp16/bf16 inputs and cast back; keeps x's memory format."""
    z = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if bias is not None:
        z = z + bias.reshape(1, -1, *([1] * (x.dim() - 2))).to(z.dtype)
    return (_TORCH_ACTIVATIONS[act](z) * (gamma * scale)).to(x.dtype)
