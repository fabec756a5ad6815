// Drivers of the packed-int CPU ops: weight repacking, activation panel packing
// (implicit-GEMM im2col for NHWC conv), border WS/CNT tables, threading over M-tiles,
// and the portable scalar tile. ISA tiles live in qgemm_amx.cpp / qgemm_avx512.cpp /
// qgemm_avxvnni.cpp / qgemm_avx2.cpp.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>

#include "qgnn_cpu.h"
#include "thread_pool.h"
#include "workspace.h"

namespace qgnn {

// GEMMs whose A rows are packed into panels run the AVX-512 tile on the AMX path below this
// K: with a K loop of one to three tile chunks the panel packing and the accumulator tiles'
// store and reload cost more than their MACs save (1x1 convs: K = 64 0.8x, 128 and 256
// 1.0x, 512 1.3x the AVX-512 tile; 3x3 64: 1.2x). Convs read in place: prepare_amx.
constexpr int kAmxMinK = 256;

// ------------------------------------------------------------- canonical packing
// Row = LSB-first bit stream: code k occupies bits [bits*k, bits*k + bits) (ops/packing.py).
void unpack_row(const uint8_t* row, int K, int bits, uint8_t* codes) {
  if (bits == 8) {
    std::memcpy(codes, row, static_cast<size_t>(K));
    return;
  }
  const uint32_t mask = (1u << bits) - 1u;
  for (int k = 0; k < K; ++k) {
    const int64_t bit = static_cast<int64_t>(k) * bits;
    const int byte = static_cast<int>(bit >> 3), sh = static_cast<int>(bit & 7);
    // a code spans at most 2 bytes (bits <= 4 fits, 3-bit may straddle)
    uint32_t v = row[byte];
    if (sh + bits > 8) v |= static_cast<uint32_t>(row[byte + 1]) << 8;
    codes[k] = static_cast<uint8_t>((v >> sh) & mask);
  }
}

void pack_row(const uint8_t* codes, int K, int bits, uint8_t* row) {
  const int nbytes = (K + 7) / 8 * bits;
  std::memset(row, 0, static_cast<size_t>(nbytes));
  if (bits == 8) {
    std::memcpy(row, codes, static_cast<size_t>(K));
    return;
  }
  for (int k = 0; k < K; ++k) {
    const int64_t bit = static_cast<int64_t>(k) * bits;
    const int byte = static_cast<int>(bit >> 3), sh = static_cast<int>(bit & 7);
    const uint32_t v = static_cast<uint32_t>(codes[k]) << sh;
    row[byte] |= static_cast<uint8_t>(v & 0xFF);
    if (sh + bits > 8) row[byte + 1] |= static_cast<uint8_t>(v >> 8);
  }
}

namespace {

// PackedW::wino from the 3x3 codes [O][(kh, kw, C)] (the transforms: qconv_winograd_avx512.cpp)
void prepack_winograd(const uint8_t* codes, int C, PackedW* w) {
  static const int G2[4][3] = {{2, 0, 0}, {1, 1, 1}, {1, -1, 1}, {0, 0, 2}};
  static const int At[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
  const int O = w->O, K = 9 * C;
  w->wino_cw = 1 << (w->bits - 1);
  w->wino.assign(static_cast<size_t>(w->Op) * 16 * C, 0);
  w->wino_corr.assign(static_cast<size_t>(4) * w->Op, 0);
  for (int o = 0; o < O; ++o) {
    int8_t* blk = w->wino.data() + static_cast<size_t>(o / 64) * 16 * C * 64;
    const int col = o % 64;
    int32_t usum[16] = {};
    for (int c = 0; c < C; ++c) {
      int g[3][3], t[4][3];
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) g[i][j] = codes[static_cast<size_t>(o) * K + (i * 3 + j) * C + c] - w->wino_cw;
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < 3; ++j) t[r][j] = G2[r][0] * g[0][j] + G2[r][1] * g[1][j] + G2[r][2] * g[2][j];
      for (int r = 0; r < 4; ++r)
        for (int s = 0; s < 4; ++s) {
          const int u = t[r][0] * G2[s][0] + t[r][1] * G2[s][1] + t[r][2] * G2[s][2];  // |u| <= 72
          blk[(static_cast<size_t>(r * 4 + s) * C / 4 + c / 4) * 256 + col * 4 + c % 4] = static_cast<int8_t>(u);
          usum[r * 4 + s] += u;
        }
    }
    for (int q = 0; q < 4; ++q) {
      int32_t v = 0;
      for (int r = 0; r < 4; ++r)
        for (int s = 0; s < 4; ++s) v += At[q / 2][r] * At[q % 2][s] * usum[r * 4 + s];
      w->wino_corr[static_cast<size_t>(q) * w->Op + o] = v;
    }
  }
}

}  // namespace

void prepack(const uint8_t* packed, int O, int K, int bits, int taps, PackedW* w) {
  if (O <= 0 || K <= 0) throw ArgError("prepack: O and K must be positive");
  if (taps <= 0 || K % taps) throw ArgError("prepack: K must be a multiple of the kernel taps");
  const int rowbytes = (K + 7) / 8 * bits;
  w->O = O;
  w->K = K;
  w->bits = bits;
  w->taps = taps;
  w->Kp = (K + 3) / 4 * 4;
  w->Op = (O + 63) / 64 * 64;
  w->bias = bits == 8 ? 128 : 0;
  w->data.assign(static_cast<size_t>(w->Op) * w->Kp, 0);
  w->wsum.assign(O, 0);
  w->tapsum.assign(static_cast<size_t>(O) * taps, 0);
  const int C = K / taps;
  const bool wino = taps == 9 && bits <= 4 && C % 4 == 0 && isa_blocker(Isa::Avx512Vnni).empty();
  std::vector<uint8_t> codes(K), all(wino ? static_cast<size_t>(O) * K : 0);
  for (int o = 0; o < O; ++o) {
    unpack_row(packed + static_cast<size_t>(o) * rowbytes, K, bits, codes.data());
    if (wino) std::memcpy(all.data() + static_cast<size_t>(o) * K, codes.data(), K);
    const int ob = o / 64, c = o % 64;
    int8_t* blk = w->data.data() + static_cast<size_t>(ob) * w->Kp * 64;
    int32_t s = 0;
    for (int k = 0; k < K; ++k) {
      blk[(k / 4) * 256 + c * 4 + (k % 4)] = static_cast<int8_t>(static_cast<int>(codes[k]) - w->bias);
      s += codes[k];
      w->tapsum[static_cast<size_t>(o) * taps + k / C] += codes[k];
    }
    // zero codes in K padding must stay zero *after* the bias: value 0 - bias would count
    if (w->bias)
      for (int k = K; k < w->Kp; ++k) blk[(k / 4) * 256 + c * 4 + (k % 4)] = 0;
    w->wsum[o] = s;
  }
  // padded columns o >= O: zeros (never stored)
  if (wino) prepack_winograd(all.data(), C, w);
  const Isa best = detected_isa();
  if (best == Isa::Avx2 || best == Isa::AvxVnni) {
    w->ymm.resize(w->data.size());
    const size_t group = static_cast<size_t>(w->Kp) * 16;  // one 16-column group's K run
    for (int ob = 0; ob < w->Op / 64; ++ob)
      for (int q = 0; q < 4; ++q)
        for (int k4 = 0; k4 < w->Kp / 4; ++k4)
          std::memcpy(w->ymm.data() + (static_cast<size_t>(ob) * 4 + q) * group + static_cast<size_t>(k4) * 64,
                      w->data.data() + static_cast<size_t>(ob) * w->Kp * 64 + static_cast<size_t>(k4) * 256 + q * 64, 64);
  }
}

int amx_chunks(int Kp, int seg) { return Kp / seg * ((seg + 63) / 64); }

void amx_tiles(const int8_t* data, int Kp, int Op, int seg, int8_t* tiles) {
  const int cps = (seg + 63) / 64, nk = amx_chunks(Kp, seg), k4n = Kp / 4, s4 = seg / 4;
  for (int ob = 0; ob < Op / 64; ++ob)
    for (int j = 0; j < 4; ++j)
      for (int k = 0; k < nk; ++k) {
        int8_t* dst = tiles + ((static_cast<size_t>(ob) * 4 + j) * nk + k) * 1024;
        for (int r = 0; r < 16; ++r) {
          const int q4 = 16 * (k % cps) + r, k4 = s4 * (k / cps) + q4;
          if (q4 < s4 && k4 < k4n)
            std::memcpy(dst + 64 * r, data + (static_cast<size_t>(ob) * k4n + k4) * 256 + 64 * j, 64);
          else
            std::memset(dst + 64 * r, 0, 64);
        }
      }
}

