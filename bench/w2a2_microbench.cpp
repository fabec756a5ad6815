// W2A2 inner-loop throughput on this CPU: int8 VNNI vs two sub-8-bit schemes.
//
//   g++ -O3 -std=c++17 -march=native bench/w2a2_microbench.cpp -o /tmp/w2a2 && /tmp/w2a2
//
// A stand-alone measurement (not part of the package build, hence -march=native here):
// each kernel runs its register-blocked inner loop over L1-resident operands, checks its
// result against a scalar dot product, and reports GMAC/s (2-bit x 2-bit MACs) on one core.
//   vnni      : vpdpbusd on 8-bit-widened codes, 6 rows x 64 columns (the shipped kernel)
//   bitserial : bit planes, popcount(a_i & w_j) << (i + j), 4 rows x 4 columns, vpopcntq
//   lut       : T-MAC-style vpshufb tables of pair products, 16-entry table per (column,
//               code pair) precomputed from the weights, 32 rows x 24 columns, u8 partial
//               sums flushed to u16 every 14 steps (max 18 per lookup)
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vpopcntdq,bmi2")
using clk = std::chrono::steady_clock;
static uint32_t rng = 12345;
static int rnd4() { rng = rng * 1664525u + 1013904223u; return (rng >> 24) & 3; }

constexpr int K = 512;  // reduction length per call (L1-resident)
// loop bounds read through a volatile: with a constant trip count GCC unrolls the VNNI
// loop and spills its 24 accumulators (one store per vpdpbusd), which would bias the test
static volatile int g_kn = K;

// ------------------------------------------------------------------ vnni 6x64
#define ACC4(r) __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0;
#define STEP(r)                                                          \
  {                                                                      \
    int32_t v;                                                           \
    std::memcpy(&v, a + (r) * K + 4 * k4, 4);                            \
    const __m512i av = _mm512_set1_epi32(v);                             \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, av, w0);                      \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, av, w1);                      \
    c##r##2 = _mm512_dpbusd_epi32(c##r##2, av, w2);                      \
    c##r##3 = _mm512_dpbusd_epi32(c##r##3, av, w3);                      \
  }
