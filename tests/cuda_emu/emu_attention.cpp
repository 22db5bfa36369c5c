// C entry point that runs csrc/cuda/attention.cuh's tree-attention kernel under the CPU emulator
// (emu_runtime.h); tests/test_attention.py loads it through ctypes (tests/cuda_emu/emu_attn.py)
// and compares it with the CPU op. Host pointers stand in for device pointers.
#include "emu_runtime.h"

// Warp shuffles the attention kernel uses (emu_runtime.h has __shfl_down_sync only): every lane
// publishes its value, the warp meets, each lane reads its source lane, the warp meets again.
static float dkemu_exchange(float v, unsigned src_lane) {
  auto& B = *dkemu::g_blk;
  const unsigned t = threadIdx.x;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(float));
  B.xbuf[t] = bits;
  dkemu::warp_sync();
  float r;
  std::memcpy(&r, &B.xbuf[(t & ~31u) + (src_lane & 31u)], sizeof(float));
  dkemu::warp_sync();
  return r;
}
static float dkemu_shfl_xor(float v, int o) { return dkemu_exchange(v, (threadIdx.x & 31u) ^ unsigned(o)); }
static float dkemu_shfl(float v, int lane) { return dkemu_exchange(v, unsigned(lane)); }

#include "cuda/attention.cuh"

using namespace dk::cuda;

template <class T>
struct AttnK {
  static void fn(TreeAttnArgs a) { attn::tree_attention_kernel<T>(a); }
};

extern "C" void dk_emu_tree_attention(int dtype, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, int64_t S,
                                      const void* q, int64_t q_sb, int64_t q_st, int64_t q_sh, const void* k,
                                      int64_t k_sb, int64_t k_ss, int64_t k_sh, const void* v, int64_t v_sb,
                                      int64_t v_ss, int64_t v_sh, const uint8_t* mask, int mask_packed, int64_t mask_sb,
                                      int64_t mask_st, const int64_t* prefix_lens, float sm_scale, void* out,
                                      float* lse) {
  TreeAttnArgs p;
  p.dtype = dtype;
  p.B = B;
  p.T = T;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.D = D;
  p.S = S;
  p.q = q;
  p.q_sb = q_sb;
  p.q_st = q_st;
  p.q_sh = q_sh;
  p.k = k;
  p.k_sb = k_sb;
  p.k_ss = k_ss;
  p.k_sh = k_sh;
  p.v = v;
  p.v_sb = v_sb;
  p.v_ss = v_ss;
  p.v_sh = v_sh;
  p.mask = mask;
  p.mask_packed = mask_packed != 0;
  p.mask_sb = mask_sb;
  p.mask_st = mask_st;
  p.prefix_lens = prefix_lens;
  p.sm_scale = sm_scale;
  p.out = out;
  p.lse = lse;
  const unsigned blocks = unsigned(attn::num_blocks(p));
  if (blocks == 0) return;
  switch (dtype) {
    case 0: dkemu::launch(blocks, attn::kThreads, AttnK<float>::fn, p); break;
    case 1: dkemu::launch(blocks, attn::kThreads, AttnK<dk::bf16_t>::fn, p); break;
    default: dkemu::launch(blocks, attn::kThreads, AttnK<dk::f16_t>::fn, p); break;
  }
}
