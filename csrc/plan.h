// The compiled plan's executor: a flat list of pre-validated steps over buffers, run in
// one call per episode batch (qgnn_deploy/plan/plan.py describes the step vocabulary).
//
// Every buffer holds T times its per-task size (T: tasks of the call). Inputs and outputs
// are the caller's arrays; temporaries live in one arena at per-task offsets laid out by
// the planner (buffers with disjoint lifetimes share memory), so a run allocates nothing
// per step. Arenas are pooled: concurrent runs of one plan each take their own.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "qgnn_cpu.h"

namespace qgnn {

enum class DType : int { U8 = 0, F32 = 1 };
enum class Role : int { Input = 0, Output = 1, Temp = 2 };

struct PlanBuffer {
  DType dtype = DType::F32;
  int64_t numel = 0;       // elements per task
  Role role = Role::Temp;
  int64_t offset = 0;      // Temp: byte offset per task in the arena (a multiple of 64)
  std::vector<int64_t> shape;  // per task (numel values; [numel] if not given); an output comes back as [T, *shape]
};

enum class StepKind : int {
  Quantize, QConv, QLinear, QBmm, ConvF32, LinearF32, BmmF32, NchwToNhwc, MaxPool, MeanHW,
  PairwiseSqDiff, NegSumLast, Sigmoid, EdgeUpdate, OffdiagL1Normalize, ConcatLast, LabelScores, NodeRows,
  PairwiseAbsDiff, TakeRows, EdgeUpdate2ch
};
const char* step_kind_name(StepKind k);
bool step_kind_from_name(const std::string& s, StepKind* k);

struct ConcatPart {
  int width, start, stop;  // the input's last dim, and its columns [start, stop)
};

struct PlanStep {
  StepKind kind = StepKind::Quantize;
  std::string name;
  std::vector<int> in;     // buffer ids; -1: an absent optional input (residual)
  int out = -1;            // the output; a requantizing layer's first code output
  std::vector<int> codes;  // a requantizing layer: its code outputs (codes[0] == out);
                           // node_rows: {q, row offsets}; edge_update_2ch: {sim, dsim}
  int64_t count = 0;       // per task: elements (quantize, sigmoid) or rows (linear kinds,
                           // neg_sum_last, concat) or images (map kinds)
  int h = 0, w = 0, c = 0, ks = 1, stride = 1, pad = 0, n = 0, d = 0, ns = 0, way = 0;
  int64_t batch = 1;       // graph steps: graphs per task (each N x N / N x D on its own)
  bool nchw = false;       // conv_f32: input 0 is the NCHW images (its layout change fused)
  int rows = 0, first_row = 0;   // label_scores: edge rows per task, first query row
  std::vector<int64_t> index;    // take_rows: the rows picked, each in [0, count)
  float l = 0.f, s = 1.f;  // quantize
  int bits = 8;
  int a_bits = 8, v_bits = 8;  // qbmm
  std::vector<int> node_bits;   // node_rows: the widths, ascending
  float sa = 1.f, la = 0.f, sv = 1.f, lv = 0.f;
  std::unique_ptr<PackedW> packed;   // qconv / qlinear
  std::unique_ptr<QLayer> qlayer;
  std::unique_ptr<PackedW> packed_s;  // qlinear with a fused shortcut: the residual's layer,
  std::unique_ptr<QLayer> qlayer_s;   // run on input 1
  std::unique_ptr<FloatLayer> flayer;  // conv_f32 / linear_f32
  std::vector<ConcatPart> parts;
};

struct Arena;

class Plan {
 public:
  std::vector<PlanBuffer> buffers;
  std::vector<PlanStep> steps;
  int64_t arena_per_task = 0;

  // ptrs: one per buffer; the caller's arrays (T tasks) for inputs and outputs, ignored
  // for temporaries. step_ns: per-step wall time, or null.
  void run(int64_t T, std::vector<void*> ptrs, int nthreads, int64_t* step_ns) const;
  Plan();
  ~Plan();

 private:
  std::unique_ptr<Arena> acquire(int64_t bytes) const;
  void release(std::unique_ptr<Arena> a) const;
  void exec(const PlanStep& st, int64_t T, const std::vector<void*>& ptrs, int nthreads) const;
  mutable std::mutex mu_;
  mutable std::vector<std::unique_ptr<Arena>> free_;
};

}  // namespace qgnn
