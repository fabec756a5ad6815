// pybind11 binding of the compiled plan (qgnn_deploy._C.Plan). The plan's description
// comes from qgnn_deploy/plan (buffers + steps as dicts); everything is validated here,
// once, when the plan is built -- buffer ids, dtypes and per-task sizes of every step
// against its geometry, layer parameters, weights (prepacked here) -- so that run() only
// checks the caller's input arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "plan.h"

namespace py = pybind11;
using qgnn::ArgError;

namespace {

using qgnn::DType;
using qgnn::Plan;
using qgnn::PlanStep;
using qgnn::Role;
using qgnn::StepKind;

constexpr int64_t kMaxElems = int64_t(1) << 34;

struct StepReader {
  const py::dict& d;
  std::string where;

  bool has(const char* k) const { return d.contains(k) && !d[k].is_none(); }
  py::handle at(const char* k) const {
    if (!has(k)) throw ArgError(where + ": missing '" + k + "'");
    return d[k];
  }
  int64_t i64(const char* k, int64_t lo = 1, int64_t hi = kMaxElems) const {
    const int64_t v = at(k).cast<int64_t>();
    if (v < lo || v > hi) throw ArgError(where + ": '" + k + "' = " + std::to_string(v) + " is out of range");
    return v;
  }
  int i32(const char* k, int lo = 1, int hi = 1 << 30) const { return static_cast<int>(i64(k, lo, hi)); }
  float f32(const char* k, bool positive = false) const {
    const double v = at(k).cast<double>();
    const float f = static_cast<float>(v);
    if (!std::isfinite(v) || !std::isfinite(f) || (positive && !(f > 0.f)))
      throw ArgError(where + ": '" + k + "' must be a finite" + (positive ? " positive" : "") + " float32 value");
    return f;
  }
  template <class T>
  py::array_t<T> arr(const char* k, int64_t n) const {
    py::array a = py::reinterpret_borrow<py::array>(at(k));
    if (!a.dtype().is(py::dtype::of<T>())) throw ArgError(where + ": '" + k + "' has the wrong dtype");
    if (!(a.flags() & py::array::c_style)) throw ArgError(where + ": '" + k + "' must be C-contiguous");
    if (n >= 0 && a.size() != n) throw ArgError(where + ": '" + k + "' must hold " + std::to_string(n) + " values");
    return py::array_t<T>(a);
  }
  const float* opt_f32(const char* k, int n, std::vector<py::array_t<float>>& keep) const {
    if (!has(k)) return nullptr;
    keep.push_back(arr<float>(k, n));
    return keep.back().data();
  }
};

void expect(const Plan& p, const StepReader& r, int id, DType dt, int64_t n, const char* what) {
  if (id < 0 || id >= static_cast<int>(p.buffers.size())) throw ArgError(r.where + ": " + what + " is not a buffer");
  if (p.buffers[id].dtype != dt)
    throw ArgError(r.where + ": " + what + " must be " + (dt == DType::U8 ? "uint8" : "float32"));
  if (p.buffers[id].numel != n)
    throw ArgError(r.where + ": " + what + " holds " + std::to_string(p.buffers[id].numel) +
                   " elements per task, the step needs " + std::to_string(n));
}

int conv_out(int h, int ks, int stride, int pad) { return (h + 2 * pad - ks) / stride + 1; }

// "requant": [(l, s, bits), ...] -- the step's outputs are that many code buffers (in
// order), else one fp32 output
int read_requant(const StepReader& r, float* l, float* s, int* bits) {
  if (!r.has("requant")) return 0;
  const auto q = r.at("requant").cast<std::vector<std::tuple<double, double, int>>>();
  if (q.size() > static_cast<size_t>(qgnn::kMaxRequant)) throw ArgError(r.where + ": at most 3 requantized outputs");
  for (size_t k = 0; k < q.size(); ++k) {
    l[k] = static_cast<float>(std::get<0>(q[k]));
    s[k] = static_cast<float>(std::get<1>(q[k]));
    bits[k] = std::get<2>(q[k]);
    if (!std::isfinite(l[k]) || !std::isfinite(s[k]) || !(s[k] > 0.f))
      throw ArgError(r.where + ": requantization offsets and steps must be finite, steps > 0");
  }
  return static_cast<int>(q.size());
}

void expect_outputs(const Plan& p, const StepReader& r, PlanStep& st, const std::vector<int>& outs, int nq,
                    int64_t n) {
  if (nq == 0) {
    if (outs.size() != 1) throw ArgError(r.where + ": an fp32 layer output is one buffer");
    expect(p, r, st.out, DType::F32, n, "output");
    return;
  }
  if (static_cast<int>(outs.size()) != nq) throw ArgError(r.where + ": one code output per requantization");
  for (int b : outs) expect(p, r, b, DType::U8, n, "code output");
  st.codes = outs;
}

// A layer step's input (in_dt: [rows, K], a conv's NHWC map) and outputs (fp32, or nq code
// sets) against its geometry; returns the outputs' per-task size
int64_t expect_layer_io(const Plan& p, const StepReader& r, PlanStep& st, const std::vector<int>& outs, bool conv,
                        DType in_dt, int K, int O, int Ho, int Wo, int nq) {
  const int64_t in_n = conv ? st.count * st.h * st.w * st.c : st.count * K;
  const int64_t out_n = conv ? st.count * Ho * Wo * O : st.count * O;
  expect(p, r, st.in[0], in_dt, in_n, "input");
  expect_outputs(p, r, st, outs, nq, out_n);
  return out_n;
}

void read_geometry(PlanStep& st, const StepReader& r) {
  st.count = r.i64("images");
  st.h = r.i32("h");
  st.w = r.i32("w");
  st.c = r.i32("c");
  st.ks = r.i32("ks", 1, 15);
  st.stride = r.i32("stride", 1, 16);
  st.pad = r.i32("pad", 0, st.ks - 1);
  if (st.h + 2 * st.pad < st.ks || st.w + 2 * st.pad < st.ks) throw ArgError(r.where + ": input smaller than the kernel");
}

// Prepacks the weights of one quantized layer described by r and derives its constants;
// the geometry (conv) comes from st. Returns the layer's K.
int build_qlayer(const StepReader& r, const PlanStep& st, bool conv, std::unique_ptr<qgnn::PackedW>& packed,
                 std::unique_ptr<qgnn::QLayer>& layer) {
  const int w_bits = r.i32("w_bits", 2, 8), a_bits = r.i32("a_bits", 2, 8);
  for (int b : {w_bits, a_bits})
    if (b != 2 && b != 3 && b != 4 && b != 8) throw ArgError(r.where + ": bits must be one of (2, 3, 4, 8)");
  const int K = conv ? st.ks * st.ks * st.c : r.i32("k");
  py::array wp = py::reinterpret_borrow<py::array>(r.at("w_packed"));
  if (!wp.dtype().is(py::dtype::of<uint8_t>()) || wp.ndim() != 2 || !(wp.flags() & py::array::c_style))
    throw ArgError(r.where + ": w_packed must be a C-contiguous 2-D uint8 array");
  if (wp.shape(1) != int64_t(K + 7) / 8 * w_bits || wp.shape(0) < 1)
    throw ArgError(r.where + ": w_packed rows do not hold K=" + std::to_string(K) + " codes of " +
                   std::to_string(w_bits) + " bits");
  const int O = static_cast<int>(wp.shape(0));
  packed.reset(new qgnn::PackedW());
  qgnn::prepack(static_cast<const uint8_t*>(wp.data()), O, K, w_bits, conv ? st.ks * st.ks : 1, packed.get());
  std::vector<py::array_t<float>> keep;
  qgnn::LayerParams lp;
  lp.w_scale = r.opt_f32("w_scale", O, keep);
  lp.w_offset = r.opt_f32("w_offset", O, keep);
  if (!lp.w_scale || !lp.w_offset) throw ArgError(r.where + ": w_scale and w_offset are required");
  lp.a_scale = r.f32("a_scale", true);
  lp.a_offset = r.f32("a_offset");
  lp.post_scale = r.opt_f32("post_scale", O, keep);
  lp.post_shift = r.opt_f32("post_shift", O, keep);
  if (r.has("slope")) {
    lp.has_slope = true;
    lp.slope = r.f32("slope");
  }
  lp.nq = read_requant(r, lp.out_l, lp.out_s, lp.out_bits);
  layer.reset(new qgnn::QLayer());
  qgnn::prepare_layer(*layer, *packed, a_bits, lp, conv ? st.ks : 0, st.stride, st.pad, st.h, st.w, st.c);
  return K;
}

// A qconv / qlinear step. Inputs: codes, then the fp32 residual (or -1); a qlinear with a
// "shortcut" (the layer computing its residual, fused) takes that layer's codes instead.
void read_qlayer(PlanStep& st, const StepReader& r, const Plan& p, bool conv, const std::vector<int>& outs) {
  const int K = build_qlayer(r, st, conv, st.packed, st.qlayer);
  const qgnn::QLayer& L = *st.qlayer;
  const int O = L.w->O;
  const int64_t out_n = expect_layer_io(p, r, st, outs, conv, DType::U8, K, O, L.Ho, L.Wo, L.epi.rq.nq);
  if (!conv && r.has("shortcut")) {
    const py::dict sd = py::reinterpret_borrow<py::dict>(r.at("shortcut"));
    const StepReader rs{sd, r.where + " shortcut"};
    if (st.in.size() != 2 || st.in[1] < 0) throw ArgError(r.where + ": a fused shortcut reads input 1");
    const int Ks = build_qlayer(rs, st, false, st.packed_s, st.qlayer_s);
    if (st.qlayer_s->w->O != O || st.qlayer_s->epi.rq.nq) throw ArgError(rs.where + ": must give O fp32 outputs");
    expect(p, r, st.in[1], DType::U8, st.count * Ks, "shortcut input");
    return;
  }
  if (st.in.size() > 1 && st.in[1] >= 0) expect(p, r, st.in[1], DType::F32, out_n, "residual");
}

void read_flayer(PlanStep& st, const StepReader& r, const Plan& p, bool conv, const std::vector<int>& outs) {
  py::array w = py::reinterpret_borrow<py::array>(r.at("weight"));
  if (!w.dtype().is(py::dtype::of<float>()) || !(w.flags() & py::array::c_style) || w.ndim() < 2)
    throw ArgError(r.where + ": weight must be a C-contiguous float32 array");
  const int O = static_cast<int>(w.shape(0));
  const int64_t K64 = w.size() / std::max<int64_t>(O, 1);
  const int K = static_cast<int>(K64);
  if (conv && K != st.ks * st.ks * st.c) throw ArgError(r.where + ": weight must be [O, ks, ks, C]");
  if (!conv && K != r.i32("k")) throw ArgError(r.where + ": weight must be [O, k]");
  std::vector<py::array_t<float>> keep;
  const float* bias = r.opt_f32("bias", O, keep);
  const float* ps = r.opt_f32("post_scale", O, keep);
  const float* sh = r.opt_f32("post_shift", O, keep);
  const bool has_slope = r.has("slope");
  const float slope = has_slope ? r.f32("slope") : 0.f;
  float ql[qgnn::kMaxRequant], qs[qgnn::kMaxRequant];
  int qb[qgnn::kMaxRequant];
  const int nq = read_requant(r, ql, qs, qb);
  st.flayer.reset(new qgnn::FloatLayer());
  qgnn::prepare_float_layer(*st.flayer, static_cast<const float*>(w.data()), O, K, bias, ps, sh, has_slope, slope,
                            conv ? st.ks : 0, st.stride, st.pad, st.h, st.w, st.c, nq, ql, qs, qb);
  const qgnn::F64Args& L = st.flayer->args;
  const int64_t out_n = expect_layer_io(p, r, st, outs, conv, DType::F32, K, O, L.Ho, L.Wo, nq);
  if (st.in.size() > 1 && st.in[1] >= 0) expect(p, r, st.in[1], DType::F32, out_n, "residual");
}

PlanStep read_step(const py::dict& d, const Plan& p, size_t index) {
  PlanStep st;
  StepReader r{d, "plan step " + std::to_string(index)};
  const std::string kind = r.at("kind").cast<std::string>();
  if (!qgnn::step_kind_from_name(kind, &st.kind)) throw ArgError(r.where + ": unknown kind '" + kind + "'");
  st.name = r.has("name") ? r.at("name").cast<std::string>() : kind;
  r.where += " (" + kind + " " + st.name + ")";
  st.in = r.at("in").cast<std::vector<int>>();
  const std::vector<int> outs = r.at("out").cast<std::vector<int>>();
  const bool layer = st.kind == StepKind::QConv || st.kind == StepKind::QLinear || st.kind == StepKind::ConvF32 ||
                     st.kind == StepKind::LinearF32;
  const bool two_outputs = st.kind == StepKind::NodeRows || st.kind == StepKind::EdgeUpdate2ch;
  if (two_outputs ? outs.size() != 2 : outs.empty() || (!layer && outs.size() != 1))
    throw ArgError(r.where + ": a step has one output (a requantizing layer one per quantizer, node_rows and "
                   "edge_update_2ch two)");
  st.out = outs[0];
  if (st.in.empty() || st.in[0] < 0) throw ArgError(r.where + ": no input");
  const int nb = static_cast<int>(p.buffers.size());
  for (int b : st.in)
    if (b >= nb || b < -1) throw ArgError(r.where + ": input is not a buffer");
  for (size_t k = 0; k < outs.size(); ++k) {
    const int o = outs[k];
    if (o < 0 || o >= nb) throw ArgError(r.where + ": output is not a buffer");
    if (p.buffers[o].role == Role::Input) throw ArgError(r.where + ": writes an input");
    for (size_t j = 0; j < k; ++j)
      if (outs[j] == o) throw ArgError(r.where + ": two outputs share a buffer");
    // a layer may write its fp32 output over its residual (element-wise, read before written)
    for (size_t i = 0; i < st.in.size(); ++i)
      if (st.in[i] == o && !(layer && i == 1 && outs.size() == 1 && p.buffers[o].dtype == DType::F32))
        throw ArgError(r.where + ": output aliases an input");
  }
  auto need_inputs = [&](size_t lo, size_t hi) {
    if (st.in.size() < lo || st.in.size() > hi) throw ArgError(r.where + ": wrong number of inputs");
  };
  const DType F = DType::F32, U = DType::U8;
  // graph steps: "batch" graphs per task (optional, default 1), each of the step's geometry
  st.batch = r.has("batch") ? r.i64("batch", 1, int64_t(1) << 24) : 1;
  const int64_t B = st.batch;
  switch (st.kind) {
    case StepKind::Quantize:
      need_inputs(1, 1);
      st.count = r.i64("n");
      st.l = r.f32("l");
      st.s = r.f32("s", true);
      st.bits = r.i32("bits", 2, 8);
      expect(p, r, st.in[0], F, st.count, "input");
      expect(p, r, st.out, U, st.count, "output");
      break;
    case StepKind::QConv:
      need_inputs(1, 2);
      read_geometry(st, r);
      read_qlayer(st, r, p, true, outs);
      break;
    case StepKind::QLinear:
      need_inputs(1, 2);
      st.count = r.i64("rows");
      read_qlayer(st, r, p, false, outs);
      break;
    case StepKind::QBmm:
      need_inputs(2, 3);
      st.n = r.i32("n");
      st.d = r.i32("d");
      st.a_bits = r.i32("a_bits", 2, 8);
      st.v_bits = r.i32("v_bits", 2, 8);
      st.sa = r.f32("a_scale", true);
      st.la = r.f32("a_offset");
      st.sv = r.f32("v_scale", true);
      st.lv = r.f32("v_offset");
      expect(p, r, st.in[0], U, B * st.n * st.n, "adjacency");
      expect(p, r, st.in[1], U, B * st.n * st.d, "nodes");
      if (st.in.size() > 2) {  // per-node codes: the node_rows step guarantees codes + offsets < 2^v_bits
        if (st.in[2] < 0) throw ArgError(r.where + ": no row offsets");
        expect(p, r, st.in[2], U, B * st.n, "row offsets");
      }
      expect(p, r, st.out, F, B * st.n * st.d, "output");
      break;
    case StepKind::NodeRows: {
      need_inputs(1, 1);
      st.n = r.i32("n");
      st.d = r.i32("d");
      st.node_bits = r.at("node_bits").cast<std::vector<int>>();
      if (st.node_bits.size() < 2) throw ArgError(r.where + ": node_bits needs two widths or more");
      for (size_t i = 0; i < st.node_bits.size(); ++i) {
        const int b = st.node_bits[i];
        if ((b < 2 || b > 4) && b != 8) throw ArgError(r.where + ": node_bits must be 2, 3, 4 or 8");
        if (i && b <= st.node_bits[i - 1]) throw ArgError(r.where + ": node_bits must ascend");
      }
      expect(p, r, st.in[0], U, int64_t(st.n) * st.d, "input");
      expect(p, r, outs[0], U, int64_t(st.n) * st.d, "codes");
      expect(p, r, outs[1], U, st.n, "row offsets");
      st.codes = outs;
      break;
    }
    case StepKind::ConvF32:
      need_inputs(1, 2);
      read_geometry(st, r);
      st.nchw = r.has("nchw") && r.i32("nchw", 0, 1) == 1;
      if (st.nchw && st.in.size() > 1 && st.in[1] >= 0) throw ArgError(r.where + ": an NCHW input takes no residual");
      read_flayer(st, r, p, true, outs);
      break;
    case StepKind::LinearF32:
      need_inputs(1, 2);
      st.count = r.i64("rows");
      read_flayer(st, r, p, false, outs);
      break;
    case StepKind::BmmF32:
      need_inputs(2, 2);
      st.n = r.i32("n");
      st.d = r.i32("d");
      expect(p, r, st.in[0], F, B * st.n * st.n, "adjacency");
      expect(p, r, st.in[1], F, B * st.n * st.d, "nodes");
      expect(p, r, st.out, F, B * st.n * st.d, "output");
      break;
    case StepKind::NchwToNhwc:
      need_inputs(1, 1);
      st.count = r.i64("images");
      st.c = r.i32("c");
      st.h = r.i32("h");
      st.w = r.i32("w");
      expect(p, r, st.in[0], F, st.count * st.c * st.h * st.w, "input");
      expect(p, r, st.out, F, st.count * st.c * st.h * st.w, "output");
      break;
    case StepKind::MaxPool: {
      need_inputs(1, 1);
      read_geometry(st, r);
      const DType dt = p.buffers[st.in[0]].dtype;
      expect(p, r, st.in[0], dt, st.count * st.h * st.w * st.c, "input");
      expect(p, r, st.out, dt,
             st.count * conv_out(st.h, st.ks, st.stride, st.pad) * conv_out(st.w, st.ks, st.stride, st.pad) * st.c,
             "output");
      break;
    }
    case StepKind::MeanHW:
      need_inputs(1, 1);
      st.count = r.i64("images");
      st.h = r.i32("h");
      st.w = r.i32("w");
      st.c = r.i32("c");
      expect(p, r, st.in[0], F, st.count * st.h * st.w * st.c, "input");
      expect(p, r, st.out, F, st.count * st.c, "output");
      break;
    case StepKind::PairwiseSqDiff:
    case StepKind::PairwiseAbsDiff:
      need_inputs(1, 1);
      st.n = r.i32("n");
      st.c = r.i32("c");
      expect(p, r, st.in[0], F, B * st.n * st.c, "input");
      expect(p, r, st.out, F, B * st.n * st.n * st.c, "output");
      break;
    case StepKind::NegSumLast:
      need_inputs(1, 1);
      st.count = r.i64("rows");
      st.c = r.i32("c");
      expect(p, r, st.in[0], F, st.count * st.c, "input");
      expect(p, r, st.out, F, st.count, "output");
      break;
    case StepKind::Sigmoid:
      need_inputs(1, 1);
      st.count = r.i64("n");
      expect(p, r, st.in[0], F, st.count, "input");
      expect(p, r, st.out, F, st.count, "output");
      break;
    case StepKind::EdgeUpdate:
      need_inputs(2, 2);
      st.n = r.i32("n");
      expect(p, r, st.in[0], F, B * st.n * st.n, "similarity");
      expect(p, r, st.in[1], F, B * st.n * st.n, "previous edges");
      expect(p, r, st.out, F, B * st.n * st.n, "output");
      break;
    case StepKind::EdgeUpdate2ch:
      need_inputs(3, 3);
      st.n = r.i32("n");
      expect(p, r, st.in[0], F, B * st.n * st.n, "similarity");
      expect(p, r, st.in[1], F, B * st.n * st.n, "previous similarity edges");
      expect(p, r, st.in[2], F, B * st.n * st.n, "previous dissimilarity edges");
      expect(p, r, outs[0], F, B * st.n * st.n, "similarity output");
      expect(p, r, outs[1], F, B * st.n * st.n, "dissimilarity output");
      st.codes = outs;
      break;
    case StepKind::OffdiagL1Normalize:
      need_inputs(1, 1);
      st.n = r.i32("n");
      expect(p, r, st.in[0], F, B * st.n * st.n, "input");
      expect(p, r, st.out, F, B * st.n * st.n, "output");
      break;
    case StepKind::TakeRows: {
      need_inputs(1, 1);
      st.count = r.i64("rows");
      st.c = r.i32("c");
      st.index = r.at("index").cast<std::vector<int64_t>>();
      if (st.index.empty() || static_cast<int64_t>(st.index.size()) > kMaxElems)
        throw ArgError(r.where + ": index must pick at least one row");
      for (int64_t i : st.index)
        if (i < 0 || i >= st.count) throw ArgError(r.where + ": row index " + std::to_string(i) + " is out of range");
      const DType dt = p.buffers[st.in[0]].dtype;
      expect(p, r, st.in[0], dt, st.count * st.c, "input");
      expect(p, r, st.out, dt, static_cast<int64_t>(st.index.size()) * st.c, "output");
      break;
    }
    case StepKind::ConcatLast: {
      st.count = r.i64("rows");
      const auto parts = r.at("parts").cast<std::vector<std::vector<int>>>();
      if (parts.size() != st.in.size()) throw ArgError(r.where + ": one part per input");
      const DType dt = p.buffers[st.out].dtype;
      int64_t total = 0;
      for (size_t i = 0; i < parts.size(); ++i) {
        if (parts[i].size() != 3) throw ArgError(r.where + ": a part is (width, start, stop)");
        const int wdt = parts[i][0], a = parts[i][1], b = parts[i][2];
        if (wdt < 1 || a < 0 || b <= a || b > wdt) throw ArgError(r.where + ": bad column range");
        if (st.in[i] < 0) throw ArgError(r.where + ": no input");
        expect(p, r, st.in[i], dt, st.count * wdt, "input");
        st.parts.push_back({wdt, a, b});
        total += b - a;
      }
      expect(p, r, st.out, dt, st.count * total, "output");
      break;
    }
    case StepKind::LabelScores:
      // edges [rows, n] per task (default: square, rows = n); queries from first_row (default ns)
      need_inputs(2, 2);
      st.n = r.i32("n");
      st.rows = r.has("rows") ? r.i32("rows") : st.n;
      st.ns = r.i32("ns", 1, r.has("rows") ? st.n : st.n - 1);
      st.first_row = r.has("first_row") ? r.i32("first_row", 0, st.rows - 1) : st.ns;
      if (st.first_row >= st.rows) throw ArgError(r.where + ": no query rows");
      st.way = r.i32("way");
      expect(p, r, st.in[0], F, int64_t(st.rows) * st.n, "edges");
      expect(p, r, st.in[1], F, int64_t(st.ns) * st.way, "labels");
      expect(p, r, st.out, F, int64_t(st.rows - st.first_row) * st.way, "output");
      break;
  }
  return st;
}

std::shared_ptr<Plan> make_plan(const std::vector<std::vector<int64_t>>& buffers, const py::list& steps,
                                int64_t arena_per_task) {
  auto p = std::make_shared<Plan>();
  if (arena_per_task < 0 || arena_per_task > kMaxElems) throw ArgError("plan: bad arena size");
  p->arena_per_task = arena_per_task;
  for (size_t i = 0; i < buffers.size(); ++i) {
    const auto& b = buffers[i];
    if (b.size() < 4 || b.size() > 12 || b[0] < 0 || b[0] > 1 || b[2] < 0 || b[2] > 2 || b[1] < 1 ||
        b[1] > kMaxElems)
      throw ArgError("plan: buffer " + std::to_string(i) + " is malformed");
    qgnn::PlanBuffer pb{static_cast<DType>(b[0]), b[1], static_cast<Role>(b[2]), b[3], {b.begin() + 4, b.end()}};
    if (pb.shape.empty()) pb.shape = {pb.numel};  // no shape given: flat
    int64_t numel = 1;
    for (int64_t d : pb.shape) numel = d < 1 || d > kMaxElems ? 0 : numel * d;
    if (numel != pb.numel) throw ArgError("plan: buffer " + std::to_string(i) + "'s shape does not hold its values");
    const int64_t bytes = pb.numel * (pb.dtype == DType::U8 ? 1 : 4);
    if (pb.role == Role::Temp && (pb.offset < 0 || pb.offset % 64 || pb.offset + bytes > arena_per_task))
      throw ArgError("plan: buffer " + std::to_string(i) + " lies outside the arena");
    p->buffers.push_back(pb);
  }
  std::vector<bool> written(p->buffers.size(), false);
  for (size_t i = 0; i < p->buffers.size(); ++i) written[i] = p->buffers[i].role == Role::Input;
  for (size_t i = 0; i < steps.size(); ++i) {
    PlanStep st = read_step(steps[i].cast<py::dict>(), *p, i);
    for (int b : st.in)
      if (b >= 0 && !written[b]) throw ArgError("plan step " + std::to_string(i) + " (" + st.name + ") reads a buffer no step wrote");
    written[st.out] = true;
    for (int b : st.codes) written[b] = true;
    p->steps.push_back(std::move(st));
  }
  for (size_t i = 0; i < p->buffers.size(); ++i)
    if (p->buffers[i].role == Role::Output && !written[i]) throw ArgError("plan: output buffer " + std::to_string(i) + " is never written");
  return p;
}

py::tuple run_plan(const Plan& p, int64_t T, const py::sequence& inputs, int nthreads, bool profile) {
  if (T < 1 || T > (int64_t(1) << 24)) throw ArgError("tasks must be in 1 .. 2^24");
  if (nthreads < 1 || nthreads > 1024) throw ArgError("nthreads must be in 1..1024");
  std::vector<void*> ptrs(p.buffers.size(), nullptr);
  std::vector<py::array> keep;
  py::list outs;
  size_t next_in = 0;
  const size_t n_in = static_cast<size_t>(py::len(inputs));
  for (size_t i = 0; i < p.buffers.size(); ++i) {
    const qgnn::PlanBuffer& b = p.buffers[i];
    const int64_t n = b.numel * T;
    if (b.role == Role::Input) {
      const std::string what = "plan input " + std::to_string(next_in) + " (buffer " + std::to_string(i) + ")";
      if (next_in >= n_in) throw ArgError(what + " is missing");
      py::object o = inputs[next_in++];
      if (!py::isinstance<py::array>(o)) throw ArgError(what + " must be a numpy array");
      py::array a = py::reinterpret_borrow<py::array>(o);
      const bool f32 = b.dtype == DType::F32;
      if (!(f32 ? a.dtype().is(py::dtype::of<float>()) : a.dtype().is(py::dtype::of<uint8_t>())))
        throw ArgError(what + " must be " + (f32 ? "float32" : "uint8"));
      if (!(a.flags() & py::array::c_style) || reinterpret_cast<uintptr_t>(a.data()) % (f32 ? 4 : 1))
        throw ArgError(what + " must be C-contiguous and aligned");
      if (a.size() != n)
        throw ArgError(what + " holds " + std::to_string(a.size()) + " values, " + std::to_string(T) +
                       " tasks need " + std::to_string(n));
      keep.push_back(a);
      ptrs[i] = const_cast<void*>(a.data());
    } else if (b.role == Role::Output) {
      std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(T)};
      shape.insert(shape.end(), b.shape.begin(), b.shape.end());
      py::array a = b.dtype == DType::F32 ? py::array(py::array_t<float>(shape)) : py::array(py::array_t<uint8_t>(shape));
      ptrs[i] = a.mutable_data();
      outs.append(a);
    }
  }
  if (next_in != n_in) throw ArgError("the plan takes " + std::to_string(next_in) + " inputs, got " + std::to_string(n_in));
  std::vector<int64_t> ns(profile ? p.steps.size() : 0);
  {
    py::gil_scoped_release nogil;
    p.run(T, ptrs, nthreads, profile ? ns.data() : nullptr);
  }
  if (!profile) return py::make_tuple(outs, py::none());
  return py::make_tuple(outs, py::cast(ns));
}

}  // namespace

void bind_plan(py::module& m) {
  py::class_<Plan, std::shared_ptr<Plan>>(m, "Plan",
      "A compiled episode plan (qgnn_deploy.plan): steps over buffers, run in one call.")
      .def(py::init(&make_plan), py::arg("buffers"), py::arg("steps"), py::arg("arena_per_task"))
      .def("run", &run_plan, py::arg("tasks"), py::arg("inputs"), py::arg("nthreads") = 1,
           py::arg("profile") = false,
           "Runs the plan on `tasks` tasks: inputs, one C-contiguous array per input buffer in buffer order; "
           "returns ([T, *shape] arrays, one per output buffer in buffer order; per-step nanoseconds or None)")
      .def_property_readonly("num_steps", [](const Plan& p) { return p.steps.size(); })
      .def_property_readonly("arena_per_task", [](const Plan& p) { return p.arena_per_task; })
      .def("step_kinds", [](const Plan& p) {
        std::vector<std::string> k;
        for (const auto& s : p.steps) k.emplace_back(qgnn::step_kind_name(s.kind));
        return k;
      });
}
