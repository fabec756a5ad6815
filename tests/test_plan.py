"""The compiled plan (backend ``cpu``) against the reference engine, and its boundaries.

The plan runs the same episode description as the reference (``IntModel.episode``), with
every FP32 sum in float64 (ops/episode_ops.py), so its outputs are expected -- and
asserted -- to be bit-identical: logits, point / distribution edges and node
similarities of every generation.
"""
import copy
import threading

import numpy as np
import pytest
import torch

from qgnn_deploy.backends import cpu as cpu_backend
from qgnn_deploy.backends.cpu_plan import _GRAPH_CACHE, native_description
from qgnn_deploy.checkpoint import load_checkpoint
from qgnn_deploy.data import calibration_episodes
from qgnn_deploy.errors import InputError, KernelArgumentError
from qgnn_deploy.fold import fold
from qgnn_deploy.plan import compile_plan
from qgnn_deploy.sources import calibrated_model, embedded_checkpoint

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(), reason="C++ extension not built")

_MODELS = {}


def model_for(bits, **overrides):
    """The shipped tiny QAT checkpoint when one fits, else a calibrated fresh tiny model."""
    key = (bits, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        path = embedded_checkpoint("tiny", bits)
        _MODELS[key] = (load_checkpoint(path).eval() if path and not overrides
                        else calibrated_model("tiny", bits, quiet=True, **overrides))
    return _MODELS[key]


def outputs_equal(a, b):
    pairs = [(a.logits, b.logits)] + list(zip(a.point_edges, b.point_edges)) + list(
        zip(a.distribution_edges, b.distribution_edges)) + list(zip(a.node_similarities, b.node_similarities))
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in pairs)


def run(im, backend, images, labels):
    im.backend = backend
    return im(images, labels)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("zero_point", ["exact", "snap"])
def test_plan_is_bit_identical_to_the_reference(bits, zero_point):
    model = model_for(bits)
    im = fold(model, zero_point=zero_point)
    for tasks, seed in ((1, bits), (3, 10 + bits)):
        images, labels = calibration_episodes(model.config, tasks=tasks, seed=seed)
        ref, got = run(im, "reference", images, labels), run(im, "cpu", images, labels)
        assert got.logits.shape == (tasks, model.config.way, model.config.way)
        assert len(got.point_edges) == im.generations
        assert outputs_equal(ref, got)


@pytest.mark.parametrize("overrides", [dict(shot=5), dict(image_size=84)], ids=["5shot", "84px"])
def test_plan_other_episode_geometries(overrides):
    model = model_for(4, **overrides)
    im = fold(model)
    images, labels = calibration_episodes(model.config, tasks=2, seed=3)
    assert outputs_equal(run(im, "reference", images, labels), run(im, "cpu", images, labels))


@pytest.mark.parametrize("zero_point", ["exact", "snap"])
def test_plan_wide_fp32_stem_and_per_channel_weights(zero_point):
    """A 64-wide FP32 stem (the paper model's; its rows run in pixel pairs) and per-channel
    weight offsets (column zero points that differ) at 3 bits."""
    model = model_for(3, widths=(64, 16, 16, 16), weight_granularity="channel")
    im = fold(model, zero_point=zero_point)
    images, labels = calibration_episodes(model.config, tasks=2, seed=11)
    assert outputs_equal(run(im, "reference", images, labels), run(im, "cpu", images, labels))


