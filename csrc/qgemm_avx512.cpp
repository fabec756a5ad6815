// AVX-512 VNNI tile: vpdpbusd (uint8 activation codes x int8 weight codes, 4 products
// summed into each int32 lane, exact) on a 6-row x 64-column register tile, and the fp32
// epilogue on the same registers before the store. Compiled for AVX-512 by a target
// pragma opened *after* every include, so no inline/template code shared with other
// translation units is emitted with AVX-512 instructions; chosen at run time only.
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "qgnn_cpu.h"

#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives in the
#pragma GCC diagnostic ignored "-Wuninitialized"        // intrinsic headers (undefined vectors)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,bmi2,fma")

#include "qgemm_zmm.h"

namespace qgnn {
namespace {

constexpr int MR = 6;

inline int32_t load32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// R rows x NV 16-column vectors [o0, o0 + 16*NV) of one 64-column weight block (the
// vectors' weights are the first NV 64-byte slices of each 256-byte k4 row). NV < 4 serves
// layers narrower than 64 outputs (16 or 32 channels, the graph's small MLPs) without
// multiplying the padded columns.
template <int R, int NV, int F>
inline void block(const TileArgs& t, const EpiK& ek, const int8_t* wb, int r0, int o0, const __mmask16* mk) {
  __m512i acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_si512();
  }
  const uint8_t* const* P = t.ptrs + r0;
  const int8_t* w = wb;
  for (int tap = 0; tap < t.taps; ++tap) {
    const int64_t off0 = t.toff[tap];
    for (int c4 = 0; c4 < t.c4n; ++c4, w += 256) {
      __m512i wv[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_si512(w + 64 * j);
      const int64_t off = off0 + 4 * c4;
      // the row pointers read from the table at every step (L1 loads): held across the
      // loop, 12 of them did not fit the general registers, and their moves back from
      // vector registers competed with vpdpbusd (Zen 4, interleaved in one process: tiny's
      // convs 3-6% faster, resnet12's unchanged)
      const uint8_t* const* Q = P;
      __asm__("" : "+r"(Q));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i av = _mm512_set1_epi32(load32(Q[r] + off));
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, wv[j]);
      }
    }
  }
  const Epi& e = *t.e;
  EpiRow rows[R];
  for (int r = 0; r < R; ++r) rows[r] = epi_row(e, t.rpat ? t.rpat[r0 + r] : 0, t.as[r0 + r]);
  const int64_t m0 = static_cast<int64_t>(t.m0) + r0;
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    if (!mk[j]) continue;
    const int o = o0 + 16 * j;
    __m512i a[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) a[r] = acc[r][j];
    epi16_rows<F, R>(ek, load_cols<F>(e, o, mk[j]), rows, m0, o, mk[j], a);
  }
}

// All rows of the tile against one weight block: groups of RN rows, then 6, then the rest.
template <int NV, int RN, int F>
void run_rows(const TileArgs& t, const EpiK& ek, const int8_t* wb, int o0, const __mmask16* mk) {
  int r0 = 0;
  for (; r0 + RN <= t.rows; r0 += RN) block<RN, NV, F>(t, ek, wb, r0, o0, mk);
  if (RN > MR)
    for (; r0 + MR <= t.rows; r0 += MR) block<MR, NV, F>(t, ek, wb, r0, o0, mk);
  switch (t.rows - r0) {
    case 5: block<5, NV, F>(t, ek, wb, r0, o0, mk); break;
    case 4: block<4, NV, F>(t, ek, wb, r0, o0, mk); break;
    case 3: block<3, NV, F>(t, ek, wb, r0, o0, mk); break;
    case 2: block<2, NV, F>(t, ek, wb, r0, o0, mk); break;
    case 1: block<1, NV, F>(t, ek, wb, r0, o0, mk); break;
    default: break;
  }
}

// Vector count of the block: 16 columns (12 rows of 1 accumulator), 32 (12 x 2), else
// 64 (6 x 4): 12 to 24 independent vpdpbusd chains either way.
template <int F>
void run_block(const TileArgs& t, const EpiK& ek, const int8_t* wb, int o0, const __mmask16* mk, int ncols) {
  if (ncols <= 16)
    run_rows<1, 12, F>(t, ek, wb, o0, mk);
  else if (ncols <= 32)
    run_rows<2, 12, F>(t, ek, wb, o0, mk);
  else
    run_rows<4, MR, F>(t, ek, wb, o0, mk);
}