int32_t rowsum_u8(const uint8_t* p, int n, uint8_t* orv) {
  int32_t s = 0;
  uint8_t o = *orv;
  for (int i = 0; i < n; ++i) {
    s += p[i];
    o |= p[i];
  }
  *orv = o;
  return s;
}

// ------------------------------------------------------------- scalar tile
namespace {

inline int32_t wrap(int64_t v) { return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(v))); }

inline float epi_value(const Epi& e, int32_t acc, int32_t as, int pat, int o, int64_t m) {
  const int32_t wsp = e.ws_tab[static_cast<int64_t>(pat) * e.O + o];
  const int32_t cnt = e.cnt_tab[pat];
  const int32_t accp = wrap(int64_t(acc) + int64_t(e.nzw[o]) * as - e.zws_tab[static_cast<int64_t>(pat) * e.O + o]);
  const int32_t asp = wrap(int64_t(as) - int64_t(e.za) * cnt);
  float y = e.c1[o] * static_cast<float>(accp);
  if (e.as_first) {
    y = y + e.c3[o] * static_cast<float>(asp);
    y = y + e.c2[o] * static_cast<float>(wsp);
  } else {
    y = y + e.c2[o] * static_cast<float>(wsp);
    y = y + e.c3[o] * static_cast<float>(asp);
  }
  y = y + e.c4[o] * static_cast<float>(cnt);
  if (e.post_scale) y = y * e.post_scale[o];
  if (e.post_shift) y = y + e.post_shift[o];
  if (e.residual) y = y + e.residual[m * e.O + o];
  if (e.has_slope) y = y >= 0.f ? y : y * e.slope;
  return y;
}

inline uint8_t quant_value(float y, float l, float s, float qmax) {
  float u = std::nearbyint((y - l) / s);
  if (!(u >= 0.f)) u = 0.f;  // NaN and negatives -> 0
  if (u > qmax) u = qmax;
  return static_cast<uint8_t>(u);
}

}  // namespace

// Exported for the ISA tiles' ragged edges: one output element.
void epi_store_scalar(const Epi& e, int64_t m, int o, int32_t acc, int32_t as) {
  const int pat = e.pid ? e.pid[m % e.P] : 0;
  if (e.acc_out) e.acc_out[m * e.O + o] = wrap(int64_t(acc) + int64_t(e.wbias) * as);
  const float y = epi_value(e, acc, as, pat, o, m);
  if (e.rq.nq)
    for (int k = 0; k < e.rq.nq; ++k) e.rq.out_q[k][m * e.O + o] = quant_value(y, e.rq.out_l[k], e.rq.out_s[k], e.rq.qmax[k]);
  else
    e.out_f[m * e.O + o] = y;
}

void zero_split(float offset, float scale, int32_t* z, float* d) {
  float q = std::nearbyint(-offset / scale);
  q = q < 0.f ? 0.f : q > 255.f ? 255.f : q;
  *z = static_cast<int32_t>(q);
  *d = offset + scale * q;
}

void centre(Epi& e, const int32_t* ws_raw, const int32_t* cnt, int npat, CentredTables& t) {
  const int O = e.O, Op = (O + 63) / 64 * 64;
  t.wsp.resize(static_cast<size_t>(npat) * O);
  t.zws.resize(static_cast<size_t>(npat) * O);
  t.nzw.assign(Op, 0);
  t.cnt.assign(cnt, cnt + npat);
  t.t2.resize(static_cast<size_t>(npat) * O);
  t.t4.resize(static_cast<size_t>(npat) * O);
  for (int o = 0; o < O; ++o) t.nzw[o] = e.wbias - e.zw[o];
  for (int q = 0; q < npat; ++q)
    for (int o = 0; o < O; ++o) {
      const size_t i = static_cast<size_t>(q) * O + o;
      t.wsp[i] = wrap(int64_t(ws_raw[i]) - int64_t(e.zw[o]) * cnt[q]);
      t.zws[i] = wrap(int64_t(e.za) * t.wsp[i]);
      t.t2[i] = e.c2[o] * static_cast<float>(t.wsp[i]);
      t.t4[i] = e.c4[o] * static_cast<float>(cnt[q]);
    }
  e.zero_rem = e.rq.nq > 0;  // e.rq is set before centre() (prepare_layer)
  for (int o = 0; o < O; ++o) e.zero_rem = e.zero_rem && e.c2[o] == 0.f && e.c3[o] == 0.f && e.c4[o] == 0.f;
  e.ws_tab = t.wsp.data();
  e.zws_tab = t.zws.data();
  e.nzw = t.nzw.data();
  e.cnt_tab = t.cnt.data();
  e.t2_tab = t.t2.data();
  e.t4_tab = t.t4.data();
}

Requant make_requant(int nq, const float* out_l, const float* out_s, const int* out_bits) {
  if (nq < 0 || nq > kMaxRequant) throw ArgError("at most 3 requantized outputs");
  Requant rq;
  rq.nq = nq;
  for (int k = 0; k < nq; ++k) {
    if (!std::isfinite(out_l[k]) || !std::isfinite(out_s[k]) || !(out_s[k] > 0.f))
      throw ArgError("out_l must be finite, out_s finite and > 0");
    if (out_bits[k] != 2 && out_bits[k] != 3 && out_bits[k] != 4 && out_bits[k] != 8)
      throw ArgError("out_bits must be one of (2, 3, 4, 8)");
    rq.out_l[k] = out_l[k];
    rq.out_s[k] = out_s[k];
    rq.qmax[k] = static_cast<float>((1 << out_bits[k]) - 1);
    rq.inv_out_s[k] = 1.f / out_s[k];
  }
  return rq;
}

void tile_scalar(const TileArgs& t) {
  const Epi& e = *t.e;
  for (int ob = t.ob0; ob < t.ob0 + t.nblk; ++ob) {
    const int8_t* wb = t.wdata + static_cast<size_t>(ob) * t.Kp * 64;
    const int ncol = std::min(64, t.O - ob * 64);
    for (int r = 0; r < t.rows; ++r) {
      const int64_t m = t.m0 + r;
      if (e.as_out && ob == 0) e.as_out[m] = t.as[r];
      for (int c = 0; c < ncol; ++c) {
        int32_t acc = 0;
        int k = 0;
        for (int tap = 0; tap < t.taps; ++tap) {
          const uint8_t* a = t.ptrs[r] + t.toff[tap];
          for (int i = 0; i < 4 * t.c4n; ++i, ++k)
            acc += static_cast<int32_t>(a[i]) * wb[(k / 4) * 256 + c * 4 + (k % 4)];
        }
        epi_store_scalar(e, m, ob * 64 + c, acc, t.as[r]);
      }
    }
  }
}

// ------------------------------------------------------------- drivers
void rowsums_avx512(const uint8_t* x, int64_t rows, int n, int32_t* out, uint8_t* orv);
void rowsums_avx2(const uint8_t* x, int64_t rows, int n, int32_t* out, uint8_t* orv);
void pack_v_avx512(const uint8_t* v, const uint8_t* off, int N, int D, int Kp, int bias, int8_t* wd, int32_t* vs,
                   uint8_t* orv);

