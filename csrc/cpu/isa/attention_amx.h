// Internal header of csrc/cpu/isa/attention.cpp: the AMX tile engine (kMode 2, tdpbf16ps), built
// into the avx512 object only. CPU / OS detection and the DECODEKIT_ATTN_BF16 engine choice, tile
// configuration, the transposed score and P V tile kernels, the lane-wise (16 rows per vector) online
// softmax with lazy rescaling, and the K / V block packers of the tile layout.
#pragma once
#include "cpu/isa/attention_bf16.h"

#if defined(DK_ISA_AVX512)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace dk::cpu::DK_ISA_NAME {
namespace {

constexpr float kLazy = 8.f;  // AMX softmax: how far (log2) scores may exceed the running max

// ---- AMX (tile) path for bf16: S = Q K^T and O += P V with tdpbf16ps ---------------------------
// Tiles (all 16 rows x 64 bytes): 0-3 accumulators, 4-5 A operands, 6-7 B operands. The B operands
// use the same pair-interleaved ("VNNI") packing as the vdpbf16ps path: Kp [D/2][kN] words, Vp
// [kN/2][D] words. Rows are processed 16 at a time; Q and O are padded to a multiple of 16 rows.
struct alignas(64) TileCfg {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_ready() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    if (!(d & (1u << 24)) || !(d & (1u << 22))) return false;  // AMX-TILE, AMX-BF16
    // Linux: ask for the XTILEDATA state (ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18).
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

// Which bf16 kernel the AVX-512 path uses: AMX when the CPU/OS allow it, else vdpbf16ps.
// DECODEKIT_ATTN_BF16=dpbf16 | amx | fma forces one (amx falls back to dpbf16 when unavailable).
int bf16_mode() {
  const char* e = std::getenv("DECODEKIT_ATTN_BF16");
  if (e && std::strcmp(e, "dpbf16") == 0) return 1;
  if (e && std::strcmp(e, "fma") == 0) return 0;
  return amx_ready() ? 2 : 1;
}

#define DK_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

DK_AMX_TARGET void amx_config() {
  TileCfg cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  // inline asm with a memory operand: GCC 12 drops the stores to cfg before _tile_loadconfig
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg) : "memory");
}
DK_AMX_TARGET void amx_release() { _tile_release(); }

// The AMX path works transposed, with the 16 query rows of a tile in the N (column) dimension:
//   S^T[key][row] = K . Q^T     A = 16 key rows x 32 d of Kc (K copied per block, not transposed);
//                               B = Q^T as pairs, Qt[Dq/2][16] words (packed once per item)
//   O^T[d][row] += V^T . P^T    A = 16 d rows x 32 keys of Vt[D][kN] (bf16, packed per block);
//                               B = P^T as pairs, Pt[kN/2][16] words (written by the softmax)
// so the online softmax works on vectors whose 16 lanes are the 16 rows of the tile: per-row maxima,
// rescale factors and sums are plain lane-wise operations (no horizontal reductions, no per-row
// branches).

// C tiles 0-3 (16 x 16 fp32 each) to p, p + 256, p + 512, p + 768 (rows 64 bytes apart).
DK_AMX_TARGET inline void store_c4(float* p) {
  _tile_stored(0, p, 64);
  _tile_stored(1, p + 256, 64);
  _tile_stored(2, p + 512, 64);
  _tile_stored(3, p + 768, 64);
}

// St[kN][16] = K . Qt, K packed as Kc[Dq/32][kN][32] bf16 (each A tile one contiguous 1 KiB).
DK_AMX_TARGET void amx_scores_t(const uint32_t* Qt, int64_t Dq, const bf16_t* Kc, float* St) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t dc = 0; dc < Dq; dc += 32) {
    const bf16_t* kp = Kc + dc * kN;
    _tile_stream_loadd(6, Qt + (dc / 2) * 16, 64);
    _tile_loadd(4, kp, 64);
    _tile_loadd(5, kp + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, kp + 1024, 64);
    _tile_dpbf16ps(1, 5, 6);
    _tile_loadd(4, kp + 1536, 64);
    _tile_dpbf16ps(2, 7, 6);
    _tile_dpbf16ps(3, 4, 6);
  }
  store_c4(St);
}

// Kc[Dq/32][kN][32] from nv key rows ks apart (zero for d >= D and keys >= nv). A contiguous copy
// beats tile loads straight from the cache rows (~0.5 ms of 4 at T=64, prefix 2048, GQA 32/8).
void pack_kc_bf16(const bf16_t* k, int64_t ks, int nv, int64_t D, int64_t Dq, bf16_t* Kc) {
  for (int64_t dc = 0; dc < Dq; dc += 32) {
    const __mmask32 lm = D - dc >= 32 ? ~__mmask32(0) : __mmask32((1u << (D - dc)) - 1);
    bf16_t* dst = Kc + dc * kN;
    for (int n = 0; n < kN; ++n)
      _mm512_store_si512(dst + n * 32, n < nv ? _mm512_maskz_loadu_epi16(lm, k + n * ks + dc) : _mm512_setzero_si512());
  }
}

