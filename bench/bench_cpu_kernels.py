"""pytest-benchmark suite for the cpu backend's packed-int kernels.

    pytest bench/bench_cpu_kernels.py --benchmark-only

Pedantic mode (fixed rounds, warm-up), p90 in ``extra_info``; a few ResNet-12 shapes
at batch 100 and the aggregation at N = 30, 40 tasks. The cross-backend numbers
(torch FP32, onnxruntime int8) come from ``qgnn_deploy.benchmarks.layers`` /
``qgnn-deploy bench --layers``.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from qgnn_deploy.ops.packing import pack_codes

cpu = pytest.importorskip("qgnn_deploy.backends.cpu")
if not cpu.is_available():  # pragma: no cover
    pytest.skip("qgnn_deploy._C not built (pip install -e .)", allow_module_level=True)

ROUNDS, WARMUP = 20, 3
CONVS = [("3x3_64_32x32", 64, 3, 32), ("1x1_64_32x32", 64, 1, 32), ("3x3_256_8x8", 256, 3, 8),
         ("3x3_512_4x4", 512, 3, 4)]


def _pedantic(benchmark, fn, macs):
    times = []

    def timed():
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    t = np.asarray(times[-ROUNDS:]) * 1e3
    benchmark.extra_info.update(p50_ms=float(np.percentile(t, 50)), p90_ms=float(np.percentile(t, 90)),
                                gmacs=macs / (float(np.percentile(t, 50)) * 1e6), isa=cpu.active_isa(),
                                threads=cpu.get_num_threads())


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("name,c,k,h", CONVS, ids=[c[0] for c in CONVS])
def test_bench_qconv2d(benchmark, bits, name, c, k, h):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2 ** bits, (100, h, h, c), dtype=torch.uint8, generator=g)
    wc = torch.randint(0, 2 ** bits, (c, k * k * c), dtype=torch.uint8, generator=g)
    wp = cpu.cpu_prepack(pack_codes(wc, bits), bits, k * k * c, k * k)
    ws, wo = torch.full((c,), 0.01), torch.full((c,), -0.07)
    ps, sh = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    fn = lambda: cpu.cpu_qconv2d(x, wp, bits, bits, k, 1, k // 2, ws, wo, 0.05, -0.1, post_scale=ps,  # noqa: E731
                                 post_shift=sh, slope=0.1, out_l=-1.0, out_s=0.1, out_bits=bits)
    _pedantic(benchmark, fn, 100 * h * h * c * c * k * k)


@pytest.mark.parametrize("n", [10, 30])
def test_bench_qbmm(benchmark, n):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 16, (40, n, n), dtype=torch.uint8, generator=g)
    v = torch.randint(0, 16, (40, n, 128), dtype=torch.uint8, generator=g)
    _pedantic(benchmark, lambda: cpu.cpu_qbmm(a, v, 4, 4, 0.01, 0.0, 0.1, -0.2), 40 * n * n * 128)
