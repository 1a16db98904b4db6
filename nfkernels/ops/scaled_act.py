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

The CUDA kernels of csrc/scaled_act.cu (``torch.ops.nfkernels.scaled_act_fwd_cuda`` / ``_bwd_cuda``)
run the same math on the same (R, K) view, behind the same autograd formula; they take coeff
in the accumulation dtype and reduce dbias with their own deterministic two-stage sum.
"""
from __future__ import annotations

import math
from typing import Optional

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

# A program's tile holds about TILE_ELEMS elements, at most MAX_BLOCK_K of them along a row.
# The backward with channels on columns loops over row tiles so that at most MAX_ROW_GROUPS
# partial dbias rows are written, keeping that buffer small next to dx. Tests lower all three.
TILE_ELEMS = 4096
MAX_BLOCK_K = 1024
MAX_ROW_GROUPS = 1024


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
def _scaled_act_fwd_kernel(
    x_ptr, bias_ptr, y_ptr,
    R, K, C, coeff,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, CHANNEL_ON_ROWS: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = coeff · f(x + b_c) on one (BLOCK_R, BLOCK_K) tile of the (R, K) row-major view of x.

    coeff = γ·scale. The channel of an element is its row mod C (NCHW: rows are (n, c) planes)
    or its column (channels-last: rows are pixels). Math in fp32 (fp64 for fp64 inputs).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < R
    col_mask = cols < K
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows[:, None] * K + cols[None, :]
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
    if HAS_BIAS:
        if CHANNEL_ON_ROWS:
            z += tl.load(bias_ptr + rows % C, mask=row_mask, other=0.0).to(acc_dtype)[:, None]
        else:
            z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(acc_dtype)[None, :]
    y = _act_fwd(z, ACT) * coeff
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scaled_act_bwd_kernel(
    dy_ptr, x_ptr, bias_ptr, dx_ptr, partial_ptr,
    R, K, C, coeff, row_tiles,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, CHANNEL_ON_ROWS: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx = dy · coeff · f'(x + b_c) over ``row_tiles`` consecutive row tiles of one column tile,
    plus, when BIAS_GRAD, deterministic partial sums of dx for dbias (no atomics; the launcher
    adds them up in a fixed order):

    CHANNEL_ON_ROWS: partial[row, pid_k] = Σ of dx over this tile's columns of that row
                     (shape (R, number of column tiles); row_tiles is 1);
    otherwise:       partial[pid_r, col] = Σ of dx over this program's rows of that column
                     (shape (number of row groups, K)).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_r = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    cols = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    if HAS_BIAS:
        if not CHANNEL_ON_ROWS:
            bias_cols = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(acc_dtype)
    if BIAS_GRAD:
        if not CHANNEL_ON_ROWS:
            col_sums = tl.zeros([BLOCK_K], dtype=acc_dtype)
    for tile in range(0, row_tiles):
        rows = (pid_r * row_tiles + tile) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows[:, None] * K + cols[None, :]
        z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
        if HAS_BIAS:
            if CHANNEL_ON_ROWS:
                z += tl.load(bias_ptr + rows % C, mask=row_mask, other=0.0).to(acc_dtype)[:, None]
            else:
                z += bias_cols[None, :]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
        dx = tl.where(mask, dy * _act_grad(z, ACT) * coeff, 0.0)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if BIAS_GRAD:
            if CHANNEL_ON_ROWS:
                tl.store(partial_ptr + rows * tl.num_programs(1) + pid_k, tl.sum(dx, axis=1), mask=row_mask)
            else:
                col_sums += tl.sum(dx, axis=0)
    if BIAS_GRAD:
        if not CHANNEL_ON_ROWS:
            tl.store(partial_ptr + pid_r * K + cols, col_sums, mask=col_mask)


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


def _tiles(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    block_k = min(next_power_of_2(n_cols), MAX_BLOCK_K)
    block_r = min(next_power_of_2(n_rows), max(1, TILE_ELEMS // block_k))
    num_warps = 8 if block_r * block_k >= 4096 else 4
    return block_r, block_k, num_warps


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _dbias_result(dbias: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return dbias.to(bias.dtype).view(bias.shape)


def _scaled_act_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], act: str, coeff: float) -> torch.Tensor:
    """Launch the forward kernel: y = coeff·f(x + b_c), laid out like x (or, when x is neither
    NCHW- nor channels-last-dense, like its contiguous copy)."""
    x, x_rows, channel_on_rows, y, y_rows = _fwd_buffers(x)
    n_rows, n_cols = x_rows.shape
    block_r, block_k, num_warps = _tiles(n_rows, n_cols)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_k))
    launch(
        _scaled_act_fwd_kernel, grid,
        x_rows, _flat(bias) if bias is not None else x_rows, y_rows,
        n_rows, n_cols, x.shape[1], coeff,
        ACT=act, HAS_BIAS=bias is not None, CHANNEL_ON_ROWS=channel_on_rows,
        ACC_FP64=x.dtype == torch.float64, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
    )
    return y


def _scaled_act_bwd(
    dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], act: str, coeff: float, need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns (dx laid out like the dense ``x``, dbias in bias's
    shape and dtype, or an empty tensor when not asked for: an op cannot return None)."""
    x, x_rows, channel_on_rows, dy_rows, dx, dx_rows = _bwd_buffers(dy, x)
    n_rows, n_cols = x_rows.shape
    n_channels = x.shape[1]
    block_r, block_k, num_warps = _tiles(n_rows, n_cols)
    row_blocks, col_blocks = triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_k)
    bias_grad = bias is not None and need_bias_grad
    # Only the column-channel dbias needs programs to span several row tiles (fewer partials).
    row_tiles = max(1, triton.cdiv(row_blocks, MAX_ROW_GROUPS)) if bias_grad and not channel_on_rows else 1
    row_groups = triton.cdiv(row_blocks, row_tiles)
    partial = None
    if bias_grad:
        shape = (n_rows, col_blocks) if channel_on_rows else (row_groups, n_cols)
        partial = new_empty(shape, device=x.device, dtype=_acc_dtype(x.dtype))
    launch(
        _scaled_act_bwd_kernel, (row_groups, col_blocks),
        dy_rows, x_rows, _flat(bias) if bias is not None else x_rows, dx_rows,
        partial if bias_grad else dx_rows,
        n_rows, n_cols, n_channels, coeff, row_tiles,
        ACT=act, HAS_BIAS=bias is not None, BIAS_GRAD=bias_grad, CHANNEL_ON_ROWS=channel_on_rows,
        ACC_FP64=x.dtype == torch.float64, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
    )
    if not bias_grad:
        return dx, dx.new_empty(0)
    if channel_on_rows:  # rows are (n, c) planes in n-major order
        dbias = partial.sum(dim=1).view(-1, n_channels).sum(dim=0)
    else:
        dbias = partial.sum(dim=0)
    return dx, _dbias_result(dbias, bias)


