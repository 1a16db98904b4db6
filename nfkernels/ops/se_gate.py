"""Squeeze-excite gate with the SkipInit residual: the tail of an NF-ResNet/NFNet block (timm
``NormFreeBlock`` with ``attn_last=SEModule``, ``drop_path``, ``skipinit_gain`` and ``alpha``;
Brock et al. 2021, arXiv:2102.06171; DESIGN.md §5 "Squeeze-excite gate with residual").

With h the conv3 output without its bias b, the shortcut s without its bias sb, the SkipInit
scalar k (1 without one), the per-sample stochastic-depth multipliers m_n (1 without a mask) and
HW = H·W:

    hb   = h + b_c
    p    = mean_hw hb                                   (N, C)
    a    = fc1(p) = p·W1ᵀ + b1,  r = relu(a),  z = fc2(r) = r·W2ᵀ + b2,  g = sigmoid(z)
    u    = α · m_n · attn_gain · g_{n,c}                (α · m_n without SE: no gain, no sigmoid)
    coef = k · u
    out  = s + sb_c + coef_{n,c} · hb

Backward, with S1 = Σ_hw dout and S2 = Σ_hw dout·hb per (n, c):

    ds = dout,  dsb_c = Σ_n S1,  dk = Σ_{n,c} S2·u
    dz = S2 · k·α·m_n·attn_gain · g(1 − g)
    dW2 = dzᵀ·r,  db2 = Σ_n dz,  da = (dz·W2) ⊙ [a > 0],  dW1 = daᵀ·p,  db1 = Σ_n da,  dp = da·W1
    dh = dout·coef + dp/HW,  db_c = Σ_n (coef·S1 + dp)

The bias and the pooling are fused into one reduction, the gate, scalars and residual into one
streaming kernel; the MLP runs on (N, C) with torch matmuls. The backward reads dout twice and
h once and writes dh once. dk is taken from u, never by dividing by k (k is 0 at init).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nfkernels.ops._utils import new_empty, new_empty_like, next_power_of_2

# Elements of one (channels × hw) tile. The reductions loop over HW in such tiles; the streaming
# kernels give one tile to each program. Tests lower them to exercise the loops and the masks.
REDUCE_TILE = 2048
STREAM_TILE = 1024
# In channels_last the channel axis is the contiguous one; this many channels per tile.
MAX_BLOCK_C = 128


@triton.jit
def _se_pool_fwd_kernel(
    h_ptr, bias_ptr, pool_ptr,
    C, HW, stride_n, stride_c, stride_hw,
    HAS_BIAS: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """p_{n,c} = mean_hw h_{n,c,hw} + b_c for a block of channels of one sample.

    Derivative: dh = dp/HW, db = Σ_n dp (done by the backward kernels and host). Source: timm
    SEModule's ``x.mean((2, 3))`` on ``conv3(x)``, with conv3's bias folded in. Grid (N,
    cdiv(C, BLOCK_C)); loops over HW; accumulates in fp32 (fp64 for fp64), writes p in that dtype.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    n = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_mask = cs < C
    hws = tl.arange(0, BLOCK_HW).to(tl.int64)
    row_base = n * stride_n + cs[:, None] * stride_c
    total = tl.zeros([BLOCK_C], dtype=acc_dtype)
    for start in range(0, HW, BLOCK_HW):
        hw = start + hws
        m = c_mask[:, None] & (hw < HW)[None, :]
        x = tl.load(h_ptr + row_base + hw[None, :] * stride_hw, mask=m, other=0.0).to(acc_dtype)
        total += tl.sum(x, axis=1)
    mean = total / HW  # in acc_dtype: a host-side fp32 1/HW would cost fp64 its precision
    if HAS_BIAS:
        mean += tl.load(bias_ptr + cs, mask=c_mask, other=0.0).to(acc_dtype)
    tl.store(pool_ptr + n * C + cs, mean, mask=c_mask)


