"""Per-node aggregation widths (A2Q-style, ``ModelConfig.node_bits``, docs/mixed-precision.md).

The kernels first: ``node_rows`` (codes minus the row minimum, the row's fewest widths) and
``qbmm`` on per-node codes with row widths and offsets, on every backend against the
reference and against the shared-grid aggregation (the per-node form is lossless), over
awkward shapes and the inputs that must raise. Then a tiny model whose aggregations use
widths (2, 4, 8): every engine and the ONNX export bit-identical to the reference, the
artifact keeps the widths, training's penalty reaches the node step, and ``report`` gives
the histogram.
"""
from __future__ import annotations

import pytest
import torch

from qgnn_deploy.artifact import load_int_model, save_int_model
from qgnn_deploy.config import ModelConfig, check_node_bits, preset_config
from qgnn_deploy.data import episode_batches
from qgnn_deploy.errors import ConfigError, KernelArgumentError
from qgnn_deploy.fold import fold
from qgnn_deploy.intmodel import IntAggregation
from qgnn_deploy.ops.reference import ref_node_rows, ref_qbmm
from qgnn_deploy.sources import calibrated_model
from test_backend_parity import _triton_device, assert_identical, run_on
from test_plan import outputs_equal

SHAPES = [  # (T, N, D, adjacency bits, node widths)
    (1, 10, 32, 4, (2, 4, 8)),
    (3, 7, 33, 3, (2, 3, 4)),
    (2, 30, 65, 8, (2, 8)),
    (1, 1, 1, 2, (3, 4)),
    (2, 5, 0, 4, (2, 4)),
]


def _node_codes(t, n, d, widths, seed=0):
    """Shared-grid codes whose rows span every width of ``widths`` (some narrow, some wide)."""
    g = torch.Generator().manual_seed(seed)
    top = 2 ** widths[-1]
    v = torch.randint(0, top, (t, n, d), generator=g, dtype=torch.uint8)
    if d:
        for j in range(n):
            w = widths[j % len(widths)]
            base = int(torch.randint(0, top - 2 ** w + 1, (1,), generator=g))
            v[:, j] = (base + v[:, j].long() % (2 ** w)).to(torch.uint8)
    return v


def _adjacency(t, n, bits, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** bits, (t, n, n), generator=g, dtype=torch.uint8)


def _backends():
    out = []
    from qgnn_deploy.backends import cpu
    if cpu.is_available():
        out.append(("cpu", cpu.cpu_node_rows, cpu.cpu_qbmm, "cpu"))
    return out


# ------------------------------------------------------------------ reference semantics

@pytest.mark.parametrize("t,n,d,ab,widths", SHAPES)
def test_node_rows_is_lossless_and_takes_the_fewest_widths(t, n, d, ab, widths):
    v = _node_codes(t, n, d, widths)
    q, rb, ro = ref_node_rows(v, widths)
    assert q.dtype == rb.dtype == ro.dtype == torch.uint8
    assert torch.equal(q + ro.unsqueeze(-1), v)
    if d:
        assert torch.equal(ro, v.amin(-1)) and bool((q.amin(-1) == 0).all())
        span = q.amax(-1).long()
        for b in widths:
            fits = span < 2 ** b
            assert bool((rb[fits] <= b).all())          # never more than needed
        assert bool((span < (1 << rb.long())).all())     # always enough
    else:
        assert bool((rb == widths[0]).all()) and not bool(ro.any())


@pytest.mark.parametrize("t,n,d,ab,widths", SHAPES)
def test_qbmm_on_per_node_codes_equals_the_shared_grid(t, n, d, ab, widths):
    v, a = _node_codes(t, n, d, widths), _adjacency(t, n, ab)
    args = (ab, widths[-1], 0.013, -0.21, 0.07, -0.31)
    q, rb, ro = ref_node_rows(v, widths)
    assert torch.equal(ref_qbmm(a, q, *args, rb, ro), ref_qbmm(a, v, *args))


