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

// ------------------------------------------------------------------ dispatch
// Kernel paths, slowest first: the numeric order is the dispatch preference (detected_isa
// picks the highest one isa_blocker clears). Amx is detected (probe_amx) but has no
// kernels in this build, so it is never runnable and never active.
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
struct PackedW {
  int O = 0, K = 0, Kp = 0, Op = 0, bits = 0, taps = 1, bias = 0;
  std::vector<int8_t, Aligned64<int8_t>> data;   // Op/64 * Kp/4 * 256, 64-byte aligned
  std::vector<int32_t> wsum;     // [O] sum_k code
  std::vector<int32_t> tapsum;   // [O][taps] per kernel tap (conv border WS)
};

void prepack(const uint8_t* packed, int O, int K, int bits, int taps, PackedW* out);
void unpack_row(const uint8_t* row, int K, int bits, uint8_t* codes);   // canonical -> codes
void pack_row(const uint8_t* codes, int K, int bits, uint8_t* row);     // codes -> canonical

// ------------------------------------------------------------------ epilogue
// The centred identity of ref_epilogue: zero points zw[o] (column operand, e.g. weights)
// and za (row operand, e.g. activations) move into exact int32 parts
//   ACC' = ACC - zw*AS - za*WS + zw*za*CNT = ACC + (wbias - zw)*AS - za*WS'
//   WS'  = WS - zw*CNT          AS' = AS - za*CNT
// then y = c1*ACC' + c2*WS' + c3*AS' + c4*CNT in fp32, in this order (as_first swaps
// terms 2 and 3: the order of ref_qbmm), *post_scale, +post_shift, +residual, LeakyReLU,
// quantize. int32 arithmetic wraps (the reference rejects results beyond int32).
struct Epi {
  const float *c1 = nullptr, *c2 = nullptr, *c3 = nullptr, *c4 = nullptr;  // [>= Op]
  const float *post_scale = nullptr, *post_shift = nullptr;                 // [O] or null
  const float* residual = nullptr;                                          // [M, O] or null
  bool has_slope = false;
  float slope = 0.f;
  bool quant = false;
  float out_l = 0.f, out_s = 1.f, qmax = 0.f;
  float* out_f = nullptr;        // [M, O] when !quant
  uint8_t* out_q = nullptr;      // [M, O] when quant
  int O = 0;
  bool as_first = false;
  int32_t wbias = 0;             // raw ACC = kernel ACC + wbias * AS (8-bit weights)
  const int32_t* zw = nullptr;   // [>= O] column zero points (binding)
  int32_t za = 0;                // row zero point (binding)
  // per output row, pattern pid[m % P] (conv borders; else pattern 0) selects
  const int32_t* ws_tab = nullptr;   // WS'      [patterns][O]   (drivers, via centre())
  const int32_t* zws_tab = nullptr;  // za * WS' [patterns][O]
  const int32_t* cnt_tab = nullptr;  // CNT      [patterns]
  const int32_t* nzw = nullptr;      // wbias - zw[o]  [>= Op]
  const float* t2_tab = nullptr;     // c2[o] * float(WS')  [patterns][O] (same fp32 product)
  const float* t4_tab = nullptr;     // c4[o] * float(CNT)  [patterns][O]
  float inv_out_s = 1.f;             // 1/out_s: fast path of the re-quantization (see epi16)
  const int32_t* pid = nullptr;      // [P] or null (pattern 0)
  int P = 1;
  // optional raw outputs for exact tests (int32 [M, O] / [M]); epilogue still runs
  int32_t* acc_out = nullptr;
  int32_t* as_out = nullptr;
};

// ref_zero_split: z = clamp(rne(-offset / scale), 0, 255), d = offset + scale * z (fp32)
void zero_split(float offset, float scale, int32_t* z, float* d);

// Fills e.ws_tab / zws_tab / nzw / cnt_tab from raw WS [npat][O] and CNT [npat].
struct CentredTables {
  std::vector<int32_t> wsp, zws, nzw, cnt;
  std::vector<float> t2, t4;
};
void centre(Epi& e, const int32_t* ws_raw, const int32_t* cnt, int npat, CentredTables& t);

// One M-tile of `rows` output rows against all column blocks of the weights, epilogue
// fused into the store. Activations come as row pointers, one per (row, tap):
//   ptrs[r * taps + t] -> 4*c4n codes of row r for kernel tap t (K = taps * 4*c4n = Kp)
// so a conv reads its NHWC input in place (implicit GEMM, taps outside the input point
// at a zero buffer) and a linear layer has taps = 1. Raw fields only: ISA translation
// units must not instantiate std templates (ODR).
struct TileArgs {
  const uint8_t* const* ptrs;
  int taps, c4n, rows, m0;
  const int8_t* wdata;   // PackedW::data
  int Kp, nblk, O;
  const int32_t* as;     // [rows] activation sums
  const int32_t* rpat;   // [rows] border pattern of each row (== e->pid[m % P]), or null: 0
  const Epi* e;
  bool split;            // AVX2 only: activations split in nibbles (8-bit x 8-bit saturation)
};

void tile_scalar(const TileArgs& t);
void tile_avx2(const TileArgs& t);
void tile_avxvnni(const TileArgs& t);
void tile_avx512(const TileArgs& t);
int32_t rowsum_u8(const uint8_t* p, int n, uint8_t* orv);  // sum and OR of bytes

// ------------------------------------------------------------------ ops
// Threads: M-tiles (or tasks) spread over `nthreads` (thread_pool.h); ops under ~2 MMAC
// run on the calling thread. bad_code: set when an input code is >= 2^bits (checked in
// the same pass that sums the rows; the output is then unspecified and the binding raises).
// x: [M, K] codes; out per Epi
void qlinear(const uint8_t* x, int M, const PackedW& w, int a_bits, Epi& e, int nthreads,
             int* bad_code);
// x: NHWC [B, H, W, C]; w: [O, ks*ks*C]
void qconv2d(const uint8_t* x, int B, int H, int W, int C, int ks, int stride, int pad,
             const PackedW& w, int a_bits, Epi& e, int nthreads, int* bad_code);
// a: [T, N, N], v: [T, N, D]; out float [T, N, D]
void qbmm(const uint8_t* a, const uint8_t* v, int T, int N, int D, int a_bits, int v_bits,
          float sa, float la, float sv, float lv, float* out, int32_t* acc_out,
          int32_t* as_out, int32_t* vs_out, int nthreads, int* bad_code);
// codes = clamp(rne((x - l) / s), 0, 2^bits - 1); returns the number of non-finite inputs
int64_t quantize(const float* x, int64_t n, float l, float s, int bits, uint8_t* out, int nthreads);

}  // namespace qgnn
