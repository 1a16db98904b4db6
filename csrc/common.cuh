// Shared device helpers: dtype conversion to the accumulation type, block-wide sums, 16-byte
// vector access and the launch-side checks every kernel file uses.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nfkernels.h"

namespace nfk {

constexpr int kThreads = 256;
constexpr float kGradNormFloor = 1e-6f;  // timm's grad_norm.clamp(min=1e-6)

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
// The accumulation type of math mixing two operand types: fp64 if either is.
template <typename A, typename B> struct AccType2 { using type = float; };
template <typename B> struct AccType2<double, B> { using type = double; };
template <typename A> struct AccType2<A, double> { using type = double; };
template <> struct AccType2<double, double> { using type = double; };

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(float x) { return x; }
// One rounding from fp64 to any output dtype (no detour through fp32).
template <typename T> __device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }

// Sum over the block of two values at once (the weight and gradient squared norms share the
// synchronisations); every thread gets the totals.
template <typename Acc>
__device__ __forceinline__ void block_sum2(Acc& a, Acc& b) {
  __shared__ Acc partial[2][kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_xor_sync(0xffffffffu, b, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    partial[0][warp] = a;
    partial[1][warp] = b;
  }
  __syncthreads();
  a = 0;
  b = 0;
  for (int w = 0; w < kThreads / 32; ++w) {
    a += partial[0][w];
    b += partial[1][w];
  }
}

// The AGC factor: 1 when ||G|| < clip ||W||*, else clip ||W||* / max(||G||, 1e-6). The
// comparisons are written so that NaN norms propagate (fmax would drop them), as in timm.
template <typename Acc>
__device__ __forceinline__ Acc agc_scale(Acc w_sq, Acc g_sq, Acc clip_factor, Acc eps) {
  const Acc w_norm = sqrt(w_sq), g_norm = sqrt(g_sq);
  const Acc max_norm = clip_factor * (w_norm < eps ? eps : w_norm);
  if (g_norm < max_norm) return Acc(1);
  return max_norm / (g_norm < Acc(kGradNormFloor) ? Acc(kGradNormFloor) : g_norm);
}


// ---------------------------------------------------------------------------------------------
// Helpers of the weight-standardization, scaled-activation and SE-gate kernels.

constexpr int64_t kMaxGridX = 0x7fffffff;  // gridDim.x limit; y and z (65535) are never used

// Sums K values over the block (blockDim.x a multiple of 32, at most 1024) in a fixed order, so
// results do not depend on scheduling; every thread gets the totals. Safe to call repeatedly.
template <typename Acc, int K>
__device__ __forceinline__ void block_sum(Acc (&v)[K]) {
  __shared__ Acc partial[K][32];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // a previous call's readers of `partial` are done
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) partial[k][warp] = v[k];
  }
  __syncthreads();
  const int warps = blockDim.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = 0;
    for (int w = 0; w < warps; ++w) v[k] += partial[k][w];
  }
}

// V consecutive elements as one aligned unit, so that a load or store of a Pack compiles to
// 16-byte (ld/st.global.v4) accesses.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Elements per 16-byte access for the dtype that sets a kernel's vector width.
template <typename T>
__host__ __device__ constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

// Loads elements [i, i + V) of p as Acc: one vector access when `vector` (the caller checked
// alignment and that all V are in range), else element by element up to `end` (the rest 0).
template <int V, typename T, typename Acc>
__device__ __forceinline__ void load_acc(const T* __restrict__ p, int64_t i, int64_t end, bool vector, Acc (&out)[V]) {
  if (vector) {
    const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p + i);
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = to_acc(pack.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = i + e < end ? static_cast<Acc>(to_acc(p[i + e])) : Acc(0);
  }
}

template <int V, typename T, typename Acc>
__device__ __forceinline__ void store_acc(T* __restrict__ p, int64_t i, int64_t end, bool vector, const Acc (&in)[V]) {
  if (vector) {
    Pack<T, V> pack;
#pragma unroll
    for (int e = 0; e < V; ++e) pack.v[e] = from_acc<T>(in[e]);
    *reinterpret_cast<Pack<T, V>*>(p + i) = pack;
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (i + e < end) p[i + e] = from_acc<T>(in[e]);
    }
  }
}

// A per-channel parameter (bias) in the activation dtype T, or in float32 next to fp16/bf16
// activations (autocast keeps parameters fp32); decided per call, uniformly for the grid.
template <typename T>
struct ParamPtr {
  const void* data;
  bool is_float;

  template <typename Acc>
  __device__ __forceinline__ Acc load(int64_t i) const {
    return is_float ? static_cast<Acc>(static_cast<const float*>(data)[i])
                    : static_cast<Acc>(to_acc(static_cast<const T*>(data)[i]));
  }
};

template <typename T>
ParamPtr<T> param_ptr(ChannelParam p) {
  return ParamPtr<T>{p.data, p.is_float};
}

// Whether Pack<T, V> accesses at p + k·V are aligned (a null pointer, an absent operand, is).
template <typename T, int V>
bool pack_aligned(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % sizeof(Pack<T, V>) == 0;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_power_of_2(int64_t n) {
  int p = 1;
  while (p < n && p < (1 << 30)) p <<= 1;
  return p;
}

// Calls f(T{}) with T the C++ type of `dtype`: the dtype-name dispatch of every launcher.
template <typename F>
cudaError_t with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace nfk
