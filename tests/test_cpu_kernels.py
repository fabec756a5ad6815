"""The cpu backend (C++ packed-int kernels) against the reference integer engine.

Integer parts (ACC, AS, VS) must be identical (atol=0); fp32 outputs bit-identical (the
epilogue follows the reference order under -ffp-contract=off); output codes identical
except fp32 ties (<= 0.1% of elements, by 1). Every ISA path is forced in turn (the
``cpu_isa`` fixture of conftest.py; paths this CPU lacks are skipped with the reason).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qgnn_deploy.errors import KernelArgumentError
from qgnn_deploy.ops import reference as R
from qgnn_deploy.ops.packing import pack_codes, unpack_codes

cpu = pytest.importorskip("qgnn_deploy.backends.cpu")
if not cpu.is_available():  # pragma: no cover
    pytest.skip("qgnn_deploy._C not built (pip install -e .)", allow_module_level=True)

BITS = [2, 3, 4]


def codes(shape, bits):
    return torch.randint(0, 2 ** bits, shape, dtype=torch.uint8)


def epilogue_kwargs(o, out_shape, full=True):
    if not full:
        return {}
    return dict(post_scale=torch.rand(o) + 0.5, post_shift=torch.randn(o), residual=torch.randn(out_shape),
                slope=0.1)


def assert_codes_equal(got, want):
    """Output codes are identical: the kernels' epilogue evaluates the reference's fp32
    operations in its order (no FMA contraction), or on AVX-512 a fused form whose quotients
    near a rounding boundary are redone in that order, so even rounding ties round alike
    (measured: 0 mismatches over 300 fuzz examples per kernel)."""
    assert got.dtype == want.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got, want), f"{int((got != want).sum())} of {want.numel()} codes differ"


def wparams(o):
    return torch.rand(o) * 0.05 + 0.005, torch.randn(o) * 0.2


def snapped_or_real(o, snap, a_scale, a_offset):
    """(w_scale, w_offset, a_scale, a_offset): offsets on the grid (powers of two: offset +
    scale * z is exactly 0, so every remainder term is zero) or real ones."""
    if snap:
        ws = 2.0 ** -torch.randint(4, 9, (o,)).float()
        return ws, -ws * torch.randint(0, 16, (o,)).float(), 0.25, -1.0
    return (*wparams(o), a_scale, a_offset)


# ------------------------------------------------------------------ packing

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 7, 8, 9, 33, 70])
def test_pack_unpack_match_canonical(bits, k):
    c = codes((5, k), bits)
    p = pack_codes(c, bits)
    assert torch.equal(cpu.cpu_pack(c, bits), p)
    assert torch.equal(cpu.cpu_unpack(p, bits, k), c)


# ------------------------------------------------------------------ quantize

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_exact(cpu_isa, bits):
    x = torch.randn(3, 1001) * 2
    x[0, :7] = torch.tensor([0.0, -0.0, 0.125, 0.375, -1.0, 1e30, -1e30])  # ties, saturation
    l, s = -1.0, 0.25
    assert torch.equal(cpu.cpu_quantize(x, l, s, bits), R.ref_quantize(x, l, s, bits))


def test_quantize_rejects_nan_and_bad_args():
    x = torch.randn(100)
    x[3] = float("nan")
    with pytest.raises(KernelArgumentError):
        cpu.cpu_quantize(x, 0.0, 0.1, 4)
    with pytest.raises(KernelArgumentError):
        cpu.cpu_quantize(torch.randn(10).double(), 0.0, 0.1, 4)
    with pytest.raises(KernelArgumentError):
        cpu.cpu_quantize(torch.randn(10), 0.0, 0.0, 4)
    with pytest.raises(KernelArgumentError):
        cpu.cpu_quantize(torch.randn(10), 0.0, 0.1, 5)


# ------------------------------------------------------------------ linear

@pytest.mark.parametrize("wb,ab", [(2, 2), (3, 3), (4, 4), (2, 4), (4, 8), (8, 8)])
# rows cover every remainder of the 3-, 4- and 6-row register tiles; O tails of 8/16/64 columns
@pytest.mark.parametrize("m,k,o", [(1, 5, 3), (38, 70, 75), (13, 64, 130), (22, 33, 17), (23, 130, 8)])
def test_qlinear_exact(cpu_isa, threads, wb, ab, m, k, o):
    x, wc = codes((m, k), ab), codes((o, k), wb)
    wp = pack_codes(wc, wb)
    ws, wo = wparams(o)
    acc, as_ = cpu.cpu_linear_acc(x, wp, wb, ab)
    racc, ras, _ = R.ref_linear_acc(x, wc)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)
    args = (x, wp, wb, ab, ws, wo, 0.037, -0.41)
    kw = epilogue_kwargs(o, (m, o))
    assert torch.equal(cpu.cpu_qlinear(*args, **kw), R.ref_qlinear(*args, **kw))
    assert torch.equal(cpu.cpu_qlinear(*args), R.ref_qlinear(*args))
    q = dict(out_l=-0.9, out_s=0.15, out_bits=ab)
    assert_codes_equal(cpu.cpu_qlinear(*args, **kw, **q), R.ref_qlinear(*args, **kw, **q))
    kw.pop("residual")  # the conv + BN + LeakyReLU + re-quantize combination (specialised)
    assert_codes_equal(cpu.cpu_qlinear(*args, **kw, **q), R.ref_qlinear(*args, **kw, **q))


@pytest.mark.parametrize("zw", [0, 7, 128, 129, 255])
def test_weight_zero_points_at_the_centring_bound(cpu_isa, zw):
    # the AVX-512 tile takes the zero points out of <= 4-bit weights (code - zw in int8) up
    # to zw = 128, and keeps them in the epilogue beyond; a linear layer, a direct 3x3 conv
    # and a Winograd one (its transform always takes them out), fp32 and code outputs
    o = 40
    ws = torch.rand(o) * 0.05 + 0.005
    wo = -ws * zw  # zero_split: z = rne(-offset / scale) = zw exactly
    x, wc = codes((21, 36), 4), codes((o, 36), 4)
    args = (x, pack_codes(wc, 4), 4, 4, ws, wo, 0.05, -0.3)
    kw = dict(post_scale=torch.rand(o) + 0.5, post_shift=torch.randn(o), slope=0.1)
    assert torch.equal(cpu.cpu_qlinear(*args, **kw), R.ref_qlinear(*args, **kw))
    q = dict(out_l=-1.3, out_s=0.2, out_bits=4)
    assert_codes_equal(cpu.cpu_qlinear(*args, **kw, **q), R.ref_qlinear(*args, **kw, **q))
    xc, wcc = codes((2, 4, 6, 32), 4), codes((o, 9 * 32), 4)
    for algo in ("direct", "winograd"):
        cpu.force_conv_algo(algo)
        try:
            cargs = (xc, pack_codes(wcc, 4), 4, 4, 3, 1, 1, ws, wo, 0.05, -0.3)
            assert torch.equal(cpu.cpu_qconv2d(*cargs, **kw), R.ref_qconv2d(*cargs, **kw))
            assert_codes_equal(cpu.cpu_qconv2d(*cargs, **kw, **q), R.ref_qconv2d(*cargs, **kw, **q))
        finally:
            cpu.force_conv_algo(None)


@pytest.mark.parametrize("snap", [False, True])
@pytest.mark.parametrize("bn,res,slope,quant", [
    (False, False, False, False),  # flags read at run time
    (True, False, False, False), (True, False, True, False), (True, True, True, False),  # BN (+ LeakyReLU, + residual)
    (True, False, True, True), (True, True, True, True),  # ... to codes
])
def test_qlinear_every_compiled_epilogue(cpu_isa, snap, bn, res, slope, quant):
    # each epilogue the tiles compile with its flags known (csrc/epi_flags.h), with real
    # offsets and with offsets on the grid (zero remainder terms: Epi::zero_rem for codes);
    # 16-code rows (the narrow-row pixel sums), an odd row count, a ragged 8-column tail
    m, k, o = 29, 16, 40
    x, wc = codes((m, k), 4), codes((o, k), 4)
    wp = pack_codes(wc, 4)
    ws, wo, a_scale, a_offset = snapped_or_real(o, snap, 0.037, -0.41)
    kw = dict(post_scale=torch.rand(o) + 0.5, post_shift=torch.randn(o)) if bn else {}
    if res:
        kw["residual"] = torch.randn(m, o)
    if slope:
        kw["slope"] = 0.2
    if quant:
        kw.update(out_l=-0.9, out_s=0.15, out_bits=4)
    args = (x, wp, 4, 4, ws, wo, a_scale, a_offset)
    got, want = cpu.cpu_qlinear(*args, **kw), R.ref_qlinear(*args, **kw)
    if quant:
        assert_codes_equal(got, want)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("slope", [0.01, 1.0, 0.0, -0.3, 1.5])
@pytest.mark.parametrize("quant", [False, True])
def test_leaky_relu_slopes_and_non_finite_values(cpu_isa, slope, quant):
    # 0 < slope <= 1 takes max(y*slope, y) in the 256-bit tiles, any other slope the select;
    # both must give torch.where(y >= 0, y, y*slope) bit for bit, signed zeros, infinities
    # and NaN included (here from the residual). Rows of 16 columns and an 8-column tail
    m, k, o = 30, 16, 24
    x, wc = codes((m, k), 4), codes((o, k), 4)
    ws, wo = wparams(o)
    res = torch.randn(m, o)
    res[0, :6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, -1e-40])
    res[1, :] = -1e30
    res[2, 16:] = float("-inf")
    kw = dict(post_scale=torch.rand(o) + 0.5, post_shift=torch.randn(o), residual=res, slope=slope)
    if quant:
        kw.update(out_l=-0.9, out_s=0.15, out_bits=4)
    args = (x, pack_codes(wc, 4), 4, 4, ws, wo, 0.037, -0.41)
    got, want = cpu.cpu_qlinear(*args, **kw), R.ref_qlinear(*args, **kw)
    if quant:
        assert_codes_equal(got, want)
    else:
        assert torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        assert torch.equal(got[ok], want[ok]) and torch.equal(got[ok].signbit(), want[ok].signbit())


@pytest.mark.parametrize("c", [8, 16, 32])
def test_conv_pixel_sums_of_narrow_rows(cpu_isa, c):
    # 8- and 16-code pixels go several to a vector in the pixel sums (rowsums_*); 5 x 3 = 15
    # pixels leave a remainder for the one-row path
    x, wc = codes((1, 5, 3, c), 4), codes((24, 9 * c), 4)
    x[0, 0, 0] = 15
    acc, as_ = cpu.cpu_conv2d_acc(x, pack_codes(wc, 4), 4, 3, 1, 1, 4)
    racc, ras, _, _ = R.ref_conv2d_acc(x, wc, 3, 3, 1, 1)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)


def _pair_run(wb, ab):
    """AVX2's int16 pair sums per widening (pick_tile): |a0 w0 + a1 w1| <= 2 amax wmax."""
    return 32767 // (2 * (2 ** ab - 1) * (128 if wb == 8 else 2 ** wb - 1))


