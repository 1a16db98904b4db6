// Scaled activations with a folded per-channel bias, backward (see nfkernels.h; mirrors
// _scaled_act_bwd_kernel of nfkernels/ops/scaled_act.py). The forward is scaled_act_fwd.cu: the
// files compile in parallel, each activation being its own instantiation.
#include "activations.cuh"

namespace nfk {
namespace {

// dbias, written in the bias's dtype: T, or float32 next to fp16/bf16 activations.
template <typename T>
struct ParamOut {
  void* data;
  bool is_float;

  template <typename Acc>
  __device__ __forceinline__ void store(int64_t i, Acc v) const {
    if (is_float) {
      static_cast<float*>(data)[i] = static_cast<float>(v);
    } else {
      static_cast<T*>(data)[i] = from_acc<T>(v);
    }
  }
};

// dbias_c = Σ_g partial[g·C + c] for the channels of `block`, by the block that counted last:
// each of kThreads / block_channels lanes per channel adds groups g ≡ lane (mod lanes) in
// increasing g, then a fixed tree adds the lanes. Loads bypass L1 (.cg), where a line read
// before the other blocks' stores could be stale.
template <typename T, typename Acc>
__device__ void finish_dbias(const Acc* __restrict__ partial, ParamOut<T> dbias, const ActPlan& p, int64_t block) {
  __shared__ Acc lane_sums[kThreads];
  const int width = static_cast<int>(p.block_channels);  // a power of two, at most kThreads
  const int u = threadIdx.x % width, lane = threadIdx.x / width, lanes = kThreads / width;
  const int64_t c = block * width + u;
  Acc s = 0;
  if (c < p.c) {
    for (int64_t g = lane; g < p.groups; g += lanes) s += __ldcg(partial + g * p.c + c);
  }
  lane_sums[threadIdx.x] = s;
  __syncthreads();
  for (int half = lanes / 2; half > 0; half >>= 1) {
    if (lane < half) lane_sums[threadIdx.x] += lane_sums[threadIdx.x + half * width];
    __syncthreads();
  }
  if (lane == 0 && c < p.c) dbias.store(c, lane_sums[u]);
}

// dx = dy·coeff·f'(x + b_c) over the (n, c, hw) view, a block per (channel block, group) of the
// ActPlan, and, when dbias is given, dbias_c = Σ of dx over dims 0 and 2, finished here in a
// fixed order (no float atomics): each thread sums its own elements (all of its channel, or of
// its V channels), the threads of a slot are added by row_sum / column_sums, and a channel block
// that is one group writes dbias. Split into groups, each writes partial[group·C + c], counts
// itself in counters[block] (zeroed by the launcher), and the block that counts last adds the
// partials (finish_dbias), whichever block it is. Source: _scaled_act_bwd_kernel.
template <Activation A, typename T, int V>
__global__ void __launch_bounds__(kThreads)
    scaled_act_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, ParamPtr<T> bias, T* __restrict__ dx,
                          ParamOut<T> dbias, typename AccType<T>::type* __restrict__ partial,
                          unsigned* __restrict__ counters, ActPlan p, typename AccType<T>::type coeff) {
  using Acc = typename AccType<T>::type;
  __shared__ Acc scratch[kThreads / kWarp];
  __shared__ unsigned ticket;
  ActThread w(p, V, threadIdx.x, blockIdx.x, blockIdx.y);
  Acc b[V], sums[V] = {};
  load_channel_bias<V>(bias, p, w.channel, b);
#pragma unroll(kWalkUnroll<T>)
  for (; w.more(); w.next(p)) {
    const int64_t i = w.start(V), end = w.stop();
    Acc z[V], g[V];
    load_acc<V>(x, i, end, p.vector, z);
    load_acc<V>(dy, i, end, p.vector, g);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      g[e] = p.vector || i + e < end ? g[e] * coeff * act_grad<A>(z[e] + b[e]) : Acc(0);
      sums[e] += g[e];
    }
    store_acc<V>(dx, i, end, p.vector, g);
  }
  if (dbias.data == nullptr) return;
  // Every thread reaches the block-wide sums below (the branches are uniform).
  if (p.channel_on_rows) {
    Acc s = 0;
#pragma unroll
    for (int e = 0; e < V; ++e) s += sums[e];
    sums[0] = row_sum(s, p.lanes, scratch);
  } else {
    column_sums<V>(sums, p.slots, p.lanes);
  }
  // Lane 0 of a slot holds its sums: of one channel (channels on rows) or of V.
  const int outputs = p.channel_on_rows ? 1 : V;
  if (p.groups == 1) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (w.lane == 0 && e < outputs && w.channel + e < p.c) dbias.store(w.channel + e, sums[e]);
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (w.lane == 0 && e < outputs && w.channel + e < p.c) partial[blockIdx.y * p.c + w.channel + e] = sums[e];
  }
  __threadfence();  // the partial sums are visible device-wide before the count below
  __syncthreads();
  if (threadIdx.x == 0) ticket = atomicAdd(counters + blockIdx.x, 1u);
  __syncthreads();
  if (ticket == p.groups - 1) {
    __threadfence();  // acquire: the other groups' partial sums, counted before ours
    finish_dbias(partial, dbias, p, blockIdx.x);
  }
}

