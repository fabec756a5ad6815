"""The ``triton`` backend: Python launchers for the packed-int Triton kernels (``kernels/``).

Every ``triton_*`` op takes exactly the arguments of its ``ref_*`` twin in
``qgnn_deploy.ops.reference`` and returns the same dtype and shape; integer parts are
identical and fp32 results follow the reference's operation order (kernels are
launched with FMA contraction off and IEEE division, so they match bit for bit).

Epilogue (the reference's centred form, ``ref_epilogue`` / ``ref_qbmm``): the per-channel
constants -- zero points and remainders from ``ref_zero_split`` and the fp32 products
sw*sa, sw*da, dw*sa, dw*da -- are computed here with the reference's own torch ops
(cached per scale / offset tensor); the kernels apply the exact int32 corrections
(``kernels/_common.centred_parts``) and the four-term fp32 sum in the reference's order.
Reductions longer than ``kernels.MAX_REDUCTION`` (33025) are refused: beyond that the
int32 parts could overflow.

Where it runs: CUDA tensors on a GPU; CPU tensors when ``TRITON_INTERPRET=1`` was set
before the kernels were first imported (Triton's numpy interpreter: slow, for tests
and small inputs). Anything else raises :class:`BackendUnavailableError` naming the fix.
Importing this module does not import triton; the first op call does.

Weights: ``w_packed`` is the canonical packed uint8 tensor of the artifact. It is
repacked once into the kernels' layout (``kernels/layout.py``) and cached per tensor
object; a prepared :class:`TritonWeight` (:func:`prepare_weight`) is accepted too.

Raw entry points for exact tests: :func:`triton_linear_acc`, :func:`triton_conv2d_acc`,
:func:`triton_bmm_acc` return the int32 parts like ``ref_linear_acc`` & co.
"""
from __future__ import annotations

import importlib
import threading
import weakref
from typing import Optional, Tuple

import torch

from ..errors import BackendUnavailableError, KernelArgumentError
from ..ops.packing import PACKABLE_BITS
from ..ops.reference import (check_codes, check_epilogue, check_node_rows, check_packed, check_scalar,
                             conv_out_size, ref_zero_split)

Tensor = torch.Tensor

#: M at or below which linear layers take the tl.sum / split-K path instead of tl.dot.
SMALL_M = 8

_LOCK = threading.Lock()
_KERNELS = None


# ------------------------------------------------------------------------ loading

def _import_kernels():
    """``qgnn_deploy.kernels`` (imports triton)."""
    try:
        return importlib.import_module("qgnn_deploy.kernels")
    except ModuleNotFoundError as e:
        if e.name != "qgnn_deploy.kernels":
            raise
        raise BackendUnavailableError(
            "the Triton kernels (qgnn_deploy.kernels) are not installed; reinstall qgnn-deploy "
            "with `pip install -e .` from the repository") from None


def kernels():
    """The kernels package, imported on first use (this imports triton)."""
    global _KERNELS
    if _KERNELS is None:
        with _LOCK:
            if _KERNELS is None:
                try:
                    import triton  # noqa: F401
                except ImportError as e:
                    raise BackendUnavailableError(
                        "the triton backend needs the `triton` package: `pip install triton` "
                        "(Linux x86-64; pinned: triton==3.9.0), or use --backend cpu") from e
                mod = _import_kernels()
                if mod.INTERPRETED != mod.STDLIB_INTERPRETED:
                    raise BackendUnavailableError(
                        "triton was imported before TRITON_INTERPRET was set (or changed since): "
                        "set TRITON_INTERPRET=1 in the environment before starting Python to run "
                        "the Triton kernels on CPU, or unset it to run them on a GPU")
                _KERNELS = mod
    return _KERNELS