// OR of all 64 byte lanes (the code-range check: any bit at or above 2^bits set)
inline uint8_t or_bytes(__m512i o) {
  __m256i h = _mm256_or_si256(_mm512_castsi512_si256(o), _mm512_extracti64x4_epi64(o, 1));
  __m128i q = _mm_or_si128(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  q = _mm_or_si128(q, _mm_srli_si128(q, 8));
  q = _mm_or_si128(q, _mm_srli_si128(q, 4));
  q = _mm_or_si128(q, _mm_srli_si128(q, 2));
  q = _mm_or_si128(q, _mm_srli_si128(q, 1));
  return static_cast<uint8_t>(_mm_cvtsi128_si32(q));
}

}  // namespace

void tile_avx512(const TileArgs& t) {
  const Epi& e = *t.e;
  const EpiK ek(e);  // once per call (per 12-row block it had been ~0.5% of a tiny episode)
  if (e.as_out && t.ob0 == 0)
    for (int r = 0; r < t.rows; ++r) e.as_out[t.m0 + r] = t.as[r];
  for (int ob = t.ob0; ob < t.ob0 + t.nblk; ++ob) {
    const int8_t* wb = t.wdata + static_cast<size_t>(ob) * t.Kp * 64;
    const int o0 = ob * 64;
    __mmask16 mk[4];
    for (int j = 0; j < 4; ++j) {
      const int n = t.O - o0 - 16 * j;
      mk[j] = n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1u);
    }
    const int ncols = t.O - o0 < 64 ? t.O - o0 : 64;
    with_epi_flags<kCENT | kFUSED>(e, [&](auto f) { run_block<decltype(f)::value>(t, ek, wb, o0, mk, ncols); });
  }
}

// Sums and OR of n-byte rows (pixels): vpsadbw against zero adds 8 bytes per 64-bit lane.
// Narrow rows (n = 8, 16, 32: the tiny model's 16-channel maps) go 64/n to a vector, each
// row's n/8 lanes added by in-lane swaps, instead of one horizontal reduction per row.
void rowsums_avx512(const uint8_t* x, int64_t rows, int n, int32_t* out, uint8_t* orv) {
  __m512i o = _mm512_setzero_si512();
  const __m512i z = _mm512_setzero_si512();
  int64_t r = 0;
  if (n == 8 || n == 16 || n == 32) {
    const int per = 64 / n, lanes = n / 8;
    // lane k * lanes holds row k's sum once the row's lanes are added
    const __m512i pick = _mm512_setr_epi64(0, lanes, 2 * lanes, 3 * lanes, 4 * lanes % 8, 5 * lanes % 8,
                                           6 * lanes % 8, 7 * lanes % 8);
    const __mmask8 store = static_cast<__mmask8>((1u << per) - 1u);
    for (; r + per <= rows; r += per) {
      const __m512i v = _mm512_loadu_si512(x + r * n);
      o = _mm512_or_si512(o, v);
      __m512i sum = _mm512_sad_epu8(v, z);
      if (lanes >= 2) sum = _mm512_add_epi64(sum, _mm512_shuffle_epi32(sum, _MM_PERM_BADC));  // 64-bit pairs
      if (lanes == 4) sum = _mm512_add_epi64(sum, _mm512_shuffle_i64x2(sum, sum, 0xB1));     // 128-bit pairs
      _mm256_mask_storeu_epi32(out + r, store, _mm512_cvtepi64_epi32(_mm512_permutexvar_epi64(pick, sum)));
    }
  }
  for (; r < rows; ++r) {
    const uint8_t* p = x + r * n;
    __m512i s = _mm512_setzero_si512();
    int i = 0;
    for (; i + 64 <= n; i += 64) {
      const __m512i v = _mm512_loadu_si512(p + i);
      s = _mm512_add_epi64(s, _mm512_sad_epu8(v, z));
      o = _mm512_or_si512(o, v);
    }
    if (i < n) {
      const __m512i v = _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, n - i), p + i);
      s = _mm512_add_epi64(s, _mm512_sad_epu8(v, z));
      o = _mm512_or_si512(o, v);
    }
    out[r] = static_cast<int32_t>(_mm512_reduce_add_epi64(s));
  }
  *orv |= or_bytes(o);
}

