// Scaled activations with a folded per-channel bias, backward (see nfkernels.h; mirrors
// _scaled_act_bwd_kernel of nfkernels/ops/scaled_act.py). The forward is scaled_act_fwd.cu: the
// files compile in parallel, each activation being its own instantiation.
#include "activations.cuh"

namespace nfk {
namespace {

// Backward programs with channels on columns each cover a group of row tiles, so that at most
// this many partial dbias rows are written (scaled_act.py MAX_ROW_GROUPS).
constexpr int64_t kMaxRowGroups = 1024;

// dx = dy·coeff·f'(x + b_c), and with `partial` the deterministic partial sums of dx for dbias
// (no atomics; sum_partials_kernel adds them in a fixed order):
//   channel_on_rows: partial[r] = Σ_k dx[r, k]; each work item is one row tile and walks every
//                    column tile, so a row's sum is formed inside one block;
//   otherwise:       partial[g, k] = Σ of dx[r, k] over the rows of row group g (tiles_per_group
//                    consecutive row tiles); work items are (row group, column tile).
// Source: _scaled_act_bwd_kernel.
template <Activation A, typename T>
__global__ void __launch_bounds__(kThreads)
    scaled_act_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, ParamPtr<T> bias, T* __restrict__ dx,
                          typename AccType<T>::type* __restrict__ partial, Tiles t, int64_t channels,
                          bool channel_on_rows, typename AccType<T>::type coeff, int64_t tiles_per_group) {
  using Acc = typename AccType<T>::type;
  constexpr int V = vec_width<T>();
  __shared__ Acc scratch[kThreads / kWarp];
  const int tk = threadIdx.x % t.threads_k, tr = threadIdx.x / t.threads_k;
  const bool row_partials = partial != nullptr && channel_on_rows;
  const bool col_partials = partial != nullptr && !channel_on_rows;
  const bool column_bias = bias.data != nullptr && !channel_on_rows;
  const bool row_bias = bias.data != nullptr && channel_on_rows;
  const int64_t col_chunks = row_partials ? 1 : t.col_tiles;
  const int64_t groups = ceil_div(t.row_tiles, tiles_per_group);
  // Loop bounds below depend on the work item only, so every thread reaches the block-wide
  // reductions together.
  for (int64_t item = blockIdx.x; item < groups * col_chunks; item += gridDim.x) {
    const int64_t group = item / col_chunks;
    const int64_t first_ct = row_partials ? 0 : item % col_chunks;
    const int64_t last_ct = row_partials ? t.col_tiles : first_ct + 1;
    Acc b[V] = {}, col_sums[V] = {};
    const int64_t own_col = (first_ct * t.threads_k + tk) * V;
    if (column_bias) {
#pragma unroll
      for (int e = 0; e < V; ++e) b[e] = own_col + e < t.cols ? bias.template load<Acc>(own_col + e) : Acc(0);
    }
    const int64_t last_tile = (group + 1) * tiles_per_group < t.row_tiles ? (group + 1) * tiles_per_group : t.row_tiles;
    for (int64_t rt = group * tiles_per_group; rt < last_tile; ++rt) {
      for (int s = 0; s < kRowSteps; ++s) {
        const int64_t row = rt * t.tile_rows() + static_cast<int64_t>(s) * t.threads_r + tr;
        const bool row_ok = row < t.rows;
        const Acc rb = row_bias && row_ok ? bias.template load<Acc>(row % channels) : Acc(0);
        Acc row_sum_part = 0;
        for (int64_t ct = first_ct; ct < last_ct; ++ct) {
          const int64_t col = (ct * t.threads_k + tk) * V;
          if (!row_ok || col >= t.cols) continue;
          const int64_t i = row * t.cols + col, end = (row + 1) * t.cols;
          Acc z[V], g[V];
          load_acc<V>(x, i, end, t.vector, z);
          load_acc<V>(dy, i, end, t.vector, g);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            g[e] = col + e < t.cols ? g[e] * coeff * act_grad<A>(z[e] + b[e] + rb) : Acc(0);
            row_sum_part += g[e];
            col_sums[e] += g[e];
          }
          store_acc<V>(dx, i, end, t.vector, g);
        }
        if (row_partials) {
          const Acc total = row_sum(row_sum_part, t.threads_k, scratch);
          if (tk == 0 && row_ok) partial[row] = total;
        }
      }
    }
    if (col_partials) {
      column_sums<V>(col_sums, t.threads_k, t.threads_r);
      if (tr == 0) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          if (own_col + e < t.cols) partial[group * t.cols + own_col + e] = col_sums[e];
        }
      }
    }
  }
}