def interpreted() -> bool:
    """True when the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(kernels().INTERPRETED)


def is_available() -> bool:
    """True with a CUDA GPU and triton, or under the interpreter (the registry's protocol)."""
    return availability()[0]


def unavailable_reason() -> str:
    return availability()[1]


def availability() -> Tuple[bool, str]:
    """(usable, reason): a GPU with triton, or the interpreter."""
    try:
        k = kernels()
    except BackendUnavailableError as e:
        return False, str(e)
    if k.INTERPRETED:
        return True, "triton interpreter (TRITON_INTERPRET=1), CPU tensors"
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name()}"
    return False, ("no CUDA device: the triton backend needs a GPU, or TRITON_INTERPRET=1 set "
                   "before the first import of the kernels (slow; tests only); else use --backend cpu")


def _check_device(*tensors: Optional[Tensor]) -> torch.device:
    ts = [t for t in tensors if t is not None]
    dev = ts[0].device
    for t in ts[1:]:
        if t.device != dev:
            raise KernelArgumentError(f"all tensors must be on one device, got {dev} and {t.device}")
    if kernels().INTERPRETED:
        return dev
    if dev.type != "cuda":
        raise BackendUnavailableError(
            f"the triton backend got {dev.type} tensors: move them to a CUDA device, or set "
            "TRITON_INTERPRET=1 before importing qgnn_deploy.kernels to run the kernels on CPU "
            "(slow), or use the `cpu` backend")
    return dev


# ------------------------------------------------------------------------ weights

_WCACHE: dict = {}
_WCACHE_MAX = 512


def prepare_weight(w_packed: Tensor, w_bits: int, k: int, taps: int = 1):
    """Repack canonical weights once for the kernels (cached per tensor object).

    Args: w_packed uint8 [O, ceil(k/8)*w_bits]; k = taps * C; taps = kernel_size^2.
    Returns: ``kernels.TritonWeight`` on w_packed's device.
    """
    kp = kernels()
    if isinstance(w_packed, kp.TritonWeight):
        if (w_packed.bits, w_packed.k, w_packed.taps) != (w_bits, k, taps):
            raise KernelArgumentError(
                f"prepared weight is {w_packed.bits}-bit K={w_packed.k} taps={w_packed.taps}, "
                f"the call needs {w_bits}-bit K={k} taps={taps}")
        return w_packed
    check_packed(w_packed, None, k, w_bits)
    key = (id(w_packed), w_packed.data_ptr(), w_packed._version, tuple(w_packed.shape),
           w_bits, k, taps, str(w_packed.device))
    hit = _WCACHE.get(key)
    if hit is not None and hit[0]() is w_packed:
        return hit[1]
    tw = kp.repack(w_packed, w_bits, k, taps)
    with _LOCK:
        if len(_WCACHE) >= _WCACHE_MAX:
            _WCACHE.pop(next(iter(_WCACHE)))
        _WCACHE[key] = (weakref.ref(w_packed), tw)
    weakref.finalize(w_packed, _WCACHE.pop, key, None)
    return tw


def _weight_arg(w_packed, w_bits, k, taps):
    if isinstance(w_packed, torch.Tensor):
        check_packed(w_packed, None, k, w_bits)
        return prepare_weight(w_packed, w_bits, k, taps)
    if w_bits not in PACKABLE_BITS:
        raise KernelArgumentError(f"w_bits must be one of {PACKABLE_BITS}, got {w_bits!r}")
    return prepare_weight(w_packed, w_bits, k, taps)


def _shift(bits: int) -> int:
    # codes of <= 7 bits are valid int8 as they are; 8-bit codes move to [-128, 127]
    return 128 if bits == 8 else 0


# ------------------------------------------------------------------------ launching

def _launch(name: str, kernel, grid, args: tuple, const: dict, rows: int, cols: int) -> None:
    """Interpreter: the config sized to the ``rows`` x ``cols`` output. GPU: the autotuned
    kernel, FMA contraction off."""
    k = kernels()
    if k.INTERPRETED:
        meta = dict(k.interpreter_meta(name, rows, cols))
        meta.update({m: v for m, v in const.items() if m in meta})
        const = {m: v for m, v in const.items() if m not in meta}
        kernel[grid(meta)](*args, **const, **meta)
    else:
        k.tuned(name)[grid](*args, **const, enable_fp_fusion=False)


