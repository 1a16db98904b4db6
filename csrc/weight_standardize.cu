// Scaled Weight Standardization, forward and backward (see nfkernels.h; the same math, saved
// statistics and accumulation dtypes as the Triton kernels of nfkernels/ops/weight_standardize.py).
#include "common.cuh"

namespace nfk {
namespace {

// Rows are short (NFNet fan-ins are at most a few thousand), so a block is sized to its row
// instead of always 256 threads: idle threads would only add synchronisation cost.
int threads_for(int64_t row_len, int vec) {
  const int64_t chunks = ceil_div(row_len, vec);
  const int threads = next_power_of_2(chunks);
  return threads < 32 ? 32 : (threads > kThreads ? kThreads : threads);
}

// Ŵ = (W − μ)·g·s0 for one row per block. Source: _weight_standardize_fwd_kernel.
// The variance is the two-pass M2 = Σ (W − μ)² (the second pass re-reads the row from L1/L2),
// which avoids the E[W²] − μ² cancellation. Statistics in fp32 (fp64 for fp64 weights).
template <typename TW, typename TO>
__global__ void __launch_bounds__(kThreads)
    weight_standardize_fwd_kernel(const TW* __restrict__ weight, const TW* __restrict__ gain, TO* __restrict__ out,
                                  typename AccType<TW>::type* __restrict__ mean_out,
                                  typename AccType<TW>::type* __restrict__ s0_out,
                                  typename AccType<TW>::type* __restrict__ q_out, int64_t row_len,
                                  typename AccType<TW>::type gamma_scaled, typename AccType<TW>::type eps,
                                  bool deepmind, bool vector) {
  using Acc = typename AccType<TW>::type;
  constexpr int V = vec_width<TW>();
  const int64_t row = blockIdx.x;
  const TW* w = weight + row * row_len;
  TO* o = out + row * row_len;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  const Acc n_total = static_cast<Acc>(row_len);

  Acc sum[1] = {0};
  for (int64_t j = threadIdx.x * V; j < row_len; j += step) {
    Acc x[V];
    load_acc<V>(w, j, row_len, vector, x);
#pragma unroll
    for (int e = 0; e < V; ++e) sum[0] += x[e];
  }
  block_sum(sum);
  const Acc mean = sum[0] / n_total;

  Acc m2[1] = {0};
  for (int64_t j = threadIdx.x * V; j < row_len; j += step) {
    Acc x[V];
    load_acc<V>(w, j, row_len, vector, x);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const Acc u = j + e < row_len ? x[e] - mean : Acc(0);
      m2[0] += u * u;
    }
  }
  block_sum(m2);

  Acc r, q;
  if (deepmind) {  // N·σ² = M2, clamped at eps; past the clamp the statistics are constants
    r = Acc(1) / sqrt(m2[0] > eps ? m2[0] : eps);
    q = m2[0] > eps ? r * r : Acc(0);
  } else {
    r = Acc(1) / sqrt(m2[0] / n_total + eps);
    q = r * r / n_total;
  }
  const Acc s0 = gamma_scaled * r;
  const Acc scale = gain != nullptr ? s0 * static_cast<Acc>(to_acc(gain[row])) : s0;
  for (int64_t j = threadIdx.x * V; j < row_len; j += step) {
    Acc x[V];
    load_acc<V>(w, j, row_len, vector, x);
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] = (x[e] - mean) * scale;
    store_acc<V>(o, j, row_len, vector, x);
  }
  if (threadIdx.x == 0) {  // three scalars per row for the backward
    mean_out[row] = mean;
    s0_out[row] = s0;
    q_out[row] = q;
  }
}

// dW = s·(dŴ − mean(dŴ) − q·a·u), dg = s0·a with u = W − μ, a = Σ dŴ·u, s = g·s0, from the
// forward's saved μ, s0, q. One row per block. Source: _weight_standardize_bwd_kernel.
template <typename TD, typename TW>
__global__ void __launch_bounds__(kThreads)
    weight_standardize_bwd_kernel(const TD* __restrict__ dout, const TW* __restrict__ weight,
                                  const TW* __restrict__ gain, const typename AccType<TW>::type* __restrict__ mean_in,
                                  const typename AccType<TW>::type* __restrict__ s0_in,
                                  const typename AccType<TW>::type* __restrict__ q_in, TW* __restrict__ dweight,
                                  typename AccType<TW>::type* __restrict__ dgain, int64_t row_len, bool vector) {
  using Acc = typename AccType<TW>::type;
  constexpr int V = vec_width<TW>();
  const int64_t row = blockIdx.x;
  const TD* dy_row = dout + row * row_len;
  const TW* w = weight + row * row_len;
  TW* dw = dweight + row * row_len;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  const Acc mean = mean_in[row], s0 = s0_in[row], q = q_in[row];
  const Acc scale = gain != nullptr ? s0 * static_cast<Acc>(to_acc(gain[row])) : s0;

  Acc sums[2] = {0, 0};  // Σ dŴ, Σ dŴ·u
  for (int64_t j = threadIdx.x * V; j < row_len; j += step) {
    Acc dy[V], x[V];
    load_acc<V>(dy_row, j, row_len, vector, dy);
    load_acc<V>(w, j, row_len, vector, x);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      sums[0] += dy[e];
      sums[1] += dy[e] * (j + e < row_len ? x[e] - mean : Acc(0));
    }
  }
  block_sum(sums);
  const Acc mean_dy = sums[0] / static_cast<Acc>(row_len), qa = q * sums[1];
  for (int64_t j = threadIdx.x * V; j < row_len; j += step) {
    Acc dy[V], x[V];
    load_acc<V>(dy_row, j, row_len, vector, dy);
    load_acc<V>(w, j, row_len, vector, x);
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] = scale * (dy[e] - mean_dy - qa * (x[e] - mean));
    store_acc<V>(dw, j, row_len, vector, x);
  }
  if (dgain != nullptr && threadIdx.x == 0) dgain[row] = s0 * sums[1];
}

