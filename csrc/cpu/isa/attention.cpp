// Tree attention (the verification step of tree speculative decoding), compiled once per ISA:
// the work-item driver `group`, the entry point tree_attention and this ISA's AttnTable. The
// engines it drives live in internal headers next to it, included below in this order (each one
// includes the one before it):
//   attention_common.h  vector traits VT, exp2, scratch buffers, conversions, shared packing, prefetch
//   attention_fp32.h    fp32 engine (kMode 0, every ISA)
//   attention_bf16.h    vdpbf16ps engine (kMode 1, AVX-512 only)
//   attention_amx.h     AMX tile engine (kMode 2, AVX-512 only)
// Each header opens and closes dk::cpu::DK_ISA_NAME::(anonymous) itself (its system includes stay
// outside the namespace); in one translation unit that is the same anonymous namespace as below.
//
// One work item = (batch b, kv head h). Its M = T * G query rows (G = Hq / Hkv, row m = t*G + g)
// are processed together:
//   1. prefix (dense): keys 0 .. P-1 are streamed in blocks of kN keys. Each block of K and V is
//      packed ONCE (K transposed so keys lie in vector lanes; in the AVX-512 bf16 path K and V are
//      packed into bf16 pairs for vdpbf16ps) and then used by every row of the group, in row tiles
//      of kR rows: S = Q K^T (kR x kN, registers), online-softmax update, O = O*alpha + P V.
//      Only a kR x kN score tile ever exists; the [T, S] score matrix is never formed.
//   2. tree (sparse): query t attends only the tree keys j with mask[t][j] set (typically its
//      ancestors and itself), gathered per query and shared by its G heads. The AMX path instead
//      runs the tree keys as further key blocks of its tile pipeline with per-row lane masks, and
//      skips every (row tile, tree block) pair with no attended key (so a deep tree's early tokens
//      never touch its later blocks).
//   3. out = O / l, lse = ln(sum exp(scaled scores)).
// Scores are kept in the log2 domain (scaled by sm_scale * log2(e)) so the softmax uses exp2.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include "cpu/attention_kernels.h"
#include "cpu/isa/attention_common.h"
#include "cpu/isa/attention_fp32.h"
#include "cpu/isa/attention_bf16.h"
#include "cpu/isa/attention_amx.h"

namespace dk::cpu::DK_ISA_NAME {
namespace {

// ---- one (batch, kv head) work item -----------------------------------------------------------
// kMode: 0 = fp32 FMA (every ISA; bf16/fp16 converted while packing), 1 = vdpbf16ps, 2 = AMX.
template <class T, int kMode>
void group(const AttnArgs& a, int64_t b, int64_t h) {
  Scratch& s = scratch();
  const int64_t T_ = a.T, D = a.D, G = a.Hq / a.Hkv, M = T_ * G;
  const int64_t Mp = kMode == 2 ? (M + 15) / 16 * 16 : M;  // AMX works on 16-row tiles
  const int64_t P = a.prefix_lens[b];
  const float c = a.sm_scale * kLog2e;
  const T* q = static_cast<const T*>(a.q) + b * a.q_sb;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* v = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;

  float* O = s.o.get<float>(size_t(Mp * D));
  float* mrow = s.ml.get<float>(size_t((2 + W) * Mp));
  float* lrow = mrow + Mp;
  float* Lv = lrow + Mp;  // W lane sums per row during the prefix (reduced into lrow after it)
  for (int64_t i = 0; i < Mp; ++i) mrow[i] = kNegInf;
  std::memset(lrow, 0, size_t(Mp) * sizeof(float));  // (the W-lane paths set lrow from Lv after the prefix)
  if constexpr (kMode != 2) {                        // (the AMX path accumulates in O^T and writes all of O from it)
    std::memset(O, 0, size_t(Mp * D) * sizeof(float));
    std::memset(Lv, 0, size_t(W * M) * sizeof(float));
  }
  float* row = s.row.get<float>(size_t(4 * D + 64));

  // Q rows of the group: fp32, or raw bf16 for the vdpbf16ps / AMX paths (zero pad rows for AMX).
  float* Qf = nullptr;
  uint16_t* Qb = nullptr;
  // AMX consumes d in chunks of 32: Q rows (and K pair rows) are zero padded to Dq = roundup(D, 32).
  const int64_t Dq = kMode == 2 ? (D + 31) / 32 * 32 : D;
  if constexpr (kMode != 0) {
    Qb = s.q.get<uint16_t>(size_t(Mp * Dq));
    if (Mp > M || Dq > D) std::memset(Qb, 0, size_t(Mp * Dq) * 2);
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t g = 0; g < G; ++g)
        std::memcpy(Qb + (t * G + g) * Dq, q + t * a.q_st + (h * G + g) * a.q_sh, size_t(D) * 2);
  } else {
    Qf = s.q.get<float>(size_t(M * D));
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t g = 0; g < G; ++g) cvt_row(q + t * a.q_st + (h * G + g) * a.q_sh, Qf + (t * G + g) * D, D);
  }

