// Squeeze-excite gate with the SkipInit residual: pooling (and its finish over HW splits),
// gate·residual forward, backward reduction (and its dz finish), backward streaming and
// per-channel sum kernels (see nfkernels.h; mirrors the Triton kernels of
// nfkernels/ops/se_gate.py, whose docstring has the full forward and backward math).
//
// A dense (n, c, hw) tensor is an (R, K) row-major matrix: NCHW has rows (n, c) and K = hw
// (channel = row % c), channels-last has rows (n, hw) and K = c (channel = column). Per-(n, c)
// operands (pool, logits, the reductions' sums, dz, dpool) are indexed by row in NCHW and by
// (row / hw)·c + column in channels-last.
#include <algorithm>

#include "matrix_tiles.cuh"

namespace nfk {
namespace {

// How the HW reductions (pooling, backward reduction) spread over the GPU (se_gate.py
// _reduce_plan does the same for the Triton kernels): a channels-last block spans at most one
// warp of channel chunks; a pass of a block keeps at least 19 in 20 of its threads busy
// (busy_width); a block has at least kMinReduceThreads threads; where batch × rows or columns
// give fewer than the caller's min_blocks blocks, NCHW blocks first take fewer rows, channels-last
// blocks fewer columns (where splitting cannot make up for it), then HW is split, each split
// kMinSplitHw positions at least, its partial sums adding ~3% at most to what a bf16 pass reads.
constexpr int kMaxReduceThreadsK = kWarp;
constexpr int kMinReduceThreads = kThreads / 4;
constexpr int64_t kMinSplitHw = 64;
// An NCHW pass covers at least this many consecutive elements of a row (se_gate.py: 8).
constexpr int kMinRowRun = 8;

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
  // One division per thread: a division per element made ptxas spill around its slow path (fp32).
  const Acc inv_hw = Acc(1) / static_cast<Acc>(hw);
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
        const Acc ex = extra != nullptr && ok ? extra[nc + e * nc_step] * inv_hw : Acc(0);
        v[e] = cf[e] * (v[e] + b[e]) + sc[e] + sb[e] + ex;
      }
      store_acc<V>(out, i, end, t.vector, v);
    }
  }
}

// dz_{n,c} = S2·k·gain·m_n·σ(z)σ(−z): the SE MLP's input gradient from S2 = Σ_hw dout·(h + b_c)
// (_se_gate_bwd_reduce_kernel, _se_gate_bwd_dz_kernel).
template <typename T, typename Acc>
__device__ __forceinline__ void store_dz(const Gate<T>& gate, Acc* __restrict__ dz, int64_t n, int64_t nc, Acc s2) {
  Acc g, slope;
  sigmoid_and_slope(gate.logits[nc], g, slope);
  dz[nc] = s2 * gate.sample_scale(n) * gate.skip() * slope;
}

// The HW reductions' outputs. Pooling (kGrad false): `out` is pool (one split) or the splits'
// partial sums (splits, n, c). Backward (kGrad true): `out` holds S1 = Σ dout over each split,
// then S2 = Σ dout·(h + b_c), as (2, splits, n, c); dz (with SE, else null) is written here when
// there is one split. All in the accumulation type.
template <typename Acc>
struct ReduceOut {
  Acc* out;
  Acc* dz;
  int64_t split_len;  // hw positions per split (whole passes), the last one shorter
  int64_t splits;
};

template <typename T, bool kGrad, typename Acc>
__device__ __forceinline__ void store_reduced(const ReduceOut<Acc>& o, const Gate<T>& gate, int64_t nc_total,
                                              int64_t n, int64_t nc, int64_t split, Acc s1, Acc s2, Acc b,
                                              int64_t hw) {
  if constexpr (kGrad) {
    o.out[split * nc_total + nc] = s1;
    o.out[(o.splits + split) * nc_total + nc] = s2;
    if (o.dz != nullptr && o.splits == 1) store_dz(gate, o.dz, n, nc, s2);
  } else if (o.splits == 1) {
    o.out[nc] = s1 / static_cast<Acc>(hw) + b;  // divide in Acc: fp64 keeps its precision
  } else {
    o.out[split * nc_total + nc] = s1;
  }
}