def _flat(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """bias as a dense vector: the CUDA kernels index it by channel."""
    return bias.reshape(-1).contiguous() if bias is not None else None


def _scaled_act_fwd_cuda(x: torch.Tensor, bias: Optional[torch.Tensor], act: str, coeff: float) -> torch.Tensor:
    """``_scaled_act_fwd`` through the CUDA kernel of nfkernels._C (same output)."""
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
    """``_scaled_act_bwd`` through the CUDA kernels of nfkernels._C (same outputs); dbias is
    summed on the device from the kernel's partial sums, in a fixed order."""
    from nfkernels import _backend

    x, x_rows, channel_on_rows, dy_rows, dx, dx_rows = _bwd_buffers(dy, x)
    n_rows, n_cols = x_rows.shape
    n_channels = x.shape[1]
    bias_grad = bias is not None and need_bias_grad
    acc = _acc_dtype(x.dtype)
    dbias = workspace = None
    if bias_grad:
        size = _backend.cuda_extension().scaled_act_bwd_workspace(
            n_rows, n_cols, n_channels, channel_on_rows, dtype_name(x.dtype))
        workspace = new_empty(size, device=x.device, dtype=acc)
        dbias = new_empty(n_channels, device=x.device, dtype=acc)
    cuda_launch(
        "scaled_act_bwd", x.device,
        # The kernels read dy in x's dtype, which autograd already gives (the cast is then a no-op).
        dy_rows.to(x.dtype), x_rows, _flat(bias), dx_rows, dbias, workspace, n_rows, n_cols, n_channels,
        channel_on_rows, x.dtype, dtype_name(bias.dtype if bias is not None else None), act, coeff,
    )
    return dx, (_dbias_result(dbias, bias) if bias_grad else dx.new_empty(0))


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
