// Squeeze-excite gate with the SkipInit residual: pooling, gate·residual forward, backward
// reduction, backward streaming and per-channel sum kernels (see nfkernels.h; mirrors the Triton
// kernels of nfkernels/ops/se_gate.py, whose docstring has the full forward and backward math).
//
// A dense (n, c, hw) tensor is an (R, K) row-major matrix: NCHW has rows (n, c) and K = hw
// (channel = row % c), channels-last has rows (n, hw) and K = c (channel = column). Per-(n, c)
// operands (pool, logits, the backward terms, dpool) are indexed by row in NCHW and by
// (row / hw)·c + column in channels-last.
#include "matrix_tiles.cuh"

namespace nfk {
namespace {

// In channels-last a reduction block spans at most one warp of channels, so that a small batch
// still spreads over many blocks (se_gate.py MAX_BLOCK_C plays the same role).
constexpr int kMaxReduceThreadsK = kWarp;

// σ(z) and σ(z)σ(−z) (= g(1 − g)) from e = exp(−|z|): no overflow for large |z|, and
// σ(z)σ(−z) = e/(1 + e)² keeps its relative accuracy where g rounds to 1, which g(1 − g) does not
// (se_gate.py _sigmoid_and_slope). Source: timm SEModule's x_se.sigmoid().
template <typename Acc>
__device__ __forceinline__ void sigmoid_and_slope(Acc z, Acc& g, Acc& slope) {
  const Acc e = exp(-fabs(z));
  const Acc r = Acc(1) / (Acc(1) + e);
  g = z >= Acc(0) ? r : e * r;
  slope = e * r * r;
}

// SeGate (nfkernels.h) as the kernels read it, in the accumulation type: u = gain·m_n·σ(z),
// coef = k·u, formed per (n, c) where needed instead of being materialized by the host.
template <typename T>
struct Gate {
  using Acc = typename AccType<T>::type;
  const Acc* logits;  // null: no SE, σ taken as 1
  const Acc* mask;    // null: m = 1
  ParamPtr<T> skip_gain;  // null data: k = 1
  Acc gain;  // fp32 kernels round it once, as the Triton kernels' gain_hi + gain_lo

