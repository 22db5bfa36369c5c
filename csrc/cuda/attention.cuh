// Tree attention on CUDA: torch-free kernel (compiles with plain `nvcc -std=c++20 -arch=sm_80|sm_90`).
//
// Same semantics as the CPU kernel (csrc/cpu/isa/attention.cpp): query row m = t*G + g of (batch b,
// kv head h) attends keys s < prefix_lens[b] and tree key j iff mask[b][t][j]; out = softmax . V,
// lse = natural log of the sum of exp(scaled scores) (-inf and out = 0 for a row with no keys).
//
// One thread block = ROWS consecutive query rows of one (b, h) group (the GQA heads of a query are
// adjacent rows), so each K/V tile in shared memory serves all of them. Key tiles of 32 keys: lane i
// scores key i of the tile for one row, the warp does the online-softmax update with shuffles, and
// lane i owns output dims d = i, i + 32, ... The prefix is dense; tree tiles (ceil(T/32) of them)
// apply the mask bit per (query, key).
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace dk::cuda_attn {

struct Params {
  int64_t B, T, Hq, Hkv, D, S;
  const void* q;
  int64_t q_sb, q_st, q_sh;
  const void* k;
  int64_t k_sb, k_ss, k_sh;
  const void* v;
  int64_t v_sb, v_ss, v_sh;
  const uint8_t* mask;
  bool mask_packed;
  int64_t mask_sb, mask_st;
  const int64_t* prefix_lens;
  float sm_scale;
  void* out;   // [B, T, Hq, D] contiguous
  float* lse;  // [B, T, Hq]
};

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // rows per block
constexpr int kKeys = 32;                     // keys per tile
constexpr int kMaxD = 256;
constexpr int kMaxJ = kMaxD / 32;             // output dims per lane

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ void from_f(float* p, float x) { *p = x; }
__device__ __forceinline__ void from_f(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void from_f(__half* p, float x) { *p = __float2half_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Dynamic shared memory: Q rows [kRows][D] (pre-scaled by sm_scale*log2 e), K tile [kKeys][D+1]
// (padded against bank conflicts), V tile [kKeys][D], all fp32.
__host__ __device__ constexpr size_t smem_bytes(int64_t D) {
  return size_t(kRows * D + kKeys * (D + 1) + kKeys * D) * sizeof(float);
}

template <class T>
__global__ void __launch_bounds__(kWarps * 32) tree_attention_kernel(Params p) {
  extern __shared__ float smem[];
  const int64_t D = p.D, G = p.Hq / p.Hkv, M = p.T * G;
  float* qs = smem;
  float* ks = qs + kRows * D;
  float* vs = ks + kKeys * (D + 1);
  const int64_t b = blockIdx.x / p.Hkv, h = blockIdx.x % p.Hkv;
  const int64_t row0 = int64_t(blockIdx.y) * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t P = p.prefix_lens[b];
  const float c = p.sm_scale * 1.4426950408889634f;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;

  for (int64_t i = threadIdx.x; i < kRows * D; i += blockDim.x) {
    const int64_t r = row0 + i / D, d = i % D;
    float x = 0.f;
    if (r < M) x = to_f(q[(r / G) * p.q_st + (h * G + r % G) * p.q_sh + d]) * c;
    qs[i] = x;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kMaxJ];
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
    for (int j = 0; j < kMaxJ; ++j) acc[i][j] = 0.f;
  }
  const int64_t n_tree_tiles = (p.T + kKeys - 1) / kKeys;
  const int64_t n_prefix_tiles = (P + kKeys - 1) / kKeys;
  for (int64_t tile = 0; tile < n_prefix_tiles + n_tree_tiles; ++tile) {
    const bool tree = tile >= n_prefix_tiles;
    const int64_t s0 = tree ? P + (tile - n_prefix_tiles) * kKeys : tile * kKeys;
    const int64_t s_end = tree ? P + p.T : P;  // keys of this segment: [s0, s_end)
    __syncthreads();
    for (int64_t i = threadIdx.x; i < kKeys * D; i += blockDim.x) {
      const int64_t n = i / D, d = i % D, s = s0 + n;
      float kx = 0.f, vx = 0.f;
      if (s < s_end) {
        kx = to_f(k[s * p.k_ss + d]);
        vx = to_f(v[s * p.v_ss + d]);
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
        const float pn = __shfl_sync(0xffffffffu, pr, n);
        if (pn == 0.f) continue;  // warp-uniform (same value in every lane)
        const float* vr = vs + n * D;
        for (int j = 0; j < kMaxJ; ++j) {
          const int64_t d = lane + 32 * j;
          if (d < D) acc[i][j] = fmaf(pn, vr[d], acc[i][j]);
        }
      }
    }
  }
  T* out = static_cast<T*>(p.out);
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = row0 + warp * kRowsPerWarp + i;
    if (r >= M) break;
    const int64_t t = r / G, hq = h * G + r % G;
    const int64_t oi = (b * p.T + t) * p.Hq + hq;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    for (int j = 0; j < kMaxJ; ++j) {
      const int64_t d = lane + 32 * j;
      if (d < D) from_f(out + oi * D + d, acc[i][j] * inv);
    }
    if (lane == 0) p.lse[oi] = l[i] > 0.f ? m[i] * 0.6931471805599453f + logf(l[i]) : -INFINITY;
  }
}

// dtype: 0 = fp32, 1 = bf16, 2 = fp16. Returns the launch error (cudaSuccess if none).
inline cudaError_t launch_tree_attention(const Params& p, int dtype, cudaStream_t stream) {
  const int64_t G = p.Hq / p.Hkv, M = p.T * G;
  if (p.B == 0 || M == 0) return cudaSuccess;
  const dim3 grid(unsigned(p.B * p.Hkv), unsigned((M + kRows - 1) / kRows));
  const size_t smem = smem_bytes(p.D);
  cudaError_t e = cudaSuccess;
  switch (dtype) {
    case 0:
      e = cudaFuncSetAttribute(tree_attention_kernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (e == cudaSuccess) tree_attention_kernel<float><<<grid, kWarps * 32, smem, stream>>>(p);
      break;
    case 1:
      e = cudaFuncSetAttribute(tree_attention_kernel<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(smem));
      if (e == cudaSuccess) tree_attention_kernel<__nv_bfloat16><<<grid, kWarps * 32, smem, stream>>>(p);
      break;
    default:
      e = cudaFuncSetAttribute(tree_attention_kernel<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (e == cudaSuccess) tree_attention_kernel<__half><<<grid, kWarps * 32, smem, stream>>>(p);
      break;
  }
  return e != cudaSuccess ? e : cudaGetLastError();
}

}  // namespace dk::cuda_attn