@pytest.mark.parametrize("width", [16, 64])
def test_plan_fp32_stem_requantization_ties(width):
    """The FP32 stem's fused requantization on outputs whose quotient (y - l) / s is exactly a
    half-integer while y * (1/s) rounds to the other code: codes as ref_quantize's IEEE
    division, whatever fast path the row kernels take (a reciprocal one that skipped its
    fix-up fails here; the stem sums in float32 on AVX2 and AVX-512 and must redo these
    pixels in float64)."""
    tiny = fold(model_for(4))
    im = copy.deepcopy(tiny if width == 16 else fold(model_for(4, widths=(64, 16, 16, 16))))
    stem, conv1 = im.backbone.conv1, im.backbone.layer1[0].conv1
    # the tiny model's quantizer, whose ties 1/s rounds the other way (the wide model's has none)
    conv1.a_scale, conv1.a_offset = tiny.backbone.layer1[0].conv1.a_scale, tiny.backbone.layer1[0].conv1.a_offset
    s, l = (torch.tensor(float(v), dtype=torch.float32) for v in (conv1.a_scale, conv1.a_offset))
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    cases = []
    for k in range(5, 15):  # codes of outputs >= 0 (LeakyReLU passes them unchanged)
        ys = [(l.double() + (k + 0.5) * s.double()).float()]
        for _ in range(40):  # 40 fp32 steps either side
            ys = [torch.nextafter(ys[0], down)] + ys + [torch.nextafter(ys[-1], up)]
        cases += [y for y in ys if y >= 0 and float((y - l) / s) == k + 0.5
                  and torch.round((y - l) * (1 / s)) != torch.round(torch.tensor(k + 0.5))]
    assert len(cases) >= 3, "no tie the reciprocal rounds the other way near this quantizer's codes"
    # below zero, where the rows check the quotient against the LeakyReLU's smaller margin:
    # a quantizer with most codes under y = 0 (offset -3), shifts z with slope * z such a tie
    slope, l3 = torch.tensor(float(stem.slope), dtype=torch.float32), torch.tensor(-3.0)
    neg = []
    for k in range(0, 15):
        ys = [(l3.double() + (k + 0.5) * s.double()).float()]
        for _ in range(40):
            ys = [torch.nextafter(ys[0], down)] + ys + [torch.nextafter(ys[-1], up)]
        for y in ys:
            if not (y < 0 and float((y - l3) / s) == k + 0.5
                    and torch.round((y - l3) * (1 / s)) != torch.round(torch.tensor(k + 0.5))):
                continue
            z = (y / slope).float()
            for _ in range(200):
                if z * slope == y:
                    neg.append(z)
                    break
                z = torch.nextafter(z, down if z * slope > y else up)
    assert neg, "no negative tie the reciprocal rounds the other way for this quantizer"
    # even channels output their shift (a tie) everywhere; odd ones keep the image's features,
    # so the episode's outputs depend on the tie channels' codes
    tie = torch.arange(stem.out_channels) % 2 == 0
    stem.weight[tie] = 0.0
    stem.post_scale[tie] = 1.0
    images, labels = calibration_episodes(im.config, tasks=1, seed=2)
    for shifts, offset in ((cases, l), (neg, l3)):
        stem.post_shift[tie] = torch.stack([shifts[i % len(shifts)] for i in range(int(tie.sum()))])
        conv1.a_offset = float(offset)
        im.recompile()
        assert outputs_equal(run(im, "reference", images, labels), run(im, "cpu", images, labels))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 4])
def test_plan_on_the_paper_model(bits):
    model = calibrated_model("resnet12-cifarfs", bits, quiet=True)
    im = fold(model)
    images, labels = calibration_episodes(model.config, tasks=2, seed=5)
    assert outputs_equal(run(im, "reference", images, labels), run(im, "cpu", images, labels))


@pytest.mark.parametrize("zero_point", ["exact", "snap"])
def test_plan_on_every_isa_and_thread_count(zero_point):
    model = model_for(3)
    im = fold(model, zero_point=zero_point)
    images, labels = calibration_episodes(model.config, tasks=2, seed=7)
    assert_cpu_matches_reference_on_every_isa(im, images, labels, threads=(1, 2))


def assert_cpu_matches_reference_on_every_isa(im, images, labels, threads=(None,)):
    """im's cpu outputs equal its reference ones on every ISA path this CPU runs, at each
    thread count (None: the default)."""
    want = run(im, "reference", images, labels)
    im.backend = "cpu"
    try:
        for isa in cpu_backend.available_isas():
            cpu_backend.force_isa(isa)
            for n in threads:
                cpu_backend.set_num_threads(n)
                assert outputs_equal(want, im(images, labels)), (isa, n)
    finally:
        cpu_backend.force_isa(None)
        cpu_backend.set_num_threads(None)


