// Runtime ISA selection by cpuid. Compiled with baseline flags only. On a CPU that is not x86-64
// only the scalar path is compiled (DK_X86_PATHS == 0) and there is no cpuid to ask.
#include "cpu/kernels.h"
#if DK_X86_PATHS
#include <cpuid.h>
#endif
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <atomic>

namespace dk::cpu {
namespace {
#if DK_X86_PATHS
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}
struct Features {
  bool avx2 = false, avx512 = false, avx512bf16 = false;
  Features() {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
    if (!osxsave) return;
    uint64_t xcr = xgetbv0();
    bool ymm = (xcr & 0x6) == 0x6, zmm = (xcr & 0xe6) == 0xe6;
    if (__get_cpuid_max(0, nullptr) < 7) return;
    __cpuid_count(7, 0, a, b, c, d);
    bool has_avx2 = b & (1u << 5), bmi2 = b & (1u << 8);
    bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
    avx2 = ymm && has_avx2 && fma && f16c && bmi2;
    avx512 = avx2 && zmm && f && dq && bw && vl;
    __cpuid_count(7, 1, a, b, c, d);
    avx512bf16 = avx512 && (a & (1u << 5));
  }
};
#else
struct Features {
  bool avx2 = false, avx512 = false, avx512bf16 = false;
};
#endif
const Features& feats() {
  static Features f;
  return f;
}

const KernelTable* pick(const std::string& want) {
  if (want == "scalar") return &table_scalar();
#if DK_X86_PATHS
  if (want == "avx2") {
    if (!feats().avx2) throw std::runtime_error("DECODEKIT_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
    return &table_avx2();
  }
  if (want == "avx512") {
    if (!feats().avx512 || !feats().avx512bf16)
      throw std::runtime_error("DECODEKIT_ISA=avx512 but this CPU lacks AVX-512 F/BW/DQ/VL/BF16");
    return &table_avx512();
  }
  if (want.empty() || want == "auto") {
    if (feats().avx512 && feats().avx512bf16) return &table_avx512();
    if (feats().avx2) return &table_avx2();
    return &table_scalar();
  }
#else
  if (want == "avx2" || want == "avx512")
    throw std::runtime_error("DECODEKIT_ISA=" + want + ": this build is not for x86-64, only the scalar path exists");
  if (want.empty() || want == "auto") return &table_scalar();
#endif
  throw std::runtime_error("DECODEKIT_ISA must be one of scalar, avx2, avx512, auto; got '" + want + "'");
}
std::atomic<const KernelTable*> g_table{nullptr};
}  // namespace

bool cpu_has_avx2() { return feats().avx2; }
bool cpu_has_avx512() { return feats().avx512; }
bool cpu_has_avx512bf16() { return feats().avx512bf16; }

const KernelTable& active() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    const char* env = std::getenv("DECODEKIT_ISA");
    t = pick(env ? std::string(env) : std::string());
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}
const char* active_isa() { return active().name; }
int active_isa_id() {
#if DK_X86_PATHS
  const KernelTable* t = &active();
  return t == &table_avx512() ? 2 : t == &table_avx2() ? 1 : 0;
#else
  return 0;
#endif
}
void set_isa(const char* name) { g_table.store(pick(name ? name : ""), std::memory_order_release); }

}  // namespace dk::cpu