// The largest workspace any vector width of `view` needs (the width depends on the operands'
// alignment, which the query does not see).
template <typename T>
int64_t bwd_workspace(const MatrixView& view) {
  using Acc = typename AccType<T>::type;
  constexpr int V = vec_width<T>();
  int64_t size = 0;
  for (const int vec : {V, V / 2 > 0 ? V / 2 : 1}) {
    const ActPlan p = make_act_plan(view, vec, true, sizeof(T), true);
    if (p.groups > 1) {
      const int64_t need = p.groups * p.c + ceil_div(p.channel_blocks * static_cast<int64_t>(sizeof(unsigned)),
                                                     static_cast<int64_t>(sizeof(Acc)));
      if (need > size) size = need;
    }
  }
  return size;
}

}  // namespace

int64_t scaled_act_bwd_workspace(DType dtype, const MatrixView& view) {
  if (!valid_view(view) || view.rows == 0) return 0;
  int64_t size = 0;
  with_type(dtype, [&](auto tag) {
    size = bwd_workspace<decltype(tag)>(view);
    return cudaSuccess;
  });
  return size;
}

cudaError_t scaled_act_bwd(DType dtype, Activation act, const void* dy, const void* x, ChannelParam bias, void* dx,
                           void* dbias, void* workspace, const MatrixView& view, double coeff, cudaStream_t stream) {
  if (!valid_view(view) || (dbias != nullptr && bias.data == nullptr)) return cudaErrorInvalidValue;
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccType<T>::type;
    if (view.rows == 0) {  // dbias of an empty tensor: zeros (all-zero bits in every float dtype)
      const size_t size = bias.is_float ? sizeof(float) : sizeof(T);
      return dbias != nullptr ? cudaMemsetAsync(dbias, 0, view.channels * size, stream) : cudaSuccess;
    }
    return with_vector_width<T>(view, {dy, x, dx}, [&](auto width, bool vector) {
      constexpr int V = decltype(width)::value;
      const ActPlan p = make_act_plan(view, V, vector, sizeof(T), dbias != nullptr);
      Acc* partial = nullptr;
      unsigned* counters = nullptr;
      if (dbias != nullptr && p.groups > 1) {
        if (workspace == nullptr) return cudaErrorInvalidValue;
        partial = static_cast<Acc*>(workspace);
        counters = reinterpret_cast<unsigned*>(partial + p.groups * p.c);
        const cudaError_t err = cudaMemsetAsync(counters, 0, p.channel_blocks * sizeof(unsigned), stream);
        if (err != cudaSuccess) return err;
      }
      if (p.channel_blocks > kMaxGridX) return cudaErrorInvalidValue;
      const dim3 grid(static_cast<unsigned>(p.channel_blocks), static_cast<unsigned>(p.groups));
      return with_activation(act, [&](auto a) {
        scaled_act_bwd_kernel<decltype(a)::value, T, V><<<grid, kThreads, 0, stream>>>(
            static_cast<const T*>(dy), static_cast<const T*>(x), param_ptr<T>(bias), static_cast<T*>(dx),
            ParamOut<T>{dbias, bias.is_float}, partial, counters, p, static_cast<Acc>(coeff));
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace nfk