  __device__ __forceinline__ Acc sample_scale(int64_t n) const { return mask != nullptr ? gain * mask[n] : gain; }
  __device__ __forceinline__ Acc skip() const {
    return skip_gain.data != nullptr ? skip_gain.template load<Acc>(0) : Acc(1);
  }
  __device__ __forceinline__ Acc sigmoid(int64_t nc) const {
    if (logits == nullptr) return Acc(1);
    Acc g, slope;
    sigmoid_and_slope(logits[nc], g, slope);
    return g;
  }
};

template <typename T>
Gate<T> gate_view(const SeGate& g) {
  using Acc = typename AccType<T>::type;
  return Gate<T>{static_cast<const Acc*>(g.logits), static_cast<const Acc*>(g.mask), param_ptr<T>(g.skip_gain),
                 static_cast<Acc>(g.gain)};
}

// SeGradTerms (nfkernels.h) in the accumulation type.
template <typename Acc>
struct Terms {
  Acc* s1;
  Acc* coef_s1;
  Acc* s2_u;
  Acc* dz;  // null without SE
};

template <typename Acc>
Terms<Acc> terms_view(const SeGradTerms& t) {
  return Terms<Acc>{static_cast<Acc*>(t.s1), static_cast<Acc*>(t.coef_s1), static_cast<Acc*>(t.s2_u),
                    static_cast<Acc*>(t.dz)};
}

// The terms of (n, c) from its sums S1 = Σ_hw dout and S2 = Σ_hw dout·(h + b_c)
// (_se_gate_bwd_reduce_kernel): S1, coef·S1, S2·u (dk's, from u rather than coef/k: k is 0 at
// init) and, with SE, dz = S2·k·gain·m_n·σ(z)σ(−z).
template <typename T, typename Acc>
__device__ __forceinline__ void store_terms(const Gate<T>& gate, const Terms<Acc>& terms, int64_t n, int64_t nc,
                                            Acc s1, Acc s2) {
  const Acc scale = gate.sample_scale(n), coef_scale = scale * gate.skip();
  Acc g = 1, slope = 0;
  if (gate.logits != nullptr) sigmoid_and_slope(gate.logits[nc], g, slope);
  terms.s1[nc] = s1;
  terms.coef_s1[nc] = coef_scale * g * s1;
  terms.s2_u[nc] = s2 * (scale * g);
  if (terms.dz != nullptr) terms.dz[nc] = s2 * coef_scale * slope;
}

// out = coef_{n,c}·(x + b_c) + s + sb_c + extra_{n,c}/hw, elementwise on (row tile, column tile)
// work items; null operands are absent. coef = k·gain·m_n·σ(z) (k·gain·m_n without SE) is formed
// from `gate`. Two uses, one kernel:
//   forward  (_se_gate_fwd_kernel):  x = h, s = shortcut, extra absent:
//            out = shortcut + sb_c + coef·(h + b_c);
//   backward (_se_gate_bwd_kernel):  x = dout, no biases, s absent, extra = dp:
//            dh = dout·coef + dp_{n,c}/HW, the gated path plus the pooling path into the SE.
// Derivative of the forward: ds = dout, dh = dout·coef (+ pooling path). Math in fp32 (fp64).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    se_stream_kernel(const T* __restrict__ x, const T* __restrict__ shortcut, Gate<T> gate, ParamPtr<T> bias,
                     ParamPtr<T> shortcut_bias, const typename AccType<T>::type* __restrict__ extra,
                     T* __restrict__ out, Tiles t, int64_t channels, int64_t hw, bool channels_last) {
  using Acc = typename AccType<T>::type;
  constexpr int V = vec_width<T>();
  const int tk = threadIdx.x % t.threads_k, tr = threadIdx.x / t.threads_k;
  const Acc k = gate.skip();
  for (int64_t tile = blockIdx.x; tile < t.row_tiles * t.col_tiles; tile += gridDim.x) {
    const int64_t col = ((tile % t.col_tiles) * t.threads_k + tk) * V;
    if (col >= t.cols) continue;
    // Per-channel biases are per column in channels-last: load them once per tile.
    Acc b[V] = {}, sb[V] = {};
    if (channels_last) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool ok = col + e < t.cols;
        if (bias.data != nullptr && ok) b[e] = bias.template load<Acc>(col + e);
        if (shortcut_bias.data != nullptr && ok) sb[e] = shortcut_bias.template load<Acc>(col + e);
      }
    }
    const int64_t first_row = (tile / t.col_tiles) * t.tile_rows() + tr;
    for (int s = 0; s < kRowSteps; ++s) {
      const int64_t row = first_row + static_cast<int64_t>(s) * t.threads_r;
      if (row >= t.rows) break;
      // Index of (n, c) for column offset 0 of this chunk, and its step per column.
      const int64_t nc = channels_last ? (row / hw) * channels + col : row;
      const int nc_step = channels_last ? 1 : 0;
      const Acc sample_coef = gate.sample_scale(channels_last ? row / hw : row / channels) * k;
      // coef of this chunk's channels: one per column in channels-last, one per row in NCHW.
      Acc cf[V];
      if (channels_last) {
#pragma unroll
        for (int e = 0; e < V; ++e) cf[e] = col + e < t.cols ? sample_coef * gate.sigmoid(nc + e) : Acc(0);
      } else {
        const int64_t c = row % channels;
        const Acc rb = bias.data != nullptr ? bias.template load<Acc>(c) : Acc(0);
        const Acc rsb = shortcut_bias.data != nullptr ? shortcut_bias.template load<Acc>(c) : Acc(0);
        const Acc rcf = sample_coef * gate.sigmoid(nc);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          b[e] = rb;
          sb[e] = rsb;
          cf[e] = rcf;
        }
      }
      const int64_t i = row * t.cols + col, end = (row + 1) * t.cols;
      Acc v[V], sc[V] = {};
      load_acc<V>(x, i, end, t.vector, v);
      if (shortcut != nullptr) load_acc<V>(shortcut, i, end, t.vector, sc);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool ok = col + e < t.cols;
        const Acc ex = extra != nullptr && ok ? extra[nc + e * nc_step] / static_cast<Acc>(hw) : Acc(0);
        v[e] = cf[e] * (v[e] + b[e]) + sc[e] + sb[e] + ex;
      }
      store_acc<V>(out, i, end, t.vector, v);
    }
  }
}

