// AVX-VNNI tile, for CPUs with AVX-VNNI but no AVX-512 (e.g. Alder Lake, Arrow Lake):
// VEX-encoded vpdpbusd on ymm (uint8 activation codes x int8 weight codes, 4 products
// summed exactly into each int32 lane, no saturation, so no split) on a 6-row x 16-column
// register tile (qgemm_ymm.h: 12 accumulators + 2 weight vectors + 1 broadcast of the 16
// ymm registers). Target pragma opened after the includes (see qgemm_avx512.cpp).
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "qgnn_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")

#include "qgemm_ymm.h"

namespace qgnn {
namespace {

struct Dpbusd {
  static constexpr bool kWiden = false;
  static __m256i step(__m256i acc, __m256i a, __m256i w) { return _mm256_dpbusd_avx_epi32(acc, a, w); }
};

}  // namespace

void tile_avxvnni(const TileArgs& t) { ymm_tile<Dpbusd, 6, 6>(t); }

}  // namespace qgnn

#pragma GCC pop_options
#endif  // __x86_64__
