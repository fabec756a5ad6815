// Packed-int CPU kernels of qgnn-deploy: shared declarations.
//
// Raw pointers and sizes only (no torch, no pybind11): bindings.cpp validates and
// calls in. Every integer op is one GEMM shape
//     ACC[m, o] = sum_k A[m, k] * W[o, k]      A: uint8 activation codes, W: weight codes
// followed by the fp32 epilogue of qgnn_deploy/ops/reference.py, fused into the store.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace qgnn {

// Raised for arguments a kernel cannot run on; the binding maps it to a Python ValueError
// subclass, so nothing invalid ever reaches memory.
struct ArgError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Raised for a caller's values a kernel cannot compute on (NaN / Inf images): the binding
// maps it to qgnn_deploy._C.InputValueError, which the Python side raises as InputError.
struct InputValueError : ArgError {
  using ArgError::ArgError;
};

// ------------------------------------------------------------------ dispatch
// Kernel paths, slowest first: the numeric order is the dispatch preference (detected_isa
// picks the highest one isa_blocker clears). Amx runs the GEMMs on AMX-INT8 tiles and
// everything else on the AVX-512 paths (every AMX CPU has AVX-512 VNNI; its blocker checks).
enum class Isa : int { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512Vnni = 3, Amx = 4 };
constexpr int kIsaCount = 5;

// An ISA was asked for (QGNN_CPU_ISA or force_isa) that this process cannot run; the
// binding maps it to qgnn_deploy._C.IsaUnavailableError.
struct IsaUnavailable : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* isa_name(Isa);
int isa_from_name(const std::string& name);  // -1 for "auto" / ""; ArgError naming the valid ones
std::string isa_blocker(Isa);    // "" when this CPU, OS and build run it, else why not
Isa detected_isa();              // the fastest runnable path
// force_isa's choice, else QGNN_CPU_ISA's (read once per process), else detected. Throws
// ArgError (unknown name) or IsaUnavailable (not runnable) for a bad QGNN_CPU_ISA: every
// driver calls it on the calling thread before its workers start.
Isa active_isa();
void force_isa(int isa);         // -1: back to QGNN_CPU_ISA / detected; IsaUnavailable if not runnable

// AMX-INT8 detection from raw CPUID / XCR0 values, so the decision is testable with
// synthetic registers on any CPU.
struct AmxProbe {
  uint32_t max_leaf = 0;       // CPUID.0:EAX
  uint32_t leaf7_edx = 0;      // CPUID.(EAX=7,ECX=0):EDX   bit 24 AMX-TILE, bit 25 AMX-INT8
  bool osxsave = false;        // CPUID.1:ECX[27]           XGETBV usable
  uint64_t xcr0 = 0;           // XGETBV(0)                 bit 17 XTILECFG, bit 18 XTILEDATA
  uint32_t palettes = 0;       // CPUID.(EAX=0x1D,ECX=0):EAX  highest palette id
  uint32_t pal1_eax = 0, pal1_ebx = 0, pal1_ecx = 0;  // CPUID.(EAX=0x1D,ECX=1): palette 1 geometry
  int perm_errno = -1;         // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): 0 granted,
                               // errno refused, -1 not asked (an earlier check failed)
};
AmxProbe probe_amx();                       // this CPU; asks for the permission once per process
std::string amx_blocker(const AmxProbe&);   // "" when hardware and OS could run AMX-INT8 tiles

// ------------------------------------------------------------------ weights
// 64-byte aligned storage: a zmm load of a 64-byte weight row must not straddle two
// cache lines (plain operator new gave 16-byte alignment, and every load split: ~5% of
// a 3x3 128@16 conv).
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <class U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};

