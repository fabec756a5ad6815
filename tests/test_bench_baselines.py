"""Episode benchmark baselines (issue 14, items 5 and 7): torch FP32 / bf16 in channels_last,
onnxruntime FP32 and its int8 QDQ quantization, our engines, ``--zero-point``, accuracy,
and the demo's latency line. Structure and content only: no test asserts a speed."""
import json

import numpy as np
import onnx
import pytest
import torch

from qgnn_deploy.benchmarks.episode import (CPU_FLAGS, Variant, bf16_unavailable_reason, build_engines,
                                            cpu_flags, device_info, engine_accuracy, fp32_twin,
                                            summarize)
from qgnn_deploy.benchmarks.variants import BASELINES, SPEEDUP_BASES

ROW_KEYS = {"workload", "backend", "p50_ms", "p90_ms", "speedup_vs_torch_fp32", "speedup_vs_torch_bf16",
            "speedup_vs_onnxruntime_int"}
BF16_HERE = bf16_unavailable_reason(cpu_flags()) is None


@pytest.fixture(scope="module")
def tiny4():
    from qgnn_deploy.fold import fold
    from qgnn_deploy.sources import Source, load_float_model
    model = load_float_model(Source("preset", preset="tiny", bits=4), quiet=True)
    return model, fold(model)


TINY4 = ["--preset", "tiny", "--bits", "4"]