// NCHW reductions over each row (an (n, c) plane); work items are (band of threads_r rows, split
// of the row's hw), split fastest so that consecutive blocks read consecutive memory:
//   pool (kGrad false, _se_pool_fwd_kernel):        Σ_hw x, pool = mean_hw x + b_c
//   grad (kGrad true, _se_gate_bwd_reduce_kernel):  S1 = Σ_hw dout (x = dout),
//                                                   S2 = Σ_hw dout·(h + b_c) (and dz)
// S2 = ∂L/∂coef drives the gate's, SkipInit gain's and SE MLP's gradients, S1 the biases'.
// Derivative of the pooling: dh = dp/HW, db = Σ_n dp. Each sum is formed inside one block in a
// fixed order, the splits added by a later kernel in split order: deterministic, no atomics.
// fp32 accumulation (fp64 for fp64). V elements per thread and pass: 16 bytes, or 1 where rows
// are not whole packs.
template <typename T, bool kGrad, int V>
__global__ void __launch_bounds__(kThreads)
    se_reduce_rows_kernel(const T* __restrict__ x, const T* __restrict__ h, ParamPtr<T> bias, Gate<T> gate,
                          ReduceOut<typename AccType<T>::type> o, Tiles t, int64_t channels) {
  using Acc = typename AccType<T>::type;
  __shared__ Acc scratch[kThreads / kWarp];
  const int tk = threadIdx.x % t.threads_k, tr = threadIdx.x / t.threads_k;
  const int64_t bands = ceil_div(t.rows, t.threads_r);
  for (int64_t item = blockIdx.x; item < bands * o.splits; item += gridDim.x) {
    const int64_t split = item % o.splits, row = (item / o.splits) * t.threads_r + tr;
    const bool row_ok = row < t.rows;
    const int64_t stop = (split + 1) * o.split_len < t.cols ? (split + 1) * o.split_len : t.cols;
    const Acc b = bias.data != nullptr && row_ok ? bias.template load<Acc>(row % channels) : Acc(0);
    Acc s1 = 0, s2 = 0;
    if (row_ok) {
      const int64_t end = row * t.cols + stop;
      for (int64_t col = split * o.split_len + static_cast<int64_t>(tk) * V; col < stop;
           col += static_cast<int64_t>(t.threads_k) * V) {
        const int64_t i = row * t.cols + col;
        Acc v[V];
        load_acc<V>(x, i, end, t.vector, v);
        if constexpr (kGrad) {
          Acc hv[V];
          load_acc<V>(h, i, end, t.vector, hv);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            s1 += v[e];
            s2 += col + e < stop ? v[e] * (hv[e] + b) : Acc(0);
          }
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) s1 += v[e];
        }
      }
    }
    s1 = row_sum(s1, t.threads_k, scratch);
    if constexpr (kGrad) s2 = row_sum(s2, t.threads_k, scratch);
    if (tk == 0 && row_ok) store_reduced<T, kGrad>(o, gate, t.rows, row / channels, row, split, s1, s2, b, t.cols);
  }
}

// Channels-last versions of the same reductions: work items are (sample n, split of hw, column
// tile), column tile fastest; the threads_r rows of a block stride over the split's hw rows, then
// column_sums adds them up in a fixed order. At most 80 registers, so that 3 blocks fit on an SM:
// the plans give 2 to 3 blocks per SM, which then run in one wave.
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kThreads, 3)
    se_reduce_cols_kernel(const T* __restrict__ x, const T* __restrict__ h, ParamPtr<T> bias, Gate<T> gate,
                          ReduceOut<typename AccType<T>::type> o, Tiles t, int64_t hw) {
  using Acc = typename AccType<T>::type;
  constexpr int V = vec_width<T>();
  const int tk = threadIdx.x % t.threads_k, tr = threadIdx.x / t.threads_k;
  const int64_t samples = t.rows / hw;
  for (int64_t item = blockIdx.x; item < samples * o.splits * t.col_tiles; item += gridDim.x) {
    const int64_t n = item / (o.splits * t.col_tiles), split = (item / t.col_tiles) % o.splits;
    const int64_t col = ((item % t.col_tiles) * t.threads_k + tk) * V;
    const bool col_ok = col < t.cols;
    Acc b[V] = {}, s1[V] = {}, s2[V] = {};
    if (bias.data != nullptr) {
#pragma unroll
      for (int e = 0; e < V; ++e) b[e] = col + e < t.cols ? bias.template load<Acc>(col + e) : Acc(0);
    }
    if (col_ok) {
      const int64_t stop = (split + 1) * o.split_len < hw ? (split + 1) * o.split_len : hw;
      for (int64_t p = split * o.split_len + tr; p < stop; p += t.threads_r) {
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
        store_reduced<T, kGrad>(o, gate, samples * t.cols, n, n * t.cols + col + e, split, s1[e], s2[e], b[e], hw);
      }
    }
  }
}

