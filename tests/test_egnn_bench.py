"""`qgnn-deploy bench` on the EGNN family (issue 17, item 3): the same variants, report and
options as for DPGN, on the shipped egnn-tiny checkpoints. Structure and content only: no
test asserts a speed."""
import json
import math
import os

import pytest
import torch

from qgnn_deploy.benchmarks.episode import build_engines, fp32_twin
from qgnn_deploy.benchmarks.variants import BASELINES

from test_bench_baselines import _bench_json, check_accuracy_rows

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qgnn_deploy", "assets")
EGNN_W4 = os.path.join(ASSETS, "egnn-tiny-w4.pt")
ROW_KEYS = {"workload", "backend", "p50_ms", "p90_ms", "speedup_vs_torch_fp32", "speedup_vs_torch_bf16",
            "speedup_vs_onnxruntime_fp32", "speedup_vs_onnxruntime_int"}


@pytest.fixture(scope="module")
def egnn4():
    from qgnn_deploy.checkpoint import load_checkpoint
    from qgnn_deploy.fold import fold
    model = load_checkpoint(EGNN_W4).eval()
    return model, fold(model)


def _check_timed(row):
    assert ROW_KEYS <= set(row), row
    assert math.isfinite(row["p50_ms"]) and 0 < row["p50_ms"] <= row["p90_ms"] and math.isfinite(row["p90_ms"])


def test_fp32_twin_of_an_egnn_checkpoint(egnn4):
    from qgnn_deploy.models import EGNNModel, has_quantized_layers
    from qgnn_deploy.report import default_episode
    model, _ = egnn4
    fp = fp32_twin(model)
    assert isinstance(fp, EGNNModel) and not fp.training and not has_quantized_layers(fp)
    assert fp is not model and fp.config == model.config.replace(bits=32, layer_bits={})
    # the float weights are the checkpoint's
    torch.testing.assert_close(fp.backbone.conv_2[0].weight, model.backbone.conv_2[0].weight)
    engines, unavailable, _ = build_engines(model, None, backends=(), baselines=("torch_fp32",))
    x, y = default_episode(model.config, 2)
    logits = engines[0].predict(x, y)
    cfg = model.config
    assert logits.shape == (2, cfg.num_queries, cfg.way) and torch.isfinite(logits).all()
    with torch.no_grad():  # channels_last vs NCHW eager: the same model up to summation order
        torch.testing.assert_close(logits, fp32_twin(model)(x, y).logits, atol=1e-4, rtol=1e-4)


def test_egnn_accuracy_rows_on_the_same_episodes(egnn4, cache_dir):
    check_accuracy_rows(*egnn4, "torch_fp32")


def test_egnn_bench_json_every_variant_accuracy_and_profile(capsys, cache_dir):
    from qgnn_deploy.backends.cpu import available_isas
    d = _bench_json(capsys, [EGNN_W4], "--accuracy-episodes", "10", "--profile")
    assert d["family"] == "egnn" and d["batch"]["tasks"] == 1 and d["batch"]["images"] == 10
    rows = {r["backend"]: r for r in d["results"]}
    for name in (*BASELINES, "onnxruntime_int", "cpu", "cpu-eager"):  # timed, or unavailable with a reason
        assert (name in rows) != (name in d["unavailable"]), name
        if name in d["unavailable"]:
            assert isinstance(d["unavailable"][name], str) and d["unavailable"][name].strip()
    # the ONNX variants run on EGNN's FP32 / integer exports like DPGN's
    assert {"torch_fp32", "onnxruntime_fp32", "onnxruntime_int8_qdq", "onnxruntime_int", "cpu",
            "cpu-eager"} <= set(rows)
    for r in rows.values():
        _check_timed(r)
        assert r["workload"] == "egnn_episode_1x10_32px_3layers"
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["speedup_vs_torch_fp32"] == pytest.approx(rows["torch_fp32"]["p50_ms"] / r["p50_ms"])
    assert rows["torch_fp32"]["layout"] == "channels_last"
    for name in ("cpu", "cpu-eager"):
        assert rows[name]["isa"] in available_isas() and rows[name]["zero_point"] == "exact"
    assert rows["cpu"]["accuracy"] == rows["cpu-eager"]["accuracy"]  # same predictions
    assert d["accuracy"]["episodes"] == 10 and set(d["accuracy"]["by_backend"]) == set(rows)
    assert d["source_trained"] is True
    prof = d["profile"]
    assert prof["total_ms"] > 0 and prof["steps"] and math.isfinite(prof["total_ms"])
    assert {"qconv", "qbmm", "edge_update_2ch"} <= set(prof["by_kind"])
    assert d["exports"]["onnxruntime_int8_qdq"]["graph"]["per_channel_int8_weights"] > 0
    assert d["exports"]["onnxruntime_int"]["form"] == "fast"
    assert rows["onnxruntime_int"]["speedup_vs_onnxruntime_int"] == 1.0


