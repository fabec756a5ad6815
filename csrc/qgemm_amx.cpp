// AMX-INT8 tile: tdpbusd (uint8 activation codes x int8 weight codes, 4 products summed
// exactly into each int32 element, no saturation: the same integers as vpdpbusd) on 16 x 16
// int32 tile accumulators, then the AVX-512 epilogue of qgemm_zmm.h on each accumulator
// row. Chosen at run time only when probe_amx() cleared the CPU, the OS state and the
// tile-data permission; target pragma opened after the includes (see qgemm_avx512.cpp).
//
// Tiles (palette 1, every tile 16 rows x 64 bytes):
//
//   tmm0..3  C[i][j]  int32 accumulators, 16 rows x 16 columns; i = row tile, j = column tile
//   tmm4, 5  A[i]     16 rows x 64 K codes (u8) of the activation panel
//   tmm6, 7  B[j]     16 k4-rows x (16 columns x 4 K codes) (s8): amx_tiles
//
// Both operands are stored tile by tile, each tile a contiguous 1 KiB loaded with stride 64
// (strided tiles share L1 sets across K chunks: a quarter of the speed in a tile-load
// microbenchmark):
//
//   panel[rt][k][r][kk]  = row 16 rt + r of the tile, K code 64 k + kk  (zero beyond Kp / rows)
//   wdata[ob][j][k][r][..] = amx_tiles (qgnn_cpu.h): QLayer::wamx, or qbmm's V; one K
//                            segment for a panel, one per kernel row for a conv read in place
//
// 2 x 2 accumulators (32 rows x 32 columns) per K loop: 4 tile loads feed 4 tdpbusd; the
// previous block's epilogue runs in slices inside that loop (Pending).
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "qgnn_cpu.h"

#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives in the
#pragma GCC diagnostic ignored "-Wuninitialized"        // intrinsic headers (undefined vectors)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,bmi2,fma,amx-tile,amx-int8")

#include "qgemm_zmm.h"

namespace qgnn {
namespace {

constexpr int kTileRows = 16, kKChunk = 64;
constexpr int kAll = 1 << 30;  // epilogue_slice: every vector left

// LDTILECFG's 64-byte operand, palette 1, all eight tiles 16 rows x 64 bytes
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int i = 0; i < 8; ++i) {
      colsb[i] = 64;
      rows[i] = kTileRows;
    }
  }
};

// One A row tile: up to 16 consecutive output rows [r, r + n) of the M-tile. Chunk k of
// its K codes is the tile at a + aoff(k) with row stride `stride`.
struct RowTile {
  const uint8_t* a;
  int r, n;
};

// The A chunk offsets: the packed panel (tile after tile), or a padded NHWC input read in
// place (chunk k = tap k / (C/64), channels 64 (k % (C/64)) .. +63 of that tap).
struct AOperand {
  const int64_t* aoff;  // [nk] or null: the panel, aoff(k) = 1024 k
  int64_t stride;       // 64 (panel) or conv stride * C (padded input)
  int64_t off(int k) const { return aoff ? aoff[k] : static_cast<int64_t>(k) * 1024; }
};

// One block's accumulators (RT x CT tiles: up to 32 rows x 32 columns) waiting for their
// epilogue, which runs in slices between the next block's tile instructions, so that the
// tile unit and the vector ports work at the same time (A/B in one process, resnet12 4-bit
// T=1: the 64-channel 3x3 conv, K = 576, 11% faster, the 160/320-channel ones 5-8%).
struct Pending {
  alignas(64) int32_t acc[2][2][kTileRows][16];  // [row tile][column tile][row][column]
  EpiRow erows[2 * kTileRows];
  Cols cols[2];
  __mmask16 mk[2];
  int64_t m;   // output row of erows[0]
  int o;       // column of column tile 0
  int n0, nrows, ct;  // row tile 0's rows, all rows, column tiles
  int j, rr;          // the next epilogue vector: column tile, block row
};

// the next n vectors of p's epilogue (or all that are left), column tile by column tile:
// vector (j, rr) is row rr of the block (row tile rr < n0 ? 0 : 1) in column tile j
template <int F>
inline void epilogue_slice(Pending& p, const EpiK& ek, int n) {
  for (; n > 0 && p.j < p.ct; --n) {
    const int j = p.j, rr = p.rr, i = rr < p.n0 ? 0 : 1;
    if (p.mk[j])
      epi16<F>(ek, p.cols[j], p.erows[rr], p.m + rr, p.o + 16 * j, p.mk[j],
               _mm512_load_si512(p.acc[i][j][rr - i * p.n0]));
    if (++p.rr == p.nrows) {
      p.rr = 0;
      ++p.j;
    }
  }
}

