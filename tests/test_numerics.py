"""Numerics (issue 9, part 4): NaN/Inf and out-of-range inputs, the int32 accumulator bound.

Policy under test (ops/reference.py, backends/cpu.py, errors.InputError):
- quantize: NaN/+-Inf input raises KernelArgumentError on every backend (a NaN has no
  code); huge finite values clamp to 0 / 2^bits - 1 (no UB in float -> int);
- model input with NaN/Inf raises InputError before any kernel runs;
- scales must be finite and > 0, offsets finite;
- accumulators: ops/bounds.py proves K * max|code product| < 2^31 for every supported
  layer; the worst case is run exactly here.
"""
from __future__ import annotations

import math

import pytest
import torch

from qgnn_deploy.errors import InputError, KernelArgumentError, QGNNError
from qgnn_deploy.ops import bounds as B
from qgnn_deploy.ops import reference as R
from qgnn_deploy.ops.packing import pack_codes

BITS = (2, 3, 4, 8)
SPECIALS = (math.nan, math.inf, -math.inf)


def _backends():
    """quantize implementations available here: (name, fn)."""
    out = [("reference", R.ref_quantize)]
    try:
        from qgnn_deploy.backends import cpu
        if cpu.is_available():
            out.append(("cpu", cpu.cpu_quantize))
    except ImportError:
        pass
    try:
        from qgnn_deploy.backends import triton as tb
        if tb.is_available():
            out.append(("triton", tb.triton_quantize))
    except ImportError:
        pass
    return out


def _cpu():
    from qgnn_deploy.backends import cpu
    if not cpu.is_available():
        pytest.skip("C++ extension not built")
    return cpu


# ================================================================== quantize