  // ---- 1. dense prefix ----
  if (P > 0 || kMode == 2) {  // (the AMX path runs the tree keys as masked blocks too)
    if constexpr (kMode == 1) {
#if defined(DK_ISA_AVX512)
      float* S = s.s.get<float>(size_t(kR * kN));
      float alpha[16];
      const uint32_t* Qw = reinterpret_cast<const uint32_t*>(Qb);
      uint32_t* Kp = s.kt.get<uint32_t>(size_t(D / 2 * kN));
      uint32_t* Vp = s.vb.get<uint32_t>(size_t(kN / 2 * D));
      uint32_t* Pw = s.sc.get<uint32_t>(size_t(kR * kN / 2));
      const int64_t D2 = D / 2;
      for (int64_t s0 = 0; s0 < P; s0 += kN) {
        const int nv = int(std::min<int64_t>(kN, P - s0));
        BlockPrefetch pf;
        pf.start(k + (s0 + kN) * a.k_ss, a.k_ss, v + (s0 + kN) * a.v_ss, a.v_ss,
                 std::min<int64_t>(kN, std::max<int64_t>(0, P - s0 - kN)), D, (M + kR - 1) / kR);
        pack_k_bf16(reinterpret_cast<const bf16_t*>(k + s0 * a.k_ss), a.k_ss, nv, D, Kp);
        pack_v_bf16(reinterpret_cast<const bf16_t*>(v + s0 * a.v_ss), a.v_ss, nv, D, Vp);
        const int npairs = (nv + 1) / 2;
        for (int64_t r0 = 0; r0 < M; r0 += kR) {
          const int R = int(std::min<int64_t>(kR, M - r0));
          dispatch_rows(R, [&](auto RC) { s_tile_bf16<decltype(RC)::value>(Qw + r0 * D2, D2, Kp, S); });
          pf.step();
          softmax_rows<true>(R, S, nv, c, Pw, alpha, mrow + r0, Lv + r0 * W);
          dispatch_rows(R, [&](auto RC) { pv_tile_bf16<decltype(RC)::value>(O + r0 * D, D, alpha, Pw, npairs, Vp); });
        }
      }
#endif
    } else if constexpr (kMode == 2) {
#if defined(DK_ISA_AVX512)
      // Q^T pairs per row tile: Qt[i][p][r] = word p of row 16i + r (the 16 x 16 word blocks of Qb,
      // transposed).
      const int64_t ntiles = Mp / 16, D2q = Dq / 2;
      uint32_t* Qt = s.qt.get<uint32_t>(size_t(Mp * D2q));
      for (int64_t i = 0; i < ntiles; ++i)
        for (int64_t p0 = 0; p0 < D2q; p0 += 16) {
          __m512i r[16];
          for (int j = 0; j < 16; ++j)
            r[j] = _mm512_loadu_si512(reinterpret_cast<const uint32_t*>(Qb) + (16 * i + j) * D2q + p0);
          transpose16(r);
          for (int j = 0; j < 16; ++j) _mm512_storeu_si512(Qt + (i * D2q + p0 + j) * 16, r[j]);
        }
      float* Ot = s.ot.get<float>(size_t(Mp * D));  // O^T per row tile: [ntiles][D][16]
      std::memset(Ot, 0, size_t(Mp * D) * sizeof(float));
      uint32_t* Vt = s.kt.get<uint32_t>(size_t(kN / 2 * D));
      bf16_t* Kb = s.tk.get<bf16_t>(size_t(kN * Dq));   // Kc: the key block, packed
      float* St = s.p.get<float>(size_t(2 * 16 * kN));  // two of each: the tile pipeline below
      uint32_t* Pt = s.sc.get<uint32_t>(size_t(2 * 16 * kN / 2));
      uint16_t* kmt = s.km.get<uint16_t>(size_t(ntiles * kN));  // tree blocks: lane masks per tile
      int32_t* tl = s.act.get<int32_t>(size_t(ntiles));         // the row tiles a block is run for
      alignas(64) uint16_t km[kN];
      // Key blocks: the prefix in blocks of kN, then the tree keys P .. P+T-1 in blocks of kN, which
      // run the same tile code with per-lane masks (row m attends tree key j iff mask[m / G][j]);
      // a row tile that attends no key of a tree block skips it.
      const int64_t nprefix = (P + kN - 1) / kN, nblocks = nprefix + (T_ + kN - 1) / kN;
      auto block_range = [&](int64_t bi, int64_t& s0, int& nv) {
        s0 = bi < nprefix ? bi * kN : P + (bi - nprefix) * kN;
        nv = int(std::min<int64_t>(kN, (bi < nprefix ? P : P + T_) - s0));
      };
      const uint8_t* mb = a.mask + b * a.mask_sb;
      bool first = true;
      amx_config();
      for (int64_t bi = 0; bi < nblocks; ++bi) {
        int64_t s0, s1 = 0;
        int nv, nv1 = 0;
        block_range(bi, s0, nv);
        if (bi + 1 < nblocks) block_range(bi + 1, s1, nv1);
        const bool tree = bi >= nprefix, masked = tree || nv < kN;
        const uint16_t* kmask = km;
        int64_t kmask_st = 0;  // lane masks of tile i: kmask + i * kmask_st
        int64_t nt = 0;
        if (!tree) {
          for (int n = 0; n < kN; ++n) km[n] = n < nv ? 0xffff : 0;
          for (int64_t i = 0; i < ntiles; ++i) tl[nt++] = int32_t(i);
        } else {
          std::memset(kmt, 0, size_t(ntiles * kN) * 2);
          const int64_t j0 = s0 - P;
          for (int64_t t = 0; t < T_; ++t) {
            const uint8_t* mr = mb + t * a.mask_st;
            uint64_t bits = 0;
            for (int n = 0; n < nv; ++n) {
              const int64_t j = j0 + n;
              const bool on = a.mask_packed ? (mr[j >> 3] >> (j & 7)) & 1 : mr[j] != 0;
              bits |= uint64_t(on) << n;
            }
            for (int64_t g = 0; g < G && bits; ++g) {
              const int64_t m = t * G + g;
              for (uint64_t x = bits; x; x &= x - 1)
                kmt[(m >> 4) * kN + __builtin_ctzll(x)] |= uint16_t(1u << (m & 15));
            }
          }
          for (int64_t i = 0; i < ntiles; ++i) {
            bool any = false;
            for (int n = 0; n < nv && !any; ++n) any = kmt[i * kN + n] != 0;
            if (any) tl[nt++] = int32_t(i);
          }
          kmask = kmt;
          kmask_st = kN;
        }
        BlockPrefetch pf;
        pf.start(k + s1 * a.k_ss, a.k_ss, v + s1 * a.v_ss, a.v_ss, nv1, D, 4 * std::max<int64_t>(nt, 1));
        if (nt == 0) continue;
        pack_kc_bf16(reinterpret_cast<const bf16_t*>(k + s0 * a.k_ss), a.k_ss, nv, D, Dq, Kb);
        pack_vt_bf16(reinterpret_cast<const bf16_t*>(v + s0 * a.v_ss), a.v_ss, nv, D, Vt);
        // Software pipeline over the row tiles: in step j the tile unit is given the scores of tile
        // j+1 and P V of tile j-1 (whole: issuing P V in two halves from inside the softmax was ~7%
        // slower) before the vector units run the softmax of tile j (two score and two P buffers).
        // The pipeline drains at the end of the key block (running it across blocks was slower).
        amx_scores_t(Qt + tl[0] * D2q * 16, Dq, Kb, St);
        for (int64_t j = 0; j < nt; ++j) {
          const int64_t i = tl[j];
          float* Scur = St + (j & 1) * 16 * kN;
          uint32_t* Pcur = Pt + (j & 1) * 8 * kN;
          // the next block's K/V prefetches go out in four small bursts per tile (a burst of ~30
          // lines stalls on the fill buffers)
          pf.step();
          if (j + 1 < nt) amx_scores_t(Qt + tl[j + 1] * D2q * 16, Dq, Kb, St + ((j + 1) & 1) * 16 * kN);
          pf.step();
          if (j > 0) amx_pv_t(Pt + ((j - 1) & 1) * 8 * kN, Vt, D, Ot + tl[j - 1] * 16 * D);
          pf.step();
          const uint16_t* kmi = kmask + i * kmask_st;
          const __m512 al = masked ? softmax_t<true>(Scur, kmi, c, Pcur, mrow + 16 * i, lrow + 16 * i)
                                   : softmax_t<false>(Scur, kmi, c, Pcur, mrow + 16 * i, lrow + 16 * i);
          pf.step();
          // O^T *= alpha before this tile's P V (next step); the running max rarely moves
          if (!first && _mm512_cmp_ps_mask(al, _mm512_set1_ps(1.f), _CMP_NEQ_UQ)) {
            float* o = Ot + i * 16 * D;
            for (int64_t d = 0; d < D; ++d) _mm512_store_ps(o + 16 * d, _mm512_mul_ps(_mm512_load_ps(o + 16 * d), al));
          }
        }
        amx_pv_t(Pt + ((nt - 1) & 1) * 8 * kN, Vt, D, Ot + tl[nt - 1] * 16 * D);
        first = false;
      }
      amx_release();
      // O (row-major) from O^T, 16 x 16 blocks
      for (int64_t i = 0; i < ntiles; ++i)
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
          __m512i r[16];
          for (int j = 0; j < 16; ++j) r[j] = _mm512_load_si512(Ot + (i * D + d0 + j) * 16);
          transpose16(r);
          for (int j = 0; j < 16; ++j) _mm512_storeu_si512(O + (16 * i + j) * D + d0, r[j]);
        }
#endif
    } else {
      float* Kt = s.kt.get<float>(size_t(D * kN));
      float* Sall = s.p.get<float>(size_t(M * kN));  // scores, then probabilities, of every row
      float* alall = s.sc.get<float>(size_t(M + 16));
      float* Vb = nullptr;
      if constexpr (!std::is_same_v<T, float>) Vb = s.vb.get<float>(size_t(kN * D));
      for (int64_t s0 = 0; s0 < P; s0 += kN) {
        const int nv = int(std::min<int64_t>(kN, P - s0));
        BlockPrefetch pf;
        pf.start(k + (s0 + kN) * a.k_ss, a.k_ss, v + (s0 + kN) * a.v_ss, a.v_ss,
                 std::min<int64_t>(kN, std::max<int64_t>(0, P - s0 - kN)), D, 2 * ((M + kR - 1) / kR));
        pack_k_f32(k + s0 * a.k_ss, a.k_ss, nv, D, Kt, row);
        const float* vsrc;
        int64_t ldv;
        if constexpr (std::is_same_v<T, float>) {
          vsrc = v + s0 * a.v_ss;
          ldv = a.v_ss;
        } else {
          for (int n = 0; n < nv; ++n) cvt_row(v + (s0 + n) * a.v_ss, Vb + n * D, D);
          vsrc = Vb;
          ldv = D;
        }
        // Three sweeps over the group's rows so that one packed operand stays in L1 per sweep:
        // S = Q K^T (Kt resident), online softmax in place (S -> P), O = O*alpha + P V (V resident).
        for (int64_t r0 = 0; r0 < M; r0 += kR) {
          const int R = int(std::min<int64_t>(kR, M - r0));
          dispatch_rows(R, [&](auto RC) { s_tile_f32<decltype(RC)::value>(Qf + r0 * D, D, Kt, Sall + r0 * kN); });
          pf.step();
        }
        for (int64_t r0 = 0; r0 < M; r0 += 16) {
          const int R = int(std::min<int64_t>(16, M - r0));
          softmax_rows<false>(R, Sall + r0 * kN, nv, c, Sall + r0 * kN, alall + r0, mrow + r0, Lv + r0 * W);
        }
        for (int64_t r0 = 0; r0 < M; r0 += kR) {
          const int R = int(std::min<int64_t>(kR, M - r0));
          dispatch_rows(R, [&](auto RC) {
            pv_tile_f32<decltype(RC)::value>(O + r0 * D, D, alall + r0, Sall + r0 * kN, nv, vsrc, ldv);
          });
          pf.step();
        }
      }
    }
  }

  if constexpr (kMode != 2)  // the AMX path keeps lrow itself
    for (int64_t i = 0; i < M; ++i) lrow[i] = VT::hsum(VT::load(Lv + i * W));

  // ---- 2. sparse tree part (the AMX path did it above) ----
  if constexpr (kMode != 2) {
    float* Kt = s.tk.get<float>(size_t(T_ * D));  // tree keys / values, fp32 rows
    float* Vt = s.tv.get<float>(size_t(T_ * D));
    for (int64_t j = 0; j < T_; ++j) {
      cvt_row(k + (P + j) * a.k_ss, Kt + j * D, D);
      cvt_row(v + (P + j) * a.v_ss, Vt + j * D, D);
    }
    int32_t* keys = s.keys.get<int32_t>(size_t(T_));
    float* sc = s.sc.get<float>(size_t(T_ + W));
    float* qrow = row;
    const uint8_t* mb = a.mask + b * a.mask_sb;
    for (int64_t t = 0; t < T_; ++t) {
      const uint8_t* mr = mb + t * a.mask_st;
      int nk = 0;
      if (a.mask_packed) {
        for (int64_t j = 0; j < T_; ++j)
          if ((mr[j >> 3] >> (j & 7)) & 1) keys[nk++] = int32_t(j);
      } else {
        for (int64_t j = 0; j < T_; ++j)
          if (mr[j]) keys[nk++] = int32_t(j);
      }
      if (nk == 0) continue;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t m = t * G + g;
        const float* qm;
        if constexpr (kMode != 0) {
          cvt_row(q + t * a.q_st + (h * G + g) * a.q_sh, qrow, D);
          qm = qrow;
        } else {
          qm = Qf + m * D;
        }
        float mx = kNegInf;
        for (int i = 0; i < nk; ++i) {
          sc[i] = dot_f32(qm, Kt + keys[i] * D, D) * c;
          mx = std::max(mx, sc[i]);
        }
        const float m_new = std::max(mrow[m], mx);
        const float al = std::exp2(mrow[m] - m_new);
        for (int i = nk; i < ((nk + W - 1) / W) * W; ++i) sc[i] = kNegInf;
        const V mv = VT::set1(m_new);
        for (int i = 0; i < nk; i += W) VT::store(sc + i, VT::exp2(VT::sub(VT::load(sc + i), mv)));
        float* o = O + m * D;
        float lsum = 0.f;
        const V av = VT::set1(al);
        for (int64_t d = 0; d < D; d += W) VT::store(o + d, VT::mul(VT::load(o + d), av));
        for (int i = 0; i < nk; ++i) {
          const float p = sc[i];
          lsum += p;
          const V pv = VT::set1(p);
          const float* vr = Vt + keys[i] * D;
          for (int64_t d = 0; d < D; d += W) VT::store(o + d, VT::fma(pv, VT::load(vr + d), VT::load(o + d)));
        }
        lrow[m] = lrow[m] * al + lsum;
        mrow[m] = m_new;
      }
    }
  }

  // ---- 3. normalise, write out and lse ----
  T* out = static_cast<T*>(a.out);
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t m = t * G + g, hq = h * G + g;
      const int64_t oi = ((b * T_ + t) * a.Hq + hq);
      T* dst = out + oi * D;
      const float l = lrow[m];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      store_scaled(dst, O + m * D, inv, D);
      a.lse[oi] = l > 0.f ? mrow[m] * kLn2 + std::log(l) : kNegInf;
    }
}

