// Framework-free CUDA kernels of nfkernels (docs/design.md §2): raw device pointers, sizes and a
// cudaStream_t in, a cudaError_t out. No torch headers; python/bindings.cpp wraps them.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nfk {

enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Unit-wise Adaptive Gradient Clipping (Brock et al. 2021, §4.1; timm adaptive_clip_grad) of
// every unit row in one launch. `rows` (device, n_units x 3 int64) holds per unit its tensor t,
// its first element within that tensor and its length: the n_singles units of length 1 first,
// then the others by decreasing length; `bases` (device, n_tensors x 2 int64) holds per tensor
// the offsets of its gradient and weight (elements from grad / weight). row_cols (a power of two)
// sizes the lane groups of the rows (agc_rows.cuh). Per unit: ||W||* = max(||W||, eps); unless
// ||G|| < clip_factor ||W||*, G <- G * clip_factor ||W||* / max(||G||, 1e-6). The gradient and
// weight dtypes may differ; norms accumulate in fp32 (fp64 when either is fp64).
cudaError_t agc(DType grad_dtype, DType weight_dtype, void* grad, const void* weight, const int64_t* rows,
                const int64_t* bases, int64_t n_units, int64_t n_singles, int64_t row_cols, double clip_factor,
                double eps, cudaStream_t stream);

// Scalars are double so fp64 parameters keep fp64 hyper-parameters; kernels of other dtypes
// round them once to their accumulation type.
struct SgdAgcOptions {
  double lr, momentum, weight_decay, clip_factor, eps;
  bool clip, has_momentum, nesterov;
};

// SGD (torch.optim.SGD semantics, no dampening) with AGC, one pass per unit row. `rows`,
// n_singles and row_cols as for agc; `bases` (device, n_tensors x 3 int64): per tensor its param,
// grad and momentum-buffer offsets (elements from param / grad / momentum_buffer). Per row:
// g <- s g (s the AGC factor when clip); g <- g + wd p; buf <- m buf + g (the caller zero-fills
// buf before the first step, so that is buf <- g); nesterov: g <- g + m buf, else g <- buf;
// p <- p - lr g. buf (param_dtype) is unused without momentum. The gradient's dtype may differ
// from the parameter's; the math runs in fp32 (fp64 when either is fp64).
cudaError_t sgd_agc(DType param_dtype, DType grad_dtype, void* param, const void* grad, void* momentum_buffer,
                    const int64_t* rows, const int64_t* bases, int64_t n_units, int64_t n_singles, int64_t row_cols,
                    const SgdAgcOptions& options, cudaStream_t stream);


// ---------------------------------------------------------------------------------------------
// Scaled Weight Standardization (mirrors nfkernels/ops/weight_standardize.py; docs/design.md §5).
// `weight` is n_rows dense rows of row_len elements (one per output unit), `out` / `dweight`
// the same layout. Per row, with μ, M2 = Σ (W − μ)², s0 and q as in the Triton kernels:
//   timm:     r = 1/sqrt(M2/N + eps), s0 = gamma_scaled·r (gamma_scaled = γ/sqrt(N)), q = r²/N
//   deepmind: r = 1/sqrt(max(M2, eps)), s0 = gamma_scaled·r (gamma_scaled = γ),
//             q = r² if M2 > eps else 0
//   Ŵ = (W − μ)·g·s0;   dW = g·s0·(dŴ − mean dŴ − q·a·(W − μ)), dg = s0·a, a = Σ dŴ·(W − μ).
// gain (weight's dtype) may be null; mean, s0, q and dgain are per-row vectors in the
// accumulation dtype (fp32, fp64 for fp64 weights); dgain may be null.
cudaError_t weight_standardize_fwd(DType weight_dtype, DType out_dtype, const void* weight, const void* gain,
                                   void* out, void* mean, void* s0, void* q, int64_t n_rows, int64_t row_len,
                                   double gamma_scaled, double eps, bool deepmind, cudaStream_t stream);
