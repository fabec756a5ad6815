"""Per-layer CPU benchmarks: the cpu backend vs what a user of the same CPU would run instead.

Workloads (docs/measuring.md): for DPGN every ResNet-12 conv shape of the 32 px model at
batch 100 (3x3 C->C and 1x1 C->C at 64@32x32, 128@16x16, 256@8x8, 512@4x4) and the
graph aggregation at N = 10 and 30 with 40 tasks (:data:`CONV_SHAPES`,
:data:`AGG_SHAPES`); for EGNN the quantized layers of the model itself at the episode
batch (:func:`egnn_shapes`; :func:`layer_shapes` picks by family). Per workload, in one
process and interleaved round by round (so machine noise hits every variant alike):

* ``torch_fp32``: ``F.conv2d`` in FP32, channels_last (torch's fast CPU layout; oneDNN)
  / ``torch.bmm``, same thread count;
* ``torch_bf16``: the same under ``torch.autocast("cpu", torch.bfloat16)``, operands
  already bf16 as inside an autocast forward; only where the CPU has AMX-BF16 or
  AVX512-BF16 (else emulated, not what a user would pick);
* ``torch_int8``: a ``torch.ao`` quantized ``Conv2d`` on the onednn engine (where torch
  has it): uint8 activations, int8 per-channel symmetric weights, channels_last, uint8
  out. Not for the aggregation: torch.ao has no int8 batched matmul;
* ``onnxruntime_int8``: a one-node QLinearConv (uint8 activations, int8 symmetric
  weights -> MLAS's direct symmetric conv) / QLinearMatMul (both operands uint8 with
  zero points) graph -- codes in, codes out, like ours;
* ``onnxruntime_int8_asym``: QLinearConv with int8 weights and non-zero per-channel zero
  points (MLAS's im2col + QGEMM route); conv only, the aggregation row above is already
  asymmetric;
* ``cpu``: :func:`qgnn_deploy.backends.cpu.cpu_qconv2d` with the folded-BN + LeakyReLU
  epilogue and re-quantization fused (codes in, codes out), weights prepacked once.

Each row names the ISA it ran on (``isa``): the cpu kernels' path; for torch the oneDNN
implementation it executed (read from oneDNN's verbose log), or the BLAS it calls;
onnxruntime has no such query, so its rows name MLAS and the best int8 ISA of this CPU.
Speed-ups are ratios of p50 latencies from the same run.
"""
from __future__ import annotations

import ctypes
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConvShape:
    """A quantized conv workload: input [batch, cin, h, w] -> cout channels, k x k kernel,
    stride 1, zero padding ``pad``; ``batch`` None takes :func:`run_layer_benchmarks`'
    ``batch``. A linear layer is a 1x1 conv over [rows, K, 1, 1]. ``layers``: the model's
    layers of this shape (empty for the generic ResNet-12 shapes)."""

    name: str
    cin: int
    cout: int
    k: int
    h: int
    w: int
    pad: int
    batch: Optional[int] = None
    layers: Tuple[str, ...] = ()

    def out_hw(self) -> Tuple[int, int]:
        return self.h + 2 * self.pad - self.k + 1, self.w + 2 * self.pad - self.k + 1

    def macs(self, batch: int) -> int:
        ho, wo = self.out_hw()
        return batch * ho * wo * self.cout * self.k * self.k * self.cin

    def describe(self, batch: int) -> str:
        return f"[{batch}, {self.cin}, {self.h}, {self.w}] -> {self.cout}, {self.k}x{self.k} pad {self.pad}"


@dataclass(frozen=True)
class AggShape:
    """A graph aggregation workload: per task A [n, n] @ V [n, d] (A, V activation codes)."""

    name: str
    tasks: int
    n: int
    d: int
    layers: Tuple[str, ...] = ()

    def macs(self) -> int:
        return self.tasks * self.n * self.n * self.d

    def describe(self) -> str:
        return f"[{self.tasks}, {self.n}, {self.n}] @ [{self.tasks}, {self.n}, {self.d}]"