@pytest.mark.parametrize("wb,ab", [(2, 2), (3, 3), (4, 4), (4, 8), (8, 4), (8, 8)])
def test_linear_acc_at_the_int16_pair_sum_bound(cpu_isa, wb, ab):
    # every activation at its maximum and weights at both extremes (8-bit weights go in as
    # code - 128, so code 0 is the largest magnitude), K long enough that the AVX2 tile
    # widens its int16 pair sums mid-row more than once (2 x 2: every 7280 codes)
    run = max(_pair_run(wb, ab), 1)
    m, k, o = 5, 4 * run * 5 // 2 + 5, 20
    x = torch.full((m, k), 2 ** ab - 1, dtype=torch.uint8)
    wc = torch.full((o, k), 2 ** wb - 1, dtype=torch.uint8)
    wc[1::2] = 0 if wb == 8 else 2 ** wb - 1
    wc[3, ::3] = 0  # a mixed column
    x[4] = codes((k,), ab)  # and a random row
    acc, as_ = cpu.cpu_linear_acc(x, pack_codes(wc, wb), wb, ab)
    racc, ras, _ = R.ref_linear_acc(x, wc)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)


@pytest.mark.parametrize("wb,ab", [(2, 2), (3, 3), (4, 4), (4, 8), (8, 4)])
@pytest.mark.parametrize("dk", [-3, 0, 4])
def test_linear_acc_of_one_pair_run(cpu_isa, wb, ab, dk):
    # K of at most one pair run (4 * run codes) goes through the AVX2 tile's 6-row blocks
    # that widen only at the end; 4 codes more through the 3-row ones. Maximal codes, 13 rows
    # (two 6-row blocks and a 1-row tail)
    run = _pair_run(wb, ab)
    m, k, o = 13, 4 * run + dk, 20
    x = torch.full((m, k), 2 ** ab - 1, dtype=torch.uint8)
    wc = torch.full((o, k), 2 ** wb - 1, dtype=torch.uint8)
    wc[1::2] = 0 if wb == 8 else 2 ** wb - 1
    x[12] = codes((k,), ab)
    acc, as_ = cpu.cpu_linear_acc(x, pack_codes(wc, wb), wb, ab)
    racc, ras, _ = R.ref_linear_acc(x, wc)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)


