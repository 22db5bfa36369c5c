// The whole sampling step (bitmask, bans, logit bias, penalties, then the truncations): the
// per-element arithmetic shared by the CPU kernels (csrc/cpu/pipeline.h) and CUDA. Torch-free.
// Every step is float32, element by element, in the order reference.process_logits defines, so
// all paths produce the same processed logit bit for bit (-ffp-contract=off: nothing is fused).
#pragma once
#include <cstdint>
#include "decodekit/common.h"

namespace dk {

// Columns of the per-row parameter matrix ([n_out, kPipeParams] float64) of the pipeline op.
enum PipeParam : int {
  kPT = 0,    // temperature (0 = greedy)
  kPTopK,     // <= 0 or >= V: off
  kPTopP,     // >= 1: off
  kPMinP,     // 0: off
  kPRep,      // repetition penalty r > 0 (1: off)
  kPFreq,     // frequency penalty (0: off)
  kPPres,     // presence penalty (0: off)
  kPNSigma,   // top-n-sigma n (<= 0: off)
  kPTypical,  // typical_p in (0, 1] (1: off)
  kPEps,      // epsilon cutoff in [0, 1) (0: off)
  kPEta,      // eta cutoff in [0, 1) (0: off)
  kPTopH,     // top-h in [0, 1] (0: off)
  kPMtk,      // min_tokens_to_keep >= 1
  kPipeParams
};

enum class PipeOrder : int { Sequential = 0, Joint = 1, Vllm = 2 };

// Candidates TopHLogitsWarper looks at (its top_n).
constexpr int64_t kTopHCandidates = 100;

// Bit j of word w allows token 32*w + j (xgrammar's int32 layout).
DK_HOST_DEVICE bool bitmask_allows(const int32_t* words, int64_t i) {
  return ((uint32_t(words[i >> 5]) >> uint32_t(i & 31)) & 1u) != 0u;
}
// 16 bits of the mask for the 16-aligned block starting at token i.
DK_HOST_DEVICE uint32_t bitmask_block16(const int32_t* words, int64_t i) {
  return (uint32_t(words[i >> 5]) >> uint32_t(i & 16)) & 0xFFFFu;
}
// Repetition penalty (HF, vLLM, CTRL): divide a positive logit by r, multiply the others.
DK_HOST_DEVICE float repetition_apply(float y, float r) { return y > 0.f ? y / r : y * r; }
// Frequency and presence penalties (OpenAI, vLLM) of a token seen c > 0 times in the output.
DK_HOST_DEVICE float count_penalty_apply(float y, float f, float q, uint32_t c) {
  const float fc = f * float(c);
  const float t = y - fc;
  return t - q;
}

}  // namespace dk
