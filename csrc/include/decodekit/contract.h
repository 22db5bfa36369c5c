// The contract between the CPU engine (csrc/cpu) and the CUDA kernels (csrc/cuda): everything a
// token depends on besides the inputs and the seed. Both paths include this header and take these
// definitions from here, so "the same tokens on CPU and GPU" is a property of the structure, not
// of constants kept equal by hand.
//
//  * Argument enums and structs: element dtype, filter order, filter output kind, speculative
//    target kind; a per-row parameter, the row filter, the input matrix and the arguments of the
//    sample / Gumbel-max and filter kernels (SampleArgs, FilterArgs), filled by the bindings and
//    read by both the CPU row engine and the CUDA kernels.
//  * Method sizes: the survivor set S is drawn by walking a list when |S| <= kListMax (and S lies in
//    the CPU's candidate list), else by the chunked inverse-CDF draw over kChunk-element chunks.
//  * Row keys: which Philox key / stream an output row draws from (row_rng_key).
//  * Canonical reduction order of a row mass (sum of float weights in double):
//      chunk c = elements [c * kChunk, min(V, (c + 1) * kChunk));
//      lane j of chunk c adds the elements i = c * kChunk + j (mod kLanes) in index order;
//      chunk_mass(c) = lane 0 + lane 1 + ... + lane kLanes-1 (in lane order);
//      the chunked draw's Z = chunk_mass(0) + chunk_mass(1) + ... (in chunk order, add_in_order).
//    Every (chunk, lane) partial sum is independent, so a GPU computes them all at once with
//    kLanes * num_chunks(V) threads (or CTAs) and only the two short ordered folds are serial.
//  * The draw from a short weight array (the list draw, the walk inside the chosen chunk, the
//    speculative residual's walk inside its chunk, the speculative list draws, the whole-step
//    pipeline's draw) is the 16-ary walk below (walk16_*), and the mass of a list is that walk's
//    total (walk16_total; the pipeline's list steps sum their masses and entropy terms so; their
//    top-p and typical cuts are mass selects, decodekit/pipeline.h ops.top_p / ops.low_cut). Top-p's
//    Z over the top-k survivors is the canonical row mass of the weights of x >= t_k (zero
//    elsewhere): the GPU sums it over the whole row at once, the CPU from its index-ordered
//    candidate list (sparse_mass: the same value, since adding +0.0 changes no partial sum).
//  * Rounding: IEEE round-to-nearest-even for every float / double operation; nothing is fused
//    unless written as an explicit fma (v_fma in fmath.h). The device code uses the _rn intrinsics
//    wherever the CPU rounds, so the result depends neither on -fmad nor on -prec-div. Fast math
//    is refused below where the compiler says so: GCC / Clang define __FAST_MATH__ under
//    -ffast-math, and __USE_FAST_MATH__ is tested for nvcc versions that define it. nvcc 13.0
//    defines no macro for --use_fast_math (checked by hand), so there the remaining risk is its
//    -ftz=true (subnormal weights flushed to zero): the build files never pass it.
#pragma once
#if defined(__USE_FAST_MATH__) || defined(__FAST_MATH__)
#error \
    "decodekit: do not build with --use_fast_math / -ffast-math: CPU and CUDA tokens are defined by IEEE rounding (decodekit/contract.h)"
#endif
#include <cstdint>
#include "decodekit/common.h"
#include "decodekit/philox.h"
#include "decodekit/rng.h"

namespace dk {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };
enum class FilterOrder : int { Sequential = 0, Joint = 1 };
enum class FilterOut : int { MaskLogits = 0, RenormProbs = 1, Softmax = 2 };
enum class SpecTargetKind : int { Probs = 0, Logits = 1, Ids = 2 };

#if defined(__CUDACC__)
#define DK_ARG_FN __host__ __device__ __forceinline__
#else
#define DK_ARG_FN
#endif

// A per-row parameter: a pointer to one value per OUTPUT row, or one scalar for every row.
template <class T>
struct Param {
  const T* ptr = nullptr;
  T scalar{};
  DK_ARG_FN T at(int64_t row) const { return ptr ? ptr[row] : scalar; }
};

// Rows are logits (weights exp((x - max) / T)) or probabilities (weights = x).
struct RowFilter {
  bool is_probs = false;
  Param<float> temperature;  // logits only; 0 => greedy (sampling); ignored for probs
  Param<int64_t> top_k;      // <= 0 or >= V disables
  Param<float> top_p;        // >= 1 disables
  Param<float> min_p;        // <= 0 disables
  FilterOrder order = FilterOrder::Sequential;
};