@pytest.mark.parametrize("width", [8, 12, 24, 32])
def test_plan_fp32_stem_widths_on_every_isa(width):
    """Stem widths whose sums take each multi-pixel kernel (float64: 1 to 4 vectors per pixel
    by the ISA's lanes; AVX2's float32 sums: 1 to 4 ymm; 12 outputs pad to 16) against the
    reference, on every ISA path."""
    model = model_for(4, widths=(width, 16, 16, 16))
    im = fold(model)
    images, labels = calibration_episodes(model.config, tasks=1, seed=13)
    assert_cpu_matches_reference_on_every_isa(im, images, labels)


def test_plan_workers_stay_awake_only_while_a_run_lasts():
    """A run keeps its workers polling between steps; afterwards they poll for the spin
    budget (200 us) and sleep: the idle process then burns no CPU."""
    import time
    model = model_for(4)
    im = fold(model, backend="cpu")
    images, labels = calibration_episodes(model.config, tasks=2, seed=1)
    cpu_backend.set_num_threads(2)
    try:
        for _ in range(3):
            im(images, labels)
        time.sleep(0.05)
        t0 = time.process_time()
        time.sleep(0.4)
        assert time.process_time() - t0 < 0.1  # a spinning worker would burn ~0.4 s
    finally:
        cpu_backend.set_num_threads(None)


def test_plan_tasks_axis_is_dynamic_and_shapes_are_checked():
    model = model_for(4)
    im = fold(model, backend="cpu")
    images, labels = calibration_episodes(model.config, tasks=5, seed=1)
    whole = im(images, labels)
    for t in range(5):  # one plan, any T; each task independent of the others
        one = im(images[t:t + 1], labels[t:t + 1])
        assert torch.equal(one.logits[0], whole.logits[t])
    plan = im.compiled()
    with pytest.raises(InputError, match="images per task"):
        im(images[:, :-1], labels)
    with pytest.raises(InputError, match="3x32x32"):
        im(torch.zeros(1, model.config.num_nodes, 3, 28, 28), labels[:1])
    # NaN / Inf are found by the plan's first step (every value, every task), not in Python
    for where, value in [((0, 0, 0, 0, 0), "nan"), ((4, -1, 2, 31, 31), "inf"), ((2, 3, 1, 7, 0), "-inf")]:
        bad = images.clone()
        bad[where] = float(value)
        with pytest.raises(InputError, match="images contain NaN or Inf values"):
            im(bad, labels)
        with pytest.raises(InputError, match="images contain NaN or Inf values"):
            im(bad[where[0]:where[0] + 1], labels[where[0]:where[0] + 1])
    huge = images.double()
    huge[1, 1, 1, 1, 1] = 1e300  # finite in float64, Inf in the float32 the model computes in
    with pytest.raises(InputError, match="NaN or Inf"):
        im(huge, labels)
    for _ in range(2):  # out-of-range labels are never cached as valid
        with pytest.raises(InputError, match="support labels"):
            im(images, labels + model.config.way)
        with pytest.raises(InputError, match="support labels"):
            im(images, labels - 1)
    assert im.compiled() is plan  # a rejected episode leaves the plan valid
    assert torch.equal(im(images, labels).logits, whole.logits)


