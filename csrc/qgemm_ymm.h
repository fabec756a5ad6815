// 256-bit (ymm) register tile shared by the AVX2 and AVX-VNNI translation units: R rows x
// 16 columns of int32 accumulators (two ymm per row), or of int16 partial sums plus the
// int32 sums they are widened into, the int8 products supplied by the including file's
// Mac, the fp32 epilogue in ref_epilogue's order on 16 columns (8 at a ragged edge).
//
// Include it after the file's `#pragma GCC target` (so this code is compiled for that
// target) and after <immintrin.h> / qgnn_cpu.h. Everything here has internal linkage: the
// two translation units' copies, compiled for different targets, never merge (ODR).
#pragma once

#include "epi_flags.h"

namespace qgnn {
void epi_store_scalar(const Epi& e, int64_t m, int o, int32_t acc, int32_t as);

namespace {  // one copy per including ISA translation unit, on purpose

inline int32_t load32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Epi's scalars and pointers copied to locals once per block: the uint8 output stores may
// alias anything, and would otherwise force a reload of every Epi field after each store.
struct EpiY {
  const float *c1, *c3, *post_scale, *post_shift, *residual;
  const int32_t* nzw;
  float* out_f;
  int32_t* acc_out;
  int64_t O;
  int32_t wbias;
  float slope;
  Requant rq;
  const int32_t* zws;
  const float *t2, *t4;
  bool as_first, has_slope, zrem, slope_in01;
  explicit EpiY(const Epi& e)
      : c1(e.c1), c3(e.c3), post_scale(e.post_scale), post_shift(e.post_shift), residual(e.residual), nzw(e.nzw),
        out_f(e.out_f), acc_out(e.acc_out), O(e.O), wbias(e.wbias), slope(e.slope), rq(e.rq), zws(e.zws_tab),
        t2(e.t2_tab), t4(e.t4_tab), as_first(e.as_first),
        has_slope(e.has_slope), zrem(e.zero_rem), slope_in01(e.slope > 0.f && e.slope <= 1.f) {}
};

// The column operands of 8 full columns [o, o+8), loaded once per tile block: the code
// stores may alias anything, so operands re-read per row were loaded again after every store.
struct Cols8 {
  __m256i nzw;
  __m256 c1, c3, ps, sh;
};
inline Cols8 load_cols8(const EpiY& e, int o) {
  Cols8 c;
  c.nzw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.nzw + o));
  c.c1 = _mm256_loadu_ps(e.c1 + o);
  c.c3 = e.zrem ? _mm256_setzero_ps() : _mm256_loadu_ps(e.c3 + o);
  c.ps = e.post_scale ? _mm256_loadu_ps(e.post_scale + o) : _mm256_setzero_ps();
  c.sh = e.post_shift ? _mm256_loadu_ps(e.post_shift + o) : _mm256_setzero_ps();
  return c;
}

// The epilogue in ref_epilogue's order, on 8 full columns [o, o+8) of row m, in two
// stages: the centred identity (acc_out written here), then post_scale, post_shift,
// residual and LeakyReLU. F: the epilogue's flags (epi_flags.h)
template <int F>
inline __m256 epi8_affine(const EpiY& e, const Cols8& c, const EpiRow& rw, int64_t m, int o, __m256i acc) {
#define HAS(flag, rt) EPI_HAS(F, flag, rt)
  const __m256i asv = _mm256_set1_epi32(rw.as);
  if (HAS(kACC, e.acc_out != nullptr))
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(e.acc_out + m * e.O + o), _mm256_add_epi32(acc, _mm256_set1_epi32(e.wbias * rw.as)));
  // ACC' = ACC + (wbias - zw)*AS - za*WS'   (int32, wrapping like the reference's int32)
  acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(c.nzw, asv));
  acc = _mm256_sub_epi32(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.zws + rw.prow + o)));
  __m256 y = _mm256_mul_ps(c.c1, _mm256_cvtepi32_ps(acc));
  if (!HAS(kZREM, e.zrem)) {  // the remainder terms (signed zeros for code outputs of a snapped layer)
    const __m256 t2 = _mm256_loadu_ps(e.t2 + rw.prow + o);
    const __m256 t3 = _mm256_mul_ps(c.c3, _mm256_set1_ps(rw.asp));
    y = HAS(kASFIRST, e.as_first) ? _mm256_add_ps(_mm256_add_ps(y, t3), t2) : _mm256_add_ps(_mm256_add_ps(y, t2), t3);
    y = _mm256_add_ps(y, _mm256_loadu_ps(e.t4 + rw.prow + o));
  }
  return y;