// pool_{n,c} = (Σ_s partial[s, n, c]) / hw + b_c: the pooling's splits added in split order
// (_se_pool_finish_kernel); deterministic, no atomics.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    se_pool_finish_kernel(const typename AccType<T>::type* __restrict__ partial, ParamPtr<T> bias,
                          typename AccType<T>::type* __restrict__ pool, int64_t nc_total, int64_t channels,
                          int64_t hw, int64_t splits) {
  using Acc = typename AccType<T>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nc_total; i += stride) {
    Acc total = 0;
    for (int64_t s = 0; s < splits; ++s) total += partial[s * nc_total + i];
    pool[i] = total / static_cast<Acc>(hw) + (bias.data != nullptr ? bias.template load<Acc>(i % channels) : Acc(0));
  }
}

// dz from the splits of S2 (sums[1, s, n, c]) added in split order (_se_gate_bwd_dz_kernel).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    se_dz_finish_kernel(const typename AccType<T>::type* __restrict__ sums, Gate<T> gate,
                        typename AccType<T>::type* __restrict__ dz, int64_t nc_total, int64_t channels,
                        int64_t splits) {
  using Acc = typename AccType<T>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nc_total; i += stride) {
    Acc s2 = 0;
    for (int64_t s = 0; s < splits; ++s) s2 += sums[(splits + s) * nc_total + i];
    store_dz(gate, dz, i / channels, i, s2);
  }
}

// The per-channel sums' operands and outputs (se_gate_bwd in nfkernels.h), accumulation type.
template <typename Acc>
struct ChannelSums {
  const Acc* sums;  // (2, splits, n, c) as ReduceOut's backward
  const Acc* dz;    // (n, c); null without SE, as dpool and da
  const Acc* dpool;  // (n, c)
  const Acc* da;     // (n, rd)
  Acc* dshortcut_bias;
  Acc* dbias;
  Acc* dskip_partial;
  Acc* dfc2_bias;  // null without SE, as dfc1_bias
  Acc* dfc1_bias;
  int64_t n, c, rd, splits;
};

constexpr int kSumsCols = kWarp;
constexpr int kSumsRows = kThreads / kSumsCols;

// Per channel, over the samples (_se_gate_bwd_sums_kernel): dshortcut_bias = Σ_n S1,
// dbias = Σ_n (coef·S1 + dp), dskip_partial = Σ_n S2·u (dk is their sum) and, with SE,
// dfc2_bias = Σ_n dz; S1 and S2 of each (n, c) first added over the splits, coef and u formed
// from the gate (store_dz's terms). With SE the blocks after the channel tiles give
// dfc1_bias = Σ_n da per hidden unit. A block holds kSumsCols columns × kSumsRows sample rows
// (a warp reads consecutive columns of one sample); each thread walks its samples, the rows are
// then added by column_sums: a fixed order, no atomics. Each gradient has its own output.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    se_channel_sums_kernel(ChannelSums<typename AccType<T>::type> a, Gate<T> gate) {
  using Acc = typename AccType<T>::type;
  const int tk = threadIdx.x % kSumsCols, tr = threadIdx.x / kSumsCols;
  const int64_t c_tiles = ceil_div(a.c, kSumsCols), nc_total = a.n * a.c;
  const int64_t items = c_tiles + ceil_div(a.rd, kSumsCols);
  const Acc k = gate.skip();
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    Acc acc[4] = {};  // channel tiles: dshortcut_bias, dbias, dskip_partial, dfc2_bias; rd tiles: dfc1_bias
    const bool channels = item < c_tiles;
    const int64_t col = (channels ? item : item - c_tiles) * kSumsCols + tk;
    if (channels && col < a.c) {
      for (int64_t n = tr; n < a.n; n += kSumsRows) {
        const int64_t nc = n * a.c + col;
        Acc s1 = 0, s2 = 0;
#pragma unroll 1  // a few splits; unrolled, fp64's division slow path below needs stack (ptxas)
        for (int64_t s = 0; s < a.splits; ++s) {
          s1 += a.sums[s * nc_total + nc];
          s2 += a.sums[(a.splits + s) * nc_total + nc];
        }
        const Acc u = gate.sample_scale(n) * gate.sigmoid(nc);
        acc[0] += s1;
        acc[1] += a.dpool != nullptr ? u * k * s1 + a.dpool[nc] : u * k * s1;
        acc[2] += s2 * u;
        if (a.dz != nullptr) acc[3] += a.dz[nc];
      }
    } else if (!channels && col < a.rd) {
      for (int64_t n = tr; n < a.n; n += kSumsRows) acc[0] += a.da[n * a.rd + col];
    }
    column_sums<4>(acc, kSumsCols, kSumsRows);
    if (tr == 0 && channels && col < a.c) {
      a.dshortcut_bias[col] = acc[0];
      a.dbias[col] = acc[1];
      a.dskip_partial[col] = acc[2];
      if (a.dfc2_bias != nullptr) a.dfc2_bias[col] = acc[3];
    } else if (tr == 0 && !channels && col < a.rd) {
      a.dfc1_bias[col] = acc[0];
    }
  }
}