@pytest.mark.parametrize("c", [32, 36])
def test_qconv2d_acc_of_one_pair_run(cpu_isa, c):
    # 4-bit x 4-bit 3x3: C = 32 is K = 288, exactly one pair run (tiny's layer-2 conv), C = 36
    # one tap-channel group more; maximal codes, 7 x 5 pixels (blocks of 6 and a tail)
    x = torch.full((1, 7, 5, c), 15, dtype=torch.uint8)
    x[0, 3] = codes((5, c), 4)
    wc = torch.full((20, 9 * c), 15, dtype=torch.uint8)
    acc, as_ = cpu.cpu_conv2d_acc(x, pack_codes(wc, 4), 4, 3, 1, 1, 4)
    racc, ras, _, _ = R.ref_conv2d_acc(x, wc, 3, 3, 1, 1)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)


def test_qconv2d_widens_mid_kernel_at_the_bound(cpu_isa):
    # 4-bit x 4-bit, C = 40: K = 360 codes, more than the 288 one widening covers, so the
    # AVX2 tile widens inside a kernel window (between taps); maximal codes
    x = torch.full((1, 5, 6, 40), 15, dtype=torch.uint8)
    x[0, 2] = codes((6, 40), 4)
    wc = torch.full((33, 9 * 40), 15, dtype=torch.uint8)
    acc, as_ = cpu.cpu_conv2d_acc(x, pack_codes(wc, 4), 4, 3, 1, 1, 4)
    racc, ras, _, _ = R.ref_conv2d_acc(x, wc, 3, 3, 1, 1)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)


