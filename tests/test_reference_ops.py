"""The reference integer engine (ops/reference.py), the qgnn:: custom ops and the backend registry.

Integer parts are checked exactly against int64 / float64-on-integers computations
(exact: every partial sum is an integer far below 2^53), outputs against float64
arithmetic on dequantized values.
"""
import pytest
import torch
import torch.nn.functional as F

from qgnn_deploy import backends
from qgnn_deploy.backends import available_backends, current_backend, use_backend
from qgnn_deploy.errors import ConfigError, KernelArgumentError
from qgnn_deploy.ops import registry
from qgnn_deploy.ops.packing import pack_codes
from qgnn_deploy.ops.reference import (ref_bmm_acc, ref_centered_parts, ref_conv2d_acc, ref_qbmm,
                                       ref_qconv2d, ref_qlinear, ref_quantize, ref_zero_split)
from qgnn_deploy.quant.pauta import pauta_codes


def _codes(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** bits, shape, generator=g, dtype=torch.uint8)


def _conv_case(b=2, h=5, w=7, c=3, o=4, k=3, bits=3, seed=0):
    x = _codes((b, h, w, c), bits, seed)                       # NHWC
    wc = _codes((o, k, k, c), bits, seed + 1)                  # (O, kh, kw, C)
    return x, wc


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 1, 2), (2, 2, 0)])
def test_conv_integer_parts_exact_with_padded_borders(k, stride, pad):
    x, wc = _conv_case(k=k)
    acc, as_, ws, cnt = ref_conv2d_acc(x, wc.reshape(4, -1), k, k, stride, pad)
    assert acc.dtype == as_.dtype == ws.dtype == cnt.dtype == torch.int32
    xd = x.permute(0, 3, 1, 2).double()
    wd = wc.permute(0, 3, 1, 2).double()
    ones = torch.ones_like(xd)
    exp_acc = F.conv2d(xd, wd, stride=stride, padding=pad).permute(0, 2, 3, 1)
    exp_as = F.conv2d(xd, torch.ones(1, 3, k, k, dtype=torch.float64), stride=stride, padding=pad)[:, 0]
    exp_ws = F.conv2d(ones[:1], wd, stride=stride, padding=pad)[0].permute(1, 2, 0)
    exp_cnt = F.conv2d(ones[:1], torch.ones(1, 3, k, k, dtype=torch.float64), stride=stride, padding=pad)[0, 0]
    assert torch.equal(acc.long(), exp_acc.long()) and torch.equal(as_.long(), exp_as.long())
    assert torch.equal(ws.long(), exp_ws.long()) and torch.equal(cnt.long(), exp_cnt.long())
    if pad:  # border positions really do see fewer taps
        assert cnt.min() < cnt.max()


def test_centered_parts_exact():
    x, wc = _conv_case(bits=4)
    acc, as_, ws, cnt = ref_conv2d_acc(x, wc.reshape(4, -1), 3, 3, 1, 1)
    zw = torch.tensor([0, 3, 7, 15], dtype=torch.int32)
    za = torch.tensor(9, dtype=torch.int32)
    accp, wsp, asp = ref_centered_parts(acc, as_.unsqueeze(-1), ws, cnt.unsqueeze(-1), zw, za)
    # brute force over the valid taps of every position, in int64
    xd = x.permute(0, 3, 1, 2).long()
    valid = torch.ones_like(xd)
    xp, vp = F.pad(xd, (1, 1, 1, 1)), F.pad(valid, (1, 1, 1, 1))
    wl = wc.permute(0, 3, 1, 2).long()
    for bi, i, j, o in [(0, 0, 0, 0), (1, 4, 6, 3), (0, 2, 3, 1), (1, 0, 5, 2)]:
        patch, vm = xp[bi, :, i:i + 3, j:j + 3], vp[bi, :, i:i + 3, j:j + 3]
        want = (((wl[o] - zw[o]) * (patch - za)) * vm).sum()
        assert accp[bi, i, j, o].item() == want.item()
        assert wsp[i, j, o].item() == ((wl[o] - zw[o]) * vm).sum().item()
        assert asp[bi, i, j, 0].item() == ((patch - za) * vm).sum().item()


def test_zero_split_identity():
    l = torch.tensor([-1.3, -0.01, 0.4, -7.0])
    s = torch.tensor([0.1, 0.2, 0.05, 0.01])
    z, d = ref_zero_split(l, s)
    assert z.dtype == torch.int32 and z.tolist() == [13, 0, 0, 255]  # clamped to [0, 255]
    q = torch.arange(16.0).view(-1, 1)
    assert torch.allclose(l + s * q, s * (q - z) + d, atol=1e-5)
    assert (d.abs()[:2] <= s[:2] / 2 + 1e-7).all()


