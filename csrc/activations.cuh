// The activations f and their derivatives f' of the scaled-activation kernels, in the
// accumulation type (float, double for fp64). Formulas: nfkernels/ops/scaled_act.py's docstring
// and its _act_fwd / _act_grad (same stable forms; CUDA's own expm1, log1p, tanh, erfc are
// accurate, so no hand-built versions are needed). Kinks follow torch: f'(0) = 0 for relu and
// relu6 (and f'(6) = 0), the z ≤ 0 branch elsewhere. So does NaN: every comparison below is
// written the way torch's own kernels write it, so that NaN (for which it is false) gives
// f(NaN) = NaN and torch's f'(NaN) (1 for relu, relu6, elu; λ for selu; 0.01 for leaky_relu).
#pragma once

#include <algorithm>
#include <initializer_list>
#include <type_traits>

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

// ---------------------------------------------------------------------------------------------
// The work split of the scaled-activation kernels (the view of scaled_act.py's _plan, with a
// thread walk instead of its power-of-two tiles). The tensor is (n, c, hw) with channels on dim
// 1: NCHW is (N, C, H·W) (channel_on_rows), channels-last and (N, C) are (pixels, C, 1). Rows are
// V-element vectors; a block covers `block_channels` channels and one group of their rows, and
// every thread keeps the same channels throughout, so its sums of dx need no per-row reduction:
//   channel_on_rows: a channel's positions are its rows' vectors in (n, vector) order; slot = a
//                    channel of the block, `lanes` consecutive threads per slot;
//   otherwise:       a position is a pixel row; slot = V consecutive channels (one vector),
//                    `lanes` rows at a time.
// Each thread of a slot walks positions lane, lane + lanes, ... of its group: no lane idles on
// padding whatever H·W is (H·W = 36 is 9 vectors of 4 bf16, walked by 64 threads per channel).

// Blocks the launchers aim for (4 per SM of an H100; a constant, so that the workspace query
// needs no device): fewer leave the memory system idle. A backward that splits a channel block
// over several blocks (groups) pays for it with a counter memset and the last block's finish, so
// it splits only blocks of at least kActSplitMinElems elements and only while under half the
// target (channel_on_rows: see make_act_plan).
constexpr int64_t kActTargetBlocks = 4 * 132;
constexpr int64_t kActSplitMinElems = 16384;
constexpr int64_t kActMaxBlockChannels = 64;  // channels-last: channels per block (scaled_act.py MAX_BLOCK_C)
constexpr int kActMinSegmentBytes = 32;       // narrower column blocks read part of a sector per row
constexpr double kActEnoughFill = 0.35;       // of kActTargetBlocks: more is not worth splitting a reduction

struct ActPlan {
  int64_t n, c, hw;
  bool channel_on_rows;
  bool vector;             // every access a whole aligned V-element vector (else element by element,
                           // each vector masked to its row)
  int64_t row_vectors;     // vectors per (n, c) row with channels on rows, else 1
  int slots, lanes;        // slots per block, threads per slot (slots·lanes = kThreads)
  int64_t block_channels;  // channels per block: slots, or slots·V
  int64_t channel_blocks;  // gridDim.x
  int64_t groups;          // gridDim.y: a group is rows_per_group samples (pixels) of a channel block
  int64_t rows_per_group;
  int64_t step_n, step_k;  // a thread's step of `lanes` positions: step_n rows and step_k vectors
};

// Groups per channel block (see kActTargetBlocks), at most `max_groups`.
inline int64_t act_groups(int64_t channel_blocks, int64_t max_groups, int64_t block_elems, bool reduces) {
  if (reduces && (2 * channel_blocks >= kActTargetBlocks || block_elems < kActSplitMinElems)) return 1;
  const int64_t want = ceil_div(kActTargetBlocks, channel_blocks);
  return max_groups < want ? (max_groups > 0 ? max_groups : 1) : want;
}

