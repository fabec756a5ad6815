// AVX2 tile: vpmaddubsw (uint8 x int8 -> int16 pair sums) + vpmaddwd by 1 (-> int32) on a
// 4-row x 16-column register tile (qgemm_ymm.h). vpmaddubsw saturates when a pair sum
// exceeds 32767; that only happens for 8-bit activations x 8-bit weights (2*255*128),
// where the driver sets `split`: activations go in as two nibbles, hi pairs are weighted
// by 16 in vpmaddwd. Target pragma opened after the includes (see qgemm_avx512.cpp).
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "qgnn_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "qgemm_ymm.h"

namespace qgnn {
namespace {

struct Maddubs {
  static __m256i step(__m256i acc, __m256i a, __m256i w) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, w), _mm256_set1_epi16(1)));
  }
};

struct MaddubsSplit {
  static __m256i step(__m256i acc, __m256i a, __m256i w) {
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    const __m256i al = _mm256_and_si256(a, lo4), ah = _mm256_and_si256(_mm256_srli_epi16(a, 4), lo4);
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(al, w), _mm256_set1_epi16(1)));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ah, w), _mm256_set1_epi16(16)));
  }
};

}  // namespace

void tile_avx2(const TileArgs& t) {
  if (t.split)
    ymm_tile<MaddubsSplit, 4>(t);
  else
    ymm_tile<Maddubs, 4>(t);
}

}  // namespace qgnn

#define F64_SUFFIX avx2
#define F64_LANES 4
#include "f64_kernels.inc"
#undef F64_LANES
#undef F64_SUFFIX

#pragma GCC pop_options
#endif  // __x86_64__