// Repacked weights, built once from the canonical LSB bit stream (ops/packing.py).
// Inner-loop layout, int8, one 64-column block after another:
//
//   data[ob][k4][c][j] = code[64*ob + c][4*k4 + j] - bias     c < 64, j < 4
//
//   k4 ->   | c=0: k0 k1 k2 k3 | c=1: k0 k1 k2 k3 | ... | c=63: k0..k3 |   256 bytes / k4
//
// i.e. one 32-bit lane per output column holding 4 consecutive K codes, the operand
// shape vpdpbusd (and vpmaddubsw + vpmaddwd) consume. K pads to a multiple of 4 and O
// to a multiple of 64 with zero codes (zeros add nothing to ACC). bias = 128 for 8-bit
// weights (codes 0..255 do not fit int8; raw ACC = kernel ACC + 128 * AS), else 0.
//
// Where the CPU's own path is a 256-bit one (AVX2, AVX-VNNI), also as that tile streams them,
// each 16-column group's K run contiguous (read in place, a group's 64 bytes per k4 lie
// 256 bytes apart: only a quarter of the L1 sets hold a group, which missed from K ~ 512):
//
//   ymm[ob][q][k4][c][j] = data[ob][k4][16q + c][j]     q < 4 groups of 16 columns, c < 16
struct PackedW {
  int O = 0, K = 0, Kp = 0, Op = 0, bits = 0, taps = 1, bias = 0;
  std::vector<int8_t, Aligned64<int8_t>> data;   // Op/64 * Kp/4 * 256, 64-byte aligned
  std::vector<int8_t, Aligned64<int8_t>> ymm;    // Op * Kp, or empty
  std::vector<int32_t> wsum;     // [O] sum_k code
  std::vector<int32_t> tapsum;   // [O][taps] per kernel tap (conv border WS)
  // A 3x3 conv of <= 4-bit codes where AVX-512 VNNI runs, C = K / 9 a multiple of 4: its
  // Winograd F(2x2, 3x3) weights (qconv_winograd_avx512.cpp), per 64-column block and
  // transform element e < 16 the layout of data with K = C:
  //   wino[ob][e][c4][c][j] = U_e[4*c4 + j][64*ob + c],  U = (2G)(code - wino_cw)(2G)^T
  // and wino_corr[q][o] (q < 4: the tile's output pixels, row-major) = (A^T S A)[q] of the
  // column sums S_e[o] = sum_c U_e[c][o]; empty otherwise
  std::vector<int8_t, Aligned64<int8_t>> wino;   // Op/64 * 16 * C * 64
  std::vector<int32_t> wino_corr;                // [4][Op]
  int wino_cw = 0;
};

void prepack(const uint8_t* packed, int O, int K, int bits, int taps, PackedW* out);
// AMX-INT8 B tiles of weights in data's layout (Op columns, Kp codes), each a contiguous
// 1 KiB so a tile load is one sequential stream (read in place, data puts a tile's 16 rows
// 256 bytes apart, and every K chunk of a column tile in the same 16 L1 sets). K is cut
// into segments of `seg` codes (Kp % seg == 0, seg % 4 == 0), each zero-padded to whole
// chunks of 64: one segment (seg = Kp) for a packed A panel, one per kernel row (seg = ks*C,
// contiguous in NHWC) for a conv whose A tiles are read in place (AmxConv):
//
//   tiles[ob][j][k][r][c][i] = data[ob][seg/4 * s + 16 q + r][16 j + c][i],  k = s * cps + q
//   j < 4 column tiles of 16, s < Kp/seg segments, q < cps = ceil(seg/64) chunks each,
//   r < 16 k4-rows, c < 16, i < 4; rows with 16 q + r >= seg/4 are 0
int amx_chunks(int Kp, int seg);  // K chunks of 64 codes: Kp/seg * cps
void amx_tiles(const int8_t* data, int Kp, int Op, int seg, int8_t* tiles);  // Op * 64 * amx_chunks bytes
void unpack_row(const uint8_t* row, int K, int bits, uint8_t* codes);   // canonical -> codes
void pack_row(const uint8_t* codes, int K, int bits, uint8_t* row);     // codes -> canonical

