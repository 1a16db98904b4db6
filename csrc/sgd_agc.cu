// SGD with unit-wise AGC, one pass per unit row (see nfkernels.h).
#include "common.cuh"

namespace nfk {
namespace {

// One block per row: the AGC factor from the squared norms of p and g, then the SGD update.
// The update re-reads p and g right after the norm pass, from L1/L2, so memory sees p, g and
// buf read once and p, buf written once. Without weight decay p is not added (0 * inf = NaN).
// The gradient type G may differ from the parameter's T, which the buffer shares.
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) sgd_agc_kernel(T* __restrict__ param, const G* __restrict__ grad,
                                                           T* __restrict__ buffer, const int64_t* __restrict__ rows,
                                                           const int64_t* __restrict__ bases, SgdAgcOptions o) {
  using Acc = typename AccType2<T, G>::type;
  const int64_t* row = rows + static_cast<int64_t>(blockIdx.x) * 3;
  const int64_t* base = bases + row[0] * 3;
  T* p = param + base[0] + row[1];
  const G* g = grad + base[1] + row[1];
  T* buf = buffer + base[2] + row[1];
  const int64_t length = row[2];
  Acc scale = 1;
  if (o.clip) {
    Acc w_sq = 0, g_sq = 0;
    for (int64_t k = threadIdx.x; k < length; k += kThreads) {
      const Acc gk = to_acc(g[k]), wk = to_acc(p[k]);
      g_sq += gk * gk;
      w_sq += wk * wk;
    }
    block_sum2(w_sq, g_sq);
    scale = agc_scale(w_sq, g_sq, Acc(o.clip_factor), Acc(o.eps));
  }
  const Acc lr = o.lr, momentum = o.momentum, weight_decay = o.weight_decay;
  for (int64_t k = threadIdx.x; k < length; k += kThreads) {
    const Acc pk = to_acc(p[k]);
    Acc d = to_acc(g[k]) * scale;
    if (weight_decay != Acc(0)) d += weight_decay * pk;
    if (o.has_momentum) {
      const Acc b = momentum * to_acc(buf[k]) + d;
      buf[k] = from_acc<T>(b);
      d = o.nesterov ? d + momentum * b : b;
    }
    p[k] = from_acc<T>(pk - lr * d);
  }
}

}  // namespace

cudaError_t sgd_agc(DType param_dtype, DType grad_dtype, void* param, const void* grad, void* momentum_buffer,
                    const int64_t* rows, const int64_t* bases, int64_t n_rows, const SgdAgcOptions& options,
                    cudaStream_t stream) {
  if (n_rows <= 0) return cudaSuccess;
  if (n_rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return with_type(param_dtype, [&](auto p_tag) {
    return with_type(grad_dtype, [&](auto g_tag) {
      using T = decltype(p_tag);
      using G = decltype(g_tag);
      sgd_agc_kernel<T, G><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
          static_cast<T*>(param), static_cast<const G*>(grad), static_cast<T*>(momentum_buffer), rows, bases, options);
      return cudaGetLastError();
    });
  });
}

}  // namespace nfk
