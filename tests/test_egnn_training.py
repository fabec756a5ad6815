"""EGNN wired into configs, checkpoints, training, evaluation, sources and the report:
family dispatch, checkpoint round trips (ours and the official layout), the official EGNN
loss against a hand computation, short FP / QAT runs through ``train()``, resume, errors."""
import math
import os

import pytest
import torch

from qgnn_deploy.checkpoint import (is_official_dpgn, load_checkpoint, read_checkpoint, save_checkpoint,
                                    to_official_dpgn)
from qgnn_deploy.config import (ModelConfig, config_family, config_from_dict, preset_config, preset_family,
                                preset_names)
from qgnn_deploy.data import calibration_episodes, episode_batches
from qgnn_deploy.errors import CheckpointError, ConfigError
from qgnn_deploy.models import EGNNConfig, EGNNModel, QGNNModel, build_model
from qgnn_deploy.models.egnn import EGNNOutput, is_official_egnn, to_official_egnn
from qgnn_deploy.training import TrainOptions, default_recipe, train
from qgnn_deploy.training import trainer as trainer_mod
from qgnn_deploy.training.distill import AQD, SQD, aqd_layers, sqd_layers
from qgnn_deploy.training.losses import egnn_loss, model_loss

HERE = os.path.dirname(__file__)
FIXTURE = os.path.join(HERE, "fixtures", "egnn_official", "fixture.pt")
ASSETS = os.path.join(os.path.dirname(HERE), "qgnn_deploy", "assets")
RUN = dict(preset="egnn-tiny", tasks=2, val_episodes=4, progress=False)


def calibrated(bits=4, **kw):
    """egnn-tiny at ``bits`` with its PQ ranges set by one training-mode pass."""
    cfg = preset_config("egnn-tiny", bits, **kw)
    model = build_model(cfg).train()
    images, support = calibration_episodes(cfg, 2, 0)
    with torch.no_grad():
        model(images, support)
    return model.eval(), images, support


# ---------------------------------------------------------------- config dispatch

def test_preset_and_dict_dispatch_by_family():
    c = preset_config("egnn-tiny", 4)
    assert isinstance(c, EGNNConfig) and c.bits == 4 and config_family(c) == "egnn"
    assert isinstance(preset_config("tiny", 4), ModelConfig) and config_family(preset_config("tiny")) == "dpgn"
    assert preset_config("egnn-miniimagenet").image_size == 84
    assert preset_family("egnn-tiny") == "egnn" and preset_family("resnet12-cifarfs") == "dpgn"
    assert {"tiny", "resnet12-cifarfs", "egnn-tiny", "egnn-miniimagenet"} <= set(preset_names())
    d = c.to_dict()
    assert d["family"] == "egnn" and config_from_dict(d) == c
    dp = preset_config("tiny", 3).to_dict()
    assert "family" not in dp and config_from_dict(dp) == preset_config("tiny", 3)  # DPGN dicts as before
    assert config_from_dict({**dp, "family": "dpgn"}) == preset_config("tiny", 3)
    with pytest.raises(ConfigError, match="unknown model family"):
        config_from_dict({**d, "family": "gat"})
    with pytest.raises(ConfigError, match="egnn-tiny"):
        preset_config("nope")
    with pytest.raises(ConfigError, match="node_bits"):
        preset_config("egnn-tiny", 4, node_bits=(2, 4))
    assert isinstance(build_model(c), EGNNModel) and isinstance(build_model(preset_config("tiny")), QGNNModel)


def test_bits_config_on_egnn(tmp_path):
    cfg = tmp_path / "b.json"
    cfg.write_text('{"default": {"w": 4, "a": 4}, "layers": {"gnn.*aggregation": {"w": 8, "a": 3}}}')
    c = TrainOptions(out=str(tmp_path / "x.pt"), preset="egnn-tiny", bits_config=str(cfg)).model_config()
    assert isinstance(c, EGNNConfig) and len(c.layer_bits) == 25 and c.bits == 4
    assert c.bits_for("gnn.edge2node_net2.aggregation") == (8, 3)
    assert c.bits_for("backbone.conv_2.0") == (4, 4)
    assert build_model(c).gnn.edge2node_net2.aggregation.bits == (8, 3)


