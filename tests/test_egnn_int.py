"""EGNN's integer engine: fold (models/egnn.py QAT model -> IntModel), the episode written once
against the episode ops (intmodel.py), the compiled plan and its new steps, artifacts.

What must hold (docs/integer-contract.md): the compiled plan (``cpu``, every ISA path),
``cpu-eager`` and ``triton`` give the reference engine's outputs bit for bit -- logits, every
layer's (assembled) edges, the query graphs' own edges, the embeddings; the reference engine
agrees with the fake-quant model it was folded from (>= 99.9% same predictions, max |logit
diff| <= 1e-3, or, where a model amplifies fp32 rounding ties, every layer exact when fed the
same input: the ``layerwise-only`` verdict).
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from qgnn_deploy.backends import cpu as cpu_backend
from qgnn_deploy.backends.cpu_plan import native_description
from qgnn_deploy.data import calibration_episodes, episode_batches
from qgnn_deploy.errors import ConfigError, InputError, KernelArgumentError
from qgnn_deploy.fold import (compare_engines, episode_parity_ok, fake_quant_counterpart, fold,
                              layerwise_parity_batches, parity_verdict)
from qgnn_deploy.intmodel import FloatAggregation, FloatConv2d, IntAggregation, IntConv2d, IntLinear
from qgnn_deploy.models.egnn import EGNNOutput
from qgnn_deploy.ops import registry as qops
from qgnn_deploy.ops.episode_ops import TORCH_OPS
from qgnn_deploy.plan import PlanBuilder, compile_plan
from qgnn_deploy.sources import calibrated_model
from test_backend_parity import _triton_device

needs_cpu = pytest.mark.skipif(not cpu_backend.is_available(), reason="C++ extension not built")

CASES = [(bits, zp) for bits in (4, 3, 2) for zp in ("exact", "snap")]
_MODELS, _FOLDED, _REF = {}, {}, {}


def calibrated(bits, seed=0, **overrides):
    """A fresh egnn-tiny model whose BN statistics and PQ ranges come from one forward pass
    over 8 synthetic episodes in train mode (cumulative BN averages, no dropout), then eval:
    what sources.calibrated_model does for DPGN. Cached."""
    key = (bits, seed, repr(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = calibrated_model("egnn-tiny", bits, quiet=True, seed=seed, **overrides)
    return _MODELS[key]


def folded(bits, zero_point, **overrides):
    key = (bits, zero_point, repr(sorted(overrides.items())))
    if key not in _FOLDED:
        _FOLDED[key] = fold(calibrated(bits, **overrides), zero_point=zero_point, backend="reference")
    return _FOLDED[key]


def episode(cfg, tasks, seed):
    return calibration_episodes(cfg, tasks=tasks, seed=seed)


def reference(im, tasks, seed):
    key = (id(im), tasks, seed)
    if key not in _REF:
        images, labels = episode(im.config, tasks, seed)
        _REF[key] = (images, labels), run(im, "reference", images, labels)
    return _REF[key]


def run(im, backend, images, labels):
    prev = im.backend
    im.backend = backend
    try:
        return im(images, labels)
    finally:
        im.backend = prev


def assert_identical(got, want, what):
    assert isinstance(got, EGNNOutput) and got.transductive == want.transductive
    assert torch.equal(got.logits.cpu(), want.logits), (what, float((got.logits.cpu() - want.logits).abs().max()))
    assert torch.equal(got.embeddings.cpu(), want.embeddings), what
    assert len(got.edges) == len(want.edges) > 0, what
    for a, b in zip(got.edges, want.edges):
        assert torch.equal(a.cpu(), b), what
    if want.query_graph_edges is None:
        assert got.query_graph_edges is None
    else:
        for a, b in zip(got.query_graph_edges, want.query_graph_edges):
            assert torch.equal(a.cpu(), b), what


# ------------------------------------------------------------------ engines vs the reference

@needs_cpu
@pytest.mark.parametrize("bits,zero_point", CASES)
def test_plan_is_bit_identical_to_the_reference_on_every_isa(bits, zero_point, cpu_isa):
    im = folded(bits, zero_point)
    for tasks, seed in ((1, bits), (3, 10 + bits)):
        (images, labels), ref = reference(im, tasks, seed)
        out = run(im, "cpu", images, labels)
        assert out.logits.shape == (tasks, 5, 5) and len(out.edges) == im.generations == 3
        assert out.edges[0].shape == (tasks, 2, 10, 10) and out.query_graph_edges[0].shape == (tasks, 5, 2, 6, 6)
        assert_identical(out, ref, (cpu_isa, tasks))
        assert out.edges is out.edges and out.query_graph_edges is out.query_graph_edges  # built once


@needs_cpu
@pytest.mark.parametrize("bits,zero_point", CASES)
def test_cpu_eager_matches_the_reference(bits, zero_point):
    im = folded(bits, zero_point)
    for tasks, seed in ((1, bits), (3, 10 + bits)):
        (images, labels), ref = reference(im, tasks, seed)
        assert_identical(run(im, "cpu-eager", images, labels), ref, ("cpu-eager", tasks))


@needs_cpu
@pytest.mark.parametrize("overrides", [dict(transductive=True), dict(image_size=84),
                                       dict(weight_granularity="channel", shot=2),
                                       dict(layer_bits={"gnn.edge2node_net0.aggregation": 32,
                                                        "gnn.node2edge_net1.sim_network.conv1": 32,
                                                        "backbone.conv_3.0": 32})],
                         ids=["transductive", "84px", "per-channel-2shot", "mixed-fp32"])
def test_plan_other_configurations(overrides):
    """Transductive graphs, the 84 px encoder (a 5x5x64 flatten: layer_last's columns are
    permuted), per-channel weights with 2 shots, FP32 layers in the graph and the encoder
    (bits=32: FloatAggregation per channel, FP32 convs) -- at 1 and 2 threads."""
    im = folded(4, "exact", **overrides)
    if "layer_bits" in overrides:
        assert isinstance(im.layer("gnn.edge2node_net0.aggregation"), FloatAggregation)
        assert isinstance(im.layer("backbone.conv_3.0"), FloatConv2d)
    (images, labels), ref = reference(im, 2, 7)
    assert ref.transductive == bool(overrides.get("transductive", False))
    try:
        for threads in (1, 2):
            cpu_backend.set_num_threads(threads)
            assert_identical(run(im, "cpu", images, labels), ref, ("cpu", threads))
    finally:
        cpu_backend.set_num_threads(None)
    assert_identical(run(im, "cpu-eager", images, labels), ref, "cpu-eager")


def test_triton_matches_the_reference():
    device = _triton_device()
    im = copy.deepcopy(folded(4, "exact"))
    (images, labels), ref = reference(folded(4, "exact"), 1, 4)
    out = run(im.to(device), "triton", images.to(device), labels.to(device))
    assert_identical(out, ref, ("triton", device))


# ------------------------------------------------------------------ vs the fake-quant model

#: measured (seed-0 calibration, 100 test episodes = 500 queries; non-transductive unless
#: said): 3 and 2 bits, exact and snapped: 100% same predictions, max |logit diff| <= 4e-7.
#: 4 bits exact: 99.8% (1 query), max |diff| 0.37; 4 bits snapped: 100%, max |diff| 1.9e-2;
#: transductive 4 bits exact: 99.4% (3 queries). Every layer reproduces its fake-quant
#: counterpart fed the same input (codes exact, fp32 rel err <= 1e-6); each episode that
#: differs starts at one activation code whose exact value lies within ~1e-6 of a step of a
#: rounding boundary (e.g. backbone.conv_3.0's input at u = 7.4999990..7.4999997 steps in
#: float64; the fake-quant model's float32 conv sums land on either side, the integer
#: engine's exact accumulators on the true side): a flipped 4-bit code cascades through
#: three graph layers. Other calibration seeds: 95.8-100% at 4 bits, same cause.
AGREEMENT_CASES = [(b, zp, False) for b, zp in CASES] + [(4, "exact", True)]
TIE_AMPLIFIED = {(4, "exact", False), (4, "snap", False), (4, "exact", True)}


@pytest.mark.parametrize("bits,zero_point,transductive", AGREEMENT_CASES)
def test_reference_agrees_with_the_fake_quant_model(bits, zero_point, transductive):
    model = calibrated(bits, transductive=transductive)
    im = folded(bits, zero_point, transductive=transductive)
    fq = fake_quant_counterpart(model, zero_point)
    batches = list(episode_batches(model.config, 100, seed=1, split="test", tasks_per_batch=50))
    ref, want = [], []
    with torch.no_grad():
        for images, labels, _ in batches:
            ref.append(im(images, labels).logits)
            want.append(fq(images, labels).logits)
    cmp = compare_engines(torch.cat(want), torch.cat(ref))
    assert cmp["queries"] == 500
    episode_ok = episode_parity_ok(cmp["agreement"], cmp["max_logit_diff"])
    if (bits, zero_point, transductive) not in TIE_AMPLIFIED:
        assert episode_ok and cmp["max_logit_diff"] <= 1e-6, cmp
        return
    lw = layerwise_parity_batches(fq, im, batches[:1])
    assert lw["passed"] and lw["layers_checked"] == 29 and lw["input_code_mismatches"] == 0, lw
    assert lw["max_code_mismatch_rate"] == 0 and lw["max_rel_error"] <= 1e-5, lw
    assert parity_verdict(episode_ok, lw["passed"]) in ("pass", "layerwise-only")
    assert cmp["agreement"] >= 0.99, cmp


def test_pruned_fold_matches_the_pruned_fake_quant_model():
    model = calibrated(3)
    im = fold(model, generations=2)
    assert im.generations == 2 and len(list(im.gnn.children())) == 4
    images, labels = episode(model.config, 4, 2)
    with torch.no_grad():
        want = fake_quant_counterpart(model, "exact", generations=2)(images, labels)
    got = im(images, labels)
    assert len(got.edges) == len(want.edges) == 2
    assert compare_engines(want.logits, got.logits)["max_logit_diff"] <= 1e-6


def test_fold_structure():
    """BN and the encoder's LeakyReLU(0.2) in the conv epilogues, the FP32 first conv and
    conv_outs, requantization fused inside the graph MLPs (not across a pool or a node
    update's output, which feeds several consumers)."""
    im = folded(4, "exact")
    stem = im.layer("backbone.conv_1.0")
    assert isinstance(stem, FloatConv2d) and stem.slope == pytest.approx(0.2) and stem.post_scale is not None
    for i in (2, 3, 4):
        c = im.layer(f"backbone.conv_{i}.0")
        assert isinstance(c, IntConv2d) and c.slope == pytest.approx(0.2) and c.out_quant is None
    last = im.layer("backbone.layer_last.0")
    assert isinstance(last, IntLinear) and last.input_hwc == (1, 1, 64) and last.slope is None
    assert isinstance(im.layer("gnn.edge2node_net1.aggregation"), IntAggregation)
    assert im.layer("gnn.edge2node_net1.network.conv0").out_quant is not None
    assert im.layer("gnn.edge2node_net1.network.conv1").out_quant is None
    assert [im.layer(f"gnn.node2edge_net2.sim_network.conv{i}").out_quant is not None for i in range(4)] == \
        [True, True, True, False]
    assert isinstance(im.layer("gnn.node2edge_net2.sim_network.conv_out"), FloatConv2d)
    assert im.family == "egnn" and len(im.integer_layers()) + len(im.fp32_layers()) == 29


@needs_cpu
def test_plan_structure():
    """The encoder's convs emit their consumers' codes and the pools run on codes; each node
    update quantizes its nodes once for both edge channels' aggregations."""
    plan = compile_plan(folded(4, "exact"))
    dtype = lambda b: plan.buffers[b].dtype  # noqa: E731
    pools = [st for st in plan.steps if st.kind == "max_pool"]
    assert len(pools) == 4 and all(dtype(st.inputs[0]) == "u8" for st in pools)
    for l in range(3):
        quant = [st for st in plan.steps if st.name == f"gnn.edge2node_net{l}.aggregation.nodes.quantize"]
        bmms = [st for st in plan.steps if st.kind == "qbmm" and st.name == f"gnn.edge2node_net{l}.aggregation"]
        assert len(quant) == 1 and len(bmms) == 2 and {st.inputs[1] for st in bmms} == {quant[0].outputs[0]}
        assert all(st.params["batch"] == 5 for st in bmms)
    kinds = [st.kind for st in plan.steps]
    assert kinds.count("pairwise_absdiff") == kinds.count("edge_update_2ch") == 3
    assert kinds.count("take_rows") == 2 and kinds[-1] == "label_scores"
    assert set(plan.outputs) == {"logits", "embeddings", "sim_edges", "dsim_edges"}


# ------------------------------------------------------------------ the new steps, one by one

def _one_op_plan(build, inputs):
    """Run ``build(ops, *values)`` once eagerly (TORCH_OPS on ``inputs``) and once as a
    compiled plan; returns (eager outputs, plan outputs) as tuples of tensors."""
    t = next(iter(inputs.values())).shape[0]
    eager = build(TORCH_OPS, *inputs.values())
    eager = eager if isinstance(eager, tuple) else (eager,)
    b = PlanBuilder()
    vals = [b.input(k, v.shape[1:]) for k, v in inputs.items()]
    outs = build(b, *vals)
    outs = outs if isinstance(outs, tuple) else (outs,)
    plan = b.finish({f"y{i}": o for i, o in enumerate(outs)})
    native = cpu_backend._call(cpu_backend._ext().Plan, *native_description(plan))
    feed = {plan.inputs[k]: v.contiguous().numpy() for k, v in inputs.items()}
    res, _ = cpu_backend._call(native.run, t, [feed[b.id] for b in plan.buffers if b.role == "input"], 2, False)
    at = {b.id: i for i, b in enumerate(b for b in plan.buffers if b.role == "output")}
    got = tuple(torch.from_numpy(res[at[plan.outputs[f"y{i}"]]]) for i in range(len(outs)))
    return eager, got


def _awkward(*shape, seed=0, zeros=True):
    """Random values with negative zeros, exact zeros and whole zero rows mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3
    if zeros:
        x.view(-1)[::7] = 0.0
        x.view(-1)[3::11] = -0.0
        if x.shape[-2] > 1:
            x[..., 1, :] = 0.0
    return x


def _same(eager, got):
    assert len(eager) == len(got)
    for a, b in zip(eager, got):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.shape, b.shape)
        assert torch.equal(a, b), float((a.double() - b.double()).abs().max())
        if a.is_floating_point():  # signed zeros too
            assert torch.equal(torch.signbit(a), torch.signbit(b))


@needs_cpu
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 5), (3, 1, 13, 33)])
def test_step_pairwise_absdiff(shape):
    _same(*_one_op_plan(lambda ops, v: ops.pairwise_absdiff(v), {"v": _awkward(*shape)}))


@needs_cpu
def test_step_take_rows_fp32_and_codes():
    x = _awkward(3, 4, 5, 7)
    index = np.array([[19, 0, 0], [7, 3, 12]])
    _same(*_one_op_plan(lambda ops, v: ops.take_rows(v, index), {"x": x}))

    def codes_then_rows(ops, v):
        q = qops.quantize(v.contiguous(), -1.0, 0.25, 3) if ops is TORCH_OPS else ops._codes(v, -1.0, 0.25, 3, "q")
        return ops.take_rows(q, [5, 0, 19])
    eager, got = _one_op_plan(codes_then_rows, {"x": x})
    assert got[0].dtype == torch.uint8
    _same(eager, got)


@needs_cpu
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 7), (3, 2, 11, 11)])
def test_step_edge_update_2ch(shape):
    g = torch.Generator().manual_seed(1)
    sim = torch.rand(*shape, generator=g)
    prev_sim, prev_dsim = torch.rand(*shape, generator=g), torch.rand(*shape, generator=g)
    prev_sim[..., 0, :] = 0.0                    # an empty row: the norm's eps, the row sum 0
    sim.view(-1)[::5] = 0.0
    sim.view(-1)[1::9] = 1.0
    _same(*_one_op_plan(lambda ops, s, a, d: ops.edge_update_2ch(s, a, d),
                        {"sim": sim, "prev_sim": prev_sim, "prev_dsim": prev_dsim}))


@needs_cpu
@pytest.mark.parametrize("shape", [(2, 5, 5), (2, 3, 6, 6), (1, 2, 3, 1, 1)])
def test_step_offdiag_l1_normalize_batched(shape):
    _same(*_one_op_plan(lambda ops, x: ops.offdiag_l1_normalize(x), {"x": _awkward(*shape)}))


@needs_cpu
@pytest.mark.parametrize("graphs,n,d", [(1, 6, 9), (3, 6, 70), (2, 1, 3)])
def test_step_batched_aggregation(graphs, n, d):
    agg = IntAggregation("agg", 3, 4, a_scale=0.11, a_offset=-0.05, v_scale=0.3, v_offset=-2.0)
    g = torch.Generator().manual_seed(2)
    adj, nodes = torch.rand(2, graphs, n, n, generator=g), torch.randn(2, graphs, n, d, generator=g)
    _same(*_one_op_plan(lambda ops, a, v: ops.aggregate(agg, a, v), {"adj": adj, "nodes": nodes}))
    _same(*_one_op_plan(lambda ops, a, v: ops.aggregate(FloatAggregation("f"), a, v), {"adj": adj, "nodes": nodes}))


@needs_cpu
@pytest.mark.parametrize("rows,width,first_row", [(4, 7, 0), (9, 6, 3), (1, 5, 0)])
def test_step_label_scores_rows(rows, width, first_row):
    g = torch.Generator().manual_seed(3)
    edge = torch.rand(3, rows, width, generator=g)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 4, (3, 5), generator=g), 4).float()
    _same(*_one_op_plan(lambda ops, e, o: ops.label_scores(e, o, first_row=first_row), {"e": edge, "o": onehot}))


# ------------------------------------------------------------------ bad inputs

def test_bad_episodes_are_refused():
    im = folded(4, "exact")
    images, labels = episode(im.config, 2, 0)
    for backend in ("reference", "cpu") if cpu_backend.is_available() else ("reference",):
        with pytest.raises(InputError, match="10 images per task"):
            run(im, backend, images[:, :9], labels)
        with pytest.raises(InputError, match="3x32x32"):
            run(im, backend, images[..., :16, :16], labels)
        with pytest.raises(InputError, match="support_labels"):
            run(im, backend, images, labels[:, :4])
        with pytest.raises(InputError, match="lie in"):
            run(im, backend, images, labels + 5)
        bad = images.clone()
        bad[1, 9, 2, 31, 31] = float("nan")  # the last value of the batch
        with pytest.raises(InputError, match="NaN or Inf"):
            run(im, backend, bad, labels)


def test_episode_ops_refuse_wrong_shapes():
    b = PlanBuilder()
    x3, x4 = b.input("x3", (5, 6, 6)), b.input("x4", (5, 6, 7))
    for ops, a, c in ((TORCH_OPS, torch.zeros(1, 5, 6, 6), torch.zeros(1, 5, 6, 7)), (b, x3, x4)):
        with pytest.raises(ConfigError, match="take_rows"):
            ops.take_rows(a, [30])
        with pytest.raises(ConfigError, match="edge_update_2ch"):
            ops.edge_update_2ch(a, a, c)
        with pytest.raises(ConfigError, match="edge_update_2ch"):
            ops.edge_update_2ch(c, c, c)
    agg = IntAggregation("agg", 4, 4, 0.1, 0.0, 0.1, 0.0)
    with pytest.raises(ConfigError, match="aggregates"):
        b.aggregate(agg, x3, b.input("v", (4, 6, 3)))
    with pytest.raises(ConfigError, match="label_scores"):
        b.label_scores(b.input("e", (3, 4)), b.input("o", (5, 5)), first_row=0)
    with pytest.raises(ConfigError, match="offdiag"):
        b.offdiag_l1_normalize(x4)
    with pytest.raises(ConfigError, match="pairwise_absdiff"):
        TORCH_OPS.pairwise_absdiff(torch.zeros(3, 4))


def test_an_ops_without_the_egnn_vocabulary_is_refused():
    """An episode-op implementation that lacks EGNN's ops (e.g. an exporter written for DPGN)
    gets a clear error, not an AttributeError halfway through the episode."""
    class DPGNOnly:
        pass
    with pytest.raises(ConfigError, match="pairwise_absdiff"):
        folded(4, "exact").episode(DPGNOnly(), None, None)


@needs_cpu
def test_native_plan_rejects_malformed_egnn_steps():
    buffers, steps, arena = native_description(compile_plan(folded(4, "exact")))
    cpu_backend._call(cpu_backend._ext().Plan, buffers, steps, arena)  # the real one builds
    first = lambda kind: next(i for i, s in enumerate(steps) if s["kind"] == kind)  # noqa: E731
    tr, eu, pa, ls, qb = (first(k) for k in ("take_rows", "edge_update_2ch", "pairwise_absdiff",
                                              "label_scores", "qbmm"))
    cases = {
        "row index out of range": lambda s: s[tr]["index"].__setitem__(0, s[tr]["rows"]),
        "negative row index": lambda s: s[tr]["index"].__setitem__(0, -1),
        "no rows": lambda s: s[tr].update(index=[]),
        "rows too many": lambda s: s[tr].update(rows=s[tr]["rows"] + 1),
        "edge update with one output": lambda s: s[eu].update(out=s[eu]["out"][:1]),
        "edge update with two inputs": lambda s: s[eu].update(**{"in": s[eu]["in"][:2]}),
        "edge update wrong batch": lambda s: s[eu].update(batch=s[eu]["batch"] + 1),
        "edge update bad n": lambda s: s[eu].update(n=0),
        "pairs wrong width": lambda s: s[pa].update(c=s[pa]["c"] + 1),
        "pairs batch 0": lambda s: s[pa].update(batch=0),
        "scores first row past the rows": lambda s: s[ls].update(first_row=s[ls]["rows"]),
        "scores rows wrong": lambda s: s[ls].update(rows=s[ls]["rows"] + 1),
        "qbmm wrong batch": lambda s: s[qb].update(batch=2),
    }
    for what, edit in cases.items():
        s = copy.deepcopy(steps)
        edit(s)
        with pytest.raises(KernelArgumentError):
            cpu_backend._call(cpu_backend._ext().Plan, buffers, s, arena)
            pytest.fail(what)


# ------------------------------------------------------------------ artifacts

@pytest.mark.parametrize("bits,zero_point,generations", [(4, "exact", None), (2, "snap", 2)])
def test_artifact_round_trip(bits, zero_point, generations, tmp_path):
    from qgnn_deploy.artifact import load_int_model, read_header, save_int_model
    im = fold(calibrated(bits), zero_point=zero_point, generations=generations)
    path = str(tmp_path / "egnn.qgnn")
    save_int_model(im, path)
    header = read_header(path)
    assert header["config"]["family"] == "egnn" and header["zero_point"] == zero_point
    back = load_int_model(path)
    assert back.family == "egnn" and back.config == im.config and back.generations == im.generations
    assert [n for n, _ in back.named_layers()] == [n for n, _ in im.named_layers()]
    images, labels = episode(im.config, 2, 5)
    want = run(im, "reference", images, labels)
    assert_identical(run(back, "reference", images, labels), want, "loaded")
    if cpu_backend.is_available():
        assert_identical(run(back, "cpu", images, labels), want, "loaded, cpu")


# ------------------------------------------------------------------ shipped checkpoints

ASSETS = os.path.join(os.path.dirname(__file__), "..", "qgnn_deploy", "assets")


@pytest.mark.parametrize("bits,zero_point", [(4, "exact"), (3, "exact"), (2, "snap")])
def test_shipped_qat_checkpoints(bits, zero_point):
    """The trained egnn-tiny QAT checkpoints: the plan is bit-identical to the reference and
    the reference predicts what the fake-quant model predicts. Measured over 200 test
    episodes (1000 queries), all six cases: >= 99.9% same predictions (4-bit exact: 1
    query differs, 3 and 2 bits: none); max |logit diff| <= 5e-7 except where a rounding-tie
    flip cascades -- 4-bit exact 1.6e-2, 3-bit exact 2.8e-2, 2-bit snapped 0.18 (the cases
    run here); every layer exact. Over these 100 episodes 4-bit exact misses the 99.9% bar
    by that one query: the ``layerwise-only`` verdict."""
    path = os.path.join(ASSETS, f"egnn-tiny-w{bits}.pt")
    if not os.path.exists(path):
        pytest.skip(f"{path} does not ship")
    from qgnn_deploy.checkpoint import load_checkpoint
    model = load_checkpoint(path).eval()
    im = fold(model, zero_point=zero_point, backend="reference")
    fq = fake_quant_counterpart(model, zero_point)
    batches = list(episode_batches(model.config, 100, seed=1, split="test", tasks_per_batch=50))
    ref, want = [], []
    with torch.no_grad():
        for i, (images, labels, _) in enumerate(batches):
            out = im(images, labels)
            ref.append(out.logits)
            want.append(fq(images, labels).logits)
            if i == 0 and cpu_backend.is_available():
                assert_identical(run(im, "cpu", images[:3], labels[:3]), run(im, "reference", images[:3], labels[:3]),
                                 "cpu")
    cmp = compare_engines(torch.cat(want), torch.cat(ref))
    lw = layerwise_parity_batches(fq, im, batches[:1])
    assert lw["passed"] and lw["max_code_mismatch_rate"] == 0, lw
    assert cmp["agreement"] >= (0.998 if (bits, zero_point) == (4, "exact") else 0.999), cmp
    assert parity_verdict(episode_parity_ok(cmp["agreement"], cmp["max_logit_diff"]), lw["passed"]) in (
        "pass", "layerwise-only")