def test_plan_graph_inputs_are_cached_per_label_batch():
    model = model_for(4)
    im = fold(model, backend="cpu")
    images, labels = calibration_episodes(model.config, tasks=3, seed=2)
    ref = run(im, "reference", images, labels)
    im.backend = "cpu"
    plan = im.compiled()
    first = im(images, labels)
    assert outputs_equal(ref, first)
    feed = plan._graph_feed(labels)
    assert feed[plan._images_at] is None and len(feed) == len(plan._feed_at)
    assert all(not a.flags.writeable for a in feed if a is not None)  # shared: nobody may write them
    # same labels (another tensor, int32): same graphs; other labels: their own graphs
    assert outputs_equal(first, im(images, labels.clone().to(torch.int32)))
    swapped = labels.flip(-1).contiguous()
    assert outputs_equal(run(im, "reference", images, swapped), run(im, "cpu", images, swapped))
    for t in range(1, 3):  # a prefix of the batch is another key, not a slice of the cached arrays
        assert outputs_equal(run(im, "reference", images[:t], labels[:t]), run(im, "cpu", images[:t], labels[:t]))
    for seed in range(40):  # the cache stays bounded
        lab = torch.randint(0, model.config.way, labels.shape, generator=torch.Generator().manual_seed(seed))
        plan._graph_feed(lab)
    assert len(plan._graphs) <= _GRAPH_CACHE


def test_plan_is_a_snapshot_recompiled_on_request_and_copies():
    model = model_for(4)
    im = fold(model, backend="cpu")
    images, labels = calibration_episodes(model.config, tasks=2, seed=2)
    before = im(images, labels)
    plan = im.compiled()
    clone = copy.deepcopy(im)  # the native plan is not copied: the copy compiles its own
    assert outputs_equal(before, clone(images, labels)) and clone.compiled() is not plan
    layer = im.layer("backbone.layer2.0.conv2")
    layer.post_shift.add_(0.5)  # an in-place edit: the compiled snapshot keeps the old constants
    assert outputs_equal(before, im(images, labels)) and im.compiled() is plan
    im.recompile()
    after = im(images, labels)
    assert im.compiled() is not plan and not torch.equal(before.logits, after.logits)
    im.backend = "reference"
    assert outputs_equal(im(images, labels), after)
    im.backend = "cpu"
    plan = im.compiled()
    im.load_state_dict(clone.state_dict())  # restores the weights and discards the plan
    assert im.compiled() is not plan and outputs_equal(before, im(images, labels))


def test_plan_concurrent_callers():
    model = model_for(2)
    im = fold(model, backend="cpu")
    batches = [calibration_episodes(model.config, tasks=2, seed=s) for s in range(4)]
    want = [im(i, l) for i, l in batches]
    got, errors = {}, []

    def worker(k):
        try:
            for _ in range(3):
                got[k] = im(*batches[k])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(outputs_equal(want[k], got[k]) for k in range(4))


def test_plan_profile_lists_every_step():
    model = model_for(4)
    im = fold(model)
    images, labels = calibration_episodes(model.config, tasks=1, seed=0)
    prof = im.profile(images, labels)
    plan = im.compiled().plan
    assert [p["kind"] for p in prof] == [s.kind for s in plan.steps]
    assert all(p["ms"] >= 0 for p in prof) and sum(p["ms"] for p in prof) > 0
    kinds = {s.kind for s in plan.steps}
    assert {"conv_f32", "qconv", "qlinear", "qbmm", "max_pool", "edge_update", "label_scores"} <= kinds


