// Tensor-core tree attention for bf16 / fp16 (torch-free; compiles with plain nvcc for sm_80 / sm_90,
// see .ci/cuda_compile.sh). Same semantics as csrc/cuda/attention.cuh's CUDA-core kernel, which
// stays the path for fp32, head dims 80 / 96 and inputs whose rows are not 16-byte aligned;
// launch_tree_attention_auto below picks the path.
//
// Design (FlashAttention-2 style, one warp = 16 query rows):
// - A thread block (4 warps) takes kBM = 64 consecutive rows of the packed M = T x G query rows of
//   one (batch b, kv head h): row r is tree query t = r / G of q head h * G + r % G (GQA packing),
//   so every K/V block read into shared memory serves all G query heads sharing the kv head.
// - Keys come in blocks of kBN (64; 32 for D = 256, for shared memory): the dense prefix
//   [0, P) first, then ceil(T / kBN) tree blocks at [P, P + T). Only the tree blocks read the packed
//   T x T mask; a prefix block masks nothing but its end.
// - K / V blocks stream into a kStages-deep ring of shared-memory buffers with cp.async (16 bytes a
//   copy, zero-filled past the segment end), one commit group per block, wait_group kStages - 2.
// - S = Q K^T and O += P V with mma.sync m16n8k16 (bf16 / fp16 in, fp32 accumulate); Q, K and
//   V^T fragments come from shared memory by ldmatrix (.x4, .trans for V); the S accumulators of
//   two adjacent 8-key tiles are the A fragment of P for the next mma (no shared-memory trip).
// - Online softmax in registers in base 2: each lane owns rows lane/4 and lane/4 + 8 of its warp's
//   16, reduces a row over the 4 lanes of a quad with two xor shuffles.
// - Split-KV: with few blocks (B x Hkv x row tiles small) the prefix is cut into `splits` chunks of
//   `chunk` keys, one block each (split 0 also takes the tree keys); each writes a normalised
//   partial (o, lse) in fp32 and merge_states_kernel combines them exactly:
//   lse = log sum_j exp(lse_j), o = sum_j exp(lse_j - lse) o_j. The rule is attn_mma::plan().
// Every PTX operation goes through the intrinsic layer (namespace mma_ops): inline asm on the
// device, and the lane-by-lane CPU versions of tests/cuda_emu/emu_mma.h under DK_CUDA_EMULATE.
#pragma once
#include "cuda/attention.cuh"

