// Tree attention on CUDA: torch-free kernel (compiles with plain `nvcc -std=c++20 -arch=sm_80|sm_90`,
// see .ci/cuda_compile.sh); csrc/cuda/attention.cu is the thin torch launcher, and
// tests/cuda_emu/emu_attention.cpp runs this same code on CPU fibers (DK_CUDA_EMULATE) so the
// tests can check it without a GPU.
//
// Same semantics as the CPU kernel (csrc/cpu/isa/attention.cpp): query row m = t*G + g of (batch b,
// kv head h) attends keys s < prefix_lens[b] and tree key j iff mask[b][t][j]; out = softmax . V,
// lse = natural log of the sum of exp(scaled scores) (-inf, with out = 0, for a row with no keys).
//
// One thread block = kRows consecutive query rows of one (b, h) group (the GQA heads of a query
// are adjacent rows), so each K/V tile in shared memory serves all of them. Key tiles of 32 keys:
// lane i scores key i of the tile for one row, the warp does the online-softmax update with
// shuffles, and lane i owns output dims d = i, i + 32, ... The prefix is dense; the ceil(T/32)
// tree tiles apply the mask bit per (query, key).
#pragma once
#if !defined(DK_CUDA_EMULATE)
#include <cuda_runtime.h>
#endif
#include <cmath>
#include <cstdint>
#include "decodekit/common.h"

namespace dk::cuda {

struct TreeAttnArgs {
  int dtype = 0;  // 0 = fp32, 1 = bf16, 2 = fp16 (= dk::cpu::DType)
  int64_t B = 0, T = 0, Hq = 0, Hkv = 0, D = 0, S = 0;
  const void* q = nullptr;  // [B, T, Hq, D], element strides below, last dim contiguous
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  const void* k = nullptr;  // key s of kv head h of batch b at k + b*k_sb + s*k_ss + h*k_sh
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  const void* v = nullptr;
  int64_t v_sb = 0, v_ss = 0, v_sh = 0;
  const uint8_t* mask = nullptr;  // bool [B,T,T] or packed little-endian bits [B,T,ceil(T/8)]
  bool mask_packed = false;
  int64_t mask_sb = 0, mask_st = 0;  // byte strides
  const int64_t* prefix_lens = nullptr;
  float sm_scale = 1.f;
  void* out = nullptr;   // [B, T, Hq, D] contiguous, dtype
  float* lse = nullptr;  // [B, T, Hq]
};

namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows per block
constexpr int kKeys = 32;                     // keys per tile
constexpr int kMaxD = 256;
constexpr int kMaxJ = kMaxD / 32;  // output dims per lane

// Shared memory (fp32): Q rows [kRows][D] (pre-scaled by sm_scale * log2 e), K tile [kKeys][D + 1]
// (padded against bank conflicts), V tile [kKeys][D].
DK_HOST_DEVICE size_t smem_floats(int64_t D) { return size_t(kRows * D + kKeys * (D + 1) + kKeys * D); }

// float -> storage, round to nearest even (bit-exact on host and device).
DK_HOST_DEVICE void store_val(float* p, float x) { *p = x; }
DK_HOST_DEVICE void store_val(bf16_t* p, float x) { p->x = bf16_bits(x); }
DK_HOST_DEVICE void store_val(f16_t* p, float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  uint32_t h;
  if (a >= 0x7f800000u) {
    h = a > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN, inf
  } else if (a >= 0x38800000u) {              // normal half (overflow rounds into 0x7c00 = inf)
    const uint32_t r = a - 0x38000000u;
    h = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
  } else {  // subnormal half or zero: round(M * 2^(e - 126)), M the 24-bit significand
    const uint32_t e = a >> 23, s = 126u - e;
    if (s > 24u) {
      h = 0;
    } else {
      const uint32_t M = (a & 0x7fffffu) | 0x800000u, q = M >> s, rem = M & ((1u << s) - 1u), half = 1u << (s - 1u);
      h = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    }
  }
  p->x = uint16_t(sign | h);
}

#if !defined(DK_CUDA_EMULATE)
DK_DEVICE float shfl_xor(float x, int o) { return __shfl_xor_sync(0xffffffffu, x, o); }
DK_DEVICE float shfl(float x, int lane) { return __shfl_sync(0xffffffffu, x, lane); }
#else
DK_DEVICE float shfl_xor(float x, int o) { return dkemu_shfl_xor(x, o); }
DK_DEVICE float shfl(float x, int lane) { return dkemu_shfl(x, lane); }
#endif
DK_DEVICE float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, shfl_xor(x, o));
  return x;
}
DK_DEVICE float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += shfl_xor(x, o);
  return x;
}

