// FP32 layers and the episode glue of ops/episode_ops.py on raw buffers, for the compiled
// plan (plan.cpp). Each function matches its TorchEpisodeOps twin: reductions in float64
// rounded once to float32, elementwise float32 arithmetic in the same operation order
// (built with -ffp-contract=off), so every quantizer downstream sees the same values.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "qgnn_cpu.h"
#include "thread_pool.h"
#include "workspace.h"

#define F64_SUFFIX scalar
#define F64_LANES 2
#include "f64_kernels.inc"
#undef F64_LANES
#undef F64_SUFFIX

namespace qgnn {

// ------------------------------------------------------------------ FP32 layers
namespace {

using RowsFn = void (*)(const F64Args&, const float*, int64_t, int64_t, const float*, float*, uint8_t* const*);

RowsFn pick_rows() {
  switch (active_isa()) {
#if defined(__x86_64__)
    case Isa::Amx:
    case Isa::Avx512Vnni:
      return f64_rows_avx512;
    case Isa::AvxVnni:  // AVX-VNNI CPUs have AVX2
    case Isa::Avx2:
      return f64_rows_avx2;
#endif
    default:
      return f64_rows_scalar;
  }
}

}  // namespace

void prepare_float_layer(FloatLayer& L, const float* weight, int O, int K, const float* bias,
                         const float* post_scale, const float* post_shift, bool has_slope, float slope,
                         int ks, int stride, int pad, int H, int W, int C, int nq, const float* out_l,
                         const float* out_s, const int* out_bits) {
  if (O <= 0 || K <= 0) throw ArgError("FP32 layer: O and K must be positive");
  const Requant rq = make_requant(nq, out_l, out_s, out_bits);
  for (int64_t i = 0; i < int64_t(O) * K; ++i)
    if (!std::isfinite(weight[i])) throw ArgError("FP32 layer weights hold NaN or Inf values");
  for (const float* v : {bias, post_scale, post_shift})
    if (v)
      for (int o = 0; o < O; ++o)
        if (!std::isfinite(v[o])) throw ArgError("FP32 layer bias / post_scale / post_shift hold NaN or Inf values");
  if (has_slope && !std::isfinite(slope)) throw ArgError("slope must be finite");
  const int Op = (O + 7) / 8 * 8;
  if (O > F64_MAX_OP) throw ArgError("FP32 layer: more than " + std::to_string(F64_MAX_OP) + " outputs");
  if (O >= 8 || ks > 0) {  // [K][Op]: one output row is a few vector accumulators
    L.wt.assign(static_cast<size_t>(K) * Op, 0.0);
    for (int o = 0; o < O; ++o)
      for (int k = 0; k < K; ++k) L.wt[static_cast<size_t>(k) * Op + o] = weight[static_cast<size_t>(o) * K + k];
  } else {       // [O][K]: dot products along K (the C -> 1 edge-MLP outputs)
    L.wt.assign(weight, weight + static_cast<size_t>(O) * K);
  }
  L.bias.assign(Op, 0.0);
  if (bias)
    for (int o = 0; o < O; ++o) L.bias[o] = bias[o];
  L.post_scale.clear();
  L.post_shift.clear();
  const int Op16 = (O + 15) / 16 * 16;  // the row epilogue reads 16 floats at a time
  if (post_scale) {
    L.post_scale.assign(post_scale, post_scale + O);
    L.post_scale.resize(Op16, 0.f);
  }
  if (post_shift) {
    L.post_shift.assign(post_shift, post_shift + O);
    L.post_shift.resize(Op16, 0.f);
  }
  F64Args& a = L.args;
  a.wt = L.wt.data();
  a.bias = L.bias.data();
  a.ps = post_scale ? L.post_scale.data() : nullptr;
  a.sh = post_shift ? L.post_shift.data() : nullptr;
  a.has_slope = has_slope;
  a.slope = slope;
  a.O = O;
  a.Op = Op;
  a.K = K;
  a.rq = rq;
  if (ks > 0) {
    if (K != ks * ks * C) throw ArgError("FP32 conv: K must be ks*ks*C");
    a.ks = ks;
    a.stride = stride;
    a.pad = pad;
    a.H = H;
    a.W = W;
    a.C = C;
    a.Ho = (H + 2 * pad - ks) / stride + 1;
    a.Wo = (W + 2 * pad - ks) / stride + 1;
    L.wt32.clear();
    L.bias32.clear();
    L.wabs.clear();
    if (nq > 0 && O <= 64) {  // the float32 sums' operands (see run_float_layer)
      L.wt32.assign(static_cast<size_t>(K) * 64, 0.f);
      L.bias32.assign(64, 0.f);
      L.wabs.assign(O, 0.f);
      for (int o = 0; o < O; ++o) {
        double sa = 0.0;
        for (int k = 0; k < K; ++k) {
          const float w = weight[static_cast<size_t>(o) * K + k];
          L.wt32[static_cast<size_t>(k) * 64 + o] = w;
          sa += std::fabs(static_cast<double>(w));
        }
        L.wabs[o] = static_cast<float>(sa * (1.0 + 1e-6));  // rounded up
        if (bias) L.bias32[o] = bias[o];
      }
    }
  }
}

namespace {

// The float32 sums' margins of one call (run_float_layer): how far inside its rounding
// interval the quotient u = (y - l) / s of a float32 sum must lie for the code of the
// float64 sum to be the same. X bounds |x| over the input. With A = |bias| + X sum|w|,
// the float32 FMA chain of K + 1 terms and the float64 sum rounded to float32 differ by
// delta <= (K + 3) 2^-24 A; the epilogue (*ps, +sh, LeakyReLU slope g, -l, /s or *1/s)
// moves that by at most g |ps| delta / s, and its own roundings on either path by less
// than 16 2^-24 (g Y + |l|) / s, Y = |ps| (A + delta) + |sh| bounding its values.
// m holds [nq][64] rooms 0.5 - margin with g = max(1, |slope|), then, with a LeakyReLU,
// [nq][64] rooms with g = |slope| and zcut[64]: a lane whose z = sum * ps + sh lies below
// zcut (-(|ps| delta + 16 2^-24 Y)) is negative on both paths, so only the slope's share of
// the sums' error reaches its quotient (the tiny stem, slope 0.01: ~20x less margin; 5% of
// its pixels were redone in float64, mostly negative ones, which the slope packs densely
// around their few boundaries). False (float64 sums instead) when a margin is not small or
// X is not finite.
bool f32_margins(const FloatLayer& L, float X, std::vector<float>& m) {
  const F64Args& a = L.args;
  constexpr double u = 1.0 / 16777216.0;
  const int nq = a.rq.nq, sets = a.has_slope ? 2 : 1;
  const double slope = a.has_slope ? std::fabs(double(a.slope)) : 1.0, g = std::max(1.0, slope);
  m.assign(static_cast<size_t>(sets * nq + 1) * 64, 0.5f);  // padded columns: never checked
  float* zcut = m.data() + static_cast<size_t>(sets * nq) * 64;
  std::fill(zcut, zcut + 64, -std::numeric_limits<float>::infinity());
  for (int o = 0; o < a.O; ++o) {
    const double A = std::fabs(double(L.bias32[o])) + double(X) * L.wabs[o];
    const double delta = (a.K + 3) * u * A;
    const double ps = a.ps ? std::fabs(double(a.ps[o])) : 1.0, sh = a.sh ? std::fabs(double(a.sh[o])) : 0.0;
    const double Y = ps * (A + delta) + sh;
    for (int set = 0; set < sets; ++set) {
      const double gs = set == 0 ? g : slope;
      for (int k = 0; k < nq; ++k) {
        const double mk = (gs * ps * delta + 16 * u * (gs * Y + std::fabs(double(a.rq.out_l[k])))) / a.rq.out_s[k];
        if (!(mk < 0.125)) return false;  // also NaN / Inf
        m[static_cast<size_t>(set * nq + k) * 64 + o] = static_cast<float>(0.5 - mk * (1.0 + 1e-6));
      }
    }
    if (a.has_slope) zcut[o] = static_cast<float>(-(ps * delta + 16 * u * Y) * (1.0 + 1e-6));
  }
  return true;
}

}  // namespace

bool run_float_layer(const FloatLayer& L, const float* x, int64_t rows, const float* residual, float* out_f,
                     uint8_t* const* out_q, int nthreads, bool x_nchw) {
  if (x_nchw && (!L.args.ks || residual)) throw ArgError("FP32 layer: an NCHW input needs a conv without residual");
  F64Args a = L.args;
  const RowsFn fn = pick_rows();
  constexpr int64_t kRows = 64;  // output rows per task
  const int nt = double(rows) * a.K * a.O < 1.0e6 ? 1 : nthreads;
  // float32 sums with the rounding check (f32_margins) for convs of <= 64 code outputs
  // (prepare_float_layer builds their operands) on every vector path, measured as the stem
  // step's time (alternating processes, or interleaved in one):
  // - AVX2 (4 float64 lanes against 8 float32 ones): on a Zen 3 the resnet12 stem ran 2x
  //   faster, egnn-tiny's (16 outputs) 1.17x, tiny's (16, two code outputs) the same;
  // - AVX-512 on a Zen 4: egnn-tiny's stem 1.62x, tiny's 1.27x; on the AMX Xeon the
  //   resnet12 stem 17% faster and tiny's 2.1x (182 -> 86 us at T=1, since the padded copy
  //   and the epilogue changes; it was 20% slower before them).
  const bool f32 = !L.wt32.empty() && !residual && fn != f64_rows_scalar;
  // A padded conv reads a zero-bordered copy of its input, when it has <= 16 outputs or
  // sums in float32: its border pixels then take the multi-pixel paths too (the one-pixel
  // path spent 36% of the tiny stem's float64 sums on its 12% border pixels; with 64
  // outputs in float64 the copy cost what it saved). The padding's products are exact
  // zeros added to sums that start at the bias: the same float64 sums. An NCHW input is
  // always copied (its layout change and NaN / Inf check fused in: the tiny model's images
  // took a separate step of ~9 us, then its stem's copy ~5 us).
  Scratch ws;
  float* xpad = nullptr;  // uninitialised: the copy writes every value, border zeros included
  const bool pad_copy = a.ks && (x_nchw || (a.pad && (a.Op <= 16 || f32)));
  const int64_t B = a.ks ? rows / (int64_t(a.Ho) * a.Wo) : 0;
  const int Hp = a.H + 2 * a.pad, Wp = a.W + 2 * a.pad;
  const size_t row = size_t(a.W) * a.C, prow = size_t(Wp) * a.C, side = size_t(a.pad) * a.C;
  // per image, one pass: the copy and (float32 sums) max |x| as the largest bit pattern of
  // |x| (Inf and NaN patterns are above every finite one; a signed int32 max, which the
  // baseline x86-64 build vectorizes: an unsigned one it did not, 10 us of the tiny stem).
  // On the threads from 256 KiB of input: below, the split's barriers cost more than they
  // saved (the tiny stem's 120 KiB: its copy alone took 9-12 us on two threads, 5 on one)
  const auto tops = ws.take_slices<int32_t>(B, 1);  // per image
  if (pad_copy || f32) {
    if (pad_copy) xpad = ws.take<float>(size_t(B) * Hp * prow);
    // the transposing copy from 64 KiB (the strided stores cost more than a row's memcpy)
    parallel_for(B * int64_t(row) * a.H >= (x_nchw ? (1 << 14) : (1 << 16)) ? nt : 1, B, [&](int64_t b, int) {
      const float* src = x + size_t(b) * a.H * row;
      if (f32 || x_nchw) {
        int32_t t = 0;
        for (size_t i = 0; i < a.H * row; ++i) {
          int32_t v;
          std::memcpy(&v, src + i, 4);
          v &= 0x7FFFFFFF;
          t = v > t ? v : t;
        }
        *tops(b) = t;
      }
      if (!pad_copy) return;
      float* img = xpad + size_t(b) * Hp * prow;
      std::fill(img, img + a.pad * prow, 0.f);
      for (int h = 0; h < a.H; ++h) {
        float* d = img + (h + a.pad) * prow;
        std::fill(d, d + side, 0.f);
        if (!x_nchw) {
          std::memcpy(d + side, src + h * row, row * sizeof(float));
        } else {  // plane by plane: contiguous reads, stores C floats apart
          for (int c = 0; c < a.C; ++c) {
            const float* __restrict plane = src + (size_t(c) * a.H + h) * a.W;
            float* __restrict dc = d + side + c;
            for (int w = 0; w < a.W; ++w) dc[size_t(w) * a.C] = plane[w];
          }
        }
        std::fill(d + side + row, d + prow, 0.f);
      }
      std::fill(img + (a.pad + a.H) * prow, img + Hp * prow, 0.f);
    });
  }
  int32_t top = 0;  // the largest |x| bit pattern: >= 0x7F800000 for an Inf or NaN
  if (f32 || x_nchw)
    for (int64_t b = 0; b < B; ++b) top = std::max(top, *tops(b));
  if (x_nchw && static_cast<uint32_t>(top) >= 0x7F800000u) return false;
  if (pad_copy) {
    x = xpad;
    a.H = Hp;
    a.W = Wp;
    a.pad = 0;
  }
  std::vector<float> margin;  // rooms, f32_margins
  if (f32) {  // its padded input was copied above: a.pad == 0
    float X;
    std::memcpy(&X, &top, 4);
    if (static_cast<uint32_t>(top) >= 0x7F800000u) X = std::numeric_limits<float>::infinity();
    if (f32_margins(L, X, margin)) {
      a.wt32 = L.wt32.data();
      a.bias32 = L.bias32.data();
      a.room = margin.data();
      if (a.has_slope) {
        a.room_neg = margin.data() + static_cast<size_t>(a.rq.nq) * 64;
        a.zcut = margin.data() + static_cast<size_t>(2 * a.rq.nq) * 64;
      }
    }
  }
  parallel_for(nt, (rows + kRows - 1) / kRows, [&](int64_t ti, int) {
    fn(a, x, ti * kRows, std::min(rows, (ti + 1) * kRows), residual, out_f, out_q);
  });
  return true;
}

// ------------------------------------------------------------------ maps
bool nchw_to_nhwc(const float* x, int64_t B, int C, int H, int W, float* y, int nthreads) {
  // plane by plane, the check fused into the copy (a NaN or Inf has every exponent bit
  // set): +20% on the copy alone, a separate pass over the input was +50%. Split by image
  // from 64 KiB (the tiny model's 10 images: 13 us on one thread, 8.5 us on two)
  const int64_t hw = int64_t(H) * W;
  Scratch ws;
  const auto bad = ws.take_slices<uint8_t>(B, 1);  // per image
  parallel_for(B * C * hw >= (1 << 14) ? nthreads : 1, B, [&](int64_t b, int) {
    uint32_t nonfinite = 0;
    for (int c = 0; c < C; ++c) {
      const float* __restrict xs = x + (b * C + c) * hw;
      float* __restrict yb = y + b * hw * C + c;
      for (int64_t p = 0; p < hw; ++p) {
        uint32_t bits;
        std::memcpy(&bits, xs + p, 4);
        yb[p * C] = xs[p];
        nonfinite |= (bits & 0x7F800000u) == 0x7F800000u;
      }
    }
    *bad(b) = nonfinite != 0;
  });
  for (int64_t b = 0; b < B; ++b)
    if (*bad(b)) return false;
  return true;
}

namespace {
// One output row (b, oh) of a max-pool; parameters by value and restrict pointers: with
// uint8 maps every store may alias anything the lambda captured by reference, and the
// loop re-read C from memory per byte (measured: 6% of a whole episode). Every window,
// clipped to the input at the border, runs its valid taps in row-major order on 16-byte
// chunks of channels held in a register.
template <class T>
void max_pool_row(const T* __restrict x, T* __restrict y, int64_t b, int oh, int H, int W, int C, int ks,
                  int stride, int pad, int Ho, int Wo) {
  constexpr int V = 16 / sizeof(T);
  typedef T Vec __attribute__((vector_size(16)));
  const int ih0 = oh * stride - pad, i0 = std::max(0, -ih0), i1 = std::min(ks, H - ih0);
  for (int ow = 0; ow < Wo; ++ow) {
    T* __restrict out = y + ((b * Ho + oh) * Wo + ow) * C;
    const int iw0 = ow * stride - pad, j0 = std::max(0, -iw0), j1 = std::min(ks, W - iw0);
    const T* __restrict in = x + ((b * H + ih0 + i0) * W + iw0 + j0) * C;  // the first valid tap
    const int ni = i1 - i0, nj = j1 - j0;
    int c = 0;
    for (; c + V <= C; c += V) {
      Vec m;
      std::memcpy(&m, in + c, sizeof(Vec));
      for (int i = 0; i < ni; ++i)
        for (int j = 0; j < nj; ++j) {
          Vec t;
          std::memcpy(&t, in + (int64_t(i) * W + j) * C + c, sizeof(Vec));
          m = m < t ? t : m;  // std::max's order (NaN as std::max)
        }
      std::memcpy(out + c, &m, sizeof(Vec));
    }
    for (; c < C; ++c) {
      T m = in[c];
      for (int i = 0; i < ni; ++i)
        for (int j = 0; j < nj; ++j) m = std::max(m, in[(int64_t(i) * W + j) * C + c]);
      out[c] = m;
    }
  }
}
}  // namespace

template <class T>
void max_pool_nhwc(const T* x, int64_t B, int H, int W, int C, int ks, int stride, int pad, T* y, int nthreads) {
  const int Ho = (H + 2 * pad - ks) / stride + 1, Wo = (W + 2 * pad - ks) / stride + 1;
  const int nt = B * H * W * int64_t(C) * static_cast<int64_t>(sizeof(T)) > (1 << 16) ? nthreads : 1;
  // output rows per task: >= 8 KiB of input each (one task per output row, 16 pixels of 16
  // codes at 32 -> 16 px: 2 threads were 1.16x one, now 1.5x)
  const int64_t rows = B * Ho, per = std::max<int64_t>(1, (8 << 10) / (int64_t(stride) * W * C * sizeof(T)));
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, uint8_t>) {
    // the backbone's pools of codes on AVX-512 (max_pool3s2_u8_avx512; the tiny model's nine
    // pool steps at T=1: 55 -> 27 us)
    if (has_avx512(active_isa()) && ks == 3 && stride == 2 && pad == 1 && (C == 16 || C == 32 || C % 64 == 0)) {
      parallel_for(nt, (rows + per - 1) / per, [=](int64_t t, int) {
        Scratch ws;
        const size_t n = static_cast<size_t>(max_pool3s2_vbytes(W, C));
        uint8_t* v = ws.take<uint8_t>(n);
        std::memset(v, 0, n);
        max_pool3s2_u8_avx512(x, y, t * per, std::min(rows, (t + 1) * per), H, W, C, v);
      });
      return;
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    // fp32 maps on 16 channels a vector (the 4-float chunks: tiny's layer-4 pool 4.6 us)
    if (has_avx512(active_isa())) {
      parallel_for(nt, (rows + per - 1) / per, [=](int64_t t, int) {
        max_pool_f32_avx512(x, y, t * per, std::min(rows, (t + 1) * per), H, W, C, ks, stride, pad);
      });
      return;
    }
  }
#endif
  parallel_for(nt, (rows + per - 1) / per, [=](int64_t t, int) {
    for (int64_t bo = t * per; bo < std::min(rows, (t + 1) * per); ++bo)
      max_pool_row<T>(x, y, bo / Ho, static_cast<int>(bo % Ho), H, W, C, ks, stride, pad, Ho, Wo);
  });
}
template void max_pool_nhwc<float>(const float*, int64_t, int, int, int, int, int, int, float*, int);
template void max_pool_nhwc<uint8_t>(const uint8_t*, int64_t, int, int, int, int, int, int, uint8_t*, int);

void mean_hw(const float* x, int64_t B, int H, int W, int C, float* y) {
  const int64_t hw = int64_t(H) * W;
  std::vector<double> acc(C);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t p = 0; p < hw; ++p)
      for (int c = 0; c < C; ++c) acc[c] += x[(b * hw + p) * C + c];
    for (int c = 0; c < C; ++c) y[b * C + c] = static_cast<float>(acc[c] / static_cast<double>(hw));
  }
}

