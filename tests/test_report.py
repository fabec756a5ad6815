"""The Bit-FLOPs counter and `qgnn-deploy report` (issue 8)."""
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from qgnn_deploy.config import preset_config
from qgnn_deploy.models import QAggregation, QConv2d, QLinear, build_model
from qgnn_deploy.report import BitFlopCounter, count_bit_flops, paper_comparison

TOTAL_KEYS = {"params", "macs", "flops", "bit_flops", "fp32_bit_flops", "packed_bytes", "fp32_bytes"}
LAYER_KEYS = {"name", "kind", "w_bits", "a_bits", "params", "macs", "flops", "bit_flops",
              "fp32_bit_flops", "packed_bytes", "fp32_bytes", "compression", "share"}


class Toy(nn.Module):
    """conv (FP32) -> quantized conv -> linear -> bmm aggregation, plus elementwise work."""

    def __init__(self, bits=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.qconv = QConv2d(8, 16, 3, stride=2, padding=1, bits=bits)
        self.fc = QLinear(16 * 4 * 4, 12, bits=bits)
        self.agg = QAggregation(bits)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = self.qconv(y)
        v = self.fc(y.flatten(1)).view(2, -1, 12)          # [2, B/2, 12]
        adj = torch.softmax(torch.bmm(v, v.transpose(1, 2)), -1)
        return self.agg(adj, v)


def _count(model, *inputs):
    c = BitFlopCounter(model)
    with torch.no_grad(), c:
        model(*inputs)
    return c.report()


@pytest.mark.parametrize("bits", [32, 4])
def test_flops_match_flop_counter_mode(bits):
    torch.manual_seed(0)
    m = Toy(bits).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        m(x)  # initialise the PQ ranges
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(x)
    rep = _count(m, x)
    assert sum(l.flops for l in rep.layers) == fc.get_total_flops()
    for l in rep.layers:
        assert l.flops == 2 * l.macs
    by_name = {l.name: l for l in rep.layers}
    assert by_name["stem"].macs == 4 * 8 * 8 * 8 * 3 * 9
    assert by_name["qconv"].macs == 4 * 16 * 4 * 4 * 8 * 9
    assert by_name["fc"].macs == 4 * 12 * 256
    assert by_name["agg"].macs == 2 * 2 * 2 * 12
    assert (by_name["stem"].w_bits, by_name["stem"].a_bits) == (32, 32)
    assert by_name["qconv"].bit_flops == by_name["qconv"].flops * bits * bits
    assert by_name["stem"].bit_flops == by_name["stem"].flops * 32 * 32
    # the unnamed bmm of the functional code is a row of its own, not dropped
    assert any(l.kind == "matmul" for l in rep.layers)
    assert not rep.uncounted
    assert rep.elementwise["batch_norm"]["flops"] == 4 * 4 * 8 * 8 * 8


def test_unknown_op_is_listed_not_dropped():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real

    rep = _count(Odd(), torch.randn(8))
    assert rep.uncounted and "fft" in rep.uncounted[0]["op"]
    assert rep.total()["uncounted_ops"] == len(rep.uncounted)


def test_mixed_precision_bits_per_layer():
    cfg = preset_config("tiny", 4, layer_bits={
        "backbone.layer2.0.conv2": 2, "backbone.layer3.0.conv1": 8,
        "gnn.distribution2point_generation_0.aggregation": 3,
        "gnn.point_sim_generation_1.point_sim_transform.0": 32})
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    rep = count_bit_flops(m)
    bits = {l.name: (l.w_bits, l.a_bits) for l in rep.layers}
    assert bits["backbone.layer2.0.conv2"] == (2, 2)
    assert bits["backbone.layer3.0.conv1"] == (8, 8)
    assert bits["gnn.distribution2point_generation_0.aggregation"] == (3, 3)
    assert bits["gnn.point_sim_generation_1.point_sim_transform.0"] == (32, 32)
    assert bits["backbone.layer1.0.conv2"] == (4, 4)
    assert bits["backbone.conv1"] == (32, 32)  # FP32 stem (paper)
    for l in rep.layers:
        assert l.bit_flops == l.flops * l.w_bits * l.a_bits
        assert l.fp32_bit_flops == l.flops * 1024
    t = rep.total()
    assert t["bit_flops"] == sum(l.bit_flops for l in rep.layers)
    assert abs(sum(l.share for l in rep.layers) - 1.0) < 1e-9
    # packed 2-bit weights: K=9*32 codes per row -> 36*2 bytes per row
    l2 = next(l for l in rep.layers if l.name == "backbone.layer2.0.conv2")
    assert l2.packed_bytes == 32 * 72 + 8 * 32 + 8


@pytest.fixture(scope="module")
def paper_fp32_report():
    torch.manual_seed(0)
    m = build_model(preset_config("resnet12-cifarfs", 32)).eval()
    return count_bit_flops(m, per_image_backbone=True)


def test_paper_fp32_bit_flops_within_0_1_percent(paper_fp32_report):
    pc = paper_comparison(paper_fp32_report)
    assert pc["fp32_match_within_0.1pct"]
    ours = pc["paper_count"]["fp32_bit_flops"]
    assert abs(ours - 503.9534e9) / 503.9534e9 < 1e-3
    # conv/linear MACs of one image + one 10-node, 6-generation task (docs/model.md)
    assert pc["paper_count"]["macs"] == 190_709_760 + 51_929_040
    t = paper_fp32_report.total()
    assert t["params"] == 5_101_377
    assert t["bit_flops"] == t["fp32_bit_flops"]


def test_json_schema_stable(paper_fp32_report):
    d = json.loads(json.dumps(paper_fp32_report.to_dict()))
    assert TOTAL_KEYS <= set(d["total"])
    assert d["layers"] and all(LAYER_KEYS <= set(l) for l in d["layers"])
    assert {"layers", "total", "elementwise", "uncounted", "units", "workload"} <= set(d)


def test_report_command_json_and_plot(tmp_path, capsys):
    from qgnn_deploy.cli import main
    png = tmp_path / "r.png"
    assert main(["report", "--preset", "tiny", "--bits", "4", "--json", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    d = json.loads(out)  # exactly one JSON object on stdout
    assert TOTAL_KEYS <= set(d["total"])
    assert d["total"]["bit_flops"] < d["total"]["fp32_bit_flops"]
    assert png.exists() and png.stat().st_size > 10_000


def test_report_command_markdown_and_csv(capsys):
    from qgnn_deploy.cli import main
    assert main(["report", "--preset", "tiny", "--bits", "32", "--csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("name,kind") and any(l.startswith("TOTAL,") for l in lines)
    assert main(["report", "--preset", "tiny", "--bits", "2"]) == 0
    md = capsys.readouterr().out
    assert "| layer |" in md and "Bit-FLOPs" in md and "MACs" in md


def test_int_model_counts_match_float_model():
    fold = pytest.importorskip("qgnn_deploy.fold")
    from qgnn_deploy.sources import calibrated_model
    m = calibrated_model("tiny", 4, quiet=True)
    im = fold.fold(m, backend="reference")
    a, b = count_bit_flops(m), count_bit_flops(im)
    la = {l.name: l for l in a.layers}
    lb = {l.name: l for l in b.layers}
    assert set(la) == set(lb)
    for name in la:
        assert (la[name].macs, la[name].w_bits, la[name].a_bits) == (lb[name].macs, lb[name].w_bits, lb[name].a_bits), name
    assert not b.uncounted
    assert "quantize" in b.elementwise