def test_bad_per_node_inputs_raise():
    v, a = _node_codes(1, 6, 8, (2, 4)), _adjacency(1, 6, 4)
    q, rb, ro = ref_node_rows(v, (2, 4))
    args = (4, 4, 0.1, 0.0, 0.1, 0.0)
    for widths in [(4,), (4, 2), (2, 5), (2, 2, 4)]:
        with pytest.raises(KernelArgumentError, match="node_bits"):
            ref_node_rows(v, widths)
    with pytest.raises(KernelArgumentError, match=">= 2\\^3"):
        ref_node_rows(v, (2, 3))                          # codes above the widest width
    with pytest.raises(KernelArgumentError, match="go together"):
        ref_qbmm(a, q, *args, rb, None)
    with pytest.raises(KernelArgumentError, match=r"row_bits must be uint8 \[1, 6\]"):
        ref_qbmm(a, q, *args, rb.int(), ro)
    wide = q.clone()
    wide[0, rb[0] == 2] = 3
    wide[0, int((rb[0] == 2).nonzero()[0])] = 7
    with pytest.raises(KernelArgumentError, match="2\\^row_bits"):
        ref_qbmm(a, wide, *args, rb, ro)
    with pytest.raises(KernelArgumentError, match="leaves the 4-bit grid"):
        ref_qbmm(a, q, *args, rb, ro + 15)


# ------------------------------------------------------------------ backends vs reference

@pytest.mark.parametrize("t,n,d,ab,widths", SHAPES)
def test_cpu_kernels_equal_the_reference(t, n, d, ab, widths, cpu_isa):
    from qgnn_deploy.backends.cpu import cpu_node_rows, cpu_qbmm
    v, a = _node_codes(t, n, d, widths), _adjacency(t, n, ab)
    want = ref_node_rows(v, widths)
    got = cpu_node_rows(v, widths)
    assert all(torch.equal(x, y) for x, y in zip(got, want)), cpu_isa
    args = (ab, widths[-1], 0.013, -0.21, 0.07, -0.31)
    assert torch.equal(cpu_qbmm(a, *got[:1], *args, *got[1:]), ref_qbmm(a, v, *args)), cpu_isa


def test_cpu_kernels_reject_bad_per_node_inputs():
    from qgnn_deploy.backends import cpu
    if not cpu.is_available():
        pytest.skip("qgnn_deploy._C not built (pip install -e .)")
    v, a = _node_codes(2, 6, 8, (2, 4)), _adjacency(2, 6, 4)
    q, rb, ro = ref_node_rows(v, (2, 4))
    args = (4, 4, 0.1, 0.0, 0.1, 0.0)
    with pytest.raises(KernelArgumentError, match="node_bits"):
        cpu.cpu_node_rows(v, [4, 2])
    with pytest.raises(KernelArgumentError, match="codes >= 2\\^3"):
        cpu.cpu_node_rows(v, [2, 3])
    with pytest.raises(KernelArgumentError, match="go together"):
        cpu.cpu_qbmm(a, q, *args, rb, None)
    with pytest.raises(KernelArgumentError, match="row_bits and row_offset must be uint8"):
        cpu.cpu_qbmm(a, q, *args, rb[:1], ro[:1])
    with pytest.raises(KernelArgumentError, match="2\\^row_bits"):
        cpu.cpu_qbmm(a, q, *args, torch.full_like(rb, 2) if bool((rb == 4).any()) else rb, ro)
    with pytest.raises(KernelArgumentError, match="leaves the 4-bit grid"):
        cpu.cpu_qbmm(a, q, *args, rb, ro + 15)
    with pytest.raises(KernelArgumentError, match="width 5"):
        cpu.cpu_qbmm(a, q, *args, torch.full_like(rb, 5), ro)