def test_plan_fuses_requantization_and_shortcuts_into_producers():
    """The stem and blocks 1-3's conv3 emit the codes of every quantizer they feed (pools
    run on codes); block 4's conv3 feeds the mean pool and stays fp32; every block's
    shortcut conv runs inside its conv3 (no residual map)."""
    plan = compile_plan(fold(model_for(4)))
    by_name = {st.name.split(" + ")[0]: st for st in plan.steps}
    dtype = lambda b: plan.buffers[b].dtype  # noqa: E731
    assert len(by_name["backbone.conv1"].params["requant"]) == 2
    # the stem reads the NCHW images itself: no layout-change step, no NHWC copy in the arena
    stem = plan.steps[0]
    assert stem.name == "backbone.conv1" and stem.params["nchw"] == 1
    assert plan.buffers[stem.inputs[0]].role == "input" and plan.buffers[stem.inputs[0]].name == "images"
    assert not any(st.kind == "nchw_to_nhwc" for st in plan.steps)
    for i, n in ((1, 2), (2, 2), (3, 3), (4, 0)):
        st = by_name[f"backbone.layer{i}.0.conv3"]
        assert st.name == f"backbone.layer{i}.0.conv3 + backbone.layer{i}.0.conv"
        assert "shortcut" in st.params and dtype(st.inputs[1]) == "u8"
        assert f"backbone.layer{i}.0.conv" not in by_name
        assert len(st.params.get("requant", [])) == n and all(dtype(b) == ("u8" if n else "f32") for b in st.outputs)
    assert not any(st.name.startswith("backbone.layer2") and st.kind == "quantize" for st in plan.steps)
    pools = [st for st in plan.steps if st.kind == "max_pool"]
    assert sum(dtype(st.inputs[0]) == "u8" for st in pools) == 2 + 2 + 3 + 1  # + layer_second's pool(2)


def test_plan_fp32_layer_writes_over_the_residual_it_last_reads():
    """Block 4's conv3 at FP32 cannot take the fused shortcut (a qlinear path), so it adds
    the stored residual and writes its output over it; the result stays bit-identical."""
    model = calibrated_model("tiny", 4, quiet=True, layer_bits={"backbone.layer4.0.conv3": 32})
    im = fold(model)
    st = next(s for s in compile_plan(im).steps if s.name == "backbone.layer4.0.conv3")
    assert st.kind == "linear_f32" and st.outputs == [st.inputs[1]]
    images, labels = calibration_episodes(model.config, tasks=2, seed=7)
    assert outputs_equal(run(im, "reference", images, labels), run(im, "cpu", images, labels))


def test_plan_layout_shares_memory_between_disjoint_lifetimes():
    plan = compile_plan(fold(model_for(4)))
    offsets, arena = plan.layout()
    temps = [b for b in plan.buffers if b.role == "temp"]
    assert arena < sum(b.nbytes for b in temps)  # reuse happened
    first, last = {}, {}
    for i, st in enumerate(plan.steps):
        for b in st.outputs + [b for b in st.inputs if b >= 0]:
            first.setdefault(b, i)
            last[b] = i
    for a in temps:  # no two live buffers overlap
        for b in temps:
            if a.id < b.id and not (last[a.id] < first[b.id] or last[b.id] < first[a.id]):
                oa, ob = offsets[a.id], offsets[b.id]
                assert oa + a.nbytes <= ob or ob + b.nbytes <= oa, (a, b)


# ------------------------------------------------------------------ the native boundary

def _build(buffers, steps, arena):
    return cpu_backend._call(cpu_backend._ext().Plan, buffers, steps, arena)


def test_native_plan_rejects_inconsistent_descriptions():
    buffers, steps, arena = native_description(compile_plan(fold(model_for(4))))
    _build(buffers, steps, arena)  # the real one builds
    assert steps[0]["kind"] == "conv_f32" and steps[0]["nchw"] == 1
    k = next(i for i, s in enumerate(steps) if s["kind"] == "qconv")
    cases = {
        "unknown kind": lambda b, s: s[k].update(kind="conv9d"),
        "wrong input size": lambda b, s: s[k].update(h=s[k]["h"] + 1),
        "buffer id out of range": lambda b, s: s[k].update(**{"in": [len(b) + 5, -1]}),
        "writes an input": lambda b, s: s[k].update(out=[0]),
        "output aliases an input": lambda b, s: s[k].update(out=list(s[k]["in"][:1])),
        "bad bits": lambda b, s: s[k].update(w_bits=5),
        "truncated weights": lambda b, s: s[k].update(w_packed=s[k]["w_packed"][:, :-1].copy()),
        "non-finite scale": lambda b, s: s[k].update(w_scale=np.full_like(s[k]["w_scale"], np.nan)),
        "missing parameter": lambda b, s: s[k].pop("a_scale"),
        "arena too small": lambda b, s: b.__setitem__(slice(None), [[x[0], x[1], x[2], x[3] + (1 << 30)]
                                                                     if x[2] == 2 else x for x in b]),
        "reads before any write": lambda b, s: s.insert(0, dict(s[k])),
        "shape not its size": lambda b, s: b[0].append(7),
        "NCHW input with a residual": lambda b, s: s[0].update(**{"in": [s[0]["in"][0]] * 2}),
        "NCHW flag not 0 / 1": lambda b, s: s[0].update(nchw=2),
    }
    for what, edit in cases.items():
        b, s = copy.deepcopy(buffers), copy.deepcopy(steps)
        edit(b, s)
        with pytest.raises(KernelArgumentError):
            _build(b, s, arena)
            pytest.fail(what)


