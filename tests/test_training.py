"""AQD / SQD losses, the DPGN loss, the recipe, a short training run, resume equivalence."""

import pytest
import torch
from torch import nn

from qgnn_deploy.checkpoint import load_checkpoint, read_checkpoint
from qgnn_deploy.config import preset_config
from qgnn_deploy.data import calibration_episodes, episode_batches
from qgnn_deploy.models import build_model
from qgnn_deploy.training import (AQD, SQD, Distillation, TrainOptions, aqd_layer_loss, default_recipe,
                                  dpgn_loss, gram, sqd_layer_loss, train)
from qgnn_deploy.training import trainer as trainer_mod

SMALL = dict(widths=(8, 8, 16, 16), emb_dim=8, generations=2)


def _small(bits=4, **kw):
    return preset_config("tiny", bits, **{**SMALL, **kw})


class _Identity(nn.Module):
    def forward(self, x):
        return x


def _identity_quantizers(model):
    for m in model.modules():
        for q in ("weight_quant", "act_quant"):
            if getattr(m, q, None) is not None:
                setattr(m, q, _Identity())


# ---------------------------------------------------------------- AQD

def test_aqd_layer_loss_zero_iff_equal():
    mlp = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 1))  # 4x4 maps: 16 inputs
    a = torch.randn(6, 5, 4, 4)
    assert float(aqd_layer_loss(a, a.clone(), mlp).detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(aqd_layer_loss(a, a + 0.3 * torch.randn_like(a), mlp).detach()) > 1e-3
    # per-channel positive scaling is normalised away (BN + unit norm): still zero
    assert float(aqd_layer_loss(a, 3.0 * a, mlp).detach()) == pytest.approx(0.0, abs=1e-5)


def test_aqd_hooks_zero_when_quantized_equals_fp():
    cfg = _small(4, dropout=0.0)
    images, support = calibration_episodes(cfg, 2, 0)
    model = build_model(cfg).train()
    aqd = AQD(model).attach(model)
    assert len(aqd.layer_names) == 16           # 4 blocks x 4 convs; the stem stays FP32
    model(images, support)
    assert float(aqd.pop_loss()) > 1e-4          # 4-bit differs from FP
    _identity_quantizers(model)
    model(images, support)
    assert float(aqd.pop_loss()) == pytest.approx(0.0, abs=1e-6)
    aqd.detach()
    model(images, support)
    assert float(aqd.pop_loss()) == 0.0          # detached: nothing recorded


# ---------------------------------------------------------------- SQD

def test_sqd_layer_loss():
    p = torch.randn(3, 10, 8)
    assert float(sqd_layer_loss(p, p.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(sqd_layer_loss(p, p + 0.5 * torch.randn_like(p))) > 1e-3
    g = gram(p)
    assert torch.allclose(g.flatten(1).norm(dim=1), torch.ones(3))


def test_sqd_hooks_zero_when_always_quantized():
    cfg = _small(2, dropout=0.0)
    images, support = calibration_episodes(cfg, 2, 0)
    model = build_model(cfg).train()
    with torch.no_grad():
        model(images, support)  # initialise PQ ranges
    sqd = SQD(model, p=1.0).attach(model)   # SQ = PQ always: P_rand == P_full
    assert len(sqd.layer_names) == 3 * cfg.generations
    model(images, support)
    assert float(sqd.pop_loss()) == pytest.approx(0.0, abs=1e-6)
    sqd.p = 0.0                             # SQ = identity: FP product vs 2-bit product
    model(images, support)
    assert float(sqd.pop_loss()) > 1e-4
    sqd.detach()


def test_distillation_outside_state_dict_and_inference_path():
    cfg = _small(3, dropout=0.0)
    images, support = calibration_episodes(cfg, 2, 0)
    model = build_model(cfg).train()
    with torch.no_grad():
        ref = model(images, support).logits
    keys = set(model.state_dict())
    dist = Distillation(model).attach(model)
    with torch.no_grad():
        out = model(images, support).logits
    assert set(model.state_dict()) == keys      # nothing added to what fold sees
    assert torch.allclose(out, ref, atol=1e-6)  # the hooks observe, they do not change outputs
    losses = dist.pop_losses()
    assert float(losses["aqd"]) > 0 and float(losses["total"]) > 0
    model.eval()
    model(images, support)
    assert float(dist.pop_losses()["total"]) == 0.0  # nothing runs at inference
    assert all(not k.startswith(("backbone", "gnn")) for k in dist.state_dict())


# ---------------------------------------------------------------- loss, recipe

def test_dpgn_loss_prefers_correct_edges():
    cfg = _small(32)
    images, support, query = next(episode_batches(cfg, 2, seed=0))
    model = build_model(cfg).train()
    out = model(images, support)
    parts = dpgn_loss(out, support, query, cfg.way)
    assert torch.isfinite(parts["loss"]) and parts["loss"].requires_grad
    parts["loss"].backward()
    labels = torch.cat([support, query], 1)
    perfect = (labels[:, :, None] == labels[:, None, :]).float().clamp(0.02, 0.98)
    for l in range(cfg.generations):
        out.point_edges[l] = perfect
        out.distribution_edges[l] = perfect
    out.logits = torch.nn.functional.one_hot(query, cfg.way).float()
    good = dpgn_loss(out, support, query, cfg.way)
    assert float(good["edge"]) < float(parts["edge"]) and float(good["accuracy"]) == 1.0


def test_recipe_defaults():
    fp, w4, w3, w2 = (default_recipe(b, 1000) for b in (32, 4, 3, 2))
    assert (fp.optimizer, fp.lr, fp.weight_decay, fp.lr_step) == ("adam", 1e-3, 1e-5, 150)
    assert (w4.optimizer, w4.lr) == ("adam", 1e-2) and (w3.optimizer, w3.lr) == ("adam", 1e-2)
    assert (w2.optimizer, w2.lr) == ("sgd", 3e-3)
    assert default_recipe(2, 1000, optimizer="adam", lr=1e-3, lr_step=400).lr_step == 400


# ---------------------------------------------------------------- training runs

def test_short_training_beats_chance(tmp_path):
    """FP tiny model, 80 iterations of 10 episodes: well above 5-way chance (20%)."""
    from qgnn_deploy.evaluate import evaluate, model_predict
    torch.set_num_threads(1)
    out = str(tmp_path / "fp.pt")
    summary = train(TrainOptions(out=out, preset="tiny", bits=32, iterations=80, tasks=10,
                                 lr_step=1000, val_every=80, val_episodes=50, progress=False, slim=True))
    assert summary["iterations"] == 80
    model = load_checkpoint(out).eval()
    r = evaluate(model_predict(model), model.config, episodes=100, seed=5, progress=False)
    assert r["accuracy"] > 0.35, r
    assert "training" not in read_checkpoint(out)  # --slim


def _state(path):
    return read_checkpoint(path)["state_dict"]


def test_resume_after_interrupt_equals_straight_run(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg_kw = dict(preset="tiny", bits=4, iterations=4, tasks=2, lr_step=2, val_every=100,
                  val_episodes=5, progress=False, seed=3)
    fp = str(tmp_path / "fp.pt")
    train(TrainOptions(out=fp, **{**cfg_kw, "bits": 32, "iterations": 1}))
    straight = str(tmp_path / "a.pt")
    train(TrainOptions(out=straight, init=fp, **cfg_kw))

    resumed = str(tmp_path / "b.pt")
    real_batch = trainer_mod._batch

    def interrupting(config, ds, opts, iteration):
        if iteration == 2:
            raise KeyboardInterrupt
        return real_batch(config, ds, opts, iteration)
    monkeypatch.setattr(trainer_mod, "_batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(TrainOptions(out=resumed, init=fp, **cfg_kw))
    assert read_checkpoint(resumed)["training"]["iteration"] == 2
    monkeypatch.setattr(trainer_mod, "_batch", real_batch)
    train(TrainOptions(out=resumed, resume=True, **cfg_kw))
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    da, db = read_checkpoint(straight)["distill"], read_checkpoint(resumed)["distill"]
    for k in da:
        assert torch.allclose(da[k], db[k], atol=1e-6), k


def test_train_command_qat_from_fp(tmp_path):
    from qgnn_deploy.cli import main
    torch.set_num_threads(1)
    fp, q = str(tmp_path / "fp.pt"), str(tmp_path / "w2.pt")
    assert main(["train", "--preset", "tiny", "--bits", "32", "--iterations", "2", "--tasks", "2",
                 "--val-episodes", "5", "--no-progress", "--out", fp]) == 0
    assert main(["train", "--preset", "tiny", "--bits", "2", "--init", fp, "--iterations", "2",
                 "--tasks", "2", "--val-episodes", "5", "--no-progress", "--no-aqd", "--slim",
                 "--out", q]) == 0
    ck = read_checkpoint(q)
    assert ck["config"]["bits"] == 2 and ck["meta"]["aqd"] is False and ck["meta"]["sqd"] is True
    assert ck["meta"]["recipe"]["optimizer"] == "sgd" and "distill" not in ck
    model = load_checkpoint(q)
    assert model.config.bits == 2
    # the FP weights were the starting point: the stem conv (FP32 in every model) moved little
    w_fp = read_checkpoint(fp)["state_dict"]["backbone.conv1.weight"]
    assert (model.backbone.conv1.weight - w_fp).abs().max() < 0.1
    assert main(["train", "--preset", "tiny", "--bits", "2", "--out", q, "--resume",
                 "--iterations", "3"]) == 2  # slim checkpoints are not resumable: clean error


def test_init_from_official_dpgn_layout(tmp_path):
    """QAT can start from an official DPGN checkpoint dict (enc/gnn state dicts)."""
    from qgnn_deploy.checkpoint import to_official_dpgn
    from qgnn_deploy.training import init_from
    fp = build_model(_small(32))
    path = str(tmp_path / "official.pth")
    obj = to_official_dpgn(fp)
    obj["enc_module_state_dict"] = {f"module.{k}": v for k, v in obj["enc_module_state_dict"].items()}
    torch.save(obj, path)
    q = init_from(path, _small(2))
    assert q.config.bits == 2
    assert torch.equal(q.backbone.layer2[0].conv2.weight, fp.backbone.layer2[0].conv2.weight)
    assert not bool(q.backbone.layer2[0].conv2.weight_quant.initialized)  # set from the first batch