namespace dk::cuda {

// ---- intrinsic layer ------------------------------------------------------------------------------
namespace mma_ops {
#if !defined(DK_CUDA_EMULATE)
DK_DEVICE uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }
// ldmatrix .x4: lanes 8j .. 8j + 7 give the row addresses of 8x8 matrix j; r[j] = this lane's pair.
DK_DEVICE void ldmatrix_x4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
DK_DEVICE void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// d += A (16x16, row) * B (16x8, col), fp32 accumulators; TYPE is "bf16" or "f16".
#define DK_MMA_16816(STORAGE, TYPE)                                                         \
  DK_DEVICE void mma_16816(STORAGE, float d[4], const uint32_t a[4], const uint32_t b[2]) { \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                     \
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"   \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                           \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));       \
  }
DK_MMA_16816(bf16_t, "bf16")
DK_MMA_16816(f16_t, "f16")
#undef DK_MMA_16816
// 16-byte global -> shared copy; valid = false zero-fills the destination and reads nothing.
DK_DEVICE void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
DK_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
DK_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// Two floats -> packed 16-bit pair (lo in the low half), round to nearest even.
DK_DEVICE uint32_t pack2(bf16_t, float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
DK_DEVICE uint32_t pack2(f16_t, float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
#else
// tests/cuda_emu/emu_mma.h (included before this header) provides the dkemu::mma functions.
DK_DEVICE void ldmatrix_x4(uint32_t r[4], const void* p) { dkemu::mma::ldmatrix(r, p, 4, false); }
DK_DEVICE void ldmatrix_x4_trans(uint32_t r[4], const void* p) { dkemu::mma::ldmatrix(r, p, 4, true); }
template <class T>
DK_DEVICE void mma_16816(T, float d[4], const uint32_t a[4], const uint32_t b[2]) {
  dkemu::mma::mma_m16n8k16(std::is_same_v<T, f16_t>, d, a, b);
}
DK_DEVICE void cp_async_16(void* smem, const void* gmem, bool valid) { dkemu::mma::cp_async_16(smem, gmem, valid); }
DK_DEVICE void cp_async_commit() { dkemu::mma::cp_async_commit(); }
template <int N>
DK_DEVICE void cp_async_wait() {
  dkemu::mma::cp_async_wait(N);
}
DK_DEVICE uint32_t pack2(bf16_t, float lo, float hi) { return uint32_t(bf16_bits(lo)) | uint32_t(bf16_bits(hi)) << 16; }
DK_DEVICE uint32_t pack2(f16_t, float lo, float hi) {
  f16_t a, b;
  attn::store_val(&a, lo);
  attn::store_val(&b, hi);
  return uint32_t(a.x) | uint32_t(b.x) << 16;
}
#endif
}  // namespace mma_ops

// ---- kernel ---------------------------------------------------------------------------------------
struct MmaAttnArgs : TreeAttnArgs {
  int splits = 1;             // key-range splits of the prefix (1: no split, out / lse written directly)
  int64_t chunk = 0;          // prefix keys per split (a multiple of the key block)
  float* part_o = nullptr;    // splits > 1: [splits][B*T*Hq][D] normalised partial outputs
  float* part_lse = nullptr;  // splits > 1: [splits][B*T*Hq]
};

namespace attn_mma {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBM = 16 * kWarps;  // query rows per block

template <int D>
struct Cfg {
  static_assert(D == 64 || D == 128 || D == 256, "tensor-core head dims: 64, 128, 256");
  static constexpr int kBN = D == 256 ? 32 : 64;  // keys per block
  static constexpr int kStages = 3;               // cp.async ring depth
  // Shared row stride in elements: +16 bytes, so the 8 rows of an ldmatrix hit 8 different bank quads.
  static constexpr int kLd = D + 8;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr size_t kQElems = size_t(kBM) * kLd, kKvElems = size_t(kBN) * kLd;
  static constexpr size_t kSmemBytes = (kQElems + 2 * kStages * kKvElems) * 2;
};

constexpr int64_t kKeyBlockMax = 64;
constexpr int64_t kTargetBlocks = 132;  // about one wave on an H100 SXM (132 SMs; A100: 108)
constexpr int64_t kMinChunk = 256;      // prefix keys per split at least
constexpr int kMaxSplits = 32;

DK_HOST_DEVICE int64_t row_tiles(const TreeAttnArgs& p) { return (p.T * (p.Hq / p.Hkv) + kBM - 1) / kBM; }

// Split rule (host, from sizes only: no device value is read). base = B * Hkv * row tiles blocks;
// when base < kTargetBlocks and the longest possible prefix S - T has more than 2 * kMinChunk keys,
// splits = min(ceil(kTargetBlocks / base), floor((S - T) / kMinChunk), kMaxSplits); chunk =
// ceil((S - T) / splits) rounded up to 64 keys. force > 0 overrides the count (tests); either way
// the count is then cut to ceil((S - T) / chunk), so no split is empty for the longest prefix.
inline void plan(MmaAttnArgs& a, int force = 0) {
  const int64_t base = a.B * a.Hkv * row_tiles(a), pmax = a.S - a.T;
  int64_t s = 1;
  if (force > 0) {
    s = force;
  } else if (base < kTargetBlocks && pmax > 2 * kMinChunk) {
    s = (kTargetBlocks + base - 1) / base;
    if (s > pmax / kMinChunk) s = pmax / kMinChunk;
    if (s > kMaxSplits) s = kMaxSplits;
  }
  if (pmax <= 0) s = 1;
  int64_t chunk = s > 1 ? (pmax + s - 1) / s : pmax;
  chunk = (chunk + kKeyBlockMax - 1) / kKeyBlockMax * kKeyBlockMax;
  if (chunk <= 0) chunk = kKeyBlockMax;
  if (s > 1) s = (pmax + chunk - 1) / chunk;  // no split left empty for the longest prefix
  a.splits = int(s < 1 ? 1 : s);
  a.chunk = chunk;
}

DK_HOST_DEVICE int64_t num_blocks(const MmaAttnArgs& a) { return a.B * a.Hkv * row_tiles(a) * a.splits; }

// Every loop over a register array is unrolled (#pragma unroll), or the array goes to local memory.
// __launch_bounds__(kThreads, 1) (at least one resident block per SM, the 255-register cap
// unchanged): without the minimum, ptxas 13.0 for sm_90 kept the bf16 D = 64 instance at 168
// registers with a 32-byte spill; with it, 184 registers and no spill (nvcc 13.0, -O3).
template <class T, int D>
__global__ void __launch_bounds__(kThreads, 1) tree_attention_mma_kernel(MmaAttnArgs p) {
  using C = Cfg<D>;
  constexpr int kBN = C::kBN, kLd = C::kLd, kStages = C::kStages;
#if defined(DK_CUDA_EMULATE)
  alignas(16) static uint16_t smem_raw[C::kSmemBytes / 2];
  T* const qs = reinterpret_cast<T*>(smem_raw);
#else
  extern __shared__ float4 smem_mma[];
  T* const qs = reinterpret_cast<T*>(smem_mma);
#endif
  T* const ks = qs + C::kQElems;             // [kStages][kBN][kLd]
  T* const vs = ks + kStages * C::kKvElems;  // [kStages][kBN][kLd]
  const int64_t G = p.Hq / p.Hkv, M = p.T * G, tiles = row_tiles(p);
  int64_t blk = blockIdx.x;
  const int64_t row0 = (blk % tiles) * kBM;
  blk /= tiles;
  const int64_t group = blk % (p.B * p.Hkv);
  const int split = int(blk / (p.B * p.Hkv));
  const int64_t b = group / p.Hkv, h = group % p.Hkv;
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int64_t P = p.prefix_lens[b];
  const float c = p.sm_scale * 1.4426950408889634f;  // scores in base 2
  const T* const q = static_cast<const T*>(p.q) + b * p.q_sb;
  const T* const kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* const vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;

  // This block's keys: prefix [p_lo, p_hi) in n_pre blocks, then (split 0) the n_tree tree blocks.
  const int64_t p_lo = p.splits > 1 ? split * p.chunk : 0;
  const int64_t p_hi = p.splits > 1 ? (p_lo + p.chunk < P ? p_lo + p.chunk : P) : P;
  const int64_t n_pre = p_hi > p_lo ? (p_hi - p_lo + kBN - 1) / kBN : 0;
  const int64_t n_blocks = n_pre + (split == 0 ? (p.T + kBN - 1) / kBN : 0);

  auto load_kv = [&](int64_t i) {
    const bool tree = i >= n_pre;
    const int64_t s0 = tree ? P + (i - n_pre) * kBN : p_lo + i * kBN, s_end = tree ? P + p.T : p_hi;
    T* const kd = ks + (i % kStages) * C::kKvElems;
    T* const vd = vs + (i % kStages) * C::kKvElems;
    for (int e = tid; e < kBN * C::kChunks; e += kThreads) {
      const int n = e / C::kChunks, ch = e % C::kChunks;
      const int64_t s = s0 + n;
      const bool ok = s < s_end;
      const int64_t off = (ok ? s : 0) * p.k_ss + ch * 8, voff = (ok ? s : 0) * p.v_ss + ch * 8;
      mma_ops::cp_async_16(kd + n * kLd + ch * 8, kg + off, ok);
      mma_ops::cp_async_16(vd + n * kLd + ch * 8, vg + voff, ok);
    }
  };

  // Group 0: the Q rows (zero past M) and key block 0; groups 1 .. kStages - 2: blocks 1 ...
  for (int e = tid; e < kBM * C::kChunks; e += kThreads) {
    const int r = e / C::kChunks, ch = e % C::kChunks;
    const int64_t gr = row0 + r;
    const bool ok = gr < M;
    const int64_t off = ok ? (gr / G) * p.q_st + (h * G + gr % G) * p.q_sh + ch * 8 : 0;
    mma_ops::cp_async_16(qs + r * kLd + ch * 8, q + off, ok);
  }
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < n_blocks) load_kv(st);
    mma_ops::cp_async_commit();
  }

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) o[i][j] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int64_t wrow0 = row0 + 16 * warp;  // this warp's first row
  const bool active = wrow0 < M;           // warp-uniform
  const int quad = lane / 4, qi = lane % 4;

  for (int64_t i = 0; i < n_blocks; ++i) {
    mma_ops::cp_async_wait<kStages - 2>();  // block i (group i) has landed for this thread ...
    __syncthreads();                        // ... and for all; block i - 1's buffer is free
    if (i + kStages - 1 < n_blocks) load_kv(i + kStages - 1);
    mma_ops::cp_async_commit();
    if (!active) continue;
    const bool tree = i >= n_pre;
    const int64_t s0 = tree ? P + (i - n_pre) * kBN : p_lo + i * kBN, s_end = tree ? P + p.T : p_hi;
    const T* const kb = ks + (i % kStages) * C::kKvElems;
    const T* const vb = vs + (i % kStages) * C::kKvElems;

    // S = Q K^T: 16 rows x kBN keys, kBN / 8 accumulator tiles.
    float s[kBN / 8][4];
#pragma unroll
    for (int n = 0; n < kBN / 8; ++n)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[n][j] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      mma_ops::ldmatrix_x4(a, qs + (16 * warp + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int n = 0; n < kBN / 8; n += 2) {
        uint32_t kb4[4];  // B fragments of key tiles n (regs 0, 1) and n + 1 (regs 2, 3)
        mma_ops::ldmatrix_x4(kb4, kb + (n * 8 + (lane / 16) * 8 + lane % 8) * kLd + kk * 16 + ((lane / 8) % 2) * 8);
        mma_ops::mma_16816(T{}, s[n], a, kb4);
        mma_ops::mma_16816(T{}, s[n + 1], a, kb4 + 2);
      }
    }
    // Scale and mask (element j of tile n: row quad + 8 (j / 2), key s0 + 8 n + 2 qi + j % 2).
#pragma unroll
    for (int n = 0; n < kBN / 8; ++n)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t key = s0 + 8 * n + 2 * qi + (j & 1);
        bool ok = key < s_end;
        if (tree && ok) {
          const int64_t r = wrow0 + quad + 8 * (j >> 1);
          if (r < M) {
            const int64_t t = r / G, jj = key - P;
            const uint8_t* mr = p.mask + b * p.mask_sb + t * p.mask_st;
            ok = p.mask_packed ? ((mr[jj >> 3] >> (jj & 7)) & 1) != 0 : mr[jj] != 0;
          } else {
            ok = false;
          }
        }
        s[n][j] = ok ? s[n][j] * c : -INFINITY;
      }
    // Online softmax for rows quad (r = 0: elements 0, 1) and quad + 8 (r = 1: elements 2, 3).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < kBN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, attn::shfl_xor(mx, 1));
      mx = fmaxf(mx, attn::shfl_xor(mx, 2));
      const float m_new = fmaxf(m[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet stays all zero
      const float alpha = exp2f(m[r] - m_use);
      m[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kBN / 8; ++n)
#pragma unroll
        for (int j = 2 * r; j < 2 * r + 2; ++j) {
          s[n][j] = exp2f(s[n][j] - m_use);
          sum += s[n][j];
        }
      l[r] = l[r] * alpha + sum;  // this lane's share; the quad's shares are added at the end
#pragma unroll
      for (int d = 0; d < D / 8; ++d) {
        o[d][2 * r] *= alpha;
        o[d][2 * r + 1] *= alpha;
      }
    }
    // O += P V: P's A fragment for keys 16 k .. 16 k + 15 is S tiles 2k and 2k + 1.
#pragma unroll
    for (int k = 0; k < kBN / 16; ++k) {
      uint32_t a[4];
      a[0] = mma_ops::pack2(T{}, s[2 * k][0], s[2 * k][1]);
      a[1] = mma_ops::pack2(T{}, s[2 * k][2], s[2 * k][3]);
      a[2] = mma_ops::pack2(T{}, s[2 * k + 1][0], s[2 * k + 1][1]);
      a[3] = mma_ops::pack2(T{}, s[2 * k + 1][2], s[2 * k + 1][3]);
#pragma unroll
      for (int d = 0; d < D / 8; d += 2) {
        uint32_t vb4[4];  // B fragments of dim tiles d (regs 0, 1) and d + 1 (regs 2, 3)
        mma_ops::ldmatrix_x4_trans(vb4, vb + (k * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kLd + (d + lane / 16) * 8);
        mma_ops::mma_16816(T{}, o[d], a, vb4);
        mma_ops::mma_16816(T{}, o[d + 1], a, vb4 + 2);
      }
    }
  }
  mma_ops::cp_async_wait<0>();  // only empty groups are left; nothing may stay in flight

  if (!active) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += attn::shfl_xor(l[r], 1);
    l[r] += attn::shfl_xor(l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t gr = wrow0 + quad + 8 * r;
    if (gr >= M) continue;
    const int64_t t = gr / G, hq = h * G + gr % G;
    const int64_t oi = (b * p.T + t) * p.Hq + hq;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    const float lse = l[r] > 0.f ? m[r] * 0.6931471805599453f + logf(l[r]) : -INFINITY;
    if (p.splits > 1) {
      const int64_t pi = split * (p.B * p.T * p.Hq) + oi;
#pragma unroll
      for (int d = 0; d < D / 8; ++d) {
        p.part_o[pi * D + d * 8 + 2 * qi] = o[d][2 * r] * inv;
        p.part_o[pi * D + d * 8 + 2 * qi + 1] = o[d][2 * r + 1] * inv;
      }
      if (qi == 0) p.part_lse[pi] = lse;
    } else {
      T* const out = static_cast<T*>(p.out) + oi * D;
#pragma unroll
      for (int d = 0; d < D / 8; ++d) {
        attn::store_val(out + d * 8 + 2 * qi, o[d][2 * r] * inv);
        attn::store_val(out + d * 8 + 2 * qi + 1, o[d][2 * r + 1] * inv);
      }
      if (qi == 0) p.lse[oi] = lse;
    }
  }
}

// Exact merge of the per-split states: one thread per output element (row, d).
constexpr int kMergeThreads = 128;
template <class T>
__global__ void __launch_bounds__(kMergeThreads) merge_states_kernel(MmaAttnArgs p) {
  const int64_t R = p.B * p.T * p.Hq, e = int64_t(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (e >= R * p.D) return;
  const int64_t row = e / p.D, d = e % p.D;
  float mx = -INFINITY;
  for (int j = 0; j < p.splits; ++j) mx = fmaxf(mx, p.part_lse[j * R + row]);
  float acc = 0.f, sum = 0.f;
  if (mx != -INFINITY) {
    for (int j = 0; j < p.splits; ++j) {
      const float w = expf(p.part_lse[j * R + row] - mx);  // 0 for an empty split
      sum += w;
      acc += w * p.part_o[(j * R + row) * p.D + d];
    }
  }
  attn::store_val(static_cast<T*>(p.out) + e, sum > 0.f ? acc / sum : 0.f);
  if (d == 0) p.lse[row] = sum > 0.f ? mx + logf(sum) : -INFINITY;
}

DK_HOST_DEVICE int64_t merge_blocks(const MmaAttnArgs& a) {
  return (a.B * a.T * a.Hq * a.D + kMergeThreads - 1) / kMergeThreads;
}

}  // namespace attn_mma

// Whether the tensor-core kernel takes these arguments: bf16 / fp16, D in {64, 128, 256}, and every
// row of q / k / v 16-byte aligned (cp.async copies 16 bytes).
DK_HOST_DEVICE bool tree_attention_mma_ok(const TreeAttnArgs& p) {
  if (p.dtype == 0 || !(p.D == 64 || p.D == 128 || p.D == 256)) return false;
  const uintptr_t ptrs = uintptr_t(p.q) | uintptr_t(p.k) | uintptr_t(p.v);
  const int64_t strides = p.q_sb | p.q_st | p.q_sh | p.k_sb | p.k_ss | p.k_sh | p.v_sb | p.v_ss | p.v_sh;
  return ptrs % 16 == 0 && strides % 8 == 0;
}

#if !defined(DK_CUDA_EMULATE)
template <class T, int D>
cudaError_t launch_mma_instance(const MmaAttnArgs& a, cudaStream_t stream) {
  constexpr size_t smem = attn_mma::Cfg<D>::kSmemBytes;
  auto kernel = attn_mma::tree_attention_mma_kernel<T, D>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e != cudaSuccess) return e;
  kernel<<<unsigned(attn_mma::num_blocks(a)), attn_mma::kThreads, smem, stream>>>(a);
  if (a.splits > 1) {
    attn_mma::merge_states_kernel<T><<<unsigned(attn_mma::merge_blocks(a)), attn_mma::kMergeThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// a: planned (attn_mma::plan) with part_o / part_lse set when a.splits > 1.
template <class T>
cudaError_t launch_mma(const MmaAttnArgs& a, cudaStream_t stream) {
  switch (a.D) {
    case 64: return launch_mma_instance<T, 64>(a, stream);
    case 128: return launch_mma_instance<T, 128>(a, stream);
    default: return launch_mma_instance<T, 256>(a, stream);
  }
}

// The whole op: the tensor-core kernel when tree_attention_mma_ok(a), else the CUDA-core one.
inline cudaError_t launch_tree_attention_auto(const MmaAttnArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.T == 0 || a.Hq == 0) return cudaSuccess;
  if (!tree_attention_mma_ok(a)) return launch_tree_attention(a, stream);
  return a.dtype == 1 ? launch_mma<bf16_t>(a, stream) : launch_mma<f16_t>(a, stream);
}

// For .ci/cuda_compile.sh: references every kernel instantiation of this header.
inline void instantiate_attention_mma() {
  MmaAttnArgs a;
  (void)launch_tree_attention_auto(a, nullptr);
  (void)launch_mma<bf16_t>(a, nullptr);
  (void)launch_mma<f16_t>(a, nullptr);
}
#endif

}  // namespace dk::cuda