# ---------------------------------------------------------------- checkpoints

def test_our_egnn_checkpoint_round_trip(tmp_path):
    model, images, support = calibrated(4)
    before = model(images, support).logits
    path = save_checkpoint(model, str(tmp_path / "e.pt"), meta={"note": "x"})
    obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    assert obj["config"]["family"] == "egnn" and obj["config"]["bits"] == 4
    m2 = load_checkpoint(path).eval()
    assert isinstance(m2, EGNNModel) and m2.config == model.config
    assert torch.equal(m2(images, support).logits, before)
    assert m2.checkpoint_meta == {"note": "x"}
    assert read_checkpoint(path)["format"] == "qgnn-deploy/checkpoint"
    with pytest.raises(CheckpointError, match="ModelConfig \\(DPGN\\); pass an EGNNConfig"):
        load_checkpoint(path, preset_config("tiny", 4))
    obj["state_dict"].pop("gnn.edge2node_net0.aggregation.adj_quant.l")
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="adj_quant.l"):
        load_checkpoint(path)


def _unpack(state):
    return {k: (v["int8"].float() * v["scale"] if isinstance(v, dict) else v) for k, v in state.items()}


def test_official_egnn_file_loads_and_reproduces_fixture(tmp_path):
    fx = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    off = {"iteration": 5000, "val_acc": 0.5, "optimizer": {},
           "enc_module_state_dict": {f"module.{k}": v for k, v in _unpack(fx["enc_module_state_dict"]).items()},
           "gnn_module_state_dict": _unpack(fx["gnn_module_state_dict"])}
    assert is_official_egnn(off) and not is_official_dpgn(off)
    path = str(tmp_path / "model_best.pth.tar")
    torch.save(off, path)
    model = load_checkpoint(path).eval()            # default: egnn-miniimagenet, FP
    assert isinstance(model, EGNNModel) and model.checkpoint_meta["source"] == "official-egnn"
    ep, ref = fx["episode"], fx["outputs"]["non_transductive"]
    with torch.no_grad():
        scores = model(ep["images"].float(), ep["support_labels"]).logits
    assert float((scores - ref["scores"]).abs().max()) <= 1e-5 * max(1.0, float(ref["scores"].abs().max()))
    with pytest.raises(CheckpointError, match="official EGNN"):
        load_checkpoint(path, preset_config("resnet12-cifarfs"))
    # and a DPGN official file is still read as DPGN, not mistaken for EGNN
    dpgn = str(tmp_path / "dpgn.pth")
    torch.save(to_official_dpgn(build_model(preset_config("tiny"))), dpgn)
    assert isinstance(load_checkpoint(dpgn, preset_config("tiny")), QGNNModel)
    with pytest.raises(CheckpointError, match="official DPGN"):
        load_checkpoint(dpgn, preset_config("egnn-tiny"))


def test_official_layout_round_trip_and_neither(tmp_path):
    src = build_model(preset_config("egnn-tiny")).eval()
    path = str(tmp_path / "off.pth")
    torch.save(to_official_egnn(src), path)
    m = load_checkpoint(path, preset_config("egnn-tiny", 4))  # QAT starting point
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path)                       # egnn-miniimagenet widths: shape mismatches
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither .* DPGN or EGNN"):
        load_checkpoint(str(tmp_path / "other.pt"))


# ---------------------------------------------------------------- the loss