def _dequant(codes, l, s):
    return l.double() + s.double() * codes.double()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (1, 1, 0), (3, 2, 1)])
def test_qconv2d_matches_float_conv_on_dequantized(bits, k, stride, pad):
    o, c = 5, 6
    x = _codes((2, 6, 5, c), bits, 7)
    wc = _codes((o, k, k, c), bits, 8)
    w_scale = torch.rand(o) * 0.1 + 0.01
    w_offset = -torch.rand(o) * 0.3 * (2 ** bits) * w_scale  # real-valued, off the grid
    a_scale, a_offset = 0.037, -0.4123
    post_scale, post_shift = torch.rand(o) + 0.5, torch.randn(o)
    y = ref_qconv2d(x, pack_codes(wc.reshape(o, -1), bits), bits, bits, k, stride, pad, w_scale,
                    w_offset, a_scale, a_offset, post_scale, post_shift, slope=0.2)
    xa = _dequant(x.permute(0, 3, 1, 2), torch.tensor(a_offset), torch.tensor(a_scale))
    wd = _dequant(wc.permute(0, 3, 1, 2), w_offset.view(-1, 1, 1, 1), w_scale.view(-1, 1, 1, 1))
    ref = F.conv2d(xa, wd, stride=stride, padding=pad).permute(0, 2, 3, 1)
    ref = ref * post_scale.double() + post_shift.double()
    ref = torch.where(ref >= 0, ref, 0.2 * ref)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_qconv2d_residual_and_fused_requant():
    bits, o = 4, 3
    x, wc = _conv_case(o=o, bits=bits)
    w = pack_codes(wc.reshape(o, -1), bits)
    sc, off = torch.full((o,), 0.05), torch.full((o,), -0.3)
    y = ref_qconv2d(x, w, bits, bits, 3, 1, 1, sc, off, 0.1, -0.2)
    res = torch.randn_like(y)
    y2 = ref_qconv2d(x, w, bits, bits, 3, 1, 1, sc, off, 0.1, -0.2, residual=res, slope=0.1)
    assert torch.equal(y2, torch.where(y + res >= 0, y + res, (y + res) * 0.1))
    codes = ref_qconv2d(x, w, bits, bits, 3, 1, 1, sc, off, 0.1, -0.2, out_l=-1.0, out_s=0.25, out_bits=3)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes, pauta_codes(y, torch.tensor(-1.0), torch.tensor(0.25), 3))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_qlinear_matches_float(bits):
    m, k, o = 7, 13, 5   # K not a multiple of 8
    x, wc = _codes((m, k), bits, 1), _codes((o, k), bits, 2)
    sc, off = torch.rand(o) * 0.2 + 0.01, torch.randn(o) * 0.3
    y = ref_qlinear(x, pack_codes(wc, bits), bits, bits, sc, off, 0.02, 0.31, post_shift=torch.ones(o))
    ref = _dequant(x, torch.tensor(0.31), torch.tensor(0.02)) @ _dequant(wc, off.view(-1, 1), sc.view(-1, 1)).t() + 1
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    acc, as_, ws = torch.ops.aten.mm.default(x.long(), wc.long().t()), x.long().sum(1), wc.long().sum(1)
    from qgnn_deploy.ops.reference import ref_linear_acc
    a2, s2, w2 = ref_linear_acc(x, wc)
    assert torch.equal(a2.long(), acc) and torch.equal(s2.long(), as_) and torch.equal(w2.long(), ws)


@pytest.mark.parametrize("n,d", [(10, 16), (30, 7), (1, 3)])
def test_qbmm_exact_parts_and_float(n, d):
    a, v = _codes((3, n, n), 4, 3), _codes((3, n, d), 2, 4)
    acc, as_, vs = ref_bmm_acc(a, v)
    assert torch.equal(acc.long(), torch.bmm(a.double(), v.double()).long())
    assert torch.equal(as_.long(), a.long().sum(2)) and torch.equal(vs.long(), v.long().sum(1))
    y = ref_qbmm(a, v, 4, 2, 0.01, -0.013, 0.5, -1.1)
    ref = torch.bmm(_dequant(a, torch.tensor(-0.013), torch.tensor(0.01)),
                    _dequant(v, torch.tensor(-1.1), torch.tensor(0.5)))
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_quantize_matches_pauta_and_rejects_nan():
    x = torch.randn(4, 9) * 3
    assert torch.equal(ref_quantize(x, -1.5, 0.2, 4), pauta_codes(x, -1.5, 0.2, 4))
    half = torch.tensor([0.5, 1.5, 2.5])  # round half to even: 0, 2, 2
    assert ref_quantize(half, 0.0, 1.0, 2).tolist() == [0, 2, 2]
    with pytest.raises(KernelArgumentError, match="NaN"):
        ref_quantize(torch.tensor([float("nan")]), 0.0, 1.0, 2)
    with pytest.raises(KernelArgumentError, match="bits"):
        ref_quantize(x, 0.0, 1.0, 5)
    with pytest.raises(KernelArgumentError, match="> 0"):
        ref_quantize(x, 0.0, 0.0, 4)


