"""``export --triton-repo``: the Triton model repository (export/triton_repo.py).

The config is parsed with Triton's own ModelConfig schema (tritonclient's
``model_config_pb2``) and checked against the ONNX graph; ``1/model.onnx`` runs in
onnxruntime with inputs shaped as the config declares, batch sizes 1 and 3, next to the
reference engine. tritonserver itself is not run here (not installable on this machine).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from qgnn_deploy.cli import main  # noqa: E402
from qgnn_deploy.errors import ExportError  # noqa: E402
from qgnn_deploy.export import triton_repo  # noqa: E402

try:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
except ImportError:  # pragma: no cover - tritonclient is a test dependency
    model_config_pb2 = None

needs_schema = pytest.mark.skipif(model_config_pb2 is None,
                                  reason="tritonclient not installed: Triton's ModelConfig schema "
                                         "(tritonclient.grpc.model_config_pb2) is needed to parse config.pbtxt")

_TRITON_TYPE = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}


def _export(argv):
    """(exit status, the --json object or None, stderr) of ``qgnn-deploy export ARGV``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["export", "--preset", "tiny", "--bits", "4", *argv])
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    return rc, (json.loads(lines[0]) if "--json" in argv and rc == 0 else None), err.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export of the shipped tiny 4-bit model (default form) to a repository with both
    instance groups: (repo dir, the --json result)."""
    repo = str(tmp_path_factory.mktemp("triton") / "models")
    rc, result, err = _export(["--triton-repo", repo, "--instance-kind", "both", "--json"])
    assert rc == 0, err
    return repo, result


def _parse(path):
    with open(path) as f:
        return text_format.Parse(f.read(), model_config_pb2.ModelConfig())


def _graph_io(onnx_path):
    g = onnx.load(onnx_path).graph
    return [[(v.name, v.type.tensor_type.elem_type, v.type.tensor_type.shape.dim) for v in vs]
            for vs in (g.input, g.output)]


def test_layout_and_json(exported):
    repo, result = exported
    r = result["triton_repo"]
    model_dir = os.path.join(repo, "qgnn")  # a preset's default name
    assert r["path"] == repo and r["model_name"] == "qgnn" and r["max_batch_size"] == 64
    assert r["config"] == os.path.join(model_dir, "config.pbtxt") and os.path.isfile(r["config"])
    assert r["model_file"] == os.path.join(model_dir, "1", "model.onnx")
    assert result["out"] == r["model_file"]  # no --out: the repository's file
    assert r["instance_groups"] == ["KIND_CPU", "KIND_GPU"]
    with open(r["model_file"], "rb") as f:
        assert len(f.read()) == result["bytes"]
    assert [t["name"] for t in r["inputs"]] == ["images", "support_labels"]
    assert r["inputs"][0] == {"name": "images", "data_type": "TYPE_FP32", "dims": [10, 3, 32, 32]}
    assert r["outputs"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [5, 5]}]


@needs_schema
def test_config_matches_the_onnx_graph(exported):
    repo, result = exported
    cfg = _parse(result["triton_repo"]["config"])
    assert cfg.name == "qgnn" and cfg.backend == "onnxruntime" and not cfg.platform
    assert cfg.max_batch_size == 64
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds > 0
    kinds = [g.kind for g in cfg.instance_group]
    assert kinds == [model_config_pb2.ModelInstanceGroup.KIND_CPU,
                     model_config_pb2.ModelInstanceGroup.KIND_GPU]
    inputs, outputs = _graph_io(result["triton_repo"]["model_file"])
    for declared, graph in ((cfg.input, inputs), (cfg.output, outputs)):
        assert len(declared) == len(graph)
        for t, (name, elem, dims) in zip(declared, graph):
            assert dims[0].dim_param and not dims[0].HasField("dim_value")  # tasks: symbolic
            assert t.name == name
            assert model_config_pb2.DataType.Name(t.data_type) == _TRITON_TYPE[elem]
            assert list(t.dims) == [d.dim_value for d in dims[1:]]
    with open(result["triton_repo"]["config"]) as f:
        assert f.readline().rstrip("\n") == triton_repo.MARKER


@needs_schema
def test_own_writer_matches_protobuf(exported):
    """The fallback writer (no tritonclient) renders the same message protobuf does."""
    _, result = exported
    model = onnx.load(result["triton_repo"]["model_file"])
    for kind in triton_repo.INSTANCE_KINDS:
        fields = triton_repo.config_fields(model, "m", 8, kind, 100)
        ours = text_format.Parse(triton_repo.render_pbtxt(fields), model_config_pb2.ModelConfig())
        text = triton_repo.triton_model_config(result["triton_repo"]["model_file"], "m", 8, kind, 100)
        assert ours == text_format.Parse(text, model_config_pb2.ModelConfig())
        names = [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in ours.instance_group]
        assert names == triton_repo.INSTANCE_KINDS[kind]


@needs_schema
def test_config_without_tritonclient(exported, monkeypatch):
    """tritonclient is no runtime dependency: without it the own writer is used."""
    _, result = exported
    with open(result["triton_repo"]["config"]) as f:
        expected = text_format.Parse(f.read(), model_config_pb2.ModelConfig())
    monkeypatch.setitem(sys.modules, "tritonclient", None)  # import tritonclient -> ImportError
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    text = triton_repo.triton_model_config(result["triton_repo"]["model_file"], "qgnn", 64, "both")
    assert "dims: [ 10, 3, 32, 32 ]" in text  # the own writer's list syntax
    assert text_format.Parse(text, model_config_pb2.ModelConfig()) == expected


@needs_schema
@pytest.mark.parametrize("tasks", [1, 3])
def test_model_runs_as_declared_and_matches_the_reference(exported, tasks):
    """Default (fast) form, exact offsets: docs/onnx.md promises codes identical up to fp32
    ties, measured max |logit diff| <= 3e-8 on this model; the bar here is 1e-6 and the same
    predictions (the bar tests/test_cli_fold_run.py uses for the onnx backend)."""
    from qgnn_deploy import fold, load_checkpoint
    from qgnn_deploy.data import calibration_episodes
    from qgnn_deploy.sources import embedded_checkpoint

    _, result = exported
    cfg = _parse(result["triton_repo"]["config"])
    model = load_checkpoint(embedded_checkpoint("tiny", 4)).eval()
    images, labels = calibration_episodes(model.config, tasks=tasks, seed=0)
    np_type = {model_config_pb2.TYPE_FP32: np.float32, model_config_pb2.TYPE_INT64: np.int64}
    feed = {}
    for t, value in zip(cfg.input, (images, labels)):
        shape = [tasks, *t.dims]  # what a Triton client sends: batch dim + the config's dims
        assert list(value.shape) == shape
        feed[t.name] = value.numpy().astype(np_type[t.data_type]).reshape(shape)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(result["triton_repo"]["model_file"], so,
                                providers=["CPUExecutionProvider"])
    (logits,) = sess.run([cfg.output[0].name], feed)
    assert list(logits.shape) == [tasks, *cfg.output[0].dims]
    im = fold(model)
    im.backend = "reference"
    with torch.no_grad():
        ref = im(images, labels).logits.numpy()
    assert np.abs(logits - ref).max() <= 1e-6
    assert (logits.argmax(-1) == ref.argmax(-1)).all()


def test_reexport_over_own_output_keeps_other_files(tmp_path):
    repo = str(tmp_path / "models")
    rc, first, err = _export(["--triton-repo", repo, "--model-name", "w4", "--max-batch-size", "8", "--json"])
    assert rc == 0, err
    extra = os.path.join(repo, "w4", "notes.txt")
    with open(extra, "w") as f:
        f.write("mine")
    out = str(tmp_path / "also.onnx")
    rc, second, err = _export(["--triton-repo", repo, "--model-name", "w4", "--out", out,
                               "--instance-kind", "cpu", "--json"])
    assert rc == 0, err
    assert second["out"] == out and os.path.isfile(out)
    assert second["triton_repo"]["max_batch_size"] == 64
    assert second["triton_repo"]["instance_groups"] == ["KIND_CPU"]
    with open(out, "rb") as a, open(second["triton_repo"]["model_file"], "rb") as b:
        assert a.read() == b.read()
    assert open(extra).read() == "mine"
    assert sorted(os.listdir(os.path.join(repo, "w4"))) == ["1", "config.pbtxt", "notes.txt"]


def test_default_name_is_the_source_stem(tmp_path):
    from qgnn_deploy.sources import embedded_checkpoint
    repo = str(tmp_path / "models")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", embedded_checkpoint("tiny", 4), "--triton-repo", repo]) == 0
    assert os.path.isfile(os.path.join(repo, "tiny-w4", "config.pbtxt"))
    assert os.path.isfile(os.path.join(repo, "tiny-w4", "1", "model.onnx"))


@pytest.mark.parametrize("argv, message", [
    ([], "give --out FILE.onnx, --triton-repo DIR, or both"),
    (["--max-batch-size", "0"], "--max-batch-size must be an integer >= 1"),
    (["--max-batch-size", "-4"], "--max-batch-size must be an integer >= 1"),
    (["--model-name", "a/b"], "not usable as a Triton model directory"),
    (["--model-name", ".."], "not usable as a Triton model directory"),
    (["--model-name", "a\\b"], "not usable as a Triton model directory"),
])
def test_bad_arguments(tmp_path, argv, message):
    if argv:
        argv = ["--triton-repo", str(tmp_path / "models"), *argv]
    rc, _, err = _export(argv)
    assert rc == 2 and message in err, err
    assert not os.path.exists(tmp_path / "models" / "a")  # nothing written


def test_triton_flags_need_triton_repo(tmp_path):
    rc, _, err = _export(["--out", str(tmp_path / "m.onnx"), "--max-batch-size", "8"])
    assert rc == 2 and "--max-batch-size: only meaningful with --triton-repo" in err
    assert not (tmp_path / "m.onnx").exists()


def test_refuses_a_directory_it_did_not_write(tmp_path):
    user_dir = tmp_path / "models" / "qgnn"
    (user_dir / "1").mkdir(parents=True)
    (user_dir / "config.pbtxt").write_text('name: "qgnn"\nbackend: "onnxruntime"\n')
    (user_dir / "1" / "model.onnx").write_bytes(b"user model")
    rc, _, err = _export(["--triton-repo", str(tmp_path / "models")])
    assert rc == 2 and "is not a Triton repository written by qgnn-deploy" in err, err
    assert (user_dir / "1" / "model.onnx").read_bytes() == b"user model"


def test_fixed_tasks_axis_is_an_export_error(tmp_path):
    """A graph whose dim 0 is fixed would serve only that many tasks per request."""
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["tasks", 3])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"])], "g", [x], [y])
    path = str(tmp_path / "fixed.onnx")
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(ExportError, match="'images' has a fixed dim 0 of 2"):
        triton_repo.triton_model_config(path, "fixed")
    with pytest.raises(ExportError, match="fixed dim 0"):
        triton_repo.write_triton_repo(str(tmp_path / "models"), "fixed",
                                      helper.make_model(graph).SerializeToString())
    assert not (tmp_path / "models" / "fixed" / "1" / "model.onnx").exists()