// Fills the grid fields for `slots` slots and at most `groups` groups; returns the fraction of
// thread steps that do useful work (a group's last step leaves lanes idle, so do slots past the
// last channel).
inline double act_split(ActPlan& p, int slots, int vec, int64_t groups) {
  p.slots = slots;
  p.lanes = kThreads / slots;
  p.block_channels = p.channel_on_rows ? slots : static_cast<int64_t>(slots) * vec;
  p.channel_blocks = ceil_div(p.c, p.block_channels);
  p.rows_per_group = p.n > 0 ? ceil_div(p.n, groups) : 1;
  if (!p.channel_on_rows) p.rows_per_group = ceil_div(p.rows_per_group, p.lanes) * p.lanes;
  p.groups = p.n > 0 ? ceil_div(p.n, p.rows_per_group) : 1;
  p.step_n = p.lanes / p.row_vectors;
  p.step_k = p.lanes % p.row_vectors;
  const int64_t steps = ceil_div(p.rows_per_group * p.row_vectors, p.lanes);
  const double issued = static_cast<double>(p.channel_blocks * p.block_channels) * p.groups * steps * p.lanes;
  return issued > 0 ? static_cast<double>(p.c) * p.n * p.row_vectors / issued : 1.0;
}

// The plan for V-element vectors (`vector`: every row a whole number of aligned vectors) of
// `esize`-byte elements; `reduces` for a backward that sums dbias. Channels-last blocks are C's
// largest power-of-two divisor wide unless that is under a 32-byte sector (then C rounded up to a
// power of two), at most kActMaxBlockChannels, and split over pixel rows, at least `lanes` per
// group. With channels on rows, rows are split over samples, and the slots (1 to 32 channels per
// block) and groups are those that keep at least 90% of the thread steps useful, then give the
// most blocks up to kActEnoughFill of kActTargetBlocks, then leave a reduction unsplit (its
// finish costs a memset and a dependent tail), then give the most blocks, then are the most useful.
inline ActPlan make_act_plan(const MatrixView& v, int vec, bool vector, int esize, bool reduces) {
  ActPlan p{};
  p.channel_on_rows = v.channel_on_rows;
  p.c = v.channels;
  p.n = v.channel_on_rows ? v.rows / v.channels : v.rows;
  p.hw = v.channel_on_rows ? v.cols : 1;
  p.vector = vector;
  if (!v.channel_on_rows) {
    p.row_vectors = 1;
    const int64_t divisor = p.c & -p.c;
    int64_t cols = divisor * esize >= kActMinSegmentBytes || divisor == p.c ? divisor : next_power_of_2(p.c);
    if (cols > kActMaxBlockChannels) cols = kActMaxBlockChannels;
    const int slots = cols > vec ? static_cast<int>(cols / vec) : 1;
    act_split(p, slots, vec, 1);
    const int64_t groups = act_groups(p.channel_blocks, ceil_div(p.n, p.lanes), p.n * p.block_channels, reduces);
    act_split(p, slots, vec, groups);
    return p;
  }
  p.row_vectors = ceil_div(p.hw, vec);
  int best_slots = 1;
  int64_t best_groups = 1;
  bool best_good = false, best_whole = false;
  double best_busy = -1, best_fill = -1;
  for (int slots = 1; slots <= 32; slots *= 2) {
    act_split(p, slots, vec, 1);
    const int64_t most = act_groups(p.channel_blocks, p.n, p.n * p.block_channels * p.hw, reduces);
    for (int64_t groups = 1; groups <= most; ++groups) {
      const double busy = act_split(p, slots, vec, groups);
      const double blocks = static_cast<double>(p.channel_blocks * p.groups);
      const double fill = blocks < kActTargetBlocks ? blocks / kActTargetBlocks : 1.0;
      const bool good = busy >= 0.9, whole = !reduces || p.groups == 1;
      bool better;
      if (good != best_good) {
        better = good;
      } else if (!good) {
        better = busy * fill > best_busy * best_fill + 1e-9;
      } else if (std::min(fill, kActEnoughFill) != std::min(best_fill, kActEnoughFill)) {
        better = fill > best_fill;
      } else if (whole != best_whole) {
        better = whole;
      } else if (fill != best_fill) {
        better = fill > best_fill;
      } else {
        better = busy > best_busy;
      }
      if (better) {
        best_slots = slots;
        best_groups = groups;
        best_good = good;
        best_whole = whole;
        best_busy = busy;
        best_fill = fill;
      }
    }
  }
  act_split(p, best_slots, vec, best_groups);
  return p;
}

