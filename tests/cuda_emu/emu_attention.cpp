// C entry points that run csrc/cuda/attention.cuh's CUDA-core tree-attention kernel and
// csrc/cuda/attention_mma.cuh's tensor-core kernel (+ its split-KV merge) under the CPU emulator
// (emu_runtime.h, with the mma / ldmatrix / cp.async of emu_mma.h); tests/test_attention.py loads
// them through ctypes (tests/cuda_emu/emu_attn.py) and compares them with the CPU op. Host pointers
// stand in for device pointers.
#include <optional>

#include "emu_runtime.h"

// Warp shuffles the attention kernel uses over the whole warp (emu_runtime.h's exchange: every lane
// publishes its value, the warp meets, each lane reads its source lane, the warp meets again).
static float dkemu_exchange(float v, unsigned src_lane) {
  return dkemu::exchange(dkemu::warp_lanes(dkemu::g_blk->n, threadIdx.x >> 5), v, src_lane & 31u, true);
}
static float dkemu_shfl_xor(float v, int o) { return dkemu_exchange(v, (threadIdx.x & 31u) ^ unsigned(o)); }
static float dkemu_shfl(float v, int lane) { return dkemu_exchange(v, unsigned(lane)); }

#include "emu_mma.h"
#include "cuda/attention_mma.cuh"

using namespace dk::cuda;

template <class T>
struct AttnK {
  static void fn(TreeAttnArgs a) { attn::tree_attention_kernel<T>(a); }
};

template <class T, int D>
struct MmaK {
  static void fn(MmaAttnArgs a) { attn_mma::tree_attention_mma_kernel<T, D>(a); }
};
template <class T>
struct MergeK {
  static void fn(MmaAttnArgs a) { attn_mma::merge_states_kernel<T>(a); }
};

template <class T, int D>
static void run_mma_instance(MmaAttnArgs& p) {
  std::optional<dkemu::Guarded> po, pl;  // the split partials, exactly sized, between guard pages
  if (p.splits > 1) {
    const size_t R = size_t(p.B * p.T * p.Hq);
    po.emplace(dkemu::Guarded::of("dk_emu_tree_attention: the split partial outputs",
                                  size_t(p.splits) * R * size_t(p.D), 0.f));
    pl.emplace(dkemu::Guarded::of("dk_emu_tree_attention: the split partial log-sum-exps", size_t(p.splits) * R, 0.f));
    p.part_o = po->data<float>();
    p.part_lse = pl->data<float>();
  }
  dkemu::mma::cp_async_reset();
  dkemu::launch(unsigned(attn_mma::num_blocks(p)), attn_mma::kThreads, MmaK<T, D>::fn, p);
  if (dkemu::mma::cp_async_pending() != 0) {
    dkemu::record("dk_emu_tree_attention: the kernel exited with cp.async copies in flight");
    return;
  }
  if (p.splits > 1) {
    dkemu::launch(unsigned(attn_mma::merge_blocks(p)), attn_mma::kMergeThreads, MergeK<T>::fn, p);
    po->check();
    pl->check();
  }
}

template <class T>
static void run_mma_dtype(MmaAttnArgs& p) {
  switch (p.D) {
    case 64: run_mma_instance<T, 64>(p); break;
    case 128: run_mma_instance<T, 128>(p); break;
    default: run_mma_instance<T, 256>(p); break;
  }
}

static void run_mma(MmaAttnArgs& p, int force_splits) {
  attn_mma::plan(p, force_splits);
  if (p.dtype == 1) {
    run_mma_dtype<dk::bf16_t>(p);
  } else {
    run_mma_dtype<dk::f16_t>(p);
  }
}

// Number of splits the launcher's rule picks for these sizes (force = 0), for the tests.
static void set_sizes(TreeAttnArgs& p, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, int64_t S) {
  p.B = B;
  p.T = T;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.D = D;
  p.S = S;
}

extern "C" int dk_emu_mma_splits(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t S) {
  MmaAttnArgs p;
  set_sizes(p, B, T, Hq, Hkv, 128, S);  // D and the pointers do not enter the rule
  attn_mma::plan(p, 0);
  return p.splits;
}

