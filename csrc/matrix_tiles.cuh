// How a block of kThreads threads covers a dense (rows, cols) row-major matrix: the layout
// shared by the scaled-activation and SE-gate kernels (NCHW and channels-last tensors are both
// such matrices, see MatrixView / SeShape). threads_k threads along a row, each owning V
// consecutive columns (one 16-byte access when `vector`), times threads_r rows; a tile is
// kRowSteps such row bands, so each thread handles up to kRowSteps chunks per tile.
#pragma once

#include "common.cuh"

namespace nfk {

constexpr int kRowSteps = 4;
constexpr int kWarp = 32;

struct Tiles {
  int64_t rows, cols;
  int threads_k, threads_r;
  int64_t col_tiles, row_tiles;
  bool vector;  // cols % V == 0 and every operand aligned: all in-range chunks are whole Packs

  __device__ __forceinline__ int64_t tile_rows() const { return static_cast<int64_t>(threads_r) * kRowSteps; }
};

// threads_k is a power of two no larger than max_threads_k (at most kThreads), just enough to
// span a row's V-element chunks, so short rows (7×7 maps) do not leave threads idle.
template <int V>
Tiles make_tiles(int64_t rows, int64_t cols, int max_threads_k, bool operands_aligned) {
  Tiles t{};
  t.rows = rows;
  t.cols = cols;
  const int64_t chunks = ceil_div(cols, V);
  t.threads_k = next_power_of_2(chunks);
  if (t.threads_k > max_threads_k) t.threads_k = max_threads_k;
  t.threads_r = kThreads / t.threads_k;
  t.col_tiles = ceil_div(cols, static_cast<int64_t>(t.threads_k) * V);
  t.row_tiles = ceil_div(rows, static_cast<int64_t>(t.threads_r) * kRowSteps);
  t.vector = operands_aligned && cols % V == 0;
  return t;
}

// Grid for `work` independent block-sized work items: kernels loop over items with a stride of
// gridDim.x, so a grid capped at the x limit still covers any size.
inline unsigned grid_for(int64_t work) {
  return static_cast<unsigned>(work < kMaxGridX ? work : kMaxGridX);
}

// The sum of v over the threads_k threads of this thread's row (threads_k a power of two);
// every thread of the row gets it, in a fixed order. Every thread of the block must call it
// (it synchronises when a row spans several warps); `scratch` holds kThreads / 32 values.
template <typename Acc>
__device__ __forceinline__ Acc row_sum(Acc v, int threads_k, Acc* scratch) {
  const int width = threads_k < kWarp ? threads_k : kWarp;
  for (int offset = width / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threads_k <= kWarp) return v;
  const int warp = threadIdx.x / kWarp;
  __syncthreads();  // earlier readers of scratch are done
  if (threadIdx.x % kWarp == 0) scratch[warp] = v;
  __syncthreads();
  const int warps_per_row = threads_k / kWarp, first = (threadIdx.x / threads_k) * warps_per_row;
  Acc total = 0;
  for (int w = 0; w < warps_per_row; ++w) total += scratch[first + w];
  return total;
}

// Adds the V column sums of the threads_r threads of each column chunk (fixed order) and leaves
// them in `sums` of the row-0 threads; every thread of the block must call it.
template <int V, typename Acc>
__device__ __forceinline__ void column_sums(Acc (&sums)[V], int threads_k, int threads_r) {
  __shared__ Acc scratch[kThreads * V];
  __syncthreads();
#pragma unroll
  for (int e = 0; e < V; ++e) scratch[threadIdx.x * V + e] = sums[e];
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < threads_k) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      Acc total = 0;
      for (int r = 0; r < threads_r; ++r) total += scratch[(r * threads_k + threadIdx.x) * V + e];
      sums[e] = total;
    }
  }
}

}  // namespace nfk