struct Matrix {
  const void* data = nullptr;  // [rows, V], contiguous in the last dim (host or device memory)
  DType dtype = DType::F32;
  int64_t rows = 0;
  int64_t V = 0;
  int64_t row_stride = 0;  // elements
};

// sample / sampling_from_* and gumbel_sample (CPU: row_engine.h; CUDA: sampling.cuh).
struct SampleArgs {
  Matrix in;
  RowFilter filter;
  const int64_t* indices = nullptr;  // output i reads source row indices[i] (nullptr: i)
  int64_t n_out = 0;
  // randomness (decodekit/rng.h row_rng_key)
  const int64_t* seeds = nullptr;  // per output row (already gathered) or nullptr
  uint64_t seed = 0;               // scalar seed (when seeds == nullptr)
  uint64_t offset = 0;
  const int64_t *seed_ptr = nullptr, *offsets = nullptr;  // seed / offsets in memory
  int64_t offset_stride = 0;
  // outputs (per output row)
  int64_t* out_tokens = nullptr;
  bool* out_valid = nullptr;
  float* out_logprob = nullptr;  // optional
  double* workspace = nullptr;   // CUDA only: sample_workspace_elems(plan) doubles (sampling.cuh)
};

// The filter outputs (top-k / top-p / min-p masks, renormalised probabilities, softmax).
struct FilterArgs {
  Matrix in;
  RowFilter filter;
  FilterOut kind = FilterOut::MaskLogits;
  void* out = nullptr;  // same dtype as in for MaskLogits; float32 otherwise
  int64_t out_stride = 0;
};

