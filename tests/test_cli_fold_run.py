"""`qgnn-deploy fold` and `qgnn-deploy run` end to end on the tiny preset (JSON contract of DESIGN s5)."""
import json
import subprocess
import sys


from qgnn_deploy.cli import main


def _json(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0
    lines = [l for l in out.splitlines() if l.strip()]
    assert len(lines) == 1  # --json: exactly one JSON object on stdout
    return json.loads(lines[0])


def test_fold_then_run_reference_and_torch(tmp_path, capsys):
    out = str(tmp_path / "tiny.qgnn")
    r = _json(capsys, ["fold", "--preset", "tiny", "--bits", "2", "--out", out, "--episodes", "2", "--json"])
    for key in ("agreement", "max_logit_diff", "episodes", "artifact_bytes"):
        assert key in r
    assert r["episodes"] == 2 and r["artifact_bytes"] > 0 and 0.0 <= r["agreement"] <= 1.0
    r = _json(capsys, ["run", out, "--backend", "reference", "--episodes", "2", "--json"])
    assert r["backend"] == "reference" and r["episodes"] == 2 and 0 <= r["accuracy"] <= 1 and r["ci95"] >= 0
    assert "verdict" not in r  # nothing to compare the reference engine with
    r = _json(capsys, ["run", "--preset", "tiny", "--bits", "2", "--backend", "torch", "--episodes", "2", "--json"])
    assert "agreement_with_reference" in r and "max_logit_diff_vs_reference" in r
    assert r["verdict"] == "pass" and r["agreement_with_reference"] == 1.0
    assert r["max_logit_diff_vs_reference"] <= 1e-6  # measured ~3e-8


def test_run_onnx_and_cpu_verdicts_pass(capsys):
    """The shipped 4-bit model, exact offsets: the export sums its FP32 layers in float64 as
    the reference does, so onnxruntime agrees on every query (measured: max |logit diff|
    0 with the standard form, 3e-8 with the default fast form) and the verdict is pass."""
    r = _json(capsys, ["run", "--preset", "tiny", "--bits", "4", "--backend", "onnx", "--episodes", "40",
                       "--threads", "1", "--json"])
    assert r["max_logit_diff_vs_reference"] <= 1e-6 and r["verdict"] == "pass", r
    assert main(["run", "--preset", "tiny", "--bits", "4", "--backend", "cpu", "--episodes", "4"]) == 0
    assert "verdict pass" in capsys.readouterr().out


def test_fold_snap_reports_accuracy_change(tmp_path, capsys):
    r = _json(capsys, ["fold", "--preset", "tiny", "--bits", "3", "--out", str(tmp_path / "s.qgnn"),
                       "--zero-point", "snap", "--generations", "1", "--episodes", "2", "--json"])
    assert "accuracy_change" in r and r["generations"] == 1


def test_errors_exit_2(tmp_path, capsys):
    assert main(["fold", "--preset", "tiny", "--bits", "2", "--out", str(tmp_path / "x.onnx")]) == 2
    bad = tmp_path / "bad.qgnn"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["run", str(bad), "--episodes", "1"]) == 2
    assert main(["run", str(bad), "--backend", "torch", "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err


def test_help_is_fast():
    for cmd in ("fold", "run"):
        p = subprocess.run([sys.executable, "-m", "qgnn_deploy", cmd, "--help"], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and "--json" in p.stdout
