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
  bool ps, sh, res, has_slope, as_first, zrem;
  explicit EpiK(const Epi& e)
      : residual(e.residual), out_f(e.out_f), acc_out(e.acc_out), O(e.O), wbias(e.wbias), slope(e.slope), rq(e.rq),
        ps(e.post_scale != nullptr), sh(e.post_shift != nullptr), res(e.residual != nullptr),
        has_slope(e.has_slope), as_first(e.as_first), zrem(e.zero_rem) {}
};

inline Cols load_cols(const Epi& e, int o, __mmask16 mk) {
  Cols c;
  c.nzw = _mm512_maskz_loadu_epi32(mk, e.nzw + o);
  c.c1 = _mm512_maskz_loadu_ps(mk, e.c1 + o);
  c.c3 = _mm512_maskz_loadu_ps(mk, e.c3 + o);
  c.ps = e.post_scale ? _mm512_maskz_loadu_ps(mk, e.post_scale + o) : _mm512_setzero_ps();
  c.sh = e.post_shift ? _mm512_maskz_loadu_ps(mk, e.post_shift + o) : _mm512_setzero_ps();
  return c;
}

// Epilogue on 16 columns [o, o+16) of row m (mask = columns < O); order as ref_epilogue;
// F: its flags (epi_flags.h).
template <int F>
inline void epi16(const EpiK& e, const Cols& c, const EpiRow& rw, int64_t m, int o, __mmask16 mk, __m512i acc) {
  const int64_t base = m * e.O + o;
#define HAS(flag, rt) EPI_HAS(F, flag, rt)
  if (HAS(kACC, e.acc_out != nullptr))
    _mm512_mask_storeu_epi32(e.acc_out + base, mk, _mm512_add_epi32(acc, _mm512_set1_epi32(e.wbias * rw.as)));
  // ACC' = ACC + (wbias - zw)*AS - za*WS'   (int32, wrapping like the reference's int32)
  acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(c.nzw, _mm512_set1_epi32(rw.as)));
  acc = _mm512_sub_epi32(acc, _mm512_maskz_loadu_epi32(mk, rw.zws + o));
  __m512 y = _mm512_mul_ps(c.c1, _mm512_cvtepi32_ps(acc));
  if (!HAS(kZREM, e.zrem)) {
    const __m512 t3 = _mm512_mul_ps(c.c3, _mm512_set1_ps(rw.asp));
    const __m512 t2 = _mm512_maskz_loadu_ps(mk, rw.t2 + o);
    if (HAS(kASFIRST, e.as_first)) {
      y = _mm512_add_ps(_mm512_add_ps(y, t3), t2);
    } else {
      y = _mm512_add_ps(_mm512_add_ps(y, t2), t3);
    }
    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mk, rw.t4 + o));
  }
  if (HAS(kPS, e.ps)) y = _mm512_mul_ps(y, c.ps);
  if (HAS(kSH, e.sh)) y = _mm512_add_ps(y, c.sh);
  if (HAS(kRES, e.res)) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mk, e.residual + base));
  if (HAS(kSLOPE, e.has_slope)) {
    // y >= 0 ? y : y * slope  (NaN compares false and is multiplied, as torch.where does)
    const __mmask16 neg = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_NGE_UQ);
    y = _mm512_mask_mul_ps(y, neg, y, _mm512_set1_ps(e.slope));
  }
  if (HAS(kQUANT, e.rq.nq != 0)) {
    // rne((y - l) / s) via the reciprocal: relative error <= 2^-23, i.e. < 1e-4 absolute
    // for |u| < 512, so the rounding can only differ within 1e-4 of a half-integer; those
    // lanes (rare; vreduceps gives u - rne(u)) take the exact IEEE division. For
    // |u| >= 512 the clamp to [0, qmax <= 255] decides whatever the rounding. Clamping
    // before rounding is the same as after (integer bounds, rounding is monotone).
    for (int k = 0; k < e.rq.nq; ++k) {
      const __m512 num = _mm512_sub_ps(y, _mm512_set1_ps(e.rq.out_l[k]));
      __m512 u = _mm512_mul_ps(num, _mm512_set1_ps(e.rq.inv_out_s[k]));
      const __m512 frac = _mm512_reduce_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __mmask16 near = _mm512_cmp_ps_mask(_mm512_abs_ps(frac), _mm512_set1_ps(0.4999f), _CMP_GT_OQ);
      if (near) u = _mm512_mask_div_ps(u, near, num, _mm512_set1_ps(e.rq.out_s[k]));
      // NaN: max(NaN, 0) returns the second operand (0)
      u = _mm512_min_ps(_mm512_max_ps(u, _mm512_setzero_ps()), _mm512_set1_ps(e.rq.qmax[k]));
      const __m512i q = _mm512_cvt_roundps_epi32(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_mask_storeu_epi8(e.rq.out_q[k] + base, mk, _mm512_cvtepi32_epi8(q));
    }
  } else {
    _mm512_mask_storeu_ps(e.out_f + base, mk, y);
  }
#undef HAS
}

}  // namespace
}  // namespace qgnn