# ------------------------------------------------------------------ conv

CONV_GEOMS = [(3, 1, 1), (1, 1, 0), (3, 2, 1), (1, 2, 0), (3, 1, 0), (3, 2, 0)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("ks,stride,pad", CONV_GEOMS)
def test_qconv2d_exact(cpu_isa, threads, bits, ks, stride, pad):
    b, h, w, c, o = 2, 7, 6, 13, 70  # odd C, K not a multiple of 4/8, O not of 64
    x, wc = codes((b, h, w, c), bits), codes((o, ks * ks * c), bits)
    wp = pack_codes(wc, bits)
    ws, wo = wparams(o)
    acc, as_ = cpu.cpu_conv2d_acc(x, wp, bits, ks, stride, pad, bits)
    racc, ras, _, _ = R.ref_conv2d_acc(x, wc, ks, ks, stride, pad)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)
    ho, wo_ = R.conv_out_size(h, ks, stride, pad), R.conv_out_size(w, ks, stride, pad)
    args = (x, wp, bits, bits, ks, stride, pad, ws, wo, 0.05, -0.3)
    kw = epilogue_kwargs(o, (b, ho, wo_, o))
    assert torch.equal(cpu.cpu_qconv2d(*args, **kw), R.ref_qconv2d(*args, **kw))
    q = dict(out_l=-1.3, out_s=0.2, out_bits=4)
    assert_codes_equal(cpu.cpu_qconv2d(*args, **kw, **q), R.ref_qconv2d(*args, **kw, **q))


@pytest.mark.parametrize("bits", BITS)
def test_qconv2d_model_shapes_batch1(bits):
    # the model's two conv kinds at a ResNet-12 width, batch 1, auto dispatch, 2 threads
    cpu.set_num_threads(2)
    try:
        for ks, pad in [(3, 1), (1, 0)]:
            x, wc = codes((1, 8, 8, 64), bits), codes((64, ks * ks * 64), bits)
            wp = pack_codes(wc, bits)
            ws, wo = wparams(64)
            args = (x, wp, bits, bits, ks, 1, pad, ws, wo, 0.02, 0.1)
            kw = dict(post_scale=torch.rand(64), post_shift=torch.randn(64), slope=0.1,
                      out_l=-0.5, out_s=0.05, out_bits=bits)
            assert_codes_equal(cpu.cpu_qconv2d(*args, **kw), R.ref_qconv2d(*args, **kw))
            assert torch.equal(cpu.cpu_qconv2d(*args), R.ref_qconv2d(*args))
    finally:
        cpu.set_num_threads(None)


# Winograd F(2x2, 3x3) (csrc/qconv_winograd_avx512.cpp): 3x3 stride-1 pad-1 convs of
# <= 4-bit codes with even outputs and C % 4 == 0 on the AVX-512 VNNI path (AMX: C < 64). Shapes: the
# smallest (one tile, one channel quad), 16-channel maps, C = 20 and 36 (masked channel
# slices), O = 130 (two full blocks and a ragged one), one tile row per image (2 x W), batch 1
WINO_SHAPES = [(1, 2, 2, 4, 1), (2, 6, 4, 16, 70), (3, 4, 6, 20, 17), (1, 10, 12, 36, 130),
               (2, 2, 8, 128, 40), (1, 8, 8, 64, 64)]


@pytest.fixture
def winograd():
    """Every eligible conv forced onto Winograd; the count of convs that ran it."""
    before = cpu.winograd_runs()
    cpu.force_conv_algo("winograd")
    yield lambda: cpu.winograd_runs() - before
    cpu.force_conv_algo(None)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("b,h,w,c,o", WINO_SHAPES)