cudaError_t weight_standardize_bwd(DType dout_dtype, DType weight_dtype, const void* dout, const void* weight,
                                   const void* gain, const void* mean, const void* s0, const void* q,
                                   void* dweight, void* dgain, int64_t n_rows, int64_t row_len,
                                   cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Scaled activations y = coeff·f(x + b_c) (mirrors nfkernels/ops/scaled_act.py). ELU and CELU
// (α = 1) are one function.
enum class Activation {
  kGelu, kGeluTanh, kRelu, kSilu, kRelu6, kElu, kLeakyRelu, kSelu, kSigmoid, kTanh, kSoftplus, kSoftsign,
  kLogSigmoid, kIdentity
};

// The (rows, cols) row-major view of a dense activation tensor (scaled_act.py _matrix_view):
// the channel of element (r, k) is r % channels when channel_on_rows (NCHW: rows are (n, c)
// planes), else k (channels-last, or (N, C): rows are pixels / samples).
struct MatrixView {
  int64_t rows, cols, channels;
  bool channel_on_rows;
};

// A per-channel parameter: in the activation dtype, or float32 (is_float) next to fp16/bf16
// activations, as under autocast. data may be null (no such parameter).
struct ChannelParam {
  const void* data;
  bool is_float;
};

cudaError_t scaled_act_fwd(DType dtype, Activation act, const void* x, ChannelParam bias, void* y,
                           const MatrixView& view, double coeff, cudaStream_t stream);

// Accumulation-dtype elements of the workspace scaled_act_bwd needs for dbias (partial sums and
// counters of channel blocks split over several blocks; 0 when none is split).
int64_t scaled_act_bwd_workspace(DType dtype, const MatrixView& view);

// dx = dy·coeff·f'(x + b_c) (dy, x, dx share the view and dtype); when dbias is not null also
// dbias_c = Σ of dx over every element of channel c, accumulated in the accumulation dtype and
// written in bias's dtype, deterministically inside the kernel (fixed-order sums; a split channel
// block's partial sums go through `workspace`, whose counters this zeroes first, and are added by
// the block that finishes last; no float atomics). workspace may be null when its size is 0.
cudaError_t scaled_act_bwd(DType dtype, Activation act, const void* dy, const void* x, ChannelParam bias, void* dx,
                           void* dbias, void* workspace, const MatrixView& view, double coeff, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Squeeze-excite gate with the SkipInit residual (mirrors nfkernels/ops/se_gate.py). h, shortcut,
// out, dout and dh are dense (n, c, hw) tensors, NCHW or channels_last, all in one layout and
// dtype. Per-(n, c) operands (pool, logits, the backward terms, dpool) are (n, c) row-major in the
// accumulation dtype, per-channel sums (c,) in it.
struct SeShape {
  int64_t n, c, hw;
  bool channels_last;
};

// The HW reductions (se_pool, se_gate_bwd_reduce) split HW where batch × channels alone would
// run fewer than min_blocks blocks (the caller passes e.g. 2 × the SM count); this is their
// number of splits, a function of its arguments only. Each launch takes min_blocks and this
// count back (its workspace is sized by it) and refuses a count its plan does not give.
int64_t se_reduce_splits(DType dtype, const SeShape& shape, int64_t min_blocks);

// pool_{n,c} = mean_hw h + b_c. With splits > 1 the splits' partial sums go to `partial`
// ((splits, n, c), accumulation dtype) and a second kernel adds them in split order.
cudaError_t se_pool(DType dtype, const void* h, ChannelParam bias, void* pool, void* partial, int64_t min_blocks,
                    int64_t splits, const SeShape& shape, cudaStream_t stream);

// The gate of one call, formed inside the kernels per (n, c): u = gain·m_n·σ(z_{n,c}) (gain·m_n
// without SE) and coef = k·u, with gain = α·attn_gain (α without SE), z = logits ((n, c),
// accumulation dtype; null: no SE), m = mask (n values, accumulation dtype; null: 1) and
// k = skip_gain (one value in h's dtype or float32; null: 1).
struct SeGate {
  const void* logits;
  const void* mask;
  ChannelParam skip_gain;
  double gain;
};

// The backward reduction's outputs in the accumulation dtype: `sums` (2, splits, n, c) holds
// S1 = Σ dout over each split of hw, then S2 = Σ dout·(h + b_c); with SE (else null) dz (n, c) =
// S2·k·gain·m_n·σ(z)σ(−z) of the whole S2.
struct SeGradSums {
  void* sums;
  void* dz;
  int64_t splits;
};

// out = shortcut + sb_c + coef_{n,c}·(h + b_c); shortcut may be null.
cudaError_t se_gate_fwd(DType dtype, const void* h, const void* shortcut, const SeGate& gate, ChannelParam bias,
                        ChannelParam shortcut_bias, void* out, const SeShape& shape, cudaStream_t stream);
// Writes `sums` (dz with SE), in two kernels where there are several splits and SE.
cudaError_t se_gate_bwd_reduce(DType dtype, const void* dout, const void* h, ChannelParam bias, const SeGate& gate,
                               const SeGradSums& sums, int64_t min_blocks, const SeShape& shape, cudaStream_t stream);
// dh = dout·coef_{n,c} + dpool_{n,c}/hw, and per channel, summed over samples (accumulation
// dtype), with S1, S2 of each (n, c) added over the splits of `sums` and u = gain·m_n·σ(z):
// dshortcut_bias = Σ S1, dbias = Σ (k·u·S1 + dpool), dskip_partial = Σ S2·u and, with SE,
// dfc2_bias = Σ dz and dfc1_bias = Σ da per hidden unit (da (n, rd), the gradient of the SE's
// hidden pre-activations). dpool ((n, c)), da, dfc2_bias and dfc1_bias are null without SE.
cudaError_t se_gate_bwd(DType dtype, const void* dout, const SeGate& gate, const SeGradSums& sums, const void* dpool,
                        const void* da, int64_t rd, void* dh, void* dshortcut_bias, void* dbias, void* dskip_partial,
                        void* dfc2_bias, void* dfc1_bias, const SeShape& shape, cudaStream_t stream);

}  // namespace nfk
