"""EGNN: parity with the official code (fixture made by scripts/make_egnn_fixture.py),
official checkpoint keys, QAT forward / backward, bad checkpoints, bad episodes."""
import math
import os

import pytest
import torch

from qgnn_deploy.config import ModelConfig
from qgnn_deploy.errors import CheckpointError, ConfigError, InputError
from qgnn_deploy.models import QAggregation, QConv2d, QLinear, quantizable_layers
from qgnn_deploy.models.egnn import (EGNN_PRESETS, EGNNConfig, assemble_query_graphs, build_egnn,
                                     egnn_preset, initial_edges, is_official_egnn, load_official_egnn,
                                     query_graph_edges, to_official_egnn)
from qgnn_deploy.models.layers import F64Conv2d

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "egnn_official", "fixture.pt")
MODES = ("non_transductive", "transductive")


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def unpack(state):
    """The fixture's state dict with its int8-stored weights expanded (codes * scale)."""
    return {k: (v["int8"].float() * v["scale"] if isinstance(v, dict) else v) for k, v in state.items()}


def official_checkpoint(fx, prefix=""):
    """The fixture's weights in the layout the official trainer saves."""
    return {"iteration": 5000,
            "enc_module_state_dict": {prefix + k: v for k, v in unpack(fx["enc_module_state_dict"]).items()},
            "gnn_module_state_dict": {prefix + k: v for k, v in unpack(fx["gnn_module_state_dict"]).items()},
            "val_acc": 0.5, "optimizer": {"state": {}, "param_groups": []}}


@pytest.fixture(scope="module")
def ours(official):
    torch.set_num_threads(1)
    model = load_official_egnn(official_checkpoint(official, prefix="module.")).eval()
    ep = official["episode"]
    with torch.no_grad():
        outs = {mode: model(ep["images"].float(), ep["support_labels"], transductive=(mode == "transductive"))
                for mode in MODES}
    return model, outs