// One warp: mma.sync m16n8k16 on fragments given lane by lane. a [32][4], b [32][2] packed 16-bit
// pairs, c / d [32][4] fp32; f16 = 1 for fp16 inputs, 0 for bf16.
extern "C" void dk_emu_mma_fragments(int f16, const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  struct Args {
    int f16;
    const uint32_t *a, *b;
    const float* c;
    float* d;
  };
  struct K {
    static void fn(Args x) {
      const unsigned l = threadIdx.x;
      float acc[4];
      for (int i = 0; i < 4; ++i) acc[i] = x.c[4 * l + i];
      dkemu::mma::mma_m16n8k16(x.f16 != 0, acc, x.a + 4 * l, x.b + 2 * l);
      for (int i = 0; i < 4; ++i) x.d[4 * l + i] = acc[i];
    }
  };
  dkemu::launch(1, 32, K::fn, Args{f16, a, b, c, d});
}

// One warp: ldmatrix .x{nmat}{.trans} from a 16-bit matrix `src` (row stride ld elements, 16-byte
// aligned rows): lane l gives the address of row rows[l] at column cols[l]; out [32][4].
extern "C" void dk_emu_ldmatrix(const uint16_t* src, int64_t ld, const int* rows, const int* cols, int nmat, int trans,
                                uint32_t* out) {
  struct Args {
    const uint16_t* src;
    int64_t ld;
    const int *rows, *cols;
    int nmat, trans;
    uint32_t* out;
  };
  struct K {
    static void fn(Args x) {
      const unsigned l = threadIdx.x;
      uint32_t r[4] = {0, 0, 0, 0};
      dkemu::mma::ldmatrix(r, x.src + x.rows[l] * x.ld + x.cols[l], x.nmat, x.trans != 0);
      for (int i = 0; i < 4; ++i) x.out[4 * l + i] = r[i];
    }
  };
  dkemu::launch(1, 32, K::fn, Args{src, ld, rows, cols, nmat, trans, out});
}

// One thread: cp.async of 16 bytes from `a` and `b` into shared buffers X and Y, in two groups;
// got[0] = X[0] before any wait, got[1..2] = X[0], Y[0] after wait_group 1, got[3..4] after wait_group 0.
extern "C" void dk_emu_cp_async_probe(const uint16_t* a, const uint16_t* b, uint16_t* got) {
  struct Args {
    const uint16_t *a, *b;
    uint16_t* got;
  };
  struct K {
    static void fn(Args x) {
      alignas(16) static uint16_t X[8], Y[8];
      dkemu::mma::cp_async_16(X, x.a, true);
      dkemu::mma::cp_async_commit();
      x.got[0] = X[0];
      dkemu::mma::cp_async_16(Y, x.b, true);
      dkemu::mma::cp_async_commit();
      dkemu::mma::cp_async_wait(1);
      x.got[1] = X[0];
      x.got[2] = Y[0];
      dkemu::mma::cp_async_wait(0);
      x.got[3] = X[0];
      x.got[4] = Y[0];
    }
  };
  dkemu::mma::cp_async_reset();
  dkemu::launch(1, 1, K::fn, Args{a, b, got});
}

extern "C" void dk_emu_tree_attention(int dtype, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, int64_t S,
                                      const void* q, int64_t q_sb, int64_t q_st, int64_t q_sh, const void* k,
                                      int64_t k_sb, int64_t k_ss, int64_t k_sh, const void* v, int64_t v_sb,
                                      int64_t v_ss, int64_t v_sh, const uint8_t* mask, int mask_packed, int64_t mask_sb,
                                      int64_t mask_st, const int64_t* prefix_lens, float sm_scale, void* out,
                                      float* lse, int impl, int force_splits) {
  MmaAttnArgs p;
  p.dtype = dtype;
  set_sizes(p, B, T, Hq, Hkv, D, S);
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
  if (B == 0 || T == 0 || Hq == 0) return;
  // impl: 0 = the CUDA-core kernel, 1 = the tensor-core kernel, -1 = what the CUDA launcher picks
  if (impl == 1 || (impl == -1 && tree_attention_mma_ok(p))) {
    if (!tree_attention_mma_ok(p)) {
      dkemu::record("dk_emu_tree_attention: the tensor-core kernel does not take these arguments");
      return;
    }
    run_mma(p, force_splits);
    return;
  }
  const unsigned blocks = unsigned(attn::num_blocks(p));
  switch (dtype) {
    case 0: dkemu::launch(blocks, attn::kThreads, AttnK<float>::fn, p); break;
    case 1: dkemu::launch(blocks, attn::kThreads, AttnK<dk::bf16_t>::fn, p); break;
    default: dkemu::launch(blocks, attn::kThreads, AttnK<dk::f16_t>::fn, p); break;
  }
}
