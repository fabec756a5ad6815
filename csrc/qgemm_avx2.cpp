// AVX2 tile: vpmaddubsw (uint8 x int8 -> int16 pair sums) + vpmaddwd by 1 (-> int32) on a
// 4-row x 16-column register tile. vpmaddubsw saturates when a pair sum exceeds 32767;
// that only happens for 8-bit activations x 8-bit weights (2*255*128), where the driver
// sets `split`: activations go in as two nibbles, hi pairs are weighted by 16 in vpmaddwd.
// Target pragma opened after the includes (see qgemm_avx512.cpp).
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "qgnn_cpu.h"

namespace qgnn {
void epi_store_scalar(const Epi& e, int64_t m, int o, int32_t acc, int32_t as);
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace qgnn {
namespace {

constexpr int MR = 4;

inline int32_t load32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// 8 full columns [o, o+8) of row m, order as ref_epilogue
inline void epi8(const Epi& e, int64_t m, int o, __m256i acc, int32_t as, const int32_t* wsrow, const int32_t* zwsrow,
                 float cnt, float asp) {
  const int64_t base = m * e.O + o;
  const __m256i asv = _mm256_set1_epi32(as);
  if (e.acc_out)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(e.acc_out + base), _mm256_add_epi32(acc, _mm256_set1_epi32(e.wbias * as)));
  // ACC' = ACC + (wbias - zw)*AS - za*WS'   (int32, wrapping like the reference's int32)
  acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.nzw + o)), asv));
  acc = _mm256_sub_epi32(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zwsrow + o)));
  const __m256 asf = _mm256_set1_ps(asp);
  const __m256 wsf = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wsrow + o)));
  __m256 y = _mm256_mul_ps(_mm256_loadu_ps(e.c1 + o), _mm256_cvtepi32_ps(acc));
  if (e.as_first) {
    y = _mm256_add_ps(y, _mm256_mul_ps(_mm256_loadu_ps(e.c3 + o), asf));
    y = _mm256_add_ps(y, _mm256_mul_ps(_mm256_loadu_ps(e.c2 + o), wsf));
  } else {
    y = _mm256_add_ps(y, _mm256_mul_ps(_mm256_loadu_ps(e.c2 + o), wsf));
    y = _mm256_add_ps(y, _mm256_mul_ps(_mm256_loadu_ps(e.c3 + o), asf));
  }
  y = _mm256_add_ps(y, _mm256_mul_ps(_mm256_loadu_ps(e.c4 + o), _mm256_set1_ps(cnt)));
  if (e.post_scale) y = _mm256_mul_ps(y, _mm256_loadu_ps(e.post_scale + o));
  if (e.post_shift) y = _mm256_add_ps(y, _mm256_loadu_ps(e.post_shift + o));
  if (e.residual) y = _mm256_add_ps(y, _mm256_loadu_ps(e.residual + base));
  if (e.has_slope) {
    const __m256 pos = _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_GE_OQ);
    y = _mm256_blendv_ps(_mm256_mul_ps(y, _mm256_set1_ps(e.slope)), y, pos);
  }
  if (e.nq) {
    for (int k = 0; k < e.nq; ++k) {
      __m256 u = _mm256_div_ps(_mm256_sub_ps(y, _mm256_set1_ps(e.out_l[k])), _mm256_set1_ps(e.out_s[k]));
      u = _mm256_round_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      u = _mm256_max_ps(u, _mm256_setzero_ps());  // NaN in the first operand -> 0
      u = _mm256_min_ps(u, _mm256_set1_ps(e.qmax[k]));
      const __m256i q = _mm256_cvttps_epi32(u);                      // 8 x int32 in 0..255
      const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
      const __m128i b8 = _mm_packus_epi16(w16, w16);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(e.out_q[k] + base), b8);
    }
  } else {
    _mm256_storeu_ps(e.out_f + base, y);
  }
}

