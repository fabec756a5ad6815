"""Mixed precision: per-layer weight / activation bits from a bits-config, on every engine.

One tiny calibrated model whose layers mix w2/a4, w8/a2, w8/a3 (aggregations), w3/a2 and
w2/a8 around a w4/a4 default, so fused requantizations hand codes between layers of
different bits (docs/mixed-precision.md). Folded with exact and snapped offsets, the
reference engine, cpu (compiled plan, every ISA), cpu-eager, triton (interpreter without a
GPU) and the ONNX export must reproduce it as the shipped uniform models; the bits must
survive checkpoints, artifacts and the report.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from qgnn_deploy.artifact import load_int_model, save_int_model
from qgnn_deploy.bits_config import load_bits_config, quantizable_layer_names, resolve_bits
from qgnn_deploy.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from qgnn_deploy.config import LayerBits, ModelConfig, preset_config
from qgnn_deploy.data import episode_batches
from qgnn_deploy.errors import ArtifactError, ConfigError
from qgnn_deploy.fold import compare_engines, fold
from qgnn_deploy.intmodel import IntAggregation, IntConv2d, IntLinear, layer_bits
from qgnn_deploy.models import quantizable_layers
from qgnn_deploy.sources import ASSETS, calibrated_model
from test_artifact import _rewrite
from test_backend_parity import _triton_device, assert_identical, run_on
from test_plan import outputs_equal

BITS_CONFIG = {
    "default": {"w": 4, "a": 4},
    "layers": {
        "backbone.layer1.*": {"w": 2, "a": 4},
        "backbone.layer2.0.conv2": {"w": 8, "a": 2},      # conv1 (w4/a4) requantizes to its a2
        "gnn.*aggregation": {"w": 8, "a": 3},             # adjacency 8 bits, nodes 3 bits
        "gnn.*point_sim*.0": {"w": 3, "a": 2},            # emits codes for the next conv (w4/a4)
        "backbone.layer_last.0": {"w": 2, "a": 8},
        "gnn.point_sim_generation_1.*": {"w": 3, "a": 3},  # later pattern wins over the one above
    },
}
MIXED = resolve_bits(BITS_CONFIG, preset_config("tiny"))
_CACHE = {}


def mixed_model():
    if "model" not in _CACHE:
        _CACHE["model"] = calibrated_model("tiny", MIXED.bits, quiet=True, layer_bits=MIXED.layer_bits)
    return _CACHE["model"]


def folded(zero_point):
    """(IntModel on the reference engine, a 2-task episode, the reference output)."""
    if zero_point not in _CACHE:
        im = fold(mixed_model(), zero_point=zero_point, backend="reference")
        images, labels, _ = next(episode_batches(im.config, 2, seed=0, split="test", tasks_per_batch=2))
        _CACHE[zero_point] = im, (images, labels), im(images, labels)
    return _CACHE[zero_point]


def write_json(tmp_path, obj, name="bits.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


# ------------------------------------------------------------------ resolving

def test_resolver_lists_every_quantizable_layer_with_later_patterns_winning():
    names = quantizable_layer_names(preset_config("tiny"))
    assert list(MIXED.layer_bits) == names and MIXED.bits == 4
    b = MIXED.layer_bits
    assert b["backbone.layer1.0.conv"] == (2, 4) and b["backbone.layer2.0.conv2"] == (8, 2)
    assert b["backbone.layer2.0.conv1"] == (4, 4) and b["backbone.layer_last.0"] == (2, 8)
    assert b["gnn.distribution2point_generation_1.aggregation"] == (8, 3)
    assert b["gnn.point_sim_generation_0.point_sim_transform.0"] == (3, 2)
    assert b["gnn.initial_edge.point_sim_transform.0"] == (3, 2)
    assert b["gnn.point_sim_generation_1.point_sim_transform.0"] == (3, 3)   # the later pattern
    assert b["gnn.point_sim_generation_1.point_sim_transform.3"] == (3, 3)
    assert b["gnn.point_sim_generation_0.point_sim_transform.4"] == (4, 4)   # after a dropout


def test_without_default_the_model_keeps_its_own_bits():
    cfg = resolve_bits({"layers": {"gnn.*aggregation": {"w": 8, "a": 3}}}, preset_config("tiny", 3))
    assert cfg.bits == 3 and cfg.layer_bits["backbone.layer1.0.conv1"] == (3, 3)
    assert cfg.layer_bits["gnn.distribution2point_generation_0.aggregation"] == (8, 3)
    fp = resolve_bits({"layers": {"backbone.layer4.*": {"w": 2, "a": 2}}}, preset_config("tiny"))
    assert fp.bits == 32 and fp.quantized and fp.layer_bits["backbone.layer1.0.conv1"] == (32, 32)


def test_fake_quant_quantizers_have_their_own_bits():
    layers = quantizable_layers(mixed_model())
    for name, m in layers.items():
        want = MIXED.bits_for(name)
        assert m.bits == want, name
        first, second = ((m.adj_quant, m.node_quant) if hasattr(m, "adj_quant") else (m.weight_quant, m.act_quant))
        assert (first.bits, second.bits) == want, name


def test_old_single_bits_form_reads_as_w_equals_a():
    name = "backbone.layer1.0.conv1"
    old = {**preset_config("tiny", 4).to_dict(), "layer_bits": {name: 2}}
    cfg = ModelConfig.from_dict(old)
    assert cfg.layer_bits == {name: LayerBits(2, 2)} and cfg.bits_for(name) == (2, 2)
    assert cfg.to_dict()["layer_bits"] == {name: {"w": 2, "a": 2}}
    assert ModelConfig.from_dict(MIXED.to_dict()) == MIXED
    with pytest.raises(ConfigError, match="both operands together"):
        preset_config("tiny", 4, layer_bits={name: {"w": 32, "a": 4}})


# ------------------------------------------------------------------ fold and engines

def test_fold_gives_each_layer_its_bits_and_fuses_to_the_next_layers_input_bits():
    im, _, _ = folded("exact")
    ints = im.integer_layers()
    for name in quantizable_layer_names(MIXED):
        assert layer_bits(im.layer(name)) == MIXED.bits_for(name), name
    agg = im.layer("gnn.distribution2point_generation_0.aggregation")
    assert isinstance(agg, IntAggregation) and (agg.a_bits, agg.v_bits) == (8, 3)
    conv1 = im.layer("backbone.layer2.0.conv1")
    assert isinstance(conv1, IntConv2d) and (conv1.w_bits, conv1.a_bits, conv1.out_bits) == (4, 4, 2)
    assert im.layer("backbone.layer2.0.conv2").out_bits == 4   # conv3 takes 4-bit codes
    mlp0 = im.layer("gnn.point_sim_generation_0.point_sim_transform.0")
    assert (mlp0.w_bits, mlp0.a_bits, mlp0.out_bits) == (3, 2, 4)
    last = im.layer("backbone.layer_last.0")
    assert isinstance(last, IntLinear) and (last.w_bits, last.a_bits) == (2, 8)
    assert len(ints) == len(quantizable_layer_names(MIXED))


@pytest.mark.parametrize("zero_point", ["exact", "snap"])
def test_cpu_plan_is_bit_identical_to_the_reference(zero_point, cpu_isa):
    im, episode, ref = folded(zero_point)
    assert outputs_equal(run_on(im, "cpu", episode), ref), cpu_isa


@pytest.mark.parametrize("zero_point", ["exact", "snap"])
def test_cpu_eager_matches_the_reference(zero_point):
    from qgnn_deploy.backends import cpu
    if not cpu.is_available():
        pytest.skip("qgnn_deploy._C not built (pip install -e .)")
    im, episode, ref = folded(zero_point)
    assert_identical(run_on(im, "cpu-eager", episode), ref, "cpu-eager")


@pytest.mark.parametrize("zero_point", ["exact", "snap"])
def test_triton_matches_the_reference(zero_point):
    device = _triton_device()
    im, (images, labels), _ = folded(zero_point)
    episode = (images[:1], labels[:1])   # one task: the interpreter is slow
    want = run_on(im, "reference", episode)
    try:
        out = run_on(im.to(device), "triton", tuple(t.to(device) for t in episode))
    finally:
        im.to("cpu")
    assert_identical(out, want, ("triton", device))


@pytest.mark.parametrize("zero_point", ["exact", "snap"])
@pytest.mark.parametrize("form", ["standard", "fast"])
def test_onnx_export_agrees_as_docs_onnx_says(zero_point, form, tmp_path):
    pytest.importorskip("onnxruntime")
    from qgnn_deploy.backends.onnx import OnnxSession
    from qgnn_deploy.export import build_onnx
    from qgnn_deploy.export.check import check_parity
    im, episode, ref = folded(zero_point)
    proto, info = build_onnx(im, form=form)
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    cmp = compare_engines(ref.logits, OnnxSession(str(path), threads=1)(*episode))
    chk = check_parity(im, proto, info["code_tensors"], [episode], threads=1,
                       float_tensors=info["float_tensors"])
    bits = {k: tuple(v.values()) for k, v in info["layer_bits"].items()}
    assert bits["backbone.layer2.0.conv2"] == (8, 2)
    assert bits["gnn.distribution2point_generation_0.aggregation"] == (8, 3)
    assert chk["resynced"]["code_mismatches"] == 0 and chk["resynced"]["max_logit_diff"] <= 1e-6
    if form == "standard":   # bit-identical, free running
        assert chk["code_mismatches"] == 0 and chk["verdict"] == "pass", chk
        assert cmp["agreement"] == 1.0 and cmp["max_logit_diff"] == 0.0, cmp
    else:                    # codes identical up to fp32 ties of the merged constants
        assert cmp["agreement"] == 1.0 and cmp["max_logit_diff"] <= 1e-5, cmp
        assert chk["code_mismatch_rate"] <= 1e-4 and chk["verdict"] == "pass", chk


# ------------------------------------------------------------------ records

def test_artifact_round_trip_keeps_the_per_layer_bits(tmp_path):
    im, episode, ref = folded("snap")
    path = str(tmp_path / "m.qgnn")
    save_int_model(im, path)
    back = load_int_model(path, backend="reference")
    assert back.config == MIXED and back.config.layer_bits == MIXED.layer_bits
    for name, m in im.named_layers():
        assert layer_bits(back.layer(name)) == layer_bits(m), name
    assert outputs_equal(back(*episode), ref)

    def lie(header):   # the config disagrees with a layer record
        header["config"]["layer_bits"]["backbone.layer2.0.conv2"] = {"w": 4, "a": 2}
    with pytest.raises(ArtifactError, match=r"backbone\.layer2\.0\.conv2 holds w=8 a=2"):
        load_int_model(_rewrite(path, str(tmp_path / "lie.qgnn"), header_edit=lie))


def test_artifact_with_the_old_layer_bits_form_loads(tmp_path):
    name = "backbone.layer3.0.conv1"
    model = calibrated_model("tiny", 4, quiet=True, layer_bits={name: 8})
    path = str(tmp_path / "old.qgnn")
    save_int_model(fold(model, backend="reference"), path)

    def old_form(header):
        header["config"]["layer_bits"] = {name: 8}
    back = load_int_model(_rewrite(path, str(tmp_path / "o.qgnn"), header_edit=old_form))
    assert back.config.layer_bits == {name: (8, 8)} and layer_bits(back.layer(name)) == (8, 8)


def test_checkpoint_round_trip_keeps_the_per_layer_bits(tmp_path):
    path = str(tmp_path / "m.pt")
    model = mixed_model()
    save_checkpoint(model, path)
    stored = read_checkpoint(path)["config"]["layer_bits"]
    assert stored["backbone.layer_last.0"] == {"w": 2, "a": 8} and len(stored) == len(MIXED.layer_bits)
    back = load_checkpoint(path).eval()
    assert back.config == MIXED
    assert {n: m.bits for n, m in quantizable_layers(back).items()} == MIXED.layer_bits
    images, labels = folded("exact")[1]
    with torch.no_grad():
        assert torch.equal(back(images, labels).logits, model(images, labels).logits)


def _check_report_rows(rows, config):
    by_name = {r["name"]: r for r in rows}
    for name in quantizable_layer_names(config):
        r = by_name[name]
        assert (r["w_bits"], r["a_bits"]) == tuple(config.bits_for(name)), name
        assert r["bit_flops"] == r["flops"] * r["w_bits"] * r["a_bits"], name


def test_report_counts_each_layer_at_its_bits():
    from qgnn_deploy.report import count_bit_flops
    _check_report_rows(count_bit_flops(mixed_model()).to_dict()["layers"], MIXED)
    _check_report_rows(count_bit_flops(folded("exact")[0]).to_dict()["layers"], MIXED)


# ------------------------------------------------------------------ command line

def test_cli_report_and_fold_take_a_bits_config(tmp_path, capsys):
    from qgnn_deploy.cli import main
    cfg = write_json(tmp_path, BITS_CONFIG)
    assert main(["report", "--preset", "tiny", "--bits-config", cfg, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["source"] == f"--preset tiny --bits-config {cfg}"
    _check_report_rows(d["layers"], MIXED)
    out = str(tmp_path / "m.qgnn")
    assert main(["fold", "--preset", "tiny", "--bits-config", cfg, "--zero-point", "snap",
                 "--episodes", "2", "--out", out, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["verdict"] == "pass", r
    assert load_int_model(out).config.layer_bits == MIXED.layer_bits
    assert main(["run", "--preset", "tiny", "--bits-config", cfg, "--backend", "cpu",
                 "--episodes", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["agreement_with_reference"] == 1.0 and r["max_logit_diff_vs_reference"] == 0.0


def test_cli_bits_config_needs_a_preset_and_excludes_bits(tmp_path, capsys):
    from qgnn_deploy.cli import main
    cfg = write_json(tmp_path, BITS_CONFIG)
    ckpt = os.path.join(ASSETS, "tiny-w4.pt")
    assert main(["report", ckpt, "--bits-config", cfg]) == 2
    assert "--bits-config only goes with --preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--preset", "tiny", "--bits", "4", "--bits-config", cfg])
    assert "not allowed with argument" in capsys.readouterr().err


def test_train_with_a_bits_config_records_the_resolved_bits(tmp_path):
    from qgnn_deploy.cli import main
    cfg = write_json(tmp_path, BITS_CONFIG)
    out = str(tmp_path / "mixed.pt")
    assert main(["train", "--preset", "tiny", "--bits-config", cfg, "--init", os.path.join(ASSETS, "tiny-w32.pt"),
                 "--iterations", "1", "--tasks", "2", "--val-episodes", "2", "--no-progress", "--slim",
                 "--out", out]) == 0
    model = load_checkpoint(out)
    assert model.config == MIXED
    assert {n: m.bits for n, m in quantizable_layers(model).items()} == MIXED.layer_bits


# ------------------------------------------------------------------ bad files

@pytest.mark.parametrize("content,match", [
    ({"layers": {"backbone.layer9.*": {"w": 2, "a": 2}}}, r"\['backbone\.layer9\.\*'\] match no quantizable layer"),
    ({"layers": {"backbone.conv1": {"w": 2, "a": 2}}}, r"\['backbone\.conv1'\] match no"),   # FP32 by design
    ({"layers": {"gnn.*": {"w": 5, "a": 4}}}, r"layers\['gnn\.\*'\]\.w must be one of .* got 5"),
    ({"default": {"w": 4, "a": "4"}}, r"default\.a must be one of .* got '4'"),
    ({"default": {"w": 4, "a": 4}, "layer": {}}, r"unknown bits-config key\(s\) \['layer'\]"),
    ({"layers": {"gnn.*": {"w": 4, "a": 4, "adj": 8}}}, r"layers\['gnn\.\*'\] must have exactly the keys"),
    ({"layers": {"gnn.*": 4}}, r"layers\['gnn\.\*'\] must be an object"),
    ({"layers": {"gnn.*": {"w": 32, "a": 4}}}, r"layers\['gnn\.\*'\]: 32 \(FP32\) goes for both"),
    ({"layers": ["gnn.*"]}, r"'layers' must be an object"),
    ([{"w": 4, "a": 4}], r"must be a JSON object .* got a list"),
    ("{\"default\": {\"w\": 4,", r"is not valid JSON"),
])
def test_bad_bits_config_files_name_the_problem(tmp_path, content, match):
    path = write_json(tmp_path, content)
    with pytest.raises(ConfigError, match=match):
        resolve_bits(load_bits_config(path), preset_config("tiny"))


def test_missing_bits_config_file_and_cli_errors_before_work(tmp_path, capsys):
    from qgnn_deploy.cli import main
    with pytest.raises(ConfigError, match="does not exist"):
        load_bits_config(str(tmp_path / "nope.json"))
    bad = write_json(tmp_path, {"layers": {"gnn.*": {"w": 5, "a": 4}}})
    out = tmp_path / "m.qgnn"
    assert main(["fold", "--preset", "tiny", "--bits-config", bad, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--bits-config {bad!r}" in err and "got 5" in err and not out.exists()
    assert main(["train", "--preset", "tiny", "--bits-config", str(tmp_path / "nope.json"),
                 "--out", str(tmp_path / "t.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