// NCHW reductions over each row (an (n, c) plane), a band of threads_r rows per work item:
//   pool (kGrad false, _se_pool_fwd_kernel):        pool = mean_hw x + b_c
//   grad (kGrad true, _se_gate_bwd_reduce_kernel):  S1 = Σ_hw dout (x = dout),
//                                                   S2 = Σ_hw dout·(h + b_c), then store_terms
// S2 = ∂L/∂coef drives the gate's, SkipInit gain's and SE MLP's gradients, S1 the biases'.
// Derivative of the pooling: dh = dp/HW, db = Σ_n dp. Each row's sums are formed inside one
// block in a fixed order: deterministic, no atomics. fp32 accumulation (fp64 for fp64).
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    se_reduce_rows_kernel(const T* __restrict__ x, const T* __restrict__ h, ParamPtr<T> bias, Gate<T> gate,
                          typename AccType<T>::type* __restrict__ pool, Terms<typename AccType<T>::type> terms,
                          Tiles t, int64_t channels) {
  using Acc = typename AccType<T>::type;
  constexpr int V = vec_width<T>();
  __shared__ Acc scratch[kThreads / kWarp];
  const int tk = threadIdx.x % t.threads_k, tr = threadIdx.x / t.threads_k;
  for (int64_t band = blockIdx.x; band < ceil_div(t.rows, t.threads_r); band += gridDim.x) {
    const int64_t row = band * t.threads_r + tr;
    const bool row_ok = row < t.rows;
    const Acc b = bias.data != nullptr && row_ok ? bias.template load<Acc>(row % channels) : Acc(0);
    Acc s1 = 0, s2 = 0;
    if (row_ok) {
      for (int64_t col = static_cast<int64_t>(tk) * V; col < t.cols; col += static_cast<int64_t>(t.threads_k) * V) {
        const int64_t i = row * t.cols + col, end = (row + 1) * t.cols;
        Acc v[V];
        load_acc<V>(x, i, end, t.vector, v);
        if constexpr (kGrad) {
          Acc hv[V];
          load_acc<V>(h, i, end, t.vector, hv);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            s1 += v[e];
            s2 += col + e < t.cols ? v[e] * (hv[e] + b) : Acc(0);
          }
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) s1 += v[e];
        }
      }
    }
    s1 = row_sum(s1, t.threads_k, scratch);
    if constexpr (kGrad) s2 = row_sum(s2, t.threads_k, scratch);
    if (tk == 0 && row_ok) {
      if constexpr (kGrad) {
        store_terms(gate, terms, row / channels, row, s1, s2);
      } else {
        pool[row] = s1 / static_cast<Acc>(t.cols) + b;  // divide in Acc: fp64 keeps its precision
      }
    }
  }
}