template <int R, bool SPLIT>
inline void block(const TileArgs& t, const int8_t* wb, int r0, int ocb, int oc) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16), lo4 = _mm256_set1_epi8(0x0F);
  const uint8_t* const* P = t.ptrs + static_cast<size_t>(r0) * t.taps;
  const int8_t* w = wb + ocb * 4;
  for (int tap = 0; tap < t.taps; ++tap) {
    const uint8_t* p[R];
    for (int r = 0; r < R; ++r) p[r] = P[r * t.taps + tap];
    for (int c4 = 0; c4 < t.c4n; ++c4, w += 256) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
      for (int r = 0; r < R; ++r) {
        const __m256i av = _mm256_set1_epi32(load32(p[r] + 4 * c4));
        if (!SPLIT) {
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(av, w0), ones));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(av, w1), ones));
        } else {
          const __m256i al = _mm256_and_si256(av, lo4), ah = _mm256_and_si256(_mm256_srli_epi16(av, 4), lo4);
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(al, w0), ones));
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(ah, w0), sixteen));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(al, w1), ones));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(ah, w1), sixteen));
        }
      }
    }
  }
  const Epi& e = *t.e;
  const int o0 = oc;  // column within the whole output, caller adds the block offset
  for (int r = 0; r < R; ++r) {
    const int64_t m = static_cast<int64_t>(t.m0) + r0 + r;
    const int pat = t.rpat ? t.rpat[r0 + r] : 0;
    const int32_t* wsrow = e.ws_tab + static_cast<int64_t>(pat) * e.O;
    const int32_t* zwsrow = e.zws_tab + static_cast<int64_t>(pat) * e.O;
    const int32_t cnti = e.cnt_tab[pat];
    const float cnt = static_cast<float>(cnti);
    const int32_t as = t.as[r0 + r];
    const float asp = static_cast<float>(static_cast<int32_t>(static_cast<uint32_t>(as) - static_cast<uint32_t>(e.za) * static_cast<uint32_t>(cnti)));
    for (int j = 0; j < 2; ++j) {
      const int o = o0 + 8 * j;
      if (o + 8 <= e.O) {
        epi8(e, m, o, acc[r][j], as, wsrow, zwsrow, cnt, asp);
      } else if (o < e.O) {
        alignas(32) int32_t tmp[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc[r][j]);
        for (int c = 0; o + c < e.O; ++c) epi_store_scalar(e, m, o + c, tmp[c], as);
      }
    }
  }
}

template <bool SPLIT>
void run(const TileArgs& t) {
  for (int ob = t.ob0; ob < t.ob0 + t.nblk; ++ob) {
    const int8_t* wb = t.wdata + static_cast<size_t>(ob) * t.Kp * 64;
    for (int q = 0; q < 4; ++q) {
      const int oc = ob * 64 + q * 16;
      if (oc >= t.O) break;
      int r0 = 0;
      for (; r0 + MR <= t.rows; r0 += MR) block<MR, SPLIT>(t, wb, r0, q * 16, oc);
      switch (t.rows - r0) {
        case 3: block<3, SPLIT>(t, wb, r0, q * 16, oc); break;
        case 2: block<2, SPLIT>(t, wb, r0, q * 16, oc); break;
        case 1: block<1, SPLIT>(t, wb, r0, q * 16, oc); break;
        default: break;
      }
    }
  }
}

}  // namespace

void tile_avx2(const TileArgs& t) {
  const Epi& e = *t.e;
  if (e.as_out && t.ob0 == 0)
    for (int r = 0; r < t.rows; ++r) e.as_out[t.m0 + r] = t.as[r];
  if (t.split)
    run<true>(t);
  else
    run<false>(t);
}

}  // namespace qgnn

#define F64_SUFFIX avx2
#define F64_LANES 4
#include "f64_kernels.inc"
#undef F64_LANES
#undef F64_SUFFIX

#pragma GCC pop_options
#endif  // __x86_64__
