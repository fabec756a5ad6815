"""GPU benchmark of the Triton packed-int kernels vs torch FP32 / FP16 (cuDNN).

Workloads (docs/measuring.md): every ResNet-12 conv shape of the 32 px backbone at
batch 100 (NHWC codes in, codes out, fused BN + LeakyReLU epilogue), W2/3/4 A4; the
graph aggregation at N = 10 and 30 with 40 and 100 tasks. Timing: triton.testing.do_bench
(median and p90 over repeated runs, L2 flushed between runs). Baselines: torch conv2d /
bmm in FP32 and FP16, channels_last, cuDNN autotuning on.

Run:  python bench/bench_triton.py [--json]      (or pytest bench/bench_triton.py)
Without CUDA everything here skips: the interpreter is not a performance target.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs CUDA")

#: (name, C_in, C_out, kernel, stride, pad, H) at 32 px input; batch 100
RESNET12_CONVS = []
for _i, (_cin, _p, _h) in enumerate([(64, 64, 32), (64, 128, 16), (128, 256, 8), (256, 512, 4)]):
    RESNET12_CONVS += [
        (f"b{_i + 1}.conv1 1x1", _cin, _p, 1, 1, 0, _h),
        (f"b{_i + 1}.conv2 3x3", _p, _p, 3, 1, 1, _h),
        (f"b{_i + 1}.conv3 1x1", _p, _p, 1, 1, 0, _h),
        (f"b{_i + 1}.shortcut 1x1", _cin, _p, 1, 1, 0, _h),
    ]
AGGREGATIONS = [(40, 10), (40, 30), (100, 10), (100, 30)]  # (tasks, N), D = 128
INT8_PEAK_TOPS = {"H200": 1979.0, "H100": 1979.0, "A100": 624.0}  # dense int8 tensor-core peaks


def _bench(fn):
    import triton.testing
    ms = triton.testing.do_bench(fn, quantiles=(0.5, 0.9), warmup=25, rep=200)
    return ms[0], ms[1]


def _peak():
    name = torch.cuda.get_device_name()
    return next((v for k, v in INT8_PEAK_TOPS.items() if k in name), None)


def bench_conv(name, cin, cout, k, stride, pad, h, bits, batch=100):
    from qgnn_deploy.backends import triton as tb
    from qgnn_deploy.ops.packing import pack_codes

    dev = "cuda"
    x = torch.randint(0, 16, (batch, h, h, cin), dtype=torch.uint8, device=dev)
    w = torch.randint(0, 2 ** bits, (cout, k * k * cin), dtype=torch.uint8)
    wp = tb.prepare_weight(pack_codes(w, bits).to(dev), bits, k * k * cin, k * k)
    ws = torch.rand(cout, device=dev) * 0.05 + 0.01
    wo = -torch.rand(cout, device=dev) * 0.1
    ps, psh = torch.rand(cout, device=dev) + 0.5, torch.randn(cout, device=dev)
    q = lambda: tb.triton_qconv2d(x, wp, bits, 4, k, stride, pad, ws, wo, 0.1, -0.5,  # noqa: E731
                                  ps, psh, None, 0.2, -1.0, 0.1, 4)
    xf = torch.randn(batch, cin, h, h, device=dev).to(memory_format=torch.channels_last)
    wf = torch.randn(cout, cin, k, k, device=dev).to(memory_format=torch.channels_last)
    f32 = lambda: torch.nn.functional.conv2d(xf, wf, None, stride, pad)  # noqa: E731
    xh, wh = xf.half(), wf.half()
    f16 = lambda: torch.nn.functional.conv2d(xh, wh, None, stride, pad)  # noqa: E731
    ho = (h + 2 * pad - k) // stride + 1
    macs = batch * ho * ho * cout * k * k * cin
    return _row(f"conv {name} {cin}->{cout} {h}x{h} W{bits}A4", macs, q, f32, f16)


def bench_agg(tasks, n, bits=4, d=128):
    from qgnn_deploy.backends import triton as tb

    dev = "cuda"
    a = torch.randint(0, 2 ** bits, (tasks, n, n), dtype=torch.uint8, device=dev)
    v = torch.randint(0, 2 ** bits, (tasks, n, d), dtype=torch.uint8, device=dev)
    q = lambda: tb.triton_qbmm(a, v, bits, bits, 0.01, 0.0, 0.1, -0.7)  # noqa: E731
    af, vf = torch.rand(tasks, n, n, device=dev), torch.randn(tasks, n, d, device=dev)
    f32 = lambda: torch.bmm(af, vf)  # noqa: E731
    ah, vh = af.half(), vf.half()
    f16 = lambda: torch.bmm(ah, vh)  # noqa: E731
    return _row(f"aggregation T={tasks} N={n} D={d} A{bits}V{bits}", tasks * n * n * d, q, f32, f16)


def _row(workload, macs, q, f32, f16):
    q()  # autotune outside the timed region
    torch.backends.cudnn.benchmark = True
    res = {"workload": workload, "macs": macs}
    for tag, fn in (("triton_int", q), ("torch_fp32", f32), ("torch_fp16", f16)):
        p50, p90 = _bench(fn)
        res[f"{tag}_p50_ms"], res[f"{tag}_p90_ms"] = p50, p90
    res["speedup_vs_fp32"] = res["torch_fp32_p50_ms"] / res["triton_int_p50_ms"]
    res["speedup_vs_fp16"] = res["torch_fp16_p50_ms"] / res["triton_int_p50_ms"]
    tops = 2 * macs / (res["triton_int_p50_ms"] * 1e-3) / 1e12
    res["triton_int_tops"] = tops
    peak = _peak()
    res["int8_roofline_fraction"] = tops / peak if peak else None
    return res


# ---------------------------------------------------------------- pytest entry points

@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", RESNET12_CONVS, ids=[s[0] for s in RESNET12_CONVS])
def test_bench_conv(shape, bits):
    print(json.dumps(bench_conv(*shape, bits)))


@pytest.mark.parametrize("tasks,n", AGGREGATIONS)
def test_bench_aggregation(tasks, n):
    print(json.dumps(bench_agg(tasks, n)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    args = ap.parse_args(argv)
    if not HAS_CUDA:
        print("no CUDA device: the Triton GPU benchmark needs a GPU", file=sys.stderr)
        return 0 if not args.json else (print(json.dumps({"device": None, "results": []})) or 0)
    rows = [bench_conv(*s, b) for b in args.bits for s in RESNET12_CONVS]
    rows += [bench_agg(t, n) for t, n in AGGREGATIONS]
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(), "results": rows}))
    else:
        print(f"{'workload':58s} {'int p50':>9s} {'fp32':>9s} {'fp16':>9s} {'x fp16':>7s} {'TOPS':>7s}")
        for r in rows:
            print(f"{r['workload']:58s} {r['triton_int_p50_ms']:9.4f} {r['torch_fp32_p50_ms']:9.4f} "
                  f"{r['torch_fp16_p50_ms']:9.4f} {r['speedup_vs_fp16']:7.2f} {r['triton_int_tops']:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
