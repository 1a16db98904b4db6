// The launch geometry agc.cu and sgd_agc.cu share (mirrors nfkernels/ops/agc.py): the unit table
// holds the n_singles single-element units first, then the longer rows sorted by length, longest
// first (in two runs: rows of whole 16-byte vectors, then the others). Blocks below flat_blocks
// take kFlatUnits single-element units each (one per thread and step, so every lane has a unit);
// the others take kThreads / row_threads rows each, a group of row_threads lanes per row, each
// lane V consecutive elements per step (16-byte vectors where the row is aligned): a row's lanes
// do useful work in all but its last step, and rows of equal length end together. The second
// pass over a row runs backwards, so that it starts with what the first pass read last (the
// likeliest to be still in cache).
#pragma once

#include "common.cuh"

namespace nfk {

constexpr int kFlatPerThread = 4;
constexpr int64_t kFlatUnits = int64_t{kThreads} * kFlatPerThread;

struct UnitGrid {
  int64_t flat_blocks;  // blocks of single-element units
  int64_t blocks;       // all blocks
  int row_threads;      // lanes per row, a power of two in [1, kThreads]
};

// `row_cols` is the block width the lane efficiency of the row lengths calls for
// (nfkernels/ops/agc.py); a row takes row_cols / V lanes, at most a block.
inline UnitGrid unit_grid(int64_t n_units, int64_t n_singles, int64_t row_cols, int vec) {
  int row_threads = 1;
  while (row_threads < kThreads && int64_t{row_threads} * vec < row_cols) row_threads <<= 1;
  const int64_t flat_blocks = ceil_div(n_singles, kFlatUnits);
  return {flat_blocks, flat_blocks + ceil_div(n_units - n_singles, kThreads / row_threads), row_threads};
}

inline bool valid_unit_counts(int64_t n_units, int64_t n_singles, int64_t row_cols) {
  return n_units >= 0 && n_singles >= 0 && n_singles <= n_units && row_cols >= 1;
}

// The row this lane works on, its lane within the row's group, and whether there is such a row.
struct RowSlot {
  int64_t row;
  int lane;
  bool live;
};

__device__ __forceinline__ RowSlot row_slot(int64_t n_units, int64_t n_singles, int64_t flat_blocks,
                                            int row_threads) {
  const int64_t group = (static_cast<int64_t>(blockIdx.x) - flat_blocks) * (kThreads / row_threads) +
                        threadIdx.x / row_threads;
  const int64_t row = n_singles + group;
  return {row, static_cast<int>(threadIdx.x) & (row_threads - 1), row < n_units};
}

// Sum over each aligned group of `width` threads (a power of two, at most kThreads) of two
// values; every thread of the group gets the totals, in a fixed order. Every thread of the block
// must call it, once per kernel (groups wider than a warp meet in shared memory).
template <typename Acc>
__device__ __forceinline__ void group_sum2(Acc& a, Acc& b, int width) {
  for (int offset = (width < 32 ? width : 32) / 2; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_xor_sync(0xffffffffu, b, offset);
  }
  if (width <= 32) return;  // uniform over the grid
  __shared__ Acc partial[2][kThreads / 32];
  const int warp = threadIdx.x / 32, warps = width / 32;
  if (threadIdx.x % 32 == 0) {
    partial[0][warp] = a;
    partial[1][warp] = b;
  }
  __syncthreads();
  const int first = warp / warps * warps;
  a = 0;
  b = 0;
  for (int w = first; w < first + warps; ++w) {
    a += partial[0][w];
    b += partial[1][w];
  }
}

// The row's squared norms: every lane of a `row_threads` group sums the squares of its elements
// (k = lane·V, lane·V + step, ...) of w and g, then the group adds them up (group_sum2: every
// thread of the block must call this, once per kernel).
template <int V, typename Acc, typename W, typename G>
__device__ __forceinline__ void row_sq_norms(const W* w, const G* g, int lane, int64_t length, int64_t step,
                                             bool vector, int row_threads, Acc& w_sq, Acc& g_sq) {
  w_sq = 0;
  g_sq = 0;
  for (int64_t k = int64_t{lane} * V; k < length; k += step) {
    Acc gv[V], wv[V];
    load_acc<V>(g, k, length, vector, gv);
    load_acc<V>(w, k, length, vector, wv);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      g_sq += gv[e] * gv[e];
      w_sq += wv[e] * wv[e];
    }
  }
  group_sum2(w_sq, g_sq, row_threads);
}

// The lane's elements of a row of `length` are k = first, first + step, ... < length; the last
// of them, where the second pass starts (first when there is none: the loop then does nothing).
__device__ __forceinline__ int64_t last_chunk(int64_t first, int64_t length, int64_t step) {
  return first < length ? first + (length - 1 - first) / step * step : first - step;
}

template <typename Acc>
__device__ __forceinline__ Acc magnitude(Acc x) {
  return x < Acc(0) ? -x : x;  // NaN stays NaN
}

// The AGC factor from the norms: 1 when ||G|| < clip ||W||*, else clip ||W||* / max(||G||, 1e-6).
// The comparisons are written so that NaN norms propagate (fmax would drop them), as in timm.
template <typename Acc>
__device__ __forceinline__ Acc agc_factor(Acc w_norm, Acc g_norm, Acc clip_factor, Acc eps) {
  const Acc max_norm = clip_factor * (w_norm < eps ? eps : w_norm);
  if (g_norm < max_norm) return Acc(1);
  const Acc floor = Acc(1e-6);  // timm's clamp(min=1e-6), rounded once to Acc (kGradNormFloor is fp32)
  return max_norm / (g_norm < floor ? floor : g_norm);
}

template <int V, typename T>
__device__ __forceinline__ bool vector_aligned(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % (sizeof(T) * V) == 0;
}

}  // namespace nfk