def _check_reduction(k: int) -> None:
    limit = kernels().MAX_REDUCTION
    if k > limit:
        raise KernelArgumentError(
            f"reduction length {k} exceeds {limit}: the centred int32 accumulator could "
            "overflow (reduction too long)")


def _f32(x: float) -> Tensor:
    return torch.tensor(float(x), dtype=torch.float32)


def _act_split(scale: float, offset: float) -> Tuple[Tensor, int, Tensor]:
    """fp32 step, integer zero point and fp32 remainder of a per-tensor quantizer, by
    ``ref_zero_split`` on CPU scalars exactly as the reference computes them."""
    s = _f32(scale)
    z, dd = ref_zero_split(_f32(offset), s)
    return s, int(z), dd


_CCACHE: dict = {}
_CCACHE_MAX = 512


def _centred_consts(w_scale: Tensor, w_offset: Tensor, a_scale: float, a_offset: float):
    """The centred epilogue's per-channel constants, as ``ref_epilogue`` computes them.

    Returns (coef fp32 [4, O] = (sw*sa, sw*da, dw*sa, dw*da), zw int32 [O], za int), on
    w_scale's device. Cached per (w_scale, w_offset) tensor objects and activation scalars.
    """
    key = (id(w_scale), w_scale._version, id(w_offset), w_offset._version, w_scale.data_ptr(),
           w_offset.data_ptr(), float(a_scale), float(a_offset), str(w_scale.device))
    hit = _CCACHE.get(key)
    if hit is not None and hit[0]() is w_scale and hit[1]() is w_offset:
        return hit[2]
    sw = w_scale.float()
    sa, za, da = _act_split(a_scale, a_offset)
    zw, dw = ref_zero_split(w_offset, sw)
    # fp32 x fp32 products of fp32 values: identical whether torch rounds from fp32 or
    # from the (exact) double product, so Python-float scalars are safe on any device
    saf, daf = float(sa), float(da)
    coef = torch.stack([sw * saf, sw * daf, dw * saf, dw * daf]).contiguous()
    val = (coef, zw.to(torch.int32).contiguous(), za)
    with _LOCK:
        if len(_CCACHE) >= _CCACHE_MAX:
            _CCACHE.pop(next(iter(_CCACHE)))
        _CCACHE[key] = (weakref.ref(w_scale), weakref.ref(w_offset), val)
    weakref.finalize(w_scale, _CCACHE.pop, key, None)
    return val


def _epilogue_args(o, w_scale, w_offset, a_scale, a_offset, post_scale, post_shift, residual,
                   slope, out_l, out_s, out_bits):
    """Returns (flags, vecs, scal): vecs = (coef, zw, post_scale, post_shift, residual),
    scal = (za, slope, out_l, out_s), as the kernels take them."""
    flags = dict(HAS_PS=post_scale is not None, HAS_PSH=post_shift is not None,
                 HAS_RES=residual is not None, HAS_SLOPE=slope is not None,
                 OUT_MODE=2 if out_s is not None else 1,
                 QMAX=float(2 ** out_bits - 1) if out_bits is not None else 0.0)
    coef, zw, za = _centred_consts(w_scale, w_offset, a_scale, a_offset)
    vecs = (coef, zw, _contig(post_scale), _contig(post_shift), _contig(residual))
    scal = (za, float(slope) if slope is not None else 0.0,
            float(out_l) if out_l is not None else 0.0, float(out_s) if out_s is not None else 1.0)
    return flags, vecs, scal