@pytest.mark.parametrize("dtype", ["u8", "f32"])
# channels: whole 16-byte chunks, chunks + a byte tail, a tail only; pads up to ks - 1 (the
# windows clipped on every side); 1 and 2 threads; the AVX-512 path of codes (3x3, stride 2,
# pad 1; 16, 32 and 64k channels) on odd and even maps, 4 / 2 pixels per vector and a ragged
# last group
@pytest.mark.parametrize("c,ks,stride,pad", [(16, 3, 2, 1), (21, 3, 2, 1), (5, 2, 2, 1), (40, 3, 1, 2),
                                             (32, 3, 2, 1), (64, 3, 2, 1), (128, 3, 2, 1)])
@pytest.mark.parametrize("h,w", [(9, 7), (8, 14), (2, 2), (1, 17)])
def test_native_max_pool_step(threads, dtype, c, ks, stride, pad, h, w):
    if h + 2 * pad < ks or w + 2 * pad < ks:
        pytest.skip("map smaller than the padded window")
    b, tasks = 3, 2
    ho, wo = (h + 2 * pad - ks) // stride + 1, (w + 2 * pad - ks) // stride + 1
    code = {"u8": 0, "f32": 1}[dtype]
    buffers = [[code, b * h * w * c, 0, 0], [code, b * ho * wo * c, 1, 0]]
    step = dict(kind="max_pool", name="pool", images=b, h=h, w=w, c=c, ks=ks, stride=stride, pad=pad,
                **{"in": [0], "out": [1]})
    plan = _build(buffers, [step], 0)
    x = torch.randint(0, 256, (tasks * b, h, w, c), dtype=torch.uint8) if dtype == "u8" else \
        torch.randn(tasks * b, h, w, c)
    got = plan.run(tasks, [x.numpy()], threads)[0][0]
    # the reference: torch's max-pool of the map padded with -inf (which allows any pad < ks)
    xp = torch.nn.functional.pad(x.permute(0, 3, 1, 2).double(), (pad,) * 4, value=float("-inf"))
    want = torch.nn.functional.max_pool2d(xp, ks, stride).permute(0, 2, 3, 1).to(x.dtype)
    assert np.array_equal(got.reshape(want.shape), want.numpy())


