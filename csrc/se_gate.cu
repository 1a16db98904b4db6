// Squeeze-excite gate with the SkipInit residual: pooling, gate·residual forward, backward
// reduction and backward streaming kernels (see nfkernels.h; mirrors the Triton kernels of
// nfkernels/ops/se_gate.py, whose docstring has the full forward and backward math).
//
// A dense (n, c, hw) tensor is an (R, K) row-major matrix: NCHW has rows (n, c) and K = hw
// (channel = row % c), channels-last has rows (n, hw) and K = c (channel = column). Per-(n, c)
// vectors (coef, pool, s1, s2, dpool) are indexed by row in NCHW and by (row / hw)·c + column
// in channels-last.
#include "matrix_tiles.cuh"

namespace nfk {
namespace {

// In channels-last a reduction block spans at most one warp of channels, so that a small batch
// still spreads over many blocks (se_gate.py MAX_BLOCK_C plays the same role).
constexpr int kMaxReduceThreadsK = kWarp;

// out = coef_{n,c}·(x + b_c) + s + sb_c + extra_{n,c}, elementwise on (row tile, column tile)
// work items; null operands are absent. Two uses, one kernel:
//   forward  (_se_gate_fwd_kernel):  x = h, s = shortcut, extra absent:
//            out = shortcut + sb_c + coef·(h + b_c), coef = α·k·m_n·attn_gain·sigmoid(z)
//            (α·k·m_n without SE), precomputed per (n, c) on the host;
//   backward (_se_gate_bwd_kernel):  x = dout, no biases, s absent, extra = dp/HW:
//            dh = dout·coef + dp_{n,c}/HW, the gated path plus the pooling path into the SE.
// Derivative of the forward: ds = dout, dh = dout·coef (+ pooling path). Math in fp32 (fp64).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    se_stream_kernel(const T* __restrict__ x, const T* __restrict__ shortcut,
                     const typename AccType<T>::type* __restrict__ coef, ParamPtr<T> bias, ParamPtr<T> shortcut_bias,
                     const typename AccType<T>::type* __restrict__ extra, T* __restrict__ out, Tiles t, int64_t channels,
                     int64_t hw, bool channels_last) {
  using Acc = typename AccType<T>::type;
  constexpr int V = vec_width<T>();
  const int tk = threadIdx.x % t.threads_k, tr = threadIdx.x / t.threads_k;
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
      if (!channels_last) {
        const int64_t c = row % channels;
        const Acc rb = bias.data != nullptr ? bias.template load<Acc>(c) : Acc(0);
        const Acc rsb = shortcut_bias.data != nullptr ? shortcut_bias.template load<Acc>(c) : Acc(0);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          b[e] = rb;
          sb[e] = rsb;
        }
      }
      const int64_t i = row * t.cols + col, end = (row + 1) * t.cols;
      Acc v[V], sc[V] = {};
      load_acc<V>(x, i, end, t.vector, v);
      if (shortcut != nullptr) load_acc<V>(shortcut, i, end, t.vector, sc);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int64_t k = nc + e * nc_step;
        const bool ok = col + e < t.cols;
        const Acc cf = ok ? coef[k] : Acc(0);
        const Acc ex = extra != nullptr && ok ? extra[k] : Acc(0);
        v[e] = cf * (v[e] + b[e]) + sc[e] + sb[e] + ex;
      }
      store_acc<V>(out, i, end, t.vector, v);
    }
  }
}

// NCHW reductions over each row (an (n, c) plane), a band of threads_r rows per work item:
//   pool (kGrad false, _se_pool_fwd_kernel):        out0 = mean_hw x + b_c
//   grad (kGrad true, _se_gate_bwd_reduce_kernel):  out0 = S1 = Σ_hw dout (x = dout),
//                                                   out1 = S2 = Σ_hw dout·(h + b_c)
// S2 = ∂L/∂coef drives the gate's, SkipInit gain's and SE MLP's gradients, S1 the biases'.
// Derivative of the pooling: dh = dp/HW, db = Σ_n dp. Each row's sums are formed inside one
// block in a fixed order: deterministic, no atomics. fp32 accumulation (fp64 for fp64).
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    se_reduce_rows_kernel(const T* __restrict__ x, const T* __restrict__ h, ParamPtr<T> bias,
                          typename AccType<T>::type* __restrict__ out0, typename AccType<T>::type* __restrict__ out1,
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
        out0[row] = s1;
        out1[row] = s2;
      } else {
        out0[row] = s1 / static_cast<Acc>(t.cols) + b;  // divide in Acc: fp64 keeps its precision
      }
    }
  }
}