bool valid(const SeShape& s) { return s.n >= 0 && s.c > 0 && s.hw > 0; }

int64_t matrix_rows(const SeShape& s) { return s.channels_last ? s.n * s.hw : s.n * s.c; }
int64_t matrix_cols(const SeShape& s) { return s.channels_last ? s.c : s.hw; }

// The largest power of two in [smallest, largest] whose passes over `length` items keep at
// least 19 in 20 threads busy (se_gate.py MIN_BUSY_LANES), else smallest.
int busy_width(int64_t length, int largest, int smallest) {
  int w = largest;
  while (w > smallest && 20 * length < 19 * ceil_div(length, w) * w) w /= 2;
  return w;
}

// The HW reductions' work split, shared by se_reduce_splits and the launches (see
// kMinSplitHw). A function of the shape, the dtype and min_blocks only.
struct ReducePlan {
  int threads_k, threads_r;
  int vec;             // elements per thread and pass
  int64_t items;       // work items of one split: bands of threads_r rows, or (sample, column tile)
  int64_t split_len;   // hw positions per split: whole passes (threads_k·vec columns, threads_r rows)
  int64_t splits;
};

template <typename T>
ReducePlan plan_reduce(const SeShape& s, int64_t min_blocks) {
  constexpr int kVec = vec_width<T>();
  ReducePlan p{};
  const int64_t rows = matrix_rows(s), cols = matrix_cols(s), max_splits = std::max<int64_t>(1, s.hw / kMinSplitHw);
  int64_t granule;
  if (s.channels_last) {
    p.vec = kVec;
    p.threads_k = std::min(next_power_of_2(ceil_div(cols, kVec)), kMaxReduceThreadsK);
    const int largest = kThreads / p.threads_k;
    p.threads_r = busy_width(s.hw, largest, std::min(largest, std::max(1, kMinReduceThreads / p.threads_k)));
    auto items = [&] { return s.n * ceil_div(cols, static_cast<int64_t>(p.threads_k) * kVec); };
    if (items() * max_splits < min_blocks) {  // narrower blocks: splitting alone cannot fill the GPU
      while (p.threads_k > 1 && p.threads_k * p.threads_r > kMinReduceThreads && items() < min_blocks) p.threads_k /= 2;
    }
    p.items = items();
    granule = p.threads_r;
  } else {
    p.vec = s.hw % kVec == 0 ? kVec : 1;
    const int64_t chunks = ceil_div(s.hw, p.vec);
    const int largest = std::min(next_power_of_2(chunks), kThreads);
    p.threads_k = busy_width(chunks, largest, std::min(largest, std::max(1, kMinRowRun / p.vec)));
    p.threads_r = kThreads / p.threads_k;
    auto items = [&] { return ceil_div(rows, p.threads_r); };
    if (items() * max_splits < min_blocks) {  // fewer rows per block: splitting alone cannot fill the GPU
      while (p.threads_r > 1 && p.threads_k * p.threads_r > kMinReduceThreads && items() < min_blocks) p.threads_r /= 2;
    }
    p.items = items();
    granule = static_cast<int64_t>(p.threads_k) * p.vec;
  }
  const int64_t wanted = ceil_div(min_blocks, std::max<int64_t>(p.items, 1));
  p.splits = std::max<int64_t>(1, std::min(wanted, max_splits));
  p.split_len = ceil_div(ceil_div(s.hw, p.splits), granule) * granule;
  p.splits = ceil_div(s.hw, p.split_len);
  return p;
}