#undef HAS
}

template <int F>
inline __m256 epi8_post(const EpiY& e, const Cols8& c, int64_t m, int o, __m256 y) {
#define HAS(flag, rt) EPI_HAS(F, flag, rt)
  if (HAS(kPS, e.post_scale != nullptr)) y = _mm256_mul_ps(y, c.ps);
  if (HAS(kSH, e.post_shift != nullptr)) y = _mm256_add_ps(y, c.sh);
  if (HAS(kRES, e.residual != nullptr)) y = _mm256_add_ps(y, _mm256_loadu_ps(e.residual + m * e.O + o));
  if (HAS(kSLOPE, e.has_slope)) {
    const __m256 ys = _mm256_mul_ps(y, _mm256_set1_ps(e.slope));
    if (e.slope_in01) {
      // 0 < slope <= 1: y*slope >= y exactly where y < 0; max returns its second operand,
      // y, on ties and NaN (as the select does for y >= 0, denormals-are-zero included)
      y = _mm256_max_ps(ys, y);
    } else {
      const __m256 pos = _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_GE_OQ);
      y = _mm256_blendv_ps(ys, y, pos);
    }
  }
  return y;
#undef HAS
}

// the codes clamp(rne((y - l_k) / s_k), 0, qmax_k) of quantizer k for the N vectors y as
// int32 lanes: the quotient by the reciprocal, lanes within 1e-4 of a half-integer redone
// with the exact division (the argument of epi16 in qgemm_avx512.cpp), one test for all N
template <int N>
inline void requant(const EpiY& e, int k, const __m256 (&y)[N], __m256i (&q)[N]) {
  const __m256 l = _mm256_set1_ps(e.rq.out_l[k]), inv = _mm256_set1_ps(e.rq.inv_out_s[k]);
  __m256 num[N], u[N], r[N], near[N], any = _mm256_setzero_ps();
  for (int i = 0; i < N; ++i) {
    num[i] = _mm256_sub_ps(y[i], l);
    u[i] = _mm256_mul_ps(num[i], inv);
    r[i] = _mm256_round_ps(u[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 absfrac = _mm256_andnot_ps(_mm256_set1_ps(-0.f), _mm256_sub_ps(u[i], r[i]));
    near[i] = _mm256_cmp_ps(absfrac, _mm256_set1_ps(0.4999f), _CMP_GT_OQ);
    any = _mm256_or_ps(any, near[i]);
  }
  if (!_mm256_testz_ps(any, any)) {
    const __m256 s = _mm256_set1_ps(e.rq.out_s[k]);
    for (int i = 0; i < N; ++i)
      r[i] = _mm256_round_ps(_mm256_blendv_ps(u[i], _mm256_div_ps(num[i], s), near[i]),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // qmax first: min returns its second operand, so a NaN lane stays NaN; cvtt turns NaN
  // and negatives into negative int32, which the unsigned packs saturate to code 0
  const __m256 qm = _mm256_set1_ps(e.rq.qmax[k]);
  for (int i = 0; i < N; ++i) q[i] = _mm256_cvttps_epi32(_mm256_min_ps(qm, r[i]));
}

// 8 int32 lanes holding codes 0..255 (or negative: 0) -> their 8 bytes in the low half
inline __m128i pack_codes8(__m256i q) {
  const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  return _mm_packus_epi16(w16, w16);
}

// 8 full columns [o, o+8) of row m
template <int F>
inline void epi8(const EpiY& e, const Cols8& c, const EpiRow& rw, int64_t m, int o, __m256i acc) {
  const int64_t base = m * e.O + o;
  const __m256 y[1] = {epi8_post<F>(e, c, m, o, epi8_affine<F>(e, c, rw, m, o, acc))};
  if (!EPI_HAS(F, kQUANT, e.rq.nq != 0)) {
    _mm256_storeu_ps(e.out_f + base, y[0]);
    return;
  }
  for (int k = 0; k < e.rq.nq; ++k) {
    __m256i q[1];
    requant<1>(e, k, y, q);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(e.rq.out_q[k] + base), pack_codes8(q[0]));
  }
}

// 16 full columns [o, o+16) of the R rows m0.. of a block, stage by stage across the rows:
// one row's epilogue is a chain of ~25 dependent fp32 steps, and issued row after row the
// chains filled the scheduler (a 6-row block's epilogue on one Zen 3 core: 0.59 -> 0.42 ns
// per output, interleaved this way)
template <int F, int R>
inline void epi16_rows(const EpiY& e, const Cols8 (&c)[2], const EpiRow (&rw)[R], int64_t m0, int o,
                       const __m256i (&acc)[R][2]) {
  __m256 y[R][2];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2; ++j) y[r][j] = epi8_affine<F>(e, c[j], rw[r], m0 + r, o + 8 * j, acc[r][j]);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2; ++j) y[r][j] = epi8_post<F>(e, c[j], m0 + r, o + 8 * j, y[r][j]);
  for (int r = 0; r < R; ++r) {
    const int64_t base = (m0 + r) * e.O + o;
    if (!EPI_HAS(F, kQUANT, e.rq.nq != 0)) {
      _mm256_storeu_ps(e.out_f + base, y[r][0]);
      _mm256_storeu_ps(e.out_f + base + 8, y[r][1]);
      continue;
    }
    for (int k = 0; k < e.rq.nq; ++k) {
      __m256i q[2];
      requant<2>(e, k, y[r], q);
      // packus works per 128-bit lane: [q0 lo, q1 lo, q0 hi, q1 hi] -> columns in order
      const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(q[0], q[1]), 0xD8);
      const __m128i b8 = _mm_packus_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(e.rq.out_q[k] + base), b8);
    }
  }
}