#define STORE(r)                                                         \
  _mm512_storeu_si512(out + (r) * 64, c##r##0);                          \
  _mm512_storeu_si512(out + (r) * 64 + 16, c##r##1);                     \
  _mm512_storeu_si512(out + (r) * 64 + 32, c##r##2);                     \
  _mm512_storeu_si512(out + (r) * 64 + 48, c##r##3);

static void vnni_t(const uint8_t* a /*6 x K*/, const int8_t* w /*K/4 x 64 x 4*/, int32_t* out /*6 x 64*/) {
  ACC4(0) ACC4(1) ACC4(2) ACC4(3) ACC4(4) ACC4(5)
  const int8_t* p = w;
  const int kn = g_kn;
  for (int k4 = 0; k4 < kn / 4; ++k4, p += 256) {
    const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64), w2 = _mm512_loadu_si512(p + 128),
                  w3 = _mm512_loadu_si512(p + 192);
    STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5)
  }
  STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
}

__attribute__((noinline)) static void vnni(const uint8_t* a, const int8_t* w, int32_t* out) { vnni_t(a, w, out); }

// ------------------------------------------------------------------ bit-serial 4x4
// planes: a[r][bit][K/64] and w[c][bit][K/64] as uint64 words
__attribute__((noinline)) static void bitserial(const uint64_t* a, const uint64_t* w, int64_t* out /*4x4*/) {
  __m512i acc[4][4];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_si512();
  const int kn = g_kn;
  for (int kc = 0; kc < kn / 512; ++kc) {
    __m512i a0[4], a1[4];
    for (int r = 0; r < 4; ++r) {
      a0[r] = _mm512_loadu_si512(a + (r * 2 + 0) * (K / 64) + kc * 8);
      a1[r] = _mm512_loadu_si512(a + (r * 2 + 1) * (K / 64) + kc * 8);
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512i w0 = _mm512_loadu_si512(w + (c * 2 + 0) * (K / 64) + kc * 8);
      const __m512i w1 = _mm512_loadu_si512(w + (c * 2 + 1) * (K / 64) + kc * 8);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m512i p00 = _mm512_popcnt_epi64(_mm512_and_si512(a0[r], w0));
        const __m512i p01 = _mm512_popcnt_epi64(_mm512_and_si512(a0[r], w1));
        const __m512i p10 = _mm512_popcnt_epi64(_mm512_and_si512(a1[r], w0));
        const __m512i p11 = _mm512_popcnt_epi64(_mm512_and_si512(a1[r], w1));
        __m512i s = _mm512_add_epi64(p00, _mm512_slli_epi64(_mm512_add_epi64(p01, p10), 1));
        s = _mm512_add_epi64(s, _mm512_slli_epi64(p11, 2));
        acc[r][c] = _mm512_add_epi64(acc[r][c], s);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) out[r * 4 + c] = _mm512_reduce_add_epi64(acc[r][c]);
}

// ------------------------------------------------------------------ LUT (vpshufb) 32 rows x 24 cols
// idx[kp][16 rows] = a[2kp] | a[2kp+1] << 2 for each of 2 row groups; tab[kp][6 quads][4 cols][16]
__attribute__((noinline)) static void lut(const uint8_t* idx /*K/2 x 2 x 16*/, const uint8_t* tab /*K/2 x 6 x 64*/, uint16_t* acc16 /*2x6x64*/) {
  __m512i acc[2][6];
#pragma GCC unroll 2
  for (int g = 0; g < 2; ++g)
#pragma GCC unroll 6
    for (int q = 0; q < 6; ++q) acc[g][q] = _mm512_setzero_si512();
  const __m512i lo = _mm512_set1_epi16(0x00FF);
  auto flush = [&] {
#pragma GCC unroll 2
    for (int g = 0; g < 2; ++g)
#pragma GCC unroll 6
      for (int q = 0; q < 6; ++q) {
        uint16_t* d = acc16 + (g * 6 + q) * 64;
        // even bytes -> d[0..31], odd bytes -> d[32..63] (a fixed permutation of outputs)
        const __m512i ev = _mm512_and_si512(acc[g][q], lo), od = _mm512_srli_epi16(acc[g][q], 8);
        _mm512_storeu_si512(d, _mm512_add_epi16(_mm512_loadu_si512(d), ev));
        _mm512_storeu_si512(d + 32, _mm512_add_epi16(_mm512_loadu_si512(d + 32), od));
        acc[g][q] = _mm512_setzero_si512();
      }
  };
  int steps = 0;
  const int kn = g_kn;
  for (int kp = 0; kp < kn / 2; ++kp) {
    const __m512i i0 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + kp * 32)));
    const __m512i i1 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + kp * 32 + 16)));
#pragma GCC unroll 6
    for (int q = 0; q < 6; ++q) {
      const __m512i t = _mm512_loadu_si512(tab + (kp * 6 + q) * 64);
      acc[0][q] = _mm512_add_epi8(acc[0][q], _mm512_shuffle_epi8(t, i0));
      acc[1][q] = _mm512_add_epi8(acc[1][q], _mm512_shuffle_epi8(t, i1));
    }
    if (++steps == 14) {
      flush();
      steps = 0;
    }
  }
  flush();
}

template <typename F>
static double gmacs(F f, double macs_per_call) {
  for (int i = 0; i < 2000; ++i) f();
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const int n = 20000;
    auto t0 = clk::now();
    for (int i = 0; i < n; ++i) f();
    const double s = std::chrono::duration<double>(clk::now() - t0).count();
    if (s < best) best = s;
  }
  return macs_per_call * 20000 / best / 1e9;
}