@pytest.mark.parametrize("special", SPECIALS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("bits", BITS)
def test_quantize_rejects_non_finite(special, bits):
    x = torch.linspace(-1, 1, 37)
    x[17] = special
    for name, fn in _backends():
        with pytest.raises(KernelArgumentError):
            fn(x, -1.0, 0.1, bits)
        # also a lone special value, the first and last element of a longer tensor
        for pos in (0, 1000 - 1):
            y = torch.zeros(1000)
            y[pos] = special
            with pytest.raises(KernelArgumentError):
                fn(y, -1.0, 0.1, bits)


@pytest.mark.parametrize("bits", BITS)
def test_quantize_huge_finite_values_clamp(bits):
    """Finite values far outside the range clamp to the end codes on every backend
    ((x - l) / s overflowing to +-inf in fp32 included): no UB, no wrap-around."""
    fmax = torch.finfo(torch.float32).max
    x = torch.tensor([fmax, -fmax, 1e30, -1e30, 3e38, -3e38, 1e-45, -1e-45, 0.0, -0.0,
                      2.0 ** 31, -(2.0 ** 31), 2.0 ** 63, 1e10])
    qmax = 2 ** bits - 1
    want = R.ref_quantize(x, -1.0, 1e-3, bits)
    assert want.tolist()[:6] == [qmax, 0, qmax, 0, qmax, 0]
    for name, fn in _backends():
        got = fn(x, -1.0, 1e-3, bits)
        assert torch.equal(got, want), name
        # a tiny step makes every nonzero (x - l) / s overflow to inf
        got = fn(x, 0.0, 1e-38, bits)
        assert torch.equal(got, R.ref_quantize(x, 0.0, 1e-38, bits)), name


@pytest.mark.parametrize("bits", BITS)
def test_quantize_round_half_even_at_ties(bits):
    # (x - l)/s lands exactly on .5 for these x (s a power of two): ties go to even
    s = 0.25
    k = torch.arange(0, 2 ** bits, dtype=torch.float32)
    x = (k + 0.5) * s
    want = torch.clamp(torch.round(k + 0.5), 0, 2 ** bits - 1).to(torch.uint8)
    for name, fn in _backends():
        assert torch.equal(fn(x, 0.0, s, bits), want), name


@pytest.mark.parametrize("l,s", [(0.0, 0.0), (0.0, -1.0), (math.nan, 0.1), (0.0, math.nan),
                                 (math.inf, 0.1), (0.0, math.inf), (-math.inf, 1.0)])
def test_quantize_rejects_bad_quantizer_parameters(l, s):
    x = torch.zeros(4)
    for name, fn in _backends():
        with pytest.raises(KernelArgumentError):
            fn(x, l, s, 4)


def test_quantize_denormal_step_and_empty():
    x = torch.tensor([0.0, 1e-45, 1.0])
    for name, fn in _backends():
        assert torch.equal(fn(x, 0.0, 1e-45, 8), R.ref_quantize(x, 0.0, 1e-45, 8)), name
        assert fn(torch.zeros(0), 0.0, 0.1, 4).shape == (0,)


# ================================================================== op-level specials

def _linear_args(o=3, k=8, bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2 ** bits, (4, k), generator=g).to(torch.uint8)
    wp = pack_codes(torch.randint(0, 2 ** bits, (o, k), generator=g).to(torch.uint8), bits)
    return x, wp, dict(w_scale=torch.full((o,), 0.1), w_offset=torch.zeros(o), a_scale=0.1, a_offset=0.0)


@pytest.mark.parametrize("special", SPECIALS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("what", ["w_scale", "w_offset"])
def test_non_finite_weight_quantizer_rejected_by_cpu(special, what):
    cpu = _cpu()
    x, wp, epi = _linear_args()
    v = epi[what].clone()
    v[1] = special
    with pytest.raises(KernelArgumentError, match=what):
        cpu.cpu_qlinear(x, wp, 4, 4, **{**epi, what: v})


def test_reference_nan_w_scale_message_names_it():
    x, wp, epi = _linear_args()
    v = epi["w_scale"].clone()
    v[1] = math.nan
    with pytest.raises(KernelArgumentError, match="w_scale"):
        R.ref_qlinear(x, wp, 4, 4, **{**epi, "w_scale": v})


def test_reference_rejects_scalar_overflowing_fp32():
    x, wp, epi = _linear_args()
    with pytest.raises(KernelArgumentError):
        R.ref_qlinear(x, wp, 4, 4, **{**epi, "a_scale": 1e39})


@pytest.mark.parametrize("kw", [
    dict(post_scale=torch.full((3,), 1.0), post_shift=torch.tensor([0.0, -math.inf, math.inf])),
    dict(post_scale=torch.full((3,), math.inf), post_shift=torch.full((3,), -math.inf)),
    dict(post_scale=torch.tensor([1.0, math.nan, 1.0]))])
def test_non_finite_epilogue_constants_rejected(kw):
    """Folded constants are finite by construction: Inf/NaN ones are refused by every backend."""
    cpu = _cpu()
    x, wp, epi = _linear_args()
    with pytest.raises(KernelArgumentError, match="NaN or Inf"):
        R.ref_qlinear(x, wp, 4, 4, **epi, **kw)
    with pytest.raises(KernelArgumentError, match="NaN or Inf"):
        cpu.cpu_qlinear(x, wp, 4, 4, **epi, **kw)


def test_epilogue_overflow_to_inf_and_nan_codes_match_reference():
    """Finite constants and inputs that drive y to +-inf or NaN (inf - inf): fp32 outputs
    agree with the reference and requantized codes are defined (NaN -> the same code as
    the reference), never garbage from an undefined float -> int conversion."""
    cpu = _cpu()
    x, wp, epi = _linear_args()
    cases = [dict(post_scale=torch.full((3,), 3e38), post_shift=torch.zeros(3)),
             dict(post_scale=torch.full((3,), 3e38), post_shift=torch.full((3,), -3e38)),
             dict(residual=torch.full((4, 3), math.nan)),
             dict(residual=torch.tensor([[math.inf, -math.inf, 0.0]] * 4))]
    for kw in cases:
        ref = R.ref_qlinear(x, wp, 4, 4, **epi, **kw)
        got = cpu.cpu_qlinear(x, wp, 4, 4, **epi, **kw)
        assert torch.equal(torch.isnan(ref), torch.isnan(got))
        fin = torch.isfinite(ref)
        assert torch.equal(ref[~fin & ~torch.isnan(ref)], got[~fin & ~torch.isnan(got)])
        assert torch.allclose(ref[fin], got[fin], rtol=1e-5, atol=1e-5)
        q = dict(out_l=0.0, out_s=0.1, out_bits=4)
        assert torch.equal(R.ref_qlinear(x, wp, 4, 4, **epi, **kw, **q),
                           cpu.cpu_qlinear(x, wp, 4, 4, **epi, **kw, **q))


# ================================================================== accumulator bound

def test_bound_table():
    # (2): K * (2^bw - 1)(2^ba - 1) <= 2^31 - 1 < (K + 1) * ...
    for bw in BITS:
        for ba in BITS:
            k = B.max_reduction(bw, ba, centred=False)
            p = (2 ** bw - 1) * (2 ** ba - 1)
            assert k * p <= 2 ** 31 - 1 < (k + 1) * p
            kc = B.max_reduction(bw, ba, centred=True)
            assert kc == 33025 and kc * 255 * 255 <= 2 ** 31 - 1 < (kc + 1) * 255 * 255
            B.check_reduction(kc, bw, ba)
            with pytest.raises(KernelArgumentError, match="split"):
                B.check_reduction(kc + 1, bw, ba, layer="x")
            B.check_reduction(k, bw, ba, centred=False)
            with pytest.raises(KernelArgumentError):
                B.check_reduction(k + 1, bw, ba, centred=False)
    for bad in (5, 32, True, "4"):
        with pytest.raises(KernelArgumentError):
            B.max_reduction(bad, 4)
    for bad in (-1, 1.5, True):
        with pytest.raises(KernelArgumentError):
            B.check_reduction(bad, 4, 4)


def test_every_supported_config_is_within_the_bound():
    from qgnn_deploy.config import PRESETS, preset_config
    worst = 0
    for name in PRESETS:
        for bits in (2, 3, 4, 8):
            for size in (32, 84):
                for way, shot in ((5, 1), (5, 5), (10, 5)):
                    cfg = preset_config(name, bits, image_size=size, way=way, shot=shot)
                    B.check_config(cfg)
                    worst = max(worst, max(B.config_reductions(cfg).values()))
    assert worst < B.max_reduction(8, 8, centred=True)
    # a config beyond the bound is refused with the layer's name
    big = preset_config("resnet12-cifarfs", 8, widths=(64, 128, 256, 4096))
    with pytest.raises(KernelArgumentError, match="layer4"):
        B.check_config(big)


def test_folded_model_within_bound():
    """check_int_model over a real folded model (every integer layer's K)."""
    from qgnn_deploy.fold import fold
    pytest.importorskip("qgnn_deploy.fold")
    im = fold(_tiny_model())
    B.check_int_model(im)
    assert len(im.integer_layers()) > 10


_MODEL = {}


def _tiny_model(bits=4):
    if bits not in _MODEL:
        from qgnn_deploy.config import preset_config
        from qgnn_deploy.data import calibration_episodes
        from qgnn_deploy.models import build_model
        torch.manual_seed(0)
        cfg = preset_config("tiny", bits)
        m = build_model(cfg)
        images, labels = calibration_episodes(cfg, tasks=1, seed=0)
        m.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.dropout._DropoutNd):
                mod.eval()
        with torch.no_grad():
            m(images, labels)
        _MODEL[bits] = m.eval()
    return _MODEL[bits]


@pytest.mark.parametrize("wb,ab", [(8, 8), (4, 8), (8, 2), (2, 2), (3, 3)])
def test_worst_case_accumulator_exact(wb, ab):
    """All codes at their maximum over the longest reduction the bound allows at 8x8
    (K = 33,025): ACC = K * (2^wb - 1)(2^ab - 1) exactly, on every backend here."""
    k = B.max_reduction(8, 8)
    want = B.worst_case_accumulator(k, wb, ab)
    assert want <= 2 ** 31 - 1
    x = torch.full((2, k), 2 ** ab - 1, dtype=torch.uint8)
    wc = torch.full((3, k), 2 ** wb - 1, dtype=torch.uint8)
    wp = pack_codes(wc, wb)
    acc, as_, ws = R.ref_linear_acc(x, wc)
    assert int(acc.min()) == int(acc.max()) == want
    assert int(as_[0]) == k * (2 ** ab - 1) and int(ws[0]) == k * (2 ** wb - 1)
    try:
        from qgnn_deploy.backends import cpu
        ok = cpu.is_available()
    except ImportError:
        ok = False
    if ok:
        for isa in ("scalar", "avx2", None):
            try:
                cpu.force_isa(isa)
                cacc, cas = cpu.cpu_linear_acc(x, wp, wb, ab)
            finally:
                cpu.force_isa(None)
            assert torch.equal(cacc, acc), isa
            assert torch.equal(cas, as_)
        # through the fp32 epilogue with offsets (centred parts at their extreme)
        epi = dict(w_scale=torch.full((3,), 1e-4), w_offset=torch.full((3,), -0.05),
                   a_scale=1e-3, a_offset=-0.1)
        ref = R.ref_qlinear(x, wp, wb, ab, **epi)
        got = cpu.cpu_qlinear(x, wp, wb, ab, **epi)
        assert torch.equal(ref, got)  # the epilogue runs in the reference's fp32 op order


def test_worst_case_aggregation_exact():
    n = 200
    a = torch.full((1, n, n), 255, dtype=torch.uint8)
    v = torch.full((1, n, 7), 255, dtype=torch.uint8)
    acc, _, _ = R.ref_bmm_acc(a, v)
    assert int(acc.max()) == n * 255 * 255
    try:
        from qgnn_deploy.backends import cpu
        if cpu.is_available():
            assert torch.equal(cpu.cpu_bmm_acc(a, v, 8, 8)[0], acc)
    except ImportError:
        pass


# ================================================================== model inputs

@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_model_input_nan_inf_is_input_error(backend):
    pytest.importorskip("qgnn_deploy.fold")
    from qgnn_deploy.backends import is_backend_available
    from qgnn_deploy.data import calibration_episodes
    from qgnn_deploy.fold import fold
    if not is_backend_available(backend):
        pytest.skip(f"{backend} backend unavailable")
    m = _tiny_model()
    im = fold(m, backend=backend)
    images, labels = calibration_episodes(m.config, tasks=1, seed=3)
    for special in SPECIALS:
        bad = images.clone()
        bad[0, 1, 2, 3, 4] = special
        with pytest.raises(InputError):
            im(bad, labels)
    # wrong shapes / dtypes / labels: InputError too, never a raw torch error
    for args in [(images[0], labels), (images[:, :-1], labels), (images.double().to(torch.int64), labels),
                 (images, labels.float()), (images, labels + 100), (images, -labels - 1),
                 (images[..., :-1], labels), ("images", labels)]:
        with pytest.raises(QGNNError):
            im(*args)
    # huge finite inputs are valid: they clamp in the quantizers
    out = im(images * 1e30, labels).logits
    assert out.shape == (1, m.config.way, m.config.way)