// R rows x 16 columns [oc, oc+16) of the 64-column weight block wb (ocb: oc within it).
// Mac::step(acc, a, w) adds the products of a's uint8 codes and w's int8 to acc: per int32
// lane all 4 of them, or, for a Mac with kWiden, per int16 lane a pair (int16 partial sums,
// widened into int32 sums after every t.pair_run steps, before they can overflow).
// F: the epilogue's flags (epi_flags.h). OneRun (a kWiden Mac whose whole K is one pair
// run, taps * c4n <= pair_run: tiny's 16- and 32-channel 3x3 convs, most 1x1 ones): no int32
// sums, the int16 ones widened once at the end, so that twice the rows fit the registers.
template <class Mac, int R, int F, bool OneRun>
inline void ymm_block(const TileArgs& t, const int8_t* wb, int r0, int ocb, int oc) {
  __m256i acc[R][2], sum[R][2];  // sum: unused (and dropped) when OneRun
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = sum[r][0] = sum[r][1] = _mm256_setzero_si256();
  const auto widen = [&] {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 2; ++j) {
        sum[r][j] = _mm256_add_epi32(sum[r][j], _mm256_madd_epi16(acc[r][j], _mm256_set1_epi16(1)));
        acc[r][j] = _mm256_setzero_si256();
      }
  };
  const uint8_t* const* P = t.ptrs + r0;
  // the group's 64 bytes per k4: contiguous (PackedW::ymm) or 256 apart (PackedW::data)
  const int8_t* w = wb + (t.ymm_layout ? ocb * t.Kp : ocb * 4);
  const int wstep = t.ymm_layout ? 64 : 256;
  int left = t.pair_run;
  for (int tap = 0; tap < t.taps; ++tap) {
    const uint8_t* p[R];
    for (int r = 0; r < R; ++r) p[r] = P[r] + t.toff[tap];
    for (int c4 = 0; c4 < t.c4n; ++c4, w += wstep) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
      for (int r = 0; r < R; ++r) {
        const __m256i av = _mm256_set1_epi32(load32(p[r] + 4 * c4));
        acc[r][0] = Mac::step(acc[r][0], av, w0);
        acc[r][1] = Mac::step(acc[r][1], av, w1);
      }
      if constexpr (Mac::kWiden && !OneRun) {
        if (--left == 0) {
          widen();
          left = t.pair_run;
        }
      }
    }
  }
  if constexpr (OneRun) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 2; ++j) acc[r][j] = _mm256_madd_epi16(acc[r][j], _mm256_set1_epi16(1));
  } else if constexpr (Mac::kWiden) {
    widen();
    for (int r = 0; r < R; ++r) acc[r][0] = sum[r][0], acc[r][1] = sum[r][1];
  }
  const Epi& e = *t.e;
  const EpiY ey(e);
  if (oc + 16 <= e.O) {
    const Cols8 c[2] = {load_cols8(ey, oc), load_cols8(ey, oc + 8)};
    EpiRow rw[R];
    for (int r = 0; r < R; ++r) rw[r] = epi_row(e, t.rpat ? t.rpat[r0 + r] : 0, t.as[r0 + r]);
    epi16_rows<F, R>(ey, c, rw, static_cast<int64_t>(t.m0) + r0, oc, acc);
    return;
  }
  for (int r = 0; r < R; ++r) {
    const int64_t m = static_cast<int64_t>(t.m0) + r0 + r;
    const int32_t as = t.as[r0 + r];
    const EpiRow rw = epi_row(e, t.rpat ? t.rpat[r0 + r] : 0, as);
    for (int j = 0; j < 2; ++j) {
      const int o = oc + 8 * j;
      if (o + 8 <= e.O) {
        epi8<F>(ey, load_cols8(ey, o), rw, m, o, acc[r][j]);
      } else if (o < e.O) {
        alignas(32) int32_t tmp[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc[r][j]);
        for (int c = 0; o + c < e.O; ++c) epi_store_scalar(e, m, o + c, tmp[c], as);
      }
    }
  }
}

