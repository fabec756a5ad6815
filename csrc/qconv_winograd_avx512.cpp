// Integer Winograd F(2x2, 3x3) for 3x3 stride-1 convs of <= 4-bit codes on AVX-512 VNNI:
// 16 products per 2x2 output tile and input channel instead of 36, every step exact in
// integers, so ACC is the direct conv's bit for bit and the epilogue is the same code
// (qgemm_zmm.h). Chosen at run time only; see run_conv (qgemm.cpp) for when.
//
// Per tile (4x4 input window d of zero-bordered codes, output pixels (2ty + i, 2tx + j)):
//
//   V   = B^T d B + voff         B^T = | 1  0 -1  0 |     d in [0, q]: B^T d B in [-2q, 4q],
//                                      | 0  1  1  0 |     voff = 2q, so V in [0, 6q] (uint8
//                                      | 0 -1  1  0 |     for q <= 42: 2-, 3-, 4-bit codes)
//                                      | 0  1  0 -1 |
//   U   = (2G) (g - cw) (2G)^T   2G  = | 2  0  0 |        g - cw in [-cw, cw - 1], cw = 2^(b-1):
//        (prepack_winograd)            | 1  1  1 |        U in [-72, 67] at 4 bits (int8)
//                                      | 1 -1  1 |
//                                      | 0  0  2 |
//   M_e = sum_c V_e[c] U_e[c]    one int32 GEMM per element e = 4r + s (vpdpbusd)
//   Y   = A^T M A - voff A^T (sum_c U) A     A^T = | 1  1  1  0 |
//                                                   | 0  1 -1 -1 |
//   ACC = Y / 4 + (cw - zw) * AS  Y is exactly 4x the conv with centred weights (2G scales
//                                G by 2 each side); cw * AS puts the centre back, and the
//                                -zw * AS of the epilogue's centred identity comes along
//                                (Epi::centred)
//
// Scratch of one job: V [16][tiles][C] uint8, M [16][R][64] int32 (one register chunk),
// ACC [tiles * 4 pixels][64] int32 in pixel order, so the epilogue runs on consecutive rows.
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "qgnn_cpu.h"

#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,bmi2,fma")

#include "qgemm_zmm.h"