Tiles reduce_tiles(const ReducePlan& p, const SeShape& s, bool operands_aligned) {
  Tiles t{};
  t.rows = matrix_rows(s);
  t.cols = matrix_cols(s);
  t.threads_k = p.threads_k;
  t.threads_r = p.threads_r;
  t.col_tiles = ceil_div(t.cols, static_cast<int64_t>(p.threads_k) * p.vec);
  t.row_tiles = ceil_div(t.rows, static_cast<int64_t>(t.threads_r) * kRowSteps);
  t.vector = operands_aligned && t.cols % p.vec == 0;
  return t;
}

// Pooling (kGrad false: x = h) or the backward reduction (kGrad true: x = dout), by layout, with
// the plan's splits; `splits` is the caller's (the workspace it sized), checked against the plan.
template <typename T, bool kGrad>
cudaError_t reduce(const void* x, const void* h, ChannelParam bias, const SeGate& gate,
                   ReduceOut<typename AccType<T>::type> o, const SeShape& shape, int64_t min_blocks,
                   cudaStream_t stream) {
  constexpr int kVec = vec_width<T>();
  const ReducePlan p = plan_reduce<T>(shape, min_blocks);
  if (p.splits != o.splits || o.out == nullptr) return cudaErrorInvalidValue;
  o.split_len = p.split_len;
  const unsigned grid = grid_for(p.items * p.splits), block = p.threads_k * p.threads_r;
  const T* xt = static_cast<const T*>(x);
  const T* ht = static_cast<const T*>(h);
  if (shape.channels_last) {
    const Tiles t = reduce_tiles(p, shape, pack_aligned<T, kVec>(x) && pack_aligned<T, kVec>(h));
    se_reduce_cols_kernel<T, kGrad><<<grid, block, 0, stream>>>(xt, ht, param_ptr<T>(bias), gate_view<T>(gate), o, t,
                                                                 shape.hw);
  } else if (p.vec == kVec) {
    const Tiles t = reduce_tiles(p, shape, pack_aligned<T, kVec>(x) && pack_aligned<T, kVec>(h));
    se_reduce_rows_kernel<T, kGrad, kVec><<<grid, block, 0, stream>>>(xt, ht, param_ptr<T>(bias),
                                                                       gate_view<T>(gate), o, t, shape.c);
  } else {
    const Tiles t = reduce_tiles(p, shape, true);
    se_reduce_rows_kernel<T, kGrad, 1><<<grid, block, 0, stream>>>(xt, ht, param_ptr<T>(bias), gate_view<T>(gate),
                                                                    o, t, shape.c);
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
  // Threads along a row: the busiest power of two (busy_width, as plan_reduce and se_gate.py
  // _blocks), covering at least kMinRowRun elements in NCHW and a warp of channel chunks in
  // channels-last (shorter runs would cost coalescing); the rest of the block takes rows.
  const int64_t cols = matrix_cols(shape), chunks = ceil_div(cols, V);
  const int largest = std::min(next_power_of_2(chunks), kThreads);
  const int smallest = std::min(largest, shape.channels_last ? kWarp : std::max(1, kMinRowRun / V));
  const Tiles t = make_tiles<V>(matrix_rows(shape), cols, busy_width(chunks, largest, smallest), aligned);
  se_stream_kernel<T><<<grid_for(t.row_tiles * t.col_tiles), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(shortcut), gate_view<T>(gate), param_ptr<T>(bias),
      param_ptr<T>(shortcut_bias), static_cast<const Acc*>(extra), static_cast<T*>(out), t, shape.c, shape.hw,
      shape.channels_last);
  return cudaGetLastError();
}

// Blocks of the flat (n, c) finishes.
unsigned finish_grid(int64_t nc_total) { return grid_for(ceil_div(nc_total, kThreads)); }

}  // namespace

int64_t se_reduce_splits(DType dtype, const SeShape& shape, int64_t min_blocks) {
  if (!valid(shape) || shape.n == 0) return 1;
  switch (dtype) {
    case DType::kFloat16: return plan_reduce<__half>(shape, min_blocks).splits;
    case DType::kBFloat16: return plan_reduce<__nv_bfloat16>(shape, min_blocks).splits;
    case DType::kFloat32: return plan_reduce<float>(shape, min_blocks).splits;
    case DType::kFloat64: return plan_reduce<double>(shape, min_blocks).splits;
  }
  return 1;
}