// out[c] = Σ_{a < outer} partial[a·stride + c], a in increasing order: the fixed-order second
// stage of the dbias reduction (and of nothing else).
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const Acc* __restrict__ partial, Acc* __restrict__ out, int64_t n_out, int64_t outer,
                        int64_t stride) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < n_out;
       c += static_cast<int64_t>(gridDim.x) * kThreads) {
    Acc total = 0;
    for (int64_t a = 0; a < outer; ++a) total += partial[a * stride + c];
    out[c] = total;
  }
}

// The backward's work split, shared by the workspace query and the launch.
struct BwdPlan {
  Tiles tiles;
  int64_t tiles_per_group, groups;
  int64_t workspace;  // partial sums for dbias, in accumulation-dtype elements
};

template <typename T>
BwdPlan plan_bwd(const MatrixView& view, bool operands_aligned) {
  constexpr int V = vec_width<T>();
  BwdPlan p{};
  p.tiles = make_tiles<V>(view.rows, view.cols, kThreads, operands_aligned);
  p.tiles_per_group = view.channel_on_rows ? 1 : ceil_div(p.tiles.row_tiles, kMaxRowGroups);
  p.groups = ceil_div(p.tiles.row_tiles, p.tiles_per_group);
  p.workspace = view.channel_on_rows ? view.rows : p.groups * view.cols;
  return p;
}


}  // namespace

int64_t scaled_act_bwd_workspace(DType dtype, const MatrixView& view) {
  if (!valid_view(view)) return 0;
  int64_t size = 0;
  with_type(dtype, [&](auto tag) {
    size = plan_bwd<decltype(tag)>(view, false).workspace;
    return cudaSuccess;
  });
  return size;
}

cudaError_t scaled_act_bwd(DType dtype, Activation act, const void* dy, const void* x, ChannelParam bias, void* dx,
                           void* dbias, void* workspace, const MatrixView& view, double coeff, cudaStream_t stream) {
  if (!valid_view(view) || (dbias != nullptr && (bias.data == nullptr || workspace == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (view.rows == 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccType<T>::type;
    constexpr int V = vec_width<T>();
    const bool aligned = pack_aligned<T, V>(dy) && pack_aligned<T, V>(x) && pack_aligned<T, V>(dx);
    const BwdPlan p = plan_bwd<T>(view, aligned);
    Acc* partial = dbias != nullptr ? static_cast<Acc*>(workspace) : nullptr;
    const int64_t items = p.groups * (partial != nullptr && view.channel_on_rows ? 1 : p.tiles.col_tiles);
    cudaError_t err = with_activation(act, [&](auto a) {
      scaled_act_bwd_kernel<decltype(a)::value, T><<<grid_for(items), kThreads, 0, stream>>>(
          static_cast<const T*>(dy), static_cast<const T*>(x), param_ptr<T>(bias), static_cast<T*>(dx), partial, p.tiles,
          view.channels, view.channel_on_rows, static_cast<Acc>(coeff), p.tiles_per_group);
      return cudaGetLastError();
    });
    if (err != cudaSuccess || partial == nullptr) return err;
    // channel_on_rows: rows are (n, c) planes in n-major order, so dbias_c = Σ_n partial[n·C + c].
    const int64_t n_out = view.channel_on_rows ? view.channels : view.cols;
    const int64_t outer = view.channel_on_rows ? view.rows / view.channels : p.groups;
    sum_partials_kernel<Acc><<<grid_for(ceil_div(n_out, kThreads)), kThreads, 0, stream>>>(
        partial, static_cast<Acc*>(dbias), n_out, outer, n_out);
    return cudaGetLastError();
  });
}

}  // namespace nfk