def _hand_loss(edges, labels, ns, transductive):
    """The official loss written out pair by pair in plain Python floats."""
    t, _, n, _ = edges[0].shape

    def bce(x, y):  # nn.BCELoss: logs clamped at -100
        return -(y * max(math.log(x) if x > 0 else -math.inf, -100.0)
                 + (1 - y) * max(math.log(1 - x) if x < 1 else -math.inf, -100.0))
    per_layer = []
    for e in edges:
        pn = pd = nn_ = nd = 0.0
        for b in range(t):
            for i in range(n):
                for j in range(n):
                    if i < ns and j < ns:
                        continue                     # support-support: not a query edge
                    if not transductive and i >= ns and j >= ns:
                        continue                     # query-query: out of the evaluation mask
                    y = 1.0 if int(labels[b, i]) == int(labels[b, j]) else 0.0
                    v = bce(1.0 - float(e[b, 0, i, j]), 1.0 - y)
                    if y:
                        pn, pd = pn + v, pd + 1
                    else:
                        nn_, nd = nn_ + v, nd + 1
        per_layer.append(pn / pd + nn_ / nd)
    w = [0.5] * (len(per_layer) - 1) + [1.0]
    return sum(a * b for a, b in zip(w, per_layer)) / len(per_layer), per_layer


@pytest.mark.parametrize("transductive", [False, True])
def test_egnn_loss_matches_hand_computation(transductive):
    g = torch.Generator().manual_seed(1)
    t, way, shot = 2, 3, 2
    ns, n = way * shot, way * shot + way
    support = torch.arange(way).repeat_interleave(shot).repeat(t, 1)
    query = torch.stack([torch.randperm(way, generator=g) for _ in range(t)])
    edges = []
    for _ in range(3):
        s = torch.rand(t, 1, n, n, generator=g) * 0.98 + 0.01
        if not transductive:
            s[:, :, ns:, ns:] = 0.0                  # as assembled from query graphs
        edges.append(torch.cat([s, 1 - s], 1))
    edges[1][0, 0, ns, 0] = 1.0                      # a saturated edge: BCE's -100 clamp
    logits = torch.randn(t, way, way, generator=g)
    out = EGNNOutput(logits, edges, torch.zeros(t, n, 4), None, transductive)
    parts = egnn_loss(out, support, query, way)
    labels = torch.cat([support, query], 1)
    want, layers = _hand_loss(edges, labels, ns, transductive)
    assert float(parts["loss"]) == pytest.approx(want, rel=1e-5)
    assert [float(v) for v in parts["layers"]] == pytest.approx(layers, rel=1e-5)
    assert float(parts["edge"]) == pytest.approx(layers[-1], rel=1e-5)
    assert float(parts["accuracy"]) == float((logits.argmax(-1) == query).float().mean())


def test_egnn_loss_on_the_model_backpropagates_and_prefers_truth():
    cfg = preset_config("egnn-tiny")
    images, support, query = next(episode_batches(cfg, 2, seed=0))
    model = build_model(cfg).train()
    out = model(images, support)
    parts = model_loss(model, out, support, query, cfg.way)
    assert torch.isfinite(parts["loss"]) and parts["loss"].requires_grad
    parts["loss"].backward()
    assert model.backbone.conv_1[0].weight.grad.abs().sum() > 0
    labels = torch.cat([support, query], 1)
    same = (labels[:, :, None] == labels[:, None, :]).float().clamp(0.02, 0.98).unsqueeze(1)
    perfect = [torch.cat([same, 1 - same], 1) for _ in out.edges]
    good = egnn_loss(EGNNOutput(out.logits.detach(), perfect, out.embeddings.detach(), None, True),
                     support, query, cfg.way)
    assert float(good["loss"]) < float(parts["loss"].detach())


# ---------------------------------------------------------------- distillation, recipe

