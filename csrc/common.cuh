// Shared device helpers: dtype conversion to the accumulation type and a block-wide sum.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nfkernels.h"

namespace nfk {

constexpr int kThreads = 256;
constexpr float kGradNormFloor = 1e-6f;  // timm's grad_norm.clamp(min=1e-6)

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <typename T> __device__ __forceinline__ T from_acc(double x) { return x; }

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

}  // namespace nfk
