// Torch-free CPU kernel interface. Each ISA (scalar, avx2, avx512) provides one KernelTable;
// dispatch.cpp picks one by cpuid (or DECODEKIT_ISA) once per process.
#pragma once
#include <cstdint>
#include "decodekit/common.h"
#include "decodekit/contract.h"
#include "decodekit/pipeline.h"

// The AVX2 and AVX-512 builds of the kernels exist only on x86-64; elsewhere CMakeLists.txt
// compiles the scalar path alone and DK_X86_PATHS is 0.
#if defined(__x86_64__) || defined(_M_X64)
#define DK_X86_PATHS 1
#else
#define DK_X86_PATHS 0
#endif

namespace dk::cpu {

using dk::DType;  // the argument enums are the CPU/CUDA contract (decodekit/contract.h)
using dk::FilterOrder;
using dk::FilterOut;

// The argument structs shared with the CUDA kernels (decodekit/contract.h).
using dk::FilterArgs;
using dk::Matrix;
using dk::Param;
using dk::RowFilter;
using dk::SampleArgs;

// The whole sampling step (issue 11): one pass per row, no [B, V] intermediate. Row o of the
// outputs reads source row indices[o]; every other input is per OUTPUT row.
struct PipelineArgs {
  Matrix in;
  const int64_t* indices = nullptr;
  int64_t n_out = 0;
  const double* params = nullptr;    // [n_out, dk::kPipeParams] (decodekit/pipeline.h)
  int order = 0;                     // dk::PipeOrder
  const int32_t* bitmask = nullptr;  // [n_out, words] or nullptr
  int64_t bitmask_words = 0;
  const int64_t* banned = nullptr;  // [n_out, n_banned], -1 padded
  int64_t n_banned = 0;
  const int64_t* bias_ids = nullptr;  // [n_out, n_bias], -1 padded
  const float* bias_vals = nullptr;
  int64_t n_bias = 0;
  const int64_t* prompt = nullptr;  // [n_out, n_prompt], -1 padded
  int64_t n_prompt = 0;
  const int64_t* output = nullptr;  // [n_out, n_output], -1 padded
  int64_t n_output = 0;
  // randomness (as SampleArgs)
  const int64_t* seeds = nullptr;
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t *seed_ptr = nullptr, *offsets = nullptr;
  int64_t offset_stride = 0;
  int mode = 0;               // 0: sample; 1: write the processed, truncated logits (out_logits)
  int64_t top_n = 0;          // top logprobs per row
  bool raw_logprobs = false;  // logprobs of the raw logits (else of the processed distribution)
  bool want_logprob = false;  // the sampled token's logprob and rank
  // deferred checks (forced on the CPU): a row whose values are out of range is invalid and ORs
  // error_bit into *error_flag; nullptr: the binding checked every value (ValueErrors)
  int32_t* error_flag = nullptr;
  int32_t error_bit = 0;
  // outputs
  int64_t* out_tokens = nullptr;
  bool* out_valid = nullptr;
  float* out_logprob = nullptr;
  int64_t* out_rank = nullptr;
  int64_t* out_top_ids = nullptr;  // [n_out, top_n]
  float* out_top_lp = nullptr;     // [n_out, top_n]
  void* out_logits = nullptr;      // mode 1: [n_out, V], dtype of in
};

// apply_token_bitmask_inplace: rows j in [begin, end) mask row r = indices ? indices[j] : j of
// `data` with word row r of `words` (tokens [0, tokens) only).
struct BitmaskArgs {
  void* data = nullptr;
  DType dtype = DType::F32;
  int64_t row_stride = 0;
  const int32_t* words = nullptr;
  int64_t word_stride = 0;
  int64_t tokens = 0;
  const int64_t* indices = nullptr;
};

struct KernelTable {
  const char* name;
  // inverse-CDF sampling with optional filters (one uniform per row)
  void (*sample_rows)(const SampleArgs&, int64_t begin, int64_t end);
  // Gumbel-max sampling from logits (one Philox word pair per element)
  void (*gumbel_rows)(const SampleArgs&, int64_t begin, int64_t end);
  // filters that write a [B, V] output
  void (*filter_rows)(const FilterArgs&, int64_t begin, int64_t end);
  // the whole sampling step (PipelineArgs)
  void (*pipeline_rows)(const PipelineArgs&, int64_t begin, int64_t end);
  void (*bitmask_rows)(const BitmaskArgs&, int64_t begin, int64_t end);
};

const KernelTable& table_scalar();
const KernelTable& table_avx2();
const KernelTable& table_avx512();

// Other op families (speculative, attention) keep their own per-ISA tables and pick one with
// active_isa_id(): 0 = scalar, 1 = avx2, 2 = avx512.
int active_isa_id();

// The active table: chosen by cpuid, overridable with DECODEKIT_ISA or set_isa().
const KernelTable& active();
const char* active_isa();
void set_isa(const char* name);  // "scalar" | "avx2" | "avx512" | "auto"; throws on unknown/unsupported
bool cpu_has_avx2();
bool cpu_has_avx512();
bool cpu_has_avx512bf16();

}  // namespace dk::cpu