def test_qconv2d_winograd_exact(cpu_isa, threads, winograd, bits, b, h, w, c, o):
    x, wc = codes((b, h, w, c), bits), codes((o, 9 * c), bits)
    if c == 64:  # the transforms' extremes: maximal codes, maximal and zero weight rows
        x[:] = 2 ** bits - 1
        wc[:5], wc[5:9] = 2 ** bits - 1, 0
    wp = pack_codes(wc, bits)
    ws, wo = wparams(o)
    acc, as_ = cpu.cpu_conv2d_acc(x, wp, bits, 3, 1, 1, bits)
    racc, ras, _, _ = R.ref_conv2d_acc(x, wc, 3, 3, 1, 1)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)
    args = (x, wp, bits, bits, 3, 1, 1, ws, wo, 0.05, -0.3)
    kw = epilogue_kwargs(o, (b, h, w, o))
    assert torch.equal(cpu.cpu_qconv2d(*args, **kw), R.ref_qconv2d(*args, **kw))
    q = dict(out_l=-1.3, out_s=0.2, out_bits=4)
    assert_codes_equal(cpu.cpu_qconv2d(*args, **kw, **q), R.ref_qconv2d(*args, **kw, **q))
    kw.pop("residual")
    assert_codes_equal(cpu.cpu_qconv2d(*args, **kw, **q), R.ref_qconv2d(*args, **kw, **q))
    ran = winograd()
    if cpu.active_isa() == "avx512vnni" or (cpu.active_isa() == "amx" and c < 64):
        assert ran == 4
    else:  # AMX from 64 channels (its tiles are faster), 256-bit and scalar paths: the direct conv
        assert ran == 0


@pytest.mark.parametrize("snap", [False, True])
def test_qconv2d_winograd_snapped_codes(cpu_isa, winograd, snap):
    # the snapped epilogue (remainder terms skipped) on Winograd's ACC; 2 x 6 images
    b, h, w, c, o = 2, 2, 6, 32, 24
    x, wc = codes((b, h, w, c), 4), codes((o, 9 * c), 4)
    wp = pack_codes(wc, 4)
    ws, wo, a_scale, a_offset = snapped_or_real(o, snap, 0.05, -0.3)
    args = (x, wp, 4, 4, 3, 1, 1, ws, wo, a_scale, a_offset)
    kw = dict(post_scale=torch.rand(o) + 0.5, post_shift=torch.randn(o), slope=0.1, out_l=-1.3, out_s=0.2,
              out_bits=4)
    assert_codes_equal(cpu.cpu_qconv2d(*args, **kw), R.ref_qconv2d(*args, **kw))


def test_qconv2d_winograd_not_taken_where_it_is_not_exact(winograd):
    # stride 2, no padding, odd outputs, 8-bit activations or weights, C % 4 != 0: direct
    if cpu.isa_blocker("avx512vnni"):
        pytest.skip("avx512vnni: " + cpu.isa_blocker("avx512vnni"))
    cases = [((1, 8, 8, 16), 3, 2, 1, 4, 4), ((1, 8, 8, 16), 3, 1, 0, 4, 4), ((1, 7, 8, 16), 3, 1, 1, 4, 4),
             ((1, 8, 8, 16), 3, 1, 1, 4, 8), ((1, 8, 8, 16), 3, 1, 1, 8, 4), ((1, 8, 8, 13), 3, 1, 1, 4, 4)]
    cpu.force_isa("avx512vnni")
    try:
        for shape, ks, stride, pad, wb, ab in cases:
            x, wc = codes(shape, ab), codes((9, ks * ks * shape[3]), wb)
            acc, _ = cpu.cpu_conv2d_acc(x, pack_codes(wc, wb), wb, ks, stride, pad, ab)
            assert torch.equal(acc, R.ref_conv2d_acc(x, wc, ks, ks, stride, pad)[0])
        assert winograd() == 0
        x, wc = codes((1, 8, 8, 16), 4), codes((9, 144), 4)
        cpu.cpu_conv2d_acc(x, pack_codes(wc, 4), 4, 3, 1, 1, 4)
        assert winograd() == 1  # the eligible control case
    finally:
        cpu.force_isa(None)


def test_conv_algo_setting():
    assert cpu.conv_algo() == "auto" and cpu.CONV_ALGOS == ("auto", "direct", "winograd")
    try:
        for name in cpu.CONV_ALGOS:
            cpu.force_conv_algo(name)
            assert cpu.conv_algo() == name
        with pytest.raises(KernelArgumentError, match="auto, direct, winograd"):
            cpu.force_conv_algo("fft")
        assert cpu.conv_algo() == "winograd"  # a rejected name changes nothing
    finally:
        cpu.force_conv_algo(None)
    assert cpu.conv_algo() == "auto"


def test_qconv2d_w2a2_large_k(cpu_isa):
    # K = 9*256: the long reduction
    x, wc = codes((2, 5, 5, 256), 2), codes((96, 9 * 256), 2)
    x[0] = 3
    wc[:5] = 3  # saturated rows and columns
    wp = pack_codes(wc, 2)
    racc, ras, _, _ = R.ref_conv2d_acc(x, wc, 3, 3, 1, 1)
    acc, as_ = cpu.cpu_conv2d_acc(x, wp, 2, 3, 1, 1, 2)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)