// Calls f(std::integral_constant<int, V>{}, vector) with the vector width for `view`'s rows: the
// 16-byte width when rows (H·W, or C) are a multiple of it and the operands aligned; for 16-bit
// types else the 8-byte width (H·W = 36 bf16: 9 vectors of 4) where that fits; else the 16-byte
// width element by element (vector = false).
template <typename T, typename F>
cudaError_t with_vector_width(const MatrixView& view, std::initializer_list<const void*> operands, F&& f) {
  constexpr int V = vec_width<T>();
  const int64_t row = view.channel_on_rows ? view.cols : view.channels;
  bool full = row % V == 0, half = row % (V / 2 > 0 ? V / 2 : 1) == 0;
  for (const void* p : operands) {
    full = full && pack_aligned<T, V>(p);
    if constexpr (V > 1) half = half && pack_aligned<T, V / 2>(p);
  }
  if (full) return f(std::integral_constant<int, V>{}, true);
  if constexpr (sizeof(T) == 2) {
    if (half) return f(std::integral_constant<int, V / 2>{}, true);
  }
  return f(std::integral_constant<int, V>{}, false);
}

// One thread's channels and walk (see ActPlan): thread t of the block for channel block `block`
// (blockIdx.x) and group `group` (blockIdx.y) has a slot and a lane, and walks the vectors at
// positions lane, lane + lanes, ... of the group's rows, a position being (row n, vector k).
// No 64-bit division: ptxas calls a subroutine for it, whose calling convention spilled
// registers. Host code can walk it too (tests of the split).
struct ActThread {
  int slot, lane;
  int64_t channel;                    // its channel, or its first of V channels (channels-last)
  int64_t base, row_stride, row_end;  // vector (n, k) starts at n·row_stride + base + k·V; its row
                                      // ends at n·row_stride + row_end
  int64_t n, n_end, k;

  __host__ __device__ ActThread(const ActPlan& p, int vec, int t, int64_t block, int64_t group) {
    slot = p.channel_on_rows ? t / p.lanes : t % p.slots;
    lane = p.channel_on_rows ? t % p.lanes : t / p.slots;
    channel = block * p.block_channels + (p.channel_on_rows ? slot : slot * vec);
    base = p.channel_on_rows ? channel * p.hw : channel;
    row_stride = p.c * p.hw;
    row_end = p.channel_on_rows ? base + p.hw : p.c;
    const int64_t first = group * p.rows_per_group;
    n_end = first + p.rows_per_group < p.n ? first + p.rows_per_group : p.n;
    if (channel >= p.c) n_end = 0;  // a slot past the last channel idles
    const bool long_rows = p.row_vectors > lane;  // else lane < kThreads: a 32-bit division
    n = first + (long_rows ? 0 : lane / static_cast<int>(p.row_vectors));
    k = long_rows ? lane : lane % static_cast<int>(p.row_vectors);
  }

  __host__ __device__ bool more() const { return n < n_end; }
  __host__ __device__ int64_t start(int vec) const { return n * row_stride + base + k * vec; }
  __host__ __device__ int64_t stop() const { return n * row_stride + row_end; }
  __host__ __device__ void next(const ActPlan& p) {
    n += p.step_n;
    k += p.step_k;
    if (k >= p.row_vectors) {
      k -= p.row_vectors;
      ++n;
    }
  }
};

// Positions per iteration of a thread's walk: two, so that the next position's loads are in
// flight during the math; one for fp64, whose calls (division, erf) would spill around.
template <typename T>
constexpr int kWalkUnroll = sizeof(T) == 8 ? 1 : 2;

// The bias of each of a thread's V elements (0 without bias): its channel's, or V channels'.
template <int V, typename T, typename Acc>
__device__ __forceinline__ void load_channel_bias(ParamPtr<T> bias, const ActPlan& p, int64_t channel, Acc (&b)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const int64_t c = p.channel_on_rows ? channel : channel + e;
    b[e] = bias.data != nullptr && c < p.c ? bias.template load<Acc>(c) : Acc(0);
  }
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