int main() {
  // codes: rows x K activations, cols x K weights, all 2-bit
  const int ROWS = 32, COLS = 64;
  std::vector<uint8_t> A(ROWS * K), W(COLS * K);
  for (auto& v : A) v = rnd4();
  for (auto& v : W) v = rnd4();
  auto dot = [&](int r, int c) { int s = 0; for (int k = 0; k < K; ++k) s += A[r * K + k] * W[c * K + k]; return s; };

  // vnni operands
  std::vector<int8_t> wv(K / 4 * 256);
  for (int k = 0; k < K; ++k)
    for (int c = 0; c < 64; ++c) wv[(k / 4) * 256 + c * 4 + k % 4] = static_cast<int8_t>(W[c * K + k]);
  std::vector<int32_t> ov(6 * 64);
  vnni(A.data(), wv.data(), ov.data());
  bool ok = true;
  for (int r = 0; r < 6; ++r)
    for (int c = 0; c < 64; ++c) ok &= ov[r * 64 + c] == dot(r, c);

  // bit planes
  std::vector<uint64_t> ap(4 * 2 * K / 64, 0), wp(4 * 2 * K / 64, 0);
  for (int r = 0; r < 4; ++r)
    for (int k = 0; k < K; ++k)
      for (int b = 0; b < 2; ++b) {
        if ((A[r * K + k] >> b) & 1) ap[(r * 2 + b) * (K / 64) + k / 64] |= 1ull << (k % 64);
        if ((W[r * K + k] >> b) & 1) wp[(r * 2 + b) * (K / 64) + k / 64] |= 1ull << (k % 64);
      }
  int64_t ob[16];
  bitserial(ap.data(), wp.data(), ob);
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) ok &= ob[r * 4 + c] == dot(r, c);

  // LUT operands
  std::vector<uint8_t> idx(K / 2 * 32), tab(K / 2 * 6 * 64);
  for (int kp = 0; kp < K / 2; ++kp)
    for (int g = 0; g < 2; ++g)
      for (int i = 0; i < 16; ++i) {
        const int r = g * 16 + i;
        idx[kp * 32 + g * 16 + i] = A[r * K + 2 * kp] | A[r * K + 2 * kp + 1] << 2;
      }
  for (int kp = 0; kp < K / 2; ++kp)
    for (int q = 0; q < 6; ++q)
      for (int l = 0; l < 4; ++l)
        for (int e = 0; e < 16; ++e) {
          const int c = q * 4 + l;
          tab[(kp * 6 + q) * 64 + l * 16 + e] = W[c * K + 2 * kp] * (e & 3) + W[c * K + 2 * kp + 1] * (e >> 2);
        }
  std::vector<uint16_t> o16(2 * 6 * 64, 0);
  lut(idx.data(), tab.data(), o16.data());
  for (int g = 0; g < 2; ++g)
    for (int q = 0; q < 6; ++q)
      for (int l = 0; l < 4; ++l)
        for (int i = 0; i < 16; ++i) {
          const int byte = l * 16 + i;  // byte position in the zmm
          const int got = o16[(g * 6 + q) * 64 + (byte % 2 ? 32 + byte / 2 : byte / 2)];
          ok &= got == dot(g * 16 + i, q * 4 + l);
        }
  std::printf("results exact: %s\n", ok ? "yes" : "NO");

  std::vector<int64_t> sink(16);
  std::printf("vnni      %7.1f GMAC/s\n", gmacs([&] { vnni(A.data(), wv.data(), ov.data()); }, 6.0 * 64 * K));
  std::printf("bitserial %7.1f GMAC/s\n", gmacs([&] { bitserial(ap.data(), wp.data(), sink.data()); }, 16.0 * K));
  std::printf("lut       %7.1f GMAC/s\n", gmacs([&] { lut(idx.data(), tab.data(), o16.data()); }, 32.0 * 24 * K));
  return ok ? 0 : 1;
}