def test_distillation_layers_for_egnn():
    model, images, support = calibrated(4)
    assert sorted(aqd_layers(model)) == [f"backbone.conv_{i}.0" for i in (2, 3, 4)]
    assert sorted(sqd_layers(model)) == [f"gnn.edge2node_net{l}.network.conv{c}"
                                         for l in range(3) for c in (0, 1)]
    aqd, sqd = AQD(model).attach(model), SQD(model, p=0.0).attach(model)
    model.train()
    model(images, support)
    assert float(aqd.pop_loss().detach()) > 0 and float(sqd.pop_loss().detach()) > 0
    aqd.detach(), sqd.detach()
    assert not aqd_layers(build_model(preset_config("egnn-tiny")))  # FP: nothing to distil


def test_egnn_recipe():
    fp = default_recipe(32, 1000, family="egnn")
    assert (fp.optimizer, fp.lr, fp.weight_decay, fp.lr_gamma, fp.lr_step) == ("adam", 1e-3, 1e-6, 0.5, 150)
    assert default_recipe(4, 1000, family="egnn") == default_recipe(4, 1000)  # QAT: the paper's
    assert default_recipe(2, 1000, family="egnn").optimizer == "sgd"


# ---------------------------------------------------------------- training

def test_train_fp_then_qat(tmp_path):
    fp, q = str(tmp_path / "fp.pt"), str(tmp_path / "w4.pt")
    s = train(TrainOptions(out=fp, bits=32, iterations=3, val_every=3, **RUN))
    assert s["iterations"] == 3 and math.isfinite(s["history"][-1]["loss"])
    ck = read_checkpoint(fp)
    assert ck["config"]["family"] == "egnn" and ck["meta"]["family"] == "egnn"
    assert ck["meta"]["transductive"] is False and ck["meta"]["recipe"]["lr_gamma"] == 0.5
    s = train(TrainOptions(out=q, bits=4, init=fp, iterations=2, slim=True, **RUN))
    assert math.isfinite(s["history"][-1]["loss"]) and 0 <= s["val"]["val_accuracy"] <= 1
    ck = read_checkpoint(q)
    assert ck["meta"]["aqd"] is True and ck["meta"]["sqd"] is True and "training" not in ck
    model = load_checkpoint(q)
    assert isinstance(model, EGNNModel) and model.config.bits == 4
    assert bool(model.backbone.conv_2[0].weight_quant.initialized)
    w_fp = read_checkpoint(fp)["state_dict"]["backbone.conv_1.0.weight"]
    assert (model.backbone.conv_1[0].weight - w_fp).abs().max() < 0.1   # started from the FP weights


