// AVX2 tiles (qgemm_ymm.h), by the bound on a vpmaddubsw pair sum a0 w0 + a1 w1 (uint8
// codes x int8 weights, saturated to int16); TileArgs::pair_run, from pick_tile:
//   pair_run >= 1 (every width pair but 8 x 8; 4-bit x 4-bit: |pair| <= 450, 72 pairs fit an
//     int16 lane; 8-bit x 4-bit: 4): the pair sums are added in int16 (vpaddw) and widened by
//     vpmaddwd only every pair_run steps, so a step costs one multiply instead of two (a
//     2000 x 4096 x 64 GEMM on one Zen 3 core: 72 -> 91 GMAC/s, 122 with PackedW::ymm); 3-row
//     tile: 6 int16 + 6 int32 accumulators + 2 weight vectors + 1 broadcast of 16 registers
//     (4 or more rows, their int32 sums in memory, spilled the int16 ones: 0.55x; 6 rows
//     with the sums kept in memory explicitly: no faster). Where K is one pair run
//     (taps * c4n <= pair_run: 4 x 4 bits to K = 288) there are no int32 sums and 6 rows
//     fit: tiny's 16- and 32-channel convs ~15% faster.
//   pair_run 0 (8-bit x 8-bit: 2*255*128 > 32767): activations go in as two nibbles, hi
//     pairs weighted by 16 in vpmaddwd after every step, 4-row tile.
// Target pragma opened after the includes (see qgemm_avx512.cpp).
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "qgnn_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "qgemm_ymm.h"

namespace qgnn {
namespace {

struct Maddubs16 {
  static constexpr bool kWiden = true;
  static __m256i step(__m256i acc, __m256i a, __m256i w) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(a, w)); }
};

struct MaddubsSplit {
  static constexpr bool kWiden = false;
  static __m256i step(__m256i acc, __m256i a, __m256i w) {
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    const __m256i al = _mm256_and_si256(a, lo4), ah = _mm256_and_si256(_mm256_srli_epi16(a, 4), lo4);
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(al, w), _mm256_set1_epi16(1)));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ah, w), _mm256_set1_epi16(16)));
  }
};

}  // namespace

void tile_avx2(const TileArgs& t) {
  if (t.pair_run >= 1)
    ymm_tile<Maddubs16, 3, 6>(t);
  else
    ymm_tile_with<MaddubsSplit, 4, 4, -1>(t);  // 8 x 8 bits: rare, its flags read at run time
}

// Sums and OR of n-byte rows (pixels), as rowsum_u8: vpsadbw against zero adds 8 bytes per
// 64-bit lane, 32 / 16 / 8 bytes at a time, the last n % 8 one by one. Rows of 8 or 16
// bytes (the tiny model's 16-channel maps) go 4 or 2 to a vector, their sums gathered by one
// vpermd, instead of one horizontal reduction per row (6% of a 16 -> 16 1x1 conv).
void rowsums_avx2(const uint8_t* x, int64_t rows, int n, int32_t* out, uint8_t* orv) {
  const __m256i z = _mm256_setzero_si256();
  __m256i o = z;
  __m128i o16 = _mm_setzero_si128();
  uint8_t ob = 0;
  int64_t r0 = 0;
  if (n == 8 || n == 16) {
    const int per = 32 / n;
    // row k's sum in 64-bit lane k (n = 8) or, after adding each 128-bit half's two lanes,
    // in lanes 0 and 2 (n = 16): their low int32 words gathered to the front
    const __m256i pick = n == 8 ? _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0) : _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
    for (; r0 + per <= rows; r0 += per) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r0 * n));
      o = _mm256_or_si256(o, v);
      __m256i s = _mm256_sad_epu8(v, z);
      if (n == 16) s = _mm256_add_epi64(s, _mm256_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
      const __m128i q = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(s, pick));
      if (n == 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r0), q);
      else
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + r0), q);
    }
  }
  for (int64_t r = r0; r < rows; ++r) {
    const uint8_t* p = x + r * n;
    __m256i s = z;
    int i = 0;
    for (; i + 32 <= n; i += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
      s = _mm256_add_epi64(s, _mm256_sad_epu8(v, z));
      o = _mm256_or_si256(o, v);
    }
    __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    if (i + 16 <= n) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i));
      s2 = _mm_add_epi64(s2, _mm_sad_epu8(v, _mm_setzero_si128()));
      o16 = _mm_or_si128(o16, v);
      i += 16;
    }
    if (i + 8 <= n) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i));
      s2 = _mm_add_epi64(s2, _mm_sad_epu8(v, _mm_setzero_si128()));
      o16 = _mm_or_si128(o16, v);
      i += 8;
    }
    int32_t t = _mm_cvtsi128_si32(s2) + _mm_extract_epi32(s2, 2);
    for (; i < n; ++i) {
      t += p[i];
      ob |= p[i];
    }
    out[r] = t;
  }
  o16 = _mm_or_si128(o16, _mm_or_si128(_mm256_castsi256_si128(o), _mm256_extracti128_si256(o, 1)));
  alignas(16) uint8_t b[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(b), o16);
  for (uint8_t v : b) ob |= v;
  *orv |= ob;
}

// codes = clamp(rne((x - l) / s), 0, qmax) as quant_value (IEEE division; NaN -> 0), and
// the number of NaN / Inf inputs; the last n % 8 through a zero-padded staging vector
int64_t quantize_avx2(const float* x, int64_t n, float l, float s, float qmax, uint8_t* out) {
  const __m256 vl = _mm256_set1_ps(l), vs = _mm256_set1_ps(s), vq = _mm256_set1_ps(qmax);
  const __m256 inf = _mm256_set1_ps(__builtin_inff()), sign = _mm256_set1_ps(-0.f);
  int64_t bad = 0;
  for (int64_t i = 0; i < n; i += 8) {
    const int take = n - i >= 8 ? 8 : static_cast<int>(n - i);
    alignas(32) float stage[8] = {};
    const float* src = x + i;
    if (take < 8) {
      std::memcpy(stage, src, sizeof(float) * take);
      src = stage;
    }
    const __m256 xv = _mm256_loadu_ps(src);
    // |x| < inf is false for NaN and +-Inf (the staging zeros are finite)
    const __m256 fin = _mm256_cmp_ps(_mm256_andnot_ps(sign, xv), inf, _CMP_LT_OQ);
    bad += __builtin_popcount(~static_cast<unsigned>(_mm256_movemask_ps(fin)) & 0xFFu);
    __m256 u = _mm256_div_ps(_mm256_sub_ps(xv, vl), vs);
    u = _mm256_round_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    u = _mm256_min_ps(_mm256_max_ps(u, _mm256_setzero_ps()), vq);  // max: NaN -> 0
    const __m128i b8 = pack_codes8(_mm256_cvttps_epi32(u));
    if (take == 8) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), b8);
    } else {
      alignas(16) uint8_t codes[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(codes), b8);
      std::memcpy(out + i, codes, take);
    }
  }
  return bad;
}

}  // namespace qgnn

#define F64_SUFFIX avx2
#define F64_LANES 4
#include "f64_kernels.inc"
#undef F64_LANES
#undef F64_SUFFIX

#pragma GCC pop_options
#endif  // __x86_64__