@pytest.mark.parametrize("t,n,d,ab,widths", SHAPES[:4])
def test_triton_kernels_equal_the_reference(t, n, d, ab, widths):
    device = _triton_device()
    from qgnn_deploy.backends.triton import triton_node_rows, triton_qbmm
    v, a = _node_codes(t, n, d, widths), _adjacency(t, n, ab)
    want = ref_node_rows(v, widths)
    got = [x.cpu() for x in triton_node_rows(v.to(device), widths)]
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    args = (ab, widths[-1], 0.013, -0.21, 0.07, -0.31)
    out = triton_qbmm(a.to(device), want[0].to(device), *args, *(x.to(device) for x in want[1:]))
    assert torch.equal(out.cpu(), ref_qbmm(a, v, *args))


# ------------------------------------------------------------------ the model

NODE_BITS = (2, 4, 8)
_CACHE = {}


def node_model():
    """A calibrated tiny 4-bit model with per-node widths whose node ranges are widened so
    that its nodes take more than one width."""
    if "model" not in _CACHE:
        m = calibrated_model("tiny", 4, quiet=True, node_bits=NODE_BITS)
        for mod in m.modules():
            if getattr(mod, "node_bits", ()):
                q = mod.node_quant
                with torch.no_grad():
                    q.r.copy_(q.l + (q.r - q.l) * 12)
        _CACHE["model"] = m
    return _CACHE["model"]


def folded(zero_point):
    if zero_point not in _CACHE:
        im = fold(node_model(), zero_point=zero_point, backend="reference")
        images, labels, _ = next(episode_batches(im.config, 2, seed=0, split="test", tasks_per_batch=2))
        _CACHE[zero_point] = im, (images, labels), im(images, labels)
    return _CACHE[zero_point]


def _aggregations(im):
    return [m for m in im.integer_layers().values() if isinstance(m, IntAggregation)]


def test_fold_keeps_the_widths_and_nodes_take_several():
    im, episode, _ = folded("exact")
    aggs = _aggregations(im)
    assert aggs and all(m.node_bits == NODE_BITS and m.v_bits == 8 for m in aggs)
    for m in aggs:
        m.node_stats = {}
    try:
        im(*episode)
        seen = set().union(*(m.node_stats for m in aggs))
    finally:
        for m in aggs:
            m.node_stats = None
    assert len(seen) >= 2, seen
    plan = im.compiled().plan
    assert sum(st.kind == "node_rows" for st in plan.steps) == len(aggs)


@pytest.mark.parametrize("zero_point", ["exact", "snap"])
def test_cpu_plan_and_eager_are_bit_identical_to_the_reference(zero_point, cpu_isa):
    im, episode, ref = folded(zero_point)
    assert outputs_equal(run_on(im, "cpu", episode), ref), cpu_isa
    assert_identical(run_on(im, "cpu-eager", episode), ref, ("cpu-eager", cpu_isa))


def test_triton_model_matches_the_reference():
    device = _triton_device()
    im, (images, labels), _ = folded("snap")
    episode = (images[:1], labels[:1])
    want = run_on(im, "reference", episode)
    try:
        out = run_on(im.to(device), "triton", tuple(t.to(device) for t in episode))
    finally:
        im.to("cpu")
    assert_identical(out, want, ("triton", device))


@pytest.mark.parametrize("zero_point", ["exact", "snap"])
def test_onnx_standard_export_is_bit_identical(zero_point, tmp_path):
    pytest.importorskip("onnxruntime")
    from qgnn_deploy.backends.onnx import OnnxSession
    from qgnn_deploy.export import build_onnx
    from qgnn_deploy.fold import compare_engines
    im, episode, ref = folded(zero_point)
    proto, _ = build_onnx(im, form="standard")
    assert any(n.op_type == "ReduceMin" for n in proto.graph.node)   # the per-node codes
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    cmp = compare_engines(ref.logits, OnnxSession(str(path), threads=1)(*episode))
    assert cmp["agreement"] == 1.0 and cmp["max_logit_diff"] == 0.0, cmp