// Channels-last versions of the same reductions: work items are (sample n, column tile); the
// threads_r rows of a block stride over the sample's hw rows, then column_sums adds them up.
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    se_reduce_cols_kernel(const T* __restrict__ x, const T* __restrict__ h, ParamPtr<T> bias, Gate<T> gate,
                          typename AccType<T>::type* __restrict__ pool, Terms<typename AccType<T>::type> terms,
                          Tiles t, int64_t hw) {
  using Acc = typename AccType<T>::type;
  constexpr int V = vec_width<T>();
  const int tk = threadIdx.x % t.threads_k, tr = threadIdx.x / t.threads_k;
  const int64_t samples = t.rows / hw;
  for (int64_t item = blockIdx.x; item < samples * t.col_tiles; item += gridDim.x) {
    const int64_t n = item / t.col_tiles;
    const int64_t col = ((item % t.col_tiles) * t.threads_k + tk) * V;
    const bool col_ok = col < t.cols;
    Acc b[V] = {}, s1[V] = {}, s2[V] = {};
    if (bias.data != nullptr) {
#pragma unroll
      for (int e = 0; e < V; ++e) b[e] = col + e < t.cols ? bias.template load<Acc>(col + e) : Acc(0);
    }
    if (col_ok) {
      for (int64_t p = tr; p < hw; p += t.threads_r) {
        const int64_t row = n * hw + p;
        const int64_t i = row * t.cols + col, end = (row + 1) * t.cols;
        Acc v[V];
        load_acc<V>(x, i, end, t.vector, v);
        if constexpr (kGrad) {
          Acc hv[V];
          load_acc<V>(h, i, end, t.vector, hv);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            s1[e] += v[e];
            s2[e] += v[e] * (hv[e] + b[e]);
          }
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) s1[e] += v[e];
        }
      }
    }
    column_sums<V>(s1, t.threads_k, t.threads_r);
    if constexpr (kGrad) column_sums<V>(s2, t.threads_k, t.threads_r);
    if (tr == 0) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (col + e >= t.cols) continue;
        const int64_t nc = n * t.cols + col + e;
        if constexpr (kGrad) {
          store_terms(gate, terms, n, nc, s1[e], s2[e]);
        } else {
          pool[nc] = s1[e] / static_cast<Acc>(hw) + b[e];
        }
      }
    }
  }
}

// Per channel, over the samples in order (_se_gate_bwd_sums_kernel): dshortcut_bias = Σ_n S1,
// dbias = Σ_n (coef·S1 + dp), dskip_partial = Σ_n S2·u (dk is their sum) and, with SE,
// dfc2_bias = Σ_n dz. One thread per channel, so a warp reads consecutive channels of each
// (n, c) row; deterministic, no atomics. Each gradient has its own output.
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    se_channel_sums_kernel(Terms<Acc> terms, const Acc* __restrict__ dpool, Acc* __restrict__ dshortcut_bias,
                           Acc* __restrict__ dbias, Acc* __restrict__ dskip_partial, Acc* __restrict__ dfc2_bias,
                           int64_t n, int64_t c) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t ch = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; ch < c; ch += stride) {
    Acc sb = 0, b = 0, k = 0, b2 = 0;
    for (int64_t i = ch; i < n * c; i += c) {
      sb += terms.s1[i];
      b += dpool != nullptr ? terms.coef_s1[i] + dpool[i] : terms.coef_s1[i];
      k += terms.s2_u[i];
      if (terms.dz != nullptr) b2 += terms.dz[i];
    }
    dshortcut_bias[ch] = sb;
    dbias[ch] = b;
    dskip_partial[ch] = k;
    if (terms.dz != nullptr) dfc2_bias[ch] = b2;
  }
}

bool valid(const SeShape& s) { return s.n >= 0 && s.c > 0 && s.hw > 0; }

int64_t matrix_rows(const SeShape& s) { return s.channels_last ? s.n * s.hw : s.n * s.c; }
int64_t matrix_cols(const SeShape& s) { return s.channels_last ? s.c : s.hw; }

// Pooling (kGrad false: x = h, writes pool) or the backward reduction (kGrad true: x = dout,
// writes terms), by layout.
template <typename T, bool kGrad>
cudaError_t reduce(const void* x, const void* h, ChannelParam bias, const SeGate& gate, void* pool,
                   const SeGradTerms& terms, const SeShape& shape, cudaStream_t stream) {
  using Acc = typename AccType<T>::type;
  constexpr int V = vec_width<T>();
  const bool aligned = pack_aligned<T, V>(x) && pack_aligned<T, V>(h);
  const int64_t rows = matrix_rows(shape), cols = matrix_cols(shape);
  if (shape.channels_last) {
    const Tiles t = make_tiles<V>(rows, cols, kMaxReduceThreadsK, aligned);
    se_reduce_cols_kernel<T, kGrad><<<grid_for(shape.n * t.col_tiles), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(h), param_ptr<T>(bias), gate_view<T>(gate),
        static_cast<Acc*>(pool), terms_view<Acc>(terms), t, shape.hw);
  } else {
    const Tiles t = make_tiles<V>(rows, cols, kThreads, aligned);
    se_reduce_rows_kernel<T, kGrad><<<grid_for(ceil_div(rows, t.threads_r)), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(h), param_ptr<T>(bias), gate_view<T>(gate),
        static_cast<Acc*>(pool), terms_view<Acc>(terms), t, shape.c);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t stream_kernel(const void* x, const void* shortcut, const SeGate& gate, ChannelParam bias,
                          ChannelParam shortcut_bias, const void* extra, void* out, const SeShape& shape,
                          cudaStream_t stream) {
  using Acc = typename AccType<T>::type;
  constexpr int V = vec_width<T>();
  const bool aligned = pack_aligned<T, V>(x) && pack_aligned<T, V>(shortcut) && pack_aligned<T, V>(out);
  const Tiles t = make_tiles<V>(matrix_rows(shape), matrix_cols(shape), kThreads, aligned);
  se_stream_kernel<T><<<grid_for(t.row_tiles * t.col_tiles), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(shortcut), gate_view<T>(gate), param_ptr<T>(bias),
      param_ptr<T>(shortcut_bias), static_cast<const Acc*>(extra), static_cast<T*>(out), t, shape.c, shape.hw,
      shape.channels_last);
  return cudaGetLastError();
}