// ------------------------------------------------------------------ epilogue
// A layer whose output only feeds quantizers (directly or through a max-pool, which
// commutes with them) emits their codes -- up to kMaxRequant sets -- instead of fp32.
constexpr int kMaxRequant = 3;
// The requantized outputs of an epilogue: nq quantizers, codes clamp(rne((y - l) / s), 0, qmax)
// of quantizer k into out_q[k] [M, O]; inv_out_s = 1/out_s, the tiles' fast path. Raw fields
// only (the ISA translation units copy it into their locals).
struct Requant {
  int nq = 0;
  float out_l[kMaxRequant] = {}, out_s[kMaxRequant] = {1.f, 1.f, 1.f}, qmax[kMaxRequant] = {};
  float inv_out_s[kMaxRequant] = {1.f, 1.f, 1.f};
  uint8_t* out_q[kMaxRequant] = {};
};
// The Requant of nq quantizers (l, s, bits), checked: l and s finite, s > 0, bits one of
// (2, 3, 4, 8); out_q is left for the caller. Every layer kind derives its quantizers here.
Requant make_requant(int nq, const float* out_l, const float* out_s, const int* out_bits);

// The centred identity of ref_epilogue: zero points zw[o] (column operand, e.g. weights)
// and za (row operand, e.g. activations) move into exact int32 parts
//   ACC' = ACC - zw*AS - za*WS + zw*za*CNT = ACC + (wbias - zw)*AS - za*WS'
//   WS'  = WS - zw*CNT          AS' = AS - za*CNT
// then y = c1*ACC' + c2*WS' + c3*AS' + c4*CNT in fp32, in this order (as_first swaps
// terms 2 and 3: the order of ref_qbmm), *post_scale, +post_shift, +residual, LeakyReLU,
// quantize. int32 arithmetic wraps (the reference rejects results beyond int32).
// The fused form of a code-output epilogue (fuse_epilogue, qgemm.cpp; the AVX-512 tiles):
//   z = fma(c1*ps, ACC', fma(c3*ps, AS', (t2 + t4)*ps + sh)) [+ residual]
//   u = fma(z, z >= 0 ? 1/s : slope/s, -l/s),  code = rne(clamp(u, 0, qmax))
// three roundings where the reference's order takes ten. Its u is within a bound of the
// reference's quotient that the layer's constants and the codes' ranges give; a code is
// kept where |u - rne(u)| < room[k] = 0.5 - that bound, else the row's 16 columns are
// redone in the reference's order (the bound: 2-5e-4 on the shipped models, ~1% of rows).
struct FusedEpi {
  const float *c1 = nullptr, *c3 = nullptr;  // c1*ps, c3*ps [>= Op]; c1 null: not fused
  const float* t24_tab = nullptr;            // (t2 + t4)*ps + sh [patterns][O]
  float mpos[kMaxRequant] = {}, mneg[kMaxRequant] = {}, nl[kMaxRequant] = {}, room[kMaxRequant] = {};
};

struct Epi {
  const float *c1 = nullptr, *c2 = nullptr, *c3 = nullptr, *c4 = nullptr;  // [>= Op]
  const float *post_scale = nullptr, *post_shift = nullptr;                 // [O] or null
  const float* residual = nullptr;                                          // [M, O] or null
  bool has_slope = false;
  float slope = 0.f;
  Requant rq;                    // requantized outputs: rq.nq == 0 = one fp32 output out_f
  float* out_f = nullptr;        // [M, O] when rq.nq == 0
  int O = 0;
  bool as_first = false;
  // code outputs (rq.nq > 0) and c2, c3, c4 all zero (zero_point="snap": offsets on the
  // grid): the remainder terms add only signed zeros, which change no code, so the tiles
  // skip them (set by centre(); fp32 outputs keep them, and their zeros' signs)
  bool zero_rem = false;
  int32_t wbias = 0;             // raw ACC = kernel ACC + wbias * AS (8-bit weights)
  // the kernel ACC is ACC - zw*AS already (the AVX-512 tiles on QLayer::wc, the Winograd
  // conv): the epilogue skips its (wbias - zw)*AS term; raw ACC = kernel ACC + zw*AS
  bool centred = false;
  const int32_t* zw = nullptr;   // [>= O] column zero points (binding)
  int32_t za = 0;                // row zero point (binding)
  // per output row, pattern pid[m % P] (conv borders; else pattern 0) selects
  const int32_t* ws_tab = nullptr;   // WS'      [patterns][O]   (drivers, via centre())
  const int32_t* zws_tab = nullptr;  // za * WS' [patterns][O]
  const int32_t* cnt_tab = nullptr;  // CNT      [patterns]
  const int32_t* nzw = nullptr;      // wbias - zw[o]  [>= Op]
  const float* t2_tab = nullptr;     // c2[o] * float(WS')  [patterns][O] (same fp32 product)
  const float* t4_tab = nullptr;     // c4[o] * float(CNT)  [patterns][O]
  const int32_t* pid = nullptr;      // [P] or null (pattern 0)
  int P = 1;
  FusedEpi fz;                       // set by fuse_epilogue (conv / linear layers)
  // optional raw outputs for exact tests (int32 [M, O] / [M]); epilogue still runs
  int32_t* acc_out = nullptr;
  int32_t* as_out = nullptr;
};