// ------------------------------------------------------------------ graph
void pairwise_sqdiff(const float* v, int64_t T, int N, int C, float* y, int nthreads) {
  const int nt = T * N * N * int64_t(C) > (1 << 18) ? nthreads : 1;
  parallel_for(nt, T * N, [&](int64_t ti, int) {
    const int64_t t = ti / N;
    const float* vi = v + ti * C;
    float* out = y + ti * int64_t(N) * C;
    for (int j = 0; j < N; ++j) {
      const float* vj = v + (t * N + j) * C;
      for (int c = 0; c < C; ++c) {
        const float d = vi[c] - vj[c];
        out[int64_t(j) * C + c] = d * d;
      }
    }
  });
}

namespace {
// float64 sum of n float32 values in four interleaved chains (float64 sums may be reordered:
// integer-contract.md; one chain's add latency had made neg_sum_last ~4x slower)
inline double row_sum(const float* x, int n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += x[i];
    s1 += x[i + 1];
    s2 += x[i + 2];
    s3 += x[i + 3];
  }
  for (; i < n; ++i) s0 += x[i];
  return (s0 + s1) + (s2 + s3);
}
}  // namespace

void neg_sum_last(const float* x, int64_t rows, int C, float* y) {
  for (int64_t r = 0; r < rows; ++r) y[r] = -static_cast<float>(row_sum(x + r * C, C));
}

