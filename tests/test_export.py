"""ONNX export: integer building blocks vs the reference ops, whole-episode parity
(FP32 vs torch, integer vs the reference engine), storage widths, metadata, errors,
the onnx backend session and the ``export`` command."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from qgnn_deploy.backends.onnx import OnnxSession, export_module  # noqa: E402
from qgnn_deploy.errors import ExportError  # noqa: E402
from qgnn_deploy.intmodel import IntAggregation, IntConv2d, IntLinear  # noqa: E402
from qgnn_deploy.ops.packing import pack_codes  # noqa: E402
from qgnn_deploy.ops.reference import ref_qbmm, ref_qconv2d, ref_qlinear, ref_quantize  # noqa: E402

E = export_module()
from qgnn_deploy.export.builder import FLOAT, GraphBuilder  # noqa: E402
from qgnn_deploy.export.int_layers import IntLayers  # noqa: E402


def _session(proto):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


class _Layers:
    """The minimal IntModel surface IntLayers needs, for one layer."""

    def __init__(self, layer):
        self.layer = layer

    def named_layers(self):
        return [(self.layer.name, self.layer)]

    def integer_layers(self):
        return {self.layer.name: self.layer}


def _weights(o, k, bits, snap, g):
    codes = torch.randint(0, 2 ** bits, (o, k), dtype=torch.uint8, generator=g)
    ws = torch.rand(o, generator=g) * 0.1 + 0.01
    if snap:
        wo = -torch.randint(0, 2 ** bits, (o,), generator=g).float() * ws
    else:
        wo = -torch.rand(o, generator=g) * ws * (2 ** bits - 1)
    return codes, ws, wo


def _act(bits, snap):
    sa = 0.0473
    return sa, (-3.0 * sa if snap else -2.37 * sa)


def _common(codes, bits, ws, wo, sa, la, post=True, slope=0.2, o=None, g=None):
    o = codes.shape[0]
    return dict(w_packed=pack_codes(codes, bits), w_bits=bits, a_bits=bits, w_scale=ws, w_offset=wo,
                a_scale=sa, a_offset=la,
                post_scale=torch.rand(o, generator=g) + 0.5 if post else None,
                post_shift=torch.randn(o, generator=g) * 0.1 if post else None,
                slope=slope, out_quant=None, w_granularity="channel")


# ------------------------------------------------------------------ building blocks

@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("geom", [(3, 1, 1), (1, 1, 0), (3, 2, 1)])
def test_qconv2d_integer_form_is_exact(bits, geom):
    """ConvInteger + border terms reproduce ref_qconv2d bit for bit (real offsets)."""
    k, stride, pad = geom
    g = torch.Generator().manual_seed(bits * 10 + k)
    b, c, o, h = 2, 5, 7, 6
    codes, ws, wo = _weights(o, k * k * c, bits, False, g)
    sa, la = _act(bits, False)
    layer = IntConv2d("blk.conv", c, o, k, stride, pad, residual=True,
                      **_common(codes, bits, ws, wo, sa, la, g=g))
    x = torch.randn(b, h, h, c, generator=g) * 0.3
    ho = (h + 2 * pad - k) // stride + 1
    res = torch.randn(b, ho, ho, o, generator=g)
    qa = ref_quantize(x, la, sa, bits)
    ref = ref_qconv2d(qa, layer.w_packed, bits, bits, k, stride, pad, ws, wo, sa, la,
                      layer.post_scale, layer.post_shift, res, 0.2)
    gb = GraphBuilder()
    L = IntLayers(gb, _Layers(layer), form="integer", opset=25)
    assert L.layout == "nhwc"                      # the integer form runs channels-last
    xin = gb.add_input("x", FLOAT, [b, h, h, c])
    rin = gb.add_input("r", FLOAT, [b, ho, ho, o])
    gb.add_output(L.conv("blk.conv", xin, residual=rin, hw=(h, h)), "y", FLOAT, [b, ho, ho, o])
    proto = gb.model(25, {})
    onnx.checker.check_model(proto)
    assert {"MatMulInteger", "MatMulIntegerToFloat"} & {n.op_type for n in proto.graph.node}
    out = _session(proto).run(None, {"x": x.numpy(), "r": res.numpy()})[0]
    np.testing.assert_array_equal(out, ref.numpy())


@pytest.mark.parametrize("bits", [4, 8])
def test_qconv2d_fast_form_snapped(bits):
    """The fast form (merged epilogue constants, QuantizeLinear with the zero point) on a
    snapped 3x3 conv: fp32 outputs within rounding, next-layer codes identical but for ties;
    8 bits also exercises the u8 x u8 fallback (centred int8 weights would saturate)."""
    g = torch.Generator().manual_seed(bits + 100)
    b, c, o, h = 2, 6, 8, 5
    codes, ws, wo = _weights(o, 9 * c, bits, True, g)
    sa, la = _act(bits, True)
    layer = IntConv2d("c", c, o, 3, 1, 1, **_common(codes, bits, ws, wo, sa, la, g=g))
    x = torch.randn(b, h, h, c, generator=g) * 0.3
    ref = ref_qconv2d(ref_quantize(x, la, sa, bits), layer.w_packed, bits, bits, 3, 1, 1, ws, wo,
                      sa, la, layer.post_scale, layer.post_shift, None, 0.2)
    gb = GraphBuilder()
    L = IntLayers(gb, _Layers(layer), form="fast", opset=21)
    y = L.conv("c", gb.add_input("x", FLOAT, [b, h, h, c]), hw=(h, h))
    gb.add_output(y, "y", FLOAT, [b, h, h, o])
    gb.add_output(L.quantize(y, -0.5, 0.125, 4), "q", onnx.TensorProto.UINT8, [b, h, h, o])
    out, q = _session(gb.model(21, {})).run(None, {"x": x.numpy()})
    # merged constants round differently by a few ulps (measured <= 4e-6 at 8 bits)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5, rtol=1e-5)
    assert_codes_within_contract(q, ref.numpy(), -0.5, 0.125, 4)


#: how close to a rounding boundary (in steps) a value whose code flips must lie: the two
#: sides differ by a few fp32 ulps, so a flip is a tie (measured flip margins <= 7e-6)
TIE_MARGIN = 1e-4


def assert_codes_within_contract(got: np.ndarray, want_value: np.ndarray, l: float, s: float,
                                 bits: int) -> None:
    """docs/integer-contract.md for output codes: identical except fp32 rounding ties, at most
    0.1% of elements (rounded down: none on a small output), by 1. ``want_value`` is the
    reference's fp32 value the codes quantize with (``l``, ``s``, ``bits``); every flipped element must
    lie within :data:`TIE_MARGIN` steps of a rounding boundary."""
    want = ref_quantize(torch.from_numpy(want_value), l, s, bits).numpy()
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    flipped = diff != 0
    assert int(flipped.sum()) <= flipped.size // 1000, (int(flipped.sum()), flipped.size)
    assert int(diff.max(initial=0)) <= 1
    u = (want_value[flipped].astype(np.float64) - l) / s
    assert np.all(np.abs(u - np.floor(u) - 0.5) <= TIE_MARGIN), u


def test_matmul_integer_to_float_is_cast_mul_add():
    """onnxruntime's contrib MatMulIntegerToFloat (a_scale 1, b_scale and bias per column)
    is bit-identical to MatMulInteger -> Cast -> Mul -> Add: the integer form relies on it."""
    from onnx import TensorProto, helper, numpy_helper as nh
    rng = np.random.default_rng(0)
    m, k, n = 4000, 96, 48
    a = rng.integers(0, 16, (m, k)).astype(np.uint8)
    w = rng.integers(-7, 8, (k, n)).astype(np.int8)
    sc = (rng.random(n) * 1e-3 + 1e-4).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    node = helper.make_node("MatMulIntegerToFloat", ["a", "w", "one", "sc", "za", "", "bias"], ["y"],
                            domain="com.microsoft")
    inits = [nh.from_array(w, "w"), nh.from_array(np.float32(1), "one"), nh.from_array(sc, "sc"),
             nh.from_array(np.uint8(3), "za"), nh.from_array(bias, "bias")]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    y = _session(proto).run(None, {"a": a})[0]
    acc = (a.astype(np.int32) - 3) @ w.astype(np.int32)
    np.testing.assert_array_equal(y, acc.astype(np.float32) * sc + bias)


@pytest.mark.parametrize("kernel,stride,pad", [(3, 2, 1), (2, 2, 0)])
def test_maxpool_on_codes_matches_fp32_pool(kernel, stride, pad):
    """A quantizer of a max-pooled NHWC tensor pools the uint8 codes (NhwcMaxPool)."""
    g = torch.Generator().manual_seed(kernel)
    b, h, c = 3, 7 if pad else 6, 5
    gb = GraphBuilder()
    L = IntLayers(gb, _Layers(IntConv2d("c", c, c, 1, 1, 0, **_common(
        torch.zeros(c, c, dtype=torch.uint8), 4, torch.ones(c), torch.zeros(c), 0.1, 0.0, g=g))), form="fast")
    x = gb.add_input("x", FLOAT, [b, h, h, c])
    pooled = L.maxpool(x, kernel, stride, pad, (h, h))
    ho = (h + 2 * pad - kernel) // stride + 1
    gb.add_output(L.quantize(pooled, -0.35, 0.1, 3), "q", onnx.TensorProto.UINT8, [b, ho, ho, c])
    gb.add_output(L.materialize(pooled), "p", FLOAT, [b, ho, ho, c])
    proto = gb.model(21, {})
    assert "NhwcMaxPool" in {n.op_type for n in proto.graph.node}
    xv = torch.randn(b, h, h, c, generator=g)
    q, p = _session(proto).run(None, {"x": xv.numpy()})
    ref = torch.nn.functional.max_pool2d(xv.permute(0, 3, 1, 2), kernel, stride, pad).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(p, ref.numpy())
    np.testing.assert_array_equal(q, ref_quantize(ref.contiguous(), -0.35, 0.1, 3).numpy())


@pytest.mark.parametrize("bits", [2, 4])
def test_qconv2d_qdq_form_snapped(bits):
    g = torch.Generator().manual_seed(bits)
    b, c, o, h = 2, 6, 8, 5
    codes, ws, wo = _weights(o, 9 * c, bits, True, g)
    sa, la = _act(bits, True)
    layer = IntConv2d("c", c, o, 3, 1, 1, **_common(codes, bits, ws, wo, sa, la, g=g))
    x = torch.randn(b, h, h, c, generator=g) * 0.3
    ref = ref_qconv2d(ref_quantize(x, la, sa, bits), layer.w_packed, bits, bits, 3, 1, 1, ws, wo,
                      sa, la, layer.post_scale, layer.post_shift, None, 0.2)
    gb = GraphBuilder()
    L = IntLayers(gb, _Layers(layer), form="qdq", opset=21)
    xin = gb.add_input("x", FLOAT, [b, c, h, h])
    gb.add_output(L.conv("c", xin, hw=(h, h)), "y", FLOAT, [b, o, h, h])
    proto = gb.model(21, {})
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "Clip", "DequantizeLinear", "Conv"} <= ops
    out = _session(proto).run(None, {"x": x.permute(0, 3, 1, 2).numpy()})[0]
    np.testing.assert_allclose(out.transpose(0, 2, 3, 1), ref.numpy(), atol=1e-5, rtol=1e-5)


def test_qdq_form_rejects_real_offsets_naming_the_layer():
    g = torch.Generator().manual_seed(0)
    codes, ws, wo = _weights(4, 9, 4, False, g)
    layer = IntConv2d("backbone.layer1.0.conv2", 1, 4, 3, 1, 1,
                      **_common(codes, 4, ws, wo, *_act(4, False), g=g))
    with pytest.raises(ExportError, match="backbone.layer1.0.conv2"):
        IntLayers(GraphBuilder(), _Layers(layer), form="qdq")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_qlinear_integer_form_is_exact(bits):
    g = torch.Generator().manual_seed(bits)
    m, k, o = 9, 13, 6
    codes, ws, wo = _weights(o, k, bits, False, g)
    sa, la = _act(bits, False)
    layer = IntLinear("lin", k, o, **_common(codes, bits, ws, wo, sa, la, slope=0.01, g=g))
    x = torch.randn(m, k, generator=g)
    ref = ref_qlinear(ref_quantize(x, la, sa, bits), layer.w_packed, bits, bits, ws, wo, sa, la,
                      layer.post_scale, layer.post_shift, None, 0.01)
    gb = GraphBuilder()
    L = IntLayers(gb, _Layers(layer), form="integer", opset=25)
    gb.add_output(L.linear("lin", gb.add_input("x", FLOAT, [m, k])), "y", FLOAT, [m, o])
    out = _session(gb.model(25, {})).run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(out, ref.numpy())


@pytest.mark.parametrize("bits", [2, 4])
def test_qbmm_integer_form_is_exact(bits):
    g = torch.Generator().manual_seed(bits)
    t, n, d = 3, 10, 7
    adj = torch.rand(t, n, n, generator=g)
    v = torch.randn(t, n, d, generator=g)
    agg = IntAggregation("agg", bits, bits, 0.011, -0.013, 0.21, -0.77)
    ref = ref_qbmm(ref_quantize(adj, -0.013, 0.011, bits), ref_quantize(v, -0.77, 0.21, bits),
                   bits, bits, 0.011, -0.013, 0.21, -0.77)

    class _M(_Layers):
        config = type("C", (), {"num_nodes": n})()
    gb = GraphBuilder()
    L = IntLayers(gb, _M(agg), form="integer")
    y = L.bmm("agg", gb.add_input("a", FLOAT, [t, n, n]), gb.add_input("v", FLOAT, [t, n, d]))
    gb.add_output(y, "y", FLOAT, [t, n, d])
    out = _session(gb.model(21, {})).run(None, {"a": adj.numpy(), "v": v.numpy()})[0]
    np.testing.assert_array_equal(out, ref.numpy())


def test_quantize_matches_reference_including_ties():
    s, l = 0.25, -0.5
    x = torch.cat([torch.arange(-40, 40, dtype=torch.float32) * 0.125,  # many exact ties
                   torch.randn(5000)])
    gb = GraphBuilder()
    L = IntLayers(gb, _Layers(IntAggregation("a", 4, 4, 1.0, 0.0, 1.0, 0.0)))
    q = L.quantize(gb.add_input("x", FLOAT, [x.numel()]), l, s, 4)
    gb.add_output(q, "q", onnx.TensorProto.UINT8, [x.numel()])
    out = _session(gb.model(21, {})).run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(out, ref_quantize(x, l, s, 4).numpy())


# ------------------------------------------------------------------ whole episode

def _episode(config, tasks, seed=1):
    from qgnn_deploy.data import calibration_episodes
    return calibration_episodes(config, tasks=tasks, seed=seed)


@pytest.fixture(scope="module")
def fp_tiny():
    from qgnn_deploy.config import preset_config
    from qgnn_deploy.models import build_model
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", 32))
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_fp32_export_matches_torch_with_dynamic_tasks(fp_tiny, tmp_path):
    path = str(tmp_path / "fp.onnx")
    info = E.export_onnx(fp_tiny, path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert proto.ir_version == 10 and proto.opset_import[0].version == 21
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "tasks"
    assert info["kind"] == "fp32" and info["bytes"] == os.path.getsize(path)
    sess = _session(proto)
    for tasks in (1, 3):
        images, labels = _episode(fp_tiny.config, tasks)
        with torch.no_grad():
            ref = fp_tiny(images, labels).logits.numpy()
        out = sess.run(None, {"images": images.numpy(), "support_labels": labels.numpy()})[0]
        assert out.shape == (tasks, 5, 5)
        assert np.abs(out - ref).max() <= 1e-4


def _folded(bits, zero_point, preset="tiny"):
    from qgnn_deploy.fold import fold
    from qgnn_deploy.sources import calibrated_model
    im = fold(calibrated_model(preset, bits, quiet=True), zero_point=zero_point)
    im.backend = "reference"
    return im


@pytest.fixture(scope="module")
def int_tiny4():
    return _folded(4, "exact")


def _check(im, tasks=1, **opts):
    from qgnn_deploy.export.check import check_parity
    proto, info = E.build_onnx(im, **opts)
    onnx.checker.check_model(proto)
    batches = [_episode(im.config, tasks, seed=3)]
    return check_parity(im, proto, info["code_tensors"], batches, threads=1,
                        float_tensors=info["float_tensors"]), proto, info


def test_integer_export_tiny_4bit_exact_is_bit_exact(int_tiny4):
    res, proto, info = _check(int_tiny4, form="integer")
    assert res["passed"], res
    assert res["code_mismatches"] == 0 and res["code_elements"] > 0
    assert res["max_logit_diff"] <= 1e-6
    meta = {p.key: p.value for p in proto.metadata_props}
    from qgnn_deploy import __version__
    assert meta["qgnn_deploy.version"] == __version__
    bits = json.loads(meta["qgnn_deploy.layer_bits"])
    assert bits["backbone.layer1.0.conv2"] == {"w_bits": 4, "a_bits": 4}
    assert bits["backbone.conv1"] == {"w_bits": 32, "a_bits": 32}
    # 4-bit weights stored as UINT4 at opset 21
    types = {t.name: t.data_type for t in proto.graph.initializer}
    assert types["backbone.layer1.0.conv2.weight_codes"] == onnx.TensorProto.UINT4
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMulInteger", "MatMulIntegerToFloat"} & ops and "ConvInteger" not in ops  # NHWC rows: GEMMs only


def test_weights_format_uint8_and_size(int_tiny4):
    native, _ = E.build_onnx(int_tiny4)
    wide, _ = E.build_onnx(int_tiny4, weights_format="uint8")
    types = {t.name: t.data_type for t in wide.graph.initializer}
    assert types["backbone.layer1.0.conv2.weight_codes"] == onnx.TensorProto.UINT8
    assert len(native.SerializeToString()) < len(wide.SerializeToString())


def test_integer_export_tiny_2bit_snap_qdq_uint2():
    im = _folded(2, "snap")
    res, proto, info = _check(im)
    assert res["passed"], res
    assert info["opset"] == 25 and proto.ir_version == 13
    types = {t.name: t.data_type for t in proto.graph.initializer}
    assert types["backbone.layer1.0.conv2.weight_codes"] == onnx.TensorProto.UINT2
    res_f, proto_f, info_f = _check(im)                  # auto = fast
    assert res_f["passed"] and info_f["form"] == "fast", res_f
    assert "MatMulIntegerToFloat" in {n.op_type for n in proto_f.graph.node}
    res_q, proto_q, info_q = _check(im, form="qdq")
    assert res_q["passed"], res_q
    assert info_q["form"] == "qdq" and "ConvInteger" not in {n.op_type for n in proto_q.graph.node}


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("zero_point", ["exact", "snap"])
def test_integer_export_tiny_matrix(bits, zero_point):
    im = _folded(bits, zero_point)
    res, _, _ = _check(im, tasks=5)
    assert res["passed"], res
    assert res["code_mismatches"] == 0


#: measured: free-running episode parity lost to a cascade that starts in the FP32 stem.
#: resnet12-cifarfs, random weights calibrated to 2 bits, snapped: onnxruntime's Conv and
#: torch's conv sum the stem in different orders (last-ulp differences on ~70% of its
#: outputs); one output is exactly on a rounding boundary of backbone.layer1.0.conv's
#: 2-bit quantizer in the reference ((x - l)/s == 1.5 -> code 2) and 1 ulp below it in the
#: export (code 1); the 2-bit model amplifies that one flip to 67,743 code mismatches and
#: 3 of 10 predictions. With the FP32 layers resynced every code is identical.
_RESNET12_FP32_CASCADES = {(2, "snap")}


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("zero_point", ["exact", "snap"])
def test_integer_export_resnet12_matrix(bits, zero_point):
    im = _folded(bits, zero_point, preset="resnet12-cifarfs")
    for form in ("integer", "fast"):
        res, _, _ = _check(im, tasks=2, form=form)
        rs = res["resynced"]
        # what the export computes (integer GEMMs, the contract's fp32 epilogue, quantizers)
        assert rs["passed"], (form, rs)
        if form == "integer":
            assert rs["code_mismatches"] == 0 and rs["max_logit_diff"] <= 1e-6, (form, rs)
        if (bits, zero_point) in _RESNET12_FP32_CASCADES:
            assert res["verdict"] in ("pass", "layerwise-only"), (form, res)
            if not res["passed"]:
                assert res["first_mismatch_layer"] == "backbone.layer1.0.conv", (form, res)
        else:
            assert res["passed"] and res["verdict"] == "pass", (form, res)


def test_fp32_stem_tie_flip_is_diagnosed_and_resynced_parity_is_exact(monkeypatch):
    """Regression (resnet12 2-bit snap): an FP32 stem output on a 2-bit rounding boundary.

    The reference's stem is made to return, for one element, the exact tie of
    backbone.layer1.0.conv's quantizer ((x - l)/s == 1.5 -> code 2) where the export's own
    stem sum lies below it (code 1): the two libraries' fp32 sums differing in the last
    ulp. The free-running check must name that layer as the first mismatch, with exactly
    that one code off there, and the run with the FP32 layers resynced must be exact."""
    im = _folded(2, "snap")
    proto, info = E.build_onnx(im, form="integer")
    assert "backbone.conv1" in info["float_tensors"]
    stem_t, layout = info["float_tensors"]["backbone.conv1"]
    images, labels = _episode(im.config, 1, seed=3)[:2]
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    m.graph.output.append(onnx.helper.make_tensor_value_info(stem_t, onnx.TensorProto.FLOAT, None))
    stem = _session(m).run([stem_t], {"images": images.numpy(), "support_labels": labels.numpy()})[0]
    if layout == "nchw":
        stem = stem.transpose(0, 2, 3, 1)
    nxt = im.layer("backbone.layer1.0.conv")
    l, s = np.float32(nxt.a_offset), np.float32(nxt.a_scale)
    assert nxt.a_bits == 2 and float(l + np.float32(np.rint(-l / s)) * s) == 0.0   # snapped
    tie = np.float32(l + np.float32(1.5) * s)
    while (tie - l) / s < np.float32(1.5):        # the smallest fp32 x with (x - l)/s == 1.5
        tie = np.nextafter(tie, np.float32(np.inf))
    while (np.nextafter(tie, np.float32(-np.inf)) - l) / s >= np.float32(1.5):
        tie = np.nextafter(tie, np.float32(-np.inf))
    below = (stem < tie) & ((stem - l) / s >= np.float32(1.0))       # export: code 1
    idx = np.unravel_index(np.argmax(np.where(below, stem, -np.inf)), stem.shape)
    assert below[idx]
    flat = int(np.ravel_multi_index(idx, stem.shape))

    def nudge(mod, args, out):
        out = out.clone()
        out.reshape(-1)[flat] = float(tie)
        return out
    h = im.layer("backbone.conv1").register_forward_hook(nudge)
    try:
        from qgnn_deploy.export.check import check_parity
        res = check_parity(im, proto, info["code_tensors"], [(images, labels)], threads=1,
                           float_tensors=info["float_tensors"])
    finally:
        h.remove()
    assert ref_quantize(torch.tensor([float(tie)]), float(l), float(s), 2).item() == 2
    assert res["first_mismatch_layer"] == "backbone.layer1.0.conv", res
    assert res["code_mismatch_layers"]["backbone.layer1.0.conv"] == 1, res
    assert res["verdict"] in ("pass", "layerwise-only"), res
    rs = res["resynced"]
    assert rs["code_mismatches"] == 0 and rs["first_mismatch_layer"] is None, rs
    assert rs["max_logit_diff"] <= 1e-6 and rs["identical_predictions"] and rs["passed"], rs


# ------------------------------------------------------------------ errors

def test_inexpressible_layer_raises_naming_it(fp_tiny, tmp_path):
    import copy
    model = copy.deepcopy(fp_tiny)
    model.backbone.layer2[0].conv2.dilation = (2, 2)
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="backbone.layer2.0.conv2"):
        E.export_onnx(model, str(path))
    assert not path.exists()


def test_unknown_model_type_raises(tmp_path):
    with pytest.raises(ExportError):
        E.export_onnx(torch.nn.Linear(2, 2), str(tmp_path / "x.onnx"))


# ------------------------------------------------------------------ backend + CLI

def test_onnx_session_caches_and_runs(int_tiny4, tmp_path):
    s1 = OnnxSession(int_tiny4, threads=1, cache_dir=str(tmp_path))
    s2 = OnnxSession(int_tiny4, threads=1, cache_dir=str(tmp_path))
    assert s1.path == s2.path and not s1.info["cached"] and s2.info["cached"]
    images, labels = _episode(int_tiny4.config, 2)
    out = s2(images, labels)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 5)
    ref = int_tiny4(images, labels).logits
    assert (out - ref).abs().max() <= 1e-6  # measured 3e-8 (contract: 1e-3)
    from qgnn_deploy.errors import InputError
    with pytest.raises(InputError):
        s2(images[:, :3], labels)


def test_onnx_session_from_float(fp_tiny, tmp_path):
    s = OnnxSession.from_float(fp_tiny, threads=1, cache_dir=str(tmp_path))
    assert s.metadata["qgnn_deploy.kind"] == "fp32" and s.bytes > 0
    images, labels = _episode(fp_tiny.config, 1)
    with torch.no_grad():
        ref = fp_tiny(images, labels).logits
    assert (s(images, labels) - ref).abs().max() <= 1e-4


def test_export_command_json_check(tmp_path, capsys):
    from qgnn_deploy.cli import main
    out = tmp_path / "m.onnx"
    rc = main(["export", "--preset", "tiny", "--bits", "3", "--out", str(out), "--check",
               "--episodes", "2", "--threads", "1", "--json"])
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert rc == 0 and out.exists()
    assert res["kind"] == "integer" and res["check"]["passed"]
    assert res["check"]["episodes"] == 2 and res["bytes"] == out.stat().st_size


# ------------------------------------------------------------------ portability

@pytest.mark.parametrize("bits,zero_point", [(4, "exact"), (2, "snap")])
def test_standard_form_uses_default_domain_ops_only_and_is_exact(bits, zero_point):
    """``standard``: the integer form without onnxruntime's contrib ops, so any ONNX runtime
    runs it, still exact: with the FP32 layers resynced every code and logit equals the
    reference engine's (the free-running run shares the FP32 stem's float noise with the
    other forms)."""
    im = _folded(bits, zero_point)
    res, proto, info = _check(im, tasks=2, form="standard")
    domains = {n.domain for n in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert [o.domain for o in proto.opset_import] == [""]
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMulInteger", "MaxPool"} <= ops and not {"MatMulIntegerToFloat", "NhwcMaxPool"} & ops
    assert info["form"] == "standard" and info["portability"]["standard_ops_only"]
    assert info["portability"]["contrib_ops"] == []
    rs = res["resynced"]
    assert rs["code_mismatches"] == 0 and rs["code_elements"] > 0, rs
    assert rs["max_logit_diff"] <= 1e-6 and rs["identical_predictions"], rs
    assert res["code_mismatch_rate"] <= 1e-3 and res["code_max_diff"] <= 1, res
    # the standard form computes what the integer form computes, node for node in value
    ref, _, _ = _check(im, tasks=2, form="integer")
    assert res["max_logit_diff"] == ref["max_logit_diff"] and res["code_mismatches"] == ref["code_mismatches"]


@pytest.mark.parametrize("form", ["integer", "fast"])
def test_contrib_forms_report_onnxruntime_only(int_tiny4, form):
    proto, info = E.build_onnx(int_tiny4, form=form)
    p = info["portability"]
    assert p["contrib_ops"] == ["MatMulIntegerToFloat", "NhwcMaxPool"] and not p["standard_ops_only"]
    assert "com.microsoft" in p["domains"] and p["runtimes"].startswith("onnxruntime only")
    assert {o.domain for o in proto.opset_import} == {"", "com.microsoft"}


def test_export_command_reports_portability(tmp_path, capsys):
    from qgnn_deploy.cli import main
    out = tmp_path / "s.onnx"
    rc = main(["export", "--preset", "tiny", "--bits", "4", "--form", "standard", "--out", str(out), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["form"] == "standard" and res["portability"]["standard_ops_only"]
    rc = main(["export", "--preset", "tiny", "--bits", "4", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "runs on: onnxruntime only (com.microsoft contrib ops" in text


def test_standard_form_in_openvino():
    """Optional (OpenVINO is not a dependency): a runtime without onnxruntime's contrib ops
    runs the standard form. Measured on the shipped 4-bit model, snapped offsets: logits
    within 7.5e-8 of the reference engine. OpenVINO must run in f32 (its CPU default on
    bf16-capable CPUs is bf16), and real-valued offsets lose exactness to its fusion of the
    quantizer chain (measured up to 7.8e-3 at 4 bits; intermediate outputs make it exact)."""
    ov = pytest.importorskip("openvino")
    from qgnn_deploy.checkpoint import load_checkpoint
    from qgnn_deploy.data import episode_batches
    from qgnn_deploy.fold import fold
    from qgnn_deploy.sources import embedded_checkpoint
    im = fold(load_checkpoint(embedded_checkpoint("tiny", 4)), zero_point="snap", backend="reference")
    images, labels, _ = next(episode_batches(im.config, 4, seed=0, split="test", tasks_per_batch=4))
    proto, _ = E.build_onnx(im, form="standard")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(proto.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled({"images": images.numpy(), "support_labels": labels.numpy()})[compiled.output(0)]
    ref = im(images, labels).logits.numpy()
    assert np.abs(got - ref).max() <= 1e-6 and (got.argmax(-1) == ref.argmax(-1)).all()
