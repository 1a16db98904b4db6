"""Squeeze-excite gate with the SkipInit residual: the tail of an NF-ResNet/NFNet block (timm
``NormFreeBlock`` with ``attn_last=SEModule`` or ``EcaModule``, ``drop_path``, ``skipinit_gain``
and ``alpha``; Brock et al. 2021, arXiv:2102.06171; docs/design.md §5 "Squeeze-excite gate with
residual").

With h the conv3 output without its bias b, the shortcut s without its bias sb, the SkipInit
scalar k (1 without one), the per-sample stochastic-depth multipliers m_n (1 without a mask) and
HW = H·W:

    hb   = h + b_c
    p    = mean_hw hb                                   (N, C; 0 when HW = 0, see below)
    z    = the attention's logits (N, C), either
           SE:  a = fc1(p) = p·W1ᵀ + b1,  r = relu(a),  z = fc2(r) = r·W2ᵀ + b2
           ECA: z_{n,c} = Σ_j w_j · p_{n,c+j−P}         (timm EcaModule: conv1d over the channels,
                                                          K odd taps w, P = (K − 1)/2, p = 0 outside
                                                          [0, C), no bias)
    g    = sigmoid(z)
    u    = gain · m_n · g_{n,c},  gain = α · attn_gain   (u = α · m_n without attention: no gain,
                                                          no sigmoid)
    coef = k · u
    out  = s + sb_c + coef_{n,c} · hb

Backward, with S1 = Σ_hw dout and S2 = Σ_hw dout·hb per (n, c):

    ds = dout,  dsb_c = Σ_n S1,  dk = Σ_{n,c} S2·u
    dz = S2 · k·gain·m_n · σ(z)σ(−z)            (= g(1 − g), without its cancellation at g ≈ 1)
    SE:  dW2 = dzᵀ·r,  db2 = Σ_n dz,  da = (dz·W2) ⊙ [a > 0],  dW1 = daᵀ·p,  db1 = Σ_n da,  dp = da·W1
    ECA: dw_j = Σ_{n,c} dz_{n,c}·p_{n,c+j−P},  dp_{n,c} = Σ_j w_j·dz_{n,c−j+P}  (conv_transpose1d)
    dh = dout·coef + dp/HW,  db_c = Σ_n (coef·S1 + dp)

The kernels: the pooling (bias and 1/HW folded in), the gate forward (coef formed from z, m, k
and the gain inside it), the backward reduction (S1 and S2 per (n, c); dz from them), the backward
streaming (dh, coef formed again) and the per-channel sums over samples (S1, coef·S1 + dp, S2·u,
dz, and da for db1). They see only the logits z, so SE and ECA share them (their HAS_SE flags
mean "a gate": either attention); with ECA the per-channel sums get no da (no hidden units) and
their Σ_n dz (SE's db2) goes unused. The two reductions over HW split it where batch × channel
blocks would leave SMs idle (``_reduce_plan``: NFNet-F0's channels_last stages 0 and 1 at batch
32); the splits' partial sums are then added in split order, for the pooling by a finish kernel,
for dz by one too (the attention's gradients need it), and for S1, S2 by the per-channel sums,
which read the splits themselves: deterministic, no atomics, no counters. The attention and its
gradients run on (N, C) with torch ops in the accumulation dtype: the SE MLP as matmuls (fc1 with
its relu in one ``_addmm_activation`` when it has a bias), ECA's channel conv as a product and a
sum over K-wide windows of the zero-padded p (``_eca_conv``; not F.conv1d, which cuDNN computes
in TF32 by default). Launches per call (fp32, every option present): forward 5 with SE (pool,
its finish where split, fc1+relu, fc2, gate; 6 without an fc1 bias), 6 with ECA (pool, its
finish where split, the conv's pad, product and sum, gate), 1 without attention; backward 10
with SE (reduction, dz's finish where split, 4 matmuls, relu's backward, streaming, sums, dk),
12 with ECA (reduction, dz's finish where split, w reversed, a pad, product and sum each for dp
and dw, streaming, sums, dk), 4 without (tests/test_se_gate.py counts them). The forward reads
h twice (pool, gate) and the shortcut once and writes out once; the backward reads dout twice
and h once and writes dh once: 4 + 4 passes over the activation, against a floor of 3 + 3. dk
is taken from u, never by dividing by k (k is 0 at init).

With HW = 0 the output has no elements, so nothing depends on any parameter and every gradient
is 0. The mean over the empty map is then taken as 0 (torch's and timm's is NaN, which would
make S2·g(1 − g) = 0·NaN and the attention weights' gradients NaN); as p reaches no output
element, the forward is unchanged. Empty inputs run on the torch path (``se_gate_residual_torch``).

Two kernel sets implement the kernels: the Triton ones below and the CUDA ones of
csrc/se_gate.cu, behind the same launcher interface (``Kernels``). The host-side math (the SE
MLP or the ECA conv, and their gradients) is shared; each set is registered as its own pair of
ops (``se_gate_residual_fwd`` / ``_bwd`` and ``..._cuda``) with one autograd formula.
"""
from __future__ import annotations

import contextlib
import functools
import struct
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from nfkernels.ops._triton import tl, triton

from nfkernels.ops._library import cuda_launch, define_cuda_op, define_op, dtype_name, kernels_are_compiled, launch
from nfkernels.ops._utils import new_empty, new_empty_like, next_power_of_2, same_layout

# Elements of one (channels × hw) tile. The reductions loop over HW in such tiles; the streaming
# kernels give one tile to each program. Tests lower them to exercise the loops and the masks.
REDUCE_TILE = 2048
STREAM_TILE = 1024
# In channels_last the channel axis is the contiguous one; this many channels per tile.
MAX_BLOCK_C = 128
# The small (N, C) kernels: elements per program of the pooling's finish; channels per program
# and elements per tile of the per-channel sums.
FINISH_BLOCK = 256
SMALL_BLOCK_C = 32
SUMS_TILE = 1024
# The HW reductions (pooling, backward reduction) aim for this many programs per SM, on
# DEFAULT_SMS SMs (an H100's) where the tensors are not on a CUDA device. Where batch × channel
# blocks fall short they split HW (``_reduce_plan``), each split at least MIN_SPLIT_HW positions
# long: its partial sums (4 bytes per (n, c), two in the backward) then add at most ~3% to what
# it reads from a bf16 tensor.
PROGRAMS_PER_SM = 2
DEFAULT_SMS = 132
MIN_SPLIT_HW = 64
# A tile along HW is a power of two; the largest one whose padding leaves at least this fraction
# of the lanes busy is used (H·W = 36 in a 64-wide tile would leave 44% idle). Above 90%, so
# that the other operands' masked lanes leave the whole kernel at 90% or more (F0 in NCHW: every
# H·W but 36 is then covered exactly; 36 takes runs of MIN_ROW_RUN, 90%).
MIN_BUSY_LANES = 0.95
# In NCHW (HW contiguous) no tile is narrower than this many positions: shorter runs per row
# would cost coalescing.
MIN_ROW_RUN = 8


@triton.jit
def _split_program(C, HW, SPLIT_HW, BLOCK_C: tl.constexpr):
    """(sample, channel indices, split, first hw, hw stop) of this program of a split reduction.

    Grid (N·cdiv(C, BLOCK_C), splits): program (i, s) reduces channels cs of sample
    n = i // cdiv(C, BLOCK_C) over hw in [s·SPLIT_HW, min((s + 1)·SPLIT_HW, HW)). Batch and channel
    blocks share axis 0, which has no 65535 cap; the few splits take axis 1.
    """
    pid = tl.program_id(0).to(tl.int64)
    c_blocks = tl.cdiv(C, BLOCK_C)
    cs = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    split = tl.program_id(1)
    start = split * SPLIT_HW
    return pid // c_blocks, cs, split, start, tl.minimum(start + SPLIT_HW, HW)