namespace contract {

constexpr int64_t kListMax = 2048;  // survivors drawn by walking a list when |S| <= this
constexpr int64_t kChunk = 4096;    // otherwise: chunked inverse-CDF draw over chunks of this size
constexpr int kLanes = 16;          // lanes of a chunk mass (the canonical reduction order above)
static_assert(kChunk % kLanes == 0, "a chunk is whole lanes");
// Smallest float min_p for which the CPU's min-p-alone candidate window test
// (-logf(min_p) + 0.25f <= 80) passes with glibc logf: bits 0x05f66f6f (~2.3e-35), found by
// bisection over float bit patterns (the test is monotone). The list-vs-chunk method choice for
// min-p alone uses this constant on the device instead of a device logf.
constexpr uint32_t kMinPWindowMinBits = 0x05f66f6fu;

DK_HOST_DEVICE int64_t num_chunks(int64_t V) { return (V + kChunk - 1) / kChunk; }

// The Philox key of output row `row` is rng.h's row_rng_key (seeds and offsets read from host
// or device memory): per-row seeds use stream 0 of their own key; a scalar seed gives every row
// its own stream.

// Lane j of chunk c of the canonical order: w(i) for i = c * kChunk + j, + kLanes, ... (< V),
// added in index order in double (IEEE round-to-nearest on the device too).
template <class W>
DK_HOST_DEVICE double chunk_lane_sum(int64_t V, int64_t c, int j, const W& w) {
  const int64_t end = (c + 1) * kChunk < V ? (c + 1) * kChunk : V;
  double s = 0.0;
  for (int64_t i = c * kChunk + j; i < end; i += kLanes) {
#if defined(__CUDA_ARCH__)
    s = __dadd_rn(s, double(w(i)));
#else
    s += double(w(i));
#endif
  }
  return s;
}

// Device loops that must stay loops (the walk's sums: unrolled, they tie up registers that the
// kernels calling them need elsewhere).
#if defined(__CUDA_ARCH__)
#define DK_LOOP_NO_UNROLL _Pragma("unroll 1")
#else
#define DK_LOOP_NO_UNROLL
#endif

// IEEE round-to-nearest double addition (the explicit intrinsic on the device).
DK_HOST_DEVICE double dadd_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// a[0] + a[1] + ... + a[n-1], left to right (the chunk-order fold of the canonical order).
template <class A>
DK_HOST_DEVICE double add_in_order(const A* a, int64_t n) {
  double z = 0.0;
  DK_LOOP_NO_UNROLL
  for (int64_t i = 0; i < n; ++i) z = dadd_rn(z, double(a[i]));
  return z;
}

// The canonical mass (above) of the weights w[q] at indices idx[q] (strictly increasing) for the
// q with keep(q), all other elements weighing 0: equal to the dense sum, since every omitted term
// is +0.0 and adding +0.0 to a non-negative partial sum changes nothing (the weights are >= 0).
// The CPU's form for a sparse set (top-p's Z over the top-k survivors in its candidate list).
template <class Idx, class Keep>
DK_HOST_DEVICE double sparse_mass(const Idx* idx, const float* w, int64_t n, const Keep& keep) {
  double z = 0.0, lane[kLanes];
  int64_t cur = -1;  // the chunk being summed
  const auto fold = [&]() {
    double m = 0.0;
    for (int j = 0; j < kLanes; ++j) m = dadd_rn(m, lane[j]);
    z = dadd_rn(z, m);
  };
  for (int64_t q = 0; q < n; ++q) {
    if (!keep(q)) continue;
    const int64_t i = int64_t(idx[q]), c = i / kChunk;
    if (c != cur) {
      if (cur >= 0) fold();
      for (int j = 0; j < kLanes; ++j) lane[j] = 0.0;
      cur = c;
    }
    lane[i % kLanes] = dadd_rn(lane[i % kLanes], double(w[q]));
  }
  if (cur >= 0) fold();
  return z;
}

// ---- the canonical draw from a short weight array (the 16-ary walk) -------------------------
// A draw from n float weights e[0..n) (>= 0; the kept weights of one chunk of the chunked draw,
// or the survivor list of the list draw: n <= kWalkMax, the size of the sampling kernels' fixed
// sum arrays; the whole-step pipeline walks lists of any length, with ceil(n/256) top-level
// steps) by a target t: the first index where the running mass exceeds t. The running mass is
// defined on a 3-level tree of fan-out 16, so that a GPU computes every sum at once and walks at
// most 3 x 16 steps (for n <= 4096):
//   g16[j]  = e[16j] + ... + e[16j+15]          (in index order, within [0, n))  j < ceil(n/16)
//   g256[b] = g16[16b] + ... + g16[16b+15]      (in order)                       b < ceil(n/256)
//   total   = g256[0] + g256[1] + ...           (in order: the list draw's Z)
// walk16_pick: skip whole 256-blocks while acc + g256[b] <= t (acc += g256[b]), then whole
// 16-groups of that block the same way, then the elements of that group; at each level the first
// entry where acc + mass > t is entered. If no 256-block is entered (rounding leaves the total at
// or below t), the last element of positive weight is taken; a block or group that is entered
// holds positive mass (its mass > t - acc >= 0), and if rounding lets no entry inside it cross,
// its last element of positive weight is taken. Returns -1 only when no weight is positive.
constexpr int64_t kWalkMax = 4096;
static_assert(kChunk <= kWalkMax && kListMax <= kWalkMax, "one walk covers a chunk or a list");
DK_HOST_DEVICE int64_t walk16_groups(int64_t n) { return (n + 15) / 16; }

// The walk's element accessors: an array, or a functor e(i) (the whole-step kernel's split draw
// reads its list through the slices it was collected in).
template <class E>
struct Walk16Array {
  const E* e;
  DK_HOST_DEVICE_SPEC E operator()(int64_t i) const { return e[i]; }
};

// g16 of group j (the partial last group stops at n) of the elements e(i). E: float weights, or
// double terms (the pipeline's entropy sums use the same tree).
template <class EF>
DK_HOST_DEVICE double walk16_group_at(const EF& e, int64_t n, int64_t j) {
  const int64_t end = 16 * j + 16 < n ? 16 * j + 16 : n;
  double z = 0.0;
  DK_LOOP_NO_UNROLL
  for (int64_t i = 16 * j; i < end; ++i) z = dadd_rn(z, double(e(i)));
  return z;
}
template <class E>
DK_HOST_DEVICE double walk16_group(const E* e, int64_t n, int64_t j) {
  return walk16_group_at(Walk16Array<E>{e}, n, j);
}

// The last index of [lo, hi) with positive weight, -1 if none.
template <class EF>
DK_HOST_DEVICE int64_t walk16_last_positive_at(const EF& e, int64_t lo, int64_t hi) {
  for (int64_t i = hi - 1; i >= lo; --i)
    if (e(i) > 0) return i;
  return -1;
}
template <class E>
DK_HOST_DEVICE int64_t walk16_last_positive(const E* e, int64_t lo, int64_t hi) {
  return walk16_last_positive_at(Walk16Array<E>{e}, lo, hi);
}

// g256 of block b, from the groups (the same sums as walk16_sums; for callers that keep no g16).
template <class E>
DK_HOST_DEVICE double walk16_block(const E* e, int64_t n, int64_t b) {
  const int64_t ng = walk16_groups(n), gend = 16 * b + 16 < ng ? 16 * b + 16 : ng;
  double z = 0.0;
  DK_LOOP_NO_UNROLL
  for (int64_t j = 16 * b; j < gend; ++j) z = dadd_rn(z, walk16_group(e, n, j));
  return z;
}

// The pick over the float weights e(i), given g256[0..ceil(n/256)) and the group sums g16(j) (a
// functor: a stored array, or walk16_group computed when asked) as defined above.
template <class EF, class G16>
DK_HOST_DEVICE int64_t walk16_pick_at(const EF& e, int64_t n, const G16& g16, const double* g256, double t) {
  const int64_t ng = walk16_groups(n), nb = (ng + 15) / 16;
  double acc = 0.0;
  int64_t b = 0;
  for (; b < nb; ++b) {
    if (dadd_rn(acc, g256[b]) > t) break;
    acc = dadd_rn(acc, g256[b]);
  }
  if (b == nb) return walk16_last_positive_at(e, 0, n);
  const int64_t gend = 16 * b + 16 < ng ? 16 * b + 16 : ng;
  int64_t j = 16 * b;
  for (; j < gend; ++j) {
    const double g = g16(j);
    if (dadd_rn(acc, g) > t) break;
    acc = dadd_rn(acc, g);
  }
  if (j == gend) return walk16_last_positive_at(e, 256 * b, 256 * b + 256 < n ? 256 * b + 256 : n);
  const int64_t iend = 16 * j + 16 < n ? 16 * j + 16 : n;
  for (int64_t i = 16 * j; i < iend; ++i) {
    const float x = e(i);
    if (!(x > 0.f)) continue;  // adding +0 never crosses
    acc = dadd_rn(acc, double(x));
    if (acc > t) return i;
  }
  return walk16_last_positive_at(e, 16 * j, iend);
}
template <class G16>
DK_HOST_DEVICE int64_t walk16_pick_by(const float* e, int64_t n, const G16& g16, const double* g256, double t) {
  return walk16_pick_at(Walk16Array<float>{e}, n, g16, g256, t);
}

DK_HOST_DEVICE int64_t walk16_pick(const float* e, int64_t n, const double* g16, const double* g256, double t) {
  return walk16_pick_by(e, n, [g16](int64_t j) { return g16[j]; }, g256, t);
}

// Serial form (the CPU; also the reference for the device's parallel one): fills g16 / g256 and
// returns the total.
template <class E>
DK_HOST_DEVICE double walk16_sums(const E* e, int64_t n, double* g16, double* g256) {
  const int64_t ng = walk16_groups(n), nb = (ng + 15) / 16;
  for (int64_t j = 0; j < ng; ++j) g16[j] = walk16_group(e, n, j);
  for (int64_t b = 0; b < nb; ++b) g256[b] = add_in_order(g16 + 16 * b, (16 * b + 16 < ng ? 16 * b + 16 : ng) - 16 * b);
  return add_in_order(g256, nb);
}

// The list draw: the walk's sums over e[0..n) (n <= kWalkMax; the total in *total), then the pick at
// u * total; -1 when no weight is positive. (The CPU's list draws; the GPU computes the same sums
// on many threads and picks on one.)
DK_HOST_DEVICE int64_t walk16_draw(const float* e, int64_t n, double u, double* g16, double* g256, double* total) {
  *total = walk16_sums(e, n, g16, g256);
  return walk16_pick(e, n, g16, g256, u * *total);
}

// The walk's total (walk16_sums' return value) without storing the group sums: the contract's mass
// of a short list (a speculative node's Z over its survivor list, a listed residual's mass).
template <class E>
DK_HOST_DEVICE double walk16_total(const E* e, int64_t n) {
  const int64_t nb = (walk16_groups(n) + 15) / 16;
  double z = 0.0;
  DK_LOOP_NO_UNROLL
  for (int64_t b = 0; b < nb; ++b) z = dadd_rn(z, walk16_block(e, n, b));
  return z;
}

}  // namespace contract
}  // namespace dk
