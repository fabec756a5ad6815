// The fp32 epilogue of ref_epilogue on 16-column zmm vectors, shared by the AVX-512 VNNI
// tile (qgemm_avx512.cpp) and the AMX tile (qgemm_amx.cpp), which both finish their int32
// accumulators with it. Include it after the file's `#pragma GCC target` (AVX-512) and
// after <immintrin.h> / qgnn_cpu.h; everything here has internal linkage (one copy per
// including translation unit, never merged across targets: ODR).
#pragma once

#include "epi_flags.h"

namespace qgnn {
namespace {  // one copy per including ISA translation unit, on purpose

// The per-column operands of one 16-column group, loaded once for all rows of a block.
// kFUSED: c1 and c3 hold FusedEpi's c1*ps and c3*ps, ps and sh are unused.
struct Cols {
  __m512i nzw;
  __m512 c1, c3, ps, sh;
};

// Scalars and pointers of Epi copied to locals: the uint8 output stores may alias
// anything, and would otherwise force a reload of every Epi field after each store.
struct EpiK {
  const float* residual;
  float* out_f;
  int32_t* acc_out;
  int64_t O;
  int32_t wbias;
  float slope;
  Requant rq;
  FusedEpi fz;
  const Epi* epi;  // the columns of the rows a fused epilogue redoes
  const int32_t* zws;
  const float *t2, *t4;
  bool ps, sh, res, has_slope, as_first, zrem, cent;
  explicit EpiK(const Epi& e)
      : residual(e.residual), out_f(e.out_f), acc_out(e.acc_out), O(e.O), wbias(e.wbias), slope(e.slope), rq(e.rq),
        fz(e.fz), epi(&e), zws(e.zws_tab), t2(e.t2_tab), t4(e.t4_tab), ps(e.post_scale != nullptr),
        sh(e.post_shift != nullptr), res(e.residual != nullptr), has_slope(e.has_slope), as_first(e.as_first),
        zrem(e.zero_rem), cent(e.centred) {}
};

// F: the epilogue's flags (a fused one loads its own two columns only)
template <int F>
__attribute__((always_inline)) inline Cols load_cols(const Epi& e, int o, __mmask16 mk) {
  Cols c;
  c.nzw = _mm512_maskz_loadu_epi32(mk, e.nzw + o);
  if constexpr (F >= 0 && (F & kFUSED) != 0) {
    c.c1 = _mm512_maskz_loadu_ps(mk, e.fz.c1 + o);
    c.c3 = _mm512_maskz_loadu_ps(mk, e.fz.c3 + o);
    c.ps = c.sh = _mm512_setzero_ps();
    return c;
  }
  c.c1 = _mm512_maskz_loadu_ps(mk, e.c1 + o);
  c.c3 = _mm512_maskz_loadu_ps(mk, e.c3 + o);
  c.ps = e.post_scale ? _mm512_maskz_loadu_ps(mk, e.post_scale + o) : _mm512_setzero_ps();
  c.sh = e.post_shift ? _mm512_maskz_loadu_ps(mk, e.post_shift + o) : _mm512_setzero_ps();
  return c;
}

// The epilogue in ref_epilogue's order on 16 columns [o, o+16) of row m (mask = columns
// < O), in stages: the centred identity (acc_out written here), then post_scale,
// post_shift, residual and LeakyReLU, then the requantization or the fp32 store.
// F: its flags (epi_flags.h).
template <int F>
inline __m512 epi16_affine(const EpiK& e, const Cols& c, const EpiRow& rw, int64_t m, int o, __mmask16 mk,
                           __m512i acc) {
#define HAS(flag, rt) EPI_HAS(F, flag, rt)
  const bool cent = HAS(kCENT, e.cent);
  if (HAS(kACC, e.acc_out != nullptr)) {
    // raw ACC = kernel ACC + wbias*AS, or + zw*AS = (wbias - nzw)*AS when centred
    const __m512i as = _mm512_set1_epi32(rw.as), wb = _mm512_set1_epi32(e.wbias);
    const __m512i add = cent ? _mm512_mullo_epi32(_mm512_sub_epi32(wb, c.nzw), as) : _mm512_mullo_epi32(wb, as);
    _mm512_mask_storeu_epi32(e.acc_out + m * e.O + o, mk, _mm512_add_epi32(acc, add));
  }
  // ACC' = ACC + (wbias - zw)*AS - za*WS'   (int32, wrapping like the reference's int32)
  if (!cent) acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(c.nzw, _mm512_set1_epi32(rw.as)));
  acc = _mm512_sub_epi32(acc, _mm512_maskz_loadu_epi32(mk, e.zws + rw.prow + o));
  __m512 y = _mm512_mul_ps(c.c1, _mm512_cvtepi32_ps(acc));
  if (!HAS(kZREM, e.zrem)) {
    const __m512 t3 = _mm512_mul_ps(c.c3, _mm512_set1_ps(rw.asp));
    const __m512 t2 = _mm512_maskz_loadu_ps(mk, e.t2 + rw.prow + o);
    if (HAS(kASFIRST, e.as_first)) {
      y = _mm512_add_ps(_mm512_add_ps(y, t3), t2);
    } else {
      y = _mm512_add_ps(_mm512_add_ps(y, t2), t3);
    }
    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mk, e.t4 + rw.prow + o));
  }
  return y;
