"""`qgnn-deploy bench` and the episode latency harness (issue 8)."""
import json

import numpy as np
import pytest

from qgnn_deploy.benchmarks.episode import Variant, measure, summarize

RESULT_KEYS = {"workload", "backend", "p50_ms", "p90_ms", "speedup_vs_torch_fp32"}


class FakeClock:
    """Stands in for the ``time`` module of the harness: a variant's run advances it by a
    scripted duration, ``sleep`` (the untimed settle gap) by the time asked."""

    def __init__(self):
        self.now = 0.0
        self.slept = 0.0

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        self.slept += seconds

    def run(self, order, name, durations_ms):
        it = iter(durations_ms)

        def fn():
            order.append(name)
            self.now += next(it) / 1e3
        return fn


def test_interleaved_timing_and_speedups(monkeypatch):
    from qgnn_deploy.benchmarks import episode
    clock = FakeClock()
    monkeypatch.setattr(episode, "time", clock)
    order = []
    # 2 warm-up runs, then rounds of one untimed run + a burst of timed ones (3, then 2)
    slow_ms = [90.0, 80.0, 50.0, 4.0, 5.0, 3.0, 40.0, 6.0, 4.5]
    fast_ms = [70.0, 60.0, 30.0, 1.0, 2.0, 1.25, 20.0, 1.0, 3.0]
    slow = Variant("torch_fp32", clock.run(order, "torch_fp32", slow_ms))
    fast = Variant("cpu", clock.run(order, "cpu", fast_ms))
    measure([slow, fast], repeats=5, warmup=2, progress=False, burst=3)
    assert order == (["torch_fp32"] * 2 + ["cpu"] * 2 + ["torch_fp32"] * 4 + ["cpu"] * 4
                     + ["torch_fp32"] * 3 + ["cpu"] * 3)
    timed = lambda ms: ms[3:6] + ms[7:]  # noqa: E731 - warm-up and the untimed first call of a round excluded
    assert slow.times_ms == pytest.approx(timed(slow_ms), abs=1e-9)   # the settle gap is not timed
    assert fast.times_ms == pytest.approx(timed(fast_ms), abs=1e-9)
    assert clock.slept == pytest.approx(4 * episode.SETTLE_MS / 1e3)  # one gap per variant and round
    res = {r["backend"]: r for r in summarize([slow, fast], "w")}
    assert RESULT_KEYS <= set(res["cpu"]) and res["cpu"]["workload"] == "w"
    assert res["torch_fp32"]["p50_ms"] == pytest.approx(4.5) and res["cpu"]["p50_ms"] == pytest.approx(1.25)
    assert res["cpu"]["p90_ms"] == pytest.approx(float(np.percentile(timed(fast_ms), 90)))
    assert res["cpu"]["runs"] == 5 and res["cpu"]["min_ms"] == pytest.approx(1.0)
    assert res["torch_fp32"]["speedup_vs_torch_fp32"] == 1.0
    assert res["cpu"]["speedup_vs_torch_fp32"] == pytest.approx(4.5 / 1.25)  # ratio of p50s
    assert res["cpu"]["speedup_vs_onnxruntime_fp32"] is None  # no such variant in this run