namespace {

using TileFn = void (*)(const TileArgs&);

// The tile of the active ISA path for a GEMM whose weights have (amx) or lack AMX tiles;
// throws (on the calling thread, before any worker starts) when QGNN_CPU_ISA names a path
// this process cannot run.
TileFn pick_tile(const PackedW& w, int a_bits, bool amx, int* pair_run) {
  *pair_run = 1;
  const Isa isa = active_isa();
#if defined(__x86_64__)
  if (isa == Isa::Amx) return amx ? tile_amx : tile_avx512;
  if (isa == Isa::Avx512Vnni) return tile_avx512;
  if (isa == Isa::AvxVnni) return tile_avxvnni;
  if (isa == Isa::Avx2) {
    // |a0 w0 + a1 w1| <= pair; vpmaddubsw saturates int16 when that can exceed 32767
    const int pair = 2 * ((1 << a_bits) - 1) * (w.bias ? 128 : (1 << w.bits) - 1);
    *pair_run = 32767 / pair;
    return tile_avx2;
  }
#endif
  (void)isa;  // Scalar
  return tile_scalar;
}

// A layer's tile on the active path and its weights in the layout that tile reads: the
// AMX tiles (QLayer::wamx), the AVX-512 tile's centred copy (QLayer::wc), PackedW::ymm for
// the 256-bit tiles, else PackedW::data. Sets e.centred where those weights are centred.
struct LayerTile {
  TileFn fn;
  const int8_t* w;
  bool ymm;
  int run, amx_seg;
  void set(TileArgs& t) const {
    t.ymm_layout = ymm;
    t.amx_seg = amx_seg;
  }
};
LayerTile layer_tile(const QLayer& L, Epi& e) {
  const PackedW& w = *L.w;
  LayerTile lt{};
  lt.fn = pick_tile(w, L.a_bits, !L.wamx.empty(), &lt.run);
  lt.ymm = (lt.fn == tile_avx2 || lt.fn == tile_avxvnni) && !w.ymm.empty();
  if (lt.fn == tile_amx) {
    lt.w = L.wamx.data();
    lt.amx_seg = L.amx_seg;
    e.centred = L.amx_centred;
  } else if (lt.fn == tile_avx512 && !L.wc.empty()) {
    lt.w = L.wc.data();
    e.centred = true;
  } else {
    lt.w = lt.ymm ? w.ymm.data() : w.data.data();
  }
  return lt;
}

// A layer's work in MAC-equivalents: its MACs plus, per output, the fused epilogue, which
// costs about as much as 128 MACs of the tile (a 16 -> 16 1x1 conv on one Zen 3 core:
// ~1.3 ns per output, ~0.01 ns per MAC). Below 2e6 the fork/join costs more than it saves;
// counting MACs alone kept tiny's 640 x 32 -> 64 and 160 x 64 -> 128 1x1 convs (60 and 35
// us) on one thread.
int pick_threads(int requested, double macs, double outputs) {
  if (requested <= 1) return 1;
  return macs + 128.0 * outputs < 2.0e6 ? 1 : requested;
}

// Rows per M-tile: a multiple of `group` (the tile's row group: 24 for the 6- and 12-row
// AVX-512 blocks, 32 for AMX's two 16-row tiles), the packed panel
// ~<= 192 KiB so it stays in L2 next to a weight block, and the threads balanced: the
// tile count whose slowest thread has the fewest rows (plus a per-tile cost of 8 rows)
// wins; 1600 rows on 2 threads gave 9 tiles of 192 (5 vs 4) before, now 10 of 168.
int pick_mb(int64_t M, int Kp, int nthreads, int group) {
  const int top = static_cast<int>(std::max<int64_t>(group, std::min<int64_t>(480, (192 * 1024) / std::max(Kp, 1)))) / group * group;
  if (nthreads <= 1) return top;
  int best = top;
  int64_t best_cost = -1;
  for (int mb = top; mb >= group; mb -= group) {
    const int64_t tiles = (M + mb - 1) / mb;
    const int64_t cost = (tiles + nthreads - 1) / nthreads * (mb + 8);
    if (best_cost < 0 || cost < best_cost) {
      best = mb;
      best_cost = cost;
    }
  }
  return best;
}

}  // namespace

namespace {

// FusedEpi of a layer with code outputs and remainder terms (not zero_rem), where the AVX-512
// tiles run. The bound on |u_fused - u_reference| (u = 2^-24, values bounded per column o):
//   S = |c1| max|ACC'| + max|t2| + |c3| max|AS'| + max|t4|  bounds every partial sum of y,
//     with |ACC'| <= sum_k |w_k - zw| * amax and |AS'| <= K * amax, amax = the largest
//     |code - za| of the activations;
//   the reference's z = y*ps + sh is within u (7 |ps| S + |sh|) of its real value, the fused
//   one within u (5 |ps| S + 3 |sh|): D = 16 u (|ps| S + |sh|) apart;
//   a LeakyReLU scales that by |slope| where both are negative, by <= 1 + |slope| where the
//     signs differ: g = 2 max(1, |slope|);
//   the residual's add and the quantizer's own roundings, on codes not clamped, move u by
//     less than 64 u max(1, |slope|) (|l|/s + qmax + 2) (|z| <= (|l| + (qmax + 2) s) there);
//     clamped ones differ only in relative terms ~u, which keep them beyond 0 and qmax.
// No fusion when a bound is not below 1/8 (the codes would need the exact order too often).
void fuse_epilogue(QLayer& L) {
  Epi& e = L.epi;
  const PackedW& w = *L.w;
  L.fz_c1.clear();
  L.fz_c3.clear();
  L.fz_t24.clear();
  e.fz = FusedEpi{};
  if (e.rq.nq == 0 || e.zero_rem || e.as_first || !isa_blocker(Isa::Avx512Vnni).empty()) return;
  constexpr double u = 1.0 / 16777216.0;
  const int O = e.O, Op = w.Op, npat = static_cast<int>(L.tables.cnt.size());
  const double qa = double((1 << L.a_bits) - 1);
  const double amax = std::max(std::fabs(double(e.za)), std::fabs(qa - e.za));
  const double g1 = e.has_slope ? std::max(1.0, std::fabs(double(e.slope))) : 1.0;
  double dmax = 0.0;  // max over columns of D
  L.fz_c1.assign(Op, 0.f);
  L.fz_c3.assign(Op, 0.f);
  L.fz_t24.assign(static_cast<size_t>(npat) * O, 0.f);
  for (int o = 0; o < O; ++o) {
    const float ps = e.post_scale ? e.post_scale[o] : 1.f, sh = e.post_shift ? e.post_shift[o] : 0.f;
    double wabs = 0.0;  // sum_k |code - zw|, codes = data + bias
    const int ob = o / 64, c = o % 64;
    for (int k = 0; k < w.K; ++k)
      wabs += std::fabs(double(w.data[(static_cast<size_t>(ob) * w.Kp / 4 + k / 4) * 256 + c * 4 + k % 4]) + w.bias -
                        e.zw[o]);
    double t2m = 0.0, t4m = 0.0;
    for (int q = 0; q < npat; ++q) {
      const size_t i = static_cast<size_t>(q) * O + o;
      t2m = std::max(t2m, std::fabs(double(L.tables.t2[i])));
      t4m = std::max(t4m, std::fabs(double(L.tables.t4[i])));
      L.fz_t24[i] = static_cast<float>((double(L.tables.t2[i]) + double(L.tables.t4[i])) * ps + sh);
    }
    const double S = (std::fabs(double(e.c1[o])) * wabs * amax + t2m + std::fabs(double(e.c3[o])) * w.K * amax + t4m) *
                     (1.0 + 1e-6);
    dmax = std::max(dmax, 16 * u * (std::fabs(double(ps)) * S + std::fabs(double(sh))));
    L.fz_c1[o] = e.c1[o] * ps;
    L.fz_c3[o] = e.c3[o] * ps;
  }
  FusedEpi f;
  for (int k = 0; k < e.rq.nq; ++k) {
    const double s = e.rq.out_s[k], l = e.rq.out_l[k], qm = e.rq.qmax[k];
    const double mk = 2 * g1 * dmax * (1 + 4 * u) / s + 64 * u * g1 * (std::fabs(l) / s + qm + 2);
    if (!(mk < 0.125)) return;  // also NaN / Inf
    f.room[k] = static_cast<float>(0.5 - mk * (1.0 + 1e-6));
    f.mpos[k] = e.rq.inv_out_s[k];
    f.mneg[k] = e.has_slope ? e.slope * e.rq.inv_out_s[k] : e.rq.inv_out_s[k];
    f.nl[k] = -e.rq.out_l[k] * e.rq.inv_out_s[k];
  }
  f.c1 = L.fz_c1.data();
  f.c3 = L.fz_c3.data();
  f.t24_tab = L.fz_t24.data();
  e.fz = f;
}

// QLayer::wamx where AMX can run L: a k x k conv (k > 1) whose A tiles it reads in place at
// any K (no panel to pack; tiny's 16-channel 3x3 conv, K = 144 in 3 chunks of 48 codes:
// 1.03x the AVX-512 tile), else from K = kAmxMinK. Centred where L has wc: the epilogue
// then skips the zw*AS term, as on the AVX-512 tile (resnet12's AMX convs 1-3% faster;
// reading 160-channel kernel rows in place rather than packing panels: 2%).
void prepare_amx(QLayer& L) {
  const PackedW& w = *L.w;
  L.wamx.clear();
  L.amx_inplace = L.conv && L.C % 4 == 0 && L.Wo >= 16;
  if (!isa_blocker(Isa::Amx).empty() || (w.Kp < kAmxMinK && !(L.amx_inplace && L.ks > 1))) return;
  L.amx_seg = L.amx_inplace ? L.ks * L.C : w.Kp;
  L.amx_centred = !L.wc.empty();
  L.wamx.assign(static_cast<size_t>(w.Op) * 64 * amx_chunks(w.Kp, L.amx_seg), 0);
  amx_tiles(L.amx_centred ? L.wc.data() : w.data.data(), w.Kp, w.Op, L.amx_seg, L.wamx.data());
}

}  // namespace

