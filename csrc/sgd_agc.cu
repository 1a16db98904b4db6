// SGD with unit-wise AGC, one pass per unit row (see nfkernels.h; the launch geometry is in
// agc_rows.cuh and mirrors nfkernels/ops/sgd_agc.py).
#include "agc_rows.cuh"

namespace nfk {
namespace {

// d <- d + wd p; buf <- m buf + d; d <- d + m buf (nesterov) or buf; returns p - lr d. Without
// weight decay p is not added (0 * inf = NaN).
template <typename Acc>
__device__ __forceinline__ Acc sgd_step(Acc p, Acc d, Acc& buf, const SgdAgcOptions& o, Acc lr, Acc momentum,
                                        Acc weight_decay) {
  if (weight_decay != Acc(0)) d += weight_decay * p;
  if (o.has_momentum) {
    buf = momentum * buf + d;
    d = o.nesterov ? d + momentum * buf : buf;
  }
  return p - lr * d;
}

// Blocks below flat_blocks step single-element units (||W|| = |p|, ||G|| = |g|), one per thread
// and step; the others step rows, row_threads lanes per row: the AGC factor from the squared norms
// of p and g, then the SGD update. The update re-reads p and g right after the norm pass, from
// L1/L2, so memory sees p, g and buf read once and p, buf written once. The gradient type G may
// differ from the parameter's T, which the buffer shares; V elements per lane and step, one
// 16-byte access of the wider type where the row is aligned (checked row by row).
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) sgd_agc_kernel(T* __restrict__ param, const G* __restrict__ grad,
                                                           T* __restrict__ buffer, const int64_t* __restrict__ rows,
                                                           const int64_t* __restrict__ bases, int64_t n_units,
                                                           int64_t n_singles, int64_t flat_blocks, int row_threads,
                                                           SgdAgcOptions o) {
  using Acc = typename AccType2<T, G>::type;
  constexpr int V = 16 / (sizeof(T) > sizeof(G) ? sizeof(T) : sizeof(G));
  const Acc lr = o.lr, momentum = o.momentum, weight_decay = o.weight_decay;
  const Acc clip_factor = o.clip_factor, eps = o.eps;
  if (blockIdx.x < flat_blocks) {
    const int64_t first = static_cast<int64_t>(blockIdx.x) * kFlatUnits + threadIdx.x;
#pragma unroll
    for (int step = 0; step < kFlatPerThread; ++step) {
      const int64_t unit = first + int64_t{step} * kThreads;
      if (unit < n_singles) {
        const int64_t* row = rows + unit * 3;
        const int64_t* base = bases + row[0] * 3;
        T* p = param + base[0] + row[1];
        T* buf = buffer + base[2] + row[1];
        const Acc pk = to_acc(*p);
        Acc d = to_acc(grad[base[1] + row[1]]);
        if (o.clip) d *= agc_factor(magnitude(pk), magnitude(d), clip_factor, eps);
        Acc b = o.has_momentum ? static_cast<Acc>(to_acc(*buf)) : Acc(0);
        *p = from_acc<T>(sgd_step(pk, d, b, o, lr, momentum, weight_decay));
        if (o.has_momentum) *buf = from_acc<T>(b);
      }
    }
    return;
  }
  const RowSlot slot = row_slot(n_units, n_singles, flat_blocks, row_threads);
  T* p = nullptr;
  const G* g = nullptr;
  T* buf = nullptr;
  int64_t length = 0;  // no row: nothing read, but the lane still joins its warp's sums
  if (slot.live) {
    const int64_t* row = rows + slot.row * 3;
    const int64_t* base = bases + row[0] * 3;
    p = param + base[0] + row[1];
    g = grad + base[1] + row[1];
    buf = buffer + base[2] + row[1];
    length = row[2];
  }
  const bool vector = length % V == 0 && vector_aligned<V>(p) && vector_aligned<V>(g) && vector_aligned<V>(buf);
  const int64_t step = int64_t{row_threads} * V;
  Acc scale = 1;
  if (o.clip) {  // uniform over the grid: every lane joins the sums or none does
    Acc w_sq, g_sq;
    row_sq_norms<V>(p, g, slot.lane, length, step, vector, row_threads, w_sq, g_sq);
    scale = agc_factor(static_cast<Acc>(sqrt(w_sq)), static_cast<Acc>(sqrt(g_sq)), clip_factor, eps);
  }
  for (int64_t k = last_chunk(int64_t{slot.lane} * V, length, step); k >= 0; k -= step) {
    Acc pv[V], dv[V], bv[V];
    load_acc<V>(p, k, length, vector, pv);
    load_acc<V>(g, k, length, vector, dv);
    if (o.has_momentum) {
      load_acc<V>(buf, k, length, vector, bv);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) bv[e] = 0;
    }
#pragma unroll
    for (int e = 0; e < V; ++e) pv[e] = sgd_step(pv[e], dv[e] * scale, bv[e], o, lr, momentum, weight_decay);
    store_acc<V>(p, k, length, vector, pv);
    if (o.has_momentum) store_acc<V>(buf, k, length, vector, bv);
  }
}

}  // namespace

cudaError_t sgd_agc(DType param_dtype, DType grad_dtype, void* param, const void* grad, void* momentum_buffer,
                    const int64_t* rows, const int64_t* bases, int64_t n_units, int64_t n_singles, int64_t row_cols,
                    const SgdAgcOptions& options, cudaStream_t stream) {
  if (!valid_unit_counts(n_units, n_singles, row_cols)) return cudaErrorInvalidValue;
  if (n_units == 0) return cudaSuccess;
  return with_type(param_dtype, [&](auto p_tag) {
    return with_type(grad_dtype, [&](auto g_tag) {
      using T = decltype(p_tag);
      using G = decltype(g_tag);
      constexpr int V = 16 / (sizeof(T) > sizeof(G) ? sizeof(T) : sizeof(G));
      const UnitGrid grid = unit_grid(n_units, n_singles, row_cols, V);
      if (grid.blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
      sgd_agc_kernel<T, G><<<static_cast<unsigned>(grid.blocks), kThreads, 0, stream>>>(
          static_cast<T*>(param), static_cast<const G*>(grad), static_cast<T*>(momentum_buffer), rows, bases,
          n_units, n_singles, grid.flat_blocks, grid.row_threads, options);
      return cudaGetLastError();
    });
  });
}

}  // namespace nfk