def test_ops_reject_bad_arguments():
    x, wc = _conv_case()
    w = pack_codes(wc.reshape(4, -1), 3)
    v = torch.ones(4)
    with pytest.raises(KernelArgumentError, match="codes >= 2"):
        ref_qconv2d(x * 0 + 9, w, 3, 3, 3, 1, 1, v, v, 0.1, 0.0)
    with pytest.raises(KernelArgumentError, match="bytes"):
        ref_qconv2d(x, w[:, :-1].contiguous(), 3, 3, 3, 1, 1, v, v, 0.1, 0.0)
    with pytest.raises(KernelArgumentError, match="w_scale"):
        ref_qconv2d(x, w, 3, 3, 3, 1, 1, torch.ones(3), v, 0.1, 0.0)
    with pytest.raises(KernelArgumentError, match="too small"):
        ref_qconv2d(x[:, :1, :1], w, 3, 3, 3, 1, 0, v, v, 0.1, 0.0)
    with pytest.raises(KernelArgumentError, match="aggregation"):
        ref_qbmm(_codes((2, 3, 4), 2, 0), _codes((2, 3, 4), 2, 0), 2, 2, 0.1, 0.0, 0.1, 0.0)


def test_custom_ops_dispatch_and_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, wc = _conv_case(o=4)
    w = pack_codes(wc.reshape(4, -1), 3)
    sc, off = torch.full((4,), 0.1), torch.full((4,), -0.2)
    with use_backend("reference"):
        assert current_backend() == "reference"
        y = registry.qconv2d(x, w, 3, 3, 3, 2, 1, sc, off, 0.1, -0.05, slope=0.2)
        q = registry.qconv2d(x, w, 3, 3, 3, 2, 1, sc, off, 0.1, -0.05, out_l=-1.0, out_s=0.2, out_bits=2)
    assert torch.equal(y, ref_qconv2d(x, w, 3, 3, 3, 2, 1, sc, off, 0.1, -0.05, slope=0.2))
    assert q.dtype == torch.uint8 and q.shape == y.shape
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        fy = registry.qconv2d(fx, fw, 3, 3, 3, 2, 1, mode.from_tensor(sc), mode.from_tensor(off), 0.1, -0.05)
        fl = registry.qlinear(mode.from_tensor(_codes((6, 27), 3, 0)), fw, 3, 3, mode.from_tensor(sc),
                              mode.from_tensor(off), 0.1, 0.0, out_l=0.0, out_s=1.0, out_bits=4)
        fb = registry.qbmm(mode.from_tensor(_codes((2, 5, 5), 2, 0)), mode.from_tensor(_codes((2, 5, 3), 2, 0)),
                           2, 2, 0.1, 0.0, 0.1, 0.0)
        fq = registry.quantize(mode.from_tensor(torch.randn(3, 4)), 0.0, 1.0, 2)
    assert tuple(fy.shape) == tuple(y.shape) and fy.dtype == torch.float32
    assert tuple(fl.shape) == (6, 4) and fl.dtype == torch.uint8
    assert tuple(fb.shape) == (2, 5, 3) and fq.dtype == torch.uint8
    assert set(registry.OP_OVERLOADS) == set(backends.OPS)


def test_opcheck_linear_op():
    x, wc = _codes((5, 12), 2, 0), _codes((3, 12), 2, 1)
    args = (x, pack_codes(wc, 2), 2, 2, torch.full((3,), 0.1), torch.zeros(3), 0.2, -0.1)
    with use_backend("reference"):
        torch.library.opcheck(registry.qlinear, args, test_utils=("test_schema", "test_faketensor"))


def test_backend_registry():
    assert "reference" in available_backends()
    assert backends.default_backend() in available_backends()
    with pytest.raises(ConfigError, match="unknown op backend"):
        backends.backend_module("gpu9000")
    with pytest.raises(ConfigError, match="whole-model"):
        with use_backend("onnx"):
            pass
    outer = current_backend()
    with use_backend("reference"):
        assert current_backend() == "reference"
    assert current_backend() == outer
    assert backends.backend_function("reference", "qconv2d") is ref_qconv2d
