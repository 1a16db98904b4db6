// The activations f and their derivatives f' of the scaled-activation kernels, in the
// accumulation type (float, double for fp64). Formulas: nfkernels/ops/scaled_act.py's docstring
// and its _act_fwd / _act_grad (same stable forms; CUDA's own expm1, log1p, tanh, erfc are
// accurate, so no hand-built versions are needed). Kinks follow torch: f'(0) = 0 for relu and
// relu6 (and f'(6) = 0), the z ≤ 0 branch elsewhere. So does NaN: every comparison below is
// written the way torch's own kernels write it, so that NaN (for which it is false) gives
// f(NaN) = NaN and torch's f'(NaN) (1 for relu, relu6, elu; λ for selu; 0.01 for leaky_relu).
#pragma once

#include "matrix_tiles.cuh"

namespace nfk {

template <typename Acc>
__device__ __forceinline__ Acc sigmoid(Acc z) {
  return Acc(1) / (Acc(1) + exp(-z));
}

template <Activation A, typename Acc>
__device__ __forceinline__ Acc act_fwd(Acc z) {
  if constexpr (A == Activation::kGelu) {
    // ½z·erfc(−z/√2) = z·Φ(z), without the 1 + erf cancellation for negative z.
    return Acc(0.5) * z * erfc(Acc(-0.7071067811865476) * z);
  } else if constexpr (A == Activation::kGeluTanh) {
    // ½(1 + tanh u) = σ(2u), u = √(2/π)(z + 0.044715 z³).
    return z * sigmoid(Acc(1.5957691216057308) * (z + Acc(0.044715) * z * z * z));
  } else if constexpr (A == Activation::kRelu) {
    return z < Acc(0) ? Acc(0) : z;
  } else if constexpr (A == Activation::kSilu) {
    return z * sigmoid(z);
  } else if constexpr (A == Activation::kRelu6) {
    return z < Acc(0) ? Acc(0) : (z > Acc(6) ? Acc(6) : z);
  } else if constexpr (A == Activation::kElu) {
    return z > Acc(0) ? z : expm1(z);
  } else if constexpr (A == Activation::kLeakyRelu) {
    return z > Acc(0) ? z : Acc(0.01) * z;
  } else if constexpr (A == Activation::kSelu) {
    return Acc(1.0507009873554805) * (z > Acc(0) ? z : Acc(1.6732632423543772) * expm1(z));
  } else if constexpr (A == Activation::kSigmoid) {
    return sigmoid(z);
  } else if constexpr (A == Activation::kTanh) {
    return tanh(z);
  } else if constexpr (A == Activation::kSoftplus) {
    return (z > Acc(0) ? z : Acc(0)) + log1p(exp(-fabs(z)));
  } else if constexpr (A == Activation::kSoftsign) {
    return z / (Acc(1) + fabs(z));
  } else if constexpr (A == Activation::kLogSigmoid) {
    return (z < Acc(0) ? z : Acc(0)) - log1p(exp(-fabs(z)));
  } else {
    return z;
  }
}

template <Activation A, typename Acc>
__device__ __forceinline__ Acc act_grad(Acc z) {
  if constexpr (A == Activation::kGelu) {
    return Acc(0.5) * erfc(Acc(-0.7071067811865476) * z) + z * Acc(0.3989422804014327) * exp(Acc(-0.5) * z * z);
  } else if constexpr (A == Activation::kGeluTanh) {
    // With s = σ(2u): f = z·s, f' = s + z·2s(1 − s)·u'. Beyond |z| = 1e6, f' is exactly 1 or 0,
    // but z³ and z² would overflow and make 0·inf = NaN: clamp (comparisons that keep NaN).
    const Acc zc = z > Acc(1e6) ? Acc(1e6) : (z < Acc(-1e6) ? Acc(-1e6) : z);
    const Acc s = sigmoid(Acc(1.5957691216057308) * (zc + Acc(0.044715) * zc * zc * zc));
    const Acc du = Acc(0.7978845608028654) * (Acc(1) + Acc(0.134145) * zc * zc);
    return s + Acc(2) * zc * s * (Acc(1) - s) * du;
  } else if constexpr (A == Activation::kRelu) {
    return z <= Acc(0) ? Acc(0) : Acc(1);
  } else if constexpr (A == Activation::kSilu) {
    const Acc s = sigmoid(z);
    return s * (Acc(1) + z * (Acc(1) - s));
  } else if constexpr (A == Activation::kRelu6) {
    return z <= Acc(0) || z >= Acc(6) ? Acc(0) : Acc(1);
  } else if constexpr (A == Activation::kElu) {
    return z <= Acc(0) ? exp(z) : Acc(1);
  } else if constexpr (A == Activation::kLeakyRelu) {
    return z > Acc(0) ? Acc(1) : Acc(0.01);
  } else if constexpr (A == Activation::kSelu) {
    return Acc(1.0507009873554805) * (z <= Acc(0) ? Acc(1.6732632423543772) * exp(z) : Acc(1));
  } else if constexpr (A == Activation::kSigmoid) {
    // σ(z)σ(−z) = e/(1 + e)², e = exp(−|z|): s(1 − s) would cancel where σ(z) rounds to 1.
    const Acc e = exp(-fabs(z));
    return e / ((Acc(1) + e) * (Acc(1) + e));
  } else if constexpr (A == Activation::kTanh) {
    // 1 − tanh² = 4e/(1 + e)², e = exp(−2|z|): accurate where tanh rounds to ±1.
    const Acc e = exp(Acc(-2) * fabs(z));
    return Acc(4) * e / ((Acc(1) + e) * (Acc(1) + e));
  } else if constexpr (A == Activation::kSoftplus) {
    return sigmoid(z);
  } else if constexpr (A == Activation::kSoftsign) {
    const Acc d = Acc(1) + fabs(z);
    return Acc(1) / (d * d);
  } else if constexpr (A == Activation::kLogSigmoid) {
    return sigmoid(-z);
  } else {
    return Acc(1);
  }
}

// A MatrixView the scaled-activation kernels can walk.
inline bool valid_view(const MatrixView& v) {
  return v.rows >= 0 && v.cols > 0 && v.channels > 0 && (!v.channel_on_rows || v.rows % v.channels == 0);
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime `act`: every activation is
// its own kernel instantiation, as ACT is a constexpr of the Triton kernels.
template <typename F>
cudaError_t with_activation(Activation act, F&& f) {
  switch (act) {
#define NFK_ACT_CASE(name) \
  case Activation::name: return f(std::integral_constant<Activation, Activation::name>{});
    NFK_ACT_CASE(kGelu)
    NFK_ACT_CASE(kGeluTanh)
    NFK_ACT_CASE(kRelu)
    NFK_ACT_CASE(kSilu)
    NFK_ACT_CASE(kRelu6)
    NFK_ACT_CASE(kElu)
    NFK_ACT_CASE(kLeakyRelu)
    NFK_ACT_CASE(kSelu)
    NFK_ACT_CASE(kSigmoid)
    NFK_ACT_CASE(kTanh)
    NFK_ACT_CASE(kSoftplus)
    NFK_ACT_CASE(kSoftsign)
    NFK_ACT_CASE(kLogSigmoid)
    NFK_ACT_CASE(kIdentity)
#undef NFK_ACT_CASE
  }
  return cudaErrorInvalidValue;
}

}  // namespace nfk