// A tile row's epilogue operands: the offset prow = pattern * O of its border pattern's row
// in the [patterns][O] tables (zws_tab, t2_tab, t4_tab, FusedEpi::t24_tab), its AS, and
// AS' = AS - za*CNT (int32, wrapping) in fp32. The ISA tiles build it with epi_row; internal
// linkage, so each target's translation unit keeps its own.
struct EpiRow {
  int32_t prow;
  int32_t as;
  float asp;
};
static inline EpiRow epi_row(const Epi& e, int pat, int32_t as) {
  const uint32_t asp = static_cast<uint32_t>(as) - static_cast<uint32_t>(e.za) * static_cast<uint32_t>(e.cnt_tab[pat]);
  return EpiRow{pat * e.O, as, static_cast<float>(static_cast<int32_t>(asp))};
}

// ref_zero_split: z = clamp(rne(-offset / scale), 0, 255), d = offset + scale * z (fp32)
void zero_split(float offset, float scale, int32_t* z, float* d);

// Fills e.ws_tab / zws_tab / nzw / cnt_tab from raw WS [npat][O] and CNT [npat], and e.zero_rem
// (e.c1..c4 and e.rq set before).
struct CentredTables {
  std::vector<int32_t> wsp, zws, nzw, cnt;
  std::vector<float> t2, t4;
};
void centre(Epi& e, const int32_t* ws_raw, const int32_t* cnt, int npat, CentredTables& t);

// A conv's input for AMX A tiles read in place: NHWC [B, Hp, Wp, C] with the zero border
// of the padding (Hp = H + 2 pad, Wp = W + 2 pad) and slack after it for the rows a short
// row tile reads beyond its run and for the last chunk of a kernel row, which reads up to
// 63 codes past the window (their weights are zero). A kernel row's ks taps are ks*C
// contiguous codes: aoff[k], the byte offset of chunk k = i * cps + q (kernel row i, codes
// 64 q .. 64 q + 63 of it) from a row tile's first pixel, is i * Wp * C + 64 q.
struct AmxConv {
  const uint8_t* xpad;
  const int64_t* aoff;
  int C, stride, Ho, Wo, Hp, Wp;
};

// One M-tile of `rows` output rows against all column blocks of the weights, epilogue
// fused into the store. Activations come as one pointer per row and one byte offset per
// kernel tap:
//   ptrs[r] + toff[t] -> 4*c4n codes of row r for kernel tap t (K = taps * 4*c4n = Kp)
// so a conv reads its NHWC input in place (implicit GEMM on the zero-bordered copy of its
// input: a row's pointer is its window's top-left pixel) and a linear layer has taps = 1,
// toff = kOneTap. Raw fields only: ISA translation units must not instantiate std
// templates (ODR).
inline constexpr int64_t kOneTap[1] = {0};
struct TileArgs {
  const uint8_t* const* ptrs;
  const int64_t* toff;
  int taps, c4n, rows, m0;
  const int8_t* wdata;   // PackedW::data (or a copy of its layout: QLayer::wc; AMX: amx_tiles)
  int Kp, ob0, nblk, O;  // column blocks [ob0, ob0 + nblk) of 64; as_out is written when ob0 == 0
  const int32_t* as;     // [rows] activation sums
  const int32_t* rpat;   // [rows] border pattern of each row (== e->pid[m % P]), or null: 0
  const Epi* e;
  // AVX2 only (pick_tile): how many consecutive vpmaddubsw int16 pair sums one int16 lane
  // can add without overflow before they are widened to int32; 0: a pair sum itself could
  // saturate (8-bit x 8-bit), so the activations go in as two nibbles
  int pair_run;
  // AMX only: scratch of amx_panel_bytes(rows, Kp) bytes, 64-byte aligned; and for a conv
  // whose A tiles are read in place from its padded input (ptrs unused), that input
  uint8_t* apanel = nullptr;
  const AmxConv* conv = nullptr;
  // AVX2 / AVX-VNNI only: wdata in PackedW::ymm's layout (else data's: qbmm's run-time V,
  // or weights packed where the CPU's own path is not a 256-bit one)
  bool ymm_layout = false;
  int amx_seg = 0;  // AMX only: wdata's K segment (amx_tiles); 0: Kp, one segment
};