#: the 32 px ResNet-12's conv shapes (docs/onnx.md), at the run's batch
CONV_SHAPES = [ConvShape(f"conv{k}x{k}_{c}_{h}x{h}", c, c, k, h, h, k // 2)
               for c, h in ((64, 32), (128, 16), (256, 8), (512, 4)) for k in (3, 1)]
#: DPGN's graph aggregation at N = 10 and 30, 40 tasks
AGG_SHAPES = [AggShape(f"aggregation_N{n}_T40", 40, n, 128) for n in (10, 30)]


def egnn_shapes(config, tasks: int) -> Tuple[List[ConvShape], List[AggShape]]:
    """The quantized layers of the EGNN model of ``config`` as they run on an episode batch
    of ``tasks`` tasks: one workload per distinct shape, named after its first layer.

    Shapes are read off one forward of the FP32 model (eval mode: all T*N images in one
    encoder batch; the graph batch is T*Q query graphs, or T graphs when transductive),
    so they follow the preset's widths, image size and graph mode. Encoder convs keep
    their own padding; ``layer_last`` is a 1x1 conv over [T*N, K, 1, 1]; the graph MLPs
    are the 1x1 convs they are in the model ([G, C, M, M] edge pairs, [G, C, M, 1] nodes);
    an aggregation is [G, M, M] @ [G, M, D], as the integer engines run it (once per edge
    channel where the float model multiplies the stacked [G, 2M, M] adjacency once). The
    FP32-by-design layers (first conv, each ``conv_out``) are not integer workloads."""
    from ..models import QAggregation, QConv2d, QLinear, build_model  # noqa: PLC0415
    from ..report import default_episode  # noqa: PLC0415

    model = build_model(config.replace(bits=32, layer_bits={})).eval()
    found: Dict[tuple, List[str]] = {}

    def record(name):
        def hook(module, args, out):
            x = args[0]
            if isinstance(module, QAggregation):  # (adjacency [G, 2M, M], nodes [G, M, D])
                key = ("agg", x.shape[0], x.shape[2], args[1].shape[-1])
            elif isinstance(module, QLinear):
                key = ("conv", x.shape[1], module.out_features, 1, 1, 1, 0, x.shape[0])
            else:
                key = ("conv", x.shape[1], module.out_channels, module.kernel_size[0], x.shape[2], x.shape[3],
                       module.padding[0], x.shape[0])
            found.setdefault(key, []).append(name)
        return hook
    for name, m in model.named_modules():  # a throwaway model: its hooks are never removed
        if isinstance(m, (QConv2d, QLinear, QAggregation)) and config.bits_for(name).quantized:
            m.register_forward_hook(record(name))
    with torch.no_grad():
        model(*default_episode(config, tasks))
    convs, aggs = [], []
    for key, names in found.items():  # in forward order; eval runs each layer once per episode
        layers = tuple(names)
        if key[0] == "agg":
            aggs.append(AggShape(layers[0], *key[1:], layers=layers))
        else:
            convs.append(ConvShape(layers[0], *key[1:], layers=layers))
    return convs, aggs


def layer_shapes(config, tasks: int) -> Tuple[List[ConvShape], List[AggShape]]:
    """The per-layer workloads for a model of ``config``: DPGN the documented ResNet-12 /
    aggregation shapes (:data:`CONV_SHAPES`, :data:`AGG_SHAPES`), EGNN its own layers at
    ``tasks`` tasks (:func:`egnn_shapes`)."""
    from ..intmodel import family_of  # noqa: PLC0415

    if family_of(config).name == "egnn":
        return egnn_shapes(config, tasks)
    return CONV_SHAPES, AGG_SHAPES


#: every variant, in the order rows are reported
BACKENDS = ("torch_fp32", "torch_bf16", "torch_int8", "onnxruntime_int8", "onnxruntime_int8_asym", "cpu")
#: the baselines each row's ``speedup_vs_<name>`` compares against
SPEEDUP_BASELINES = ("torch_fp32", "torch_bf16", "torch_int8", "onnxruntime_int8")

_ORT_SETTLE_MS = 80.0


@dataclass
class _Variant:
    backend: str
    fn: Callable[[], object]
    times: List[float]
    #: extra idle time after this variant's calls: onnxruntime's intra-op workers keep
    #: spinning after Run returns (measured via /proc schedstat: one full core for ~45 ms
    #: after a 512@4x4 QLinearConv), longer than ``gap_ms``; without it the next variant
    #: in the round (the cpu kernels) ran on one core instead of two.
    settle_ms: float = 0.0
    isa: str = ""


def _percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


# ------------------------------------------------------------------ which ISA a row ran on

def cpu_flags() -> set:
    """This CPU's feature flags as Linux names them (empty where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_native_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: bf16 matmuls in hardware rather than emulated in fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def onednn_implementation(fn: Callable[[], object]) -> Optional[str]:
    """The oneDNN implementation ``fn``'s compute primitive ran (e.g.
    ``brg_conv_fwd:avx512_core_vnni``), from one call under ``ONEDNN_VERBOSE``; None when
    it ran no oneDNN primitive. oneDNN prints with C stdio, so fd 1 is captured."""
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile() as log:
        libc.fflush(None)
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
    # onednn_verbose,v1,primitive,exec,cpu,<kind>,<implementation>,...
    impls = [ln.split(",") for ln in lines if ",primitive,exec,cpu," in ln]
    impls = [f[6] for f in impls if len(f) > 6 and f[5] != "reorder"]
    return impls[-1] if impls else None


def _torch_isa(fn: Callable[[], object]) -> str:
    impl = onednn_implementation(fn)
    if impl:
        return f"onednn {impl}"
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return f"{blas.group(1) if blas else 'blas'} (its own dispatch)"


def _mlas_isa() -> str:
    """MLAS (onnxruntime's kernels) picks its int8 kernels by CPUID and cannot be asked
    which: the label names the best int8 ISA this CPU offers it."""
    from ..backends import cpu as cpu_backend  # noqa: PLC0415

    best = "amx" if not cpu_backend.amx_probe()["blocker"] else next(
        (i for i in ("avx512vnni", "avxvnni", "avx2") if i in cpu_backend.available_isas()), "sse")
    return f"mlas, cpu has {best}"


# ------------------------------------------------------------------ onnxruntime graphs

def _ort_session(model, threads: int):
    import onnxruntime as ort  # noqa: PLC0415

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ort_qlinearconv(x_u8_nchw: np.ndarray, w_i8: np.ndarray, w_zero: np.ndarray, pad: int, threads: int):
    """One QLinearConv node, uint8 activations x int8 per-channel weights (zero points
    ``w_zero``) -> uint8."""
    from onnx import TensorProto, helper  # noqa: PLC0415

    o = w_i8.shape[0]
    inits = [
        helper.make_tensor("xs", TensorProto.FLOAT, [], [0.05]),
        helper.make_tensor("xz", TensorProto.UINT8, [], [3]),
        helper.make_tensor("w", TensorProto.INT8, list(w_i8.shape), w_i8.flatten().tolist()),
        helper.make_tensor("ws", TensorProto.FLOAT, [o], [0.01] * o),
        helper.make_tensor("wz", TensorProto.INT8, [o], w_zero.tolist()),
        helper.make_tensor("ys", TensorProto.FLOAT, [], [0.2]),
        helper.make_tensor("yz", TensorProto.UINT8, [], [8]),
    ]
    k = w_i8.shape[2]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"],
                            kernel_shape=[k, k], pads=[pad] * 4, strides=[1, 1])
    graph = helper.make_graph([node], "qconv", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x_u8_nchw.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    sess = _ort_session(model, threads)
    feed = {"x": x_u8_nchw}
    return lambda: sess.run(None, feed)


def _ort_qlinearmatmul(a_u8: np.ndarray, v_u8: np.ndarray, threads: int):
    """One QLinearMatMul node (batched, both operands uint8 activations) -> uint8."""
    from onnx import TensorProto, helper  # noqa: PLC0415

    inits = [
        helper.make_tensor("as", TensorProto.FLOAT, [], [0.01]),
        helper.make_tensor("az", TensorProto.UINT8, [], [0]),
        helper.make_tensor("vs", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("vz", TensorProto.UINT8, [], [2]),
        helper.make_tensor("ys", TensorProto.FLOAT, [], [0.2]),
        helper.make_tensor("yz", TensorProto.UINT8, [], [8]),
    ]
    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "v", "vs", "vz", "ys", "yz"], ["y"])
    graph = helper.make_graph(
        [node], "qbmm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, list(a_u8.shape)),
         helper.make_tensor_value_info("v", TensorProto.UINT8, list(v_u8.shape))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    sess = _ort_session(model, threads)
    feed = {"a": a_u8, "v": v_u8}
    return lambda: sess.run(None, feed)


# ------------------------------------------------------------------ torch baselines

def _torch_int8_conv(x_codes_nhwc: torch.Tensor, w_centred: torch.Tensor, pad: int):
    """torch.ao quantized Conv2d on the onednn engine: uint8 activations (the codes, zero
    point 3), int8 per-channel symmetric weights ``w_centred`` [O, C, k, k], uint8 out."""
    import torch.ao.nn.quantized as nnq  # noqa: PLC0415

    o, c, k, _ = w_centred.shape
    with warnings.catch_warnings():  # quantized tensor constructors warn of their deprecation
        warnings.simplefilter("ignore")
        xq = torch._make_per_tensor_quantized_tensor(x_codes_nhwc.permute(0, 3, 1, 2), 0.05, 3)
        xq = xq.contiguous(memory_format=torch.channels_last)
        wq = torch._make_per_channel_quantized_tensor(w_centred, torch.full((o,), 0.01, dtype=torch.float64),
                                                      torch.zeros(o, dtype=torch.int64), 0)
        conv = nnq.Conv2d(c, o, k, padding=pad, bias=False)
        conv.set_weight_bias(wq, None)
    conv.scale, conv.zero_point = 0.2, 8
    return lambda: conv(xq)


def _autocast_bf16(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.autocast("cpu", torch.bfloat16):
            return fn()
    return run


# ------------------------------------------------------------------ variants per workload

def _cpu_variants(run: Callable[[], object], cpu_isas: Optional[Sequence[str]]) -> List[_Variant]:
    """``cpu`` on the active ISA path, or with ``cpu_isas`` one ``cpu:<isa>`` per path forced."""
    from ..backends import cpu as cpu_backend  # noqa: PLC0415

    if not cpu_isas:
        return [_Variant("cpu", run, [])]

    def forced(isa):
        def call():
            cpu_backend.force_isa(isa)
            return run()
        return call
    return [_Variant(f"cpu:{isa}", forced(isa), [], isa=isa) for isa in cpu_isas]


def _conv_variants(shape: ConvShape, bits: int, batch: int, threads: int,
                   backends: Sequence[str], cpu_isas: Optional[Sequence[str]]) -> List[_Variant]:
    from ..backends import cpu as cpu_backend  # noqa: PLC0415
    from ..ops.packing import pack_codes  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    cin, cout, k, pad = shape.cin, shape.cout, shape.k, shape.pad
    qmax = 2 ** bits - 1
    x_codes = torch.randint(0, qmax + 1, (batch, shape.h, shape.w, cin), dtype=torch.uint8, generator=g)
    w_codes = torch.randint(0, qmax + 1, (cout, k * k * cin), dtype=torch.uint8, generator=g)
    # the codes centred into int8 [O, C, k, k] (symmetric around the code range's middle)
    w_centred = (w_codes.view(cout, k, k, cin).permute(0, 3, 1, 2).to(torch.int16) - (qmax + 1) // 2).to(torch.int8)
    out: List[_Variant] = []
    if "torch_fp32" in backends or "torch_bf16" in backends:
        xf = torch.randn(batch, cin, shape.h, shape.w, generator=g).contiguous(memory_format=torch.channels_last)
        wf = torch.randn(cout, cin, k, k, generator=g).contiguous(memory_format=torch.channels_last)
        if "torch_fp32" in backends:
            out.append(_Variant("torch_fp32", lambda: F.conv2d(xf, wf, padding=pad), []))
        if "torch_bf16" in backends and has_native_bf16():
            xb, wb = xf.bfloat16(), wf.bfloat16()
            out.append(_Variant("torch_bf16", _autocast_bf16(lambda: F.conv2d(xb, wb, padding=pad)), []))
    if "torch_int8" in backends and torch.backends.quantized.engine == "onednn":
        out.append(_Variant("torch_int8", _torch_int8_conv(x_codes, w_centred, pad), []))
    x_nchw = np.ascontiguousarray(x_codes.permute(0, 3, 1, 2).numpy())
    w_i8 = np.ascontiguousarray(w_centred.numpy())
    if "onnxruntime_int8" in backends:
        out.append(_Variant("onnxruntime_int8", _ort_qlinearconv(x_nchw, w_i8, np.zeros(cout, np.int8), pad, threads),
                            [], _ORT_SETTLE_MS, _mlas_isa()))
    if "onnxruntime_int8_asym" in backends:
        w_zero = (np.arange(cout) % 3 + 1).astype(np.int8)  # non-zero: MLAS leaves its symmetric path
        out.append(_Variant("onnxruntime_int8_asym", _ort_qlinearconv(x_nchw, w_i8, w_zero, pad, threads),
                            [], _ORT_SETTLE_MS, _mlas_isa()))
    if "cpu" in backends:
        wp = cpu_backend.cpu_prepack(pack_codes(w_codes, bits), bits, k * k * cin, k * k)
        ws = torch.full((cout,), 0.01)
        wo = torch.full((cout,), -0.07)
        ps, sh = torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g)

        def run_cpu():
            return cpu_backend.cpu_qconv2d(x_codes, wp, bits, bits, k, 1, pad, ws, wo, 0.05, -0.1,
                                           post_scale=ps, post_shift=sh, slope=0.1, out_l=-1.0,
                                           out_s=0.1, out_bits=bits)
        out += _cpu_variants(run_cpu, cpu_isas)
    return out


def _agg_variants(shape: AggShape, bits: int, threads: int, backends: Sequence[str],
                  cpu_isas: Optional[Sequence[str]]) -> List[_Variant]:
    from ..backends import cpu as cpu_backend  # noqa: PLC0415

    g = torch.Generator().manual_seed(1)
    qmax = 2 ** bits - 1
    tasks, n, d = shape.tasks, shape.n, shape.d
    a = torch.randint(0, qmax + 1, (tasks, n, n), dtype=torch.uint8, generator=g)
    v = torch.randint(0, qmax + 1, (tasks, n, d), dtype=torch.uint8, generator=g)
    out: List[_Variant] = []
    af, vf = torch.rand(tasks, n, n, generator=g), torch.randn(tasks, n, d, generator=g)
    if "torch_fp32" in backends:
        out.append(_Variant("torch_fp32", lambda: torch.bmm(af, vf), []))
    if "torch_bf16" in backends and has_native_bf16():
        ab, vb = af.bfloat16(), vf.bfloat16()
        out.append(_Variant("torch_bf16", _autocast_bf16(lambda: torch.bmm(ab, vb)), []))
    if "onnxruntime_int8" in backends:
        out.append(_Variant("onnxruntime_int8", _ort_qlinearmatmul(a.numpy(), v.numpy(), threads), [],
                            _ORT_SETTLE_MS, _mlas_isa()))
    if "cpu" in backends:
        out += _cpu_variants(lambda: cpu_backend.cpu_qbmm(a, v, bits, bits, 0.01, 0.0, 0.1, -0.2), cpu_isas)
    return out


def _label(variants: List[_Variant]) -> None:
    """Fill in each variant's ``isa`` (after its warm-up: oneDNN logs the call it runs)."""
    from ..backends import cpu as cpu_backend  # noqa: PLC0415

    for v in variants:
        if v.isa:
            continue
        v.isa = cpu_backend.active_isa() if v.backend == "cpu" else _torch_isa(v.fn)


def _measure(variants: List[_Variant], repeats: int, warmup: int, gap_ms: float = 0.0, burst: int = 5,
             preroll_ms: float = 10.0) -> None:
    """``repeats`` timed calls per variant, interleaved in rounds of ``burst`` back-to-back calls.

    A round runs each variant ``burst`` times in a row, every call timed: the steady
    state of a layer inside a forward pass. Before its burst each variant runs untimed
    for ``preroll_ms`` (at least one call): a core left idle loses its L2 contents and
    clock, and the idle time before a variant differs (onnxruntime's workers spin ~45 ms
    after a run, so whatever follows it starts cold). Measured on the development VM:
    1x1 256@8 took 1.97 ms after a 5 ms sleep and 1.06 ms back to back, on one thread as
    on two, and calls after a long idle ramped from ~3.5 ms down over 3-4 calls.
    ``gap_ms`` of idle time precede each round so the previous variant's spinning
    threads have stopped.
    """
    burst = max(1, burst)
    for v in variants:
        for _ in range(warmup):
            v.fn()
    done = 0
    while done < repeats:
        n = min(burst, repeats - done)
        for v in variants:
            if gap_ms:
                # let the previous variant's thread pool stop spinning (onnxruntime and
                # libgomp spin-wait after a run), so it does not steal this one's cores
                time.sleep(gap_ms / 1e3)
            t_end = time.perf_counter() + preroll_ms / 1e3
            v.fn()
            while time.perf_counter() < t_end:
                v.fn()
            for _ in range(n):
                t0 = time.perf_counter()
                v.fn()
                v.times.append((time.perf_counter() - t0) * 1e3)
            if v.settle_ms:
                time.sleep(v.settle_ms / 1e3)
        done += n


def run_layer_benchmarks(bits: Sequence[int] = (4, 2), threads: Optional[int] = None, repeats: int = 20,
                         warmup: int = 3, batch: int = 100, backends: Sequence[str] = BACKENDS,
                         workloads: Optional[Sequence[str]] = None, gap_ms: float = 20.0,
                         burst: int = 5, cpu_isas: Optional[Sequence[str]] = None,
                         conv_shapes: Sequence[ConvShape] = CONV_SHAPES,
                         agg_shapes: Sequence[AggShape] = AGG_SHAPES) -> List[Dict]:
    """Time every per-layer workload of ``conv_shapes`` and ``agg_shapes`` (default: the
    ResNet-12 / DPGN ones; a model's own from :func:`layer_shapes`); returns one dict per
    (workload, backend).

    Keys: ``workload`` (name plus ``_w{b}a{b}``), ``backend``, ``isa`` (what it ran on, see
    the module docstring), ``bits``, ``threads``, ``shape`` (the operands, in words),
    ``layers`` (the model's layers of that shape, where the shapes are a model's),
    ``p50_ms``, ``p90_ms``, ``gmacs`` and
    ``speedup_vs_{torch_fp32,torch_bf16,torch_int8,onnxruntime_int8}`` (ratios of p50s;
    None where that baseline did not run). ``threads`` defaults to
    ``torch.get_num_threads()``; torch, onnxruntime and the cpu kernels all get the same
    count for the duration of the call. ``gap_ms`` of idle time precede every variant's
    round: onnxruntime's and torch's (libgomp) worker threads spin-wait after a run, and
    without the gap they occupy the cores while the next variant in the round runs
    (measured: up to 6x slower short kernels, whichever came after onnxruntime). Calls
    come in rounds of ``burst`` back-to-back calls per variant (see :func:`_measure`).
    ``cpu_isas`` (e.g. ``("avx2", "avxvnni", "avx512vnni")``) times the cpu kernels once per
    ISA path, as backends ``cpu:<isa>``, instead of once on the active path.
    """
    from ..backends import cpu as cpu_backend  # noqa: PLC0415
    from ..errors import BackendUnavailableError, ConfigError  # noqa: PLC0415

    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ConfigError(f"unknown layer-benchmark variants {unknown}; choose from {list(BACKENDS)}")
    for isa in cpu_isas or ():
        why = cpu_backend.isa_blocker(isa)  # KernelArgumentError for an unknown name
        if why:
            raise BackendUnavailableError(f"cpu_isas: {isa} cannot run here: {why}; this CPU runs "
                                          f"{', '.join(cpu_backend.available_isas())}")
    threads = threads or torch.get_num_threads()
    old_torch, old_cpu = torch.get_num_threads(), cpu_backend._threads_override
    old_engine = torch.backends.quantized.engine
    torch.set_num_threads(threads)
    cpu_backend.set_num_threads(threads)
    if "onednn" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "onednn"
    results: List[Dict] = []
    try:
        for b in bits:
            jobs = [(sh, lambda sh=sh, n=sh.batch or batch: _conv_variants(sh, b, n, threads, backends, cpu_isas),
                     sh.macs(sh.batch or batch), sh.describe(sh.batch or batch)) for sh in conv_shapes]
            jobs += [(sh, lambda sh=sh: _agg_variants(sh, b, threads, backends, cpu_isas), sh.macs(), sh.describe())
                     for sh in agg_shapes]
            for shape, make, macs, described in jobs:
                if workloads and shape.name not in workloads:
                    continue
                variants = make()
                _measure(variants, repeats, warmup, gap_ms, burst)
                _label(variants)
                p50 = {v.backend: _percentile(v.times, 50) for v in variants}
                for v in variants:
                    row = {"workload": f"{shape.name}_w{b}a{b}", "backend": v.backend, "isa": v.isa, "bits": b,
                           "threads": threads, "shape": described, "p50_ms": p50[v.backend],
                           "p90_ms": _percentile(v.times, 90), "gmacs": macs / (p50[v.backend] * 1e6)}
                    if shape.layers:
                        row["layers"] = list(shape.layers)
                    for base in SPEEDUP_BASELINES:
                        row[f"speedup_vs_{base}"] = p50[base] / p50[v.backend] if base in p50 else None
                    results.append(row)
    finally:
        torch.set_num_threads(old_torch)
        cpu_backend.set_num_threads(old_cpu)
        torch.backends.quantized.engine = old_engine
        if cpu_isas:
            cpu_backend.force_isa(None)
    return results


def format_table(results: List[Dict]) -> str:
    """Markdown table of :func:`run_layer_benchmarks` results."""
    lines = ["| workload | backend | isa | p50 ms | p90 ms | GMAC/s | vs torch FP32 | vs torch bf16 | "
             "vs torch int8 | vs ORT int8 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in results:
        lines.append(f"| {r['workload']} | {r['backend']} | {r['isa']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['gmacs']:.0f} | {f(r['speedup_vs_torch_fp32'])} | {f(r['speedup_vs_torch_bf16'])} | "
                     f"{f(r['speedup_vs_torch_int8'])} | {f(r['speedup_vs_onnxruntime_int8'])} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse  # noqa: PLC0415
    import json  # noqa: PLC0415

    p = argparse.ArgumentParser(description="per-layer CPU kernel benchmarks")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workloads", nargs="*", default=None)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--cpu-isas", nargs="+", default=None, help="time the cpu kernels on each of these ISA paths")
    p.add_argument("--gap-ms", type=float, default=20.0)
    p.add_argument("--burst", type=int, default=5, help="back-to-back calls per variant and round")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = run_layer_benchmarks(tuple(a.bits), a.threads, a.repeats, a.warmup, backends=a.backends,
                               workloads=a.workloads, gap_ms=a.gap_ms, burst=a.burst, cpu_isas=a.cpu_isas)
    print(json.dumps(res, indent=1) if a.json else format_table(res))


if __name__ == "__main__":
    main()