// RT x CT accumulator tiles (RT, CT in {1, 2}) over all nk K chunks, with prev's epilogue
// (if any) spread over the K loop and finished after it; the results land in cur. b:
// column tile 0's chunk 0, the next column tile nk KiB further.
template <int RT, int CT, int F>
inline void tiles(const RowTile* rt, const AOperand& A, const int8_t* b, int nk, const EpiK& ek, Pending* prev,
                  Pending& cur) {
  const int64_t next = static_cast<int64_t>(nk) * 1024;
  const uint8_t* a0 = rt[0].a;
  const uint8_t* a1 = RT > 1 ? rt[1].a : a0;
  const int per = prev ? (prev->ct * prev->nrows + nk - 1) / nk : 0;
  _tile_zero(0);
  if (CT > 1) _tile_zero(1);
  if (RT > 1) _tile_zero(2);
  if (RT > 1 && CT > 1) _tile_zero(3);
  for (int k = 0; k < nk; ++k) {
    const int64_t kb = static_cast<int64_t>(k) * 1024, ka = A.off(k);
    _tile_loadd(4, a0 + ka, A.stride);
    _tile_loadd(6, b + kb, 64);
    if (CT > 1) _tile_loadd(7, b + next + kb, 64);
    if (RT > 1) _tile_loadd(5, a1 + ka, A.stride);
    _tile_dpbusd(0, 4, 6);
    if (CT > 1) _tile_dpbusd(1, 4, 7);
    if (RT > 1) _tile_dpbusd(2, 5, 6);
    if (RT > 1 && CT > 1) _tile_dpbusd(3, 5, 7);
    if (prev) epilogue_slice<F>(*prev, ek, per);
  }
  if (prev) epilogue_slice<F>(*prev, ek, kAll);
  _tile_stored(0, cur.acc[0][0], 64);
  if (CT > 1) _tile_stored(1, cur.acc[0][1], 64);
  if (RT > 1) _tile_stored(2, cur.acc[1][0], 64);
  if (RT > 1 && CT > 1) _tile_stored(3, cur.acc[1][1], 64);
}

// n <= 64 bytes src -> dst
inline void copy_small(uint8_t* dst, const uint8_t* src, int n) {
  const __mmask64 m = _bzhi_u64(~0ull, n);
  _mm512_mask_storeu_epi8(dst, m, _mm512_maskz_loadu_epi8(m, src));
}

// The tile's rows packed into the panel (each row's taps end to end, K tap-major as the
// weights, cut into 64-code chunks, zero-padded), one row tile per 16 rows.
int pack_panel(const TileArgs& t, int nk, RowTile* rts) {
  const int kq = nk * kKChunk, nrt = (t.rows + kTileRows - 1) / kTileRows, seg = 4 * t.c4n;
  uint8_t* panel = t.apanel;
  for (int i = 0; i < nrt; ++i)
    rts[i] = RowTile{panel + static_cast<int64_t>(i) * nk * 1024, i * kTileRows,
                     t.rows - i * kTileRows < kTileRows ? t.rows - i * kTileRows : kTileRows};
  for (int r = 0; r < nrt * kTileRows; ++r) {
    uint8_t* row = panel + static_cast<int64_t>(r / kTileRows) * nk * 1024 + (r % kTileRows) * kKChunk;
    int kpos = 0;
    if (r < t.rows && seg % kKChunk == 0) {  // whole chunks per tap: plain vector copies
      for (int tap = 0; tap < t.taps; ++tap) {
        const uint8_t* src = t.ptrs[r] + t.toff[tap];
        for (int c = 0; c < seg; c += kKChunk, kpos += kKChunk)
          _mm512_store_si512(row + (kpos / kKChunk) * 1024, _mm512_loadu_si512(src + c));
      }
    } else if (r < t.rows) {
      for (int tap = 0; tap < t.taps; ++tap) {
        const uint8_t* src = t.ptrs[r] + t.toff[tap];
        for (int left = seg; left > 0;) {
          const int off = kpos % kKChunk, n = left < kKChunk - off ? left : kKChunk - off;
          copy_small(row + (kpos / kKChunk) * 1024 + off, src, n);
          src += n;
          kpos += n;
          left -= n;
        }
      }
    }
    for (; kpos < kq; kpos = (kpos / kKChunk + 1) * kKChunk)  // K tail and padding rows: zeros
      _mm512_mask_storeu_epi8(row + (kpos / kKChunk) * 1024 + kpos % kKChunk,
                              _bzhi_u64(~0ull, kKChunk - kpos % kKChunk), _mm512_setzero_si512());
  }
  return nrt;
}