void sigmoid_f64(const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(x[i]))));
}

namespace {
// F.normalize(row, p=1): row / max(sum |row| (float64, rounded), 1e-12) in float32
inline void l1_normalize_row(float* row, int n) {
  double s = 0.0;
  for (int i = 0; i < n; ++i) s += std::fabs(row[i]);
  const float norm = std::max(static_cast<float>(s), 1e-12f);
  for (int i = 0; i < n; ++i) row[i] = row[i] / norm;
}
}  // namespace

void edge_update(const float* sim, const float* prev, int64_t T, int N, float* y) {
  const float eps = 1e-6f, diag = 1.0f + 1e-6f;  // (eye + 1e-6) in float32
  std::vector<float> masked(N);
  for (int64_t r = 0; r < T * N; ++r) {
    const int i = static_cast<int>(r % N);
    const float* pr = prev + r * N;
    const float* sr = sim + r * N;
    float* out = y + r * N;
    for (int j = 0; j < N; ++j) masked[j] = j == i ? pr[j] * 0.0f : pr[j] * 1.0f;
    const float prev_sum = static_cast<float>(row_sum(masked.data(), N));
    for (int j = 0; j < N; ++j) out[j] = sr[j] * masked[j];
    l1_normalize_row(out, N);
    for (int j = 0; j < N; ++j) out[j] = out[j] * prev_sum;
    for (int j = 0; j < N; ++j) out[j] = out[j] + (j == i ? diag : eps);
    const float total = static_cast<float>(row_sum(out, N));
    for (int j = 0; j < N; ++j) out[j] = out[j] / total;
  }
}

