// Unit-wise Adaptive Gradient Clipping over a table of unit rows (see nfkernels.h; the launch
// geometry is in agc_rows.cuh and mirrors nfkernels/ops/agc.py).
#include "agc_rows.cuh"

namespace nfk {
namespace {

// Blocks below flat_blocks clip single-element units (||W|| = |w|, ||G|| = |g|), one per thread
// and step; the others clip rows, row_threads lanes per row: sum the squares of W_i and G_i, then
// scale G_i unless it is kept. A kept unit is not written. The second read of G_i hits L1/L2 (a
// row is at most tens of KB). G and W may differ (torch allows e.g. fp32 weights with bf16
// gradients); V elements per lane and step, one 16-byte access of the wider type where the row
// is aligned (checked row by row: views may sit at any element offset).
template <typename G, typename W>
__global__ void __launch_bounds__(kThreads) agc_kernel(G* __restrict__ grad, const W* __restrict__ weight,
                                                       const int64_t* __restrict__ rows,
                                                       const int64_t* __restrict__ bases, int64_t n_units,
                                                       int64_t n_singles, int64_t flat_blocks, int row_threads,
                                                       double clip_factor, double eps) {
  using Acc = typename AccType2<G, W>::type;
  constexpr int V = 16 / (sizeof(G) > sizeof(W) ? sizeof(G) : sizeof(W));
  const Acc clip = static_cast<Acc>(clip_factor), eps_acc = static_cast<Acc>(eps);
  if (blockIdx.x < flat_blocks) {
    const int64_t first = static_cast<int64_t>(blockIdx.x) * kFlatUnits + threadIdx.x;
#pragma unroll
    for (int step = 0; step < kFlatPerThread; ++step) {
      const int64_t unit = first + int64_t{step} * kThreads;
      if (unit < n_singles) {
        const int64_t* row = rows + unit * 3;
        const int64_t* base = bases + row[0] * 2;
        G* g = grad + base[0] + row[1];
        const Acc gk = to_acc(*g), wk = to_acc(weight[base[1] + row[1]]);
        const Acc scale = agc_factor(magnitude(wk), magnitude(gk), clip, eps_acc);
        if (scale != Acc(1)) *g = from_acc<G>(gk * scale);
      }
    }
    return;
  }
  const RowSlot slot = row_slot(n_units, n_singles, flat_blocks, row_threads);
  G* g = nullptr;
  const W* w = nullptr;
  int64_t length = 0;  // no row: nothing read, but the lane still joins its warp's sums
  if (slot.live) {
    const int64_t* row = rows + slot.row * 3;
    const int64_t* base = bases + row[0] * 2;
    g = grad + base[0] + row[1];
    w = weight + base[1] + row[1];
    length = row[2];
  }
  const bool vector = length % V == 0 && vector_aligned<V>(g) && vector_aligned<V>(w);
  const int64_t step = int64_t{row_threads} * V;
  Acc w_sq, g_sq;
  row_sq_norms<V>(w, g, slot.lane, length, step, vector, row_threads, w_sq, g_sq);
  const Acc scale = agc_factor(static_cast<Acc>(sqrt(w_sq)), static_cast<Acc>(sqrt(g_sq)), clip, eps_acc);
  if (!slot.live || scale == Acc(1)) return;  // kept (or clipped by exactly 1): nothing to write
  for (int64_t k = last_chunk(int64_t{slot.lane} * V, length, step); k >= 0; k -= step) {
    Acc gv[V];
    load_acc<V>(g, k, length, vector, gv);
#pragma unroll
    for (int e = 0; e < V; ++e) gv[e] *= scale;
    store_acc<V>(g, k, length, vector, gv);
  }
}

}  // namespace

cudaError_t agc(DType grad_dtype, DType weight_dtype, void* grad, const void* weight, const int64_t* rows,
                const int64_t* bases, int64_t n_units, int64_t n_singles, int64_t row_cols, double clip_factor,
                double eps, cudaStream_t stream) {
  if (!valid_unit_counts(n_units, n_singles, row_cols)) return cudaErrorInvalidValue;
  if (n_units == 0) return cudaSuccess;
  return with_type(grad_dtype, [&](auto g_tag) {
    return with_type(weight_dtype, [&](auto w_tag) {
      using G = decltype(g_tag);
      using W = decltype(w_tag);
      constexpr int V = 16 / (sizeof(G) > sizeof(W) ? sizeof(G) : sizeof(W));
      const UnitGrid grid = unit_grid(n_units, n_singles, row_cols, V);
      if (grid.blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
      agc_kernel<G, W><<<static_cast<unsigned>(grid.blocks), kThreads, 0, stream>>>(
          static_cast<G*>(grad), static_cast<const W*>(weight), rows, bases, n_units, n_singles, grid.flat_blocks,
          grid.row_threads, clip_factor, eps);
      return cudaGetLastError();
    });
  });
}

}  // namespace nfk