def test_resume_equals_straight_run(tmp_path, monkeypatch):
    kw = dict(bits=4, iterations=4, lr_step=2, val_every=100, seed=3, **RUN)
    fp = str(tmp_path / "fp.pt")
    train(TrainOptions(out=fp, **{**kw, "bits": 32, "iterations": 1}))
    straight, resumed = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    train(TrainOptions(out=straight, init=fp, **kw))
    real_batch = trainer_mod._batch

    def interrupting(config, ds, opts, iteration):
        if iteration == 2:
            raise KeyboardInterrupt
        return real_batch(config, ds, opts, iteration)
    monkeypatch.setattr(trainer_mod, "_batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(TrainOptions(out=resumed, init=fp, **kw))
    monkeypatch.setattr(trainer_mod, "_batch", real_batch)
    train(TrainOptions(out=resumed, resume=True, **kw))
    a, b = read_checkpoint(straight)["state_dict"], read_checkpoint(resumed)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    with pytest.raises(CheckpointError, match="EGNN run"):
        train(TrainOptions(out=resumed, resume=True, **{**kw, "preset": "tiny"}))


def test_transductive_training_and_cli(tmp_path, capsys):
    from qgnn_deploy.cli import main
    out = str(tmp_path / "t.pt")
    assert main(["train", "--preset", "egnn-tiny", "--bits", "3", "--transductive", "--iterations", "1",
                 "--tasks", "2", "--val-episodes", "2", "--no-progress", "--no-aqd", "--out", out]) == 0
    ck = read_checkpoint(out)
    assert ck["config"]["transductive"] is True and ck["meta"]["aqd"] is False
    assert ck["meta"]["command"][0] == "qgnn-deploy"


def test_errors(tmp_path, capsys):
    from qgnn_deploy.cli import main
    out = str(tmp_path / "x.pt")
    base = ["train", "--preset", "egnn-tiny", "--iterations", "1", "--tasks", "2", "--no-progress", "--out", out]
    assert main(base + ["--bits", "4", "--node-bits", "2,4"]) == 2
    assert "--node-bits (per-node aggregation widths) is DPGN-only" in capsys.readouterr().err
    cfg = tmp_path / "b.json"
    cfg.write_text('{"default": {"w": 4, "a": 4}, "layers": {"backbone.layer1.*": {"w": 2, "a": 2}}}')
    assert main(base + ["--bits-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "match no quantizable layer" in err and "backbone.conv_2.0" in err
    assert main(["train", "--preset", "tiny", "--transductive", "--iterations", "1", "--out", out]) == 2
    assert "EGNN option" in capsys.readouterr().err
    dpgn = save_checkpoint(build_model(preset_config("tiny")), str(tmp_path / "dpgn.pt"))
    assert main(base + ["--bits", "4", "--init", dpgn]) == 2
    assert "holds a DPGN model; this run trains EGNN" in capsys.readouterr().err
    off = str(tmp_path / "off.pth")
    torch.save(to_official_dpgn(build_model(preset_config("tiny"))), off)
    assert main(base + ["--bits", "4", "--init", off]) == 2
    assert "official DPGN checkpoint" in capsys.readouterr().err
    assert not os.path.exists(out)


# ---------------------------------------------------------------- evaluation, sources, report

def test_results_script_and_shipped_assets(tmp_path, capsys):
    from qgnn_deploy.sources import Source, embedded_checkpoint, load_float_model
    from qgnn_deploy.training.results import main
    for bits in (32, 4):
        path = embedded_checkpoint("egnn-tiny", bits)
        assert path and os.path.getsize(path) < 2 * 2 ** 20, path
        meta = read_checkpoint(path)["meta"]
        assert meta["family"] == "egnn" and "train" in meta["command"] and "--slim" in meta["command"]
        m = load_float_model(Source("preset", preset="egnn-tiny", bits=bits))
        assert isinstance(m, EGNNModel) and m.config.bits == bits and not m.training
    assert main([embedded_checkpoint("egnn-tiny", 4), "--episodes", "10", "--json"]) == 0
    cap = capsys.readouterr()
    assert "non-transductive" in cap.err and '"family": "egnn"' in cap.out


def test_report_counts_egnn(capsys):
    from qgnn_deploy.cli import main
    from qgnn_deploy.report import count_bit_flops
    model, _, _ = calibrated(4)
    rep = count_bit_flops(model, per_image_backbone=True)
    tot = rep.total()
    quant = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".l", ".r")))
    assert tot["params"] + tot["quantizer_params"] == sum(p.numel() for p in model.parameters())
    assert tot["quantizer_params"] == quant and not rep.uncounted
    names = {l.name: l for l in rep.layers}
    assert names["backbone.conv_1.0"].w_bits == 32 and names["backbone.conv_2.0"].w_bits == 4
    assert names["gnn.node2edge_net0.sim_network.conv_out"].w_bits == 32
    assert names["gnn.edge2node_net0.aggregation"].kind == "aggregation"
    assert tot["bit_flops_reduction"] > 2 and "pairwise_difference" in rep.elementwise
    fp = count_bit_flops(build_model(preset_config("egnn-tiny")).eval(), per_image_backbone=True).total()
    assert fp["params"] == tot["params"] and fp["bit_flops"] == tot["fp32_bit_flops"]
    assert main(["report", "--preset", "egnn-tiny", "--bits", "4", "--markdown"]) == 0
    assert "backbone.conv_2.0" in capsys.readouterr().out
