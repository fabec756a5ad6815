"""End-to-end episode latency on pytest-benchmark (pedantic mode; p90 in extra_info).

    python -m pytest bench/bench_episode.py --benchmark-only [--preset resnet12-cifarfs]

One episode batch (10 tasks x N images) per round, per engine; the user-facing,
interleaved comparison is ``qgnn-deploy bench``. Engines that cannot run here skip with
the reason.
"""
import os

import numpy as np
import pytest
import torch

PRESET = os.environ.get("QGNN_BENCH_PRESET", "tiny")
BITS = int(os.environ.get("QGNN_BENCH_BITS", "4"))
TASKS = int(os.environ.get("QGNN_BENCH_TASKS", "10"))
ROUNDS, WARMUP = 20, 3


@pytest.fixture(scope="module")
def models():
    from qgnn_deploy.benchmarks.episode import fp32_twin
    from qgnn_deploy.fold import fold
    from qgnn_deploy.report import default_episode
    from qgnn_deploy.sources import Source, load_float_model
    m = load_float_model(Source("preset", preset=PRESET, bits=BITS), quiet=True)
    images, labels = default_episode(m.config, TASKS)
    return {"fp32": fp32_twin(m), "int": fold(m), "images": images, "labels": labels}


def _pedantic(benchmark, fn):
    times = []

    def timed():
        import time
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)

    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    benchmark.extra_info.update(p50_ms=float(np.percentile(times[-ROUNDS:], 50)),
                                p90_ms=float(np.percentile(times[-ROUNDS:], 90)),
                                threads=torch.get_num_threads(), tasks=TASKS, preset=PRESET, bits=BITS)


def test_episode_torch_fp32(benchmark, models):
    m, x, y = models["fp32"], models["images"], models["labels"]
    with torch.no_grad():
        _pedantic(benchmark, lambda: m(x, y))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_episode_int(benchmark, models, backend):
    from qgnn_deploy.benchmarks.episode import backend_status
    ok, why = backend_status([backend])
    if not ok:
        pytest.skip(why[backend])
    im, x, y = models["int"], models["images"], models["labels"]
    im.backend = backend
    _pedantic(benchmark, lambda: im(x, y))
