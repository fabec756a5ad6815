"""Automatic bit selection (``select-bits``, ``report --sensitivity``; qgnn_deploy/quant/bit_selection.py).

Runs on the shipped FP checkpoint with few episodes: the accuracies are noisy, so the checks
are on what holds whatever the noise (budgets, costs, dominance, the calibration cache).
"""
import contextlib
import io
import json

import pytest
import torch

from qgnn_deploy.bits_config import load_bits_config, quantizable_layer_names, resolve_bits
from qgnn_deploy.cli import main
from qgnn_deploy.config import LayerBits
from qgnn_deploy.models import build_model
from qgnn_deploy.quant import bit_selection as bs
from qgnn_deploy.quant.ptq import calibration_batches, post_training_quantize, quantized_layers
from qgnn_deploy.report import count_bit_flops
from qgnn_deploy.sources import embedded_checkpoint

FP = embedded_checkpoint("tiny", 32)
FAST = ["--episodes", "4", "--calibration-episodes", "2", "--candidate-bits", "2", "--no-progress"]
BUDGET_G = 1.2  # between tiny's all-w2a2 (about 1.03 G) and uniform w4a4 (about 1.35 G)


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def report_totals(config):
    """``report``'s totals for a model of ``config`` (paper workload)."""
    with torch.random.fork_rng():
        return count_bit_flops(build_model(config).eval(), per_image_backbone=True).total()


@pytest.fixture(scope="module")
def fp_config():
    from qgnn_deploy import load_checkpoint
    return load_checkpoint(FP).config


@pytest.fixture(scope="module")
def selection(tmp_path_factory):
    """(result JSON, config path, plot path) of one select-bits run under BUDGET_G."""
    d = tmp_path_factory.mktemp("select")
    cfg, png = d / "mixed.json", d / "pareto.png"
    rc, stdout, err = run_cli(["select-bits", FP, "--budget-bit-flops", str(BUDGET_G), "--out", str(cfg),
                               "--json", "--plot", str(png)] + FAST)
    assert rc == 0, err
    return json.loads(stdout), cfg, png