template <class T>
__global__ void __launch_bounds__(kThreads) tree_attention_kernel(TreeAttnArgs p) {
#if defined(DK_CUDA_EMULATE)
  static float smem[kRows * kMaxD + kKeys * (kMaxD + 1) + kKeys * kMaxD];
#else
  extern __shared__ float smem[];
#endif
  const int64_t D = p.D, G = p.Hq / p.Hkv, M = p.T * G;
  const int64_t n_row_tiles = (M + kRows - 1) / kRows;
  float* qs = smem;
  float* ks = qs + kRows * D;
  float* vs = ks + kKeys * (D + 1);
  const int64_t group = int64_t(blockIdx.x) / n_row_tiles;  // 1-D grid: (b, h, row tile)
  const int64_t b = group / p.Hkv, h = group % p.Hkv;
  const int64_t row0 = (int64_t(blockIdx.x) % n_row_tiles) * kRows;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int64_t P = p.prefix_lens[b];
  const float c = p.sm_scale * 1.4426950408889634f;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;

  for (int64_t i = threadIdx.x; i < kRows * D; i += kThreads) {
    const int64_t r = row0 + i / D, d = i % D;
    float x = 0.f;
    if (r < M) x = to_float(q[(r / G) * p.q_st + (h * G + r % G) * p.q_sh + d]) * c;
    qs[i] = x;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kMaxJ];
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
    for (int j = 0; j < kMaxJ; ++j) acc[i][j] = 0.f;
  }
  const int64_t n_prefix_tiles = (P + kKeys - 1) / kKeys;
  const int64_t n_tiles = n_prefix_tiles + (p.T + kKeys - 1) / kKeys;
  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    const bool tree = tile >= n_prefix_tiles;
    const int64_t s0 = tree ? P + (tile - n_prefix_tiles) * kKeys : tile * kKeys;
    const int64_t s_end = tree ? P + p.T : P;  // keys of this segment: [s0, s_end)
    __syncthreads();
    for (int64_t i = threadIdx.x; i < kKeys * D; i += kThreads) {
      const int64_t n = i / D, d = i % D, s = s0 + n;
      float kx = 0.f, vx = 0.f;
      if (s < s_end) {
        kx = to_float(k[s * p.k_ss + d]);
        vx = to_float(v[s * p.v_ss + d]);
      }
      ks[n * (D + 1) + d] = kx;
      vs[n * D + d] = vx;
    }
    __syncthreads();
    const int64_t s = s0 + lane;
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t rl = warp * kRowsPerWarp + i, r = row0 + rl;
      if (r >= M) break;  // warp-uniform
      bool valid = s < s_end;
      if (valid && tree) {
        const int64_t t = r / G, j = s - P;
        const uint8_t* mr = p.mask + b * p.mask_sb + t * p.mask_st;
        valid = p.mask_packed ? ((mr[j >> 3] >> (j & 7)) & 1) != 0 : mr[j] != 0;
      }
      float x = -INFINITY;
      if (valid) {
        float dot = 0.f;
        const float* qr = qs + rl * D;
        const float* kr = ks + lane * (D + 1);
        for (int64_t d = 0; d < D; ++d) dot = fmaf(qr[d], kr[d], dot);
        x = dot;
      }
      const float m_new = fmaxf(m[i], warp_max(x));
      if (m_new == -INFINITY) continue;  // nothing attended yet in this row (warp-uniform)
      const float alpha = exp2f(m[i] - m_new);
      const float pr = valid ? exp2f(x - m_new) : 0.f;
      l[i] = l[i] * alpha + warp_sum(pr);
      m[i] = m_new;
      for (int j = 0; j < kMaxJ; ++j) acc[i][j] *= alpha;
      for (int n = 0; n < kKeys; ++n) {
        const float pn = shfl(pr, n);
        if (pn == 0.f) continue;  // warp-uniform (the same value in every lane)
        const float* vr = vs + n * D;
        for (int j = 0; j < kMaxJ; ++j) {
          const int64_t d = lane + 32 * j;
          if (d < D) acc[i][j] = fmaf(pn, vr[d], acc[i][j]);
        }
      }
    }
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = row0 + warp * kRowsPerWarp + i;
    if (r >= M) break;
    const int64_t t = r / G, hq = h * G + r % G;
    const int64_t oi = (b * p.T + t) * p.Hq + hq;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
#pragma unroll
    for (int j = 0; j < kMaxJ; ++j) {
      const int64_t d = lane + 32 * j;
      if (d < D) store_val(out + oi * D + d, acc[i][j] * inv);
    }
    if (lane == 0) p.lse[oi] = l[i] > 0.f ? m[i] * 0.6931471805599453f + logf(l[i]) : -INFINITY;
  }
}

DK_HOST_DEVICE int64_t num_blocks(const TreeAttnArgs& p) {
  const int64_t M = p.T * (p.Hq / p.Hkv);
  return p.B * p.Hkv * ((M + kRows - 1) / kRows);
}

}  // namespace attn

#if !defined(DK_CUDA_EMULATE)
// Launches on `stream`; returns the launch error (cudaSuccess if none).
inline cudaError_t launch_tree_attention(const TreeAttnArgs& p, cudaStream_t stream) {
  const int64_t blocks = attn::num_blocks(p);
  if (blocks == 0) return cudaSuccess;
  const size_t smem = attn::smem_floats(p.D) * sizeof(float);
  cudaError_t e = cudaSuccess;
  auto go = [&](auto kernel) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e == cudaSuccess) kernel<<<unsigned(blocks), attn::kThreads, smem, stream>>>(p);
  };
  switch (p.dtype) {
    case 0: go(attn::tree_attention_kernel<float>); break;
    case 1: go(attn::tree_attention_kernel<bf16_t>); break;
    default: go(attn::tree_attention_kernel<f16_t>); break;
  }
  return e != cudaSuccess ? e : cudaGetLastError();
}

// For .ci/cuda_compile.sh: references every kernel instantiation.
inline void instantiate_attention() {
  TreeAttnArgs p;
  (void)launch_tree_attention(p, nullptr);
}
#endif

}  // namespace dk::cuda