def assert_close(got, ref, what, rel=1e-5):
    """|got - ref| <= rel * max(1, max |ref|)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs official {tuple(ref.shape)}"
    tol = rel * max(1.0, float(ref.abs().max()))
    err = float((got.float() - ref.float()).abs().max())
    assert err <= tol, f"{what}: max |ours - official| = {err:.3g} > {tol:.3g}"


def test_fixture_is_small_and_official(official):
    total = sum(os.path.getsize(os.path.join(os.path.dirname(FIXTURE), f))
                for f in os.listdir(os.path.dirname(FIXTURE)))
    assert total <= 3 * 2 ** 20
    assert official["official"]["repository"] == "khy0809/fewshot-egnn"
    assert official["settings"]["num_layers"] == 3
    for mode in MODES:  # the predictions are not decided by a rounding tie
        assert official["outputs"][mode]["min_margin"] > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_fp_model_reproduces_official_outputs(official, ours, mode):
    model, outs = ours
    ref, out = official["outputs"][mode], outs[mode]
    ep = official["episode"]
    t, n = ep["images"].shape[:2]
    ns = ep["support_labels"].shape[1]
    assert_close(out.embeddings, ref["embeddings"], "embeddings")
    assert len(out.edges) == len(ref["layer_edges"]) == 3
    if mode == "transductive":
        assert torch.equal(initial_edges(ep["support_labels"], n - ns), ref["gnn_input_edges"])
        graphs = out.edges
    else:
        # one graph per (task, query), task-major, the query last: nodes and initial edges
        init = query_graph_edges(ep["support_labels"])
        init = init.unsqueeze(1).expand(t, n - ns, *init.shape[1:]).reshape(ref["gnn_input_edges"].shape)
        assert torch.equal(init, ref["gnn_input_edges"])
        assert out.query_graph_edges is not None
        graphs = [g.reshape(r.shape) for g, r in zip(out.query_graph_edges, ref["layer_edges"])]
    for l, (g, r) in enumerate(zip(graphs, ref["layer_edges"])):
        assert_close(g, r, f"layer {l} edges")
    assert_close(out.edges[-1], ref["full_edges"], "assembled last-layer edges")
    assert_close(out.logits, ref["scores"], "query scores")
    assert torch.equal(out.logits.argmax(-1), ref["predictions"])
    acc = (out.logits.argmax(-1) == ep["query_labels"]).float().mean().item()
    assert math.isclose(acc, ref["accuracy"], abs_tol=1e-6)
    # every layer's edge channels sum to 1 (the official re-normalisation)
    assert torch.allclose(out.edges[0].sum(1)[..., :ns, :ns], torch.ones(t, ns, ns), atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_graph_alone_matches_official_from_its_inputs(official, ours, mode):
    model, _ = ours
    ref = official["outputs"][mode]
    with torch.no_grad():
        edges = model.gnn(ref["gnn_input_nodes"], ref["gnn_input_edges"])
    for l, (e, r) in enumerate(zip(edges, ref["layer_edges"])):
        assert_close(e, r, f"layer {l} edges", rel=5e-6)


def test_fp_model_has_exactly_the_official_keys(official):
    model = build_egnn(EGNN_PRESETS["egnn-miniimagenet"])
    own = model.state_dict()
    expected = {}
    for part, prefix in (("enc_module_state_dict", "backbone."), ("gnn_module_state_dict", "gnn.")):
        expected.update({prefix + k: v for k, v in unpack(official[part]).items()})
    assert list(own) == list(expected)  # same keys, same order, no quantizer entries
    assert all(own[k].shape == v.shape for k, v in expected.items())
    assert "backbone.conv_1.0.weight" in own and "gnn.node2edge_net2.sim_network.conv_out.bias" in own


def test_official_key_round_trip(official):
    ckpt = official_checkpoint(official, prefix="module.")  # as DataParallel saves it
    assert is_official_egnn(ckpt)
    back = to_official_egnn(load_official_egnn(ckpt))
    assert set(back) == {"iteration", "enc_module_state_dict", "gnn_module_state_dict", "val_acc",
                         "optimizer"}
    assert back["iteration"] == 5000 and back["val_acc"] == 0.5
    plain = official_checkpoint(official)
    for part in ("enc_module_state_dict", "gnn_module_state_dict"):
        assert list(back[part]) == list(plain[part])
        for k, v in plain[part].items():
            assert torch.equal(back[part][k], v), k


def test_quantized_model_loads_an_official_checkpoint_and_drops_ranges_on_export(official):
    config = egnn_preset("egnn-miniimagenet", 4, image_size=32)  # 32 px: same weights but the Linear
    with pytest.raises(CheckpointError, match="layer_last.0.weight"):
        load_official_egnn(official_checkpoint(official), config)
    model = load_official_egnn(official_checkpoint(official), egnn_preset("egnn-miniimagenet", 4))
    assert any(k.endswith("act_quant.l") for k in model.state_dict())
    back = to_official_egnn(model)
    assert list(back["gnn_module_state_dict"]) == list(official["gnn_module_state_dict"])


def test_missing_or_extra_key_is_named(official):
    ckpt = official_checkpoint(official)
    del ckpt["gnn_module_state_dict"]["node2edge_net1.sim_network.conv2.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): gnn.node2edge_net1.sim_network.conv2.weight"):
        load_official_egnn(ckpt)
    ckpt = official_checkpoint(official)
    ckpt["enc_module_state_dict"]["conv_5.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): backbone.conv_5.0.weight"):
        load_official_egnn(ckpt)
    ckpt = official_checkpoint(official)
    del ckpt["enc_module_state_dict"]
    with pytest.raises(CheckpointError, match="enc_module_state_dict is missing"):
        load_official_egnn(ckpt)
    # a 2-layer model does not take a 3-layer checkpoint
    with pytest.raises(CheckpointError, match="unexpected keys.*edge2node_net2"):
        load_official_egnn(official_checkpoint(official), egnn_preset("egnn-miniimagenet", num_layers=2))
    # strict=False loads what fits
    ckpt = official_checkpoint(official)
    ckpt["enc_module_state_dict"]["extra"] = torch.zeros(1)
    load_official_egnn(ckpt, strict=False)


def tiny_episode(config, tasks=3):
    images = torch.randn(tasks, config.num_nodes, 3, config.image_size, config.image_size)
    labels = torch.arange(config.way).repeat_interleave(config.shot).repeat(tasks, 1)
    return images, labels


@pytest.mark.parametrize("transductive", [False, True])
def test_tiny_qat_forward_backward_has_finite_gradients(transductive):
    config = egnn_preset("egnn-tiny", 4, transductive=transductive)
    model = build_egnn(config).train()
    images, labels = tiny_episode(config)
    out = model(images, labels)
    assert out.logits.shape == (3, config.way, config.way)
    assert out.embeddings.shape == (3, config.num_nodes, config.emb_dim)
    assert len(out.edges) == config.num_layers and out.edges[0].shape == (3, 2, config.num_nodes,
                                                                         config.num_nodes)
    queries = torch.randperm(config.way).repeat(3, 1)
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, config.way), queries.reshape(-1))
    loss = loss + sum(e[:, 0].mean() for e in out.edges)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    # the PQ ranges learn too
    assert any(n.endswith("act_quant.l") and g.abs().sum() > 0 for n, g in grads.items())


def test_quantizable_layers_and_fp32_layers():
    model = build_egnn(egnn_preset("egnn-tiny", 2))
    assert type(model.backbone.conv_1[0]) is F64Conv2d
    for l in range(3):
        last = getattr(model.gnn, f"node2edge_net{l}").sim_network.conv_out
        assert type(last) is F64Conv2d and last.bias is not None
    layers = quantizable_layers(model)
    assert {type(m) for m in layers.values()} == {QConv2d, QLinear, QAggregation}
    assert all(m.bits == (2, 2) for m in layers.values())
    # 3 encoder convs + linear, per layer 2 node convs + aggregation + 4 edge convs
    assert len(layers) == 4 + 3 * 7
    assert "gnn.edge2node_net1.aggregation" in layers and "backbone.conv_2.0" in layers
    # FP model: no quantizer at all
    fp = build_egnn(egnn_preset("egnn-tiny"))
    assert not any(m.quantized for m in quantizable_layers(fp).values())


def test_layer_bits_override_and_unknown_layer():
    config = egnn_preset("egnn-tiny", 4, layer_bits={"gnn.edge2node_net0.aggregation": {"w": 8, "a": 4},
                                                    "backbone.conv_2.0": 32})
    layers = quantizable_layers(build_egnn(config))
    assert layers["gnn.edge2node_net0.aggregation"].bits == (8, 4)
    assert not layers["backbone.conv_2.0"].quantized and layers["backbone.conv_3.0"].bits == (4, 4)
    with pytest.raises(ConfigError, match="unknown layers.*backbone.conv_1.0"):
        build_egnn(egnn_preset("egnn-tiny", 4, layer_bits={"backbone.conv_1.0": 4}))


def test_config_round_trip_and_validation():
    for config in EGNN_PRESETS.values():
        assert EGNNConfig.from_dict(config.to_dict()) == config
    c = egnn_preset("egnn-tiny", 3, layer_bits={"gnn.node2edge_net0.sim_network.conv1": (4, 8)})
    assert EGNNConfig.from_dict(c.to_dict()) == c
    official = EGNN_PRESETS["egnn-miniimagenet"]
    assert (official.widths, official.emb_dim, official.node_features, official.edge_features,
            official.num_layers, official.dropout, official.image_size) == ((64, 96, 128, 256), 128, 96,
                                                                            96, 3, 0.1, 84)
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict(official.to_dict())  # an EGNN config is never read as DPGN's
    with pytest.raises(ConfigError, match="family"):
        EGNNConfig.from_dict({**official.to_dict(), "family": "dpgn"})
    with pytest.raises(ConfigError, match="unknown EGNN config keys"):
        EGNNConfig.from_dict({"generations": 3})
    for bad in (dict(way=1), dict(image_size=64), dict(widths=(1, 2, 3)), dict(num_layers=0),
                dict(dropout=1.0), dict(encoder_dropout=(0.4,)), dict(bits=5), dict(weight_granularity="row")):
        with pytest.raises(ConfigError):
            egnn_preset("egnn-tiny", **bad)
    with pytest.raises(ConfigError, match="unknown EGNN preset"):
        egnn_preset("egnn-huge")


def test_wrong_episodes_raise():
    config = egnn_preset("egnn-tiny")
    model = build_egnn(config).eval()
    images, labels = tiny_episode(config, 2)
    with pytest.raises(InputError, match="5-D"):
        model(images[0], labels)
    with pytest.raises(InputError, match="images per task"):
        model(images[:, :-1], labels)
    with pytest.raises(InputError, match="3x32x32"):
        model(torch.randn(2, config.num_nodes, 3, 84, 84), labels)
    with pytest.raises(InputError, match="support_labels"):
        model(images, labels[:, :-1])
    with pytest.raises(InputError, match="support_labels"):
        model(images, labels.float())
    with pytest.raises(InputError, match="lie in"):
        model(images, labels + 1)
    bad = images.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        model(bad, labels)


def test_non_transductive_queries_do_not_see_each_other():
    config = egnn_preset("egnn-tiny", dropout=0.0, encoder_dropout=(0.0, 0.0))
    model = build_egnn(config)
    images, labels = tiny_episode(config, 2)
    with torch.no_grad():
        # BatchNorm statistics of real activations (a fresh model's unit statistics make
        # every similarity equal in eval mode)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 1.0
        model.train()(images, labels, transductive=True)
        model.eval()
        a = model(images, labels).logits
        changed = images.clone()
        changed[:, -1] = torch.randn_like(changed[:, -1])  # another last query
        b = model(changed, labels).logits
        c = model(images, labels, transductive=True).logits
        d = model(changed, labels, transductive=True).logits
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])
    assert not torch.allclose(c[:, :-1], d[:, :-1])  # transductive: every query sees the others


def test_assembly_of_query_graphs():
    g = torch.rand(2, 3, 2, 4, 4)  # T=2, Q=3 queries, NS=3 supports
    full = assemble_query_graphs(g, 6)
    assert torch.allclose(full[:, :, :3, :3], g[:, :, :, :3, :3].mean(1))
    assert torch.equal(full[1, 0, 2, 3 + 1], g[1, 1, 0, 2, 3])   # support 2 -> query 1
    assert torch.equal(full[1, 1, 3 + 2, 0], g[1, 2, 1, 3, 0])   # query 2 -> support 0
    assert torch.equal(full[:, :, 3:, 3:], torch.zeros(2, 2, 3, 3))