// The tile's rows as runs of <= 16 output pixels within one output row of the padded input:
// run (b, oh, ow0 .. ow0+n-1) reads pixel (oh*stride + i, (ow0 + r)*stride + j) for tap
// (i, j) at row stride stride*C.
int conv_row_tiles(const TileArgs& t, RowTile* rts) {
  const AmxConv& d = *t.conv;
  const int64_t P = static_cast<int64_t>(d.Ho) * d.Wo;
  int64_t b = t.m0 / P;
  int oh = static_cast<int>(t.m0 % P) / d.Wo, ow = static_cast<int>(t.m0 % P) % d.Wo;
  int n = 0;
  for (int r = 0; r < t.rows;) {
    const int len = d.Wo - ow < kTileRows ? d.Wo - ow : kTileRows, take = t.rows - r < len ? t.rows - r : len;
    rts[n++] = RowTile{d.xpad + ((b * d.Hp + static_cast<int64_t>(oh) * d.stride) * d.Wp +
                                 static_cast<int64_t>(ow) * d.stride) * d.C, r, take};
    r += take;
    ow += take;
    if (ow == d.Wo) {
      ow = 0;
      if (++oh == d.Ho) {
        oh = 0;
        ++b;
      }
    }
  }
  return n;
}

}  // namespace

int64_t amx_panel_bytes(int rows, int Kp) {
  const int64_t nrt = (rows + kTileRows - 1) / kTileRows;
  return nrt * kTileRows * 64 * amx_chunks(Kp, Kp) + static_cast<int64_t>(rows) * sizeof(RowTile) + 64;
}

void tile_amx(const TileArgs& t) {
  const Epi& e = *t.e;
  if (e.as_out && t.ob0 == 0)
    for (int r = 0; r < t.rows; ++r) e.as_out[t.m0 + r] = t.as[r];
  const int nk = amx_chunks(t.Kp, t.amx_seg ? t.amx_seg : t.Kp);
  // the row-tile list after the panel, or (a conv read in place: no panel) in its place
  const int64_t panel_bytes = (t.rows + kTileRows - 1) / kTileRows * kTileRows * static_cast<int64_t>(nk) * kKChunk;
  RowTile* rts = reinterpret_cast<RowTile*>(t.conv ? t.apanel : t.apanel + panel_bytes);
  const int nrt = t.conv ? conv_row_tiles(t, rts) : pack_panel(t, nk, rts);
  const AOperand A{t.conv ? t.conv->aoff : nullptr, t.conv ? static_cast<int64_t>(t.conv->stride) * t.conv->C : 64};

  static const TileConfig cfg;
  _tile_loadconfig(&cfg);  // per call: torch's oneDNN may load its own config on this thread
  const EpiK ek(e);
  const int64_t tile_bytes = static_cast<int64_t>(nk) * 1024;
  with_epi_flags<kCENT | kFUSED>(e, [&](auto f) {
    constexpr int F = decltype(f)::value;
    Pending ring[2];  // the block in flight, the one whose epilogue is pending
    Pending* prev = nullptr;
    int slot = 0;
    for (int ob = t.ob0; ob < t.ob0 + t.nblk; ++ob) {
      const int o0 = ob * 64, ncols = t.O - o0 < 64 ? t.O - o0 : 64, nct = (ncols + 15) / 16;
      for (int j0 = 0; j0 < nct; j0 += 2) {
        const bool two_cols = j0 + 1 < nct;
        const int8_t* b = t.wdata + (static_cast<int64_t>(ob) * 4 + j0) * tile_bytes;
        __mmask16 mk[2];
        for (int j = 0; j < 2; ++j) {
          const int n = ncols - 16 * (j0 + j);
          mk[j] = n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1u);
        }
        for (int i = 0; i < nrt; i += 2) {
          const bool two_rows = i + 1 < nrt;
          Pending& cur = ring[slot];
          const int r0 = rts[i].r;
          cur.n0 = rts[i].n;
          cur.nrows = rts[i].n + (two_rows ? rts[i + 1].n : 0);
          cur.ct = two_cols ? 2 : 1;
          cur.m = t.m0 + r0;
          cur.o = o0 + 16 * j0;
          for (int j = 0; j < cur.ct; ++j) {
            cur.mk[j] = mk[j];
            if (mk[j]) cur.cols[j] = load_cols<F>(e, cur.o + 16 * j, mk[j]);
          }
          for (int r = 0; r < cur.nrows; ++r) cur.erows[r] = epi_row(e, t.rpat ? t.rpat[r0 + r] : 0, t.as[r0 + r]);
          cur.j = cur.rr = 0;
          if (two_rows && two_cols)
            tiles<2, 2, F>(rts + i, A, b, nk, ek, prev, cur);
          else if (two_rows)
            tiles<2, 1, F>(rts + i, A, b, nk, ek, prev, cur);
          else if (two_cols)
            tiles<1, 2, F>(rts + i, A, b, nk, ek, prev, cur);
          else
            tiles<1, 1, F>(rts + i, A, b, nk, ek, prev, cur);
          prev = &cur;
          slot ^= 1;
        }
      }
    }
    if (prev) epilogue_slice<F>(*prev, ek, kAll);
  });
  _tile_release();
}

}  // namespace qgnn

#pragma GCC pop_options
#endif  // __x86_64__