void prepare_layer(QLayer& L, const PackedW& w, int a_bits, const LayerParams& p, int ks, int stride, int pad,
                   int H, int W, int C) {
  const int O = w.O, Op = w.Op;
  if (!std::isfinite(p.a_scale) || !(p.a_scale > 0.f)) throw ArgError("a_scale must be finite and > 0");
  if (!std::isfinite(p.a_offset)) throw ArgError("a_offset must be finite");
  L.w = &w;
  L.a_bits = a_bits;
  L.c1.assign(Op, 0.f);
  L.c2.assign(Op, 0.f);
  L.c3.assign(Op, 0.f);
  L.c4.assign(Op, 0.f);
  L.zw.assign(Op, 0);
  // centred identity of ref_epilogue: offsets split into zero points and fp32 remainders
  int32_t za;
  float da;
  zero_split(p.a_offset, p.a_scale, &za, &da);
  for (int o = 0; o < O; ++o) {
    const float ws = p.w_scale[o], wo = p.w_offset[o];
    if (!std::isfinite(ws) || !std::isfinite(wo) || !(ws > 0.f))
      throw ArgError("w_scale must be finite and > 0, w_offset finite");
    float dw;
    zero_split(wo, ws, &L.zw[o], &dw);
    L.c1[o] = ws * p.a_scale;  // fp32 products, as ref_epilogue forms them
    L.c2[o] = ws * da;
    L.c3[o] = dw * p.a_scale;
    L.c4[o] = dw * da;
  }
  // centred weights for the AVX-512 tile: code - zw fits int8 for <= 4-bit codes and zw <= 128
  L.wc.clear();
  if (w.bits <= 4 && *std::max_element(L.zw.begin(), L.zw.end()) <= 128 && isa_blocker(Isa::Avx512Vnni).empty()) {
    L.wc.assign(w.data.size(), 0);
    for (int ob = 0; ob < Op / 64; ++ob)
      for (int k4 = 0; k4 < w.Kp / 4; ++k4)
        for (int c = 0; c < 64 && ob * 64 + c < O; ++c)
          for (int j = 0; j < 4 && 4 * k4 + j < w.K; ++j) {
            const size_t i = (static_cast<size_t>(ob) * w.Kp / 4 + k4) * 256 + c * 4 + j;
            L.wc[i] = static_cast<int8_t>(w.data[i] - L.zw[ob * 64 + c]);
          }
  }
  // folded constants are finite by construction; Inf/NaN here is a bad caller (as ref_*)
  for (const float* v : {p.post_scale, p.post_shift})
    if (v)
      for (int o = 0; o < O; ++o)
        if (!std::isfinite(v[o])) throw ArgError("post_scale / post_shift hold NaN or Inf values");
  if (p.post_scale) L.post_scale.assign(p.post_scale, p.post_scale + O);
  if (p.post_shift) L.post_shift.assign(p.post_shift, p.post_shift + O);
  if (p.has_slope && !std::isfinite(p.slope)) throw ArgError("slope must be finite");
  const Requant rq = make_requant(p.nq, p.out_l, p.out_s, p.out_bits);
  Epi& e = L.epi;
  e = Epi{};
  e.c1 = L.c1.data();
  e.c2 = L.c2.data();
  e.c3 = L.c3.data();
  e.c4 = L.c4.data();
  e.zw = L.zw.data();
  e.za = za;
  e.post_scale = p.post_scale ? L.post_scale.data() : nullptr;
  e.post_shift = p.post_shift ? L.post_shift.data() : nullptr;
  e.has_slope = p.has_slope;
  e.slope = p.slope;
  e.rq = rq;
  e.O = O;
  e.wbias = w.bias;
  if (ks == 0) {  // linear
    L.conv = false;
    L.C = w.K;
    const int32_t cnt = w.K;
    e.pid = nullptr;
    e.P = 1;
    centre(e, w.wsum.data(), &cnt, 1, L.tables);
    fuse_epilogue(L);
    prepare_amx(L);
    return;
  }
  L.conv = true;
  L.ks = ks;
  L.stride = stride;
  L.pad = pad;
  L.H = H;
  L.W = W;
  L.C = C;
  L.Ho = (H + 2 * pad - ks) / stride + 1;
  L.Wo = (W + 2 * pad - ks) / stride + 1;
  const int P = L.Ho * L.Wo, taps = ks * ks;
  // border patterns: which taps of position p fall inside the input
  L.pid.assign(P, 0);
  std::map<std::vector<uint8_t>, int> pats;
  std::vector<std::vector<uint8_t>> masks;
  for (int q = 0; q < P; ++q) {
    const int oh = q / L.Wo, ow = q % L.Wo;
    std::vector<uint8_t> msk(taps);
    for (int i = 0; i < ks; ++i)
      for (int j = 0; j < ks; ++j) {
        const int ih = oh * stride - pad + i, iw = ow * stride - pad + j;
        msk[i * ks + j] = ih >= 0 && ih < H && iw >= 0 && iw < W;
      }
    auto it = pats.find(msk);
    if (it == pats.end()) {
      it = pats.emplace(msk, static_cast<int>(masks.size())).first;
      masks.push_back(msk);
    }
    L.pid[q] = it->second;
  }
  const int npat = static_cast<int>(masks.size());
  std::vector<int32_t> ws_tab(static_cast<size_t>(npat) * O), cnt_tab(npat);
  for (int q = 0; q < npat; ++q) {
    int nv = 0;
    for (int tp = 0; tp < taps; ++tp) nv += masks[q][tp];
    cnt_tab[q] = nv * C;
    for (int o = 0; o < O; ++o) {
      int32_t sum = 0;
      for (int tp = 0; tp < taps; ++tp)
        if (masks[q][tp]) sum += w.tapsum[static_cast<size_t>(o) * taps + tp];
      ws_tab[static_cast<size_t>(q) * O + o] = sum;
    }
  }
  e.pid = L.pid.data();
  e.P = P;
  centre(e, ws_tab.data(), cnt_tab.data(), npat, L.tables);
  fuse_epilogue(L);
  L.wino_corr.clear();
  L.wino_cwz.clear();
  if (!w.wino.empty()) {  // the Winograd conv's per-column constants (WinoArgs)
    const int voff = 2 * ((1 << a_bits) - 1);
    L.wino_corr.resize(w.wino_corr.size());
    for (size_t i = 0; i < w.wino_corr.size(); ++i) L.wino_corr[i] = voff * w.wino_corr[i];
    // ACC - zw*AS straight from the transform: (cw - zw)*AS puts the weights' centre back
    L.wino_cwz.assign(Op, 0);
    for (int o = 0; o < O; ++o) L.wino_cwz[o] = w.wino_cw - L.zw[o];
  }
  prepare_amx(L);
}

