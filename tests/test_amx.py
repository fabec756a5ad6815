"""The AMX-INT8 tile path against the reference integer engine (atol 0).

The AMX path has three ways of feeding its A tiles (csrc/qgemm_amx.cpp), and GEMMs packed
into panels (1x1 convs too) with K < 256 fall back to the AVX-512 tile; each case below is
chosen to land in one of them:

* in place from the conv input (C % 4 == 0, pad 0, Wo % 16 == 0, each kernel row's k*C
  codes whole 64-code chunks),
* in place from a zero-bordered copy (C % 4 == 0, Wo >= 16: pad > 0, short runs, or kernel
  rows that end inside a chunk, whose last chunk reads past the window),
* packed panels (C % 4 != 0, Wo < 16, linear layers, aggregation with N >= 256).

The weights' tiles are centred (zero points taken out) for <= 4-bit weights, raw for 8-bit.

Skipped, with the reason, where the CPU (or OS) cannot run AMX tiles.
"""
from __future__ import annotations

import os

import pytest
import torch

from qgnn_deploy.ops import reference as R
from qgnn_deploy.ops.packing import pack_codes
from test_cpu_kernels import codes

cpu = pytest.importorskip("qgnn_deploy.backends.cpu")
if not cpu.is_available():  # pragma: no cover
    pytest.skip("qgnn_deploy._C not built (pip install -e .)", allow_module_level=True)


def _skip_unless_runnable(*isas):
    for isa in isas:
        why = cpu.isa_blocker(isa)
        if why:
            pytest.skip(f"{isa}: {why}")
    pinned = os.environ.get("QGNN_CPU_ISA", "auto") or "auto"
    if pinned not in ("auto", "amx"):  # scripts/sanitize.sh runs one path per process
        pytest.skip(f"QGNN_CPU_ISA={pinned} pins this process to another path")


@pytest.fixture
def amx():
    _skip_unless_runnable("amx")
    cpu.force_isa("amx")
    yield
    cpu.force_isa(None)


def wparams(o, snapped):
    ws = torch.rand(o) * 0.05 + 0.005
    if snapped:  # offsets on the grid: the epilogue's remainder terms are zero
        return ws, -ws * torch.randint(0, 9, (o,)).float()
    return ws, torch.randn(o) * 0.2


# (batch, h, w, c, o, ks, stride, pad): the A source each exercises
CONVS = [
    (2, 16, 32, 64, 64, 1, 1, 0),    # 1x1, K = 64: below the threshold, the AVX-512 tile
    (2, 8, 32, 256, 70, 1, 1, 0),    # in place from the input itself, O with a ragged column tile
    (3, 20, 20, 64, 64, 3, 1, 1),    # padded copy, runs of 16 + 4 (short tiles)
    (1, 21, 18, 128, 33, 3, 1, 1),   # padded copy, batch 1, odd O
    (2, 33, 35, 64, 48, 3, 2, 1),    # stride 2: Wo = 18, padded copy with stride-2 rows
    (2, 20, 20, 256, 64, 1, 1, 0),   # pad 0 but Wo % 16 != 0: the copy (slack for short runs)
    (2, 8, 8, 64, 96, 3, 1, 1),      # Wo < 16: packed panel, whole chunks per tap
    (2, 9, 7, 36, 50, 3, 1, 1),      # C % 64 != 0, K = 324 not a multiple of 64: packed
    (1, 5, 5, 256, 130, 3, 2, 0),    # stride 2, K = 2304, three column blocks
    (2, 18, 32, 16, 16, 3, 1, 1),    # tiny's 16-channel conv: in place at K = 144, rows of 48 codes
    (1, 17, 17, 32, 40, 3, 1, 1),    # kernel rows of 96 codes (2 chunks), runs of 16 + 1
    (2, 18, 34, 20, 24, 3, 1, 0),    # pad 0, Wo = 32, rows of 60 codes: the copy, for the slack
    (2, 33, 35, 48, 48, 3, 2, 1),    # stride 2, rows of 144 codes (64 + 64 + 16)
    (1, 4, 18, 160, 70, 3, 1, 1),    # rows of 480 codes (7.5 chunks), two column blocks
    (1, 9, 20, 8, 17, 5, 1, 2),      # 5x5: rows of 40 codes
]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", CONVS, ids=[f"{s[3]}c{s[5]}x{s[5]}s{s[6]}p{s[7]}_{s[1]}x{s[2]}" for s in CONVS])
def test_amx_qconv2d_exact(amx, threads, bits, shape):
    b, h, w, c, o, ks, stride, pad = shape
    x, wc = codes((b, h, w, c), bits), codes((o, ks * ks * c), bits)
    x[0, 0] = 2 ** bits - 1  # a saturated pixel
    wp = pack_codes(wc, bits)
    acc, as_ = cpu.cpu_conv2d_acc(x, wp, bits, ks, stride, pad, bits)
    racc, ras, _, _ = R.ref_conv2d_acc(x, wc, ks, ks, stride, pad)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)
    ho, wo_ = R.conv_out_size(h, ks, stride, pad), R.conv_out_size(w, ks, stride, pad)
    for snapped in (False, True):
        ws, wo = wparams(o, snapped)
        args = (x, wp, bits, bits, ks, stride, pad, ws, wo, 0.05, -0.1 if snapped else -0.13)
        kw = dict(post_scale=torch.rand(o) + 0.5, post_shift=torch.randn(o), slope=0.1)
        assert torch.equal(cpu.cpu_qconv2d(*args, **kw), R.ref_qconv2d(*args, **kw))
        q = dict(out_l=-1.3, out_s=0.2, out_bits=min(bits, 4))
        assert torch.equal(cpu.cpu_qconv2d(*args, **kw, **q), R.ref_qconv2d(*args, **kw, **q))
        res = dict(kw, residual=torch.randn(b, ho, wo_, o))
        assert torch.equal(cpu.cpu_qconv2d(*args, **res, **q), R.ref_qconv2d(*args, **res, **q))


