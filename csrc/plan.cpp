// The compiled plan's executor (plan.h). Steps were validated when the plan was built
// (plan_bindings.cpp): here every pointer and size is known to be consistent.
#include "plan.h"

#include <chrono>
#include <cstdlib>
#include <cstring>

#include "thread_pool.h"

namespace qgnn {

struct Arena {
  uint8_t* p = nullptr;
  int64_t bytes = 0;
  explicit Arena(int64_t n) : bytes(n) {
    p = static_cast<uint8_t*>(std::aligned_alloc(64, static_cast<size_t>((n + 63) / 64 * 64 + 64)));
    if (!p) throw std::bad_alloc();
  }
  ~Arena() { std::free(p); }
};

namespace {
const char* const kNames[] = {"quantize", "qconv", "qlinear", "qbmm", "conv_f32", "linear_f32", "bmm_f32",
                              "nchw_to_nhwc", "max_pool", "mean_hw", "pairwise_sqdiff", "neg_sum_last",
                              "sigmoid", "edge_update", "offdiag_l1_normalize", "concat_last", "label_scores",
                              "node_rows", "pairwise_absdiff", "take_rows", "edge_update_2ch"};
constexpr int kNumKinds = sizeof(kNames) / sizeof(kNames[0]);
}  // namespace

const char* step_kind_name(StepKind k) { return kNames[static_cast<int>(k)]; }

bool step_kind_from_name(const std::string& s, StepKind* k) {
  for (int i = 0; i < kNumKinds; ++i)
    if (s == kNames[i]) {
      *k = static_cast<StepKind>(i);
      return true;
    }
  return false;
}

Plan::Plan() = default;
Plan::~Plan() = default;

std::unique_ptr<Arena> Plan::acquire(int64_t bytes) const {
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i]->bytes >= bytes) {
        std::unique_ptr<Arena> a = std::move(free_[i]);
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        return a;
      }
  }
  return std::unique_ptr<Arena>(new Arena(bytes));
}

void Plan::release(std::unique_ptr<Arena> a) const {
  std::lock_guard<std::mutex> lk(mu_);
  constexpr size_t kKeep = 4;  // concurrent callers worth keeping an arena for
  if (free_.size() < kKeep) {
    free_.push_back(std::move(a));
  } else {  // keep the largest ones
    size_t small = 0;
    for (size_t i = 1; i < free_.size(); ++i)
      if (free_[i]->bytes < free_[small]->bytes) small = i;
    if (free_[small]->bytes < a->bytes) free_[small] = std::move(a);
  }
}

void Plan::run(int64_t T, std::vector<void*> ptrs, int nthreads, int64_t* step_ns) const {
  const WorkersAwake awake(nthreads > 1);  // no worker falls asleep between this run's steps
  std::unique_ptr<Arena> arena = acquire(arena_per_task * T);
  for (size_t i = 0; i < buffers.size(); ++i)
    if (buffers[i].role == Role::Temp) ptrs[i] = arena->p + buffers[i].offset * T;
  using Clock = std::chrono::steady_clock;
  try {
    if (!step_ns) {  // the clock only when profiling (~25 ns a read, two per step)
      for (const PlanStep& st : steps) exec(st, T, ptrs, nthreads);
    } else {
      for (size_t k = 0; k < steps.size(); ++k) {
        const auto t0 = Clock::now();
        exec(steps[k], T, ptrs, nthreads);
        step_ns[k] = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
      }
    }
  } catch (...) {
    release(std::move(arena));
    throw;
  }
  release(std::move(arena));
}

