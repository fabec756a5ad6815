"""Triton kernels vs the reference integer engine (qgnn_deploy.ops.reference).

Without a GPU the kernels run under Triton's CPU interpreter: this module sets
TRITON_INTERPRET=1 before triton is first imported (triton decides compiled vs
interpreted when a kernel is decorated, and reads the variable again at run time, so it
stays set for the rest of the process; if another test module imported triton first
without it, this module skips and says so). With a
CUDA device the same tests run compiled on the GPU (force the interpreter there with
QGNN_TRITON_TEST_INTERPRET=1). Integer parts must be identical (atol=0); fp32 results
are compared exactly too, because the kernels follow the reference's operation order.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # not importorskip: that would import triton
    pytest.skip("triton is not installed", allow_module_level=True)

_GPU = torch.cuda.is_available() and os.environ.get("QGNN_TRITON_TEST_INTERPRET") != "1"
if not _GPU:
    # stays set for the process: triton also reads it while running interpreted kernels
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qgnn_deploy.backends import triton as tb  # noqa: E402
from qgnn_deploy.errors import BackendUnavailableError, KernelArgumentError  # noqa: E402
from qgnn_deploy.ops import reference as R  # noqa: E402
from qgnn_deploy.ops.packing import pack_codes  # noqa: E402

try:
    KP = tb.kernels()  # fixes compiled-vs-interpreted for this process
except BackendUnavailableError as e:  # triton imported earlier without TRITON_INTERPRET=1
    pytest.skip(str(e), allow_module_level=True)


@triton.jit
def _dot_probe(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = tl.zeros((M, N), dtype=tl.int32)
    acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


if not KP.INTERPRETED and not torch.cuda.is_available():
    pytest.skip("triton / qgnn_deploy.kernels were imported without TRITON_INTERPRET=1 earlier in "
                "this process and there is no GPU: run with TRITON_INTERPRET=1 in the environment",
                allow_module_level=True)

DEV = "cpu" if KP.INTERPRETED else "cuda"
ROOT = Path(__file__).resolve().parents[1]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def codes(shape, bits, seed=0):
    return torch.randint(0, 2 ** bits, shape, generator=_g(seed), dtype=torch.int64).to(torch.uint8)


def d(t):
    return None if t is None else t.to(DEV)


def cpu(t):
    return tuple(x.cpu() for x in t) if isinstance(t, tuple) else t.cpu()


def ref_conv2d_acc(x, w, k, stride, pad):
    """R.ref_conv2d_acc, or the same composition with an int64 tap-sum product where the
    reference trips on int32 @ int64 (reported to the lead: ``.sum(2)`` promotes to int64)."""
    try:
        return R.ref_conv2d_acc(x, w, k, k, stride, pad)
    except RuntimeError:
        o, c = w.shape[0], x.shape[3]
        patches, valid = R.im2col_nhwc(x, k, k, stride, pad)
        b, ho, wo, kk = patches.shape
        acc, as_, _ = R.ref_linear_acc(patches.reshape(-1, kk), w)
        tap = w.to(torch.int64).view(o, k * k, c).sum(2)
        ws = (valid.reshape(-1, k * k).long() @ tap.t()).to(torch.int32)
        cnt = (valid.sum(-1) * c).to(torch.int32)
        return acc.view(b, ho, wo, o), as_.view(b, ho, wo), ws.view(ho, wo, o), cnt


def ref_qconv2d(x, wp, w_bits, a_bits, k, stride, pad, w_scale, w_offset, a_scale, a_offset, **ep):
    try:
        return R.ref_qconv2d(x, wp, w_bits, a_bits, k, stride, pad, w_scale, w_offset, a_scale,
                             a_offset, **ep)
    except RuntimeError:
        from qgnn_deploy.ops.packing import unpack_codes
        w = unpack_codes(wp, w_bits, k * k * x.shape[3])
        acc, as_, ws, cnt = ref_conv2d_acc(x, w, k, stride, pad)
        return R.ref_epilogue(acc, as_, ws, cnt.unsqueeze(0), w_scale, w_offset, a_scale,
                              a_offset, **ep)


def quant_params(o, bits, snapped, seed=1):
    """Per-channel weight (offset, step) and per-tensor activation (offset, step)."""
    g = _g(seed)
    w_scale = (torch.rand(o, generator=g) * 0.05 + 0.01).float()
    w_offset = (-(torch.rand(o, generator=g) * 0.3 + 0.05)).float()
    a_scale, a_offset = 0.173, -0.61
    if snapped:  # l = -z*s with an integer zero point z
        z = torch.randint(0, 2 ** bits, (o,), generator=g).float()
        w_offset = (-z * w_scale).float()
        a_offset = -3 * a_scale
    return w_scale, w_offset, a_scale, a_offset


# --------------------------------------------------------------------- interpreter

@pytest.mark.skipif(not KP.INTERPRETED, reason="interpreter check")
def test_int8_dot_exact_in_interpreter():
    """The pinned triton's interpreter computes int8 x int8 -> int32 tl.dot exactly
    over the full signed range (old versions overflowed)."""
    a = torch.full((16, 128), -128, dtype=torch.int8)
    b = torch.full((128, 16), -128, dtype=torch.int8)
    a[1:] = torch.randint(-128, 128, (15, 128), generator=_g(), dtype=torch.int8)
    c = torch.empty(16, 16, dtype=torch.int32)
    _dot_probe[(1,)](a, b, c, 16, 16, 128)
    assert torch.equal(c, a.int() @ b.int())
    assert int(c[0, 0]) == 128 * 128 * 128


def test_import_does_not_import_triton():
    code = ("import sys; import qgnn_deploy.backends.triton as t; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cpu_tensors_without_interpreter_raise():
    code = (
        "import torch\n"
        "from qgnn_deploy.backends.triton import triton_qbmm\n"
        "from qgnn_deploy.errors import BackendUnavailableError\n"
        "a = torch.zeros(1, 5, 5, dtype=torch.uint8); v = torch.zeros(1, 5, 8, dtype=torch.uint8)\n"
        "try:\n"
        "    triton_qbmm(a, v, 4, 4, 0.1, 0.0, 0.1, 0.0)\n"
        "except BackendUnavailableError as e:\n"
        "    assert 'TRITON_INTERPRET=1' in str(e) and 'cpu' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)


_SM90_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qgnn_deploy.backends import triton as tb
kp = tb.kernels()
assert not kp.INTERPRETED
PTR = {"x_ptr": "*u8", "a_ptr": "*u8", "v_ptr": "*u8", "coef_ptr": "*fp32", "ps_ptr": "*fp32",
       "psh_ptr": "*fp32", "res_ptr": "*fp32"}
FP = {"slope", "out_l", "out_s", "c_acc", "c_as", "c_vs", "c_n"}
def build(fn, consts, out, **opts):
    sig = {a: "constexpr" if a in consts else PTR.get(a, out if a == "out_ptr" else "*i32")
           if a.endswith("_ptr") else "fp32" if a in FP else "i32" for a in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(enable_fp_fusion=False, num_warps=4, **opts))
    assert k.asm["cubin"] and ".target sm_90" in k.asm["ptx"]
    assert "fma.rn.f32" not in k.asm["ptx"], fn.__name__ + ": fp32 FMA in the epilogue"
ep = dict(HAS_PS=True, HAS_PSH=True, HAS_RES=True, HAS_SLOPE=True)
build(kp.qgemm_kernel, dict(BITS=3, A_SHIFT=128, W_SHIFT=0, OUT_MODE=2, QMAX=15.0, **ep,
      BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), "*u8", num_stages=3)
build(kp.qbmm_kernel, dict(A_SHIFT=128, V_SHIFT=0, OUT_MODE=1, TASKS_PER_PROG=4, BLOCK_I=16,
      BLOCK_J=32, BLOCK_D=64), "*fp32")
print("ok")
"""