// Ot[D][16] += Vt[D][kN] . Pt (the two P^T halves stay in tiles 6, 7 across the d tiles). O^T (and,
// in the scores, Q^T) comes from L2 with the streaming tile load (TILELOADDT1), so that it does not
// push the block's Kc / V^T, which every row tile reuses, out of L1 (~4% in alternating runs).
DK_AMX_TARGET void amx_pv_t(const uint32_t* Pt, const uint32_t* Vt, int64_t D, float* Ot) {
  _tile_loadd(6, Pt, 64);
  _tile_loadd(7, Pt + 256, 64);
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    float* o = Ot + d * 16;
    const uint32_t* vt = Vt + d * (kN / 2);
    _tile_stream_loadd(0, o, 64);
    _tile_stream_loadd(1, o + 256, 64);
    _tile_stream_loadd(2, o + 512, 64);
    _tile_stream_loadd(3, o + 768, 64);
    _tile_loadd(4, vt, kN * 2);
    _tile_loadd(5, vt + 16, kN * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(0, 5, 7);
    _tile_loadd(4, vt + 16 * (kN / 2), kN * 2);
    _tile_loadd(5, vt + 16 * (kN / 2) + 16, kN * 2);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(1, 5, 7);
    _tile_loadd(4, vt + 32 * (kN / 2), kN * 2);
    _tile_loadd(5, vt + 32 * (kN / 2) + 16, kN * 2);
    _tile_dpbf16ps(2, 4, 6);
    _tile_dpbf16ps(2, 5, 7);
    _tile_loadd(4, vt + 48 * (kN / 2), kN * 2);
    _tile_loadd(5, vt + 48 * (kN / 2) + 16, kN * 2);
    _tile_dpbf16ps(3, 4, 6);
    _tile_dpbf16ps(3, 5, 7);
    store_c4(o);
  }
  for (; d < D; d += 16) {  // D = 80, 96: 16-row remainder
    float* o = Ot + d * 16;
    const uint32_t* vt = Vt + d * (kN / 2);
    _tile_stream_loadd(0, o, 64);
    _tile_loadd(4, vt, kN * 2);
    _tile_loadd(5, vt + 16, kN * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(0, 5, 7);
    _tile_stored(0, o, 64);
  }
}

// Online softmax of one transposed tile: St[kN][16] raw scores (key n of the 16 rows in one vector).
// m, L: the 16 rows' running max (log2 domain) and sum. Key n takes part in the lanes of km[n]
// (kMasked: padded keys of a partial block, or tree keys a row does not attend: weight exactly 0).
// Writes the bf16 weights as pairs Pt[kN/2][16] and returns the rescale factors 2^(m_old - m_new).
template <bool kMasked>
__m512 softmax_t(const float* St, const uint16_t* km, float c, uint32_t* Pt, float* m, float* L) {
  const __m512 cv = _mm512_set1_ps(c);
  const __m512 m_old = _mm512_load_ps(m);
  // The weights 2^(c*s - mu) of the block for row maxima mu: written to Pt as bf16 pairs (rounded to
  // nearest: the round bit is added, then the low half dropped), summed into sum; tmax gets the
  // largest exponent c*s - mu of the keys that take part.
  auto weights = [&](__m512 mu, __m512& sum, __m512& tmax) {
    const __m512 negm = _mm512_sub_ps(_mm512_setzero_ps(), mu);
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
    __m512 t0max = _mm512_set1_ps(kNegInf), t1max = t0max;
    const __m512i half = _mm512_set1_epi32(0x8000), hi16 = _mm512_set1_epi32(int(0xffff0000u));
    for (int n = 0; n < kN; n += 2) {
      const __m512 t0 = _mm512_fmadd_ps(_mm512_load_ps(St + 16 * n), cv, negm);
      const __m512 t1 = _mm512_fmadd_ps(_mm512_load_ps(St + 16 * n + 16), cv, negm);
      // lanes that do not take part may be +-inf / NaN here (mu = -inf): the masks exclude them
      __m512 e0 = VT::template exp2<3, false>(t0);
      __m512 e1 = VT::template exp2<3, false>(t1);
      if constexpr (kMasked) {
        e0 = _mm512_maskz_mov_ps(km[n], e0);
        e1 = _mm512_maskz_mov_ps(km[n + 1], e1);
        t0max = _mm512_mask_max_ps(t0max, km[n], t0max, t0);
        t1max = _mm512_mask_max_ps(t1max, km[n + 1], t1max, t1);
      } else {
        t0max = _mm512_max_ps(t0max, t0);
        t1max = _mm512_max_ps(t1max, t1);
      }
      sum0 = _mm512_add_ps(sum0, e0);
      sum1 = _mm512_add_ps(sum1, e1);
      // word = (bf16(e1) << 16) | bf16(e0): (u1 & 0xffff0000) | (u0 >> 16)
      const __m512i u0 = _mm512_add_epi32(_mm512_castps_si512(e0), half);
      const __m512i u1 = _mm512_add_epi32(_mm512_castps_si512(e1), half);
      _mm512_store_si512(Pt + 8 * n, _mm512_ternarylogic_epi32(hi16, u1, _mm512_srli_epi32(u0, 16), 0xca));
    }
    sum = _mm512_add_ps(sum0, sum1);
    tmax = _mm512_max_ps(t0max, t1max);
  };
  // Lazy rescaling: a row's running max only moves when the block's scaled scores exceed it by more
  // than kLazy (log2 units). Weights up to 2^kLazy are exact enough in fp32 / bf16, most blocks leave
  // O^T alone (with the exact max, each new block raised some lane's max most of the time), and once
  // every row has a finite max the weights are computed in one pass over the scores: only when some
  // row's max has to move (rare after the first blocks) are they computed again.
  __m512 m_new = m_old, sum, tmax;
  if (_mm512_cmp_ps_mask(m_old, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ) == 0) {
    weights(m_old, sum, tmax);
    const __mmask16 up = _mm512_cmp_ps_mask(tmax, _mm512_set1_ps(kLazy), _CMP_GT_OQ);
    if (up) {
      m_new = _mm512_mask_add_ps(m_old, up, m_old, tmax);
      weights(m_new, sum, tmax);
    }
  } else {
    // block max of the scaled scores, taken on the raw scores (c > 0: max, c < 0: min), four chains
    __m512 mx[4];
    for (int j = 0; j < 4; ++j) mx[j] = _mm512_set1_ps(c > 0 ? kNegInf : -kNegInf);
    if (c > 0) {
      for (int n = 0; n < kN; n += 4)
        for (int j = 0; j < 4; ++j)
          mx[j] = kMasked ? _mm512_mask_max_ps(mx[j], km[n + j], mx[j], _mm512_load_ps(St + 16 * (n + j)))
                          : _mm512_max_ps(mx[j], _mm512_load_ps(St + 16 * (n + j)));
      mx[0] = _mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3]));
    } else {
      for (int n = 0; n < kN; n += 4)
        for (int j = 0; j < 4; ++j)
          mx[j] = kMasked ? _mm512_mask_min_ps(mx[j], km[n + j], mx[j], _mm512_load_ps(St + 16 * (n + j)))
                          : _mm512_min_ps(mx[j], _mm512_load_ps(St + 16 * (n + j)));
      mx[0] = _mm512_min_ps(_mm512_min_ps(mx[0], mx[1]), _mm512_min_ps(mx[2], mx[3]));
    }
    const __m512 x = _mm512_mul_ps(mx[0], cv);
    m_new =
        _mm512_mask_mov_ps(m_old, _mm512_cmp_ps_mask(x, _mm512_add_ps(m_old, _mm512_set1_ps(kLazy)), _CMP_GT_OQ), x);
    weights(m_new, sum, tmax);
  }
  const __m512 alpha = VT::exp2(_mm512_sub_ps(m_old, m_new));
  _mm512_store_ps(m, m_new);
  _mm512_store_ps(L, _mm512_fmadd_ps(_mm512_load_ps(L), alpha, sum));
  return alpha;
}

