// Unit-wise Adaptive Gradient Clipping over a table of unit rows (see nfkernels.h).
#include "common.cuh"

namespace nfk {
namespace {

// One block per unit: sum the squares of W_i and G_i, then scale G_i unless it is kept. A kept
// unit is not written. The second read of G_i hits L1/L2 (a unit is at most tens of KB).
// G and W may differ (torch allows e.g. fp32 weights with bf16 gradients).
template <typename G, typename W>
__global__ void __launch_bounds__(kThreads) agc_kernel(G* __restrict__ grad, const W* __restrict__ weight,
                                                       const int64_t* __restrict__ rows,
                                                       const int64_t* __restrict__ bases, double clip_factor,
                                                       double eps) {
  using Acc = typename AccType2<G, W>::type;
  const int64_t* row = rows + static_cast<int64_t>(blockIdx.x) * 3;
  const int64_t* base = bases + row[0] * 2;
  G* g = grad + base[0] + row[1];
  const W* w = weight + base[1] + row[1];
  const int64_t length = row[2];
  Acc w_sq = 0, g_sq = 0;
  for (int64_t k = threadIdx.x; k < length; k += kThreads) {
    const Acc gk = to_acc(g[k]), wk = to_acc(w[k]);
    g_sq += gk * gk;
    w_sq += wk * wk;
  }
  block_sum2(w_sq, g_sq);
  const Acc scale = agc_scale(w_sq, g_sq, Acc(clip_factor), Acc(eps));
  if (scale == Acc(1)) return;  // kept (or clipped by exactly 1): nothing to write
  for (int64_t k = threadIdx.x; k < length; k += kThreads) g[k] = from_acc<G>(static_cast<Acc>(to_acc(g[k])) * scale);
}

}  // namespace

cudaError_t agc(DType grad_dtype, DType weight_dtype, void* grad, const void* weight, const int64_t* rows,
                const int64_t* bases, int64_t n_units, double clip_factor, double eps, cudaStream_t stream) {
  if (n_units <= 0) return cudaSuccess;
  if (n_units > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return with_type(grad_dtype, [&](auto g_tag) {
    return with_type(weight_dtype, [&](auto w_tag) {
      using G = decltype(g_tag);
      using W = decltype(w_tag);
      agc_kernel<G, W><<<static_cast<unsigned>(n_units), kThreads, 0, stream>>>(
          static_cast<G*>(grad), static_cast<const W*>(weight), rows, bases, clip_factor, eps);
      return cudaGetLastError();
    });
  });
}

}  // namespace nfk