def test_artifact_round_trip_keeps_the_widths(tmp_path):
    im, episode, ref = folded("snap")
    path = str(tmp_path / "m.qgnn")
    save_int_model(im, path)
    back = load_int_model(path, backend="reference")
    assert [m.node_bits for m in _aggregations(back)] == [NODE_BITS] * len(_aggregations(im))
    assert back.config.node_bits == NODE_BITS
    assert torch.equal(back(*episode).logits, ref.logits)


# ------------------------------------------------------------------ config, training, report

def test_config_validates_and_round_trips_node_bits():
    cfg = preset_config("tiny", 4, node_bits=[8, 2, 4])
    assert cfg.node_bits == (2, 4, 8)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert check_node_bits("2,4,8") == (2, 4, 8) and check_node_bits("") == ()
    for bad, msg in [((4,), "at least two"), ((2, 5), "one of"), ((2, 2), "repeats"), ("2,x", "comma")]:
        with pytest.raises(ConfigError, match=msg):
            check_node_bits(bad)


def test_train_options_reject_node_bits_on_an_fp_model_and_a_target_outside():
    from qgnn_deploy.training import TrainOptions
    with pytest.raises(ConfigError, match="quantized model"):
        TrainOptions(out="x.pt", bits=32, node_bits=(2, 4)).model_config()
    opts = TrainOptions(out="x.pt", bits=4, node_bits=(2, 4, 8), node_bits_target=9)
    with pytest.raises(ConfigError, match="node-bits-target"):
        opts.node_target(opts.model_config())
    assert TrainOptions(out="x.pt", bits=4, node_bits=(2, 4, 8)).node_target(
        preset_config("tiny", 4, node_bits=(2, 4, 8))) == 4


def test_penalty_grows_the_node_step_and_uniform_sources_keep_theirs():
    from qgnn_deploy.models import QAggregation
    from qgnn_deploy.training.losses import node_bits_penalty
    from qgnn_deploy.training.trainer import _keep_node_steps
    m = calibrated_model("tiny", 4, quiet=True, node_bits=NODE_BITS).train()
    images, labels, _ = next(episode_batches(m.config, 2, seed=0, split="train", tasks_per_batch=2))
    m(images, labels)
    pen = node_bits_penalty(m, 2.0)
    assert pen is not None and float(pen) > 0
    pen.backward()
    aggs = [x for x in m.modules() if isinstance(x, QAggregation)]
    assert all(float(x.node_quant.r.grad) < 0 for x in aggs)   # descending grows r - l: a coarser step
    # from a uniform 4-bit source: the 8-bit grid keeps the 4-bit step
    steps = [float(x.node_quant.step()) * 255 / 15 for x in aggs]
    _keep_node_steps(m, preset_config("tiny", 4))
    assert [float(x.node_quant.step()) for x in aggs] == pytest.approx(steps, rel=1e-5)


def test_report_gives_the_width_histogram_and_cheaper_bit_flops():
    from qgnn_deploy.report import count_bit_flops
    im, _, _ = folded("exact")
    im.backend = None   # the default (cpu: the compiled plan) must still give the widths
    try:
        d = count_bit_flops(im, per_image_backbone=True, node_episodes=4).to_dict()
    finally:
        im.backend = "reference"
    rows = [l for l in d["layers"] if l["kind"] == "aggregation"]
    assert rows and all(l["node_bits"] and sum(l["node_bits"].values()) == 4 * im.config.num_nodes for l in rows)
    for l in rows:
        assert l["node_bits_mean"] < 8 and l["bit_flops"] < l["uniform_bit_flops"]
        assert l["node_bytes"] < l["uniform_node_bytes"]
    t = d["total"]
    assert 2 <= t["node_bits_mean"] < 8 and t["bit_flops"] < t["uniform_bit_flops"]
