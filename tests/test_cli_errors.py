"""Errors users see on the command line (issue 9, part 6).

``python -m qgnn_deploy ...`` in a subprocess: a QGNNError prints one ``error: ...`` line
on stderr, no traceback, nothing on stdout, exit status non-zero (2); ``--debug`` shows
the traceback. Invocations run two at a time (each one imports torch).
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "qgnn_deploy", *args], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=300)
    return r


def _available(cmd):
    from qgnn_deploy.cli import _command_module
    return _command_module(cmd) is not None


def _assert_clean_error(r, *needles):
    assert r.returncode != 0, (r.returncode, r.stdout[-500:], r.stderr[-500:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert r.stdout.strip() == "", r.stdout[-500:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "garbage.pt").write_bytes(b"\x00" * 200)
    (d / "garbage.qgnn").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    (d / "empty.qgnn").write_bytes(b"")
    return d


def test_errors_are_one_line_without_traceback(bad_files, tmp_path):
    d = bad_files
    cases = []  # (args, substrings the error line must contain)
    if _available("report"):
        cases += [
            (["report", str(d / "missing.pt")], ["missing.pt"]),
            (["report", str(d / "garbage.pt")], ["garbage.pt"]),
            (["report", "--preset", "nope", "--bits", "4"], ["nope"]),
            (["report", "--preset", "tiny", "--bits", "5"], ["bits"]),
            (["report", str(d / "garbage.pt"), "--bits", "4"], ["--bits"]),
            (["report"], ["SOURCE"]),
        ]
    if _available("run"):
        cases += [(["run", str(d / "empty.qgnn"), "--backend", "cpu", "--json"], ["empty.qgnn"])]
    if _available("fold"):
        cases += [(["fold", str(d / "garbage.pt"), "--out", str(tmp_path / "o.qgnn")], ["garbage.pt"])]
    if _available("export"):
        cases += [(["export", str(d / "garbage.qgnn"), "--out", str(tmp_path / "o.onnx")], ["garbage.qgnn"])]
    if not cases:
        pytest.skip("no SOURCE-taking command available yet")
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda c: _cli(*c[0]), cases))
    for (args, needles), r in zip(cases, results):
        try:
            _assert_clean_error(r, *needles)
        except AssertionError as e:
            raise AssertionError(f"qgnn-deploy {' '.join(args)}: {e}") from None
        assert r.returncode == 2, args
    # nothing was written by the failing fold / export
    assert not (tmp_path / "o.qgnn").exists() and not (tmp_path / "o.onnx").exists()


def test_argparse_errors_exit_nonzero():
    r = _cli("run", "x.qgnn", "--backend", "bogus") if _available("run") else _cli("bogus-command")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr


def test_debug_after_subcommand_shows_traceback(bad_files):
    if not _available("report"):
        pytest.skip("report command not available")
    r = _cli("report", str(bad_files / "garbage.pt"), "--debug")
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "CheckpointError" in r.stderr


def test_debug_before_subcommand_shows_traceback(bad_files):
    if not _available("report"):
        pytest.skip("report command not available")
    r = _cli("--debug", "report", str(bad_files / "garbage.pt"))
    assert "Traceback" in r.stderr


def test_triton_backend_without_gpu_or_interpreter():
    """No CUDA and no TRITON_INTERPRET: `run --backend triton` names the fix, never a raw
    CUDA assertion from moving the model to a missing device."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "qgnn_deploy", "run", "--preset", "tiny", "--bits", "4",
                        "--backend", "triton", "--episodes", "1"], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=300)
    _assert_clean_error(r, "triton", "unavailable", "--backend cpu")


def test_egnn_bench_errors_are_one_line(tmp_path):
    """bench takes EGNN models (tests/test_egnn_bench.py); what it refuses on them is one
    clean line, e.g. an EGNN artifact asked for another --zero-point than it was folded with."""
    if not _available("bench"):
        pytest.skip("bench is not in this build")
    from qgnn_deploy.artifact import save_int_model
    from qgnn_deploy.checkpoint import load_checkpoint
    from qgnn_deploy.fold import fold
    path = str(tmp_path / "egnn-tiny-w4.qgnn")
    save_int_model(fold(load_checkpoint(os.path.join(REPO, "qgnn_deploy", "assets", "egnn-tiny-w4.pt"))), path)
    _assert_clean_error(_cli("bench", path, "--zero-point", "snap", "--tasks", "1"),
                        "folded with --zero-point exact", "snap")