def test_egnn_artifact_bench_snap_and_table(capsys, cache_dir, tmp_path):
    """A snapped EGNN artifact: no float weights, so the baselines say why; our engines run
    it with its own zero point; the text table names the family and the workload."""
    from qgnn_deploy.artifact import save_int_model
    from qgnn_deploy.checkpoint import load_checkpoint
    from qgnn_deploy.cli import main
    from qgnn_deploy.fold import fold
    path = str(tmp_path / "egnn-tiny-w2-snap.qgnn")
    save_int_model(fold(load_checkpoint(os.path.join(ASSETS, "egnn-tiny-w2.pt")), zero_point="snap"), path)
    d = _bench_json(capsys, [path], "--backends", "cpu", "onnx", "triton", "--accuracy-episodes", "0")
    assert d["zero_point"] == "snap" and d["accuracy"] is None
    for b in BASELINES:
        assert "no float weights" in d["unavailable"][b]
    rows = {r["backend"]: r for r in d["results"]}
    assert "cpu" in rows and rows["cpu"]["zero_point"] == "snap"
    for name in ("onnxruntime_int", "triton"):  # triton needs a CUDA device
        assert (name in rows) != (name in d["unavailable"]), name
    for r in rows.values():
        _check_timed(r)
        assert r["speedup_vs_torch_fp32"] is None  # no baseline ran
    rc = main(["bench", "--preset", "egnn-tiny", "--bits", "4", "--tasks", "1", "--repeats", "1", "--warmup", "0",
               "--threads", "1", "--no-progress", "--baselines", "torch_fp32", "--backends", "cpu",
               "--accuracy-episodes", "5", "--zero-point", "snap"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "(egnn)" in text and "egnn_episode_1x10_32px_3layers" in text and "zero point snap" in text
    assert "% +- " in text and "channels_last" in text


def test_egnn_layer_shapes_are_the_models_quantized_layers():
    from qgnn_deploy.benchmarks.layers import AGG_SHAPES, CONV_SHAPES, egnn_shapes, layer_shapes
    from qgnn_deploy.config import preset_config
    from qgnn_deploy.models import build_model, quantizable_layers
    cfg = preset_config("egnn-tiny", 4)
    tasks = 3
    convs, aggs = egnn_shapes(cfg, tasks)
    assert layer_shapes(cfg, tasks) == (convs, aggs)
    assert layer_shapes(preset_config("tiny", 4), tasks) == (CONV_SHAPES, AGG_SHAPES)  # DPGN: documented shapes
    # every quantized layer of the model in exactly one workload; the FP32 first conv in none
    names = [n for sh in convs + aggs for n in sh.layers]
    assert sorted(names) == sorted(quantizable_layers(build_model(cfg)))
    assert "backbone.conv_1.0" not in names
    by = {sh.name: sh for sh in convs}
    m = cfg.num_supports + 1  # non-transductive: one graph per query
    conv2 = by["backbone.conv_2.0"]
    assert (conv2.batch, conv2.cin, conv2.cout, conv2.k, conv2.pad, conv2.h) == (
        tasks * cfg.num_nodes, cfg.widths[0], cfg.widths[1], 3, 0, cfg.image_size // 2)
    last = by["backbone.layer_last.0"]
    assert (last.k, last.h, last.w, last.cout) == (1, 1, 1, cfg.emb_dim)
    edge = by["gnn.node2edge_net0.sim_network.conv0"]
    assert (edge.batch, edge.h, edge.w, edge.k) == (tasks * cfg.num_queries, m, m, 1)
    assert len(edge.layers) == cfg.num_layers
    assert {(a.tasks, a.n) for a in aggs} == {(tasks * cfg.num_queries, m)}
    assert sorted(a.d for a in aggs) == sorted({cfg.emb_dim, cfg.node_features})
    # transductive: one graph of all N nodes per task
    convs_t, aggs_t = egnn_shapes(cfg.replace(transductive=True), tasks)
    assert {(a.tasks, a.n) for a in aggs_t} == {(tasks, cfg.num_nodes)}


def test_egnn_layer_benchmark_rows(capsys):
    from qgnn_deploy.benchmarks.layers import egnn_shapes, run_layer_benchmarks
    from qgnn_deploy.config import preset_config
    convs, aggs = egnn_shapes(preset_config("egnn-tiny", 4), 1)
    wanted = ["backbone.conv_2.0", "gnn.node2edge_net0.sim_network.conv0", "gnn.edge2node_net0.aggregation"]
    rows = run_layer_benchmarks(bits=(4,), threads=1, repeats=2, warmup=1, gap_ms=0.0, burst=1,
                                workloads=wanted, conv_shapes=convs, agg_shapes=aggs)
    assert {r["workload"] for r in rows} == {f"{w}_w4a4" for w in wanted}
    for r in rows:
        assert math.isfinite(r["p50_ms"]) and r["p90_ms"] >= r["p50_ms"] > 0 and r["gmacs"] > 0
        assert r["layers"] and r["shape"].startswith("[")
    assert {r["backend"] for r in rows} >= {"torch_fp32", "onnxruntime_int8", "cpu"}
    # and through the command: --layers adds them to the episode rows
    from qgnn_deploy.cli import main
    rc = main(["bench", "--preset", "egnn-tiny", "--bits", "4", "--tasks", "1", "--repeats", "1", "--warmup", "0",
               "--threads", "1", "--no-progress", "--baselines", "--backends", "cpu", "--accuracy-episodes", "0",
               "--layers", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    layer_rows = [r for r in d["results"] if "speedup_vs_onnxruntime_int8" in r]
    assert {r["workload"] for r in layer_rows} == {f"{sh.name}_w4a4" for sh in convs + aggs}
