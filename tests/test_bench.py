"""`qgnn-deploy bench` and the episode latency harness (issue 8)."""
import json
import time

from qgnn_deploy.benchmarks.episode import Variant, measure, summarize

RESULT_KEYS = {"workload", "backend", "p50_ms", "p90_ms", "speedup_vs_torch_fp32"}


def test_interleaved_timing_and_speedups():
    order = []
    fast = Variant("cpu", lambda: (order.append("cpu"), time.sleep(0.001)))
    slow = Variant("torch_fp32", lambda: (order.append("torch_fp32"), time.sleep(0.004)))
    measure([slow, fast], repeats=5, warmup=2, progress=False)
    assert len(slow.times_ms) == len(fast.times_ms) == 5
    # warm-up per variant first, then one run of each per round
    assert order[4:] == ["torch_fp32", "cpu"] * 5
    res = {r["backend"]: r for r in summarize([slow, fast], "w")}
    assert RESULT_KEYS <= set(res["cpu"])
    assert res["torch_fp32"]["speedup_vs_torch_fp32"] == 1.0
    assert res["cpu"]["speedup_vs_torch_fp32"] == res["torch_fp32"]["p50_ms"] / res["cpu"]["p50_ms"] > 1.5
    assert res["cpu"]["p90_ms"] >= res["cpu"]["p50_ms"]


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
    for r in d["results"]:
        assert RESULT_KEYS <= set(r) and r["p50_ms"] > 0
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
