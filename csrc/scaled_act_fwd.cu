// Scaled activations with a folded per-channel bias, forward (see nfkernels.h; mirrors
// _scaled_act_fwd_kernel of nfkernels/ops/scaled_act.py). The backward is scaled_act_bwd.cu.
#include "activations.cuh"

namespace nfk {
namespace {

// y = coeff·f(x + b_c) over the (n, c, hw) view; a block per (channel block, group) of the
// ActPlan, each thread walking its positions with its channels' bias in registers. coeff =
// γ·scale. Math in fp32 (fp64 for fp64). Derivative: see scaled_act_bwd_kernel. Source:
// _scaled_act_fwd_kernel.
template <Activation A, typename T, int V>
__global__ void __launch_bounds__(kThreads)
    scaled_act_fwd_kernel(const T* __restrict__ x, ParamPtr<T> bias, T* __restrict__ y, ActPlan p,
                          typename AccType<T>::type coeff) {
  using Acc = typename AccType<T>::type;
  ActThread w(p, V, threadIdx.x, blockIdx.x, blockIdx.y);
  Acc b[V];
  load_channel_bias<V>(bias, p, w.channel, b);
#pragma unroll(kWalkUnroll<T>)
  for (; w.more(); w.next(p)) {
    const int64_t i = w.start(V), end = w.stop();
    Acc z[V];
    load_acc<V>(x, i, end, p.vector, z);
#pragma unroll
    for (int e = 0; e < V; ++e) z[e] = coeff * act_fwd<A>(z[e] + b[e]);
    store_acc<V>(y, i, end, p.vector, z);
  }
}

}  // namespace

cudaError_t scaled_act_fwd(DType dtype, Activation act, const void* x, ChannelParam bias, void* y,
                           const MatrixView& view, double coeff, cudaStream_t stream) {
  if (!valid_view(view)) return cudaErrorInvalidValue;
  if (view.rows == 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccType<T>::type;
    return with_vector_width<T>(view, {x, y}, [&](auto width, bool vector) {
      constexpr int V = decltype(width)::value;
      const ActPlan p = make_act_plan(view, V, vector, sizeof(T), false);
      if (p.channel_blocks > kMaxGridX) return cudaErrorInvalidValue;
      const dim3 grid(static_cast<unsigned>(p.channel_blocks), static_cast<unsigned>(p.groups));
      return with_activation(act, [&](auto a) {
        scaled_act_fwd_kernel<decltype(a)::value, T, V><<<grid, kThreads, 0, stream>>>(
            static_cast<const T*>(x), param_ptr<T>(bias), static_cast<T*>(y), p, static_cast<Acc>(coeff));
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace nfk
