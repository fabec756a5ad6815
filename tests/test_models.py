"""The reference model: shapes, parameter counts, mixed precision, bad configs."""
import subprocess
import sys

import pytest
import torch

from qgnn_deploy.config import ModelConfig, preset_config
from qgnn_deploy.errors import ConfigError, InputError
from qgnn_deploy.models import QAggregation, QConv2d, QLinear, build_model, quantizable_layers
from qgnn_deploy.models.layers import F64Conv2d


def episode(config, tasks=2):
    images = torch.randn(tasks, config.num_nodes, 3, config.image_size, config.image_size)
    labels = torch.arange(config.way).repeat_interleave(config.shot).repeat(tasks, 1)
    return images, labels


def test_paper_model_parameter_count_matches_official_dpgn():
    m = build_model(preset_config("resnet12-cifarfs"))
    assert sum(p.numel() for p in m.backbone.parameters()) == 4_040_768
    assert sum(p.numel() for p in m.gnn.parameters()) == 1_060_609
    assert sum(p.numel() for p in m.parameters()) == 5_101_377


@pytest.mark.parametrize("shot,size", [(1, 32), (5, 32), (1, 84), (5, 84)])
def test_forward_shapes(shot, size):
    config = preset_config("tiny", 4, shot=shot, image_size=size, generations=2)
    m = build_model(config).eval()
    images, labels = episode(config)
    with torch.no_grad():
        out = m(images, labels)
    assert out.logits.shape == (2, config.way, config.way)
    assert len(out.point_edges) == config.generations
    n = config.num_nodes
    assert out.point_edges[-1].shape == (2, n, n)
    # edge rows are normalised
    assert torch.allclose(out.point_edges[-1].sum(-1), torch.ones(2, n), atol=1e-5)


def test_any_number_of_generations():
    for g in (1, 3):
        m = build_model(preset_config("tiny", 32, generations=g)).eval()
        assert len(m(*episode(m.config)).point_edges) == g


def test_fp32_layers_stay_fp32_and_the_rest_is_quantized():
    m = build_model(preset_config("tiny", 2))
    # the paper's FP32 layers: plain convs whose products are summed in float64
    assert type(m.backbone.conv1) is F64Conv2d
    last = m.gnn.point_sim_generation_0.point_sim_transform[-1]
    assert type(last) is F64Conv2d and last.bias is not None
    assert type(m.gnn.initial_edge.point_sim_transform[-1]) is F64Conv2d
    layers = quantizable_layers(m)
    assert all(layer.bits == (2, 2) for layer in layers.values())
    kinds = {type(layer) for layer in layers.values()}
    assert kinds == {QConv2d, QLinear, QAggregation}


def test_fp32_layers_sum_in_float64():
    """F64Conv2d is nn.Conv2d's maths with float64 sums rounded once to float32."""
    torch.manual_seed(0)
    conv = F64Conv2d(3, 8, 3, padding=1, bias=True)
    x = torch.randn(2, 3, 9, 9)
    want = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1).float()
    assert conv(x).dtype == torch.float32 and torch.equal(conv(x), want)
    assert torch.allclose(conv(x), torch.nn.Conv2d.forward(conv, x), atol=1e-5)


def test_mixed_per_layer_bits():
    name_conv = "backbone.layer2.0.conv2"
    name_agg = "gnn.distribution2point_generation_1.aggregation"
    config = preset_config("tiny", 4, layer_bits={name_conv: 2, name_agg: 8,
                                                  "gnn.point_sim_generation_0.point_sim_transform.0": 32})
    m = build_model(config)
    layers = quantizable_layers(m)
    assert layers[name_conv].bits == (2, 2) and layers[name_conv].weight_quant.bits == 2
    assert layers[name_agg].bits == (8, 8) and layers[name_agg].adj_quant.bits == 8
    assert layers["gnn.point_sim_generation_0.point_sim_transform.0"].weight_quant is None
    assert layers["backbone.layer1.0.conv1"].bits == (4, 4)
    m.eval()(*episode(config))


def test_unknown_layer_override_is_an_error():
    with pytest.raises(ConfigError, match="unknown layers"):
        build_model(preset_config("tiny", 4, layer_bits={"backbone.conv1": 2}))  # FP32 by design


@pytest.mark.parametrize("bits", [1, 5, 16, 33, "4", 4.0, True])
def test_bad_bits(bits):
    with pytest.raises(ConfigError):
        preset_config("tiny", bits)


def test_bad_configs():
    with pytest.raises(ConfigError):
        preset_config("nope")
    with pytest.raises(ConfigError):
        ModelConfig(image_size=64).validate()
    with pytest.raises(ConfigError):
        ModelConfig(way=1).validate()
    with pytest.raises(ConfigError):
        ModelConfig.from_dict({"way": 5, "colour": "red"})


def test_episode_mismatches_raise_input_error():
    config = preset_config("tiny", 4)
    m = build_model(config).eval()
    images, labels = episode(config)
    with pytest.raises(InputError, match="images per task"):
        m(images[:, :7], labels)  # way/shot mismatch with the episode
    with pytest.raises(InputError, match="3x32x32"):
        m(torch.randn(2, 10, 3, 84, 84), labels)  # wrong image size
    bad = images.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        m(bad, labels)
    with pytest.raises(InputError, match="support labels"):
        m(images, labels + 5)
    with pytest.raises(InputError, match="support_labels"):
        m(images, labels[:, :3])


def test_config_round_trip():
    c = preset_config("tiny", 3, layer_bits={"backbone.layer1.0.conv1": 2}, shot=5)
    assert ModelConfig.from_dict(c.to_dict()) == c


def test_import_is_cheap():
    code = ("import sys, qgnn_deploy, qgnn_deploy.cli; "
            "bad = [m for m in ('torch', 'triton', 'onnxruntime', 'qgnn_deploy._C') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