def test_prepacked_weights_and_cache_invalidation():
    x, wc = codes((9, 40), 4), codes((20, 40), 4)
    wp = pack_codes(wc, 4)
    ws, wo = wparams(20)
    want = R.ref_qlinear(x, wp, 4, 4, ws, wo, 0.1, 0.0)
    pre = cpu.cpu_prepack(wp, 4, 40)
    assert torch.equal(cpu.cpu_qlinear(x, pre, 4, 4, ws, wo, 0.1, 0.0), want)
    assert torch.equal(cpu.cpu_qlinear(x, wp, 4, 4, ws, wo, 0.1, 0.0), want)
    wp.copy_(pack_codes(codes((20, 40), 4), 4))  # in-place edit bumps _version: repack
    assert torch.equal(cpu.cpu_qlinear(x, wp, 4, 4, ws, wo, 0.1, 0.0), R.ref_qlinear(x, wp, 4, 4, ws, wo, 0.1, 0.0))
    with pytest.raises(KernelArgumentError):
        cpu.cpu_qlinear(x, pre, 2, 4, ws, wo, 0.1, 0.0)  # prepacked for other bits


# ------------------------------------------------------------------ aggregation

@pytest.mark.parametrize("ab,vb", [(2, 2), (3, 3), (4, 4), (4, 2), (8, 8)])
@pytest.mark.parametrize("t,n,d", [(3, 5, 7), (40, 10, 64), (2, 30, 129), (1, 100, 65)])
def test_qbmm_exact(cpu_isa, ab, vb, t, n, d):
    if cpu_isa == "scalar" and n * n * d * t > 200_000:
        pytest.skip("scalar path covered by the smaller shapes")
    a, v = codes((t, n, n), ab), codes((t, n, d), vb)
    acc, as_, vs = cpu.cpu_bmm_acc(a, v, ab, vb)
    racc, ras, rvs = R.ref_bmm_acc(a, v)
    assert torch.equal(acc, racc) and torch.equal(as_, ras) and torch.equal(vs, rvs)
    args = (a, v, ab, vb, 0.013, 0.002, 0.31, -0.7)
    assert torch.equal(cpu.cpu_qbmm(*args), R.ref_qbmm(*args))


def test_qbmm_threads_large_batch():
    cpu.set_num_threads(2)
    try:
        a, v = codes((40, 30, 30), 4), codes((40, 30, 128), 4)
        args = (a, v, 4, 4, 0.01, 0.0, 0.1, -0.2)
        assert torch.equal(cpu.cpu_qbmm(*args), R.ref_qbmm(*args))
    finally:
        cpu.set_num_threads(None)


# ------------------------------------------------------------------ bad input: exceptions, never a crash

def _lin_args(**over):
    x, wc = codes((4, 16), 4), codes((8, 16), 4)
    d = dict(x=x, w_packed=pack_codes(wc, 4), w_bits=4, a_bits=4, w_scale=torch.ones(8),
             w_offset=torch.zeros(8), a_scale=0.1, a_offset=0.0)
    d.update(over)
    return d


@pytest.mark.parametrize("over", [
    dict(x=torch.zeros(4, 16, dtype=torch.int8)),              # wrong dtype
    dict(x=torch.zeros(4, 16)),                                # float activations
    dict(x=torch.zeros(4, 17, dtype=torch.uint8)),             # K mismatch
    dict(x=torch.zeros(4, 4, 16, dtype=torch.uint8)),          # rank
    dict(x=torch.full((4, 16), 16, dtype=torch.uint8)),        # codes out of range
    dict(w_bits=5), dict(w_bits=1), dict(a_bits=6),            # bits outside 2/3/4/8
    dict(w_packed=torch.zeros(8, 7, dtype=torch.uint8)),       # packed row length
    dict(w_packed=torch.zeros(8, 8, dtype=torch.int16)),
    dict(w_scale=torch.ones(7)), dict(w_offset=torch.ones(8, dtype=torch.float64)),
    dict(a_scale=0.0), dict(a_scale=float("nan")), dict(a_offset="x"),
    dict(residual=torch.zeros(4, 9)), dict(post_scale=torch.ones(3)),
    dict(out_s=0.1),                                          # out_l/out_bits missing
    dict(out_s=0.1, out_l=0.0, out_bits=7),
])
def test_qlinear_bad_args_raise(over):
    with pytest.raises(KernelArgumentError):
        cpu.cpu_qlinear(**_lin_args(**over))