@triton.jit
def _se_gate_fwd_kernel(
    h_ptr, shortcut_ptr, coef_ptr, bias_ptr, sbias_ptr, out_ptr,
    C, HW, stride_n, stride_c, stride_hw,
    HAS_SHORTCUT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SBIAS: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """out = s + sb_c + coef_{n,c} · (h + b_c) on one (channels × hw) tile of one sample
    (s = 0 without a shortcut: a standalone SE layer).

    coef = α·k·m_n·attn_gain·sigmoid(z) (or α·k·m_n without SE) comes precomputed per (n, c).
    Derivative: ds = dout, dh = dout·coef (+ the pooling path, see the module docstring). Source:
    timm NormFreeBlock ``out = attn_gain·attn_last(out); drop_path; ·skipinit_gain; ·alpha +
    shortcut``. Grid (cdiv(HW, BLOCK_HW), cdiv(C, BLOCK_C), N); h, s and out share strides.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    n = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    hw = tl.program_id(0).to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW).to(tl.int64)
    c_mask = cs < C
    m = c_mask[:, None] & (hw < HW)[None, :]
    offs = n * stride_n + cs[:, None] * stride_c + hw[None, :] * stride_hw
    x = tl.load(h_ptr + offs, mask=m, other=0.0).to(acc_dtype)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cs, mask=c_mask, other=0.0).to(acc_dtype)[:, None]
    coef = tl.load(coef_ptr + n * C + cs, mask=c_mask, other=0.0)
    out = coef[:, None] * x
    if HAS_SHORTCUT:
        out += tl.load(shortcut_ptr + offs, mask=m, other=0.0).to(acc_dtype)
    if HAS_SBIAS:
        out += tl.load(sbias_ptr + cs, mask=c_mask, other=0.0).to(acc_dtype)[:, None]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _se_gate_bwd_reduce_kernel(
    dout_ptr, h_ptr, bias_ptr, s1_ptr, s2_ptr,
    C, HW, stride_n, stride_c, stride_hw,
    HAS_BIAS: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """S1_{n,c} = Σ_hw dout, S2_{n,c} = Σ_hw dout·(h + b_c) for a block of channels of one sample.

    S2 = ∂L/∂coef drives the gate's, the SkipInit gain's and the SE MLP's gradients; S1 gives the
    biases' (module docstring). Grid (N, cdiv(C, BLOCK_C)); each program owns its outputs and
    loops over HW, so the sums are deterministic (no atomics). fp32 accumulation (fp64 for fp64).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    n = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_mask = cs < C
    hws = tl.arange(0, BLOCK_HW).to(tl.int64)
    row_base = n * stride_n + cs[:, None] * stride_c
    b = tl.zeros([BLOCK_C], dtype=acc_dtype)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cs, mask=c_mask, other=0.0).to(acc_dtype)
    s1 = tl.zeros([BLOCK_C], dtype=acc_dtype)
    s2 = tl.zeros([BLOCK_C], dtype=acc_dtype)
    for start in range(0, HW, BLOCK_HW):
        hw = start + hws
        m = c_mask[:, None] & (hw < HW)[None, :]
        offs = row_base + hw[None, :] * stride_hw
        dy = tl.load(dout_ptr + offs, mask=m, other=0.0).to(acc_dtype)
        x = tl.load(h_ptr + offs, mask=m, other=0.0).to(acc_dtype)
        s1 += tl.sum(dy, axis=1)
        s2 += tl.sum(dy * (x + b[:, None]), axis=1)
    tl.store(s1_ptr + n * C + cs, s1, mask=c_mask)
    tl.store(s2_ptr + n * C + cs, s2, mask=c_mask)