namespace {

// Work split of one layer: M-tiles of mb rows x groups of column blocks, column-group
// major (consecutive tasks share a weight group, which stays in L2 across the M-tiles).
// A group is as many 64-column blocks as fit in ~512 KiB (half of a 1 MiB L2): a layer
// whose weights do not fit (512 channels: 2.4 MB) no longer streams all of them from L3
// for every M-tile, and small batches (few M-tiles) still get work for every thread.
struct Split {
  int nt, mb, ncg, bpg;  // threads, rows per tile, column groups, blocks per group
  int64_t ntm;           // M-tiles
};

Split pick_split(int64_t M, int Kp, int nblk, int nthreads, double macs, bool amx) {
  constexpr int64_t kGroupBytes = 512 * 1024;
  Split s;
  s.nt = pick_threads(nthreads, macs, double(M) * nblk * 64);
  s.mb = pick_mb(M, Kp, s.nt, amx ? 32 : 24);
  s.ntm = (M + s.mb - 1) / s.mb;
  s.bpg = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nblk, kGroupBytes / (int64_t(Kp) * 64))));
  if (s.nt > 1 && s.ntm < 4 * s.nt)  // too few M-tiles: split the columns further
    s.bpg = std::min(s.bpg, static_cast<int>(std::max<int64_t>(1, nblk * s.ntm / (4 * s.nt))));
  s.ncg = (nblk + s.bpg - 1) / s.bpg;
  return s;
}

// rows x n bytes -> their sums (and OR into *orv) on the widest vectors of `isa`
void rowsums(Isa isa, const uint8_t* x, int64_t rows, int n, int32_t* out, uint8_t* orv) {
#if defined(__x86_64__)
  if (has_avx512(isa)) return rowsums_avx512(x, rows, n, out, orv);
  if (isa == Isa::Avx2 || isa == Isa::AvxVnni) return rowsums_avx2(x, rows, n, out, orv);
#endif
  for (int64_t r = 0; r < rows; ++r) out[r] = rowsum_u8(x + r * n, n, orv);
}

// Rows [m0, m0 + rows) of a linear layer's input: pointers (read in place, or copied into
// the zero-padded panel when K is not a multiple of 4), row sums, the OR of the codes.
void gather_rows(const uint8_t* x, int K, int Kp, int m0, int rows, Isa isa, uint8_t* panel,
                 const uint8_t** pr, int32_t* as, uint8_t* orv) {
  const uint8_t* x0 = x + static_cast<size_t>(m0) * K;
  if (K == Kp) {
    for (int r = 0; r < rows; ++r) pr[r] = x0 + static_cast<size_t>(r) * K;
  } else {
    for (int r = 0; r < rows; ++r) {
      uint8_t* dst = panel + static_cast<size_t>(r) * Kp;
      std::memcpy(dst, x0 + static_cast<size_t>(r) * K, K);
      std::memset(dst + K, 0, Kp - K);
      pr[r] = dst;
    }
  }
  rowsums(isa, x0, rows, K, as, orv);
}

// A linear layer; with S, the layer whose fp32 output is L's residual (a ResNet block's
// shortcut, same rows and outputs) runs inside the same tasks: per M-tile and column group
// S's epilogue writes its outputs into a per-thread scratch tile, which L's epilogue adds as
// the residual, so that residual map is never written to memory.
void run_linear(const QLayer& L, const uint8_t* x, int M, Epi& e, int nthreads, int* bad_code,
                const QLayer* S = nullptr, const uint8_t* xs = nullptr) {
  const PackedW& w = *L.w;
  const int K = w.K, Kp = w.Kp, nblk = w.Op / 64, O = w.O;
  const LayerTile lt = layer_tile(L, e);
  Epi es0 = S ? S->epi : Epi{};
  const LayerTile lts = S ? layer_tile(*S, es0) : LayerTile{};
  const int Kmax = S ? std::max(Kp, S->w->Kp) : Kp;
  const double macs = double(M) * w.Op * (Kp + (S ? S->w->Kp : 0));
  const bool amx = lt.fn == tile_amx || lts.fn == tile_amx;
  const Split sp = pick_split(M, Kmax, nblk, nthreads, macs, amx);
  const int mb = sp.mb;
  const Isa isa = active_isa();
  // per thread, its buffers taken in a row (see run_winograd): row sums, row pointers, a
  // zero-padded panel, S's output tile, AMX's A panel, the ORs of the codes read (L's, S's)
  Scratch ws;
  struct alignas(64) Bufs {
    int32_t* as;
    const uint8_t** pr;
    uint8_t *panel, *apanel;
    float* res;
    uint8_t orv[2];
  };
  Bufs* bufs = ws.take<Bufs>(sp.nt);
  for (int i = 0; i < sp.nt; ++i)
    bufs[i] = Bufs{ws.take<int32_t>(mb), ws.take<const uint8_t*>(mb), ws.take<uint8_t>(static_cast<size_t>(mb) * Kmax),
                   amx ? ws.take<uint8_t>(amx_panel_bytes(mb, Kmax)) : nullptr,
                   S ? ws.take<float>(static_cast<size_t>(mb) * O) : nullptr, {0, 0}};
  parallel_for(sp.nt, sp.ntm * sp.ncg, [&](int64_t task, int tid) {
    const int64_t ti = task % sp.ntm;
    const int ob0 = static_cast<int>(task / sp.ntm) * sp.bpg, nb = std::min(sp.bpg, nblk - ob0);
    Bufs& bf = bufs[tid];
    int32_t* as = bf.as;
    const uint8_t** pr = bf.pr;
    const int m0 = static_cast<int>(ti) * mb, rows = std::min(mb, M - m0);
    uint8_t* ap = bf.apanel;
    if (!S) {
      gather_rows(x, K, Kp, m0, rows, isa, bf.panel, pr, as, &bf.orv[0]);
      TileArgs t{pr, kOneTap, 1, Kp / 4, rows, m0, lt.w, Kp, ob0, nb, O, as, nullptr, &e, lt.run, ap};
      lt.set(t);
      lt.fn(t);
      return;
    }
    // the tile's rows indexed from 0: S writes scratch rows, L's outputs are offset to m0
    float* res = bf.res;
    const PackedW& sw = *S->w;
    Epi es = es0;
    es.out_f = res;
    gather_rows(xs, sw.K, sw.Kp, m0, rows, isa, bf.panel, pr, as, &bf.orv[1]);
    TileArgs ts{pr, kOneTap, 1, sw.Kp / 4, rows, 0, lts.w, sw.Kp, ob0, nb, O, as, nullptr, &es, lts.run, ap};
    lts.set(ts);
    lts.fn(ts);
    Epi el = e;
    el.residual = res;
    if (el.out_f) el.out_f += static_cast<int64_t>(m0) * O;
    for (int k = 0; k < el.rq.nq; ++k) el.rq.out_q[k] += static_cast<int64_t>(m0) * O;
    gather_rows(x, K, Kp, m0, rows, isa, bf.panel, pr, as, &bf.orv[0]);
    TileArgs t{pr, kOneTap, 1, Kp / 4, rows, 0, lt.w, Kp, ob0, nb, O, as, nullptr, &el, lt.run, ap};
    lt.set(t);
    lt.fn(t);
  });
  uint8_t orv_all = 0, orv_s = 0;
  for (int i = 0; i < sp.nt; ++i) {
    orv_all |= bufs[i].orv[0];
    orv_s |= bufs[i].orv[1];
  }
  *bad_code = (L.a_bits < 8 && (orv_all >> L.a_bits) != 0) || (S && S->a_bits < 8 && (orv_s >> S->a_bits) != 0);
}

std::atomic<int> g_conv_algo{static_cast<int>(ConvAlgo::Auto)};
std::atomic<int64_t> g_winograd_runs{0};

// Whether the conv runs as Winograd F(2x2, 3x3) (qconv_winograd_avx512.cpp): a 3x3 stride-1
// pad-1 conv with even output sizes, codes of <= 4 bits and its weights' transform packed;
// under Auto from 32 input channels, where its 2.25x fewer products outweigh the transforms
// (16 channels: a 4-step K loop per element, the stores of M as long as the GEMM). On the
// AMX path only below 64 channels: from 64 the direct GEMM on tiles is faster (the AMX Xeon:
// tiny's 64- and 128-channel convs 1.3-1.6x, resnet12's 64-640 1.5-2x), at 32 channels
// (K = 288, the tiles' panel gathered and padded to 320) Winograd is 1.36x faster.
bool use_winograd(const QLayer& L, Isa isa, int B) {
  const ConvAlgo algo = static_cast<ConvAlgo>(g_conv_algo.load());
  if (algo == ConvAlgo::Direct || L.w->wino.empty()) return false;
  if (isa != Isa::Avx512Vnni && !(isa == Isa::Amx && L.C < 64)) return false;
  if (L.ks != 3 || L.stride != 1 || L.pad != 1 || L.Ho % 2 || L.Wo % 2 || L.a_bits > 4 || B <= 0) return false;
  return algo == ConvAlgo::Winograd || L.C >= 32;
}