@pytest.mark.parametrize("o", [8, 16, 24, 32])
@pytest.mark.parametrize("w,pad", [(31, 1), (29, 2), (30, 0)])
def test_native_fp32_stem_step_on_rows_of_any_length(o, w, pad):
    # output rows of 31 and 29 pixels: every remainder of the 6- and 3-pixel float32 calls
    # (a pair, then one pixel) and the zero-bordered copy at pads 0, 1 and 2, on every ISA
    # path against the scalar one's float64 sums (test_plan_fp32_stem_widths_on_every_isa
    # ties those to the reference); the same step on the NCHW input (``nchw``: the layout
    # change inside its copy) gives the same codes, and finds a NaN / Inf anywhere in it
    b, h, c, tasks, ks = 2, 5, 3, 2, 2 * pad + 1
    g = torch.Generator().manual_seed(o + w)
    requant = [(-1.5, 0.26, 4), (-1.2, 0.23, 4)]
    buffers = [[1, b * h * w * c, 0, 0]] + [[0, b * h * w * o, 1, 0] for _ in requant]
    step = dict(kind="conv_f32", name="stem", images=b, h=h, w=w, c=c, ks=ks, stride=1, pad=pad,
                weight=(torch.randn(o, ks, ks, c, generator=g) * 0.3).numpy(), post_scale=(torch.rand(o, generator=g) + 0.5).numpy(),
                post_shift=torch.randn(o, generator=g).numpy(), slope=0.2, requant=requant,
                **{"in": [0], "out": [1, 2]})
    x = torch.randn(tasks * b, h, w, c, generator=g)
    x_nchw = np.ascontiguousarray(x.permute(0, 3, 1, 2).numpy()).reshape(-1)
    x = x.numpy().reshape(-1)
    plan = _build(buffers, [step], 0)
    plan_nchw = _build(buffers, [dict(step, nchw=1)], 0)
    try:
        runs = {}
        for isa in cpu_backend.available_isas():
            cpu_backend.force_isa(isa)
            for threads in (1, 2):
                runs[isa, threads] = plan.run(tasks, [x], threads)[0]
                runs[isa, threads, "nchw"] = plan_nchw.run(tasks, [x_nchw], threads)[0]
            for at in (0, x_nchw.size - 1, b * c * h * w + 7):  # first, last, in the second task
                bad = x_nchw.copy()
                bad[at] = np.inf if at else np.nan
                with pytest.raises(cpu_backend._ext().InputValueError, match="NaN or Inf"):
                    plan_nchw.run(tasks, [bad], 2)
    finally:
        cpu_backend.force_isa(None)
    for key, outs in runs.items():
        for k in (0, 1):
            assert np.array_equal(outs[k], runs["scalar", 1][k]), (key, k)


def test_native_plan_run_checks_its_inputs():
    im = fold(model_for(4))
    plan = im.compiled()
    native, ids = plan.native, plan.input_ids
    images, labels = calibration_episodes(im.config, tasks=1, seed=0)
    from qgnn_deploy.models.qgnn import episode_graph
    graph = episode_graph(labels, im.config.way)
    feed = {ids["images"]: images.numpy().reshape(-1)}
    feed.update({ids[n]: g.numpy().reshape(-1) for n, g in
                 zip(("distribution_node", "point_edge", "distribution_edge", "onehot"), graph)})
    order = [b.id for b in plan.plan.buffers if b.role == "input"]  # the native run's input order
    outs, _ = native.run(1, [feed[i] for i in order], 1)
    shapes = [(1, *b.shape) for b in plan.plan.buffers if b.role == "output"]
    assert [o.shape for o in outs] == shapes
    for what, edit in {
        "missing input": lambda f: f.pop(ids["onehot"]),
        "wrong dtype": lambda f: f.__setitem__(ids["images"], f[ids["images"]].astype(np.float64)),
        "wrong size": lambda f: f.__setitem__(ids["images"], f[ids["images"]][:-3].copy()),
        "non-contiguous": lambda f: f.__setitem__(ids["point_edge"], np.repeat(f[ids["point_edge"]], 2)[::2]),
        "not an array": lambda f: f.__setitem__(ids["images"], f[ids["images"]].tolist()),
    }.items():
        f = dict(feed)
        edit(f)
        with pytest.raises(KernelArgumentError):
            cpu_backend._call(native.run, 1, [f[i] for i in order if i in f], 1)
            pytest.fail(what)
    listed = [feed[i] for i in order]
    for bad in ([*listed, listed[0]], {i: feed[i] for i in order}):  # one input too many; a dict
        with pytest.raises(KernelArgumentError):
            cpu_backend._call(native.run, 1, bad, 1)
    with pytest.raises(KernelArgumentError):
        cpu_backend._call(native.run, 2, listed, 1)  # the inputs hold one task
    with pytest.raises(KernelArgumentError):
        cpu_backend._call(native.run, 0, listed, 1)
