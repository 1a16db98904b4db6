// Framework-free CUDA kernels of nfkernels (DESIGN.md §2): raw device pointers, sizes and a
// cudaStream_t in, a cudaError_t out. No torch headers; python/bindings.cpp wraps them.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nfk {

enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Unit-wise Adaptive Gradient Clipping (Brock et al. 2021, §4.1; timm adaptive_clip_grad) of
// every row of `table` in one launch. `table` (device, n_units x 3 int64) holds per unit the
// gradient offset, weight offset (elements from grad / weight) and the unit length. Per unit:
// ||W||* = max(||W||, eps); unless ||G|| < clip_factor ||W||*,
// G <- G * clip_factor ||W||* / max(||G||, 1e-6). Norms accumulate in fp32 (fp64 for fp64).
cudaError_t agc(DType dtype, void* grad, const void* weight, const int64_t* table, int64_t n_units,
                float clip_factor, float eps, cudaStream_t stream);

struct SgdAgcOptions {
  float lr, momentum, weight_decay, clip_factor, eps;
  bool clip, has_momentum, first_step, nesterov;
};

// SGD (torch.optim.SGD semantics, no dampening) with AGC, one pass per unit row. `table`
// (device, n_rows x 4 int64): param, grad, momentum-buffer offsets and the row length. Per row:
// g <- s g (s the AGC factor when clip); g <- g + wd p; buf <- m buf + g (buf <- g on the first
// step); nesterov: g <- g + m buf, else g <- buf; p <- p - lr g. buf is unused without momentum.
cudaError_t sgd_agc(DType dtype, void* param, const void* grad, void* momentum_buffer, const int64_t* table,
                    int64_t n_rows, const SgdAgcOptions& options, cudaStream_t stream);

}  // namespace nfk
