"""Kernel argument fuzzing (issue 9, part 2).

Property-based tests over shapes, strides, dtypes, bit-widths and offsets for every
``cpu_*`` function, the raw ``qgnn_deploy._C`` entry points and every ``triton_*``
launcher (Triton's interpreter without a GPU; tests/conftest.py sets TRITON_INTERPRET).

Where the arguments are valid the result is compared with the ``ref_*`` spec, on every
ISA path this CPU runs (the ``cpu_isa`` fixture of conftest.py): integer parts, fp32
outputs and output codes exactly (the kernels keep the reference's fp32 operation order,
so the rounding ties docs/integer-contract.md admits do not occur). Where they are not, the call must raise KernelArgumentError (a
QGNNError); any other exception type, a crash or a silent result fails.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgnn_deploy.errors import KernelArgumentError, QGNNError
from qgnn_deploy.ops import reference as R
from qgnn_deploy.ops.packing import pack_codes, packed_row_bytes, unpack_codes

BITS = (2, 3, 4, 8)
BAD_BITS = (0, 1, 5, 6, 7, 9, 16, 32, -1)
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])  # cpu_isa: once per test
CPU_EXAMPLES = int(os.environ.get("QGNN_FUZZ_EXAMPLES", "40"))
TRITON_EXAMPLES = int(os.environ.get("QGNN_FUZZ_TRITON_EXAMPLES", "8"))
# under the sanitizers every example is ~10x slower
if os.environ.get("QGNN_SANITIZED"):
    CPU_EXAMPLES = max(10, CPU_EXAMPLES // 2)


# ------------------------------------------------------------------ backends

def _cpu():
    try:
        from qgnn_deploy.backends import cpu
    except ImportError as e:
        pytest.skip(f"cpu backend module missing: {e}")
    if not cpu.is_available():
        pytest.skip("C++ extension not built (pip install -e . --no-build-isolation)")
    return cpu


def _triton():
    pytest.importorskip("triton")
    from qgnn_deploy.backends import triton as tb
    ok, why = tb.availability()
    if not ok:
        pytest.skip(f"triton backend unavailable: {why}")
    return tb


# ------------------------------------------------------------------ data

def _gen(seed):
    return torch.Generator().manual_seed(int(seed))


def _codes(shape, bits, g):
    return torch.randint(0, 2 ** bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


def _vec(n, g, lo=-1.0, hi=1.0):
    return (torch.rand(n, generator=g) * (hi - lo) + lo).float()


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """Same values, not C-contiguous (every other element of a twice-as-wide buffer)."""
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
    wide[..., ::2] = t
    v = wide[..., ::2]
    assert torch.equal(v, t) and (not v.is_contiguous() or t.numel() <= 1)
    return v


def _epilogue(o, g, flags, out_rows_shape):
    """Random epilogue kwargs; ``flags`` says which optional parts to include."""
    kw = dict(w_scale=_vec(o, g, 0.01, 0.2), w_offset=_vec(o, g, -1.0, 0.5),
              a_scale=float(torch.rand(1, generator=g)) * 0.2 + 0.01,
              a_offset=float(torch.rand(1, generator=g)) * 2 - 1)
    ps, psh, res, slope, quant = flags
    if ps:
        kw["post_scale"] = _vec(o, g, 0.5, 2.0)
    if psh:
        kw["post_shift"] = _vec(o, g)
    if res:
        kw["residual"] = torch.randn(*out_rows_shape, generator=g)
    if slope:
        kw["slope"] = 0.2
    if quant:
        kw.update(out_l=-1.0, out_s=0.05, out_bits=int(quant))
    return kw


def _compare(out, ref, what=""):
    assert out.dtype == ref.dtype and out.shape == ref.shape, (what, out.dtype, out.shape, ref.dtype, ref.shape)
    # identical, fp32 outputs and codes alike: the kernels evaluate the reference's fp32
    # epilogue in its order, so even rounding ties round alike (0 mismatches measured over
    # 300 examples per kernel)
    assert torch.equal(out, ref), (what, int((out != ref).sum()), ref.numel())


FLAGS = st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans(),
                  st.sampled_from([0, 2, 3, 4, 8]))


# ================================================================== valid: cpu == ref

@settings(max_examples=CPU_EXAMPLES, **SETTINGS)
@given(m=st.integers(0, 9), k=st.integers(1, 80), o=st.integers(1, 70),
       w_bits=st.sampled_from(BITS), a_bits=st.sampled_from(BITS), flags=FLAGS,
       noncontig=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_cpu_qlinear_matches_reference(cpu_isa, m, k, o, w_bits, a_bits, flags, noncontig, seed):
    cpu = _cpu()
    g = _gen(seed)
    x = _codes((m, k), a_bits, g)
    wc = _codes((o, k), w_bits, g)
    wp = pack_codes(wc, w_bits)
    kw = _epilogue(o, g, flags, (m, o))
    ref = R.ref_qlinear(x, wp, w_bits, a_bits, **kw)
    xin = _noncontig(x) if noncontig else x
    if noncontig and "residual" in kw:
        kw["residual"] = _noncontig(kw["residual"])
    _compare(cpu.cpu_qlinear(xin, wp, w_bits, a_bits, **kw), ref, "qlinear")
    acc, as_ = cpu.cpu_linear_acc(xin, wp, w_bits, a_bits)
    racc, ras, _ = R.ref_linear_acc(x, wc)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)
    # prepacked weights give the same answer
    pw = cpu.cpu_prepack(wp, w_bits, k)
    _compare(cpu.cpu_qlinear(x, pw, w_bits, a_bits, **kw), ref, "qlinear prepacked")


@settings(max_examples=CPU_EXAMPLES, **SETTINGS)
@given(b=st.integers(1, 2), h=st.integers(1, 7), w=st.integers(1, 7), c=st.integers(1, 12),
       o=st.integers(1, 20), ks=st.sampled_from([1, 2, 3]), stride=st.integers(1, 3),
       pad=st.integers(0, 2), w_bits=st.sampled_from(BITS), a_bits=st.sampled_from(BITS),
       flags=FLAGS, seed=st.integers(0, 2 ** 31 - 1))
def test_cpu_qconv2d_matches_reference(cpu_isa, b, h, w, c, o, ks, stride, pad, w_bits, a_bits, flags, seed):
    cpu = _cpu()
    pad = min(pad, ks - 1)
    ho, wo = R.conv_out_size(h, ks, stride, pad), R.conv_out_size(w, ks, stride, pad)
    g = _gen(seed)
    x = _codes((b, h, w, c), a_bits, g)
    wc = _codes((o, ks * ks * c), w_bits, g)
    wp = pack_codes(wc, w_bits)
    if ho < 1 or wo < 1:
        kw = _epilogue(o, g, flags[:2] + (False,) + flags[3:], (b, 1, 1, o))
        with pytest.raises(KernelArgumentError):
            R.ref_qconv2d(x, wp, w_bits, a_bits, ks, stride, pad, **kw)
        with pytest.raises(KernelArgumentError):
            cpu.cpu_qconv2d(x, wp, w_bits, a_bits, ks, stride, pad, **kw)
        return
    kw = _epilogue(o, g, flags, (b, ho, wo, o))
    ref = R.ref_qconv2d(x, wp, w_bits, a_bits, ks, stride, pad, **kw)
    _compare(cpu.cpu_qconv2d(x, wp, w_bits, a_bits, ks, stride, pad, **kw), ref, "qconv2d")
    # an NHWC view of an NCHW buffer (channels-last strides): same answer
    xv = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    _compare(cpu.cpu_qconv2d(xv, wp, w_bits, a_bits, ks, stride, pad, **kw), ref, "qconv2d strided")
    acc, as_ = cpu.cpu_conv2d_acc(x, wp, w_bits, ks, stride, pad, a_bits)
    racc, ras, _, _ = R.ref_conv2d_acc(x, wc, ks, ks, stride, pad)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)


@settings(max_examples=CPU_EXAMPLES, **SETTINGS)
@given(t=st.integers(0, 3), n=st.integers(1, 14), d=st.integers(0, 40),
       a_bits=st.sampled_from(BITS), v_bits=st.sampled_from(BITS), seed=st.integers(0, 2 ** 31 - 1))
def test_cpu_qbmm_matches_reference(cpu_isa, t, n, d, a_bits, v_bits, seed):
    cpu = _cpu()
    g = _gen(seed)
    a, v = _codes((t, n, n), a_bits, g), _codes((t, n, d), v_bits, g)
    sc = dict(a_scale=0.013, a_offset=-0.2, v_scale=0.07, v_offset=0.3)
    ref = R.ref_qbmm(a, v, a_bits, v_bits, **sc)
    _compare(cpu.cpu_qbmm(a, v, a_bits, v_bits, **sc), ref, "qbmm")
    _compare(cpu.cpu_qbmm(_noncontig(a) if n > 1 else a, v, a_bits, v_bits, **sc), ref, "qbmm nc")
    acc, as_, vs = cpu.cpu_bmm_acc(a, v, a_bits, v_bits)
    racc, ras, rvs = R.ref_bmm_acc(a, v)
    assert torch.equal(acc, racc) and torch.equal(vs, rvs)
    assert torch.equal(as_, ras)


@settings(max_examples=CPU_EXAMPLES, **SETTINGS)
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=4), bits=st.sampled_from(BITS),
       l=st.floats(-4, 4), s=st.floats(1e-3, 2), seed=st.integers(0, 2 ** 31 - 1))
def test_cpu_quantize_matches_reference(cpu_isa, shape, bits, l, s, seed):
    cpu = _cpu()
    l, s = float(np.float32(l)), float(np.float32(s))
    x = torch.randn(tuple(shape), generator=_gen(seed)) * 4
    _compare(cpu.cpu_quantize(x, l, s, bits), R.ref_quantize(x, l, s, bits), "quantize")


@settings(max_examples=CPU_EXAMPLES, **SETTINGS)
@given(o=st.integers(1, 9), k=st.integers(0, 70), bits=st.sampled_from(BITS), seed=st.integers(0, 2 ** 31 - 1))
def test_pack_unpack_all_implementations_agree(o, k, bits, seed):
    cpu = _cpu()
    codes = _codes((o, k), bits, _gen(seed))
    ref = pack_codes(codes, bits)
    assert ref.shape == (o, packed_row_bytes(k, bits))
    assert torch.equal(cpu.cpu_pack(codes, bits), ref)
    assert torch.equal(cpu.cpu_unpack(ref, bits, k), codes)
    assert torch.equal(unpack_codes(ref, bits, k), codes)


def test_unpack_zero_rows():
    packed = pack_codes(torch.zeros(0, 5, dtype=torch.uint8), 4)
    assert unpack_codes(packed, 4, 5).shape == (0, 5)


# ================================================================== invalid arguments

def _raises_clean(fn, *args, **kwargs):
    """The call must fail with a KernelArgumentError (QGNNError) and a message."""
    try:
        fn(*args, **kwargs)
    except KernelArgumentError as e:
        assert str(e)
        return e
    except QGNNError as e:  # acceptable, but only our hierarchy
        assert str(e)
        return e
    raise AssertionError(f"{getattr(fn, '__name__', fn)} accepted invalid arguments")


def _linear_case(g, m=3, k=19, o=5, w_bits=4, a_bits=4):
    x = _codes((m, k), a_bits, g)
    wp = pack_codes(_codes((o, k), w_bits, g), w_bits)
    return x, wp, dict(w_scale=_vec(o, g, 0.01, 0.1), w_offset=_vec(o, g), a_scale=0.1, a_offset=0.0)


def _bad_linear_calls(g):
    """(label, args, kwargs) for ``*_qlinear(x, w_packed, w_bits, a_bits, **epi)`` that are invalid."""
    x, wp, epi = _linear_case(g)
    o = wp.shape[0]
    out = []
    for dt in (torch.int8, torch.int32, torch.float32, torch.int64):
        out.append((f"x {dt}", (x.to(dt), wp, 4, 4), epi))
    out.append(("x 1-D", (x.flatten(), wp, 4, 4), epi))
    out.append(("x 3-D", (x[None], wp, 4, 4), epi))
    out.append(("x codes >= 2^a_bits", (x | 0x10, wp, 4, 4), epi))
    out.append(("x not a tensor", (x.numpy(), wp, 4, 4), epi))
    for bb in BAD_BITS:
        out.append((f"a_bits {bb}", (x, wp, 4, bb), epi))
        out.append((f"w_bits {bb}", (x, wp, bb, 4), epi))
    out.append(("w_bits str", (x, wp, "four", 4), epi))
    out.append(("w_bits float", (x, wp, 4.5, 4), epi))
    out.append(("w_packed row bytes", (x, wp[:, :-1].contiguous(), 4, 4), epi))
    out.append(("w_packed wider", (x, torch.cat([wp, wp], 1), 4, 4), epi))
    out.append(("w_packed float", (x, wp.float(), 4, 4), epi))
    out.append(("w_packed 1-D", (x, wp.flatten(), 4, 4), epi))
    out.append(("w_packed K mismatch (bits)", (x, wp, 2, 4), epi))
    out.append(("w_packed None", (x, None, 4, 4), epi))
    for name, bad in [("w_scale", _vec(o + 1, g)), ("w_scale", _vec(o, g).double()),
                      ("w_offset", _vec(o - 1, g)), ("w_scale", None), ("w_offset", None),
                      ("post_scale", _vec(o + 2, g)), ("post_shift", torch.zeros(o, dtype=torch.int32)),
                      ("residual", torch.zeros(x.shape[0], o + 1)), ("residual", torch.zeros(x.shape[0], o).double()),
                      ("w_scale", torch.zeros(o, 1))]:
        out.append((f"{name} bad", (x, wp, 4, 4), {**epi, name: bad}))
    for name, bad in [("a_scale", 0.0), ("a_scale", -1.0), ("a_scale", math.nan), ("a_scale", math.inf),
                      ("a_offset", math.nan), ("a_offset", -math.inf), ("a_scale", "x"), ("a_scale", None),
                      ("a_scale", 1e39), ("slope", math.nan)]:
        out.append((f"{name}={bad!r}", (x, wp, 4, 4), {**epi, name: bad}))
    out.append(("out_s without out_l", (x, wp, 4, 4), {**epi, "out_s": 0.1, "out_bits": 4}))
    out.append(("out_bits 5", (x, wp, 4, 4), {**epi, "out_l": 0.0, "out_s": 0.1, "out_bits": 5}))
    out.append(("out_s 0", (x, wp, 4, 4), {**epi, "out_l": 0.0, "out_s": 0.0, "out_bits": 4}))
    out.append(("out_s nan", (x, wp, 4, 4), {**epi, "out_l": 0.0, "out_s": math.nan, "out_bits": 4}))
    out.append(("out_l inf", (x, wp, 4, 4), {**epi, "out_l": math.inf, "out_s": 0.1, "out_bits": 4}))
    return out


def test_cpu_qlinear_rejects_invalid_arguments():
    cpu = _cpu()
    n = 0
    for label, args, kw in _bad_linear_calls(_gen(1)):
        _raises_clean(cpu.cpu_qlinear, *args, **kw)
        n += 1
    assert n > 50


def test_reference_qlinear_rejects_invalid_arguments():
    for label, args, kw in _bad_linear_calls(_gen(1)):
        if label in ("w_bits str", "w_bits float", "w_packed None"):
            continue  # the reference is not typed for these; the backends are
        if label == "a_scale=1e+39":
            continue  # a finite double: the reference computes in double then fp32 (inf)
        _raises_clean(R.ref_qlinear, *args, **kw)


def test_cpu_linear_noncontiguous_and_foreign_inputs():
    """Strided views are copied (cpu.py's contract) and give the reference's answer; tensors
    on other devices and mismatched prepacked weights are refused."""
    cpu = _cpu()
    g = _gen(2)
    x, wp, epi = _linear_case(g)
    ref = R.ref_qlinear(x, wp, 4, 4, **epi)
    views = [_noncontig(x), x.t().contiguous().t(), x[:, :].flip(0).flip(0)]
    for v in views:
        _compare(cpu.cpu_qlinear(v, wp, 4, 4, **epi), ref)
    _compare(cpu.cpu_qlinear(x, _noncontig(wp), 4, 4, **epi), ref)
    _compare(cpu.cpu_qlinear(x, wp, 4, 4, **{**epi, "w_scale": _noncontig(epi["w_scale"])}), ref)
    e = x[:1].expand(5, -1)
    _compare(cpu.cpu_qlinear(e, wp, 4, 4, **epi), R.ref_qlinear(e.contiguous(), wp, 4, 4, **epi))
    # meta / other-device tensors
    _raises_clean(cpu.cpu_qlinear, x.to("meta"), wp, 4, 4, **epi)
    # prepacked weights of another geometry
    pw = cpu.cpu_prepack(wp, 4, x.shape[1])
    _raises_clean(cpu.cpu_qlinear, x, pw, 2, 4, **epi)
    _raises_clean(cpu.cpu_qlinear, x[:, :-1].contiguous(), pw, 4, 4, **epi)


def test_cpu_qconv2d_rejects_invalid_arguments():
    cpu = _cpu()
    g = _gen(3)
    x = _codes((2, 5, 5, 3), 4, g)
    wp = pack_codes(_codes((4, 27), 4, g), 4)
    epi = dict(w_scale=_vec(4, g, 0.01, 0.1), w_offset=_vec(4, g), a_scale=0.1, a_offset=0.0)
    bad = [
        ((x, wp, 4, 4, 0, 1, 0), epi), ((x, wp, 4, 4, 3, 0, 1), epi), ((x, wp, 4, 4, 3, 1, -1), epi),
        ((x, wp, 4, 4, 3, -2, 1), epi), ((x, wp, 4, 4, 2, 1, 1), epi),            # K mismatch (2x2)
        ((x[:, :1, :1], wp, 4, 4, 3, 1, 0), epi),                                # too small
        ((x[..., :2].contiguous(), wp, 4, 4, 3, 1, 1), epi),                     # C mismatch
        ((x[0], wp, 4, 4, 3, 1, 1), epi), ((x.float(), wp, 4, 4, 3, 1, 1), epi),
        ((x, wp, 4, 4, 3.5, 1, 1), epi), ((x, wp, 4, 4, "three", 1, 1), epi), ((x, wp, 4, 4, 3, 1, None), epi),
        ((x, wp, 4, 4, 3, 1, 1), {**epi, "residual": torch.zeros(2, 5, 5, 5)}),
        ((x, wp, 4, 4, 3, 1, 1), {**epi, "residual": torch.zeros(2, 25, 4)}),
        ((x, wp, 4, 4, 3, 1, 1), {**epi, "w_offset": _vec(3, g)}),
        ((x | 0x30, wp, 4, 4, 3, 1, 1), epi), ((x, wp, 5, 4, 3, 1, 1), epi), ((x, wp, 4, 1, 3, 1, 1), epi),
        ((x, wp, 4, 4, 2 ** 31, 1, 1), epi), ((x, wp, 4, 4, 3, 2 ** 40, 1), epi),
        ((x, wp, 4, 4, 3, 1, 2 ** 31 - 1), epi),
    ]
    for args, kw in bad:
        _raises_clean(cpu.cpu_qconv2d, *args, **kw)
        _raises_clean(cpu.cpu_conv2d_acc, *args[:2], args[2], *args[4:7], args[3]) if not (
            set(kw) - set(epi)) and kw is epi else None


def test_cpu_qbmm_and_quantize_reject_invalid_arguments():
    cpu = _cpu()
    g = _gen(4)
    a, v = _codes((2, 5, 5), 4, g), _codes((2, 5, 7), 4, g)
    sc = dict(a_scale=0.1, a_offset=0.0, v_scale=0.1, v_offset=0.0)
    for args, kw in [((a, v[:, :4], 4, 4), sc), ((a[:, :4], v, 4, 4), sc), ((a, v[:1], 4, 4), sc),
                     ((a[0], v, 4, 4), sc), ((a.float(), v, 4, 4), sc), ((a, v.to(torch.int8), 4, 4), sc),
                     ((a, v, 5, 4), sc), ((a, v, 4, 0), sc),
                     ((a | 0x10, v, 4, 4), sc), ((a, v | 0x20, 4, 4), sc),
                     ((a, v, 4, 4), {**sc, "a_scale": 0.0}), ((a, v, 4, 4), {**sc, "v_scale": math.nan}),
                     ((a, v, 4, 4), {**sc, "v_offset": math.inf}), ((a, v, 4, 4), {**sc, "a_offset": "z"})]:
        _raises_clean(cpu.cpu_qbmm, *args, **kw)
        _raises_clean(R.ref_qbmm, *args, **kw)
    x = torch.randn(3, 4)
    for args in [(x.double(), 0.0, 0.1, 4), (x.half(), 0.0, 0.1, 4), (x, 0.0, 0.0, 4), (x, 0.0, -1.0, 4),
                 (x, math.nan, 0.1, 4), (x, 0.0, math.inf, 4), (x, 0.0, 0.1, 5), (x, 0.0, 0.1, 1),
                 (x.to(torch.uint8), 0.0, 0.1, 4), (x, "a", 0.1, 4), (x, 0.0, 0.1, "four")]:
        _raises_clean(cpu.cpu_quantize, *args)
    for args in [(_codes((3, 9), 4, g), 5), (_codes((3, 9), 4, g) | 0x10, 4), (torch.zeros(3, 9), 4),
                 (_codes((9,), 4, g), 4)]:
        _raises_clean(cpu.cpu_pack, *args)
    packed = pack_codes(_codes((3, 9), 4, g), 4)
    for args in [(packed, 4, 10 ** 6), (packed, 4, -1), (packed, 3, 9), (packed, 5, 9), (packed.float(), 4, 9),
                 (packed, 4, 17), (packed[:, 1:].contiguous(), 4, 9)]:
        _raises_clean(cpu.cpu_unpack, *args)
    for args in [(packed, 4, 9, 0), (packed, 4, 9, 2), (packed, 4, 0, 1), (packed, 4, -9, 1),
                 (packed[:0], 4, 9, 1), (packed, 7, 9, 1), (packed, 4, 2 ** 31, 1)]:
        _raises_clean(cpu.cpu_prepack, *args)
    for n in (0, -1, 1.5, "2"):
        _raises_clean(cpu.set_num_threads, n)
    _raises_clean(cpu.force_isa, "avx9000")


def test_raw_extension_entry_points_reject_invalid_arguments():
    """qgnn_deploy._C directly: numpy arrays of every wrong kind raise its ValueError
    subclass (never crash)."""
    cpu = _cpu()
    C = cpu._ext()
    g = _gen(5)
    x = _codes((3, 16), 4, g).numpy()
    packed = pack_codes(_codes((5, 16), 4, g), 4).numpy()
    pw = C.PackedWeights(packed, 4, 16, 1)
    ws, wo = np.full(5, 0.1, np.float32), np.zeros(5, np.float32)

    def bad(fn, *a, **k):
        with pytest.raises((C.KernelArgumentError, TypeError, ValueError)):
            fn(*a, **k)

    bad(C.qlinear, x.astype(np.int8), pw, 4, ws, wo, 0.1, 0.0)
    bad(C.qlinear, x[:, ::2], pw, 4, ws, wo, 0.1, 0.0)
    bad(C.qlinear, x, pw, 4, ws[:4], wo, 0.1, 0.0)
    bad(C.qlinear, x, pw, 4, ws.astype(np.float64), wo, 0.1, 0.0)
    bad(C.qlinear, x, pw, 4, ws, wo, 0.1, 0.0, nthreads=0)
    bad(C.qlinear, x, pw, 4, ws, wo, 0.1, 0.0, nthreads=10 ** 6)
    bad(C.qlinear, x, pw, 4, ws, wo, 0.1, 0.0, out_s=0.1)
    bad(C.qlinear, x, pw, 4, ws, wo, 0.1, 0.0, residual=np.zeros((3, 4), np.float32))
    bad(C.qlinear, x, None, 4, ws, wo, 0.1, 0.0)
    bad(C.qlinear, x, "w", 4, ws, wo, 0.1, 0.0)
    # misaligned float32 data (offset by one byte inside a bigger buffer)
    buf = np.zeros(4 * 5 + 1, np.uint8)
    mis = np.frombuffer(buf.data, dtype=np.float32, count=5, offset=1)
    bad(C.qlinear, x, pw, 4, mis, wo, 0.1, 0.0)
    bad(C.qconv2d, x.reshape(1, 3, 16, 1), pw, 4, 3, 1, 1, ws, wo, 0.1, 0.0)
    bad(C.qconv2d, np.zeros((1, 4, 4, 16), np.uint8), pw, 4, 1, 1, 1, ws, wo, 0.1, 0.0)  # pad >= ks
    bad(C.qbmm, np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3, 5), np.uint8), 4, 4, 0.1, 0, 0.1, 0)
    bad(C.quantize, np.zeros(4, np.float64), 0.0, 0.1, 4)
    bad(C.quantize, np.zeros(8, np.float32)[::2], 0.0, 0.1, 4)
    bad(C.quantize, np.array([np.nan], np.float32), 0.0, 0.1, 4)
    bad(C.pack, np.zeros((2, 3), np.uint8), 6)
    bad(C.unpack, packed, 4, 2 ** 30)
    bad(C.PackedWeights, packed, 4, 16, 3)
    bad(C.PackedWeights, packed.astype(np.int32), 4, 16, 1)
    bad(C.force_isa, "sse1")


# ================================================================== Triton launchers

@settings(max_examples=TRITON_EXAMPLES, **SETTINGS)
@given(m=st.integers(1, 12), k=st.integers(1, 40), o=st.integers(1, 40),
       w_bits=st.sampled_from(BITS), a_bits=st.sampled_from(BITS), flags=FLAGS,
       noncontig=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_triton_qlinear_matches_reference(m, k, o, w_bits, a_bits, flags, noncontig, seed):
    tb = _triton()
    g = _gen(seed)
    x = _codes((m, k), a_bits, g)
    wc = _codes((o, k), w_bits, g)
    wp = pack_codes(wc, w_bits)
    kw = _epilogue(o, g, flags, (m, o))
    xin = _noncontig(x) if noncontig else x
    _compare(tb.triton_qlinear(xin, wp, w_bits, a_bits, **kw), R.ref_qlinear(x, wp, w_bits, a_bits, **kw))
    acc, as_, ws = tb.triton_linear_acc(xin, wp, w_bits, a_bits)
    racc, ras, rws = R.ref_linear_acc(x, wc)
    assert torch.equal(acc, racc) and torch.equal(as_, ras) and torch.equal(ws, rws)


@settings(max_examples=TRITON_EXAMPLES, **SETTINGS)
@given(b=st.integers(1, 2), h=st.integers(1, 6), w=st.integers(1, 6), c=st.integers(1, 8),
       o=st.integers(1, 12), ks=st.sampled_from([1, 3]), stride=st.integers(1, 2), pad=st.integers(0, 2),
       w_bits=st.sampled_from(BITS), a_bits=st.sampled_from(BITS), flags=FLAGS,
       seed=st.integers(0, 2 ** 31 - 1))
def test_triton_qconv2d_matches_reference(b, h, w, c, o, ks, stride, pad, w_bits, a_bits, flags, seed):
    tb = _triton()
    g = _gen(seed)
    ho, wo = R.conv_out_size(h, ks, stride, pad), R.conv_out_size(w, ks, stride, pad)
    x = _codes((b, h, w, c), a_bits, g)
    wc = _codes((o, ks * ks * c), w_bits, g)
    wp = pack_codes(wc, w_bits)
    if ho < 1 or wo < 1:
        kw = _epilogue(o, g, (False,) * 5, (b, 1, 1, o))
        _raises_clean(tb.triton_qconv2d, x, wp, w_bits, a_bits, ks, stride, pad, **kw)
        return
    kw = _epilogue(o, g, flags, (b, ho, wo, o))
    _compare(tb.triton_qconv2d(x, wp, w_bits, a_bits, ks, stride, pad, **kw),
             R.ref_qconv2d(x, wp, w_bits, a_bits, ks, stride, pad, **kw))
    acc, as_, ws, cnt = tb.triton_conv2d_acc(x, wp, w_bits, ks, stride, pad, a_bits)
    racc, ras, rws, rcnt = R.ref_conv2d_acc(x, wc, ks, ks, stride, pad)
    assert torch.equal(acc, racc) and torch.equal(as_, ras)
    assert torch.equal(ws, rws) and torch.equal(cnt, rcnt)


@settings(max_examples=TRITON_EXAMPLES, **SETTINGS)
@given(t=st.integers(1, 3), n=st.integers(1, 12), d=st.integers(1, 24), a_bits=st.sampled_from(BITS),
       v_bits=st.sampled_from(BITS), seed=st.integers(0, 2 ** 31 - 1))
def test_triton_qbmm_and_quantize_match_reference(t, n, d, a_bits, v_bits, seed):
    tb = _triton()
    g = _gen(seed)
    a, v = _codes((t, n, n), a_bits, g), _codes((t, n, d), v_bits, g)
    sc = dict(a_scale=0.013, a_offset=-0.2, v_scale=0.07, v_offset=0.3)
    _compare(tb.triton_qbmm(a, v, a_bits, v_bits, **sc), R.ref_qbmm(a, v, a_bits, v_bits, **sc))
    acc, as_, vs = tb.triton_bmm_acc(_noncontig(a) if n > 1 else a, v, a_bits, v_bits)
    racc, ras, rvs = R.ref_bmm_acc(a, v)
    assert torch.equal(acc, racc) and torch.equal(as_, ras) and torch.equal(vs, rvs)
    x = torch.randn(t, n, d, generator=g) * 3
    _compare(tb.triton_quantize(x, -0.5, 0.1, a_bits), R.ref_quantize(x, -0.5, 0.1, a_bits))


def test_triton_launchers_reject_invalid_arguments():
    tb = _triton()
    g = _gen(6)
    n = 0
    for label, args, kw in _bad_linear_calls(g):
        if label in ("a_scale=1e+39",):
            continue
        _raises_clean(tb.triton_qlinear, *args, **kw)
        n += 1
    x = _codes((1, 4, 4, 2), 4, g)
    wp = pack_codes(_codes((3, 18), 4, g), 4)
    epi = dict(w_scale=_vec(3, g, 0.01, 0.1), w_offset=_vec(3, g), a_scale=0.1, a_offset=0.0)
    for geo in [(0, 1, 0), (3, 0, 1), (3, 1, -1), (2, 1, 0), (3.0, 1, 1), (3, 1, None), (9, 1, 0)]:
        _raises_clean(tb.triton_qconv2d, x, wp, 4, 4, *geo, **epi)
        _raises_clean(tb.triton_conv2d_acc, x, wp, 4, *geo)
    _raises_clean(tb.triton_qconv2d, x.float(), wp, 4, 4, 3, 1, 1, **epi)
    _raises_clean(tb.triton_qconv2d, x | 0x10, wp, 4, 4, 3, 1, 1, **epi)
    a, v = _codes((2, 5, 5), 4, g), _codes((2, 5, 3), 4, g)
    sc = dict(a_scale=0.1, a_offset=0.0, v_scale=0.1, v_offset=0.0)
    for args, kw in [((a, v[:, :4], 4, 4), sc), ((a, v, 5, 4), sc), ((a.float(), v, 4, 4), sc),
                     ((a, v, 4, 4), {**sc, "a_scale": 0.0}), ((a, v, 4, 4), {**sc, "v_offset": math.nan})]:
        _raises_clean(tb.triton_qbmm, *args, **kw)
    for args in [(a.float().double(), 0.0, 0.1, 4), (a.float(), 0.0, 0.0, 4), (a.float(), math.nan, 0.1, 4),
                 (a.float(), 0.0, 0.1, 6), (a, 0.0, 0.1, 4)]:
        _raises_clean(tb.triton_quantize, *args)
    _raises_clean(tb.prepare_weight, wp, 4, 30)
    _raises_clean(tb.prepare_weight, wp, 5, 18)
    assert n > 50


# ================================================================== bigger runs

@pytest.mark.slow
@settings(max_examples=300, **SETTINGS)
@given(m=st.integers(0, 130), k=st.integers(1, 700), o=st.integers(1, 200),
       w_bits=st.sampled_from(BITS), a_bits=st.sampled_from(BITS), flags=FLAGS,
       noncontig=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_cpu_qlinear_matches_reference_large(m, k, o, w_bits, a_bits, flags, noncontig, seed):
    test_cpu_qlinear_matches_reference.hypothesis.inner_test(m, k, o, w_bits, a_bits, flags, noncontig, seed)