// One job of the Winograd conv (qconv_winograd_avx512.cpp): tile rows [tr0, tr0 + ntr) of all
// images (Ho / 2 per image, Wo / 2 tiles each, Ho and Wo even) against column blocks
// [ob0, ob0 + nblk), epilogue fused. Raw fields only, like TileArgs.
constexpr int kWinoChunk = 12;   // tiles per register chunk (6 for 64-column blocks)
struct WinoArgs {
  const uint8_t* xpad;   // NHWC [B, Ho + 2, Wo + 2, C] codes with the zero border
  int C, Ho, Wo;
  int64_t tr0, ntr;
  const int8_t* u;       // PackedW::wino
  const int32_t* corr;   // [4][Op]: voff * PackedW::wino_corr (QLayer::wino_corr)
  const int32_t* cwz;    // [Op]: PackedW::wino_cw - zw[o] (QLayer::wino_cwz; the sums come out centred)
  int voff;              // 2 * (2^a_bits - 1)
  int ob0, nblk, O, Op;
  const int32_t* as;     // [M] AS of every output row
  const Epi* e;          // its pid / P give each row's border pattern
  uint8_t* vbuf;         // scratch: 16 * tiles * C
  int32_t* mbuf;         // 16 * kWinoChunk * 64
  int32_t* abuf;         // tiles * 4 * 64
};
void wino_avx512(const WinoArgs& a);

void tile_scalar(const TileArgs& t);
void tile_avx2(const TileArgs& t);
void tile_avxvnni(const TileArgs& t);
void tile_avx512(const TileArgs& t);
void tile_amx(const TileArgs& t);
int64_t amx_panel_bytes(int rows, int Kp);  // tile_amx's scratch for `rows` rows of Kp codes
// the AVX-512 helpers (row sums, V packing, quantize, FP32 rows) serve both of these paths
inline bool has_avx512(Isa isa) { return isa == Isa::Avx512Vnni || isa == Isa::Amx; }
int32_t rowsum_u8(const uint8_t* p, int n, uint8_t* orv);  // sum and OR of bytes

// ------------------------------------------------------------------ layers
// The raw parameters of a quantized conv / linear, as ref_qconv2d / ref_qlinear take them.
struct LayerParams {
  const float* w_scale = nullptr;    // [O] > 0
  const float* w_offset = nullptr;   // [O]
  float a_scale = 1.f, a_offset = 0.f;
  const float* post_scale = nullptr; // [O] or null
  const float* post_shift = nullptr; // [O] or null
  bool has_slope = false;
  float slope = 0.f;
  int nq = 0;                        // requantize to nq code outputs (out_l, out_s, out_bits)[k]
  float out_l[kMaxRequant] = {}, out_s[kMaxRequant] = {1.f, 1.f, 1.f};
  int out_bits[kMaxRequant] = {8, 8, 8};
};