@triton.jit
def _se_gate_bwd_kernel(
    dout_ptr, coef_ptr, dpool_ptr, dh_ptr,
    C, HW, stride_n, stride_c, stride_hw,
    HAS_DPOOL: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """dh = dout·coef_{n,c} + dp_{n,c}/HW on one (channels × hw) tile of one sample.

    The first term is the gated path, the second the pooling path into the SE (absent without
    SE); dpool_ptr holds dp/HW already. Grid and strides as in ``_se_gate_fwd_kernel``.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    n = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    hw = tl.program_id(0).to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW).to(tl.int64)
    c_mask = cs < C
    m = c_mask[:, None] & (hw < HW)[None, :]
    offs = n * stride_n + cs[:, None] * stride_c + hw[None, :] * stride_hw
    dy = tl.load(dout_ptr + offs, mask=m, other=0.0).to(acc_dtype)
    coef = tl.load(coef_ptr + n * C + cs, mask=c_mask, other=0.0)
    dh = dy * coef[:, None]
    if HAS_DPOOL:
        dh += tl.load(dpool_ptr + n * C + cs, mask=c_mask, other=0.0)[:, None]
    tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- layout helpers

def _native_layout(h: torch.Tensor) -> torch.Tensor:
    """h itself when NCHW-contiguous or channels_last (both run natively), else a contiguous copy."""
    if h.is_contiguous() or h.is_contiguous(memory_format=torch.channels_last):
        return h
    return h.contiguous()


def _layout_key(t: torch.Tensor) -> tuple[int, ...]:
    # A dim of size 1 is only ever indexed at 0, so its stride cannot change any address.
    return tuple(st if sz > 1 else 0 for sz, st in zip(t.shape, t.stride()))


def _in_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t when it addresses memory exactly like ref does, else a copy in ref's layout."""
    if _layout_key(t) == _layout_key(ref):
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
    """(BLOCK_C, BLOCK_HW): the memory-contiguous axis gets the long side of the tile."""
    if hw_contiguous:
        block_hw = min(next_power_of_2(hw), tile)
        block_c = min(next_power_of_2(c), max(1, tile // block_hw))
    else:
        block_c = min(next_power_of_2(c), MAX_BLOCK_C, tile)
        block_hw = min(next_power_of_2(hw), max(1, tile // block_c))
    return block_c, block_hw


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- launchers

def se_pool_triton(h, bias):
    """p = mean_hw h + b as an (N, C) tensor in the accumulation dtype; h in native layout."""
    n, c, hh, ww = h.shape
    hw = hh * ww
    acc = _acc_dtype(h.dtype)
    pool = new_empty(n, c, device=h.device, dtype=acc)
    stride_n, stride_c, stride_hw = _strides(h)
    block_c, block_hw = _blocks(c, hw, stride_hw == 1, REDUCE_TILE)
    _se_pool_fwd_kernel[(n, triton.cdiv(c, block_c))](
        h, bias if bias is not None else h, pool,
        c, hw, stride_n, stride_c, stride_hw,
        HAS_BIAS=bias is not None, ACC_FP64=acc == torch.float64, BLOCK_C=block_c, BLOCK_HW=block_hw,
    )
    return pool


def se_gate_triton_fwd(h, shortcut, coef, bias, shortcut_bias):
    """out = shortcut + sb + coef·(h + b) in h's layout; shortcut (or None) already in h's layout."""
    n, c, hh, ww = h.shape
    hw = hh * ww
    out = new_empty_like(h)
    stride_n, stride_c, stride_hw = _strides(h)
    block_c, block_hw = _blocks(c, hw, stride_hw == 1, STREAM_TILE)
    dummy = coef  # never dereferenced when the matching constexpr flag is off
    _se_gate_fwd_kernel[(triton.cdiv(hw, block_hw), triton.cdiv(c, block_c), n)](
        h, shortcut if shortcut is not None else dummy, coef, bias if bias is not None else dummy,
        shortcut_bias if shortcut_bias is not None else dummy, out,
        c, hw, stride_n, stride_c, stride_hw,
        HAS_SHORTCUT=shortcut is not None, HAS_BIAS=bias is not None, HAS_SBIAS=shortcut_bias is not None,
        ACC_FP64=coef.dtype == torch.float64, BLOCK_C=block_c, BLOCK_HW=block_hw,
    )
    return out


def se_gate_triton_bwd_reduce(dout, h, bias):
    """(S1, S2) = (Σ_hw dout, Σ_hw dout·(h + b)) per (n, c); dout already in h's layout."""
    n, c, hh, ww = h.shape
    hw = hh * ww
    acc = _acc_dtype(h.dtype)
    s1 = new_empty(n, c, device=h.device, dtype=acc)
    s2 = new_empty(n, c, device=h.device, dtype=acc)
    stride_n, stride_c, stride_hw = _strides(h)
    block_c, block_hw = _blocks(c, hw, stride_hw == 1, REDUCE_TILE)
    _se_gate_bwd_reduce_kernel[(n, triton.cdiv(c, block_c))](
        dout, h, bias if bias is not None else h, s1, s2,
        c, hw, stride_n, stride_c, stride_hw,
        HAS_BIAS=bias is not None, ACC_FP64=acc == torch.float64, BLOCK_C=block_c, BLOCK_HW=block_hw,
    )
    return s1, s2


def se_gate_triton_bwd(dout, coef, dpool_over_hw):
    """dh = dout·coef + dp/HW in dout's (= h's) layout."""
    n, c, hh, ww = dout.shape
    hw = hh * ww
    dh = new_empty_like(dout)
    stride_n, stride_c, stride_hw = _strides(dout)
    block_c, block_hw = _blocks(c, hw, stride_hw == 1, STREAM_TILE)
    _se_gate_bwd_kernel[(triton.cdiv(hw, block_hw), triton.cdiv(c, block_c), n)](
        dout, coef, dpool_over_hw if dpool_over_hw is not None else coef, dh,
        c, hw, stride_n, stride_c, stride_hw,
        HAS_DPOOL=dpool_over_hw is not None, ACC_FP64=coef.dtype == torch.float64,
        BLOCK_C=block_c, BLOCK_HW=block_hw,
    )
    return dh


# ----------------------------------------------------------------------------- host-side math

def _acc_matrix(weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """A 1x1-conv weight (O, I, 1, 1) or a linear weight (O, I) as an (O, I) matrix in acc."""
    return weight.reshape(weight.shape[0], weight.shape[1]).to(acc)


def _acc_vector(t: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    return t.reshape(-1).to(acc) if t is not None else None


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.reshape(-1) if t is not None else None


def _sample_scale(n, mask, alpha, acc, device):
    """α·m_n as an (N, 1) column."""
    scale = torch.full((n, 1), alpha, dtype=acc, device=device)
    return scale * mask.reshape(n, 1).to(acc) if mask is not None else scale


def _unscaled_coef(sample_scale, c, attn_gain, gate):
    """u = α·m_n·attn_gain·g, or α·m_n without SE; (N, C), and coef = k·u."""
    if gate is None:
        return sample_scale.expand(-1, c)
    return sample_scale * attn_gain * gate


def _times_skip(t, skip, acc):
    return t * skip.reshape(()).to(acc) if skip is not None else t


def _forward_triton(h, shortcut, w1, b1, w2, b2, bias, shortcut_bias, skip, mask, alpha, attn_gain):
    """(out, h in native layout, p, r, g); p, r, g are None without SE."""
    h = _native_layout(h)
    shortcut = _in_layout_of(shortcut, h) if shortcut is not None else None
    n, c = h.shape[:2]
    acc = _acc_dtype(h.dtype)
    bias = _flat(bias)
    pool = r = g = None
    if w1 is not None:
        pool = se_pool_triton(h, bias)
        # The gate is computed in acc precision even under autocast, which would recast fc1/fc2.
        with torch.autocast(h.device.type, enabled=False):
            r = torch.relu(F.linear(pool, _acc_matrix(w1, acc), _acc_vector(b1, acc)))
            g = torch.sigmoid(F.linear(r, _acc_matrix(w2, acc), _acc_vector(b2, acc)))
    u = _unscaled_coef(_sample_scale(n, mask, alpha, acc, h.device), c, attn_gain, g)
    coef = _times_skip(u, skip, acc).contiguous()
    out = se_gate_triton_fwd(h, shortcut, coef, bias, _flat(shortcut_bias))
    return out, h, pool, r, g


class SEGateResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, shortcut, w1, b1, w2, b2, bias, shortcut_bias, skip, mask, alpha, attn_gain):
        out, h_native, pool, r, g = _forward_triton(
            h, shortcut, w1, b1, w2, b2, bias, shortcut_bias, skip, mask, alpha, attn_gain)
        ctx.save_for_backward(h_native, w1, w2, bias, skip, mask, pool, r, g)
        ctx.alpha, ctx.attn_gain = alpha, attn_gain
        ctx.param_shapes = tuple(t.shape if t is not None else None for t in (b1, b2, shortcut_bias))
        return out

    @staticmethod
    def backward(ctx, dout):
        h, w1, w2, bias, skip, mask, pool, r, g = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = [None] * 12
        if need[1]:
            grads[1] = dout  # the residual passes the gradient through unchanged
        if not any(need[i] for i in (0, 2, 3, 4, 5, 6, 7, 8)):
            return tuple(grads)
        b1_shape, b2_shape, sb_shape = ctx.param_shapes
        n, c, hh, ww = h.shape
        acc = _acc_dtype(h.dtype)
        dout = _in_layout_of(dout, h)
        s1, s2 = se_gate_triton_bwd_reduce(dout, h, _flat(bias))
        sample_scale = _sample_scale(n, mask, ctx.alpha, acc, h.device)
        u = _unscaled_coef(sample_scale, c, ctx.attn_gain, g)
        coef = _times_skip(u, skip, acc).contiguous()
        dpool = None
        if g is not None:
            w1m, w2m = _acc_matrix(w1, acc), _acc_matrix(w2, acc)
            dz = s2 * _times_skip(sample_scale * ctx.attn_gain, skip, acc) * g * (1.0 - g)
            da = (dz @ w2m) * (r > 0)
            dpool = da @ w1m
            if need[2]:
                grads[2] = (da.t() @ pool).to(w1.dtype).reshape(w1.shape)
            if need[3]:
                grads[3] = da.sum(0).to(w1.dtype).reshape(b1_shape)
            if need[4]:
                grads[4] = (dz.t() @ r).to(w2.dtype).reshape(w2.shape)
            if need[5]:
                grads[5] = dz.sum(0).to(w2.dtype).reshape(b2_shape)
        if need[0]:
            grads[0] = se_gate_triton_bwd(dout, coef, dpool / (hh * ww) if dpool is not None else None)
        if need[6]:
            dbias = (coef * s1).sum(0)
            if dpool is not None:
                dbias = dbias + dpool.sum(0)
            grads[6] = dbias.to(bias.dtype).reshape(bias.shape)
        if need[7]:
            grads[7] = s1.sum(0).to(h.dtype).reshape(sb_shape)
        if need[8]:
            grads[8] = (s2 * u).sum().to(skip.dtype).reshape(skip.shape)
        return tuple(grads)


def se_gate_residual_triton(h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, bias, shortcut_bias,
                            skip_gain, mask, alpha, attn_gain):
    """The Triton path; arguments as ``nfkernels.se_gate_residual`` (validated there), N > 0."""
    args = (h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, bias, shortcut_bias, skip_gain, mask)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return SEGateResidualFunction.apply(*args, alpha, attn_gain)
    return _forward_triton(*args, alpha, attn_gain)[0]


def se_gate_residual_torch(h, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, bias, shortcut_bias,
                           skip_gain, mask, alpha, attn_gain):
    """Plain PyTorch reference (the CPU path): the same formula from ordinary ops, autograd for the
    gradients. fp16/bf16 inputs are computed in fp32 and the result cast back, like the kernels."""
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
    if fc1_weight is not None:
        pooled = hb.mean((2, 3), keepdim=True)
        hidden = torch.relu(F.conv2d(pooled, fc1_weight.to(acc).reshape(*fc1_weight.shape[:2], 1, 1),
                                     _acc_vector(fc1_bias, acc)))
        z = F.conv2d(hidden, fc2_weight.to(acc).reshape(*fc2_weight.shape[:2], 1, 1), _acc_vector(fc2_bias, acc))
        coef = coef * attn_gain * torch.sigmoid(z)
    out = hb * coef  # hb first so that the result takes h's memory format
    if shortcut is not None:
        out = out + shortcut.to(acc)
    if shortcut_bias is not None:
        out = out + shortcut_bias.to(acc).reshape(1, c, 1, 1)
    return out.to(h.dtype)