// V [N, D] (one task) -> weight layout, 4 rows interleaved per int32 lane:
//   wd[ob][k4][c] (int32) = v[4k4][64ob+c] | v[4k4+1][..] << 8 | v[4k4+2][..] << 16 | v[4k4+3][..] << 24
// (bytes minus `bias`, done as xor 0x80 when bias = 128), plus column sums VS and the OR.
// wd must be zeroed beforehand for the padding (rows >= N, columns >= D).
void pack_v_avx512(const uint8_t* v, const uint8_t* off, int N, int D, int Kp, int bias, int8_t* wd, int32_t* vs,
                   uint8_t* orv) {
  const __m512i flip = _mm512_set1_epi32(bias ? 0x80808080u : 0);
  __m512i o = _mm512_setzero_si512();
  for (int d0 = 0; d0 < D; d0 += 16) {
    const int dn = D - d0 < 16 ? D - d0 : 16;
    const __mmask16 mk = static_cast<__mmask16>((1u << dn) - 1u);
    __m512i colsum = _mm512_setzero_si512();
    int8_t* blk = wd + static_cast<size_t>(d0 / 64) * Kp * 64 + (d0 % 64) * 4;
    for (int k4 = 0; k4 * 4 < N; ++k4) {
      __m512i lane = _mm512_setzero_si512();
      for (int j = 0; j < 4 && 4 * k4 + j < N; ++j) {
        const __m128i b = _mm_maskz_loadu_epi8(mk, v + static_cast<size_t>(4 * k4 + j) * D + d0);
        __m512i x = _mm512_cvtepu8_epi32(b);
        if (off) x = _mm512_maskz_add_epi32(mk, x, _mm512_set1_epi32(off[4 * k4 + j]));
        colsum = _mm512_add_epi32(colsum, x);
        lane = _mm512_or_si512(lane, _mm512_slli_epi32(x, 8 * j));
      }
      // rows beyond N stay 0 (not 0 - bias): flip only the valid bytes
      const __m512i vmask = _mm512_set1_epi32(static_cast<int>(N - 4 * k4 >= 4 ? 0xFFFFFFFFu : (1u << (8 * (N - 4 * k4))) - 1u));
      o = _mm512_or_si512(o, lane);
      lane = _mm512_xor_si512(lane, _mm512_and_si512(flip, vmask));
      _mm512_mask_storeu_epi32(blk + static_cast<size_t>(k4) * 256, mk, lane);
    }
    _mm512_mask_storeu_epi32(vs + d0, mk, colsum);
  }
  *orv |= or_bytes(o);
}

// Output rows [r0, r1) (b * Ho + oh) of the 3x3, stride-2, pad-1 max-pool of uint8 NHWC
// maps, C = 16, 32 or a multiple of 64, separably: v = the max of the window's input rows,
// pixel by pixel over the whole row on 64-byte vectors (v[0] and v[W + 1..] are the padding:
// 0, which no code is below), then out[ow] = max(v[2ow], v[2ow + 1], v[2ow + 2]). For
// C = 16 / 32 a vector holds 4 / 2 pixels:
//   A = v[2ow ..], B = the next vector, A' B' the same from v[2ow + 2 ..]
//   out[ow ..] = max(even(A B), odd(A B), even(A' B'))   (pixels picked by vpermt2q)
// (the 16-byte-chunk path did 9 loads and 8 max per output pixel).
// v: max_pool3s2_vbytes(W, C) zero bytes, the caller's (kept zero outside v[1..W]).
void max_pool3s2_u8_avx512(const uint8_t* x, uint8_t* y, int64_t r0, int64_t r1, int H, int W, int C, uint8_t* v) {
  const int Ho = (H - 1) / 2 + 1, Wo = (W - 1) / 2 + 1;
  const int q = C / 8, ppv = C < 64 ? 8 / q : 1;  // qwords per pixel, pixels per vector
  const int64_t rowb = int64_t(W) * C;
  // qword indices of the even / odd pixels of a vector pair
  const __m512i even = q == 2 ? _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13) : _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
  const __m512i odd = q == 2 ? _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15) : _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / Ho;
    const int oh = static_cast<int>(r % Ho), i0 = oh > 0 ? 2 * oh - 1 : 0, i1 = 2 * oh + 2 < H ? 2 * oh + 2 : H;
    const uint8_t* in = x + (b * H + i0) * rowb;
    uint8_t* vr = v + C;  // v[1 + j] = input column j
    for (int64_t k = 0; k < rowb; k += 64) {
      const __mmask64 mk = rowb - k >= 64 ? ~0ull : _bzhi_u64(~0ull, static_cast<unsigned>(rowb - k));
      __m512i m = _mm512_maskz_loadu_epi8(mk, in + k);
      for (int i = 1; i < i1 - i0; ++i) m = _mm512_max_epu8(m, _mm512_maskz_loadu_epi8(mk, in + i * rowb + k));
      _mm512_mask_storeu_epi8(vr + k, mk, m);
    }
    uint8_t* out = y + r * int64_t(Wo) * C;
    if (C >= 64) {
      for (int ow = 0; ow < Wo; ++ow)
        for (int c = 0; c < C; c += 64) {
          const uint8_t* p = v + int64_t(2 * ow) * C + c;
          const __m512i m = _mm512_max_epu8(_mm512_max_epu8(_mm512_loadu_si512(p), _mm512_loadu_si512(p + C)),
                                            _mm512_loadu_si512(p + 2 * C));
          _mm512_storeu_si512(out + int64_t(ow) * C + c, m);
        }
      continue;
    }
    for (int ow = 0; ow < Wo; ow += ppv) {
      const uint8_t* p = v + int64_t(2 * ow) * C;
      const __m512i a = _mm512_loadu_si512(p), bb = _mm512_loadu_si512(p + 64);
      const __m512i a2 = _mm512_loadu_si512(p + 2 * C), b2 = _mm512_loadu_si512(p + 2 * C + 64);
      const __m512i m = _mm512_max_epu8(_mm512_max_epu8(_mm512_permutex2var_epi64(a, even, bb),
                                                        _mm512_permutex2var_epi64(a, odd, bb)),
                                        _mm512_permutex2var_epi64(a2, even, b2));
      const int n = Wo - ow < ppv ? Wo - ow : ppv;
      _mm512_mask_storeu_epi8(out + int64_t(ow) * C, _bzhi_u64(~0ull, static_cast<unsigned>(n * C)), m);
    }
  }
}