// Jobs of whole tile rows x column groups: V of a job (16 * tiles * C bytes) ~<= 128 KiB,
// at most 48 tiles, the threads balanced as in pick_mb; a group's U (16 * C * 64 bytes per
// block) ~<= 512 KiB.
void run_winograd(const QLayer& L, const uint8_t* xpad, int B, const int32_t* asum, const Epi& e, int nt) {
  const PackedW& w = *L.w;
  const int C = L.C, Ho = L.Ho, Wo = L.Wo, ntpr = Wo / 2, nblk = w.Op / 64;
  const int64_t TR = static_cast<int64_t>(B) * (Ho / 2);
  const int cap = std::max(1, std::min(48, (128 * 1024) / (16 * C)) / ntpr);
  int jr = static_cast<int>(std::min<int64_t>(cap, TR));
  if (nt > 1) {
    int64_t best_cost = -1;
    for (int r = jr; r >= 1; --r) {
      const int64_t jobs = (TR + r - 1) / r;
      const int64_t cost = (jobs + nt - 1) / nt * (int64_t(r) * ntpr + 2);
      if (best_cost < 0 || cost < best_cost) {
        best_cost = cost;
        jr = r;
      }
    }
  }
  const int64_t njr = (TR + jr - 1) / jr;
  int bpg = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nblk, (512 * 1024) / (int64_t(16) * C * 64))));
  if (nt > 1 && njr < 4 * nt) bpg = std::min(bpg, static_cast<int>(std::max<int64_t>(1, nblk * njr / (4 * nt))));
  const int ncg = (nblk + bpg - 1) / bpg;
  g_winograd_runs.fetch_add(1, std::memory_order_relaxed);
  Epi ec = e;
  ec.centred = true;
  const int tiles = jr * ntpr;
  // per thread, its own three takes in a row: V, M and the output tiles' accumulators (laid
  // out kind by kind instead, one thread's buffers a fixed distance from the other's, tiny's
  // 32-channel conv ran 15-40% slower, the most on a busy VM)
  Scratch ws;
  struct Bufs {
    uint8_t* v;
    int32_t *m, *acc;
  };
  Bufs* bufs = ws.take<Bufs>(nt);
  for (int i = 0; i < nt; ++i)
    bufs[i] = Bufs{ws.take<uint8_t>(static_cast<size_t>(16) * tiles * C), ws.take<int32_t>(static_cast<size_t>(16) * kWinoChunk * 64),
                   ws.take<int32_t>(static_cast<size_t>(tiles) * 4 * 64)};
  parallel_for(nt, njr * ncg, [&](int64_t task, int tid) {
    const int64_t ji = task % njr;
    const int ob0 = static_cast<int>(task / njr) * bpg;
    WinoArgs a{};
    a.xpad = xpad;
    a.C = C;
    a.Ho = Ho;
    a.Wo = Wo;
    a.tr0 = ji * jr;
    a.ntr = std::min<int64_t>(jr, TR - a.tr0);
    a.u = w.wino.data();
    a.corr = L.wino_corr.data();
    a.cwz = L.wino_cwz.data();
    a.voff = 2 * ((1 << L.a_bits) - 1);
    a.ob0 = ob0;
    a.nblk = std::min(bpg, nblk - ob0);
    a.O = w.O;
    a.Op = w.Op;
    a.as = asum;
    a.e = &ec;
    a.vbuf = bufs[tid].v;
    a.mbuf = bufs[tid].m;
    a.abuf = bufs[tid].acc;
    wino_avx512(a);
  });
}