void offdiag_l1_normalize(const float* x, int64_t T, int N, float* y) {
  for (int64_t r = 0; r < T * N; ++r) {
    const int i = static_cast<int>(r % N);
    for (int j = 0; j < N; ++j) y[r * N + j] = j == i ? x[r * N + j] * 0.0f : x[r * N + j] * 1.0f;
    l1_normalize_row(y + r * N, N);
  }
}

void label_scores(const float* edge, const float* onehot, int64_t T, int R, int W, int r0, int NS, int way,
                  float* y) {
  const int Q = R - r0;
  for (int64_t t = 0; t < T; ++t)
    for (int q = 0; q < Q; ++q)
      for (int c = 0; c < way; ++c) {
        double s = 0.0;
        for (int j = 0; j < NS; ++j)
          s += static_cast<double>(edge[(t * R + r0 + q) * W + j]) * onehot[(t * NS + j) * way + c];
        y[(t * Q + q) * way + c] = static_cast<float>(s);
      }
}

void pairwise_absdiff(const float* v, int64_t B, int N, int C, float* y, int nthreads) {
  const int nt = B * N * N * int64_t(C) > (1 << 18) ? nthreads : 1;
  parallel_for(nt, B * N, [&](int64_t bi, int) {
    const int64_t b = bi / N;
    const float* vi = v + bi * C;
    float* out = y + bi * int64_t(N) * C;
    for (int j = 0; j < N; ++j) {
      const float* vj = v + (b * N + j) * C;
      for (int c = 0; c < C; ++c) out[int64_t(j) * C + c] = std::fabs(vi[c] - vj[c]);
    }
  });
}