def test_bench_command_json(capsys):
    from qgnn_deploy.cli import main
    rc = main(["bench", "--preset", "tiny", "--bits", "4", "--backends", "cpu", "reference",
               "--tasks", "1", "--repeats", "2", "--warmup", "1", "--threads", "1",
               "--no-progress", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)  # one JSON object on stdout
    assert {"device", "threads", "results", "batch", "versions", "unavailable"} <= set(d)
    assert d["threads"] == 1 and d["batch"]["tasks"] == 1
    backends = {r["backend"] for r in d["results"]}
    assert "torch_fp32" in backends
    base = next(r["p50_ms"] for r in d["results"] if r["backend"] == "torch_fp32")
    for r in d["results"]:
        assert RESULT_KEYS <= set(r) and 0 < r["p50_ms"] <= r["p90_ms"]
        assert r["speedup_vs_torch_fp32"] == pytest.approx(base / r["p50_ms"])  # p50s of this run
    # every asked-for engine is either timed or reported unavailable with a reason
    for b in ("cpu", "reference"):
        assert b in backends or b in d["unavailable"]


def test_layer_rounds_are_bursts_after_an_untimed_preroll():
    from qgnn_deploy.benchmarks.layers import _measure, _Variant
    order = []
    a = _Variant("cpu", lambda: order.append("cpu"), [])
    b = _Variant("onnxruntime_int8", lambda: order.append("ort"), [])
    _measure([a, b], repeats=7, warmup=1, gap_ms=0.0, burst=3, preroll_ms=0.0)
    assert len(a.times) == len(b.times) == 7  # rounds of 3, 3 and 1 timed calls
    # warm-up, then per round and variant: one untimed pre-roll call + the timed burst
    assert order == ["cpu", "ort"] + (["cpu"] * 4 + ["ort"] * 4) * 2 + ["cpu"] * 2 + ["ort"] * 2


def test_layer_benchmark_rows_name_their_isa_and_every_baseline():
    import pytest
    import torch

    from qgnn_deploy.backends import cpu
    from qgnn_deploy.benchmarks.layers import SPEEDUP_BASELINES, has_native_bf16, run_layer_benchmarks
    from qgnn_deploy.errors import ConfigError
    engine = torch.backends.quantized.engine
    rows = run_layer_benchmarks(bits=(2,), threads=1, repeats=2, warmup=1, batch=2, gap_ms=0.0, burst=1,
                                workloads=["conv3x3_128_16x16", "aggregation_N10_T40"])
    assert torch.backends.quantized.engine == engine  # restored
    by = {(r["workload"], r["backend"]): r for r in rows}
    conv, agg = "conv3x3_128_16x16_w2a2", "aggregation_N10_T40_w2a2"
    want = {"torch_fp32", "onnxruntime_int8", "onnxruntime_int8_asym", "cpu"}
    want |= {"torch_bf16"} if has_native_bf16() else set()
    want |= {"torch_int8"} if "onednn" in torch.backends.quantized.supported_engines else set()
    assert {b for w, b in by if w == conv} == want
    assert {b for w, b in by if w == agg} == want - {"torch_int8", "onnxruntime_int8_asym"}
    for r in rows:
        assert r["p90_ms"] >= r["p50_ms"] > 0 and r["gmacs"] > 0 and r["bits"] == 2 and r["threads"] == 1
        for base in SPEEDUP_BASELINES:
            b = by.get((r["workload"], base))
            assert r[f"speedup_vs_{base}"] == (None if b is None else pytest.approx(b["p50_ms"] / r["p50_ms"]))
    assert by[(conv, "cpu")]["isa"] == by[(agg, "cpu")]["isa"] == cpu.active_isa()
    # torch's conv rows name the oneDNN implementation they ran, onnxruntime's the CPU's best int8 ISA
    assert by[(conv, "torch_fp32")]["isa"].startswith("onednn ")
    if (conv, "torch_int8") in by:
        assert by[(conv, "torch_int8")]["isa"].startswith("onednn ")
    assert by[(conv, "onnxruntime_int8")]["isa"].startswith("mlas, cpu has ")
    with pytest.raises(ConfigError):
        run_layer_benchmarks(backends=("cpu", "tvm"))


def test_layer_benchmark_times_the_cpu_kernels_per_isa_path():
    import pytest

    from qgnn_deploy.backends import cpu
    from qgnn_deploy.benchmarks.layers import run_layer_benchmarks
    from qgnn_deploy.errors import BackendUnavailableError
    before = cpu.active_isa()
    isas = cpu.available_isas()
    rows = run_layer_benchmarks(bits=(4,), threads=1, repeats=1, warmup=0, batch=1, gap_ms=0.0, burst=1,
                                backends=("cpu",), cpu_isas=isas, workloads=["conv1x1_64_32x32"])
    assert [(r["backend"], r["isa"]) for r in rows] == [(f"cpu:{i}", i) for i in isas]
    assert cpu.active_isa() == before  # the forced paths are undone
    missing = [i for i in cpu.ISAS if i not in isas]
    if missing:  # an ISA this CPU lacks is refused up front
        with pytest.raises(BackendUnavailableError, match=f"{missing[-1]} cannot run here"):
            run_layer_benchmarks(backends=("cpu",), cpu_isas=[missing[-1]])