def _bench_json(capsys, source, *extra):
    """``qgnn-deploy bench <source...> --json`` at the smallest settings, parsed."""
    from qgnn_deploy.cli import main
    rc = main(["bench", *source, "--tasks", "1", "--repeats", "2", "--warmup", "1", "--threads", "1",
               "--no-progress", "--json", *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def check_accuracy_rows(model, int_model, baseline):
    """Accuracy of ``baseline`` and our engines on the same 12 episodes: in [0, 1], and our
    engines make the same predictions on the same tasks."""
    engines, unavailable, _ = build_engines(model, int_model, backends=("cpu", "cpu-eager", "reference"),
                                            baselines=(baseline,))
    assert not unavailable
    acc = engine_accuracy(engines, model.config, episodes=12)
    assert set(acc) == {baseline, "cpu", "cpu-eager", "reference"}
    for a in acc.values():
        assert 0.0 <= a["accuracy"] <= 1.0 and a["ci95"] >= 0.0
    assert acc["cpu"]["accuracy"] == acc["cpu-eager"]["accuracy"] == acc["reference"]["accuracy"]


# ------------------------------------------------------------------ pieces

def test_bf16_needs_avx512_bf16_or_amx_bf16():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN: bf16 is never a baseline")
    assert bf16_unavailable_reason({"avx512_bf16"}) is None
    assert bf16_unavailable_reason({"amx_bf16", "amx_tile"}) is None
    why = bf16_unavailable_reason({"avx2", "avx512f", "avx512_vnni"})
    assert "avx512_bf16" in why and "amx_bf16" in why


def test_device_lists_the_cpu_flags_that_matter():
    flags = device_info()["cpu_flags"]
    assert set(CPU_FLAGS) <= set(flags)
    assert all(isinstance(v, bool) for v in flags.values())
    assert all(k in CPU_FLAGS or k.startswith("amx_") for k in flags)
    assert flags == {k: k in cpu_flags() for k in flags}


def test_speedups_against_every_base_that_ran():
    # times set directly: the arithmetic of the rows, not a timing
    vs = [Variant(name, lambda: None, list(ts), {"isa": "x"} if name == "cpu" else {})
          for name, ts in [("torch_fp32", [40.0, 40.0, 44.0]), ("onnxruntime_int", [20.0, 21.0, 20.0]),
                           ("cpu", [10.0, 10.0, 12.0])]]
    rows = {r["backend"]: r for r in summarize(vs, "w")}
    assert rows["cpu"]["speedup_vs_torch_fp32"] == 4.0
    assert rows["cpu"]["speedup_vs_onnxruntime_int"] == 2.0
    assert rows["onnxruntime_int"]["speedup_vs_onnxruntime_int"] == 1.0
    for r in rows.values():  # a base that did not run gives None, never a number
        assert {f"speedup_vs_{b}" for b in SPEEDUP_BASES} <= set(r)
        assert r["speedup_vs_torch_bf16"] is None and r["speedup_vs_onnxruntime_fp32"] is None
    assert rows["cpu"]["isa"] == "x" and "isa" not in rows["torch_fp32"]


def _conv_outputs(fn):
    """(dtype, channels_last?) of every 4-D conv output while ``fn`` runs."""
    seen = []

    def hook(module, args, out):
        if isinstance(module, torch.nn.Conv2d) and out.dim() == 4:
            seen.append((out.dtype, out.is_contiguous(memory_format=torch.channels_last)))
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        out = fn()
    finally:
        handle.remove()
    return seen, out


def test_torch_baselines_run_channels_last(tiny4, cache_dir):
    from qgnn_deploy.report import default_episode
    model, _ = tiny4
    engines, unavailable, _ = build_engines(model, None, backends=(), baselines=("torch_fp32", "torch_bf16"))
    by_name = {e.name: e for e in engines}
    x, y = default_episode(model.config, 2)
    seen, logits = _conv_outputs(lambda: by_name["torch_fp32"].predict(x, y))
    assert by_name["torch_fp32"].details["layout"] == "channels_last"
    assert seen and all(cl for _, cl in seen) and all(dt == torch.float32 for dt, _ in seen)
    with torch.no_grad():  # same model as NCHW eager, up to fp32 summation order
        want = fp32_twin(model)(x, y).logits
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    if BF16_HERE:
        seen, logits = _conv_outputs(lambda: by_name["torch_bf16"].predict(x, y))
        assert by_name["torch_bf16"].details["layout"] == "channels_last"
        assert any(dt == torch.bfloat16 for dt, _ in seen) and all(cl for _, cl in seen)
        assert logits.dtype == torch.float32 and logits.shape == want.shape
        assert torch.isfinite(logits).all()
    else:
        assert "torch_bf16" not in by_name and "bf16" in unavailable["torch_bf16"]


def test_qdq_model_is_int8_qdq_with_per_channel_weights_and_cached(tiny4, cache_dir):
    from onnx import TensorProto

    from qgnn_deploy.backends.onnx import OnnxSession
    from qgnn_deploy.benchmarks.ort_qdq import qdq_summary, quantize_qdq_int8
    model, _ = tiny4
    fp32 = OnnxSession.from_float(model, threads=1)
    info = quantize_qdq_int8(fp32.path, model.config)
    again = quantize_qdq_int8(fp32.path, model.config)
    assert not info["cached"] and again["cached"] and again["path"] == info["path"]
    assert info["format"] == "QDQ" and info["per_channel"] and info["weight_type"] == "QInt8"
    g = qdq_summary(info["path"])
    assert g["quantize_linear"] > 0 and g["dequantize_linear"] > g["quantize_linear"]
    assert g["per_channel_int8_weights"] >= 30  # every conv of the tiny model
    # read the graph directly too: a DequantizeLinear of an int8 initializer with an axis
    # and one scale per output channel, fed into a Conv
    m = onnx.load(info["path"])
    inits = {t.name: t for t in m.graph.initializer}
    consumers = {i: n.op_type for n in m.graph.node for i in n.input}
    per_channel_convs = [
        n for n in m.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
        and inits[n.input[0]].data_type == TensorProto.INT8
        and len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] == inits[n.input[0]].dims[0] > 1
        and consumers.get(n.output[0]) == "Conv"]
    assert len(per_channel_convs) >= 30
    # and it runs on the episode contract
    from qgnn_deploy.report import default_episode
    x, y = default_episode(model.config, 3)
    out = OnnxSession(info["path"], threads=1)(x, y)
    assert out.shape == (3, model.config.way, model.config.way) and torch.isfinite(out).all()


def test_accuracy_on_the_same_episodes(tiny4, cache_dir):
    check_accuracy_rows(*tiny4, "onnxruntime_int8_qdq")


def test_engines_select_their_backend_and_the_bench_restores_the_models(tiny4):
    from qgnn_deploy.benchmarks.episode import run_episode_bench
    from qgnn_deploy.report import default_episode
    _, im = tiny4
    engines, unavailable, _ = build_engines(None, im, backends=("cpu", "cpu-eager"), baselines=())
    assert not unavailable
    images, labels = default_episode(im.config, 1, 0)
    for e in engines:
        e.predict(images, labels)
        assert im.backend == e.name
    im.backend = "reference"
    try:
        out = run_episode_bench(None, im, backends=("cpu", "cpu-eager"), baselines=(), tasks=1, repeats=1,
                                warmup=1, progress=False)
        assert [r["backend"] for r in out["results"]] == ["cpu", "cpu-eager"]
        assert im.backend == "reference"
    finally:
        im.backend = None


# ------------------------------------------------------------------ the command

def test_bench_json_has_every_variant_accuracy_and_flags(capsys, cache_dir):
    from qgnn_deploy.backends.cpu import available_isas
    d = _bench_json(capsys, TINY4, "--accuracy-episodes", "10")
    rows = {r["backend"]: r for r in d["results"]}
    want = {"torch_fp32", "torch_bf16", "onnxruntime_fp32", "onnxruntime_int8_qdq", "onnxruntime_int",
            "cpu", "cpu-eager"}
    for name in want:  # timed, or unavailable with a reason
        assert (name in rows) != (name in d["unavailable"]), name
    assert {"torch_fp32", "onnxruntime_fp32", "onnxruntime_int8_qdq", "onnxruntime_int", "cpu",
            "cpu-eager"} <= set(rows)
    assert ("torch_bf16" in rows) == BF16_HERE
    order = list(BASELINES) + ["onnxruntime_int", "cpu", "cpu-eager"]  # baselines first
    assert list(rows) == sorted(rows, key=order.index)
    for r in d["results"]:
        assert ROW_KEYS <= set(r) and r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"]
        assert 0.0 <= r["accuracy"] <= 1.0
    assert rows["torch_fp32"]["speedup_vs_torch_fp32"] == 1.0
    assert rows["onnxruntime_int"]["speedup_vs_onnxruntime_int"] == 1.0
    assert rows["torch_fp32"]["layout"] == "channels_last"
    for name in ("cpu", "cpu-eager"):
        assert rows[name]["isa"] in available_isas() and rows[name]["zero_point"] == "exact"
    assert set(CPU_FLAGS) <= set(d["device"]["cpu_flags"])
    assert d["zero_point"] == "exact" and d["source_trained"] is True
    acc = d["accuracy"]
    assert acc["episodes"] == 10 and set(acc["by_backend"]) == set(rows)
    assert d["exports"]["onnxruntime_int8_qdq"]["graph"]["per_channel_int8_weights"] > 0
    assert d["exports"]["onnxruntime_int"]["form"] == "fast"


def test_bench_zero_point_snap_folds_and_exports_snapped(capsys, cache_dir, tmp_path):
    d = _bench_json(capsys, TINY4, "--zero-point", "snap", "--baselines", "--backends", "cpu", "onnx",
                    "--accuracy-episodes", "0")
    assert d["zero_point"] == "snap" and d["accuracy"] is None
    rows = {r["backend"]: r for r in d["results"]}
    assert set(rows) == {"cpu", "onnxruntime_int"}
    assert rows["cpu"]["zero_point"] == "snap" and "accuracy" not in rows["cpu"]
    assert rows["cpu"]["speedup_vs_torch_fp32"] is None  # no baseline asked for
    from qgnn_deploy.export import read_metadata
    assert read_metadata(d["exports"]["onnxruntime_int"]["path"])["qgnn_deploy.zero_point"] == "snap"


def test_bench_artifact_keeps_its_zero_point(capsys, cache_dir, tiny4, tmp_path):
    from qgnn_deploy.artifact import save_int_model
    from qgnn_deploy.cli import main
    path = str(tmp_path / "tiny-w4-exact.qgnn")
    save_int_model(tiny4[1], path)
    rc = main(["bench", path, "--zero-point", "snap", "--tasks", "1", "--json"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "folded with --zero-point exact" in err and "snap" in err


@pytest.mark.parametrize("argv, message", [
    (["--accuracy-episodes", "-1"], "--accuracy-episodes"),
    (["--threads", "0"], "--threads"),
])
def test_bench_rejects_bad_flags(capsys, argv, message):
    from qgnn_deploy.cli import main
    assert main(["bench", "--preset", "tiny", "--bits", "4", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_table_shows_layout_accuracy_and_untrained_note(capsys, cache_dir):
    from qgnn_deploy.cli import main
    rc = main(["bench", "--preset", "tiny", "--bits", "4", "--tasks", "1", "--repeats", "1",
               "--warmup", "0", "--threads", "1", "--no-progress", "--baselines", "torch_fp32",
               "onnxruntime_int8_qdq", "--backends", "cpu", "--accuracy-episodes", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "channels_last" in text and "quantize_static" in text and "accuracy" in text
    assert "% +- " in text and "cpu flags: " in text and "UNTRAINED" not in text


# ------------------------------------------------------------------ the demo's latency line

def test_demo_latency_t1_and_t10_against_the_baselines(tiny4, cache_dir):
    from qgnn_deploy.commands.demo import LATENCY_BASELINES, LATENCY_TASKS, latency_figures, latency_lines
    model, int_model = tiny4
    figs = latency_figures(model, int_model, threads=1, quick=True)
    full = figs.pop("full")
    rows = figs["results"]
    assert {r["tasks"] for r in rows} == set(LATENCY_TASKS) == {1, 10}
    for tasks in LATENCY_TASKS:
        names = {r["backend"] for r in rows if r["tasks"] == tasks}
        assert "cpu" in names
        for base in LATENCY_BASELINES:
            assert (base in names) != (base in figs["unavailable"])
    assert {r["backend"] for r in rows} <= {"cpu", *LATENCY_BASELINES}
    for r in rows:
        assert r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"]
        if r["backend"] == "cpu":
            assert r["speedup_vs_torch_fp32"] > 0 and r["speedup_vs_onnxruntime_fp32"] > 0
    assert {r["layout"] for r in rows if r["backend"].startswith("torch")} == {"channels_last"}
    assert len(full["results"]) == len(rows)
    json.dumps(full)  # bench.json is plain JSON
    lines = latency_lines(figs)
    assert len(lines) == 1 + len(LATENCY_TASKS)
    assert lines[1].lstrip().startswith("T=1: cpu ") and lines[2].lstrip().startswith("T=10: cpu ")
    assert "torch FP32 channels_last" in lines[1] and "onnxruntime FP32" in lines[2]
    assert ("torch bf16 n/a" in lines[1]) != BF16_HERE


def test_demo_summary_carries_the_latency_figures(tmp_path, capsys):
    from qgnn_deploy.cli import main
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--quick", "--episodes", "2", "--threads", "1"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    b = s["stages"]["bench"]
    assert b["status"] == "ok" and "full" not in b
    assert {(r["tasks"], r["backend"]) for r in b["results"]} >= {(1, "cpu"), (10, "cpu"), (1, "torch_fp32"),
                                                                  (10, "onnxruntime_fp32")}
    bench = json.loads((out / "bench.json").read_text())
    assert {r["workload"] for r in bench["results"]} == {r["workload"] for r in b["results"]}
    text = capsys.readouterr().out
    assert "T=1: cpu" in text and "T=10: cpu" in text
    assert np.isfinite([r["p50_ms"] for r in b["results"]]).all()