namespace qgnn {
namespace {

inline int32_t load32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// V of the job's tiles: per 64-channel slice, the 16 window rows loaded once, the row
// transform then the column one in int8 lanes (every intermediate lies in [-2q, 4q])
void input_transform(const WinoArgs& a, int ntiles) {
  const int C = a.C, Ws = a.Wo + 2, Hs = a.Ho + 2, ntpr = a.Wo / 2, tpi = a.Ho / 2;
  const __m512i off = _mm512_set1_epi8(static_cast<char>(a.voff));
  for (int t = 0; t < ntiles; ++t) {
    const int64_t g = a.tr0 + t / ntpr;
    const int64_t b = g / tpi;
    const int ty = static_cast<int>(g % tpi), tx = t % ntpr;
    const uint8_t* base = a.xpad + ((b * Hs + 2 * ty) * Ws + 2 * tx) * static_cast<int64_t>(C);
    for (int c0 = 0; c0 < C; c0 += 64) {
      const __mmask64 mk = C - c0 >= 64 ? ~0ull : _bzhi_u64(~0ull, C - c0);
      __m512i d[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) d[i][j] = _mm512_maskz_loadu_epi8(mk, base + (int64_t(i) * Ws + j) * C + c0);
      __m512i r[4][4];  // B^T d
      for (int j = 0; j < 4; ++j) {
        r[0][j] = _mm512_sub_epi8(d[0][j], d[2][j]);
        r[1][j] = _mm512_add_epi8(d[1][j], d[2][j]);
        r[2][j] = _mm512_sub_epi8(d[2][j], d[1][j]);
        r[3][j] = _mm512_sub_epi8(d[1][j], d[3][j]);
      }
      uint8_t* dst = a.vbuf + static_cast<int64_t>(t) * C + c0;
      const int64_t es = static_cast<int64_t>(ntiles) * C;  // one element's plane
      for (int i = 0; i < 4; ++i) {
        const __m512i v0 = _mm512_sub_epi8(r[i][0], r[i][2]), v1 = _mm512_add_epi8(r[i][1], r[i][2]);
        const __m512i v2 = _mm512_sub_epi8(r[i][2], r[i][1]), v3 = _mm512_sub_epi8(r[i][1], r[i][3]);
        _mm512_mask_storeu_epi8(dst + (4 * i + 0) * es, mk, _mm512_add_epi8(v0, off));
        _mm512_mask_storeu_epi8(dst + (4 * i + 1) * es, mk, _mm512_add_epi8(v1, off));
        _mm512_mask_storeu_epi8(dst + (4 * i + 2) * es, mk, _mm512_add_epi8(v2, off));
        _mm512_mask_storeu_epi8(dst + (4 * i + 3) * es, mk, _mm512_add_epi8(v3, off));
      }
    }
  }
}

// M_e for R tiles (rows of v, C codes each) x NV 16-column vectors of one 64-column block
// (u: that block's U_e in PackedW::data's layout) -> m [R][64] int32
template <int R, int NV>
inline void gemm(const uint8_t* v, int C, const int8_t* u, int32_t* m) {
  __m512i acc[R][NV];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int c4 = 0; c4 < C / 4; ++c4, u += 256) {
    __m512i wv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_si512(u + 64 * j);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi32(load32(v + static_cast<int64_t>(r) * C + 4 * c4));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, wv[j]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_si512(m + r * 64 + 16 * j, acc[r][j]);
}

template <int NV, int RN>
void gemm_rows(const uint8_t* v, int C, const int8_t* u, int32_t* m, int rows) {
  switch (rows) {
#define CASE(n) \
  case n:       \
    if (n <= RN) gemm<(n <= RN ? n : 1), NV>(v, C, u, m); \
    break;
    CASE(12) CASE(11) CASE(10) CASE(9) CASE(8) CASE(7) CASE(6) CASE(5) CASE(4) CASE(3) CASE(2) CASE(1)
#undef CASE
    default: break;
  }
}

// The ACC of one tile's 4 pixels on 16 columns [o, o + 16) from its 16 element sums
// (registers), into accb (job-local pixel rows of 64)
inline void output_transform(const WinoArgs& a, const __m512i (&mv)[16], int t, int ob, int o, int32_t* accb) {
  const int Wo = a.Wo, ntpr = Wo / 2, tyl = t / ntpr, tx = t % ntpr;
  const int64_t p00 = static_cast<int64_t>(2 * tyl) * Wo + 2 * tx;  // the tile's top-left pixel, job-local
  const int64_t pix[4] = {p00, p00 + 1, p00 + Wo, p00 + Wo + 1};
  const int64_t m0 = a.tr0 * 2 * Wo;
  __m512i s0[4], s1[4];  // M A, per row of the 4x4
  for (int i = 0; i < 4; ++i) {
    s0[i] = _mm512_add_epi32(_mm512_add_epi32(mv[4 * i], mv[4 * i + 1]), mv[4 * i + 2]);
    s1[i] = _mm512_sub_epi32(_mm512_sub_epi32(mv[4 * i + 1], mv[4 * i + 2]), mv[4 * i + 3]);
  }
  __m512i y[4];  // A^T (M A): pixels (0,0), (0,1), (1,0), (1,1)
  y[0] = _mm512_add_epi32(_mm512_add_epi32(s0[0], s0[1]), s0[2]);
  y[1] = _mm512_add_epi32(_mm512_add_epi32(s1[0], s1[1]), s1[2]);
  y[2] = _mm512_sub_epi32(_mm512_sub_epi32(s0[1], s0[2]), s0[3]);
  y[3] = _mm512_sub_epi32(_mm512_sub_epi32(s1[1], s1[2]), s1[3]);
  const __m512i cwv = _mm512_loadu_si512(a.cwz + ob * 64 + o);
  for (int q = 0; q < 4; ++q) {
    const int64_t p = pix[q];
    __m512i acc = _mm512_srai_epi32(_mm512_sub_epi32(y[q], _mm512_loadu_si512(a.corr + q * a.Op + ob * 64 + o)), 2);
    acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(cwv, _mm512_set1_epi32(a.as[m0 + p])));
    _mm512_storeu_si512(accb + p * 64 + o, acc);
  }
}

// One 64-column block: GEMMs chunk by chunk of RN tiles, each chunk's M turned into the
// ACC of its 4 pixels per tile while it is in L1.
template <int NV, int RN>
void block_acc(const WinoArgs& a, int ntiles, int ob, int32_t* accb) {
  const int C = a.C;
  const int8_t* ub = a.u + static_cast<int64_t>(ob) * 16 * C * 64;
  const int64_t es = static_cast<int64_t>(ntiles) * C;
  for (int t0 = 0; t0 < ntiles; t0 += RN) {
    const int rows = ntiles - t0 < RN ? ntiles - t0 : RN;
    for (int e = 0; e < 16; ++e)
      gemm_rows<NV, RN>(a.vbuf + e * es + static_cast<int64_t>(t0) * C, C, ub + static_cast<int64_t>(e) * C * 64,
                        a.mbuf + e * RN * 64, rows);
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < NV; ++j) {
        __m512i mv[16];
        for (int e = 0; e < 16; ++e) mv[e] = _mm512_loadu_si512(a.mbuf + (e * RN + r) * 64 + 16 * j);
        output_transform(a, mv, t0 + r, ob, 16 * j, accb);
      }
  }
}