def _raw_args(tw):
    """Dummy epilogue operands for the raw (OUT_MODE 0) launches: never read."""
    return ((tw.row_sums.float(), tw.row_sums, None, None, None), (0, 0.0, 0.0, 1.0),
            dict(HAS_PS=False, HAS_PSH=False, HAS_RES=False, HAS_SLOPE=False, OUT_MODE=0,
                 QMAX=0.0))


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _linear_core(x: Tensor, tw, a_bits: int, mode: int, vecs: tuple, scal: tuple, flags: dict,
                 path: str = "auto", split_k: Optional[int] = None):
    """Run the GEMM (or small-M) kernel. Returns (out, as_) where out is int32 ACC
    [M, O] (mode 0), float32 [M, O] (mode 1) or uint8 [M, O] (mode 2)."""
    kp = kernels()
    m, kdim = x.shape
    o = tw.out_features
    dev = x.device
    odt = {0: torch.int32, 1: torch.float32, 2: torch.uint8}[mode]
    out = torch.empty((m, o), dtype=odt, device=dev)
    as_out = torch.empty((m,), dtype=torch.int32, device=dev) if mode == 0 else tw.row_sums
    coef, zw, ps, psh, res = vecs
    dummy = coef
    za, slope, out_l, out_s = scal
    a_shift, w_shift = _shift(a_bits), _shift(tw.bits)
    small = m <= SMALL_M if path == "auto" else path == "small"
    if m == 0 or o == 0:
        return out, as_out
    common = (coef, zw, ps if ps is not None else dummy, psh if psh is not None else dummy,
              res if res is not None else dummy)
    const = dict(BITS=tw.bits, A_SHIFT=a_shift, W_SHIFT=w_shift, **flags)
    if not small:
        args = (x, tw.words, tw.words_hi, tw.row_sums) + common + (
            out, as_out, m, o, kdim, tw.kp, x.stride(0), za, slope, out_l, out_s)
        _launch("qgemm", kp.qgemm_kernel,
                lambda META: (triton_cdiv(m, META["BLOCK_M"]) * triton_cdiv(o, META["BLOCK_N"]),),
                args, const, rows=m, cols=o)
        return out, as_out
    # small-M path: tiles sized to M; split K when there are too few column tiles
    bm = max(1, 1 << (m - 1).bit_length())
    bn, bk = (32, 32) if kp.INTERPRETED else (64, 32)
    n_tiles = triton_cdiv(o, bn)
    k_blocks = triton_cdiv(tw.kp, bk)
    if split_k is None:
        target = 4 if kp.INTERPRETED else 2 * torch.cuda.get_device_properties(dev).multi_processor_count
        split_k = max(1, min(k_blocks, target // n_tiles))
    split_k = max(1, min(int(split_k), k_blocks))
    k_per = triton_cdiv(k_blocks, split_k) * bk
    split_k = triton_cdiv(k_blocks * bk, k_per)  # drop empty splits
    part = torch.empty((split_k, m, o), dtype=torch.int32, device=dev) if split_k > 1 else out
    part_as = torch.empty((split_k, m), dtype=torch.int32, device=dev) if split_k > 1 else as_out
    launch_opts = {} if kp.INTERPRETED else dict(num_warps=4, enable_fp_fusion=False)
    kp.qgemv_kernel[(n_tiles, split_k)](
        x, tw.words, tw.words_hi, tw.row_sums, *common, out, as_out, part, part_as,
        m, o, kdim, tw.kp, x.stride(0), k_per, za, slope, out_l, out_s,
        SPLIT_K=split_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **const, **launch_opts)
    if split_k > 1:
        const.pop("BITS")
        kp.qgemv_finish_kernel[(n_tiles,)](
            part, part_as, tw.row_sums, *common, out, as_out, m, o, kdim,
            za, slope, out_l, out_s, SPLIT_K=split_k, BLOCK_M=bm, BLOCK_N=bn,
            **const, **launch_opts)
    return out, as_out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- ops

def triton_quantize(x: Tensor, l: float, s: float, bits: int) -> Tensor:
    """fp32 ``x`` (any shape) -> uint8 codes ``clamp(rne((x - l) / s), 0, 2^bits - 1)``."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise KernelArgumentError(
            f"quantize expects float32, got {getattr(x, 'dtype', type(x).__name__)}")
    if bits not in PACKABLE_BITS:
        raise KernelArgumentError(f"bits must be one of {PACKABLE_BITS}, got {bits!r}")
    s = check_scalar(s, "s", positive=True)
    l = check_scalar(l, "l")
    _check_device(x)
    if not bool(torch.isfinite(x).all()):
        raise KernelArgumentError("quantize got NaN or Inf values")
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    n = xc.numel()
    if n:
        kp = kernels()
        block = kp.interpreter_rows(n, 256, 1 << 16) if kp.INTERPRETED else 1024
        opts = {} if kp.INTERPRETED else dict(num_warps=4, enable_fp_fusion=False)
        kp.quantize_kernel[(triton_cdiv(n, block),)](xc, out, n, l, s, QMAX=float(2 ** bits - 1),
                                                      BLOCK=block, **opts)
    return out


def triton_linear_acc(x: Tensor, w_packed, w_bits: int, a_bits: int = 8, path: str = "auto",
                      split_k: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Integer parts of a linear layer, computed by the kernels (cf. ``ref_linear_acc``).

    Args: x uint8 [M, K]; w_packed canonical uint8 [O, ceil(K/8)*w_bits] or prepared;
    a_bits selects the signed-shift path (8) or the direct one (<= 7); path "auto",
    "dot" (tl.dot GEMM) or "small" (tl.sum / split-K).
    Returns: ACC int32 [M, O], AS int32 [M], WS int32 [O].
    """
    check_codes(x, "x", 2, a_bits)
    _check_device(x)
    tw = _weight_arg(w_packed, w_bits, x.shape[1], 1)
    x = x.contiguous()
    vecs, scal, flags = _raw_args(tw)
    acc, as_ = _linear_core(x, tw, a_bits, 0, vecs, scal, flags, path, split_k)
    return acc, as_, tw.row_sums.clone()


def triton_qlinear(x: Tensor, w_packed, w_bits: int, a_bits: int, w_scale: Tensor,
                   w_offset: Tensor, a_scale: float, a_offset: float,
                   post_scale: Optional[Tensor] = None, post_shift: Optional[Tensor] = None,
                   residual: Optional[Tensor] = None, slope: Optional[float] = None,
                   out_l: Optional[float] = None, out_s: Optional[float] = None,
                   out_bits: Optional[int] = None) -> Tensor:
    """Quantized linear (cf. ``ref_qlinear``): x uint8 [M, K] -> float32 [M, O], or uint8
    [M, O] codes when ``out_s`` is given. M <= SMALL_M takes the tl.sum / split-K path."""
    return _qlinear(x, w_packed, w_bits, a_bits, w_scale, w_offset, a_scale, a_offset,
                    post_scale, post_shift, residual, slope, out_l, out_s, out_bits)


def _qlinear(x, w_packed, w_bits, a_bits, w_scale, w_offset, a_scale, a_offset, post_scale=None,
             post_shift=None, residual=None, slope=None, out_l=None, out_s=None, out_bits=None,
             path: str = "auto", split_k: Optional[int] = None) -> Tensor:
    check_codes(x, "x", 2, a_bits)
    if a_bits not in PACKABLE_BITS:
        raise KernelArgumentError(f"a_bits must be one of {PACKABLE_BITS}, got {a_bits!r}")
    m, k = x.shape
    tw = _weight_arg(w_packed, w_bits, k, 1)
    o = tw.out_features
    check_epilogue(o, (m, o), w_scale, w_offset, a_scale, a_offset, post_scale, post_shift,
                   residual, slope, out_l, out_s, out_bits)
    _check_reduction(k)
    _check_device(x, tw.words, w_scale, w_offset, post_scale, post_shift, residual)
    flags, vecs, scal = _epilogue_args(o, w_scale, w_offset, a_scale, a_offset, post_scale,
                                       post_shift, residual, slope, out_l, out_s, out_bits)
    out, _ = _linear_core(x.contiguous(), tw, a_bits, flags["OUT_MODE"], vecs, scal, flags,
                          path, split_k)
    return out


def _conv_core(x: Tensor, tw, a_bits: int, ksize: int, stride: int, pad: int, mode: int,
               vecs: tuple, scal: tuple, flags: dict):
    kp = kernels()
    b, h, w, c = x.shape
    ho, wo = conv_out_size(h, ksize, stride, pad), conv_out_size(w, ksize, stride, pad)
    m, o = b * ho * wo, tw.out_features
    dev = x.device
    odt = {0: torch.int32, 1: torch.float32, 2: torch.uint8}[mode]
    out = torch.empty((b, ho, wo, o), dtype=odt, device=dev)
    raw = mode == 0
    as_out = torch.empty((m,), dtype=torch.int32, device=dev) if raw else tw.row_sums
    ws_out = torch.empty((m, o), dtype=torch.int32, device=dev) if raw else tw.row_sums
    cnt_out = torch.empty((m,), dtype=torch.int32, device=dev) if raw else tw.row_sums
    if m and o:
        coef, zw, ps, psh, res = vecs
        dummy = coef
        args = (x, tw.words, tw.words_hi, tw.tap_sums, coef, zw,
                ps if ps is not None else dummy, psh if psh is not None else dummy,
                res if res is not None else dummy, out, as_out, ws_out, cnt_out,
                m, o, h, w, c, tw.cp, ho, wo) + scal
        const = dict(KSIZE=ksize, STRIDE=stride, PAD=pad, BITS=tw.bits, A_SHIFT=_shift(a_bits),
                     W_SHIFT=_shift(tw.bits), **flags)
        _launch("qconv", kp.qconv_kernel,
                lambda META: (triton_cdiv(m, META["BLOCK_M"]) * triton_cdiv(o, META["BLOCK_N"]),),
                args, const, rows=m, cols=o)
    return out, as_out, ws_out, cnt_out, (b, ho, wo)


def _check_geometry(x: Tensor, kernel_size: int, stride: int, padding: int):
    for name, v in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise KernelArgumentError(f"{name} must be an int, got {v!r}")
    if kernel_size < 1 or stride < 1 or padding < 0:
        raise KernelArgumentError(
            f"bad conv geometry kernel_size={kernel_size} stride={stride} padding={padding}")
    _, h, w, _ = x.shape
    if conv_out_size(h, kernel_size, stride, padding) < 1 or conv_out_size(w, kernel_size, stride, padding) < 1:
        raise KernelArgumentError(f"input {h}x{w} too small for kernel {kernel_size} pad {padding}")


def triton_conv2d_acc(x: Tensor, w_packed, w_bits: int, kernel_size: int, stride: int,
                      padding: int, a_bits: int = 8):
    """Integer parts of a conv layer from the kernels (cf. ``ref_conv2d_acc``).

    Args: x uint8 NHWC [B, H, W, C]; w_packed canonical [O, ceil(k*k*C/8)*w_bits].
    Returns: ACC int32 [B, Ho, Wo, O], AS int32 [B, Ho, Wo], WS int32 [Ho, Wo, O],
    CNT int32 [Ho, Wo] (WS / CNT as computed for batch element 0).
    """
    check_codes(x, "x", 4, a_bits)
    _check_geometry(x, kernel_size, stride, padding)
    _check_device(x)
    c = x.shape[3]
    tw = _weight_arg(w_packed, w_bits, kernel_size * kernel_size * c, kernel_size * kernel_size)
    vecs, scal, flags = _raw_args(tw)
    acc, as_, ws, cnt, (b, ho, wo) = _conv_core(
        x.contiguous(), tw, a_bits, kernel_size, stride, padding, 0, vecs, scal, flags)
    o = tw.out_features
    return (acc, as_.view(b, ho, wo), ws.view(b, ho, wo, o)[0].clone(),
            cnt.view(b, ho, wo)[0].clone())


def triton_qconv2d(x: Tensor, w_packed, w_bits: int, a_bits: int, kernel_size: int,
                   stride: int, padding: int, w_scale: Tensor, w_offset: Tensor, a_scale: float,
                   a_offset: float, post_scale: Optional[Tensor] = None,
                   post_shift: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                   slope: Optional[float] = None, out_l: Optional[float] = None,
                   out_s: Optional[float] = None, out_bits: Optional[int] = None) -> Tensor:
    """Quantized conv2d (cf. ``ref_qconv2d``): x uint8 NHWC [B, H, W, C] -> float32
    [B, Ho, Wo, O], or uint8 codes when ``out_s`` is given."""
    check_codes(x, "x", 4, a_bits)
    if a_bits not in PACKABLE_BITS:
        raise KernelArgumentError(f"a_bits must be one of {PACKABLE_BITS}, got {a_bits!r}")
    _check_geometry(x, kernel_size, stride, padding)
    b, h, w, c = x.shape
    taps = kernel_size * kernel_size
    tw = _weight_arg(w_packed, w_bits, taps * c, taps)
    o = tw.out_features
    ho, wo = conv_out_size(h, kernel_size, stride, padding), conv_out_size(w, kernel_size, stride, padding)
    check_epilogue(o, (b, ho, wo, o), w_scale, w_offset, a_scale, a_offset, post_scale,
                   post_shift, residual, slope, out_l, out_s, out_bits)
    _check_reduction(taps * c)
    _check_device(x, tw.words, w_scale, w_offset, post_scale, post_shift, residual)
    flags, vecs, scal = _epilogue_args(o, w_scale, w_offset, a_scale, a_offset, post_scale,
                                       post_shift, residual, slope, out_l, out_s, out_bits)
    out, *_ = _conv_core(x.contiguous(), tw, a_bits, kernel_size, stride, padding,
                         flags["OUT_MODE"], vecs, scal, flags)
    return out


def _bmm_core(a: Tensor, v: Tensor, a_bits: int, v_bits: int, mode: int, scal: tuple,
              row_offset: Optional[Tensor] = None):
    kp = kernels()
    t, n, _ = a.shape
    d = v.shape[2]
    dev = a.device
    out = torch.empty((t, n, d), dtype=torch.int32 if mode == 0 else torch.float32, device=dev)
    as_out = torch.empty((t, n), dtype=torch.int32, device=dev)
    vs_out = torch.empty((t, d), dtype=torch.int32, device=dev)
    if t and n and d:
        bj = max(32, min(64, 1 << (n - 1).bit_length()))  # K chunk: int8 tl.dot needs K >= 32
        bi = max(16, min(64, 1 << (n - 1).bit_length()))
        const = dict(A_SHIFT=_shift(a_bits), V_SHIFT=_shift(v_bits), OUT_MODE=mode,
                     HAS_OFF=row_offset is not None, BLOCK_I=bi, BLOCK_J=bj)
        off = row_offset.contiguous() if row_offset is not None else v  # unread without HAS_OFF
        _launch("qbmm", kp.qbmm_kernel,
                lambda META: (triton_cdiv(t, META["TASKS_PER_PROG"]), triton_cdiv(n, bi),
                              triton_cdiv(d, META["BLOCK_D"])),
                (a, v, off, out, as_out, vs_out, t, n, d) + scal, const, rows=t, cols=d)
    return out, as_out, vs_out


def _check_bmm(a, v, a_bits, v_bits):
    check_codes(a, "a", 3, a_bits)
    check_codes(v, "v", 3, v_bits)
    for name, bits in (("a_bits", a_bits), ("v_bits", v_bits)):
        if bits not in PACKABLE_BITS:
            raise KernelArgumentError(f"{name} must be one of {PACKABLE_BITS}, got {bits!r}")
    t, n, n2 = a.shape
    if n != n2 or v.shape[0] != t or v.shape[1] != n:
        raise KernelArgumentError(
            f"aggregation needs a [T, N, N] and v [T, N, D], got {tuple(a.shape)} and {tuple(v.shape)}")
    _check_device(a, v)


def triton_bmm_acc(a: Tensor, v: Tensor, a_bits: int = 8, v_bits: int = 8):
    """Integer parts of the aggregation from the kernel (cf. ``ref_bmm_acc``).

    Args: a uint8 [T, N, N]; v uint8 [T, N, D]. Returns ACC int32 [T, N, D], AS int32 [T, N],
    VS int32 [T, D].
    """
    _check_bmm(a, v, a_bits, v_bits)
    return _bmm_core(a.contiguous(), v.contiguous(), a_bits, v_bits, 0,
                     (1.0, 0.0, 0.0, 0.0, 0, 0))


def triton_qbmm(a: Tensor, v: Tensor, a_bits: int, v_bits: int, a_scale: float, a_offset: float,
                v_scale: float, v_offset: float, row_bits: Optional[Tensor] = None,
                row_offset: Optional[Tensor] = None) -> Tensor:
    """Quantized graph aggregation (cf. ``ref_qbmm``): a uint8 [T, N, N], v uint8 [T, N, D]
    (per-node codes with row_bits / row_offset uint8 [T, N]) -> float32 [T, N, D]."""
    _check_bmm(a, v, a_bits, v_bits)
    if (row_bits is None) != (row_offset is None):
        raise KernelArgumentError("row_bits and row_offset go together")
    if row_bits is not None:
        check_node_rows(v, row_bits, row_offset, v_bits)
        _check_device(a, row_bits, row_offset)
    sa, la = check_scalar(a_scale, "a_scale", True), check_scalar(a_offset, "a_offset")
    sv, lv = check_scalar(v_scale, "v_scale", True), check_scalar(v_offset, "v_offset")
    n = a.shape[1]
    _check_reduction(n)
    # the reference's zero-point split and fp32 coefficient products (ref_qbmm), here once
    sa_t, za, da = _act_split(sa, la)
    sv_t, zv, dv = _act_split(sv, lv)
    cnt = torch.tensor(n, dtype=torch.int32).float()
    coef = (float(sa_t * sv_t), float(sa_t * dv), float(da * sv_t), float((da * dv) * cnt),
            za, zv)
    out, _, _ = _bmm_core(a.contiguous(), v.contiguous(), a_bits, v_bits, 1, coef, row_offset)
    return out


def triton_node_rows(v: Tensor, node_bits) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-node widths of node codes (cf. ``ref_node_rows``): v uint8 [T, N, D] ->
    (q uint8 [T, N, D], row_bits uint8 [T, N], row_offset uint8 [T, N])."""
    bits = _node_bits_arg(node_bits)
    check_codes(v, "v", 3, bits[-1])
    _check_device(v)
    t, n, d = v.shape
    q = torch.empty_like(v)
    rb = torch.empty((t, n), dtype=torch.uint8, device=v.device)
    ro = torch.empty((t, n), dtype=torch.uint8, device=v.device)
    rows = t * n
    if rows:
        if d > 4096:
            raise KernelArgumentError(f"node_rows: rows of {d} codes exceed the kernel's 4096")
        bd = max(16, 1 << max(d - 1, 0).bit_length())
        br = 16
        b = list(bits) + [bits[-1]] * (4 - len(bits))
        kernels().node_rows_kernel[(triton_cdiv(rows, br),)](
            v.contiguous(), q, rb, ro, rows, d, *b, NB=len(bits), BLOCK_R=br, BLOCK_D=bd)
    return q, rb, ro


def _node_bits_arg(node_bits) -> Tuple[int, ...]:
    bits = tuple(int(b) for b in node_bits)
    if not 2 <= len(bits) <= 4 or list(bits) != sorted(set(bits)) or any(b not in PACKABLE_BITS for b in bits):
        raise KernelArgumentError(f"node_bits must be 2 to 4 ascending distinct widths of {PACKABLE_BITS}, "
                                  f"got {list(node_bits)}")
    return bits


__all__ = ["SMALL_M", "availability", "interpreted", "is_available", "kernels", "prepare_weight", "unavailable_reason",
           "triton_bmm_acc", "triton_conv2d_acc", "triton_linear_acc", "triton_node_rows", "triton_qbmm",
           "triton_qconv2d", "triton_qlinear", "triton_quantize"]