def test_conv_and_bmm_bad_args_raise():
    x, wc = codes((1, 4, 4, 8), 4), codes((8, 72), 4)
    wp = pack_codes(wc, 4)
    one, zero = torch.ones(8), torch.zeros(8)
    bad = [
        dict(x=codes((1, 4, 4, 7), 4)),                # C does not match the weights
        dict(kernel_size=0), dict(stride=0), dict(padding=-1),
        dict(x=codes((1, 1, 1, 8), 4), padding=0),     # input smaller than the kernel
        dict(residual=torch.zeros(1, 4, 4, 7)),
    ]
    hot = codes((3, 4, 4, 8), 4)
    hot[2, 3, 3, 7] = 16  # one code out of range, in the last image's last pixel
    bad += [dict(x=hot), dict(x=hot, padding=0)]
    for over in bad:
        kw = dict(x=x, w_packed=wp, w_bits=4, a_bits=4, kernel_size=3, stride=1, padding=1,
                  w_scale=one, w_offset=zero, a_scale=0.1, a_offset=0.0)
        kw.update(over)
        with pytest.raises(KernelArgumentError):
            cpu.cpu_qconv2d(**kw)
    a, v = codes((2, 5, 5), 4), codes((2, 5, 3), 4)
    for args in [(a, codes((2, 6, 3), 4)), (codes((2, 5, 4), 4), v), (a.float(), v),
                 (a, torch.full((2, 5, 3), 200, dtype=torch.uint8))]:
        with pytest.raises(KernelArgumentError):
            cpu.cpu_qbmm(*args, 4, 4, 0.1, 0.0, 0.1, 0.0)
    with pytest.raises(KernelArgumentError):
        cpu.cpu_qbmm(a, v, 9, 4, 0.1, 0.0, 0.1, 0.0)
    with pytest.raises(KernelArgumentError):
        cpu.force_isa("sse9")


def test_binding_level_errors_are_value_errors():
    # the raw extension raises its own ValueError subclass, never crashes
    ext = cpu._ext()
    with pytest.raises(ValueError):
        ext.PackedWeights(torch.zeros(4, 3, dtype=torch.uint8).numpy(), 4, 8)
    with pytest.raises(ValueError):
        ext.PackedWeights(torch.zeros(4, 8, dtype=torch.uint8).numpy(), 4, 16, 3)
    pw = ext.PackedWeights(torch.zeros(4, 8, dtype=torch.uint8).numpy(), 4, 16)
    with pytest.raises(ValueError):
        ext.qlinear(torch.zeros(4, 16, dtype=torch.uint8).numpy()[:, ::2], pw, 4, torch.ones(4).numpy(),
                    torch.zeros(4).numpy(), 0.1, 0.0)
    with pytest.raises(ValueError):
        ext.qlinear(torch.zeros(4, 16, dtype=torch.uint8).numpy(), pw, 4, torch.ones(4).numpy(),
                    torch.zeros(4).numpy(), 0.1, 0.0, nthreads=0)


def test_non_contiguous_inputs_are_copied_like_the_reference():
    x = codes((16, 9), 4).t()
    wc = codes((5, 16), 4)
    wp = pack_codes(wc, 4)
    ws, wo = wparams(5)
    assert not x.is_contiguous()
    assert torch.equal(cpu.cpu_qlinear(x, wp, 4, 4, ws, wo, 0.1, 0.2), R.ref_qlinear(x, wp, 4, 4, ws, wo, 0.1, 0.2))
    xc = codes((2, 5, 6, 8), 4).permute(0, 2, 1, 3)
    wc = codes((7, 72), 4)
    args = (xc, pack_codes(wc, 4), 4, 4, 3, 1, 1, *wparams(7), 0.1, 0.2)
    assert torch.equal(cpu.cpu_qconv2d(*args), R.ref_qconv2d(*args))


def test_misaligned_activation_pointer_is_fine():
    # uint8 inputs need no alignment: a view starting at an odd byte gives the same answer
    buf = codes((1 + 11 * 40,), 4)
    x = buf[1:].view(11, 40)
    assert x.data_ptr() % 2 == 1
    wc = codes((24, 40), 4)
    wp = pack_codes(wc, 4)
    ws, wo = wparams(24)
    assert torch.equal(cpu.cpu_qlinear(x, wp, 4, 4, ws, wo, 0.1, 0.2), R.ref_qlinear(x, wp, 4, 4, ws, wo, 0.1, 0.2))
    assert torch.equal(unpack_codes(wp, 4, 40), wc)


@pytest.mark.parametrize("out_s", [1.0, 3.0, 0.5])
def test_requantization_ties_take_the_exact_path(cpu_isa, out_s):
    # y = ACC / 2 is full of exact .5 ties: the reciprocal fast path must defer to division
    x, wc = codes((64, 40), 4), codes((48, 40), 4)
    wp = pack_codes(wc, 4)
    args = (x, wp, 4, 4, torch.ones(48), torch.zeros(48), 1.0, 0.0)
    kw = dict(post_scale=torch.full((48,), 0.5), out_l=0.0, out_s=out_s, out_bits=8)
    assert torch.equal(cpu.cpu_qlinear(*args, **kw), R.ref_qlinear(*args, **kw))