// Vt[D][kN] bf16 (keys consecutive per d; keys nv .. kN-1 zero) from nv value rows vs apart: per
// 16 key pairs and 16 d, the pair-interleaved words (V[2np][d], V[2np+1][d]) of each pair, then a
// 16 x 16 word transpose straight into Vt (no intermediate buffer: it would take L1 from the
// tile operands).
void pack_vt_bf16(const bf16_t* v, int64_t vs, int nv, int64_t D, uint32_t* Vt) {
  const __m512i idx_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                          37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i idx_hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54,
                                          22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int p0 = 0; p0 < kN / 2; p0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const bool two = d0 + 32 <= D;  // else 16 d remain (D = 80)
      const __mmask32 lm = two ? ~__mmask32(0) : __mmask32(0xffff);
      __m512i lo[16], hi[16];
      for (int i = 0; i < 16; ++i) {
        const int n = 2 * (p0 + i);
        const __m512i A = n < nv ? _mm512_maskz_loadu_epi16(lm, v + n * vs + d0) : _mm512_setzero_si512();
        const __m512i B = n + 1 < nv ? _mm512_maskz_loadu_epi16(lm, v + (n + 1) * vs + d0) : _mm512_setzero_si512();
        lo[i] = _mm512_permutex2var_epi16(A, idx_lo, B);
        if (two) hi[i] = _mm512_permutex2var_epi16(A, idx_hi, B);
      }
      transpose16(lo);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(Vt + (d0 + i) * (kN / 2) + p0, lo[i]);
      if (two) {
        transpose16(hi);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(Vt + (d0 + 16 + i) * (kN / 2) + p0, hi[i]);
      }
    }
}

}  // namespace
}  // namespace dk::cpu::DK_ISA_NAME
#endif