// A quantized conv / linear with every constant of its epilogue derived once: the
// centred-identity constants of ref_epilogue and, for a conv, the border tables of one
// input size. Built by prepare_layer (eager calls build one per call; a compiled plan
// once); run_layer only reads it, so concurrent runs may share it. Not copyable: epi
// points into the vectors.
struct QLayer {
  const PackedW* w = nullptr;        // owned by the caller, outlives the layer
  int a_bits = 8;
  bool conv = false;                 // false: a linear layer over rows of K codes
  int ks = 1, stride = 1, pad = 0, H = 1, W = 1, C = 0, Ho = 1, Wo = 1;
  std::vector<float> c1, c2, c3, c4, post_scale, post_shift;
  std::vector<int32_t> zw, pid;
  CentredTables tables;
  // the weights with their zero points taken out, PackedW::data's layout: wc = code - zw[o]
  // (int8 where every zw <= 128 and codes have <= 4 bits, on a CPU with AVX-512 VNNI; else
  // empty), so the AVX-512 tile's ACC is ACC - zw*AS (Epi::centred)
  std::vector<int8_t, Aligned64<int8_t>> wc;
  // where AMX can run a layer (K >= kAmxMinK, or a k x k conv read in place, k > 1): its B tiles
  // (amx_tiles) of wc (amx_centred) or else of PackedW::data, cut into segments of
  // amx_seg codes: one kernel row each for a conv that reads its A tiles in place
  // (amx_inplace: C % 4 == 0 and output rows of >= 16 pixels), all of K in one otherwise
  std::vector<int8_t, Aligned64<int8_t>> wamx;
  int amx_seg = 0;
  bool amx_centred = false, amx_inplace = false;
  // a conv with PackedW::wino: WinoArgs::corr and ::cwz, derived here once
  std::vector<int32_t> wino_corr, wino_cwz;
  std::vector<float> fz_c1, fz_c3, fz_t24;  // FusedEpi's tables
  Epi epi;                           // out_*, residual, acc_out, as_out are set per run
  QLayer() = default;
  QLayer(const QLayer&) = delete;
  QLayer& operator=(const QLayer&) = delete;
};

// Validates the parameters (finite, steps > 0) and derives the constants. ks = 0: linear.
void prepare_layer(QLayer& L, const PackedW& w, int a_bits, const LayerParams& p, int ks, int stride,
                   int pad, int H, int W, int C);

// Runs L on `rows` output rows: a linear layer on x [rows, K]; a conv on x NHWC
// [rows / (Ho*Wo), H, W, C] (rows = B*Ho*Wo). residual: fp32 [rows, O] or null; out_f:
// fp32 [rows, O] when L does not requantize, else out_q: L's nq uint8 [rows, O] outputs;
// acc_out/as_out: optional raw ACC [rows, O] / AS [rows] for exact tests. bad_code: set
// when an input code is >= 2^a_bits.
void run_layer(const QLayer& L, const uint8_t* x, int64_t rows, const float* residual, float* out_f,
               uint8_t* const* out_q, int32_t* acc_out, int32_t* as_out, int nthreads, int* bad_code);
// L (linear) with its residual computed by S (linear, fp32 output, same rows and outputs)
// on xs inside the same tasks: S's output never goes to memory. Results as run_layer with
// residual = S's output.
void run_layer_with_shortcut(const QLayer& L, const uint8_t* x, const QLayer& S, const uint8_t* xs, int64_t rows,
                             float* out_f, uint8_t* const* out_q, int nthreads, int* bad_code);

// How 3x3 convs run on the AVX-512 VNNI path: Auto picks Winograd F(2x2, 3x3) where it is
// exact and faster (run_conv), Direct never, Winograd wherever it is exact (tests, benches).
// Process-wide, like force_isa.
enum class ConvAlgo : int { Auto = 0, Direct = 1, Winograd = 2 };
void force_conv_algo(ConvAlgo a);
ConvAlgo conv_algo();
int64_t winograd_runs();   // convs run as Winograd in this process (tests: the path is taken)
// Rows x 16 columns whose fused epilogue (FusedEpi) was redone in the reference's order, in
// this process (tests: the fallback is taken); count_fused_redos adds to it
int64_t fused_redos();
void count_fused_redos(int n);

// ------------------------------------------------------------------ ops
// Threads: M-tiles (or tasks) spread over `nthreads` (thread_pool.h); ops under ~2 MMAC
// run on the calling thread. bad_code: set when an input code is >= 2^bits (checked in
// the same pass that sums the rows; the output is then unspecified and the binding raises).
// a: [T, N, N], v: [T, N, D]; out float [T, N, D]. v_off: null, or per-node codes
// (ref_node_rows): node k's codes on the v_bits grid are v[k] + v_off[k] ([T, N]; added
// while V is packed, so the products are the shared-grid ones).
void qbmm(const uint8_t* a, const uint8_t* v, const uint8_t* v_off, int T, int N, int D, int a_bits,
          int v_bits, float sa, float la, float sv, float lv, float* out, int32_t* acc_out,
          int32_t* as_out, int32_t* vs_out, int nthreads, int* bad_code);