@triton.jit
def _se_pool_fwd_kernel(
    h_ptr, bias_ptr, out_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, SPLIT_HW,
    HAS_BIAS: tl.constexpr, FINISH: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """p_{n,c} = mean_hw h_{n,c,hw} + b_c for a block of channels of one sample; over several
    splits of HW (FINISH off) the split's sum Σ_{hw in split} h_{n,c,hw} into out[split, n, c]
    instead, which ``_se_pool_finish_kernel`` turns into p.

    Derivative: dh = dp/HW, db = Σ_n dp (done by the backward kernels). Source: timm SEModule's
    ``x.mean((2, 3))`` on ``conv3(x)``, with conv3's bias folded in. Grid as ``_split_program``;
    loops over its hw in tiles; accumulates in fp32 (fp64 for fp64), writes in that dtype.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    n, cs, split, start, stop = _split_program(C, HW, SPLIT_HW, BLOCK_C)
    c_mask = cs < C
    hws = tl.arange(0, BLOCK_HW).to(tl.int64)
    row_base = n * stride_n + cs[:, None] * stride_c
    total = tl.zeros([BLOCK_C], dtype=acc_dtype)
    for first in range(start, stop, BLOCK_HW):
        hw = first + hws
        m = c_mask[:, None] & (hw < stop)[None, :]
        x = tl.load(h_ptr + row_base + hw[None, :] * stride_hw, mask=m, other=0.0).to(acc_dtype)
        total += tl.sum(x, axis=1)
    if FINISH:
        mean = total / HW  # in acc_dtype: a host-side fp32 1/HW would cost fp64 its precision
        if HAS_BIAS:
            mean += tl.load(bias_ptr + cs, mask=c_mask, other=0.0).to(acc_dtype)
        tl.store(out_ptr + n * C + cs, mean, mask=c_mask)
    else:
        tl.store(out_ptr + (split * N + n) * C + cs, total, mask=c_mask)


@triton.jit
def _se_pool_finish_kernel(
    partial_ptr, bias_ptr, pool_ptr,
    N, C, HW, SPLITS,
    HAS_BIAS: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """p_{n,c} = (Σ_s partial[s, n, c]) / HW + b_c: the pooling's splits added in split order
    (deterministic, no atomics), on a flat block of the (N, C) elements."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    n, c = i // C, i % C
    m = n < N
    total = tl.zeros([BLOCK], dtype=acc_dtype)
    for s in range(0, SPLITS):
        total += tl.load(partial_ptr + (s * N + n) * C + c, mask=m, other=0.0)
    mean = total / HW
    if HAS_BIAS:
        mean += tl.load(bias_ptr + c, mask=m, other=0.0).to(acc_dtype)
    tl.store(pool_ptr + i, mean, mask=m)


@triton.jit
def _sample_scales(mask_ptr, skip_ptr, n, gain_hi, gain_lo,
                   HAS_MASK: tl.constexpr, HAS_SKIP: tl.constexpr, ACC_FP64: tl.constexpr):
    """(gain·m_n, k·gain·m_n) of sample(s) n in the accumulation dtype: u and coef before the gate.

    gain = α·attn_gain (α without SE) comes as two fp32 halves (``_fp32_pair``), added in the
    accumulation dtype; m (accumulation dtype) and k (h's dtype or fp32) are read from memory,
    m unmasked: n must index a sample.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    scale = tl.cast(gain_hi, acc_dtype) + tl.cast(gain_lo, acc_dtype)
    if HAS_MASK:
        scale = scale * tl.load(mask_ptr + n)
    coef_scale = scale
    if HAS_SKIP:
        coef_scale = scale * tl.load(skip_ptr).to(acc_dtype)
    return scale, coef_scale


@triton.jit
def _sigmoid_and_slope(z):
    """(σ(z), σ(z)σ(−z)) of logits z (σ' = σ(z)σ(−z) = g(1 − g)).

    Both from e = exp(−|z|): no overflow for large |z|, and σ(z)σ(−z) = e/(1 + e)² keeps its
    relative accuracy where g rounds to 1, which g(1 − g) does not. Source: timm SEModule's
    ``x_se.sigmoid()``.
    """
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    return tl.where(z >= 0, r, e * r), e * r * r


@triton.jit
def _coef(logits_ptr, mask_ptr, skip_ptr, n, cs, c_mask, C, gain_hi, gain_lo,
          HAS_SE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SKIP: tl.constexpr, ACC_FP64: tl.constexpr,
          BLOCK_C: tl.constexpr):
    """coef_{n,c} = k·gain·m_n·σ(z_{n,c}) (k·gain·m_n without SE) at channels cs of sample n."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    _, coef_scale = _sample_scales(mask_ptr, skip_ptr, n, gain_hi, gain_lo, HAS_MASK, HAS_SKIP, ACC_FP64)
    coef = tl.zeros([BLOCK_C], dtype=acc_dtype) + coef_scale
    if HAS_SE:
        gate, _ = _sigmoid_and_slope(tl.load(logits_ptr + n * C + cs, mask=c_mask, other=0.0))
        coef = coef * gate
    return coef


@triton.jit
def _stream_tile(C, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(sample, channel indices, hw indices) of this program's tile. The grid is one flat axis of
    N·cdiv(C, BLOCK_C)·cdiv(HW, BLOCK_HW) programs, hw fastest: CUDA caps grid axes 1 and 2 at
    65535, which large batches, channel counts or images would pass."""
    pid = tl.program_id(0).to(tl.int64)
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    c_blocks = tl.cdiv(C, BLOCK_C)
    hw = (pid % hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW).to(tl.int64)
    cs = ((pid // hw_blocks) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    return pid // (hw_blocks * c_blocks), cs, hw


@triton.jit
def _se_gate_fwd_kernel(
    h_ptr, shortcut_ptr, logits_ptr, mask_ptr, skip_ptr, bias_ptr, sbias_ptr, out_ptr,
    C, HW, stride_n, stride_c, stride_hw, gain_hi, gain_lo,
    HAS_SHORTCUT: tl.constexpr, HAS_SE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SKIP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SBIAS: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """out = s + sb_c + coef_{n,c} · (h + b_c) on one (channels × hw) tile of one sample
    (s = 0 without a shortcut: a standalone SE layer).

    coef = k·α·attn_gain·m_n·sigmoid(z) (k·α·m_n without SE) is formed here from the logits
    (``_coef``). Derivative: ds = dout, dh = dout·coef (+ the pooling path, see the module
    docstring). Source: timm NormFreeBlock ``out = attn_gain·attn_last(out); drop_path;
    ·skipinit_gain; ·alpha + shortcut``. One program per tile (``_stream_tile``); h, s and out
    share strides.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    n, cs, hw = _stream_tile(C, HW, BLOCK_C, BLOCK_HW)
    c_mask = cs < C
    m = c_mask[:, None] & (hw < HW)[None, :]
    offs = n * stride_n + cs[:, None] * stride_c + hw[None, :] * stride_hw
    x = tl.load(h_ptr + offs, mask=m, other=0.0).to(acc_dtype)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cs, mask=c_mask, other=0.0).to(acc_dtype)[:, None]
    coef = _coef(logits_ptr, mask_ptr, skip_ptr, n, cs, c_mask, C, gain_hi, gain_lo,
                 HAS_SE, HAS_MASK, HAS_SKIP, ACC_FP64, BLOCK_C)
    out = coef[:, None] * x
    if HAS_SHORTCUT:
        out += tl.load(shortcut_ptr + offs, mask=m, other=0.0).to(acc_dtype)
    if HAS_SBIAS:
        out += tl.load(sbias_ptr + cs, mask=c_mask, other=0.0).to(acc_dtype)[:, None]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _se_gate_bwd_reduce_kernel(
    dout_ptr, h_ptr, bias_ptr, logits_ptr, mask_ptr, skip_ptr, sums_ptr, dz_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, SPLIT_HW, gain_hi, gain_lo,
    HAS_BIAS: tl.constexpr, HAS_DZ: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SKIP: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """S1 = Σ dout and S2 = Σ dout·(h + b_c) over one split of hw, for a block of channels of one
    sample, into sums[0, split, n, c] and sums[1, split, n, c]; with HAS_DZ (SE and a single split)
    also dz = S2·k·gain·m_n·σ(z)σ(−z) (→ the SE MLP), which ``_se_gate_bwd_dz_kernel`` forms from
    the splits otherwise.

    S2 = ∂L/∂coef, S1 the biases' (module docstring). Grid as ``_split_program``; each program owns
    its outputs and loops over its hw, so the sums are deterministic (no atomics). fp32
    accumulation (fp64 for fp64).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    n, cs, split, start, stop = _split_program(C, HW, SPLIT_HW, BLOCK_C)
    c_mask = cs < C
    hws = tl.arange(0, BLOCK_HW).to(tl.int64)
    row_base = n * stride_n + cs[:, None] * stride_c
    b = tl.zeros([BLOCK_C], dtype=acc_dtype)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cs, mask=c_mask, other=0.0).to(acc_dtype)
    # Whole-tile accumulators, reduced once after the loop: Triton 3.6's thread-locality pass
    # asserts on a loop-carried tl.sum whose result has more than one use.
    s1_tile = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
    s2_tile = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
    for first in range(start, stop, BLOCK_HW):
        hw = first + hws
        m = c_mask[:, None] & (hw < stop)[None, :]
        offs = row_base + hw[None, :] * stride_hw
        dy = tl.load(dout_ptr + offs, mask=m, other=0.0).to(acc_dtype)
        x = tl.load(h_ptr + offs, mask=m, other=0.0).to(acc_dtype)
        s1_tile += dy
        s2_tile += dy * (x + b[:, None])
    s1 = tl.sum(s1_tile, axis=1)
    s2 = tl.sum(s2_tile, axis=1)
    splits = tl.num_programs(1)
    tl.store(sums_ptr + (split * N + n) * C + cs, s1, mask=c_mask)
    tl.store(sums_ptr + ((splits + split) * N + n) * C + cs, s2, mask=c_mask)
    if HAS_DZ:
        _, coef_scale = _sample_scales(mask_ptr, skip_ptr, n, gain_hi, gain_lo, HAS_MASK, HAS_SKIP, ACC_FP64)
        _, slope = _sigmoid_and_slope(tl.load(logits_ptr + n * C + cs, mask=c_mask, other=0.0))
        tl.store(dz_ptr + n * C + cs, s2 * coef_scale * slope, mask=c_mask)


@triton.jit
def _se_gate_bwd_dz_kernel(
    sums_ptr, logits_ptr, mask_ptr, skip_ptr, dz_ptr,
    N, C, SPLITS, gain_hi, gain_lo,
    HAS_MASK: tl.constexpr, HAS_SKIP: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dz_{n,c} = S2·k·gain·m_n·σ(z)σ(−z), S2 = Σ_s sums[1, s, n, c] added in split order: the SE
    MLP's input gradient, from the splits of ``_se_gate_bwd_reduce_kernel`` (deterministic, no
    atomics). One program per block of channels of one sample, on a flat grid."""
    pid = tl.program_id(0).to(tl.int64)
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = pid // c_blocks
    cs = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_mask = cs < C
    s2 = tl.zeros([BLOCK_C], dtype=tl.float64 if ACC_FP64 else tl.float32)
    for s in range(0, SPLITS):
        s2 += tl.load(sums_ptr + ((SPLITS + s) * N + n) * C + cs, mask=c_mask, other=0.0)
    _, coef_scale = _sample_scales(mask_ptr, skip_ptr, n, gain_hi, gain_lo, HAS_MASK, HAS_SKIP, ACC_FP64)
    _, slope = _sigmoid_and_slope(tl.load(logits_ptr + n * C + cs, mask=c_mask, other=0.0))
    tl.store(dz_ptr + n * C + cs, s2 * coef_scale * slope, mask=c_mask)


@triton.jit
def _se_gate_bwd_kernel(
    dout_ptr, logits_ptr, mask_ptr, skip_ptr, dpool_ptr, dh_ptr,
    C, HW, stride_n, stride_c, stride_hw, gain_hi, gain_lo,
    HAS_SE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SKIP: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """dh = dout·coef_{n,c} + dp_{n,c}/HW on one (channels × hw) tile of one sample.

    The first term is the gated path (coef formed as in ``_se_gate_fwd_kernel``), the second the
    pooling path into the SE (absent without SE). Tiles and strides as in ``_se_gate_fwd_kernel``.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    n, cs, hw = _stream_tile(C, HW, BLOCK_C, BLOCK_HW)
    c_mask = cs < C
    m = c_mask[:, None] & (hw < HW)[None, :]
    offs = n * stride_n + cs[:, None] * stride_c + hw[None, :] * stride_hw
    dy = tl.load(dout_ptr + offs, mask=m, other=0.0).to(acc_dtype)
    coef = _coef(logits_ptr, mask_ptr, skip_ptr, n, cs, c_mask, C, gain_hi, gain_lo,
                 HAS_SE, HAS_MASK, HAS_SKIP, ACC_FP64, BLOCK_C)
    dh = dy * coef[:, None]
    if HAS_SE:
        dh += (tl.load(dpool_ptr + n * C + cs, mask=c_mask, other=0.0) / HW)[:, None]
    tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=m)


@triton.jit
def _se_gate_bwd_sums_kernel(
    sums_ptr, logits_ptr, mask_ptr, skip_ptr, dz_ptr, dpool_ptr, da_ptr,
    dsbias_ptr, dbias_ptr, dskip_partial_ptr, dfc2_bias_ptr, dfc1_bias_ptr,
    N, C, RD, SPLITS, gain_hi, gain_lo,
    HAS_SE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SKIP: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per channel, over samples: dsb = Σ_n S1, db = Σ_n (coef·S1 + dp), dk_c = Σ_n S2·u (dk is
    their sum) and, with SE, db2 = Σ_n dz; S1 and S2 of each (n, c) added first over the splits
    of ``_se_gate_bwd_reduce_kernel``, coef and u formed from the gate as there (module
    docstring). With SE, the programs after the channel blocks also give db1 = Σ_n da per
    hidden unit.

    Each program owns a block of columns and loops over the samples, and each (n, c) over the
    splits, in a fixed order: deterministic, no atomics. Each gradient gets its own output: an
    op's outputs may not alias each other.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    if pid < c_blocks:
        cs = pid.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        c_mask = cs < C
        dsbias = tl.zeros([BLOCK_C], dtype=acc_dtype)
        dbias = tl.zeros([BLOCK_C], dtype=acc_dtype)
        dskip = tl.zeros([BLOCK_C], dtype=acc_dtype)
        dfc2_bias = tl.zeros([BLOCK_C], dtype=acc_dtype)
        for first in range(0, N, BLOCK_N):
            ns = first + tl.arange(0, BLOCK_N).to(tl.int64)
            n_ok = ns < N
            m = n_ok[:, None] & c_mask[None, :]
            nc = ns[:, None] * C + cs[None, :]
            s1 = tl.zeros([BLOCK_N, BLOCK_C], dtype=acc_dtype)
            s2 = tl.zeros([BLOCK_N, BLOCK_C], dtype=acc_dtype)
            for s in range(0, SPLITS):  # (s·N + n)·C + c of the S1 splits, then of the S2 ones
                s1 += tl.load(sums_ptr + (s * N + ns)[:, None] * C + cs[None, :], mask=m, other=0.0)
                s2 += tl.load(sums_ptr + ((SPLITS + s) * N + ns)[:, None] * C + cs[None, :], mask=m, other=0.0)
            # Rows past the batch read sample N - 1's scales (in bounds) and are zeroed below.
            scale, coef_scale = _sample_scales(mask_ptr, skip_ptr, tl.minimum(ns, N - 1), gain_hi, gain_lo,
                                               HAS_MASK, HAS_SKIP, ACC_FP64)
            u = tl.zeros([BLOCK_N, BLOCK_C], dtype=acc_dtype) + (tl.zeros([BLOCK_N], dtype=acc_dtype) + scale)[:, None]
            coef = tl.zeros([BLOCK_N, BLOCK_C], dtype=acc_dtype) + (
                tl.zeros([BLOCK_N], dtype=acc_dtype) + coef_scale)[:, None]
            bias_terms = coef * s1
            if HAS_SE:
                gate, _ = _sigmoid_and_slope(tl.load(logits_ptr + nc, mask=m, other=0.0))
                bias_terms = gate * bias_terms
                u = u * gate
                bias_terms += tl.load(dpool_ptr + nc, mask=m, other=0.0)
                dfc2_bias += tl.sum(tl.load(dz_ptr + nc, mask=m, other=0.0), axis=0)
            dsbias += tl.sum(s1, axis=0)
            dbias += tl.sum(tl.where(m, bias_terms, 0.0), axis=0)
            dskip += tl.sum(tl.where(m, s2 * u, 0.0), axis=0)
        tl.store(dsbias_ptr + cs, dsbias, mask=c_mask)
        tl.store(dbias_ptr + cs, dbias, mask=c_mask)
        tl.store(dskip_partial_ptr + cs, dskip, mask=c_mask)
        if HAS_SE:
            tl.store(dfc2_bias_ptr + cs, dfc2_bias, mask=c_mask)
    else:
        if HAS_SE:
            js = (pid - c_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
            j_mask = js < RD
            dfc1_bias = tl.zeros([BLOCK_C], dtype=acc_dtype)
            for first in range(0, N, BLOCK_N):
                ns = first + tl.arange(0, BLOCK_N).to(tl.int64)
                m = (ns < N)[:, None] & j_mask[None, :]
                dfc1_bias += tl.sum(tl.load(da_ptr + ns[:, None] * RD + js[None, :], mask=m, other=0.0), axis=0)
            tl.store(dfc1_bias_ptr + js, dfc1_bias, mask=j_mask)


# ----------------------------------------------------------------------------- layout helpers

def _native_layout(h: torch.Tensor) -> torch.Tensor:
    """h itself when NCHW-contiguous or channels_last (both run natively), else a contiguous copy."""
    if h.is_contiguous() or h.is_contiguous(memory_format=torch.channels_last):
        return h
    return h.contiguous()


def _in_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t when it addresses memory exactly like ref does, else a copy in ref's layout."""
    if same_layout(t, ref):
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _strides(h: torch.Tensor) -> tuple[int, int, int]:
    """(sample, channel, hw) strides of a native-layout h, with H and W flattened into one hw axis.

    Both native layouts have stride_h = W·stride_w whenever H > 1 and W > 1; with W == 1 the hw
    index is the h index.
    """
    stride_hw = h.stride(3) if h.shape[3] > 1 else h.stride(2)
    return h.stride(0), h.stride(1), stride_hw


def _blocks(c: int, hw: int, hw_contiguous: bool, tile: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) of the streaming kernels: the memory-contiguous axis gets the long side
    of the tile; the HW side is lane-efficient (``_busy_block``, as in ``_reduce_plan``), no
    shorter than MIN_ROW_RUN where it is the contiguous axis, and the channels fill the tile."""
    if hw_contiguous:
        largest = min(next_power_of_2(hw), tile)
        block_hw = _busy_block(hw, largest, min(largest, MIN_ROW_RUN))
        block_c = min(next_power_of_2(c), max(1, tile // block_hw))
    else:
        block_c = min(next_power_of_2(c), MAX_BLOCK_C, tile)
        largest = min(next_power_of_2(hw), max(1, tile // block_c))
        block_hw = _busy_block(hw, largest, min(largest, max(1, tile // 4 // block_c)))
    return block_c, block_hw


def _busy_block(length: int, largest: int, smallest: int) -> int:
    """The largest power of two in [``smallest``, ``largest``] whose tiles over ``length``
    positions keep at least MIN_BUSY_LANES of their lanes busy, else ``smallest``."""
    block = max(1, largest)
    while block > smallest and length < MIN_BUSY_LANES * triton.cdiv(length, block) * block:
        block //= 2
    return block


class ReducePlan(NamedTuple):
    """How the HW reductions (pooling, backward reduction) cover an (N, C, HW) tensor: tiles of
    block_c channels × block_hw positions; program (i, s) of ``grid`` = (N·cdiv(C, block_c),
    splits) reduces hw in [s·split_hw, (s + 1)·split_hw) (``_split_program``)."""

    block_c: int
    block_hw: int
    split_hw: int  # a multiple of block_hw, so only the last split's last tile is partial
    splits: int
    grid: tuple[int, int]


def _reduce_plan(n: int, c: int, hw: int, hw_contiguous: bool, min_programs: int) -> ReducePlan:
    """The HW axis gets a lane-efficient block (``_busy_block``), no shorter than MIN_ROW_RUN
    positions where it is the contiguous one (NCHW) and no smaller than a quarter of REDUCE_TILE
    per tile otherwise; then, while the grid has fewer than
    ``min_programs`` programs, NCHW first narrows its channel blocks (free, down to a quarter of
    REDUCE_TILE), and either layout then splits HW (each split MIN_SPLIT_HW long at least, its
    tiles no longer than it), whose partial sums a later kernel adds up."""
    small_tile = max(1, REDUCE_TILE // 4)
    if hw_contiguous:
        largest = min(next_power_of_2(hw), REDUCE_TILE)
        smallest = min(largest, MIN_ROW_RUN)
        block_hw = _busy_block(hw, largest, smallest)
        block_c = min(next_power_of_2(c), max(1, REDUCE_TILE // block_hw))
        while block_c > 1 and block_c * block_hw > small_tile and n * triton.cdiv(c, block_c) < min_programs:
            block_c //= 2
    else:
        block_c = min(next_power_of_2(c), MAX_BLOCK_C, REDUCE_TILE)
        largest = min(next_power_of_2(hw), max(1, REDUCE_TILE // block_c))
        smallest = min(largest, max(1, small_tile // block_c))
        block_hw = _busy_block(hw, largest, smallest)
    programs = n * triton.cdiv(c, block_c)
    splits = max(1, min(triton.cdiv(min_programs, max(programs, 1)), hw // MIN_SPLIT_HW))
    if splits > 1:
        cap = 1 << (triton.cdiv(hw, splits).bit_length() - 1)  # the largest power of two within a split
        block_hw = _busy_block(hw, min(block_hw, cap), min(smallest, cap))
    split_hw = triton.cdiv(triton.cdiv(hw, splits), block_hw) * block_hw
    splits = triton.cdiv(hw, split_hw)
    return ReducePlan(block_c, block_hw, split_hw, splits, (programs, splits))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _min_programs(device: torch.device) -> int:
    """PROGRAMS_PER_SM × the SMs of ``device`` (DEFAULT_SMS off CUDA devices)."""
    if device.type != "cuda":
        return PROGRAMS_PER_SM * DEFAULT_SMS
    return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _small_block(length: int) -> int:
    """Block of the (N, C) kernels' flat or channel axis."""
    return min(next_power_of_2(length), SMALL_BLOCK_C)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(device_type: str):
    """A context without autocast on ``device_type``; nothing for device types autocast does not
    know (meta), where torch.autocast itself raises."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- launchers

class Gate(NamedTuple):
    """What the kernels form coef_{n,c} = k·u, u = gain·m_n·σ(z_{n,c}) (gain·m_n without attention) from."""

    logits: torch.Tensor | None  # z (SE's or ECA's), (N, C) in the accumulation dtype; None without attention
    mask: torch.Tensor | None  # m, (N,) dense in the accumulation dtype; None: 1
    skip_gain: torch.Tensor | None  # k, one element in h's dtype or fp32; None: 1
    gain: float  # α·attn_gain, or α without attention


class GradSums(NamedTuple):
    """The backward reduction's outputs in the accumulation dtype (``_se_gate_bwd_reduce_kernel``)."""

    sums: torch.Tensor  # (2, splits, N, C): S1 = Σ dout, then S2 = Σ dout·(h + b), over each split of hw
    dz: torch.Tensor | None  # (N, C); None without SE


_FP32_MAX = 3.4028234663852886e38


def _fp32_pair(x: float) -> tuple[float, float]:
    """(hi, lo): x rounded to fp32 and the rest, also fp32-representable to 24 bits, so hi + lo
    formed in fp64 is x to about 48 bits. Compiled Triton passes a Python float as fp32, which
    would round an fp64 kernel's gain; beyond fp32's range hi is x (inf in any compiled kernel)."""
    if not abs(x) <= _FP32_MAX:
        return x, 0.0
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def _gate_args(gate: Gate, dummy: torch.Tensor) -> tuple[tuple, dict]:
    """The Triton kernels' gate arguments: (logits, mask, skip_gain pointers, gain halves) and
    their HAS_* flags; ``dummy`` stands for an absent tensor, never dereferenced."""
    tensors = tuple(t if t is not None else dummy for t in (gate.logits, gate.mask, gate.skip_gain))
    flags = dict(HAS_SE=gate.logits is not None, HAS_MASK=gate.mask is not None, HAS_SKIP=gate.skip_gain is not None)
    return (*tensors, *_fp32_pair(gate.gain)), flags


def _triton_plan(h: torch.Tensor) -> tuple[ReducePlan, tuple[int, int, int]]:
    """(plan, strides) of the Triton HW reductions over a native-layout h."""
    n, c, hh, ww = h.shape
    strides = _strides(h)
    return _reduce_plan(n, c, hh * ww, strides[2] == 1, _min_programs(h.device)), strides


def se_pool_triton(h, bias):
    """p = mean_hw h + b as an (N, C) tensor in the accumulation dtype; h in native layout. Over
    several splits of HW, their partial sums are added up by ``_se_pool_finish_kernel``."""
    n, c, hh, ww = h.shape
    hw = hh * ww
    acc = _acc_dtype(h.dtype)
    plan, strides = _triton_plan(h)
    pool = new_empty(n, c, device=h.device, dtype=acc)
    partial = pool if plan.splits == 1 else new_empty(plan.splits, n, c, device=h.device, dtype=acc)
    launch(
        _se_pool_fwd_kernel, plan.grid,
        h, bias if bias is not None else h, partial,
        n, c, hw, *strides, plan.split_hw,
        HAS_BIAS=bias is not None, FINISH=plan.splits == 1, ACC_FP64=acc == torch.float64, BLOCK_C=plan.block_c,
        BLOCK_HW=plan.block_hw,
    )
    if plan.splits > 1:
        launch(
            _se_pool_finish_kernel, (triton.cdiv(n * c, FINISH_BLOCK),),
            partial, bias if bias is not None else h, pool,
            n, c, hw, plan.splits,
            HAS_BIAS=bias is not None, ACC_FP64=acc == torch.float64, BLOCK=FINISH_BLOCK,
        )
    return pool


def se_gate_triton_fwd(h, shortcut, gate, bias, shortcut_bias):
    """out = shortcut + sb + coef·(h + b) in h's layout; shortcut (or None) already in h's layout."""
    n, c, hh, ww = h.shape
    hw = hh * ww
    out = new_empty_like(h)
    stride_n, stride_c, stride_hw = _strides(h)
    block_c, block_hw = _blocks(c, hw, stride_hw == 1, STREAM_TILE)
    dummy = h  # never dereferenced when the matching constexpr flag is off
    (logits, mask, skip, gain_hi, gain_lo), gate_flags = _gate_args(gate, dummy)
    launch(
        _se_gate_fwd_kernel, (triton.cdiv(hw, block_hw) * triton.cdiv(c, block_c) * n,),
        h, shortcut if shortcut is not None else dummy, logits, mask, skip, bias if bias is not None else dummy,
        shortcut_bias if shortcut_bias is not None else dummy, out,
        c, hw, stride_n, stride_c, stride_hw, gain_hi, gain_lo,
        HAS_SHORTCUT=shortcut is not None, **gate_flags, HAS_BIAS=bias is not None,
        HAS_SBIAS=shortcut_bias is not None, ACC_FP64=h.dtype == torch.float64, BLOCK_C=block_c, BLOCK_HW=block_hw,
    )
    return out


def _new_grad_sums(h, splits: int, has_se: bool) -> GradSums:
    """Uninitialized outputs of the backward reduction (the kernels write every element)."""
    n, c = h.shape[:2]
    acc = _acc_dtype(h.dtype)
    dz = new_empty(n, c, device=h.device, dtype=acc) if has_se else None
    return GradSums(new_empty(2, splits, n, c, device=h.device, dtype=acc), dz)


def se_gate_triton_bwd_reduce(dout, h, bias, gate):
    """GradSums of (S1, S2) = (Σ dout, Σ dout·(h + b)) per split of hw and (n, c), and dz with SE
    (from the splits by ``_se_gate_bwd_dz_kernel`` where there are several); dout already in h's
    layout."""
    n, c, hh, ww = h.shape
    hw = hh * ww
    plan, strides = _triton_plan(h)
    has_se = gate.logits is not None
    out = _new_grad_sums(h, plan.splits, has_se)
    (logits, mask, skip, gain_hi, gain_lo), gate_flags = _gate_args(gate, h)
    del gate_flags["HAS_SE"]
    fp64 = h.dtype == torch.float64
    launch(
        _se_gate_bwd_reduce_kernel, plan.grid,
        dout, h, bias if bias is not None else h, logits, mask, skip, out.sums,
        out.dz if out.dz is not None else h,
        n, c, hw, *strides, plan.split_hw, gain_hi, gain_lo,
        HAS_BIAS=bias is not None, HAS_DZ=has_se and plan.splits == 1, **gate_flags, ACC_FP64=fp64,
        BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
    )
    if has_se and plan.splits > 1:
        block_c = min(next_power_of_2(c), MAX_BLOCK_C)
        launch(
            _se_gate_bwd_dz_kernel, (n * triton.cdiv(c, block_c),),
            out.sums, logits, mask, skip, out.dz,
            n, c, plan.splits, gain_hi, gain_lo,
            **gate_flags, ACC_FP64=fp64, BLOCK_C=block_c,
        )
    return out


def _new_channel_sums(sums: GradSums, rd: int):
    """(dshortcut_bias, dbias, dskip_partial, dfc2_bias, dfc1_bias) outputs of the per-channel
    sums: (C,) each, dfc1_bias (rd,); the last two (0,) without SE. Distinct tensors, as an op's
    outputs may not alias each other."""
    like = sums.sums
    c = like.shape[-1]
    has_se = sums.dz is not None
    out = [new_empty(c, device=like.device, dtype=like.dtype) for _ in range(3)]
    out.append(new_empty(c if has_se else 0, device=like.device, dtype=like.dtype))
    out.append(new_empty(rd if has_se else 0, device=like.device, dtype=like.dtype))
    return out


def se_gate_triton_bwd(dout, gate, sums, dpool, da):
    """(dh, dshortcut_bias, dbias, dskip_partial, dfc2_bias, dfc1_bias): dh = dout·coef + dp/HW in
    dout's (= h's) layout, and the per-channel sums over samples of ``_se_gate_bwd_sums_kernel``
    (da, the SE's (N, rd) hidden-unit gradient, and dpool None without SE)."""
    n, c, hh, ww = dout.shape
    hw = hh * ww
    dh = new_empty_like(dout)
    stride_n, stride_c, stride_hw = _strides(dout)
    block_c, block_hw = _blocks(c, hw, stride_hw == 1, STREAM_TILE)
    (logits, mask, skip, gain_hi, gain_lo), gate_flags = _gate_args(gate, dout)
    fp64 = sums.sums.dtype == torch.float64
    launch(
        _se_gate_bwd_kernel, (triton.cdiv(hw, block_hw) * triton.cdiv(c, block_c) * n,),
        dout, logits, mask, skip, dpool if dpool is not None else dout, dh,
        c, hw, stride_n, stride_c, stride_hw, gain_hi, gain_lo,
        **gate_flags, ACC_FP64=fp64, BLOCK_C=block_c, BLOCK_HW=block_hw,
    )
    rd = da.shape[1] if da is not None else 0
    outs = _new_channel_sums(sums, rd)
    block_c = _small_block(c)
    block_n = min(next_power_of_2(n), max(1, SUMS_TILE // block_c))
    dummy = sums.sums  # never dereferenced without SE
    launch(
        _se_gate_bwd_sums_kernel, (triton.cdiv(c, block_c) + triton.cdiv(rd, block_c),),
        sums.sums, logits, mask, skip, sums.dz if sums.dz is not None else dummy,
        dpool if dpool is not None else dummy, da if da is not None else dummy, *outs,
        n, c, rd, sums.sums.shape[1], gain_hi, gain_lo,
        **gate_flags, ACC_FP64=fp64, BLOCK_N=block_n, BLOCK_C=block_c,
    )
    return (dh, *outs)


def _cuda_shape(h: torch.Tensor) -> tuple[int, int, int, bool]:
    """(n, c, hw, channels_last) of a native-layout h for nfkernels._C (NCHW when both apply)."""
    n, c, hh, ww = h.shape
    return n, c, hh * ww, not h.is_contiguous()


def _param_dtype(t: torch.Tensor | None) -> str:
    return dtype_name(t.dtype if t is not None else None)


def _cuda_gate(gate: Gate) -> tuple:
    """The gate's arguments of nfkernels._C: logits, mask, skip_gain, skip_gain's dtype, gain."""
    return gate.logits, gate.mask, gate.skip_gain, _param_dtype(gate.skip_gain), gate.gain


@functools.lru_cache(maxsize=1024)
def _cuda_splits_for(n: int, c: int, hw: int, channels_last: bool, dtype: str, min_blocks: int) -> int:
    from nfkernels import _backend

    return _backend.cuda_extension().se_reduce_splits(n, c, hw, channels_last, dtype, min_blocks)


def _cuda_plan(h: torch.Tensor) -> tuple[int, int]:
    """(min_blocks, splits) of the CUDA HW reductions over a native-layout h: the launches take
    both, the caller sizes the splits' workspace by the second."""
    min_blocks = _min_programs(h.device)
    return min_blocks, _cuda_splits_for(*_cuda_shape(h), dtype_name(h.dtype), min_blocks)


def se_pool_cuda(h, bias):
    """se_pool_triton through the CUDA kernels of nfkernels._C (csrc/se_gate.cu)."""
    n, c = h.shape[:2]
    acc = _acc_dtype(h.dtype)
    min_blocks, splits = _cuda_plan(h)
    pool = new_empty(n, c, device=h.device, dtype=acc)
    partial = new_empty(splits, n, c, device=h.device, dtype=acc) if splits > 1 else None
    cuda_launch("se_pool", h.device, h, bias, pool, partial, min_blocks, splits, *_cuda_shape(h), h.dtype,
                _param_dtype(bias))
    return pool


def se_gate_cuda_fwd(h, shortcut, gate, bias, shortcut_bias):
    """se_gate_triton_fwd through the CUDA kernel of nfkernels._C."""
    out = new_empty_like(h)
    cuda_launch("se_gate_fwd", h.device, h, shortcut, *_cuda_gate(gate), bias, shortcut_bias, out, *_cuda_shape(h),
                h.dtype, _param_dtype(bias), _param_dtype(shortcut_bias))
    return out


def se_gate_cuda_bwd_reduce(dout, h, bias, gate):
    """se_gate_triton_bwd_reduce through the CUDA kernels of nfkernels._C."""
    min_blocks, splits = _cuda_plan(h)
    out = _new_grad_sums(h, splits, gate.logits is not None)
    # The kernels read dout in h's dtype, which autograd already gives (the cast is then a no-op).
    cuda_launch("se_gate_bwd_reduce", h.device, dout.to(h.dtype), h, bias, *_cuda_gate(gate), out.sums, out.dz,
                min_blocks, splits, *_cuda_shape(h), h.dtype, _param_dtype(bias))
    return out


def se_gate_cuda_bwd(dout, gate, sums, dpool, da):
    """se_gate_triton_bwd through the CUDA kernels of nfkernels._C."""
    dh = new_empty_like(dout)
    rd = da.shape[1] if da is not None else 0
    outs = _new_channel_sums(sums, rd)
    has_se = sums.dz is not None
    cuda_launch("se_gate_bwd", dout.device, dout, *_cuda_gate(gate), sums.sums, sums.dz, sums.sums.shape[1], dpool,
                da, rd, dh, *outs[:3], outs[3] if has_se else None, outs[4] if has_se else None, *_cuda_shape(dout),
                dout.dtype)
    return (dh, *outs)


class Kernels(NamedTuple):
    """One implementation of the kernels, as the host-side math calls them."""

    pool: object
    gate_fwd: object
    bwd_reduce: object
    bwd: object  # the backward streaming and the per-channel sums (db1 among them)


TRITON_KERNELS = Kernels(se_pool_triton, se_gate_triton_fwd, se_gate_triton_bwd_reduce, se_gate_triton_bwd)
CUDA_KERNELS = Kernels(se_pool_cuda, se_gate_cuda_fwd, se_gate_cuda_bwd_reduce, se_gate_cuda_bwd)


# ----------------------------------------------------------------------------- host-side math

def _acc_matrix(weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """A 1x1-conv weight (O, I, 1, 1) or a linear weight (O, I) as an (O, I) matrix in acc."""
    return weight.reshape(weight.shape[0], weight.shape[1]).to(acc)


def _acc_vector(t: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    return t.reshape(-1).to(acc) if t is not None else None


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel parameter as a dense vector: the kernels index it by channel."""
    return t.reshape(-1).contiguous() if t is not None else None


def _make_gate(logits, mask, skip_gain, alpha, attn_gain, acc) -> Gate:
    """The Gate of a call; logits None without attention (SE or ECA). Each operand is used as
    given when it is already right (no launch)."""
    mask = _flat(mask.to(acc)) if mask is not None else None
    return Gate(logits, mask, skip_gain, alpha * attn_gain if logits is not None else alpha)


def _linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """relu(x·Wᵀ + b): with a bias one launch (``_addmm_activation``, cuBLASLt's bias+relu
    epilogue on CUDA), without one a matmul and a relu."""
    if bias is None:
        return torch.relu(x @ weight.t())
    return torch._addmm_activation(bias, x, weight.t())


def _eca_windows(x: torch.Tensor, k: int) -> torch.Tensor:
    """The (N, C, k) view windows[n, c, j] = x[n, c + j − P] of an (N, C) tensor x, P = (k − 1)/2,
    x taken as 0 outside [0, C): the zero padding of ECA's channel conv. The pad's one extra zero
    on the right gives unfold a window to make when C = 0 (k − 1 < k positions); that extra
    window is dropped."""
    pad = (k - 1) // 2
    return F.pad(x, (pad, pad + 1)).unfold(1, k, 1)[:, :-1]


def _eca_conv(pool: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ECA's logits z_{n,c} = Σ_j w_j·p_{n,c+j−P} (timm EcaModule's conv1d over the channels:
    zero padding, no bias) of an (N, C) p and a (k,) w, as a contiguous (N, C) tensor in their
    dtype. A product and a sum over the windows rather than F.conv1d: cuDNN computes fp32 convs
    in TF32 by default (torch.backends.cudnn.allow_tf32), which would cost the gate its fp32
    accuracy; elementwise ops and sums have no such mode."""
    return (_eca_windows(pool, weight.numel()) * weight).sum(-1).contiguous()


def _eca_backward(pool: torch.Tensor, dz: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dp, dw) of z = _eca_conv(p, w) for the logits' gradient dz: dp_{n,c} = Σ_j w_j·dz_{n,c−j+P}
    (conv_transpose1d: the windows of dz against w reversed), contiguous (N, C), and
    dw_j = Σ_{n,c} dz_{n,c}·p_{n,c+j−P}, (k,)."""
    k = weight.numel()
    dpool = (_eca_windows(dz, k) * weight.flip(0)).sum(-1).contiguous()
    dweight = (_eca_windows(pool, k) * dz.unsqueeze(-1)).sum((0, 1))
    return dpool, dweight


def _forward(
    kernels: Kernels, h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eca_weight, bias, shortcut_bias,
    skip_gain, mask, alpha, attn_gain,
):
    """Forward (module docstring) with ``kernels``; SE with fc1_weight, ECA with eca_weight (never
    both), else no attention. Returns (out in h's native layout, p, r, z), the last three (N, C),
    (N, rd), (N, C) in the accumulation dtype for backward; r empty (0,) with ECA, all three
    without attention (an op cannot return None). The gate's logits z are kept, not g = σ(z): the
    backward needs σ'(z) = σ(z)σ(−z), which g(1 − g) loses where g rounds to 1."""
    h = _native_layout(h)
    shortcut = _in_layout_of(shortcut, h) if shortcut is not None else None
    acc = _acc_dtype(h.dtype)
    bias = _flat(bias)
    if fc1_weight is not None or eca_weight is not None:
        pool = kernels.pool(h, bias)
        # The gate is computed in acc precision even under autocast, which would recast fc1/fc2.
        with _autocast_off(h.device.type):
            if fc1_weight is not None:
                hidden = _linear_relu(pool, _acc_matrix(fc1_weight, acc), _acc_vector(fc1_bias, acc))
                logits = F.linear(hidden, _acc_matrix(fc2_weight, acc), _acc_vector(fc2_bias, acc))
            else:
                hidden = pool.new_empty(0)
                logits = _eca_conv(pool, _acc_vector(eca_weight, acc))
        gate = _make_gate(logits, mask, skip_gain, alpha, attn_gain, acc)
    else:
        pool, hidden, logits = (h.new_empty(0, dtype=acc) for _ in range(3))  # distinct: outputs may not alias
        gate = _make_gate(None, mask, skip_gain, alpha, attn_gain, acc)
    out = kernels.gate_fwd(h, shortcut, gate, bias, _flat(shortcut_bias))
    return out, pool, hidden, logits


def _backward_math(kernels: Kernels, dout, h, fc1_weight, fc2_weight, eca_weight, bias, skip_gain, mask, pool,
                   hidden, logits, alpha, attn_gain):
    """Backward (module docstring) with ``kernels``. Returns (dh in h's native layout and dtype,
    dW1 (rd, C), db1 (rd,), dW2 (C, rd), db2 (C,), deca (k,), dbias (C,), dshortcut_bias (C,),
    dskip ()), all but dh in the accumulation dtype; the SE terms are empty (0,) without SE (but
    db2, (C,) with ECA, which nothing uses), deca without ECA, dskip without skip_gain. The caller
    casts and reshapes them to the parameters' dtypes and shapes; dshortcut = dout needs no
    kernel."""
    h = _native_layout(h)
    acc = _acc_dtype(h.dtype)
    dout = _in_layout_of(dout, h)
    has_attn = fc1_weight is not None or eca_weight is not None
    gate = _make_gate(logits if has_attn else None, mask, skip_gain, alpha, attn_gain, acc)
    sums = kernels.bwd_reduce(dout, h, _flat(bias), gate)
    dw1, dw2, deca = (sums.sums.new_empty(0) for _ in range(3))  # distinct: outputs may not alias
    dpool = da = None
    if fc1_weight is not None:
        with _autocast_off(h.device.type):  # the SE's gradients in acc precision, as its forward
            dw2 = sums.dz.t() @ hidden
            da = torch.ops.aten.threshold_backward(sums.dz @ _acc_matrix(fc2_weight, acc), hidden, 0)  # relu's
            dw1 = da.t() @ pool
            dpool = da @ _acc_matrix(fc1_weight, acc)
    elif eca_weight is not None:
        with _autocast_off(h.device.type):  # ECA's gradients in acc precision, as its forward
            dpool, deca = _eca_backward(pool, sums.dz, _acc_vector(eca_weight, acc))
    # With ECA da stays None: no hidden units, rd = 0 in the per-channel sums (dfc1_bias (0,)).
    dh, dsb, dbias, dskip_partial, db2, db1 = kernels.bwd(dout, gate, sums, dpool, da)
    dskip = dskip_partial.sum() if skip_gain is not None else dskip_partial.new_empty(0)
    return dh, dw1, db1, dw2, db2, deca, dbias, dsb, dskip


# The registered ops: explicit signatures (torch.library infers the schema from them), one per
# kernel set.

def _se_gate_residual_fwd(
    h: torch.Tensor, shortcut: Optional[torch.Tensor], fc1_weight: Optional[torch.Tensor],
    fc1_bias: Optional[torch.Tensor], fc2_weight: Optional[torch.Tensor], fc2_bias: Optional[torch.Tensor],
    eca_weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], shortcut_bias: Optional[torch.Tensor],
    skip_gain: Optional[torch.Tensor], mask: Optional[torch.Tensor], alpha: float, attn_gain: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """_forward with the Triton kernels."""
    return _forward(TRITON_KERNELS, h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eca_weight, bias,
                    shortcut_bias, skip_gain, mask, alpha, attn_gain)


def _se_gate_residual_fwd_cuda(
    h: torch.Tensor, shortcut: Optional[torch.Tensor], fc1_weight: Optional[torch.Tensor],
    fc1_bias: Optional[torch.Tensor], fc2_weight: Optional[torch.Tensor], fc2_bias: Optional[torch.Tensor],
    eca_weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], shortcut_bias: Optional[torch.Tensor],
    skip_gain: Optional[torch.Tensor], mask: Optional[torch.Tensor], alpha: float, attn_gain: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """_forward with the CUDA kernels of nfkernels._C."""
    return _forward(CUDA_KERNELS, h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eca_weight, bias,
                    shortcut_bias, skip_gain, mask, alpha, attn_gain)


def _se_gate_residual_bwd(
    dout: torch.Tensor, h: torch.Tensor, fc1_weight: Optional[torch.Tensor], fc2_weight: Optional[torch.Tensor],
    eca_weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], skip_gain: Optional[torch.Tensor],
    mask: Optional[torch.Tensor], pool: torch.Tensor, hidden: torch.Tensor, logits: torch.Tensor, alpha: float,
    attn_gain: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """_backward_math with the Triton kernels."""
    return _backward_math(TRITON_KERNELS, dout, h, fc1_weight, fc2_weight, eca_weight, bias, skip_gain, mask, pool,
                          hidden, logits, alpha, attn_gain)


def _se_gate_residual_bwd_cuda(
    dout: torch.Tensor, h: torch.Tensor, fc1_weight: Optional[torch.Tensor], fc2_weight: Optional[torch.Tensor],
    eca_weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], skip_gain: Optional[torch.Tensor],
    mask: Optional[torch.Tensor], pool: torch.Tensor, hidden: torch.Tensor, logits: torch.Tensor, alpha: float,
    attn_gain: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """_backward_math with the CUDA kernels of nfkernels._C."""
    return _backward_math(CUDA_KERNELS, dout, h, fc1_weight, fc2_weight, eca_weight, bias, skip_gain, mask, pool,
                          hidden, logits, alpha, attn_gain)


_COMPILED = kernels_are_compiled(_se_gate_fwd_kernel)
se_gate_residual_fwd = define_op("se_gate_residual_fwd", _se_gate_residual_fwd, compiled=_COMPILED)
se_gate_residual_bwd = define_op("se_gate_residual_bwd", _se_gate_residual_bwd, compiled=_COMPILED)
se_gate_residual_fwd_cuda = define_cuda_op("se_gate_residual_fwd_cuda", _se_gate_residual_fwd_cuda)
se_gate_residual_bwd_cuda = define_cuda_op("se_gate_residual_bwd_cuda", _se_gate_residual_bwd_cuda)

# The forward op's inputs (h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eca_weight, bias,
# shortcut_bias, skip_gain, mask, alpha, attn_gain): those that get a gradient from the backward op
# are all but shortcut (dout itself), mask and the scalars.
_FWD_OP_ARITY = 13
_BWD_OP_INPUTS = (0, 2, 3, 4, 5, 6, 7, 8, 9)


def _setup_context(ctx, inputs, output):
    h, shortcut, w1, b1, w2, b2, eca, bias, shortcut_bias, skip, mask, alpha, attn_gain = inputs
    _, pool, hidden, logits = output
    ctx.mark_non_differentiable(pool, hidden, logits)
    # The gradients of pool, hidden and logits then arrive as None, not as zero-filled tensors.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, w1, w2, eca, bias, skip, mask, pool, hidden, logits)
    ctx.alpha, ctx.attn_gain = alpha, attn_gain
    # (shape, dtype) of every parameter that gets a gradient, to cast the accumulated ones back;
    # in the order of the backward op's parameter gradients.
    ctx.meta = [(t.shape, t.dtype) if t is not None else None
                for t in (w1, b1, w2, b2, eca, bias, shortcut_bias, skip)]


def _as_param_grad(grad: torch.Tensor, meta) -> torch.Tensor | None:
    return grad.to(meta[1]).reshape(meta[0]) if meta is not None else None


def _backward_through(bwd_op):
    def backward(ctx, dout, _dpool, _dhidden, _dlogits):
        """Gradients of every input but mask (not differentiated) and the scalars (module docstring).
        Without a gradient of out (only the non-differentiable outputs used) none flows."""
        if dout is None:
            return (None,) * _FWD_OP_ARITY
        dshortcut = dout if ctx.needs_input_grad[1] else None  # the residual passes it through unchanged
        if not any(ctx.needs_input_grad[i] for i in _BWD_OP_INPUTS):
            return None, dshortcut, *(None,) * (_FWD_OP_ARITY - 2)
        h, w1, w2, eca, bias, skip, mask, pool, hidden, logits = ctx.saved_tensors
        dh, *param_grads = bwd_op(dout, h, w1, w2, eca, bias, skip, mask, pool, hidden, logits, ctx.alpha,
                                  ctx.attn_gain)
        dw1, db1, dw2, db2, deca, dbias, dsb, dskip = (_as_param_grad(g, m) for g, m in zip(param_grads, ctx.meta))
        return dh, dshortcut, dw1, db1, dw2, db2, deca, dbias, dsb, dskip, None, None, None

    return backward


se_gate_residual_fwd.register_autograd(_backward_through(se_gate_residual_bwd), setup_context=_setup_context)
se_gate_residual_fwd_cuda.register_autograd(_backward_through(se_gate_residual_bwd_cuda),
                                            setup_context=_setup_context)


def se_gate_residual_triton(h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eca_weight, bias, shortcut_bias,
                            skip_gain, mask, alpha, attn_gain):
    """The Triton path (``torch.ops.nfkernels.se_gate_residual_fwd``); arguments as
    ``nfkernels.se_gate_residual`` (validated there), h not empty (empty h takes the torch path)."""
    return se_gate_residual_fwd(h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eca_weight, bias,
                                shortcut_bias, skip_gain, mask, alpha, attn_gain)[0]


def se_gate_residual_cuda(h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eca_weight, bias, shortcut_bias,
                          skip_gain, mask, alpha, attn_gain):
    """The CUDA path (``torch.ops.nfkernels.se_gate_residual_fwd_cuda``), as the Triton path."""
    return se_gate_residual_fwd_cuda(h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eca_weight, bias,
                                     shortcut_bias, skip_gain, mask, alpha, attn_gain)[0]


def se_gate_residual_torch(h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eca_weight, bias, shortcut_bias,
                           skip_gain, mask, alpha, attn_gain):
    """Plain PyTorch reference (the CPU path, and the path of every backend for empty h): the same
    formula from ordinary ops, autograd for the gradients. fp16/bf16 inputs are computed in fp32
    and the result cast back, like the kernels."""
    acc = _acc_dtype(h.dtype)
    c = h.shape[1]
    hb = h.to(acc)
    if bias is not None:
        hb = hb + bias.to(acc).reshape(1, c, 1, 1)
    coef = torch.full((h.shape[0], 1, 1, 1), alpha, dtype=acc, device=h.device)
    if mask is not None:
        coef = coef * mask.detach().to(acc).reshape(-1, 1, 1, 1)
    if skip_gain is not None:
        coef = coef * skip_gain.to(acc).reshape(())
    if fc1_weight is not None or eca_weight is not None:
        # The mean of an empty map is taken as 0, not torch's NaN (see se_gate_residual).
        pooled = hb.sum((2, 3), keepdim=True) / max(h.shape[2] * h.shape[3], 1)
        # In acc precision even under autocast (as the kernels), which would recast the 1x1 convs.
        with _autocast_off(h.device.type):
            if fc1_weight is not None:
                hidden = torch.relu(F.conv2d(pooled, fc1_weight.to(acc).reshape(*fc1_weight.shape[:2], 1, 1),
                                             _acc_vector(fc1_bias, acc)))
                z = F.conv2d(hidden, fc2_weight.to(acc).reshape(*fc2_weight.shape[:2], 1, 1),
                             _acc_vector(fc2_bias, acc))
            else:  # ECA: conv1d over the channels of the pooled map (as products and sums: no TF32)
                n = h.shape[0]
                z = _eca_conv(pooled.reshape(n, c), _acc_vector(eca_weight, acc)).reshape(n, c, 1, 1)
        # exp(logsigmoid(z)) = σ(z), whose autograd gives σ(z)σ(−z): torch.sigmoid's backward
        # forms g(1 − g), which is 0 where g rounds to 1 (z > 17 in fp32).
        coef = coef * attn_gain * torch.exp(F.logsigmoid(z))
    out = hb * coef  # hb first so that the result takes h's memory format
    if shortcut is not None:
        out = out + shortcut.to(acc)
    if shortcut_bias is not None:
        out = out + shortcut_bias.to(acc).reshape(1, c, 1, 1)
    return out.to(h.dtype)