void tree_attention(const AttnArgs& a, int64_t begin, int64_t end) {
#if defined(DK_ISA_AVX512)
  const int bf16 = a.dtype == DType::BF16 ? bf16_mode() : 0;
#endif
  for (int64_t w = begin; w < end; ++w) {
    const int64_t b = w / a.Hkv, h = w % a.Hkv;
    switch (a.dtype) {
      case DType::F32: group<float, 0>(a, b, h); break;
#if defined(DK_ISA_AVX512)
      case DType::BF16:
        switch (bf16) {
          case 2: group<bf16_t, 2>(a, b, h); break;
          case 1: group<bf16_t, 1>(a, b, h); break;
          default: group<bf16_t, 0>(a, b, h); break;
        }
        break;
#else
      case DType::BF16: group<bf16_t, 0>(a, b, h); break;
#endif
      case DType::F16: group<f16_t, 0>(a, b, h); break;
    }
  }
}

}  // namespace
}  // namespace dk::cpu::DK_ISA_NAME

namespace dk::cpu {
#define DK_ATTN_STR2(x) #x
#define DK_ATTN_STR(x) DK_ATTN_STR2(x)
#define DK_ATTN_CAT2(a, b) a##b
#define DK_ATTN_CAT(a, b) DK_ATTN_CAT2(a, b)
const AttnTable& DK_ATTN_CAT(attn_table_, DK_ISA_NAME)() {
  static const AttnTable t{DK_ATTN_STR(DK_ISA_NAME), &DK_ISA_NAME::tree_attention};
  return t;
}
}  // namespace dk::cpu