def near_tie_params(o):
    """(w_scale, w_offset, a_scale, a_offset) with zero points 7 (the middle of 4-bit codes)
    and remainders 2^-21: y = ACC' + 2^-21 (WS' + AS') + 2^-42 CNT, so y / 2 lies within
    ~1e-4 of a half-integer wherever ACC' is odd, and the remainder terms alone decide its
    rounding."""
    d = 2.0 ** -21
    return torch.ones(o), torch.full((o,), -7.0 + d), 1.0, -7.0 + d


@pytest.mark.parametrize("variant", ["lrelu", "residual"])
def test_fused_epilogue_redoes_near_ties_in_the_reference_order(cpu_isa, variant):
    # AVX-512's fused epilogue (FusedEpi, qgnn_cpu.h: the folded layers' BN + LeakyReLU to
    # codes, with or without a residual) rounds differently from the reference's order; on
    # quotients this close to x.5 it must give the row back to the exact order. Negative
    # values too, scaled by an exact 0.5.
    o = 48
    ws, wo, a_scale, a_offset = near_tie_params(o)
    kw = dict(post_scale=torch.full((o,), 0.5), post_shift=torch.full((o,), -6.0), slope=0.5, out_l=-134.0,
              out_s=1.0, out_bits=8)
    before = cpu.fused_redos()
    x, wc = codes((96, 40), 4), codes((o, 40), 4)
    args = (x, pack_codes(wc, 4), 4, 4, ws, wo, a_scale, a_offset)
    lkw = dict(kw, residual=torch.randint(-4, 5, (96, o)).float() * 0.5) if variant == "residual" else kw
    assert_codes_equal(cpu.cpu_qlinear(*args, **lkw), R.ref_qlinear(*args, **lkw))
    # a 3x3 conv: borders (patterns) and, on AVX-512 VNNI, the Winograd ACC (C = 32)
    x, wc = codes((2, 6, 8, 32), 4), codes((o, 9 * 32), 4)
    args = (x, pack_codes(wc, 4), 4, 4, 3, 1, 1, ws, wo, a_scale, a_offset)
    ckw = dict(kw, residual=torch.randint(-4, 5, (2, 6, 8, o)).float() * 0.5) if variant == "residual" else kw
    assert_codes_equal(cpu.cpu_qconv2d(*args, **ckw), R.ref_qconv2d(*args, **ckw))
    redone = cpu.fused_redos() - before
    if cpu_isa in ("avx512vnni", "amx"):
        assert redone > 0
    else:  # the 256-bit and scalar tiles evaluate the reference's order only
        assert redone == 0


def test_pack_cache_hits_aliases_and_sees_in_place_edits():
    x, wc = codes((7, 24), 4), codes((9, 24), 4)
    wp = pack_codes(wc, 4)
    ws, wo = wparams(9)
    alias = wp.view(9, 12)  # a new tensor object over the same storage
    assert torch.equal(cpu.cpu_qlinear(x, alias, 4, 4, ws, wo, 0.1, 0.0), R.ref_qlinear(x, wp, 4, 4, ws, wo, 0.1, 0.0))
    wp.zero_()  # bumps the shared version counter
    assert torch.equal(cpu.cpu_qlinear(x, alias, 4, 4, ws, wo, 0.1, 0.0), R.ref_qlinear(x, wp, 4, 4, ws, wo, 0.1, 0.0))


def test_packed_weights_nbytes_counts_every_layout():
    # O=70 -> Op=128 (two 64-column blocks), K=72 -> Kp=72: the canonical tiles are
    # 2 * 18 * 256 bytes, plus the int32 code sums per output and per tap; a CPU detected
    # as AVX2 / AVX-VNNI adds the same-sized ymm copy its tiles read (AMX tiles are built per
    # layer, with its zero points: not held here)
    ext = cpu._ext()
    ymm = cpu.detected_isa() in ("avx2", "avxvnni")
    pw = ext.PackedWeights(np.zeros((70, 72), np.uint8), 8, 72, 9)
    assert pw.nbytes == 2 * 18 * 256 * (2 if ymm else 1) + (70 + 70 * 9) * 4
    pw = ext.PackedWeights(np.zeros((70, 288), np.uint8), 8, 288, 9)
    assert pw.nbytes == 2 * 72 * 256 * (2 if ymm else 1) + (70 + 70 * 9) * 4
    # 4-bit 3x3 codes, C = 8: where AVX-512 VNNI runs, also the Winograd transform (16 bytes
    # per channel and column) and its 4 int32 corrections per column
    wino = not cpu.isa_blocker("avx512vnni")
    pw = ext.PackedWeights(np.zeros((70, 36), np.uint8), 4, 72, 9)
    wino_bytes = 128 * 16 * 8 + 4 * 128 * 4 if wino else 0
    assert pw.nbytes == 2 * 18 * 256 * (2 if ymm else 1) + (70 + 70 * 9) * 4 + wino_bytes