def test_kernels_compile_for_sm90_without_gpu():
    """The compiled (GPU) path: the fused-epilogue GEMM (shared with conv / small-M) and the
    aggregation lower to sm_90 cubins (ptxas from the triton wheel; no GPU needed) with no
    fp32 FMA (enable_fp_fusion=False)."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("triton has no nvidia backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# --------------------------------------------------------------------- layout

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,taps", [(45, 1), (7 * 9, 9), (33, 1)])
def test_repack_decodes_to_the_canonical_codes(bits, k, taps):
    w = codes((6, k), bits)
    tw = KP.repack(pack_codes(w, bits), bits, k, taps)
    kk = torch.arange(tw.kp)
    words = tw.words.cpu().long() & 0xFFFFFFFF
    if bits == 3:
        lo = (words[kk // 16] >> (2 * (kk % 16))[:, None]) & 3
        hi = ((tw.words_hi.cpu().long() & 0xFFFFFFFF)[kk // 32] >> (kk % 32)[:, None]) & 1
        dec = lo | (hi << 2)
    else:
        per = 32 // bits
        dec = (words[kk // per] >> ((kk % per) * bits)[:, None]) & (2 ** bits - 1)
    c = k // taps
    dec = dec.t().reshape(6, taps, tw.cp)
    assert torch.equal(dec[:, :, :c].reshape(6, k).to(torch.uint8), w)
    assert int(dec[:, :, c:].abs().sum()) == 0
    assert torch.equal(tw.tap_sums.cpu(), w.int().view(6, taps, c).sum(2).t().int())
    assert torch.equal(tw.row_sums.cpu(), w.int().sum(1).int())


# --------------------------------------------------------------------- linear

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("a_bits", [4, 8])
@pytest.mark.parametrize("path,split_k", [("dot", None), ("small", 1), ("small", 3)])
def test_linear_acc_exact(bits, a_bits, path, split_k):
    m = 21 if path == "dot" else 5
    k, o = 75, 37  # K not a multiple of a word or of BLOCK_K, odd O
    x, w = codes((m, k), a_bits, 1), codes((o, k), bits, 2)
    got = cpu(tb.triton_linear_acc(d(x), d(pack_codes(w, bits)), bits, a_bits, path, split_k))
    want = R.ref_linear_acc(x, w)
    for g, r in zip(got, want):
        assert g.dtype == torch.int32 and torch.equal(g, r)


@pytest.mark.parametrize("m", [1, 3, 8, 9, 40])
def test_linear_acc_batch_sizes(m):
    x, w = codes((m, 64), 4, 3), codes((20, 64), 3, 4)
    got = cpu(tb.triton_linear_acc(d(x), d(pack_codes(w, 3)), 3, 4))
    for g, r in zip(got, R.ref_linear_acc(x, w)):
        assert torch.equal(g, r)


EPILOGUES = {
    "plain": {},
    "bn_relu": dict(post=True, slope=0.2),
    "residual_requant": dict(post=True, residual=True, slope=0.2, out=True),
    "requant8": dict(post=True, out=True, out_bits=8),
}


def _epilogue_kwargs(spec, o, rows_shape, seed=5):
    g = _g(seed)
    kw = {}
    if spec.get("post"):
        kw["post_scale"] = (torch.rand(o, generator=g) + 0.5).float()
        kw["post_shift"] = (torch.randn(o, generator=g) * 0.3).float()
    if spec.get("residual"):
        kw["residual"] = torch.randn(*rows_shape, o, generator=g).float()
    if "slope" in spec:
        kw["slope"] = spec["slope"]
    if spec.get("out"):
        kw.update(out_l=-0.4, out_s=0.05, out_bits=spec.get("out_bits", 4))
    return kw


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("snapped", [False, True])
@pytest.mark.parametrize("ep", list(EPILOGUES))
@pytest.mark.parametrize("m", [2, 19])
def test_qlinear_matches_reference(bits, snapped, ep, m):
    k, o = 50, 23
    x, w = codes((m, k), 4, 6), codes((o, k), bits, 7)
    wp = pack_codes(w, bits)
    ws, wo, sa, la = quant_params(o, bits, snapped)
    kw = _epilogue_kwargs(EPILOGUES[ep], o, (m,))
    want = R.ref_qlinear(x, wp, bits, 4, ws, wo, sa, la, **kw)
    got = tb.triton_qlinear(d(x), d(wp), bits, 4, d(ws), d(wo), sa, la,
                            **{n: d(v) if isinstance(v, torch.Tensor) else v for n, v in kw.items()})
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    # codes too: the kernels follow the reference's fp32 op order, so no tie can go the other way
    assert torch.equal(got, want), (got.int() - want.int()).abs().max()


def test_qlinear_small_m_split_k_epilogue():
    m, k, o = 3, 200, 10
    x, w = codes((m, k), 3, 8), codes((o, k), 2, 9)
    wp = pack_codes(w, 2)
    ws, wo, sa, la = quant_params(o, 2, False)
    kw = _epilogue_kwargs(EPILOGUES["residual_requant"], o, (m,))
    want = R.ref_qlinear(x, wp, 2, 3, ws, wo, sa, la, **kw)
    dk = {n: d(v) if isinstance(v, torch.Tensor) else v for n, v in kw.items()}
    for split in (1, 4):
        got = tb._qlinear(d(x), d(wp), 2, 3, d(ws), d(wo), sa, la, **dk, path="small", split_k=split)
        assert torch.equal(got.cpu(), want)


def test_prepared_weight_and_cache():
    x, w = codes((17, 40), 4, 1), codes((9, 40), 4, 2)
    wp = d(pack_codes(w, 4))
    tw = tb.prepare_weight(wp, 4, 40)
    assert tb.prepare_weight(wp, 4, 40) is tw  # cached per tensor object
    ws, wo, sa, la = quant_params(9, 4, False)
    a = tb.triton_qlinear(d(x), tw, 4, 4, d(ws), d(wo), sa, la)
    b = tb.triton_qlinear(d(x), wp, 4, 4, d(ws), d(wo), sa, la)
    assert torch.equal(a, b)
    with pytest.raises(KernelArgumentError, match="prepared weight"):
        tb.triton_qlinear(d(codes((17, 48), 4)), tw, 4, 4, d(ws), d(wo), sa, la)


# --------------------------------------------------------------------- conv

GEOMS = [(3, 1, 1), (1, 1, 0), (3, 2, 1), (1, 2, 0), (3, 1, 0), (3, 2, 2)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("geom", GEOMS)
def test_conv2d_acc_exact(bits, geom):
    ks, st, pd = geom
    b, h, w_, c, o = 2, 5, 6, 7, 19  # odd channels, non-square map, borders on every side
    x, w = codes((b, h, w_, c), 4, 11), codes((o, ks * ks * c), bits, 12)
    got = cpu(tb.triton_conv2d_acc(d(x), d(pack_codes(w, bits)), bits, ks, st, pd, a_bits=4))
    want = ref_conv2d_acc(x, w, ks, st, pd)
    for g, r in zip(got, want):
        assert g.dtype == torch.int32 and g.shape == r.shape and torch.equal(g, r)


@pytest.mark.parametrize("bits", [3, 8])
def test_conv2d_acc_8bit_activations_batch1(bits):
    """8-bit codes take the signed-shift path; padded taps must still count as 0."""
    x, w = codes((1, 4, 4, 33), 8, 13), codes((16, 9 * 33), bits, 14)
    got = cpu(tb.triton_conv2d_acc(d(x), d(pack_codes(w, bits)), bits, 3, 1, 1, a_bits=8))
    for g, r in zip(got, ref_conv2d_acc(x, w, 3, 1, 1)):
        assert torch.equal(g, r)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("snapped", [False, True])
@pytest.mark.parametrize("ep", ["plain", "residual_requant"])
@pytest.mark.parametrize("geom", [(3, 1, 1), (1, 2, 0)])
def test_qconv2d_matches_reference(bits, snapped, ep, geom):
    ks, st, pd = geom
    b, h, w_, c, o = 1, 5, 4, 6, 21
    ho, wo_ = R.conv_out_size(h, ks, st, pd), R.conv_out_size(w_, ks, st, pd)
    x, w = codes((b, h, w_, c), 3, 15), codes((o, ks * ks * c), bits, 16)
    wp = pack_codes(w, bits)
    ws, wo, sa, la = quant_params(o, bits, snapped)
    kw = _epilogue_kwargs(EPILOGUES[ep], o, (b, ho, wo_))
    want = ref_qconv2d(x, wp, bits, 3, ks, st, pd, ws, wo, sa, la, **kw)
    got = tb.triton_qconv2d(d(x), d(wp), bits, 3, ks, st, pd, d(ws), d(wo), sa, la,
                            **{n: d(v) if isinstance(v, torch.Tensor) else v
                               for n, v in kw.items()}).cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)  # fp32 outputs and codes: the reference's op order


# --------------------------------------------------------------------- aggregation

@pytest.mark.parametrize("t,n,dim", [(1, 5, 16), (3, 10, 37), (2, 30, 8), (1, 70, 20)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bmm_acc_exact(t, n, dim, bits):
    a, v = codes((t, n, n), bits, 21), codes((t, n, dim), bits, 22)
    got = cpu(tb.triton_bmm_acc(d(a), d(v), bits, bits))
    for g, r in zip(got, R.ref_bmm_acc(a, v)):
        assert g.dtype == torch.int32 and torch.equal(g, r)


@pytest.mark.parametrize("snapped", [False, True])
@pytest.mark.parametrize("a_bits,v_bits", [(4, 4), (3, 2), (8, 4)])
def test_qbmm_matches_reference(snapped, a_bits, v_bits):
    t, n, dim = 5, 10, 24
    a, v = codes((t, n, n), a_bits, 23), codes((t, n, dim), v_bits, 24)
    sa, la, sv, lv = 0.0123, -0.031, 0.21, -1.37
    if snapped:
        la, lv = -2 * sa, -5 * sv
    want = R.ref_qbmm(a, v, a_bits, v_bits, sa, la, sv, lv)
    got = tb.triton_qbmm(d(a), d(v), a_bits, v_bits, sa, la, sv, lv).cpu()
    assert got.dtype == torch.float32 and torch.equal(got, want)


# --------------------------------------------------------------------- quantize

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_matches_reference(bits):
    x = torch.randn(3, 77, generator=_g(31)) * 2
    ties = torch.arange(-10, 2 ** bits + 10, dtype=torch.float32) * 0.5  # exact .5 ties
    for xi, l, s in ((x, -1.1, 0.37), (ties, 0.0, 1.0), (x, 0.25, 1e-3)):
        want = R.ref_quantize(xi, l, s, bits)
        got = tb.triton_quantize(d(xi), l, s, bits).cpu()
        assert got.dtype == torch.uint8 and got.shape == want.shape and torch.equal(got, want)


# --------------------------------------------------------------------- errors

def _lin_args(o=4, k=16, bits=4):
    x = d(codes((3, k), 4))
    wp = d(pack_codes(codes((o, k), bits), bits))
    ws, wo, sa, la = quant_params(o, bits, False)
    return x, wp, d(ws), d(wo), sa, la


def test_must_raise_linear():
    x, wp, ws, wo, sa, la = _lin_args()
    with pytest.raises(KernelArgumentError, match="uint8"):
        tb.triton_qlinear(x.to(torch.int32), wp, 4, 4, ws, wo, sa, la)
    with pytest.raises(KernelArgumentError, match="2-D"):
        tb.triton_qlinear(x[None], wp, 4, 4, ws, wo, sa, la)
    with pytest.raises(KernelArgumentError, match="bytes"):
        tb.triton_qlinear(x[:, :8], wp, 4, 4, ws, wo, sa, la)
    for bad in (1, 5, 16):
        with pytest.raises(KernelArgumentError, match="bits"):
            tb.triton_qlinear(x, wp, bad, 4, ws, wo, sa, la)
    with pytest.raises(KernelArgumentError, match="bits"):
        tb.triton_qlinear(x, wp, 4, 5, ws, wo, sa, la)
    with pytest.raises(KernelArgumentError, match=">= 2"):
        tb.triton_qlinear(x, wp, 4, 2, ws, wo, sa, la)  # codes up to 15 are not 2-bit
    with pytest.raises(KernelArgumentError, match="w_scale"):
        tb.triton_qlinear(x, wp, 4, 4, ws.double(), wo, sa, la)
    with pytest.raises(KernelArgumentError, match="residual"):
        tb.triton_qlinear(x, wp, 4, 4, ws, wo, sa, la, residual=d(torch.zeros(3, 5)))
    with pytest.raises(KernelArgumentError, match="together"):
        tb.triton_qlinear(x, wp, 4, 4, ws, wo, sa, la, out_s=0.1)
    with pytest.raises(KernelArgumentError, match="a_scale"):
        tb.triton_qlinear(x, wp, 4, 4, ws, wo, 0.0, la)
    with pytest.raises(KernelArgumentError, match="out_bits"):
        tb.triton_qlinear(x, wp, 4, 4, ws, wo, sa, la, out_l=0.0, out_s=0.1, out_bits=9)


def test_must_raise_conv_bmm_quantize():
    x = d(codes((1, 4, 4, 3), 4))
    wp = d(pack_codes(codes((5, 27), 4), 4))
    ws, wo, sa, la = quant_params(5, 4, False)
    ws, wo = d(ws), d(wo)
    with pytest.raises(KernelArgumentError, match="4-D"):
        tb.triton_qconv2d(x[0], wp, 4, 4, 3, 1, 1, ws, wo, sa, la)
    with pytest.raises(KernelArgumentError, match="geometry"):
        tb.triton_qconv2d(x, wp, 4, 4, 3, 0, 1, ws, wo, sa, la)
    with pytest.raises(KernelArgumentError, match="too small"):
        tb.triton_qconv2d(d(codes((1, 2, 2, 3), 4)), wp, 4, 4, 3, 1, 0, ws, wo, sa, la)
    with pytest.raises(KernelArgumentError, match="bytes"):
        tb.triton_qconv2d(x, wp, 4, 4, 1, 1, 0, ws, wo, sa, la)  # weights are 3x3
    with pytest.raises(KernelArgumentError, match="bits"):
        tb.triton_qconv2d(x, wp, 6, 4, 3, 1, 1, ws, wo, sa, la)
    a, v = d(codes((2, 5, 5), 4)), d(codes((2, 5, 8), 4))
    with pytest.raises(KernelArgumentError, match="aggregation"):
        tb.triton_qbmm(a, v[:, :4], 4, 4, 0.1, 0.0, 0.1, 0.0)
    with pytest.raises(KernelArgumentError, match="uint8"):
        tb.triton_qbmm(a.float(), v, 4, 4, 0.1, 0.0, 0.1, 0.0)
    with pytest.raises(KernelArgumentError, match="bits"):
        tb.triton_qbmm(a, v, 4, 7, 0.1, 0.0, 0.1, 0.0)
    with pytest.raises(KernelArgumentError, match="float32"):
        tb.triton_quantize(d(torch.zeros(4, dtype=torch.float64)), 0.0, 1.0, 4)
    with pytest.raises(KernelArgumentError, match="NaN"):
        tb.triton_quantize(d(torch.tensor([0.0, float("nan")])), 0.0, 1.0, 4)
    with pytest.raises(KernelArgumentError, match="bits"):
        tb.triton_quantize(d(torch.zeros(4)), 0.0, 1.0, 1)
    with pytest.raises(KernelArgumentError, match="s must be > 0"):
        tb.triton_quantize(d(torch.zeros(4)), 0.0, -1.0, 4)


def test_autotune_configs_pruned_for_shared_memory(monkeypatch):
    from qgnn_deploy.kernels import autotune as at

    for cfg in at.GEMM_CONFIGS + at.CONV_CONFIGS:
        assert cfg.kwargs["BLOCK_K"] % KP.K_ALIGN == 0 and cfg.kwargs["BLOCK_M"] >= 16
    monkeypatch.setattr(at, "_max_smem", lambda: 48 * 1024)
    kept = at._prune(at.GEMM_CONFIGS, {"M": 6400, "O": 512, "BITS": 4})
    assert kept and all(at.smem_bytes(c, 4) <= 48 * 1024 for c in kept)
    assert len(kept) < len(at.GEMM_CONFIGS)
    small = at._prune(at.GEMM_CONFIGS, {"M": 6400, "O": 16, "BITS": 2})
    assert all(c.kwargs["BLOCK_N"] <= 64 for c in small)


def test_out_of_range_codes_always_raise():
    """Codes above their bit-width would wrap in the kernels' int8 casts: every op refuses
    them (there is no switch that turns the check off)."""
    x = codes((3, 16), 4)
    x[1, 5] = 200  # >= 128: would wrap to a negative int8
    wp = d(pack_codes(codes((4, 16), 4), 4))
    ws, wo, sa, la = quant_params(4, 4, False)
    with pytest.raises(KernelArgumentError, match=r"codes >= 2\^4"):
        tb.triton_qlinear(d(x), wp, 4, 4, d(ws), d(wo), sa, la)
    xc = codes((1, 4, 4, 3), 2)
    xc[0, 2, 1, 0] = 4
    wc = d(pack_codes(codes((5, 27), 4), 4))
    ws, wo, sa, la = quant_params(5, 4, False)
    with pytest.raises(KernelArgumentError, match=r"codes >= 2\^2"):
        tb.triton_qconv2d(d(xc), wc, 4, 2, 3, 1, 1, d(ws), d(wo), sa, la)
    a, v = codes((2, 5, 5), 3), codes((2, 5, 8), 4)
    a[1, 0, 0] = 8
    with pytest.raises(KernelArgumentError, match=r"codes >= 2\^3"):
        tb.triton_qbmm(d(a), d(v), 3, 4, 0.1, 0.0, 0.1, 0.0)
    v[0, 4, 7] = 130
    with pytest.raises(KernelArgumentError, match=r"codes >= 2\^4"):
        tb.triton_qbmm(d(codes((2, 5, 5), 3)), d(v), 3, 4, 0.1, 0.0, 0.1, 0.0)