def test_written_config_loads_and_its_model_is_within_the_budget(selection, fp_config):
    res, cfg, png = selection
    resolved = resolve_bits(load_bits_config(str(cfg)), fp_config)
    totals = report_totals(resolved)
    assert totals["bit_flops"] <= BUDGET_G * 1e9
    # what the command says is what report counts, and the additive cost model agrees
    assert (res["bit_flops"], res["bytes"]) == (totals["bit_flops"], totals["packed_bytes"])
    costs = bs.cost_model(resolved, {2, 4})
    assert costs.totals(resolved.layer_bits) == {"bit_flops": totals["bit_flops"],
                                                 "packed_bytes": totals["packed_bytes"]}
    # something was lowered (the base w4a4 is over budget), only to candidate pairs
    assert res["base"]["bit_flops"] > BUDGET_G * 1e9
    pairs = set(resolved.layer_bits.values())
    assert pairs - {LayerBits(4, 4)} and pairs <= {LayerBits(4, 4), LayerBits(2, 2), LayerBits(2, 4), LayerBits(4, 2)}
    assert res["config"] == json.loads(cfg.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_keys_and_sensitivity_rows(selection, fp_config):
    res, _, _ = selection
    for key in ("config", "bit_flops", "bytes", "accuracy", "pareto", "sensitivity"):
        assert key in res
    assert 0.0 <= res["accuracy"] <= 1.0
    names = quantizable_layer_names(fp_config)
    assert sorted(e["layer"] for e in res["sensitivity"]) == sorted(names)
    for e in res["sensitivity"]:
        assert [(o["w"], o["a"]) for o in e["options"]] == [(2, 2), (2, 4), (4, 2)]
        w2a2 = e["options"][0]
        assert w2a2["bit_flops_saved"] > 0 and w2a2["logit_mse"] >= 0
        assert e["options"][2]["bytes_saved"] == 0  # activations are not stored: w4a2 saves no bytes
    assert max(e["options"][0]["logit_mse"] for e in res["sensitivity"]) > 0


def test_pareto_front_is_non_dominated_and_each_point_costs_what_its_config_does(selection, fp_config):
    front = selection[0]["pareto"]
    assert front
    for p in front:
        assert {"bit_flops", "bytes", "accuracy", "config", "summary"} <= set(p)
        for q in front:
            better_or_equal = (q["accuracy"] >= p["accuracy"] and q["bit_flops"] <= p["bit_flops"]
                               and q["bytes"] <= p["bytes"])
            assert not (better_or_equal and q is not p
                        and (q["accuracy"], q["bit_flops"], q["bytes"]) != (p["accuracy"], p["bit_flops"], p["bytes"]))
        # each point's costs are those of its own bits-config
        totals = report_totals(resolve_bits(p["config"], fp_config))
        assert (p["bit_flops"], p["bytes"]) == (totals["bit_flops"], totals["packed_bytes"])
    assert [p["bit_flops"] for p in front] == sorted(p["bit_flops"] for p in front)


def test_a_tighter_budget_never_gives_more_bit_flops(selection, fp_config):
    sens = selection[0]["sensitivity"]
    base_layer_bits = {n: LayerBits(4, 4) for n in quantizable_layer_names(fp_config)}
    costs = bs.cost_model(fp_config.replace(bits=4, layer_bits=base_layer_bits), {2, 4})
    spent = []
    for g in (1.34, 1.3, 1.25, 1.2, 1.15, 1.1, 1.06, 1.04):
        chosen = bs.search_config(sens, costs, base_layer_bits, "bit_flops", g * 1e9)
        spent.append(costs.total(chosen, "bit_flops"))
        assert spent[-1] <= g * 1e9
    assert spent == sorted(spent, reverse=True) and spent[0] > spent[-1]
    # the CLI's own choice is the search's at its budget
    chosen = bs.search_config(sens, costs, base_layer_bits, "bit_flops", BUDGET_G * 1e9)
    assert bs.to_bits_config(chosen, LayerBits(4, 4)) == selection[0]["config"]


def test_bytes_budget(tmp_path, fp_config):
    budget = 120_000  # tiny: all-w2 about 97 kB, w4 166 kB
    cfg = tmp_path / "bytes.json"
    rc, stdout, err = run_cli(["select-bits", FP, "--budget-bytes", str(budget), "--out", str(cfg), "--json"] + FAST)
    assert rc == 0, err
    res = json.loads(stdout)
    totals = report_totals(resolve_bits(load_bits_config(str(cfg)), fp_config))
    assert res["bytes"] == totals["packed_bytes"] <= budget < res["base"]["packed_bytes"]


def test_cached_ranges_of_a_layer_lowered_alone_are_those_of_a_full_ptq(fp_config):
    """The cache's claim (module docstring): with the earlier layers at base, a layer's
    ranges at another pair equal what a full PTQ of that single-layer configuration picks."""
    fp_model = bs.float_model(FP)
    names = quantizable_layer_names(fp_config)
    base_layer_bits = {n: LayerBits(4, 4) for n in names}
    config = fp_config.replace(bits=4, layer_bits=base_layer_bits)
    batches = calibration_batches(config, 2, 0, "synthetic", None)
    cache = bs.calibrate_options(fp_model, bs.quant_model(fp_model, config), batches, [LayerBits(2, 3)],
                                 progress=False)
    lowered = "gnn.point_sim_generation_0.point_sim_transform.0"
    full = bs.quant_model(fp_model, config.replace(layer_bits=dict(base_layer_bits, **{lowered: LayerBits(2, 3)})))
    post_training_quantize(fp_model, full, batches, progress=False)
    layers = quantized_layers(full)
    for attr, (l, r) in cache[lowered][LayerBits(2, 3)].items():
        q = getattr(layers[lowered], attr)
        assert torch.equal(q.l.detach(), l) and torch.equal(q.r.detach(), r), attr
    for name in names[:names.index(lowered)]:  # before it: the base calibration itself
        for attr, (l, r) in cache[name][LayerBits(4, 4)].items():
            assert torch.equal(getattr(layers[name], attr).l.detach(), l), (name, attr)


def test_a_qat_source_gives_its_float_weights():
    from qgnn_deploy import load_checkpoint
    qat = load_checkpoint(embedded_checkpoint("tiny", 4))
    fp = bs.float_model(embedded_checkpoint("tiny", 4))
    assert not fp.config.quantized and not quantized_layers(fp)
    qat_state = qat.state_dict()
    for k, v in fp.state_dict().items():
        assert torch.equal(v, qat_state[k]), k


@pytest.mark.parametrize("argv, message", [
    (["--budget-bit-flops", "0.5"], "no configuration meets a budget of 0.5000 G"),
    (["--budget-bytes", "1000"], "no configuration meets a budget of 1000 bytes"),
    (["--budget-bit-flops", "0"], "must be positive"),
    (["--budget-bytes", "-5"], "must be positive"),
    (["--budget-bit-flops", "1.2", "--budget-bytes", "120000"], "exactly one of"),
    ([], "exactly one of"),
])
def test_bad_budgets_are_config_errors_before_any_work(argv, message, tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("calibration started")
    monkeypatch.setattr(bs, "analyse", no_work)
    out = tmp_path / "c.json"
    rc, _, err = run_cli(["select-bits", FP, "--out", str(out)] + argv + FAST)
    assert rc == 2 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "text", "qgnn"])
def test_a_source_that_is_not_a_checkpoint_is_a_config_error(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "analyse", lambda *a, **k: pytest.fail("calibration started"))
    src = tmp_path / ("model.qgnn" if kind == "qgnn" else "model.pt")
    if kind != "missing":
        src.write_text("not a checkpoint")
    rc, _, err = run_cli(["select-bits", str(src), "--budget-bit-flops", "1.2", "--out", str(tmp_path / "c.json")]
                         + FAST)
    assert rc == 2 and "SOURCE" in err and "Traceback" not in err, err
    with pytest.raises(Exception) as info:
        main(["--debug", "select-bits", str(src), "--budget-bit-flops", "1.2", "--out", str(tmp_path / "c.json")])
    assert type(info.value).__name__ == "ConfigError"


def test_report_sensitivity_lists_every_layer_most_costly_first(fp_config):
    rc, stdout, err = run_cli(["report", FP, "--sensitivity", "--json", "--episodes", "4",
                               "--calibration-episodes", "2", "--candidate-bits", "2,3", "--no-progress"])
    assert rc == 0, err
    sens = json.loads(stdout)["sensitivity"]
    assert sorted(e["layer"] for e in sens) == sorted(quantizable_layer_names(fp_config))
    keys = [(e["accuracy_drop"], e["logit_mse"]) for e in sens]
    assert keys == sorted(keys, reverse=True)
    for e in sens:  # every lower pair of w and a in {2, 3, 4}
        assert [(o["w"], o["a"]) for o in e["options"]] == [(2, 2), (2, 3), (2, 4), (3, 2), (3, 3), (3, 4),
                                                            (4, 2), (4, 3)]
        assert (e["accuracy_drop"], e["logit_mse"]) == (e["options"][0]["accuracy_drop"], e["options"][0]["logit_mse"])
    table = bs.sensitivity_markdown(sens, 0.5)
    assert all(f"| {e['layer']} |" in table for e in sens)
