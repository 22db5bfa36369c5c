// Torch-free interface of the CPU tree-attention kernels (csrc/cpu/isa/attention.cpp, compiled
// once per ISA). The binding (csrc/torch/attention_cpu.cpp) fills AttnArgs and calls
// attn_active().tree_attention over (batch, kv head) work items.
#pragma once
#include <cstdint>
#include "cpu/kernels.h"

namespace dk::cpu {

struct AttnArgs {
  DType dtype = DType::F32;  // q, k, v and out share it
  int64_t B = 0, T = 0, Hq = 0, Hkv = 0, D = 0, S = 0;
  // Element strides (the last dimension is contiguous for every tensor).
  const void* q = nullptr;  // [B, T, Hq, D]
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  const void* k = nullptr;  // key s of kv head h of batch b at k + b*k_sb + s*k_ss + h*k_sh
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  const void* v = nullptr;
  int64_t v_sb = 0, v_ss = 0, v_sh = 0;
  // Tree mask: bool [B, T, T] (mask_packed = false) or little-endian bits uint8 [B, T, ceil(T/8)].
  const uint8_t* mask = nullptr;
  bool mask_packed = false;
  int64_t mask_sb = 0, mask_st = 0;      // byte strides
  const int64_t* prefix_lens = nullptr;  // [B], 0 <= prefix_lens[b] and prefix_lens[b] + T <= S
  float sm_scale = 1.f;
  void* out = nullptr;   // [B, T, Hq, D] contiguous, dtype
  float* lse = nullptr;  // [B, T, Hq] contiguous, natural log
};

struct AttnTable {
  const char* name;
  // Work items w in [begin, end): b = w / Hkv, kv head = w % Hkv.
  void (*tree_attention)(const AttnArgs&, int64_t begin, int64_t end);
};

const AttnTable& attn_table_scalar();
const AttnTable& attn_table_avx2();
const AttnTable& attn_table_avx512();

// static: this header is also compiled into the per-ISA objects (see decodekit/common.h on ODR).
static inline const AttnTable& attn_active() {
  switch (active_isa_id()) {
#if DK_X86_PATHS
    case 2: return attn_table_avx512();
    case 1: return attn_table_avx2();
#endif
    default: return attn_table_scalar();
  }
}

}  // namespace dk::cpu
