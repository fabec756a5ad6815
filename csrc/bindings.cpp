// pybind11 binding of the packed-int CPU kernels (module qgnn_deploy._C).
//
// Thin on purpose: every argument is checked here (dtype, rank, shape, C-contiguity,
// alignment, bits, geometry) before a pointer reaches a kernel, and failures raise
// qgnn_deploy._C.KernelArgumentError (a ValueError; the Python wrapper re-raises it as
// qgnn_deploy.errors.KernelArgumentError). An ISA path this CPU cannot run (QGNN_CPU_ISA,
// force_isa) raises qgnn_deploy._C.IsaUnavailableError (-> BackendUnavailableError); NaN /
// Inf episode images reaching a plan raise qgnn_deploy._C.InputValueError (-> InputError).
// Kernels run without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qgnn_cpu.h"
#include "thread_pool.h"

namespace py = pybind11;
using qgnn::ArgError;

namespace {

constexpr int64_t kMaxDim = int64_t(1) << 30;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

template <typename T>
const char* dtype_name() {
  return std::is_same<T, uint8_t>::value ? "uint8" : std::is_same<T, float>::value ? "float32" : "int32";
}

// dtype, rank, C-contiguity and element alignment of an input/output array
template <typename T>
void check_array(const py::array& a, const char* name, int ndim) {
  if (!a.dtype().is(py::dtype::of<T>()))
    throw ArgError(std::string(name) + " must be " + dtype_name<T>() + ", got " +
                   std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw ArgError(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " + shape_str(a));
  if (!(a.flags() & py::array::c_style))
    throw ArgError(std::string(name) + " must be C-contiguous (call .contiguous() first)");
  if (reinterpret_cast<uintptr_t>(a.data()) % alignof(T))
    throw ArgError(std::string(name) + " data pointer is not aligned to " + std::to_string(alignof(T)) + " bytes");
  for (py::ssize_t i = 0; i < a.ndim(); ++i)
    if (a.shape(i) >= kMaxDim) throw ArgError(std::string(name) + " is too large");
}

void check_bits(int bits, const char* name) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    throw ArgError(std::string(name) + " must be one of (2, 3, 4, 8), got " + std::to_string(bits));
}

float finite(double v, const char* name, bool positive = false) {
  if (!std::isfinite(v)) throw ArgError(std::string(name) + " must be finite");
  if (positive && !(v > 0)) throw ArgError(std::string(name) + " must be > 0");
  const float f = static_cast<float>(v);
  if (!std::isfinite(f)) throw ArgError(std::string(name) + " overflows float32");
  return f;
}

const float* opt_vector(const std::optional<py::array>& v, const char* name, int n) {
  if (!v) return nullptr;
  check_array<float>(*v, name, 1);
  if (v->shape(0) != n) throw ArgError(std::string(name) + " must have shape (" + std::to_string(n) + ",), got " + shape_str(*v));
  return static_cast<const float*>(v->data());
}

// The layer parameters of an eager qlinear / qconv2d call, checked, with the output arrays.
struct EagerCall {
  qgnn::LayerParams p;
  const float* residual = nullptr;
  py::array out;
  py::array_t<int32_t> acc, as;
};

void setup_call(EagerCall& c, int O, int64_t M, const std::vector<py::ssize_t>& out_shape, const py::array& w_scale,
                const py::array& w_offset, double a_scale, double a_offset, const std::optional<py::array>& post_scale,
                const std::optional<py::array>& post_shift, const std::optional<py::array>& residual,
                std::optional<double> slope, std::optional<double> out_l, std::optional<double> out_s,
                std::optional<int> out_bits, bool want_acc) {
  qgnn::LayerParams& p = c.p;
  p.w_scale = opt_vector(w_scale, "w_scale", O);
  p.w_offset = opt_vector(w_offset, "w_offset", O);
  p.a_scale = finite(a_scale, "a_scale", true);
  p.a_offset = finite(a_offset, "a_offset");
  p.post_scale = opt_vector(post_scale, "post_scale", O);
  p.post_shift = opt_vector(post_shift, "post_shift", O);
  if (residual) {
    check_array<float>(*residual, "residual", static_cast<int>(out_shape.size()));
    for (size_t i = 0; i < out_shape.size(); ++i)
      if (residual->shape(i) != out_shape[i]) throw ArgError("residual shape " + shape_str(*residual) + " does not match the output");
    c.residual = static_cast<const float*>(residual->data());
  }
  if (slope) {
    p.has_slope = true;
    p.slope = finite(*slope, "slope");
  }
  if (out_s.has_value() != out_l.has_value() || out_s.has_value() != out_bits.has_value())
    throw ArgError("out_l, out_s and out_bits must be given together");
  if (out_s) {
    check_bits(*out_bits, "out_bits");
    p.nq = 1;
    p.out_l[0] = finite(*out_l, "out_l");
    p.out_s[0] = finite(*out_s, "out_s", true);
    p.out_bits[0] = *out_bits;
    c.out = py::array_t<uint8_t>(out_shape);
  } else {
    c.out = py::array_t<float>(out_shape);
  }
  if (want_acc) {
    c.acc = py::array_t<int32_t>(std::vector<py::ssize_t>{static_cast<py::ssize_t>(M), O});
    c.as = py::array_t<int32_t>(std::vector<py::ssize_t>{static_cast<py::ssize_t>(M)});
  }
}

// Prepares the layer (constants, border tables) and runs it without the GIL.
void run_eager(EagerCall& c, const qgnn::PackedW& w, int a_bits, int ks, int stride, int pad, int H, int W, int C,
               const uint8_t* x, int64_t M, int nthreads, bool want_acc, int* bad) {
  qgnn::QLayer L;
  qgnn::prepare_layer(L, w, a_bits, c.p, ks, stride, pad, H, W, C);
  void* out = c.out.mutable_data();
  uint8_t* codes = static_cast<uint8_t*>(out);
  int32_t* acc = want_acc ? c.acc.mutable_data() : nullptr;
  int32_t* as = want_acc ? c.as.mutable_data() : nullptr;
  py::gil_scoped_release nogil;
  qgnn::run_layer(L, x, M, c.residual, c.p.nq ? nullptr : static_cast<float*>(out), &codes, acc, as, nthreads, bad);
}

py::object finish(EagerCall& c, bool want_acc) {
  if (want_acc) return py::make_tuple(c.out, c.acc, c.as);
  return c.out;
}

int check_threads(int n) {
  if (n < 1 || n > 1024) throw ArgError("nthreads must be in 1..1024");
  return n;
}

void raise_bad_codes(int bad, const char* name, int bits) {
  if (bad) throw ArgError(std::string(name) + " holds codes >= 2^" + std::to_string(bits));
}

std::shared_ptr<qgnn::PackedW> make_packed(const py::array& packed, int bits, int K, int taps) {
  check_bits(bits, "w_bits");
  check_array<uint8_t>(packed, "w_packed", 2);
  if (K <= 0 || taps <= 0 || K % taps) throw ArgError("K must be a positive multiple of taps");
  const int64_t rb = int64_t(K + 7) / 8 * bits;
  if (packed.shape(1) != rb)
    throw ArgError("w_packed rows are " + std::to_string(packed.shape(1)) + " bytes, but K=" + std::to_string(K) +
                   " codes of " + std::to_string(bits) + " bits need " + std::to_string(rb));
  if (packed.shape(0) < 1) throw ArgError("w_packed has no rows");
  auto w = std::make_shared<qgnn::PackedW>();
  const uint8_t* p = static_cast<const uint8_t*>(packed.data());
  const int O = static_cast<int>(packed.shape(0));
  {
    py::gil_scoped_release nogil;
    qgnn::prepack(p, O, K, bits, taps, w.get());
  }
  return w;
}

}  // namespace

void bind_plan(py::module& m);  // plan_bindings.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "qgnn-deploy packed-int CPU kernels (AVX-512 VNNI / AVX-VNNI / AVX2 / scalar, chosen at run time)";
  static py::exception<ArgError> exc(m, "KernelArgumentError", PyExc_ValueError);
  static py::exception<qgnn::IsaUnavailable> isa_exc(m, "IsaUnavailableError", PyExc_RuntimeError);
  static py::exception<qgnn::InputValueError> input_exc(m, "InputValueError", exc.ptr());
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const qgnn::InputValueError& e) {
      PyErr_SetString(input_exc.ptr(), e.what());
    } catch (const ArgError& e) {
      PyErr_SetString(exc.ptr(), e.what());
    } catch (const qgnn::IsaUnavailable& e) {
      PyErr_SetString(isa_exc.ptr(), e.what());
    }
  });

  m.def("isa_names", [] {
    std::vector<std::string> names;
    for (int i = 0; i < qgnn::kIsaCount; ++i) names.emplace_back(qgnn::isa_name(static_cast<qgnn::Isa>(i)));
    return names;
  }, "kernel ISA paths, slowest first");
  m.def("isa_blocker", [](const std::string& s) {
    const int i = qgnn::isa_from_name(s);
    if (i < 0) throw ArgError("isa_blocker needs an ISA name, not 'auto'");
    return qgnn::isa_blocker(static_cast<qgnn::Isa>(i));
  }, "'' when this process can run the ISA path, else why not");
  m.def("wake_workers", [](int nthreads, int64_t hold_us) {
    check_threads(nthreads);
    if (hold_us < 0 || hold_us > 1000000) throw ArgError("hold_us must be in 0..1000000");
    qgnn::wake_workers(nthreads, hold_us);
  }, py::arg("nthreads"), py::arg("hold_us"));
  m.def("pool_stats", [] {
    const qgnn::PoolStats s = qgnn::pool_stats();
    py::dict d;
    d["moves"] = s.moves;
    d["worker_tids"] = s.worker_tids;
    d["worker_cpus"] = s.worker_cpus;
    return d;
  }, "the thread pool's workers: {moves, worker_tids, worker_cpus} (thread_pool.h)");
  m.def("parallel_for_runs", [](int nthreads, int64_t ntasks) {
    if (nthreads < 1 || nthreads > 1024 || ntasks < 0 || ntasks > (int64_t(1) << 20))
      throw qgnn::ArgError("parallel_for_runs: nthreads in 1..1024, ntasks in 0..2^20");
    std::vector<std::atomic<int>> runs(static_cast<size_t>(ntasks)), by(static_cast<size_t>(ntasks));
    int used;
    {
      py::gil_scoped_release nogil;
      used = qgnn::parallel_for(nthreads, ntasks, [&](int64_t i, int tid) {
        runs[i].fetch_add(1);
        by[i].store(tid);
      });
    }
    std::vector<int> r(runs.size()), t(by.size());
    for (size_t i = 0; i < runs.size(); ++i) {
      r[i] = runs[i].load();
      t[i] = by[i].load();
    }
    return py::make_tuple(used, r, t);
  }, "diagnostics: parallel_for(nthreads, ntasks) over counting tasks -> (threads used, runs per task, "
     "the thread id that ran each task)");
  m.def("detected_isa", [] { return std::string(qgnn::isa_name(qgnn::detected_isa())); });
  m.def("active_isa", [] { return std::string(qgnn::isa_name(qgnn::active_isa())); });
  m.def("force_isa", [](const std::string& s) { qgnn::force_isa(qgnn::isa_from_name(s)); },
        "force an ISA path ('auto' or '': back to QGNN_CPU_ISA / detected)");
  // qgnn::ConvAlgo's names, in its order
  static const char* const conv_algos[] = {"auto", "direct", "winograd"};
  m.def("force_conv_algo", [](const std::string& s) {
    for (int i = 0; i < 3; ++i)
      if (s == conv_algos[i]) return qgnn::force_conv_algo(static_cast<qgnn::ConvAlgo>(i));
    throw qgnn::ArgError("unknown conv algorithm '" + s + "' (auto, direct, winograd)");
  }, "how 3x3 convs run on the AVX-512 VNNI path: 'auto', 'direct' or 'winograd' (qgnn_cpu.h ConvAlgo)");
  m.def("conv_algo", [] { return std::string(conv_algos[static_cast<int>(qgnn::conv_algo())]); });
  m.def("winograd_runs", [] { return qgnn::winograd_runs(); }, "convs run as Winograd in this process");
  m.def("fused_redos", [] { return qgnn::fused_redos(); },
        "rows x 16 columns of fused epilogues redone in the reference's order, in this process");
  m.def("amx_probe", [] {
    const qgnn::AmxProbe p = qgnn::probe_amx();
    py::dict d;
    d["max_leaf"] = p.max_leaf;
    d["leaf7_edx"] = p.leaf7_edx;
    d["osxsave"] = p.osxsave;
    d["xcr0"] = p.xcr0;
    d["palettes"] = p.palettes;
    d["pal1_eax"] = p.pal1_eax;
    d["pal1_ebx"] = p.pal1_ebx;
    d["pal1_ecx"] = p.pal1_ecx;
    d["perm_errno"] = p.perm_errno;
    d["blocker"] = qgnn::amx_blocker(p);
    return d;
  }, "this CPU's AMX detection registers and what (if anything) blocks AMX-INT8 tiles");
  m.def("amx_blocker", [](uint32_t max_leaf, uint32_t leaf7_edx, bool osxsave, uint64_t xcr0, uint32_t palettes,
                          uint32_t pal1_eax, uint32_t pal1_ebx, uint32_t pal1_ecx, int perm_errno) {
    qgnn::AmxProbe p;
    p.max_leaf = max_leaf;
    p.leaf7_edx = leaf7_edx;
    p.osxsave = osxsave;
    p.xcr0 = xcr0;
    p.palettes = palettes;
    p.pal1_eax = pal1_eax;
    p.pal1_ebx = pal1_ebx;
    p.pal1_ecx = pal1_ecx;
    p.perm_errno = perm_errno;
    return qgnn::amx_blocker(p);
  }, py::arg("max_leaf"), py::arg("leaf7_edx"), py::arg("osxsave"), py::arg("xcr0"), py::arg("palettes"),
     py::arg("pal1_eax"), py::arg("pal1_ebx"), py::arg("pal1_ecx"), py::arg("perm_errno"),
     "the AMX decision for given register values (tests feed synthetic CPUs)");

  py::class_<qgnn::PackedW, std::shared_ptr<qgnn::PackedW>>(m, "PackedWeights",
      "Weights repacked for the CPU kernels (64-column blocks of 4-code int32 lanes).")
      .def(py::init(&make_packed), py::arg("w_packed"), py::arg("bits"), py::arg("k"), py::arg("taps") = 1)
      .def_property_readonly("out_features", [](const qgnn::PackedW& w) { return w.O; })
      .def_property_readonly("k", [](const qgnn::PackedW& w) { return w.K; })
      .def_property_readonly("bits", [](const qgnn::PackedW& w) { return w.bits; })
      .def_property_readonly("taps", [](const qgnn::PackedW& w) { return w.taps; })
      .def_property_readonly("nbytes", [](const qgnn::PackedW& w) {
        // every layout held (the ymm copy exists on CPUs whose own path is a 256-bit one, the
        // Winograd transform on AVX-512 VNNI ones) and the sums; AMX tiles are built per
        // layer (QLayer::wamx, with its zero points)
        return w.data.size() + w.ymm.size() + w.wino.size() +
               (w.wsum.size() + w.tapsum.size() + w.wino_corr.size()) * sizeof(int32_t);
      }, "bytes the repacked weights hold: every tile layout built for this CPU, plus the code sums");

  m.def("pack", [](const py::array& codes, int bits) {
    check_bits(bits, "bits");
    check_array<uint8_t>(codes, "codes", 2);
    const int O = static_cast<int>(codes.shape(0)), K = static_cast<int>(codes.shape(1));
    const uint8_t* c = static_cast<const uint8_t*>(codes.data());
    const uint32_t lim = bits == 8 ? 256u : (1u << bits);
    for (int64_t i = 0; i < int64_t(O) * K; ++i)
      if (c[i] >= lim) throw ArgError("codes exceed the " + std::to_string(bits) + "-bit range");
    const int rb = (K + 7) / 8 * bits;
    py::array_t<uint8_t> out(std::vector<py::ssize_t>{O, rb});
    for (int o = 0; o < O; ++o) qgnn::pack_row(c + int64_t(o) * K, K, bits, out.mutable_data() + int64_t(o) * rb);
    return out;
  }, py::arg("codes"), py::arg("bits"));

  m.def("unpack", [](const py::array& packed, int bits, int K) {
    check_bits(bits, "bits");
    check_array<uint8_t>(packed, "packed", 2);
    const int rb = (K + 7) / 8 * bits;
    if (K < 0 || packed.shape(1) != rb) throw ArgError("packed rows do not hold K codes of this width");
    const int O = static_cast<int>(packed.shape(0));
    py::array_t<uint8_t> out(std::vector<py::ssize_t>{O, K});
    const uint8_t* p = static_cast<const uint8_t*>(packed.data());
    for (int o = 0; o < O; ++o) qgnn::unpack_row(p + int64_t(o) * rb, K, bits, out.mutable_data() + int64_t(o) * K);
    return out;
  }, py::arg("packed"), py::arg("bits"), py::arg("k"));

  m.def("quantize", [](const py::array& x, double l, double s, int bits, int nthreads) {
    check_bits(bits, "bits");
    if (!x.dtype().is(py::dtype::of<float>())) throw ArgError("quantize expects float32, got " + std::string(py::str(x.dtype())));
    if (!(x.flags() & py::array::c_style)) throw ArgError("x must be C-contiguous (call .contiguous() first)");
    if (reinterpret_cast<uintptr_t>(x.data()) % 4) throw ArgError("x data pointer is not aligned to 4 bytes");
    const float lf = finite(l, "l"), sf = finite(s, "s", true);
    check_threads(nthreads);
    std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
    py::array_t<uint8_t> out(shape);
    const int64_t n = x.size();
    const float* xp = static_cast<const float*>(x.data());
    uint8_t* op = out.mutable_data();
    int64_t bad;
    {
      py::gil_scoped_release nogil;
      bad = qgnn::quantize(xp, n, lf, sf, bits, op, nthreads);
    }
    if (bad) throw ArgError("quantize got NaN or Inf values");
    return out;
  }, py::arg("x"), py::arg("l"), py::arg("s"), py::arg("bits"), py::arg("nthreads") = 1);

  m.def("qlinear", [](const py::array& x, const qgnn::PackedW& w, int a_bits, const py::array& w_scale,
                      const py::array& w_offset, double a_scale, double a_offset, std::optional<py::array> post_scale,
                      std::optional<py::array> post_shift, std::optional<py::array> residual,
                      std::optional<double> slope, std::optional<double> out_l, std::optional<double> out_s,
                      std::optional<int> out_bits, int nthreads, bool want_acc) {
    check_bits(a_bits, "a_bits");
    check_array<uint8_t>(x, "x", 2);
    check_threads(nthreads);
    if (x.shape(1) != w.K || w.taps != 1)
      throw ArgError("x has K=" + std::to_string(x.shape(1)) + " but the weights hold K=" + std::to_string(w.K));
    const int64_t M = x.shape(0);
    EagerCall c;
    setup_call(c, w.O, M, {static_cast<py::ssize_t>(M), w.O}, w_scale, w_offset, a_scale, a_offset, post_scale,
               post_shift, residual, slope, out_l, out_s, out_bits, want_acc);
    int bad = 0;
    run_eager(c, w, a_bits, 0, 1, 0, 1, 1, w.K, static_cast<const uint8_t*>(x.data()), M, nthreads, want_acc, &bad);
    raise_bad_codes(bad, "x", a_bits);
    return finish(c, want_acc);
  }, py::arg("x"), py::arg("w"), py::arg("a_bits"), py::arg("w_scale"), py::arg("w_offset"), py::arg("a_scale"),
     py::arg("a_offset"), py::arg("post_scale") = py::none(), py::arg("post_shift") = py::none(),
     py::arg("residual") = py::none(), py::arg("slope") = py::none(), py::arg("out_l") = py::none(),
     py::arg("out_s") = py::none(), py::arg("out_bits") = py::none(), py::arg("nthreads") = 1,
     py::arg("want_acc") = false);

  m.def("qconv2d", [](const py::array& x, const qgnn::PackedW& w, int a_bits, int ks, int stride, int pad,
                      const py::array& w_scale, const py::array& w_offset, double a_scale, double a_offset,
                      std::optional<py::array> post_scale, std::optional<py::array> post_shift,
                      std::optional<py::array> residual, std::optional<double> slope, std::optional<double> out_l,
                      std::optional<double> out_s, std::optional<int> out_bits, int nthreads, bool want_acc) {
    check_bits(a_bits, "a_bits");
    check_array<uint8_t>(x, "x", 4);
    check_threads(nthreads);
    if (ks < 1 || ks > 15 || stride < 1 || stride > 16 || pad < 0 || pad >= ks)
      throw ArgError("bad conv geometry kernel_size=" + std::to_string(ks) + " stride=" + std::to_string(stride) +
                     " padding=" + std::to_string(pad));
    const int B = static_cast<int>(x.shape(0)), H = static_cast<int>(x.shape(1));
    const int W = static_cast<int>(x.shape(2)), C = static_cast<int>(x.shape(3));
    if (int64_t(ks) * ks * C != w.K || w.taps != ks * ks)
      throw ArgError("weights hold K=" + std::to_string(w.K) + " for " + std::to_string(w.taps) + " taps, but x has C=" +
                     std::to_string(C) + " and kernel_size=" + std::to_string(ks));
    const int Ho = (H + 2 * pad - ks) / stride + 1, Wo = (W + 2 * pad - ks) / stride + 1;
    if (H + 2 * pad < ks || W + 2 * pad < ks || Ho < 1 || Wo < 1)
      throw ArgError("input " + std::to_string(H) + "x" + std::to_string(W) + " too small for the kernel");
    const int64_t M = int64_t(B) * Ho * Wo;
    if (M >= kMaxDim) throw ArgError("conv output too large");
    EagerCall c;
    setup_call(c, w.O, M, {B, Ho, Wo, w.O}, w_scale, w_offset, a_scale, a_offset, post_scale, post_shift, residual,
               slope, out_l, out_s, out_bits, want_acc);
    int bad = 0;
    run_eager(c, w, a_bits, ks, stride, pad, H, W, C, static_cast<const uint8_t*>(x.data()), M, nthreads, want_acc, &bad);
    raise_bad_codes(bad, "x", a_bits);
    return finish(c, want_acc);
  }, py::arg("x"), py::arg("w"), py::arg("a_bits"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"),
     py::arg("w_scale"), py::arg("w_offset"), py::arg("a_scale"), py::arg("a_offset"),
     py::arg("post_scale") = py::none(), py::arg("post_shift") = py::none(), py::arg("residual") = py::none(),
     py::arg("slope") = py::none(), py::arg("out_l") = py::none(), py::arg("out_s") = py::none(),
     py::arg("out_bits") = py::none(), py::arg("nthreads") = 1, py::arg("want_acc") = false);

  m.def("qbmm", [](const py::array& a, const py::array& v, int a_bits, int v_bits, double a_scale, double a_offset,
                   double v_scale, double v_offset, int nthreads, bool want_acc, const py::object& row_bits,
                   const py::object& row_offset) -> py::object {
    check_bits(a_bits, "a_bits");
    check_bits(v_bits, "v_bits");
    check_array<uint8_t>(a, "a", 3);
    check_array<uint8_t>(v, "v", 3);
    check_threads(nthreads);
    const int T = static_cast<int>(a.shape(0)), N = static_cast<int>(a.shape(1));
    if (a.shape(2) != N || v.shape(0) != T || v.shape(1) != N)
      throw ArgError("aggregation needs a [T, N, N] and v [T, N, D], got " + shape_str(a) + " and " + shape_str(v));
    const int D = static_cast<int>(v.shape(2));
    const float sa = finite(a_scale, "a_scale", true), la = finite(a_offset, "a_offset");
    const float sv = finite(v_scale, "v_scale", true), lv = finite(v_offset, "v_offset");
    if (row_bits.is_none() != row_offset.is_none()) throw ArgError("row_bits and row_offset go together");
    const uint8_t* offp = nullptr;
    if (!row_bits.is_none()) {
      // per-node codes (ref_node_rows): checked here, before the kernel reads them
      const py::array rb = row_bits.cast<py::array>(), ro = row_offset.cast<py::array>();
      check_array<uint8_t>(rb, "row_bits", 2);
      check_array<uint8_t>(ro, "row_offset", 2);
      if (rb.shape(0) != T || rb.shape(1) != N || ro.shape(0) != T || ro.shape(1) != N)
        throw ArgError("row_bits and row_offset must be uint8 [T, N] = [" + std::to_string(T) + ", " +
                       std::to_string(N) + "], got " + shape_str(rb) + " and " + shape_str(ro));
      const uint8_t* bp = static_cast<const uint8_t*>(rb.data());
      offp = static_cast<const uint8_t*>(ro.data());
      const uint8_t* vp = static_cast<const uint8_t*>(v.data());
      for (int64_t r = 0; r < int64_t(T) * N; ++r) {
        const int b = bp[r];
        if (((b < 2 || b > 4) && b != 8) || b > v_bits)
          throw ArgError("row_bits holds a width " + std::to_string(b) + ": each must be 2, 3, 4 or 8 and <= v_bits=" +
                         std::to_string(v_bits));
        int hi = 0;
        for (int d = 0; d < D; ++d) hi = std::max<int>(hi, vp[r * D + d]);
        if (D && hi >= (1 << b)) throw ArgError("v holds a row's code >= 2^row_bits of that row");
        if (D && hi + offp[r] >= (1 << v_bits))
          throw ArgError("v + row_offset leaves the " + std::to_string(v_bits) + "-bit grid");
      }
    }
    py::array_t<float> out(std::vector<py::ssize_t>{T, N, D});
    py::array_t<int32_t> acc, as, vs;
    int32_t *accp = nullptr, *asp = nullptr, *vsp = nullptr;
    if (want_acc) {
      acc = py::array_t<int32_t>(std::vector<py::ssize_t>{T, N, D});
      as = py::array_t<int32_t>(std::vector<py::ssize_t>{T, N});
      vs = py::array_t<int32_t>(std::vector<py::ssize_t>{T, D});
      accp = acc.mutable_data();
      asp = as.mutable_data();
      vsp = vs.mutable_data();
    }
    int bad = 0;
    if (int64_t(T) * N * D > 0) {
      const uint8_t* ap = static_cast<const uint8_t*>(a.data());
      const uint8_t* vp = static_cast<const uint8_t*>(v.data());
      float* op = out.mutable_data();
      py::gil_scoped_release nogil;
      qgnn::qbmm(ap, vp, offp, T, N, D, a_bits, v_bits, sa, la, sv, lv, op, accp, asp, vsp, nthreads, &bad);
    } else if (want_acc && T * N > 0) {
      std::fill(asp, asp + int64_t(T) * N, 0);  // D == 0: row sums still defined
      const uint8_t* ap = static_cast<const uint8_t*>(a.data());
      for (int64_t i = 0; i < int64_t(T) * N; ++i)
        for (int j = 0; j < N; ++j) asp[i] += ap[i * N + j];
    }
    if (bad == 1) raise_bad_codes(1, "a", a_bits);
    if (bad == 2) raise_bad_codes(1, "v", v_bits);
    if (want_acc) return py::make_tuple(out, acc, as, vs);
    return out;
  }, py::arg("a"), py::arg("v"), py::arg("a_bits"), py::arg("v_bits"), py::arg("a_scale"), py::arg("a_offset"),
     py::arg("v_scale"), py::arg("v_offset"), py::arg("nthreads") = 1, py::arg("want_acc") = false,
     py::arg("row_bits") = py::none(), py::arg("row_offset") = py::none());

  m.def("node_rows", [](const py::array& v, const std::vector<int>& node_bits) -> py::tuple {
    check_array<uint8_t>(v, "v", 3);
    if (node_bits.size() < 2) throw ArgError("node_bits needs two widths or more");
    for (size_t i = 0; i < node_bits.size(); ++i) {
      check_bits(node_bits[i], "node_bits");
      if (i && node_bits[i] <= node_bits[i - 1]) throw ArgError("node_bits must be ascending and distinct");
    }
    const int64_t T = v.shape(0), N = v.shape(1);
    const int D = static_cast<int>(v.shape(2));
    const int top = node_bits.back();
    const uint8_t* vp = static_cast<const uint8_t*>(v.data());
    if (top < 8)
      for (int64_t i = 0; i < T * N * D; ++i)
        if (vp[i] >> top) raise_bad_codes(1, "v", top);
    py::array_t<uint8_t> q(std::vector<py::ssize_t>{T, N, D}), rb(std::vector<py::ssize_t>{T, N}),
        ro(std::vector<py::ssize_t>{T, N});
    uint8_t *qp = q.mutable_data(), *bp = rb.mutable_data(), *op = ro.mutable_data();
    {
      py::gil_scoped_release nogil;
      qgnn::node_rows(vp, T * N, D, node_bits.data(), static_cast<int>(node_bits.size()), qp, bp, op);
    }
    return py::make_tuple(q, rb, ro);
  }, py::arg("v"), py::arg("node_bits"));

  bind_plan(m);
}