// the last rows % MR rows of a column group: one ymm_block<Mac, left, F, OneRun>
template <class Mac, int R, int F, bool OneRun>
inline void ymm_tail(const TileArgs& t, const int8_t* wb, int r0, int ocb, int oc, int left) {
  if constexpr (R > 0) {
    if (left == R)
      ymm_block<Mac, R, F, OneRun>(t, wb, r0, ocb, oc);
    else
      ymm_tail<Mac, R - 1, F, OneRun>(t, wb, r0, ocb, oc, left);
  }
}

// every 16-column group of every weight block, MR rows at a time
template <class Mac, int MR, int F, bool OneRun>
void ymm_groups(const TileArgs& t) {
  for (int ob = t.ob0; ob < t.ob0 + t.nblk; ++ob) {
    const int8_t* wb = t.wdata + static_cast<size_t>(ob) * t.Kp * 64;
    for (int q = 0; q < 4; ++q) {
      const int oc = ob * 64 + q * 16;
      if (oc >= t.O) break;
      int r0 = 0;
      for (; r0 + MR <= t.rows; r0 += MR) ymm_block<Mac, MR, F, OneRun>(t, wb, r0, q * 16, oc);
      ymm_tail<Mac, MR - 1, F, OneRun>(t, wb, r0, q * 16, oc, t.rows - r0);
    }
  }
}

// The whole TileArgs contract with the epilogue of flags F (-1: read at run time): MR rows
// per block, or MR1 where K is one pair run (OneRun)
template <class Mac, int MR, int MR1, int F>
void ymm_tile_with(const TileArgs& t) {
  const Epi& e = *t.e;
  if (e.as_out && t.ob0 == 0)
    for (int r = 0; r < t.rows; ++r) e.as_out[t.m0 + r] = t.as[r];
  if constexpr (Mac::kWiden) {
    if (t.taps * t.c4n <= t.pair_run) return ymm_groups<Mac, MR1, F, true>(t);
  }
  ymm_groups<Mac, MR, F, false>(t);
}

// ymm_tile_with the folded layers' epilogues compiled with their flags known (straight-line
// code; with the flags read at run time a 16 -> 16 1x1 conv on one Zen 3 core was 8%
// slower to codes, 19% to fp32)
template <class Mac, int MR, int MR1>
void ymm_tile(const TileArgs& t) {
  with_epi_flags(*t.e, [&](auto f) { ymm_tile_with<Mac, MR, MR1, decltype(f)::value>(t); });
}

}  // namespace
}  // namespace qgnn