// Per-node widths (ref_node_rows): v [rows, D] codes -> q = v - min of the row, row_off =
// that minimum, row_bits = the first of bits[0..nb) (ascending) with max(q) < 2^b.
void node_rows(const uint8_t* v, int64_t rows, int D, const int* bits, int nb, uint8_t* q,
               uint8_t* row_bits, uint8_t* row_off);
// codes = clamp(rne((x - l) / s), 0, 2^bits - 1); returns the number of non-finite inputs
int64_t quantize(const float* x, int64_t n, float l, float s, int bits, uint8_t* out, int nthreads);

// ------------------------------------------------------------------ FP32 layers
// An FP32 conv / linear of ops/episode_ops.py: products summed in float64 from the bias,
// rounded once to float32, then the fp32 epilogue (*post_scale, +post_shift, +residual,
// LeakyReLU) in that order.
//
// The row kernels' view of a layer (raw fields only: the ISA translation units include it)
constexpr int F64_MAX_OP = 4096;  // widest FP32 layer the row kernels take
struct F64Args {
  const double* wt = nullptr;    // [K][Op], K in (kh, kw, C) order; a linear O < 8: [O][K]
  const double* bias = nullptr;  // [Op], zero padded
  const float* ps = nullptr;     // [Op] or null
  const float* sh = nullptr;     // [Op] or null
  bool has_slope = false;
  float slope = 0.f;
  int O = 0, Op = 0, K = 0;      // Op: O rounded up to 8
  int ks = 0, stride = 1, pad = 0, H = 1, W = 1, C = 0, Ho = 1, Wo = 1;  // conv geometry; ks = 0: linear
  Requant rq;                    // requantized outputs (rq.out_q unused: the rows take out_q)
  // Per call, AVX-512 and AVX2 rows only (null: float64 sums): a conv with code outputs, no residual,
  // O <= 64 and an unpadded input sums in float32 and keeps a code when the quotient lies
  // less than room[k * 64 + o] (0.5 - its error margin) from its nearest integer, else
  // redoes that pixel in float64
  const float* wt32 = nullptr;   // [K][64] float32 weights
  const float* bias32 = nullptr; // [64]
  const float* room = nullptr;   // [nq][64]
  // with a LeakyReLU: the rooms of lanes whose z = sum * ps + sh is below zcut[o] (negative
  // on both paths: only the slope's share of the error), or null
  const float* room_neg = nullptr;  // [nq][64]
  const float* zcut = nullptr;      // [64]
};
// output rows [r0, r1): linear x [rows, K]; conv x NHWC [B, H, W, C]; res / out_f / the
// nq out_q [rows, O]
void f64_rows_scalar(const F64Args& a, const float* x, int64_t r0, int64_t r1, const float* res, float* out_f,
                     uint8_t* const* out_q);
void f64_rows_avx2(const F64Args& a, const float* x, int64_t r0, int64_t r1, const float* res, float* out_f,
                   uint8_t* const* out_q);
void f64_rows_avx512(const F64Args& a, const float* x, int64_t r0, int64_t r1, const float* res, float* out_f,
                     uint8_t* const* out_q);

// Built once (prepare_float_layer), read-only afterwards.
struct FloatLayer {
  std::vector<double, Aligned64<double>> wt;
  std::vector<double, Aligned64<double>> bias;   // padded to Op
  std::vector<float> post_scale, post_shift;     // padded to Op, or empty
  std::vector<float, Aligned64<float>> wt32;     // [K][64] for the float32 sums (O <= 64 convs), or empty
  std::vector<float, Aligned64<float>> bias32;   // [64]
  std::vector<float> wabs;                       // [O] sum_k |w[o][k]|: the float32 sums' error bound
  F64Args args;                  // points into the vectors above; holds the geometry
  FloatLayer() = default;
  FloatLayer(const FloatLayer&) = delete;
  FloatLayer& operator=(const FloatLayer&) = delete;
};
// weight: float32 [O, K] (a conv's K in (kh, kw, C) order); ks = 0: linear; nq requantized
// outputs (l, s, bits)
void prepare_float_layer(FloatLayer& L, const float* weight, int O, int K, const float* bias,
                         const float* post_scale, const float* post_shift, bool has_slope, float slope,
                         int ks, int stride, int pad, int H, int W, int C, int nq, const float* out_l,
                         const float* out_s, const int* out_bits);