void run_conv(const QLayer& L, const uint8_t* x, int B, Epi& e, int nthreads, int* bad_code) {
  const PackedW& w = *L.w;
  const int H = L.H, W = L.W, C = L.C, ks = L.ks, stride = L.stride, pad = L.pad, Ho = L.Ho, Wo = L.Wo;
  const int P = Ho * Wo, K = ks * ks * C, Kp = w.Kp, taps = ks * ks, nblk = w.Op / 64;
  const int64_t M = static_cast<int64_t>(B) * P;
  const int64_t npix = static_cast<int64_t>(B) * H * W;
  const LayerTile lt = layer_tile(L, e);
  const bool amx = lt.fn == tile_amx;
  const Isa isa = active_isa();
  const Split sp = pick_split(M, Kp, nblk, nthreads, double(M) * Kp * w.Op, amx);
  const int mb = sp.mb;
  // C % 4 == 0: the kernels read each tap's C codes in place, from x or (pad > 0) a
  // zero-bordered copy of it, where every tap of every row lies inside; else gather
  // (im2col) rows. A row is then one pointer, its taps fixed offsets from it: the table of
  // ks*ks pointers per row, with a branch per tap at the borders, had been ~12% of a
  // 16-channel 3x3 conv.
  const bool direct = C % 4 == 0;
  // AMX on rows of >= 16 pixels: A tiles read in place from the (padded) input, a chunk
  // from each kernel row's ks*C contiguous codes (QLayer::amx_inplace), instead of packing
  // every row's taps; a row tile of 16 pixels reads on across row ends, and a kernel row's
  // last chunk past its window, into slack after the copy unless Wo % 16 == 0 and the
  // chunks end with the rows
  const bool inplace = amx && L.amx_inplace;
  const bool on_x = pad == 0 && (!inplace || (Wo % 16 == 0 && ks * C % 64 == 0));
  const int Hs = on_x ? H : H + 2 * pad, Ws = on_x ? W : W + 2 * pad;  // the source's dims
  Scratch ws;
  uint8_t* xpad = nullptr;
  const uint8_t* xs = x;
  const size_t img = static_cast<size_t>(Hs) * Ws * C;
  if (direct && !on_x) {
    const size_t slack = inplace ? static_cast<size_t>(16 * stride + ks) * C + 64 : 0;
    xpad = ws.take<uint8_t>(static_cast<size_t>(B) * img + slack);
    std::memset(xpad + static_cast<size_t>(B) * img, 0, slack);
    xs = xpad;
  }
  // One pass over the input per image: per-pixel code sums with the code-range check, AS of
  // every row (the sum of them over its window's valid taps, separably: a column of kernel
  // rows, then the kernel's width), and the zero-bordered copy. Split by image from 128 KiB
  // of codes (the tiny model's 160 KiB maps had run them on one thread: 3% of its T=1);
  // three passes with a barrier each had been 19% of its 16-channel 3x3 conv.
  int32_t* psum = ws.take<int32_t>(npix);
  int32_t* asum = ws.take<int32_t>(M);
  const auto borv = ws.take_slices<uint8_t>(B, 1);  // per image: the OR of its codes
  const int pass_nt = npix * C > (1 << 17) ? sp.nt : 1;
  parallel_for(pass_nt, B, [&](int64_t b, int) {
    const uint8_t* xb = x + static_cast<size_t>(b) * H * W * C;
    int32_t* ps = psum + static_cast<size_t>(b) * H * W;
    uint8_t o = 0;
    rowsums(isa, xb, int64_t(H) * W, C, ps, &o);
    *borv(b) = o;
    // the column sums with pad zeros each side, so that every window is ks of them
    Scratch wt;  // on the thread running this image
    int32_t* colp = wt.take<int32_t>(W + 2 * pad + ks);
    std::fill(colp, colp + W + 2 * pad + ks, 0);
    int32_t* col = colp + pad;
    for (int oh = 0; oh < Ho; ++oh) {
      const int ih0 = oh * stride - pad, i0 = std::max(0, -ih0), i1 = std::min(ks, H - ih0);
      std::fill(col, col + W, 0);
      for (int i = i0; i < i1; ++i) {
        const int32_t* src = ps + (ih0 + i) * W;
        for (int w = 0; w < W; ++w) col[w] += src[w];
      }
      int32_t* dst = asum + (b * Ho + oh) * Wo;
      const int32_t* c = colp;
      if (ks == 3 && stride == 1) {
        for (int ow = 0; ow < Wo; ++ow) dst[ow] = c[ow] + c[ow + 1] + c[ow + 2];
      } else {
        for (int ow = 0; ow < Wo; ++ow, c += stride) {
          int32_t s = 0;
          for (int j = 0; j < ks; ++j) s += c[j];
          dst[ow] = s;
        }
      }
    }
    if (!xpad) return;
    uint8_t* d0 = xpad + static_cast<size_t>(b) * img;
    const size_t prow = static_cast<size_t>(Ws) * C, side = static_cast<size_t>(pad) * C, rowb = static_cast<size_t>(W) * C;
    std::memset(d0, 0, pad * prow);
    for (int h = 0; h < H; ++h) {
      uint8_t* d = d0 + (pad + h) * prow;
      std::memset(d, 0, side);
      std::memcpy(d + side, xb + h * rowb, rowb);
      std::memset(d + side + rowb, 0, side);
    }
    std::memset(d0 + (pad + H) * prow, 0, pad * prow);
  });
  uint8_t orv_all = 0;
  for (int b = 0; b < B; ++b) orv_all |= *borv(b);
  *bad_code = L.a_bits < 8 && (orv_all >> L.a_bits) != 0;
  if (*bad_code) return;
  if (use_winograd(L, isa, B)) return run_winograd(L, xs, B, asum, e, sp.nt);
  std::vector<int64_t> tap_off(taps);  // byte offset of each tap's codes from the top-left one's
  for (int i = 0; i < ks; ++i)
    for (int j = 0; j < ks; ++j) tap_off[i * ks + j] = (int64_t(i) * Ws + j) * C;
  std::vector<int64_t> aoff;
  AmxConv ac{};
  if (inplace) {
    for (int i = 0; i < ks; ++i)
      for (int q = 0; q < ks * C; q += 64) aoff.push_back(tap_off[i * ks] + q);
    ac = AmxConv{xs, aoff.data(), C, stride, Ho, Wo, Hs, Ws};
  }
  uint8_t* zeros = nullptr;
  if (!direct) {
    zeros = ws.take<uint8_t>(static_cast<size_t>(C) + 64);
    std::memset(zeros, 0, static_cast<size_t>(C) + 64);
  }
  // per thread, its buffers taken in a row (see run_winograd): border patterns, row pointers,
  // the gathered rows' panel, AMX's A panel
  struct Bufs {
    int32_t* rp;
    const uint8_t** pr;
    uint8_t *panel, *apanel;
  };
  Bufs* bufs = ws.take<Bufs>(sp.nt);
  for (int i = 0; i < sp.nt; ++i)
    bufs[i] = Bufs{ws.take<int32_t>(mb), ws.take<const uint8_t*>(mb),
                   direct ? nullptr : ws.take<uint8_t>(static_cast<size_t>(mb) * Kp),
                   amx ? ws.take<uint8_t>(amx_panel_bytes(mb, Kp)) : nullptr};
  const int32_t* pid = L.pid.data();
  parallel_for(sp.nt, sp.ntm * sp.ncg, [&](int64_t task, int tid) {
    const int64_t ti = task % sp.ntm;
    const int ob0 = static_cast<int>(task / sp.ntm) * sp.bpg;
    const uint8_t** pr = bufs[tid].pr;
    const int64_t m0 = ti * mb;
    const int rows = static_cast<int>(std::min<int64_t>(mb, M - m0));
    int32_t* rp = bufs[tid].rp;
    int64_t b = m0 / P;
    if (direct) {  // each row's window top-left pixel in the source (padded coordinates),
      // one output row's run of them at a time: an arithmetic sequence (the per-row stepping
      // of (b, oh, ow) had been 13% of the tiny model's 16-channel 3x3 conv)
      const int64_t step = static_cast<int64_t>(stride) * C;
      int p = static_cast<int>(m0 % P);
      for (int r = 0; r < rows;) {
        const int oh = p / Wo, ow0 = p % Wo, n = std::min(rows - r, Wo - ow0);
        const uint8_t* base =
            xs + ((b * Hs + static_cast<int64_t>(oh) * stride) * Ws + static_cast<int64_t>(ow0) * stride) * C;
        for (int i = 0; i < n; ++i) pr[r + i] = base + i * step;
        std::memcpy(rp + r, pid + p, sizeof(int32_t) * n);
        r += n;
        if ((p += n) == P) {
          p = 0;
          ++b;
        }
      }
    } else {  // gathered: (b, oh, ow) of the tile's first row, then stepped (no divisions per row)
      int oh = static_cast<int>(m0 % P) / Wo, ow = static_cast<int>(m0 % P) % Wo;
      for (int r = 0; r < rows; ++r) {
        if (r) {
          if (++ow == Wo) {
            ow = 0;
            if (++oh == Ho) {
              oh = 0;
              ++b;
            }
          }
        }
        rp[r] = pid[static_cast<size_t>(oh) * Wo + ow];
        const int ih0 = oh * stride - pad, iw0 = ow * stride - pad;
        uint8_t* dst = bufs[tid].panel + static_cast<size_t>(r) * Kp;
        for (int i = 0; i < ks; ++i) {
          const int ih = ih0 + i;
          const bool hin = ih >= 0 && ih < H;
          for (int j = 0; j < ks; ++j) {
            const int iw = iw0 + j;
            // taps outside the input read code 0: real-domain zero is handled by WS/CNT
            const uint8_t* src = hin && iw >= 0 && iw < W ? x + ((b * H + ih) * W + iw) * C : zeros;
            std::memcpy(dst + static_cast<size_t>(i * ks + j) * C, src, C);
          }
        }
        std::memset(dst + K, 0, Kp - K);
        pr[r] = dst;
      }
    }
    TileArgs t{pr, direct ? tap_off.data() : kOneTap, direct ? taps : 1, direct ? C / 4 : Kp / 4, rows,
               static_cast<int>(m0), lt.w, Kp, ob0, std::min(sp.bpg, nblk - ob0), w.O, asum + m0, rp, &e,
               lt.run, bufs[tid].apanel, inplace ? &ac : nullptr};
    lt.set(t);
    lt.fn(t);
  });
}

}  // namespace