void take_rows(const uint8_t* x, int64_t T, int64_t R, int C, size_t elem_size, const int64_t* index, int64_t L,
               uint8_t* y) {
  const size_t row = static_cast<size_t>(C) * elem_size;
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* xt = x + static_cast<size_t>(t * R) * row;
    uint8_t* yt = y + static_cast<size_t>(t * L) * row;
    for (int64_t k = 0; k < L; ++k) std::memcpy(yt + static_cast<size_t>(k) * row, xt + static_cast<size_t>(index[k]) * row, row);
  }
}

void edge_update_2ch(const float* sim, const float* prev_sim, const float* prev_dsim, int64_t B, int N,
                     float* y_sim, float* y_dsim) {
  const float eps = 1e-6f;  // EDGE_EPS as a float32 value
  std::vector<float> masked(N);
  for (int64_t r = 0; r < B * N; ++r) {
    const int i = static_cast<int>(r % N);
    const float* sr = sim + r * N;
    float* out[2] = {y_sim + r * N, y_dsim + r * N};
    const float* prev[2] = {prev_sim + r * N, prev_dsim + r * N};
    for (int ch = 0; ch < 2; ++ch) {
      const float* pr = prev[ch];
      float* o = out[ch];
      for (int j = 0; j < N; ++j) masked[j] = j == i ? pr[j] * 0.0f : pr[j] * 1.0f;
      const float prev_sum = static_cast<float>(row_sum(masked.data(), N));
      if (ch == 0)
        for (int j = 0; j < N; ++j) o[j] = sr[j] * masked[j];
      else
        for (int j = 0; j < N; ++j) o[j] = (1.0f - sr[j]) * masked[j];
      l1_normalize_row(o, N);
      for (int j = 0; j < N; ++j) o[j] = o[j] * prev_sum;
      // + [I, 0] (the dissimilarity channel adds zeros, as the model does), then + eps
      for (int j = 0; j < N; ++j) o[j] = (o[j] + (ch == 0 && j == i ? 1.0f : 0.0f)) + eps;
    }
    for (int j = 0; j < N; ++j) {
      const float total = out[0][j] + out[1][j];
      out[0][j] = out[0][j] / total;
      out[1][j] = out[1][j] / total;
    }
  }
}