template <typename T>
cudaError_t channel_sums(const SeGradTerms& terms, const void* dpool, void* dshortcut_bias, void* dbias,
                         void* dskip_partial, void* dfc2_bias, const SeShape& shape, cudaStream_t stream) {
  using Acc = typename AccType<T>::type;
  se_channel_sums_kernel<Acc><<<grid_for(ceil_div(shape.c, kThreads)), kThreads, 0, stream>>>(
      terms_view<Acc>(terms), static_cast<const Acc*>(dpool), static_cast<Acc*>(dshortcut_bias),
      static_cast<Acc*>(dbias), static_cast<Acc*>(dskip_partial), static_cast<Acc*>(dfc2_bias), shape.n, shape.c);
  return cudaGetLastError();
}

}  // namespace

cudaError_t se_pool(DType dtype, const void* h, ChannelParam bias, void* pool, const SeShape& shape,
                    cudaStream_t stream) {
  if (!valid(shape)) return cudaErrorInvalidValue;
  if (shape.n == 0) return cudaSuccess;
  const SeGate no_gate{nullptr, nullptr, ChannelParam{nullptr, false}, 1.0};
  return with_type(dtype, [&](auto tag) {
    return reduce<decltype(tag), false>(h, nullptr, bias, no_gate, pool, SeGradTerms{}, shape, stream);
  });
}

cudaError_t se_gate_fwd(DType dtype, const void* h, const void* shortcut, const SeGate& gate, ChannelParam bias,
                        ChannelParam shortcut_bias, void* out, const SeShape& shape, cudaStream_t stream) {
  if (!valid(shape)) return cudaErrorInvalidValue;
  if (shape.n == 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    return stream_kernel<decltype(tag)>(h, shortcut, gate, bias, shortcut_bias, nullptr, out, shape, stream);
  });
}

cudaError_t se_gate_bwd_reduce(DType dtype, const void* dout, const void* h, ChannelParam bias, const SeGate& gate,
                               const SeGradTerms& terms, const SeShape& shape, cudaStream_t stream) {
  if (!valid(shape)) return cudaErrorInvalidValue;
  if (shape.n == 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    return reduce<decltype(tag), true>(dout, h, bias, gate, nullptr, terms, shape, stream);
  });
}

cudaError_t se_gate_bwd(DType dtype, const void* dout, const SeGate& gate, const SeGradTerms& terms, const void* dpool,
                        void* dh, void* dshortcut_bias, void* dbias, void* dskip_partial, void* dfc2_bias,
                        const SeShape& shape, cudaStream_t stream) {
  if (!valid(shape)) return cudaErrorInvalidValue;
  if (shape.n == 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    const cudaError_t err = stream_kernel<T>(dout, nullptr, gate, ChannelParam{nullptr, false},
                                             ChannelParam{nullptr, false}, dpool, dh, shape, stream);
    if (err != cudaSuccess) return err;
    return channel_sums<T>(terms, dpool, dshortcut_bias, dbias, dskip_partial, dfc2_bias, shape, stream);
  });
}

}  // namespace nfk