void force_conv_algo(ConvAlgo a) { g_conv_algo.store(static_cast<int>(a)); }
ConvAlgo conv_algo() { return static_cast<ConvAlgo>(g_conv_algo.load()); }
int64_t winograd_runs() { return g_winograd_runs.load(); }
// one counter per thread, written by that thread only: a shared one's cache line went back
// and forth between the cores (~0.6% of a tiny episode, ~550 redos)
namespace {
struct alignas(64) RedoCount {
  std::atomic<int64_t> n{0};
};
std::mutex g_redo_mu;
std::vector<RedoCount*>& redo_counts() {
  static auto* all = new std::vector<RedoCount*>();  // never destroyed: threads may outlive main
  return *all;
}
RedoCount& my_redo_count() {
  thread_local RedoCount* mine = [] {
    auto* c = new RedoCount();
    std::lock_guard<std::mutex> lk(g_redo_mu);
    redo_counts().push_back(c);
    return c;
  }();
  return *mine;
}
}  // namespace
int64_t fused_redos() {
  std::lock_guard<std::mutex> lk(g_redo_mu);
  int64_t s = 0;
  for (const RedoCount* c : redo_counts()) s += c->n.load(std::memory_order_relaxed);
  return s;
}
void count_fused_redos(int n) {
  RedoCount& c = my_redo_count();
  c.n.store(c.n.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
}

void run_layer(const QLayer& L, const uint8_t* x, int64_t rows, const float* residual, float* out_f,
               uint8_t* const* out_q, int32_t* acc_out, int32_t* as_out, int nthreads, int* bad_code) {
  *bad_code = 0;
  if (rows <= 0) return;
  Epi e = L.epi;
  e.residual = residual;
  e.out_f = out_f;
  for (int k = 0; k < e.rq.nq; ++k) e.rq.out_q[k] = out_q[k];
  e.acc_out = acc_out;
  e.as_out = as_out;
  if (L.conv)
    run_conv(L, x, static_cast<int>(rows / (int64_t(L.Ho) * L.Wo)), e, nthreads, bad_code);
  else
    run_linear(L, x, static_cast<int>(rows), e, nthreads, bad_code);
}

void run_layer_with_shortcut(const QLayer& L, const uint8_t* x, const QLayer& S, const uint8_t* xs, int64_t rows,
                             float* out_f, uint8_t* const* out_q, int nthreads, int* bad_code) {
  *bad_code = 0;
  if (rows <= 0) return;
  if (L.conv || S.conv || S.epi.rq.nq || S.w->O != L.w->O)
    throw ArgError("a fused shortcut needs two linear layers with the same outputs, the shortcut's in fp32");
  Epi e = L.epi;
  e.out_f = out_f;
  for (int k = 0; k < e.rq.nq; ++k) e.rq.out_q[k] = out_q[k];
  run_linear(L, x, static_cast<int>(rows), e, nthreads, bad_code, &S, xs);
}

void qbmm(const uint8_t* a, const uint8_t* v, const uint8_t* v_off, int T, int N, int D, int a_bits,
          int v_bits, float sa, float la, float sv, float lv, float* out, int32_t* acc_out,
          int32_t* as_out, int32_t* vs_out, int nthreads, int* bad_code) {
  // per task: rows = A rows (activation role), columns = V columns (weight role)
  const int Kp = (N + 3) / 4 * 4, Op = (D + 63) / 64 * 64;
  const int bias = v_bits == 8 ? 128 : 0;
  // centred identity of ref_qbmm: a is the row operand (za, da), v the column one (zv, dv)
  int32_t za, zv;
  float da, dv;
  zero_split(la, sa, &za, &da);
  zero_split(lv, sv, &zv, &dv);
  std::vector<float> c1(Op, sa * sv), c3(Op, sa * dv), c2(Op, da * sv), c4(Op, da * dv);
  std::vector<int32_t> zvs(Op, zv);
  const int nt = pick_threads(nthreads, double(T) * N * Kp * Op, double(T) * N * Op);
  PackedW dummy;
  dummy.bits = v_bits;
  dummy.bias = bias;
  int run;
  TileFn tile = pick_tile(dummy, a_bits, Kp >= kAmxMinK, &run);
  const bool amx = tile == tile_amx;
  // per thread, reused across its tasks and taken in a row (see run_winograd): A's panel and
  // row sums, V in the weight layout and its column sums, row pointers, AMX's panels, the ORs
  // of A's and V's codes
  Scratch ws;
  struct alignas(64) Bufs {
    uint8_t* panel;
    int8_t* wd;
    int32_t *as, *vs;
    const uint8_t** pr;
    uint8_t* apanel;
    int8_t* wtile;
    uint8_t ora, orv;
  };
  Bufs* bufs = ws.take<Bufs>(nt);
  for (int i = 0; i < nt; ++i)
    bufs[i] = Bufs{ws.take<uint8_t>(static_cast<size_t>(N) * Kp), ws.take<int8_t>(static_cast<size_t>(Op) * Kp),
                   ws.take<int32_t>(N), ws.take<int32_t>(D), ws.take<const uint8_t*>(N),
                   amx ? ws.take<uint8_t>(amx_panel_bytes(N, Kp)) : nullptr,
                   amx ? ws.take<int8_t>(static_cast<size_t>(Op) * 64 * amx_chunks(Kp, Kp)) : nullptr, 0, 0};
  std::vector<CentredTables> cts(nt);
  const bool avx512 = has_avx512(active_isa());
  const int32_t cnt = N;
  parallel_for(nt, T, [&](int64_t t, int tid) {
    Bufs& bf = bufs[tid];
    int32_t* as = bf.as;
    int32_t* vs = bf.vs;
    uint8_t& ora_t = bf.ora;
    uint8_t& orv_t = bf.orv;
    const uint8_t** pr = bf.pr;
    const uint8_t* at = a + static_cast<size_t>(t) * N * N;
    const uint8_t* vt = v + static_cast<size_t>(t) * N * D;
    const uint8_t* ot = v_off ? v_off + static_cast<size_t>(t) * N : nullptr;
    for (int i = 0; i < N; ++i) {
      uint8_t* dst = bf.panel + static_cast<size_t>(i) * Kp;
      std::memcpy(dst, at + static_cast<size_t>(i) * N, N);
      std::memset(dst + N, 0, Kp - N);
      as[i] = rowsum_u8(dst, N, &ora_t);
      pr[i] = dst;
    }
    // V^T into the weight layout: data[ob][k4][c][j] = v[4*k4 + j][64*ob + c] - bias
    int8_t* wd = bf.wd;
    std::memset(wd, 0, static_cast<size_t>(Op) * Kp);
    std::fill(vs, vs + D, 0);
#if defined(__x86_64__)
    if (avx512) {
      pack_v_avx512(vt, ot, N, D, Kp, bias, wd, vs, &orv_t);
    } else
#endif
    for (int k = 0; k < N; ++k) {
      const uint8_t* row = vt + static_cast<size_t>(k) * D;
      const int off = ot ? ot[k] : 0;
      int8_t* wk = wd + (k / 4) * 256 + (k % 4);
      for (int d0 = 0; d0 < D; d0 += 64) {
        int8_t* wblk = wk + static_cast<size_t>(d0 / 64) * Kp * 64;
        const int dn = std::min(64, D - d0);
        for (int c = 0; c < dn; ++c) {
          const uint8_t val = static_cast<uint8_t>(row[d0 + c] + off);  // callers keep it <= 255
          wblk[c * 4] = static_cast<int8_t>(static_cast<int>(val) - bias);
          vs[d0 + c] += val;
          orv_t |= val;
        }
      }
    }
    Epi e;
    e.c1 = c1.data();
    e.c2 = c2.data();
    e.c3 = c3.data();
    e.c4 = c4.data();
    e.out_f = out + static_cast<size_t>(t) * N * D;
    e.O = D;
    e.as_first = true;
    e.wbias = bias;
    e.zw = zvs.data();
    e.za = za;
    centre(e, vs, &cnt, 1, cts[tid]);
    e.acc_out = acc_out ? acc_out + static_cast<size_t>(t) * N * D : nullptr;
    e.as_out = as_out ? as_out + static_cast<size_t>(t) * N : nullptr;
    if (vs_out) std::copy(vs, vs + D, vs_out + static_cast<size_t>(t) * D);
    const int8_t* wt = wd;
    if (amx) {
      amx_tiles(wd, Kp, Op, Kp, bf.wtile);
      wt = bf.wtile;
    }
    TileArgs ta{pr, kOneTap, 1, Kp / 4, N, 0, wt, Kp, 0, Op / 64, D, as, nullptr, &e, run, bf.apanel};
    tile(ta);
  });
  uint8_t ora = 0, orv = 0;
  for (int i = 0; i < nt; ++i) {
    ora |= bufs[i].ora;
    orv |= bufs[i].orv;
  }
  *bad_code = (a_bits < 8 && (ora >> a_bits) != 0) ? 1 : (v_bits < 8 && (orv >> v_bits) != 0) ? 2 : 0;
}

// ------------------------------------------------------------- quantize
int64_t quantize_avx512(const float* x, int64_t n, float l, float s, float qmax, uint8_t* out);
int64_t quantize_avx2(const float* x, int64_t n, float l, float s, float qmax, uint8_t* out);

int64_t quantize(const float* x, int64_t n, float l, float s, int bits, uint8_t* out, int nthreads) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  const Isa isa = active_isa();
  const int64_t chunk = 1 << 16;
  const int64_t nch = (n + chunk - 1) / chunk;
  const int nt = n < (1 << 18) ? 1 : std::max(1, nthreads);
  std::vector<int64_t> bads(nch, 0);
  parallel_for(nt, nch, [&](int64_t c, int) {
    const int64_t i0 = c * chunk, i1 = std::min(n, i0 + chunk);
#if defined(__x86_64__)
    if (has_avx512(isa)) {
      bads[c] = quantize_avx512(x + i0, i1 - i0, l, s, qmax, out + i0);
      return;
    }
    if (isa == Isa::Avx2 || isa == Isa::AvxVnni) {
      bads[c] = quantize_avx2(x + i0, i1 - i0, l, s, qmax, out + i0);
      return;
    }
#endif
    int64_t b = 0;
    for (int64_t i = i0; i < i1; ++i) {
      if (!std::isfinite(x[i])) ++b;
      out[i] = quant_value(x[i], l, s, qmax);
    }
    bads[c] = b;
  });
  int64_t bad = 0;
  for (int64_t b : bads) bad += b;
  return bad;
}

}  // namespace qgnn
