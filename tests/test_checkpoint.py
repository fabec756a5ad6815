"""Checkpoints: our format round trip and official DPGN loading."""
import pytest
import torch

from qgnn_deploy.checkpoint import (load_checkpoint, load_official_dpgn, save_checkpoint,
                                    to_official_dpgn)
from qgnn_deploy.config import preset_config
from qgnn_deploy.errors import CheckpointError
from qgnn_deploy.models import build_model


def episode(config, tasks=2):
    images = torch.randn(tasks, config.num_nodes, 3, config.image_size, config.image_size)
    labels = torch.arange(config.way).repeat_interleave(config.shot).repeat(tasks, 1)
    return images, labels


def official_layout(model, prefix=True):
    """A checkpoint exactly as the official DPGN trainer writes it."""
    d = to_official_dpgn(model)
    if prefix:  # DataParallel-saved models carry a 'module.' prefix
        d["enc_module_state_dict"] = {f"module.{k}": v for k, v in d["enc_module_state_dict"].items()}
        d["gnn_module_state_dict"] = {f"module.{k}": v for k, v in d["gnn_module_state_dict"].items()}
    return d


def test_official_layout_keys_look_official():
    d = official_layout(build_model(preset_config("tiny")), prefix=False)
    gnn = d["gnn_module_state_dict"]
    # dropout generations: conv/BN at 0,1,4,5 and the last conv at 8; last generation shifted
    assert "point_sim_generation_0.point_sim_transform.8.weight" in gnn
    assert "point_sim_generation_1.point_sim_transform.6.weight" in gnn
    assert "initial_edge.point_sim_transform.8.bias" in gnn
    assert "distribution2point_generation_1.point_node_transform.3.weight" in gnn
    assert "layer1.0.conv.weight" in d["enc_module_state_dict"]
    assert "layer_second.0.weight" in d["enc_module_state_dict"]


@pytest.mark.parametrize("bits", [32, 4])
def test_official_round_trip(tmp_path, bits):
    src = build_model(preset_config("tiny")).eval()
    path = tmp_path / "model_best.pth.tar"
    torch.save(official_layout(src), path)
    m = load_checkpoint(str(path), preset_config("tiny", bits)).eval()
    images, labels = episode(m.config)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    if bits == 32:
        assert torch.equal(m(images, labels).logits, src(images, labels).logits)
    else:  # QAT starting point: quantizer ranges initialised on the first batch
        assert m(images, labels).logits.shape == (2, 5, 5)


def test_official_checkpoint_into_model_without_dropout_renumbers_edge_mlps():
    src = build_model(preset_config("tiny"))
    m = load_official_dpgn(official_layout(src), preset_config("tiny", dropout=0.0))
    a = src.gnn.point_sim_generation_0.point_sim_transform[8].weight
    b = m.gnn.point_sim_generation_0.point_sim_transform[6].weight
    assert torch.equal(a, b)


def test_key_mismatch_lists_missing_and_unexpected(tmp_path):
    d = official_layout(build_model(preset_config("tiny")))
    d["gnn_module_state_dict"].pop("module.initial_edge.point_sim_transform.0.weight")
    d["gnn_module_state_dict"]["module.extra_layer.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_official_dpgn(d, preset_config("tiny"))
    msg = str(e.value)
    assert "missing keys (1): gnn.initial_edge.point_sim_transform.0.weight" in msg
    assert "unexpected keys (1): gnn.extra_layer.weight" in msg


def test_shape_mismatch_is_reported():
    d = official_layout(build_model(preset_config("tiny")))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_official_dpgn(d, preset_config("resnet12-cifarfs"))


def test_our_checkpoint_round_trip(tmp_path):
    m = build_model(preset_config("tiny", 3)).eval()
    images, labels = episode(m.config)
    before = m(images, labels).logits
    path = save_checkpoint(m, str(tmp_path / "q.pt"), meta={"note": "x"})
    m2 = load_checkpoint(path).eval()
    assert m2.config == m.config
    assert torch.equal(m2(images, labels).logits, before)
    assert m2.checkpoint_meta == {"note": "x"}


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(str(junk))
    good = save_checkpoint(build_model(preset_config("tiny", 4)), str(tmp_path / "g.pt"))
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(str(trunc))
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    import pickle
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"format": "qgnn-deploy/checkpoint", "x": Evil()}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(p))


def test_quantized_checkpoint_missing_quantizer_params_fails(tmp_path):
    m = build_model(preset_config("tiny", 4))
    path = save_checkpoint(m, str(tmp_path / "q.pt"))
    obj = torch.load(path, weights_only=True)
    obj["state_dict"].pop("backbone.layer1.0.conv1.act_quant.l")
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="act_quant.l"):
        load_checkpoint(path)