cudaError_t se_pool(DType dtype, const void* h, ChannelParam bias, void* pool, void* partial, int64_t min_blocks,
                    int64_t splits, const SeShape& shape, cudaStream_t stream) {
  if (!valid(shape) || splits < 1 || (splits > 1 && partial == nullptr)) return cudaErrorInvalidValue;
  if (shape.n == 0) return cudaSuccess;
  const SeGate no_gate{nullptr, nullptr, ChannelParam{nullptr, false}, 1.0};
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccType<T>::type;
    const ReduceOut<Acc> o{static_cast<Acc*>(splits > 1 ? partial : pool), nullptr, 0, splits};
    cudaError_t err = reduce<T, false>(h, nullptr, bias, no_gate, o, shape, min_blocks, stream);
    if (err != cudaSuccess || splits == 1) return err;
    const int64_t nc_total = shape.n * shape.c;
    se_pool_finish_kernel<T><<<finish_grid(nc_total), kThreads, 0, stream>>>(
        static_cast<const Acc*>(partial), param_ptr<T>(bias), static_cast<Acc*>(pool), nc_total, shape.c, shape.hw,
        splits);
    return cudaGetLastError();
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
                               const SeGradSums& sums, int64_t min_blocks, const SeShape& shape,
                               cudaStream_t stream) {
  if (!valid(shape) || sums.splits < 1 || (gate.logits == nullptr) != (sums.dz == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (shape.n == 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccType<T>::type;
    const ReduceOut<Acc> o{static_cast<Acc*>(sums.sums), static_cast<Acc*>(sums.dz), 0, sums.splits};
    cudaError_t err = reduce<T, true>(dout, h, bias, gate, o, shape, min_blocks, stream);
    if (err != cudaSuccess || sums.dz == nullptr || sums.splits == 1) return err;
    const int64_t nc_total = shape.n * shape.c;
    se_dz_finish_kernel<T><<<finish_grid(nc_total), kThreads, 0, stream>>>(
        static_cast<const Acc*>(sums.sums), gate_view<T>(gate), static_cast<Acc*>(sums.dz), nc_total, shape.c,
        sums.splits);
    return cudaGetLastError();
  });
}

cudaError_t se_gate_bwd(DType dtype, const void* dout, const SeGate& gate, const SeGradSums& sums, const void* dpool,
                        const void* da, int64_t rd, void* dh, void* dshortcut_bias, void* dbias, void* dskip_partial,
                        void* dfc2_bias, void* dfc1_bias, const SeShape& shape, cudaStream_t stream) {
  const bool se = gate.logits != nullptr;
  // With SE every SE operand is given (da and dfc1_bias unless rd = 0), without SE none.
  const bool se_operands = se ? sums.dz != nullptr && dpool != nullptr && dfc2_bias != nullptr &&
                                    (rd == 0 || (da != nullptr && dfc1_bias != nullptr))
                              : sums.dz == nullptr && dpool == nullptr && da == nullptr && dfc2_bias == nullptr &&
                                    dfc1_bias == nullptr;
  if (!valid(shape) || sums.splits < 1 || rd < 0 || !se_operands) return cudaErrorInvalidValue;
  if (shape.n == 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccType<T>::type;
    const cudaError_t err = stream_kernel<T>(dout, nullptr, gate, ChannelParam{nullptr, false},
                                             ChannelParam{nullptr, false}, dpool, dh, shape, stream);
    if (err != cudaSuccess) return err;
    const ChannelSums<Acc> a{static_cast<const Acc*>(sums.sums), static_cast<const Acc*>(sums.dz),
                             static_cast<const Acc*>(dpool), static_cast<const Acc*>(da),
                             static_cast<Acc*>(dshortcut_bias), static_cast<Acc*>(dbias),
                             static_cast<Acc*>(dskip_partial), static_cast<Acc*>(dfc2_bias),
                             static_cast<Acc*>(dfc1_bias), shape.n, shape.c, se ? rd : 0, sums.splits};
    const int64_t tiles = ceil_div(shape.c, kSumsCols) + ceil_div(a.rd, kSumsCols);
    se_channel_sums_kernel<T><<<grid_for(tiles), kThreads, 0, stream>>>(a, gate_view<T>(gate));
    return cudaGetLastError();
  });
}

}  // namespace nfk