// The epilogue of R pixels p.. (job-local; rows m0 + p..) on 16 columns [o, o + 16)
template <int F, int R>
inline void epilogue_rows(const WinoArgs& a, const EpiK& ek, const Cols& cols, int64_t m0, int p, int o, int j,
                          __mmask16 mk, const int32_t* accb) {
  EpiRow rw[R];
  __m512i acc[R];
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + p + r;
    rw[r] = epi_row(*a.e, a.e->pid[m % a.e->P], a.as[m]);
    acc[r] = _mm512_loadu_si512(accb + static_cast<int64_t>(p + r) * 64 + 16 * j);
  }
  epi16_rows<F, R>(ek, cols, rw, m0 + p, o, mk, acc);
}

// The epilogue of the job's pixels (consecutive rows m0..) on one block, 8 rows at a time
template <int F>
void block_epilogue(const WinoArgs& a, int npix, int ob, const int32_t* accb) {
  const Epi& e = *a.e;
  const EpiK ek(e);
  const int64_t m0 = a.tr0 * 2 * a.Wo;
  for (int j = 0; j < 4; ++j) {
    const int o = ob * 64 + 16 * j;
    const int n = a.O - o;
    if (n <= 0) break;
    const __mmask16 mk = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1u);
    const Cols cols = load_cols<F>(e, o, mk);
    int p = 0;
    for (; p + 8 <= npix; p += 8) epilogue_rows<F, 8>(a, ek, cols, m0, p, o, j, mk, accb);
    for (; p < npix; p += 4) epilogue_rows<F, 4>(a, ek, cols, m0, p, o, j, mk, accb);  // npix % 4 == 0 (Wo even)
  }
}

}  // namespace

void wino_avx512(const WinoArgs& a) {
  const int ntiles = static_cast<int>(a.ntr) * (a.Wo / 2), npix = 4 * ntiles;
  const Epi& e = *a.e;
  if (e.as_out && a.ob0 == 0)
    for (int p = 0; p < npix; ++p) e.as_out[a.tr0 * 2 * a.Wo + p] = a.as[a.tr0 * 2 * a.Wo + p];
  input_transform(a, ntiles);
  for (int ob = a.ob0; ob < a.ob0 + a.nblk; ++ob) {
    const int ncols = a.O - ob * 64 < 64 ? a.O - ob * 64 : 64;
    if (ncols <= 16)
      block_acc<1, kWinoChunk>(a, ntiles, ob, a.abuf);
    else if (ncols <= 32)
      block_acc<2, kWinoChunk>(a, ntiles, ob, a.abuf);
    else
      block_acc<4, 6>(a, ntiles, ob, a.abuf);
    with_epi_flags<kCENT | kFUSED>(e, [&](auto f) { block_epilogue<decltype(f)::value>(a, npix, ob, a.abuf); });
  }
}

}  // namespace qgnn

#pragma GCC pop_options
#endif  // __x86_64__