#undef HAS
}

// base: m * O + o
template <int F>
inline __m512 epi16_post(const EpiK& e, const Cols& c, int64_t base, __mmask16 mk, __m512 y) {
#define HAS(flag, rt) EPI_HAS(F, flag, rt)
  if (HAS(kPS, e.ps)) y = _mm512_mul_ps(y, c.ps);
  if (HAS(kSH, e.sh)) y = _mm512_add_ps(y, c.sh);
  if (HAS(kRES, e.res)) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mk, e.residual + base));
  if (HAS(kSLOPE, e.has_slope)) {
    // y >= 0 ? y : y * slope  (NaN compares false and is multiplied, as torch.where does)
    const __mmask16 neg = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_NGE_UQ);
    y = _mm512_mask_mul_ps(y, neg, y, _mm512_set1_ps(e.slope));
  }
  return y;
#undef HAS
}

// The codes clamp(rne((y - l_k) / s_k), 0, qmax_k) of quantizer k for the N vectors y, as
// int32 lanes. rne((y - l) / s) via the reciprocal: relative error <= 2^-23, i.e. < 1e-4
// absolute for |u| < 512, so the rounding can only differ within 1e-4 of a half-integer;
// those lanes (rare; vreduceps gives u - rne(u)) take the exact IEEE division, one test for
// all N. For |u| >= 512 the clamp to [0, qmax <= 255] decides whatever the rounding.
// Clamping before rounding is the same as after (integer bounds, rounding is monotone).
template <int N>
inline void requant16(const EpiK& e, int k, const __m512 (&y)[N], __m512i (&q)[N]) {
  const __m512 l = _mm512_set1_ps(e.rq.out_l[k]), inv = _mm512_set1_ps(e.rq.inv_out_s[k]);
  __m512 num[N], u[N];
  __mmask16 near[N], any = 0;
  for (int i = 0; i < N; ++i) {
    num[i] = _mm512_sub_ps(y[i], l);
    u[i] = _mm512_mul_ps(num[i], inv);
    const __m512 frac = _mm512_reduce_ps(u[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    near[i] = _mm512_cmp_ps_mask(_mm512_abs_ps(frac), _mm512_set1_ps(0.4999f), _CMP_GT_OQ);
    any |= near[i];
  }
  if (any) {
    const __m512 s = _mm512_set1_ps(e.rq.out_s[k]);
    for (int i = 0; i < N; ++i) u[i] = _mm512_mask_div_ps(u[i], near[i], num[i], s);
  }
  // NaN: max(NaN, 0) returns the second operand (0)
  const __m512 qm = _mm512_set1_ps(e.rq.qmax[k]);
  for (int i = 0; i < N; ++i)
    q[i] = _mm512_cvt_roundps_epi32(_mm512_min_ps(_mm512_max_ps(u[i], _mm512_setzero_ps()), qm),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// The epilogue of the R rows m0.. of a block on one 16-column group in the reference's
// order, stage by stage across the rows: one row's is a chain of ~25 dependent fp32 steps,
// and issued row after row the chains filled the scheduler (as on the AVX2 tile, qgemm_ymm.h)
template <int F, int R>
inline void epi16_rows_exact(const EpiK& e, const Cols& c, const EpiRow* rw, int64_t m0, int o, __mmask16 mk,
                             const __m512i (&acc)[R]) {
  __m512 y[R];
  for (int r = 0; r < R; ++r) y[r] = epi16_affine<F>(e, c, rw[r], m0 + r, o, mk, acc[r]);
  for (int r = 0; r < R; ++r) y[r] = epi16_post<F>(e, c, (m0 + r) * e.O + o, mk, y[r]);
  if (!EPI_HAS(F, kQUANT, e.rq.nq != 0)) {
    if (mk == 0xFFFF)  // a masked store costs more (Zen 4: 1x1 convs 1-4%)
      for (int r = 0; r < R; ++r) _mm512_storeu_ps(e.out_f + (m0 + r) * e.O + o, y[r]);
    else
      for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(e.out_f + (m0 + r) * e.O + o, mk, y[r]);
    return;
  }
  for (int k = 0; k < e.rq.nq; ++k) {
    __m512i q[R];
    requant16<R>(e, k, y, q);
    if (mk == 0xFFFF)  // a masked store costs more (Zen 4: 1x1 convs 1-4%)
      for (int r = 0; r < R; ++r) _mm_storeu_si128(reinterpret_cast<__m128i*>(e.rq.out_q[k] + (m0 + r) * e.O + o), _mm512_cvtepi32_epi8(q[r]));
    else
      for (int r = 0; r < R; ++r) _mm_mask_storeu_epi8(e.rq.out_q[k] + (m0 + r) * e.O + o, mk, _mm512_cvtepi32_epi8(q[r]));
  }
}

// The fused epilogue (FusedEpi) of the R rows: stores their codes and returns the mask of
// the rows with a quotient within its bound of a rounding boundary, which the caller redoes
// in the reference's order. ACC' as epi16_affine (int32, wrapping).
template <int F, int R>
inline unsigned epi16_rows_fused(const EpiK& e, const Cols& c, const EpiRow* rw, int64_t m0, int o, __mmask16 mk,
                                 const __m512i (&acc)[R]) {
  constexpr bool cent = (F & kCENT) != 0, res = (F & kRES) != 0, slope = (F & kSLOPE) != 0;
  __m512 z[R];
  __mmask16 neg[R];
  for (int r = 0; r < R; ++r) {
    __m512i a = acc[r];
    if (!cent) a = _mm512_add_epi32(a, _mm512_mullo_epi32(c.nzw, _mm512_set1_epi32(rw[r].as)));
    a = _mm512_sub_epi32(a, _mm512_maskz_loadu_epi32(mk, e.zws + rw[r].prow + o));
    const __m512 t24 = _mm512_maskz_loadu_ps(mk, e.fz.t24_tab + rw[r].prow + o);
    const __m512 b = _mm512_fmadd_ps(c.c3, _mm512_set1_ps(rw[r].asp), t24);
    z[r] = _mm512_fmadd_ps(c.c1, _mm512_cvtepi32_ps(a), b);
  }
  for (int r = 0; r < R; ++r) {
    if (res) z[r] = _mm512_add_ps(z[r], _mm512_maskz_loadu_ps(mk, e.residual + (m0 + r) * e.O + o));
    // the exact epilogue's LeakyReLU test (NaN counts as negative; its code is 0 either way)
    if (slope) neg[r] = _mm512_cmp_ps_mask(z[r], _mm512_setzero_ps(), _CMP_NGE_UQ);
  }
  // lanes near a boundary, per row and in all: the per-row bits only where there is one
  __mmask16 near[R] = {}, any = 0;
  for (int k = 0; k < e.rq.nq; ++k) {
    const __m512 mp = _mm512_set1_ps(e.fz.mpos[k]), mn = _mm512_set1_ps(e.fz.mneg[k]);
    const __m512 nl = _mm512_set1_ps(e.fz.nl[k]), qm = _mm512_set1_ps(e.rq.qmax[k]);
    const __m512 room = _mm512_set1_ps(e.fz.room[k]);
    uint8_t* const out = e.rq.out_q[k];
    for (int r = 0; r < R; ++r) {
      const __m512 m = slope ? _mm512_mask_blend_ps(neg[r], mp, mn) : mp;
      // NaN: max(NaN, 0) returns the second operand (0)
      const __m512 u = _mm512_min_ps(_mm512_max_ps(_mm512_fmadd_ps(z[r], m, nl), _mm512_setzero_ps()), qm);
      const __m512 frac = _mm512_abs_ps(_mm512_reduce_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      near[r] |= _mm512_mask_cmp_ps_mask(mk, frac, room, _CMP_NLT_UQ);
      any |= near[r];
      const __m128i q =
          _mm512_cvtepi32_epi8(_mm512_cvt_roundps_epi32(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      if (mk == 0xFFFF)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (m0 + r) * e.O + o), q);
      else
        _mm_mask_storeu_epi8(out + (m0 + r) * e.O + o, mk, q);
    }
  }
  if (!any) return 0;
  unsigned redo = 0;
  for (int r = 0; r < R; ++r) redo |= static_cast<unsigned>(near[r] != 0) << r;
  return redo;
}

// The epilogue of the R rows (c: load_cols<F>): fused for kFUSED, then the rows it leaves
// in the reference's order
template <int F, int R>
inline void epi16_rows(const EpiK& e, const Cols& c, const EpiRow* rw, int64_t m0, int o, __mmask16 mk,
                       const __m512i (&acc)[R]) {
  if constexpr (F >= 0 && (F & kFUSED) != 0) {
    unsigned redo = epi16_rows_fused<F, R>(e, c, rw, m0, o, mk, acc);
    if (!redo) return;
    count_fused_redos(__builtin_popcount(redo));
    constexpr int FX = F & ~kFUSED;
    const Cols cx = load_cols<FX>(*e.epi, o, mk);
    for (; redo; redo &= redo - 1) {
      const int r = __builtin_ctz(redo);
      const __m512i a[1] = {acc[r]};
      epi16_rows_exact<FX, 1>(e, cx, rw + r, m0 + r, o, mk, a);
    }
  } else {
    epi16_rows_exact<F, R>(e, c, rw, m0, o, mk, acc);
  }
}

// one row of it (the AMX tile's epilogue slices)
template <int F>
inline void epi16(const EpiK& e, const Cols& c, const EpiRow& rw, int64_t m, int o, __mmask16 mk, __m512i acc) {
  const __m512i a[1] = {acc};
  epi16_rows<F, 1>(e, c, &rw, m, o, mk, a);
}

}  // namespace
}  // namespace qgnn