void bmm_f64(const float* a, const float* v, int64_t T, int N, int D, float* y) {
  std::vector<double> acc(D);
  for (int64_t t = 0; t < T; ++t)
    for (int i = 0; i < N; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int j = 0; j < N; ++j) {
        const double aij = a[(t * N + i) * N + j];
        const float* vr = v + (t * N + j) * D;
        for (int d = 0; d < D; ++d) acc[d] += aij * vr[d];
      }
      for (int d = 0; d < D; ++d) y[(t * N + i) * D + d] = static_cast<float>(acc[d]);
    }
}

void node_rows(const uint8_t* v, int64_t rows, int D, const int* bits, int nb, uint8_t* q,
               uint8_t* row_bits, uint8_t* row_off) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* x = v + r * D;
    uint8_t lo = 255, hi = 0;
    for (int d = 0; d < D; ++d) {  // vectorised min / max reductions
      lo = x[d] < lo ? x[d] : lo;
      hi = x[d] > hi ? x[d] : hi;
    }
    if (D == 0) lo = hi = 0;
    uint8_t* y = q + r * D;
    for (int d = 0; d < D; ++d) y[d] = static_cast<uint8_t>(x[d] - lo);
    const int span = hi - lo;
    int b = bits[nb - 1];
    for (int i = 0; i < nb; ++i)
      if (span < (1 << bits[i])) { b = bits[i]; break; }
    row_bits[r] = static_cast<uint8_t>(b);
    row_off[r] = lo;
  }
}

}  // namespace qgnn
