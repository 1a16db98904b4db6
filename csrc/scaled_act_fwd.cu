// Scaled activations with a folded per-channel bias, forward (see nfkernels.h; mirrors
// _scaled_act_fwd_kernel of nfkernels/ops/scaled_act.py). The backward is scaled_act_bwd.cu.
#include "activations.cuh"

namespace nfk {
namespace {

// y = coeff·f(x + b_c) on (row tile, column tile) work items. coeff = γ·scale. The channel of
// (r, k) is r % channels (channel_on_rows) or k. Math in fp32 (fp64 for fp64).
// Derivative: see scaled_act_bwd_kernel. Source: _scaled_act_fwd_kernel.
template <Activation A, typename T>
__global__ void __launch_bounds__(kThreads)
    scaled_act_fwd_kernel(const T* __restrict__ x, ParamPtr<T> bias, T* __restrict__ y, Tiles t, int64_t channels,
                          bool channel_on_rows, typename AccType<T>::type coeff) {
  using Acc = typename AccType<T>::type;
  constexpr int V = vec_width<T>();
  const int tk = threadIdx.x % t.threads_k, tr = threadIdx.x / t.threads_k;
  const bool column_bias = bias.data != nullptr && !channel_on_rows;
  const bool row_bias = bias.data != nullptr && channel_on_rows;
  for (int64_t tile = blockIdx.x; tile < t.row_tiles * t.col_tiles; tile += gridDim.x) {
    const int64_t col = ((tile % t.col_tiles) * t.threads_k + tk) * V;
    if (col >= t.cols) continue;
    Acc b[V] = {};
    if (column_bias) {
#pragma unroll
      for (int e = 0; e < V; ++e) b[e] = col + e < t.cols ? bias.template load<Acc>(col + e) : Acc(0);
    }
    const int64_t first_row = (tile / t.col_tiles) * t.tile_rows() + tr;
    for (int s = 0; s < kRowSteps; ++s) {
      const int64_t row = first_row + static_cast<int64_t>(s) * t.threads_r;
      if (row >= t.rows) break;
      const Acc rb = row_bias ? bias.template load<Acc>(row % channels) : Acc(0);
      const int64_t i = row * t.cols + col, end = (row + 1) * t.cols;
      Acc z[V];
      load_acc<V>(x, i, end, t.vector, z);
#pragma unroll
      for (int e = 0; e < V; ++e) z[e] = coeff * act_fwd<A>(z[e] + b[e] + rb);
      store_acc<V>(y, i, end, t.vector, z);
    }
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
    constexpr int V = vec_width<T>();
    const Tiles t = make_tiles<V>(view.rows, view.cols, kThreads, pack_aligned<T, V>(x) && pack_aligned<T, V>(y));
    return with_activation(act, [&](auto a) {
      scaled_act_fwd_kernel<decltype(a)::value, T><<<grid_for(t.row_tiles * t.col_tiles), kThreads, 0, stream>>>(
          static_cast<const T*>(x), param_ptr<T>(bias), static_cast<T*>(y), t, view.channels, view.channel_on_rows,
          static_cast<Acc>(coeff));
      return cudaGetLastError();
    });
  });
}

}  // namespace nfk