// Channels-last versions of the same reductions: work items are (sample n, column tile); the
// threads_r rows of a block stride over the sample's hw rows, then column_sums adds them up.
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    se_reduce_cols_kernel(const T* __restrict__ x, const T* __restrict__ h, ParamPtr<T> bias,
                          typename AccType<T>::type* __restrict__ out0, typename AccType<T>::type* __restrict__ out1,
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
        const int64_t k = n * t.cols + col + e;
        if constexpr (kGrad) {
          out0[k] = s1[e];
          out1[k] = s2[e];
        } else {
          out0[k] = s1[e] / static_cast<Acc>(hw) + b[e];
        }
      }
    }
  }
}

bool valid(const SeShape& s) { return s.n >= 0 && s.c > 0 && s.hw > 0; }

int64_t matrix_rows(const SeShape& s) { return s.channels_last ? s.n * s.hw : s.n * s.c; }
int64_t matrix_cols(const SeShape& s) { return s.channels_last ? s.c : s.hw; }

// Pooling (kGrad false: out0 = pool, x = h) or the backward sums (kGrad true: out0, out1 =
// S1, S2, x = dout), by layout.
template <typename T, bool kGrad>
cudaError_t reduce(const void* x, const void* h, ChannelParam bias, void* out0, void* out1, const SeShape& shape,
                   cudaStream_t stream) {
  using Acc = typename AccType<T>::type;
  constexpr int V = vec_width<T>();
  const bool aligned = pack_aligned<T, V>(x) && pack_aligned<T, V>(h);
  const int64_t rows = matrix_rows(shape), cols = matrix_cols(shape);
  if (shape.channels_last) {
    const Tiles t = make_tiles<V>(rows, cols, kMaxReduceThreadsK, aligned);
    se_reduce_cols_kernel<T, kGrad><<<grid_for(shape.n * t.col_tiles), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(h), param_ptr<T>(bias), static_cast<Acc*>(out0),
        static_cast<Acc*>(out1), t, shape.hw);
  } else {
    const Tiles t = make_tiles<V>(rows, cols, kThreads, aligned);
    se_reduce_rows_kernel<T, kGrad><<<grid_for(ceil_div(rows, t.threads_r)), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(h), param_ptr<T>(bias), static_cast<Acc*>(out0),
        static_cast<Acc*>(out1), t, shape.c);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t stream_kernel(const void* x, const void* shortcut, const void* coef, ChannelParam bias,
                          ChannelParam shortcut_bias, const void* extra, void* out, const SeShape& shape,
                          cudaStream_t stream) {
  using Acc = typename AccType<T>::type;
  constexpr int V = vec_width<T>();
  const bool aligned = pack_aligned<T, V>(x) && pack_aligned<T, V>(shortcut) && pack_aligned<T, V>(out);
  const Tiles t = make_tiles<V>(matrix_rows(shape), matrix_cols(shape), kThreads, aligned);
  se_stream_kernel<T><<<grid_for(t.row_tiles * t.col_tiles), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(shortcut), static_cast<const Acc*>(coef), param_ptr<T>(bias),
      param_ptr<T>(shortcut_bias), static_cast<const Acc*>(extra), static_cast<T*>(out), t, shape.c, shape.hw,
      shape.channels_last);
  return cudaGetLastError();
}

}  // namespace

cudaError_t se_pool(DType dtype, const void* h, ChannelParam bias, void* pool, const SeShape& shape,
                    cudaStream_t stream) {
  if (!valid(shape)) return cudaErrorInvalidValue;
  if (shape.n == 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    return reduce<decltype(tag), false>(h, nullptr, bias, pool, nullptr, shape, stream);
  });
}

cudaError_t se_gate_fwd(DType dtype, const void* h, const void* shortcut, const void* coef, ChannelParam bias,
                        ChannelParam shortcut_bias, void* out, const SeShape& shape, cudaStream_t stream) {
  if (!valid(shape)) return cudaErrorInvalidValue;
  if (shape.n == 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    return stream_kernel<decltype(tag)>(h, shortcut, coef, bias, shortcut_bias, nullptr, out, shape, stream);
  });
}

cudaError_t se_gate_bwd_reduce(DType dtype, const void* dout, const void* h, ChannelParam bias, void* s1, void* s2,
                               const SeShape& shape, cudaStream_t stream) {
  if (!valid(shape)) return cudaErrorInvalidValue;
  if (shape.n == 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    return reduce<decltype(tag), true>(dout, h, bias, s1, s2, shape, stream);
  });
}

cudaError_t se_gate_bwd(DType dtype, const void* dout, const void* coef, const void* dpool_over_hw, void* dh,
                        const SeShape& shape, cudaStream_t stream) {
  if (!valid(shape)) return cudaErrorInvalidValue;
  if (shape.n == 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    return stream_kernel<decltype(tag)>(dout, nullptr, coef, ChannelParam{nullptr, false},
                                        ChannelParam{nullptr, false}, dpool_over_hw, dh, shape, stream);
  });
}

}  // namespace nfk