// rows output rows: linear x [rows, K]; conv x NHWC [rows / (Ho*Wo), H, W, C], or NCHW
// with x_nchw (the episode's images: their layout change fused into the conv's padded copy).
// out_f fp32 [rows, O] or the nq out_q. Returns false, computing nothing, when an x_nchw
// input holds a NaN or Inf (as nchw_to_nhwc).
bool run_float_layer(const FloatLayer& L, const float* x, int64_t rows, const float* residual, float* out_f,
                     uint8_t* const* out_q, int nthreads, bool x_nchw = false);

// ------------------------------------------------------------------ episode glue
// The non-layer steps of ops/episode_ops.py on raw buffers (row-major, tasks first).
// Reductions are float64 and rounded once, elementwise arithmetic is float32 IEEE.
// nchw_to_nhwc returns false when x holds a NaN or Inf (checked as it is copied: +20% on the copy)
bool nchw_to_nhwc(const float* x, int64_t B, int C, int H, int W, float* y, int nthreads);
// The 3x3, stride-2, pad-1 max-pool of uint8 maps with C = 16, 32 or a multiple of 64 on
// AVX-512 (qgemm_avx512.cpp): output rows [r0, r1); v: max_pool3s2_vbytes(W, C) zero bytes
inline int64_t max_pool3s2_vbytes(int W, int C) { return (int64_t(W) + 2 + 16) * C + 128; }
void max_pool3s2_u8_avx512(const uint8_t* x, uint8_t* y, int64_t r0, int64_t r1, int H, int W, int C, uint8_t* v);
// Any max-pool of fp32 maps on AVX-512, output rows [r0, r1) (max_pool_nhwc's order and NaN rule)
void max_pool_f32_avx512(const float* x, float* y, int64_t r0, int64_t r1, int H, int W, int C, int ks, int stride,
                         int pad);
template <class T>
void max_pool_nhwc(const T* x, int64_t B, int H, int W, int C, int ks, int stride, int pad, T* y, int nthreads);
void mean_hw(const float* x, int64_t B, int H, int W, int C, float* y);
void pairwise_sqdiff(const float* v, int64_t T, int N, int C, float* y, int nthreads);
void neg_sum_last(const float* x, int64_t rows, int C, float* y);
void sigmoid_f64(const float* x, int64_t n, float* y);
void edge_update(const float* sim, const float* prev, int64_t T, int N, float* y);
void offdiag_l1_normalize(const float* x, int64_t T, int N, float* y);
// edge [T, R, W] per task (W >= NS), onehot [T, NS, way] -> y [T, R - r0, way]: rows r0..R-1 of
// each task's edge, its first NS columns, times the one-hot labels (float64 sums); DPGN's
// logits are R = W = N, r0 = NS
void label_scores(const float* edge, const float* onehot, int64_t T, int R, int W, int r0, int NS, int way,
                  float* y);
// |v_i - v_j| per graph: v [B, N, C] -> y [B, N, N, C] (B: graphs of all tasks)
void pairwise_absdiff(const float* v, int64_t B, int N, int C, float* y, int nthreads);
// per task, rows of x [R, C] (elem_size-byte elements) picked by index[0..L) (each in [0, R)):
// y [L, C]
void take_rows(const uint8_t* x, int64_t T, int64_t R, int C, size_t elem_size, const int64_t* index, int64_t L,
               uint8_t* y);
// EGNN's two-channel edge update (TorchEpisodeOps.edge_update_2ch) of B graphs: sim, prev_sim,
// prev_dsim [B, N, N] -> y_sim, y_dsim [B, N, N]
void edge_update_2ch(const float* sim, const float* prev_sim, const float* prev_dsim, int64_t B, int N,
                     float* y_sim, float* y_dsim);
void bmm_f64(const float* a, const float* v, int64_t T, int N, int D, float* y);

}  // namespace qgnn