void Plan::exec(const PlanStep& st, int64_t T, const std::vector<void*>& ptrs, int nthreads) const {
  auto in_f = [&](size_t i) {
    return i >= st.in.size() || st.in[i] < 0 ? nullptr : static_cast<const float*>(ptrs[st.in[i]]);
  };
  auto in_u8 = [&](size_t i) { return static_cast<const uint8_t*>(ptrs[st.in[i]]); };
  float* out_f = static_cast<float*>(ptrs[st.out]);
  int bad = 0;
  const int64_t TB = T * st.batch;  // graphs of the call (graph steps)
  if (st.kind == StepKind::QBmm && TB > (int64_t(1) << 30))
    throw ArgError("plan step " + st.name + ": too many graphs in one call");
  switch (st.kind) {
    case StepKind::Quantize:
      if (quantize(in_f(0), st.count * T, st.l, st.s, st.bits, static_cast<uint8_t*>(ptrs[st.out]), nthreads))
        throw ArgError("plan step " + st.name + ": NaN or Inf values reached a quantizer");
      break;
    case StepKind::QConv:
    case StepKind::QLinear: {
      const QLayer& L = *st.qlayer;
      const int64_t rows = st.kind == StepKind::QConv ? st.count * T * L.Ho * L.Wo : st.count * T;
      uint8_t* codes[kMaxRequant] = {};
      for (size_t k = 0; k < st.codes.size(); ++k) codes[k] = static_cast<uint8_t*>(ptrs[st.codes[k]]);
      if (st.qlayer_s)
        run_layer_with_shortcut(L, in_u8(0), *st.qlayer_s, in_u8(1), rows, st.codes.empty() ? out_f : nullptr, codes,
                                nthreads, &bad);
      else
        run_layer(L, in_u8(0), rows, in_f(1), st.codes.empty() ? out_f : nullptr, codes, nullptr, nullptr, nthreads,
                  &bad);
      break;
    }
    case StepKind::QBmm:
      qbmm(in_u8(0), in_u8(1), st.in.size() > 2 ? in_u8(2) : nullptr, static_cast<int>(TB), st.n, st.d, st.a_bits,
           st.v_bits, st.sa, st.la, st.sv, st.lv, out_f, nullptr, nullptr, nullptr, nthreads, &bad);
      break;
    case StepKind::NodeRows: {
      // the widths are not needed downstream: the aggregation adds the offsets back
      std::vector<uint8_t> widths(static_cast<size_t>(T) * st.n);
      node_rows(in_u8(0), T * st.n, st.d, st.node_bits.data(), static_cast<int>(st.node_bits.size()),
                static_cast<uint8_t*>(ptrs[st.codes[0]]), widths.data(), static_cast<uint8_t*>(ptrs[st.codes[1]]));
      break;
    }
    case StepKind::ConvF32:
    case StepKind::LinearF32: {
      const FloatLayer& L = *st.flayer;
      const int64_t rows = st.kind == StepKind::ConvF32 ? st.count * T * L.args.Ho * L.args.Wo : st.count * T;
      uint8_t* codes[kMaxRequant] = {};
      for (size_t k = 0; k < st.codes.size(); ++k) codes[k] = static_cast<uint8_t*>(ptrs[st.codes[k]]);
      if (!run_float_layer(L, in_f(0), rows, in_f(1), st.codes.empty() ? out_f : nullptr, codes, nthreads, st.nchw))
        throw InputValueError("images contain NaN or Inf values");
      break;
    }
    case StepKind::BmmF32:
      bmm_f64(in_f(0), in_f(1), TB, st.n, st.d, out_f);
      break;
    case StepKind::NchwToNhwc:
      if (!nchw_to_nhwc(in_f(0), st.count * T, st.c, st.h, st.w, out_f, nthreads))
        throw InputValueError("images contain NaN or Inf values");
      break;
    case StepKind::MaxPool:
      if (buffers[st.out].dtype == DType::U8)
        max_pool_nhwc<uint8_t>(in_u8(0), st.count * T, st.h, st.w, st.c, st.ks, st.stride, st.pad,
                               static_cast<uint8_t*>(ptrs[st.out]), nthreads);
      else
        max_pool_nhwc<float>(in_f(0), st.count * T, st.h, st.w, st.c, st.ks, st.stride, st.pad, out_f, nthreads);
      break;
    case StepKind::MeanHW:
      mean_hw(in_f(0), st.count * T, st.h, st.w, st.c, out_f);
      break;
    case StepKind::PairwiseSqDiff:
      pairwise_sqdiff(in_f(0), TB, st.n, st.c, out_f, nthreads);
      break;
    case StepKind::NegSumLast:
      neg_sum_last(in_f(0), st.count * T, st.c, out_f);
      break;
    case StepKind::Sigmoid:
      sigmoid_f64(in_f(0), st.count * T, out_f);
      break;
    case StepKind::EdgeUpdate:
      edge_update(in_f(0), in_f(1), TB, st.n, out_f);
      break;
    case StepKind::OffdiagL1Normalize:
      offdiag_l1_normalize(in_f(0), TB, st.n, out_f);
      break;
    case StepKind::ConcatLast: {
      const size_t es = buffers[st.out].dtype == DType::U8 ? 1 : 4;
      int total = 0;
      for (const ConcatPart& p : st.parts) total += p.stop - p.start;
      uint8_t* dst = static_cast<uint8_t*>(ptrs[st.out]);
      const int64_t rows = st.count * T;
      for (int64_t r = 0; r < rows; ++r) {
        uint8_t* d = dst + r * total * es;
        for (size_t i = 0; i < st.parts.size(); ++i) {
          const ConcatPart& p = st.parts[i];
          const uint8_t* src = static_cast<const uint8_t*>(ptrs[st.in[i]]) + (r * p.width + p.start) * es;
          std::memcpy(d, src, (p.stop - p.start) * es);
          d += (p.stop - p.start) * es;
        }
      }
      break;
    }
    case StepKind::LabelScores:
      label_scores(in_f(0), in_f(1), T, st.rows, st.n, st.first_row, st.ns, st.way, out_f);
      break;
    case StepKind::PairwiseAbsDiff:
      pairwise_absdiff(in_f(0), TB, st.n, st.c, out_f, nthreads);
      break;
    case StepKind::TakeRows: {
      const size_t es = buffers[st.out].dtype == DType::U8 ? 1 : 4;
      take_rows(static_cast<const uint8_t*>(ptrs[st.in[0]]), T, st.count, st.c, es, st.index.data(),
                static_cast<int64_t>(st.index.size()), static_cast<uint8_t*>(ptrs[st.out]));
      break;
    }
    case StepKind::EdgeUpdate2ch:
      edge_update_2ch(in_f(0), in_f(1), in_f(2), TB, st.n, static_cast<float*>(ptrs[st.codes[0]]),
                      static_cast<float*>(ptrs[st.codes[1]]));
      break;
  }
  if (bad) throw ArgError("plan step " + st.name + ": input codes out of range");
}

}  // namespace qgnn
