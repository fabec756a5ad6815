"""Per-layer CPU benchmarks: the cpu backend vs torch FP32 and onnxruntime int8.

Workloads (DESIGN.md section 6): every ResNet-12 conv shape of the 32 px model at
batch 100 (3x3 C->C and 1x1 C->C at 64@32x32, 128@16x16, 256@8x8, 512@4x4) and the
graph aggregation at N = 10 and 30 with 40 tasks. Per workload, in one process and
interleaved round by round (so machine noise hits every variant alike):

* ``torch_fp32``: ``F.conv2d`` / ``torch.bmm`` in FP32, NCHW, same thread count;
* ``onnxruntime_int8``: a one-node QLinearConv / QLinearMatMul graph (uint8 activations,
  int8 weights, uint8 output) -- codes in, codes out, like ours;
* ``cpu``: :func:`qgnn_deploy.backends.cpu.cpu_qconv2d` with the folded-BN + LeakyReLU
  epilogue and re-quantization fused (codes in, codes out), weights prepacked once.

Speed-ups are ratios of p50 latencies from the same run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: (name, C_in, C_out, kernel, H) of the 32 px ResNet-12 (REFERENCE.md section 4)
CONV_SHAPES = [
    ("conv3x3_64_32x32", 64, 64, 3, 32),
    ("conv1x1_64_32x32", 64, 64, 1, 32),
    ("conv3x3_128_16x16", 128, 128, 3, 16),
    ("conv1x1_128_16x16", 128, 128, 1, 16),
    ("conv3x3_256_8x8", 256, 256, 3, 8),
    ("conv1x1_256_8x8", 256, 256, 1, 8),
    ("conv3x3_512_4x4", 512, 512, 3, 4),
    ("conv1x1_512_4x4", 512, 512, 1, 4),
]
#: (name, tasks, N, D) of the graph aggregation
AGG_SHAPES = [("aggregation_N10_T40", 40, 10, 128), ("aggregation_N30_T40", 40, 30, 128)]


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


def _percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def _ort_session(model, threads: int):
    import onnxruntime as ort  # noqa: PLC0415

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ort_qlinearconv(x_u8_nchw: np.ndarray, w_i8: np.ndarray, pad: int, threads: int):
    """One QLinearConv node, uint8 activations x int8 per-channel weights -> uint8."""
    from onnx import TensorProto, helper  # noqa: PLC0415

    o = w_i8.shape[0]
    inits = [
        helper.make_tensor("xs", TensorProto.FLOAT, [], [0.05]),
        helper.make_tensor("xz", TensorProto.UINT8, [], [3]),
        helper.make_tensor("w", TensorProto.INT8, list(w_i8.shape), w_i8.flatten().tolist()),
        helper.make_tensor("ws", TensorProto.FLOAT, [o], [0.01] * o),
        helper.make_tensor("wz", TensorProto.INT8, [o], [0] * o),
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


def _conv_variants(cin: int, cout: int, k: int, h: int, bits: int, batch: int, threads: int,
                   backends: Sequence[str]) -> List[_Variant]:
    from ..backends import cpu as cpu_backend  # noqa: PLC0415
    from ..ops.packing import pack_codes  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    pad = k // 2
    qmax = 2 ** bits - 1
    x_codes = torch.randint(0, qmax + 1, (batch, h, h, cin), dtype=torch.uint8, generator=g)
    w_codes = torch.randint(0, qmax + 1, (cout, k * k * cin), dtype=torch.uint8, generator=g)
    out: List[_Variant] = []
    if "torch_fp32" in backends:
        xf = torch.randn(batch, cin, h, h, generator=g)
        wf = torch.randn(cout, cin, k, k, generator=g)
        out.append(_Variant("torch_fp32", lambda: F.conv2d(xf, wf, padding=pad), []))
    if "onnxruntime_int8" in backends:
        x_nchw = np.ascontiguousarray(x_codes.permute(0, 3, 1, 2).numpy())
        w_i8 = (w_codes.view(cout, k, k, cin).permute(0, 3, 1, 2).to(torch.int16) - (qmax + 1) // 2)
        w_i8 = np.ascontiguousarray(w_i8.to(torch.int8).numpy())
        out.append(_Variant("onnxruntime_int8", _ort_qlinearconv(x_nchw, w_i8, pad, threads), [], _ORT_SETTLE_MS))
    if "cpu" in backends:
        wp = cpu_backend.cpu_prepack(pack_codes(w_codes, bits), bits, k * k * cin, k * k)
        ws = torch.full((cout,), 0.01)
        wo = torch.full((cout,), -0.07)
        ps, sh = torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g)

        def run_cpu():
            return cpu_backend.cpu_qconv2d(x_codes, wp, bits, bits, k, 1, pad, ws, wo, 0.05, -0.1,
                                           post_scale=ps, post_shift=sh, slope=0.1, out_l=-1.0,
                                           out_s=0.1, out_bits=bits)
        out.append(_Variant("cpu", run_cpu, []))
    return out


def _agg_variants(tasks: int, n: int, d: int, bits: int, threads: int, backends: Sequence[str]) -> List[_Variant]:
    from ..backends import cpu as cpu_backend  # noqa: PLC0415

    g = torch.Generator().manual_seed(1)
    qmax = 2 ** bits - 1
    a = torch.randint(0, qmax + 1, (tasks, n, n), dtype=torch.uint8, generator=g)
    v = torch.randint(0, qmax + 1, (tasks, n, d), dtype=torch.uint8, generator=g)
    out: List[_Variant] = []
    if "torch_fp32" in backends:
        af, vf = torch.rand(tasks, n, n, generator=g), torch.randn(tasks, n, d, generator=g)
        out.append(_Variant("torch_fp32", lambda: torch.bmm(af, vf), []))
    if "onnxruntime_int8" in backends:
        out.append(_Variant("onnxruntime_int8", _ort_qlinearmatmul(a.numpy(), v.numpy(), threads), [],
                            _ORT_SETTLE_MS))
    if "cpu" in backends:
        out.append(_Variant("cpu", lambda: cpu_backend.cpu_qbmm(a, v, bits, bits, 0.01, 0.0, 0.1, -0.2), []))
    return out


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
                         warmup: int = 3, batch: int = 100,
                         backends: Sequence[str] = ("torch_fp32", "onnxruntime_int8", "cpu"),
                         workloads: Optional[Sequence[str]] = None, gap_ms: float = 20.0,
                         burst: int = 5) -> List[Dict]:
    """Time every per-layer workload; returns one dict per (workload, backend).

    Keys: ``workload`` (name plus ``_w{b}a{b}``), ``backend``, ``bits``, ``threads``,
    ``p50_ms``, ``p90_ms``, ``speedup_vs_torch_fp32``, ``speedup_vs_onnxruntime_int8``
    (ratios of p50s; None where that baseline was not run), ``gmacs``.
    ``threads`` defaults to ``torch.get_num_threads()``; torch, onnxruntime and the cpu
    kernels all get the same count for the duration of the call. ``gap_ms`` of idle time
    precede every variant's round: onnxruntime's and torch's (libgomp) worker threads
    spin-wait after a run, and without the gap they occupy the cores while the next
    variant in the round runs (measured: up to 6x slower short kernels, whichever came
    after onnxruntime). Calls come in rounds of ``burst`` back-to-back calls per variant
    (see :func:`_measure`).
    """
    from ..backends import cpu as cpu_backend  # noqa: PLC0415

    threads = threads or torch.get_num_threads()
    old_torch, old_cpu = torch.get_num_threads(), cpu_backend._threads_override
    torch.set_num_threads(threads)
    cpu_backend.set_num_threads(threads)
    results: List[Dict] = []
    try:
        for b in bits:
            jobs = [(name, lambda c=c, o=o, k=k, h=h: _conv_variants(c, o, k, h, b, batch, threads, backends),
                     batch * h * h * o * k * k * c) for name, c, o, k, h in CONV_SHAPES]
            jobs += [(name, lambda t=t, n=n, d=d: _agg_variants(t, n, d, b, threads, backends), t * n * n * d)
                     for name, t, n, d in AGG_SHAPES]
            for name, make, macs in jobs:
                if workloads and name not in workloads:
                    continue
                variants = make()
                _measure(variants, repeats, warmup, gap_ms, burst)
                p50 = {v.backend: _percentile(v.times, 50) for v in variants}
                for v in variants:
                    results.append({
                        "workload": f"{name}_w{b}a{b}", "backend": v.backend, "bits": b, "threads": threads,
                        "p50_ms": p50[v.backend], "p90_ms": _percentile(v.times, 90),
                        "speedup_vs_torch_fp32": (p50["torch_fp32"] / p50[v.backend]) if "torch_fp32" in p50 else None,
                        "speedup_vs_onnxruntime_int8": (p50["onnxruntime_int8"] / p50[v.backend])
                        if "onnxruntime_int8" in p50 else None,
                        "gmacs": macs / (p50[v.backend] * 1e6),
                    })
    finally:
        torch.set_num_threads(old_torch)
        cpu_backend.set_num_threads(old_cpu)
    return results


def format_table(results: List[Dict]) -> str:
    """Markdown table of :func:`run_layer_benchmarks` results."""
    lines = ["| workload | backend | p50 ms | p90 ms | GMAC/s | vs torch FP32 | vs ORT int8 |",
             "|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in results:
        lines.append(f"| {r['workload']} | {r['backend']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['gmacs']:.0f} | {f(r['speedup_vs_torch_fp32'])} | {f(r['speedup_vs_onnxruntime_int8'])} |")
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
    p.add_argument("--gap-ms", type=float, default=20.0)
    p.add_argument("--burst", type=int, default=5, help="back-to-back calls per variant and round")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = run_layer_benchmarks(tuple(a.bits), a.threads, a.repeats, a.warmup, workloads=a.workloads,
                               gap_ms=a.gap_ms, burst=a.burst)
    print(json.dumps(res, indent=1) if a.json else format_table(res))


if __name__ == "__main__":
    main()