template <typename TW, typename TO>
cudaError_t launch_fwd(const void* weight, const void* gain, void* out, void* mean, void* s0, void* q, int64_t n_rows,
                       int64_t row_len, double gamma_scaled, double eps, bool deepmind, cudaStream_t stream) {
  using Acc = typename AccType<TW>::type;
  constexpr int V = vec_width<TW>();
  const bool vector = row_len % V == 0 && pack_aligned<TW, V>(weight) && pack_aligned<TO, V>(out);
  weight_standardize_fwd_kernel<TW, TO><<<static_cast<unsigned>(n_rows), threads_for(row_len, V), 0, stream>>>(
      static_cast<const TW*>(weight), static_cast<const TW*>(gain), static_cast<TO*>(out), static_cast<Acc*>(mean),
      static_cast<Acc*>(s0), static_cast<Acc*>(q), row_len, static_cast<Acc>(gamma_scaled), static_cast<Acc>(eps),
      deepmind, vector);
  return cudaGetLastError();
}

template <typename TD, typename TW>
cudaError_t launch_bwd(const void* dout, const void* weight, const void* gain, const void* mean, const void* s0,
                       const void* q, void* dweight, void* dgain, int64_t n_rows, int64_t row_len,
                       cudaStream_t stream) {
  using Acc = typename AccType<TW>::type;
  constexpr int V = vec_width<TW>();
  const bool vector = row_len % V == 0 && pack_aligned<TD, V>(dout) && pack_aligned<TW, V>(weight) &&
                      pack_aligned<TW, V>(dweight);
  weight_standardize_bwd_kernel<TD, TW><<<static_cast<unsigned>(n_rows), threads_for(row_len, V), 0, stream>>>(
      static_cast<const TD*>(dout), static_cast<const TW*>(weight), static_cast<const TW*>(gain),
      static_cast<const Acc*>(mean), static_cast<const Acc*>(s0), static_cast<const Acc*>(q),
      static_cast<TW*>(dweight), static_cast<Acc*>(dgain), row_len, vector);
  return cudaGetLastError();
}

cudaError_t check_rows(int64_t n_rows, int64_t row_len) {
  if (n_rows > kMaxGridX || row_len <= 0) return cudaErrorInvalidConfiguration;
  return cudaSuccess;
}

}  // namespace

cudaError_t weight_standardize_fwd(DType weight_dtype, DType out_dtype, const void* weight, const void* gain,
                                   void* out, void* mean, void* s0, void* q, int64_t n_rows, int64_t row_len,
                                   double gamma_scaled, double eps, bool deepmind, cudaStream_t stream) {
  if (n_rows <= 0) return cudaSuccess;
  if (const cudaError_t err = check_rows(n_rows, row_len); err != cudaSuccess) return err;
  return with_type(weight_dtype, [&](auto w_tag) {
    return with_type(out_dtype, [&](auto o_tag) {
      return launch_fwd<decltype(w_tag), decltype(o_tag)>(weight, gain, out, mean, s0, q, n_rows, row_len,
                                                          gamma_scaled, eps, deepmind, stream);
    });
  });
}

cudaError_t weight_standardize_bwd(DType dout_dtype, DType weight_dtype, const void* dout, const void* weight,
                                   const void* gain, const void* mean, const void* s0, const void* q,
                                   void* dweight, void* dgain, int64_t n_rows, int64_t row_len,
                                   cudaStream_t stream) {
  if (n_rows <= 0) return cudaSuccess;
  if (const cudaError_t err = check_rows(n_rows, row_len); err != cudaSuccess) return err;
  return with_type(dout_dtype, [&](auto d_tag) {
    return with_type(weight_dtype, [&](auto w_tag) {
      return launch_bwd<decltype(d_tag), decltype(w_tag)>(dout, weight, gain, mean, s0, q, dweight, dgain, n_rows,
                                                          row_len, stream);
    });
  });
}

}  // namespace nfk