// Output rows [r0, r1) (b * Ho + oh) of a max-pool of fp32 NHWC maps, any window: each
// window clipped to the input, its valid taps in row-major order on 16 channels at a time,
// m = m < t ? t : m as max_pool_row (vmaxps(t, m) returns m unless t > m: NaN as there).
void max_pool_f32_avx512(const float* x, float* y, int64_t r0, int64_t r1, int H, int W, int C, int ks, int stride,
                         int pad) {
  const int Ho = (H + 2 * pad - ks) / stride + 1, Wo = (W + 2 * pad - ks) / stride + 1;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / Ho;
    const int oh = static_cast<int>(r % Ho);
    const int ih0 = oh * stride - pad, i0 = ih0 < 0 ? -ih0 : 0, i1 = ks < H - ih0 ? ks : H - ih0;
    for (int ow = 0; ow < Wo; ++ow) {
      const int iw0 = ow * stride - pad, j0 = iw0 < 0 ? -iw0 : 0, j1 = ks < W - iw0 ? ks : W - iw0;
      const float* in = x + ((b * H + ih0 + i0) * W + iw0 + j0) * C;  // the first valid tap
      float* out = y + (r * Wo + ow) * C;
      for (int c = 0; c < C; c += 16) {
        const __mmask16 mk = C - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (C - c)) - 1u);
        __m512 m = _mm512_maskz_loadu_ps(mk, in + c);
        for (int i = 0; i < i1 - i0; ++i)
          for (int j = i ? 0 : 1; j < j1 - j0; ++j)  // the first tap is m already
            m = _mm512_max_ps(_mm512_maskz_loadu_ps(mk, in + (int64_t(i) * W + j) * C + c), m);
        _mm512_mask_storeu_ps(out + c, mk, m);
      }
    }
  }
}

int64_t quantize_avx512(const float* x, int64_t n, float l, float s, float qmax, uint8_t* out) {
  const __m512 vl = _mm512_set1_ps(l), vs = _mm512_set1_ps(s), vq = _mm512_set1_ps(qmax);
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  int64_t bad = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(mk, x + i);
    // |x| < inf is false for NaN and +-Inf
    const __mmask16 fin = _mm512_cmp_ps_mask(_mm512_abs_ps(xv), inf, _CMP_LT_OQ);
    bad += __builtin_popcount(static_cast<unsigned>(mk & ~fin));
    __m512 u = _mm512_div_ps(_mm512_sub_ps(xv, vl), vs);
    u = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    u = _mm512_min_ps(_mm512_max_ps(u, _mm512_setzero_ps()), vq);
    _mm_mask_storeu_epi8(out + i, mk, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(u)));
  }
  return bad;
}

}  // namespace qgnn

#define F64_SUFFIX avx512
#define F64_LANES 8
#include "f64_kernels.inc"
#undef F64_LANES
#undef F64_SUFFIX

#pragma GCC pop_options
#endif  // __x86_64__