@pytest.mark.parametrize("m,k,o", [(1, 256, 64), (45, 300, 65), (33, 257, 17), (100, 640, 130)])
def test_amx_qlinear_exact(amx, threads, m, k, o):
    # K not a multiple of 4 (257) or 64 (300): the panel's zero tail; rows not of 16 or 32
    x, wc = codes((m, k), 4), codes((o, k), 3)
    wp = pack_codes(wc, 3)
    acc, as_ = cpu.cpu_linear_acc(x, wp, 3, 4)
    racc, ras, _ = R.ref_linear_acc(x, wc)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)
    ws, wo = wparams(o, False)
    args = (x, wp, 3, 4, ws, wo, 0.037, -0.41)
    kw = dict(post_scale=torch.rand(o) + 0.5, post_shift=torch.randn(o), residual=torch.randn(m, o), slope=0.1)
    assert torch.equal(cpu.cpu_qlinear(*args, **kw), R.ref_qlinear(*args, **kw))
    q = dict(out_l=-0.9, out_s=0.15, out_bits=4)
    assert torch.equal(cpu.cpu_qlinear(*args, **kw, **q), R.ref_qlinear(*args, **kw, **q))


def test_amx_qbmm_large_graph_exact(amx):
    # N >= 256 nodes: the aggregation's K reaches the AMX threshold (V repacked per task)
    a, v = codes((2, 260, 260), 4), codes((2, 260, 40), 3)
    acc, as_, vs = cpu.cpu_bmm_acc(a, v, 4, 3)
    racc, ras, rvs = R.ref_bmm_acc(a, v)
    assert torch.equal(acc, racc) and torch.equal(as_, ras) and torch.equal(vs, rvs)
    args = (a, v, 4, 3, 0.013, 0.002, 0.31, -0.7)
    assert torch.equal(cpu.cpu_qbmm(*args), R.ref_qbmm(*args))


def test_amx_matches_avx512_on_a_resnet_block_width(threads):
    # the two paths this CPU offers give the same bits on a ResNet-12 layer shape
    _skip_unless_runnable("amx", "avx512vnni")
    x, wc = codes((4, 16, 16, 128), 4), codes((128, 9 * 128), 4)
    wp = cpu.cpu_prepack(pack_codes(wc, 4), 4, 9 * 128, 9)
    ws, wo = wparams(128, False)
    args = (x, wp, 4, 4, 3, 1, 1, ws, wo, 0.05, -0.13)
    kw = dict(post_scale=torch.rand(128) + 0.5, post_shift=torch.randn(128), slope=0.1, out_l=-1.0, out_s=0.1,
              out_bits=4)
    outs = []
    try:
        for isa in ("amx", "avx512vnni"):
            cpu.force_isa(isa)
            outs.append(cpu.cpu_qconv2d(*args, **kw))
    finally:
        cpu.force_isa(None)
    assert torch.equal(outs[0], outs[1])
