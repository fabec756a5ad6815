"""`qgnn-deploy demo --quick` smoke test on the tiny preset (CI fast path)."""
import json
import os

STAGES = ("checkpoint", "fold", "run", "export", "report", "bench")


def test_demo_quick(tmp_path, capsys):
    from qgnn_deploy.backends import is_backend_available
    from qgnn_deploy.cli import main
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--quick", "--episodes", "4", "--threads", "1"])
    text = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    # every stage runs here: onnxruntime, onnx and triton are dependencies of the package, and
    # the C++ extension is built (test_backend_parity fails in CI without it)
    assert {name: s["stages"][name]["status"] for name in STAGES} == {name: "ok" for name in STAGES}
    assert rc == 0
    fold = s["stages"]["fold"]
    # the shipped 4-bit model: the reference engine reproduces the fake-quant model (measured
    # agreement 1.0; max |logit diff| 3e-8 on an AMD EPYC, 1.9e-3 on a Xeon with AMX, where one
    # code 2e-6 steps from a rounding boundary flips and cascades: every layer right, the
    # "layerwise-only" verdict)
    assert fold["agreement"] == 1.0 and fold["verdict"] in ("pass", "layerwise-only"), fold
    assert (fold["verdict"] == "pass") == (fold["max_logit_diff"] <= 1e-3), fold
    assert fold["artifact_bytes"] == os.path.getsize(out / "model.qgnn")
    run = s["stages"]["run"]
    expected = {"reference"} | ({"cpu"} if is_backend_available("cpu") else set())
    assert expected <= set(run["backends"]), run
    for name, r in run["backends"].items():  # the integer kernels match the reference exactly
        assert r["agreement_with_reference"] == 1.0 and r["max_logit_diff_vs_reference"] == 0.0, (name, r)
    for name, why in run["unavailable"].items():
        # the demo runs triton's kernels on a GPU only (the interpreter would take minutes)
        assert name == "triton" and why.startswith("unavailable: ") and "CUDA" in why, (name, why)
    export = s["stages"]["export"]
    # the export sums its FP32 layers in float64 like the reference: measured agreement 1.0,
    # max |logit diff| 3e-8 (the fast form's merged constants)
    assert export["agreement_with_reference"] == 1.0 and export["max_logit_diff_vs_reference"] <= 1e-6, export
    assert export["onnx_bytes"] == os.path.getsize(out / "model.onnx")
    rep = s["stages"]["report"]
    assert rep["bit_flops"] < rep["fp32_bit_flops"]
    bench = s["stages"]["bench"]
    timed = {r["backend"] for r in bench["results"]}
    assert {"torch_fp32", "onnxruntime_fp32"} <= timed, bench
    assert {r["tasks"] for r in bench["results"]} == {1, 10}, bench
    assert ("cpu" in timed) == is_backend_available("cpu"), bench
    assert all(r["p50_ms"] > 0 for r in bench["results"])
    assert os.path.getsize(out / "report.png") > 10_000
    assert "qgnn-deploy demo" in text and len(text.splitlines()) <= 16
