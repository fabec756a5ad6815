"""The reference integer engine: the specification every backend must reproduce.

Plain PyTorch integer arithmetic (int32 accumulation, no float matmul on dequantized
values), written to be read. The C++ (``cpu_*``), Triton (``triton_*``) and ONNX paths
are tested against these functions: integer intermediates exactly (atol=0), fp32
outputs to the parity of docs/integer-contract.md.

Semantics (docs/integer-contract.md). A quantized layer with weight codes ``qw`` (per output
channel offset ``lw[o]``, step ``sw[o]``; per-tensor weights repeat one value) and input
codes ``qa`` (offset ``la``, step ``sa``, per tensor) computes::

    ACC[p,o] = sum_k qw[o,k] * qa[p,k]            int32, exact
    AS[p]    = sum_k qa[p,k]                       int32
    WS[p,o]  = sum_k qw[o,k] over the taps of p that fall inside the input
    CNT[p]   = number of those taps                (WS, CNT vary only at padded borders)
    y = (sw*sa)*ACC + (sw*la)*WS + (lw*sa)*AS + (lw*la)*CNT          (exact identity)
      evaluated centred to avoid cancellation (ref_zero_split / ref_epilogue):
      zw, dw = split(lw, sw); za, da = split(la, sa)    z = clamp(rne(-l/s), 0, 255), d = l + s*z
      ACC' = ACC - zw*AS - za*WS + zw*za*CNT;  WS' = WS - zw*CNT;  AS' = AS - za*CNT   (int32)
      y = (sw*sa)*ACC' + (sw*da)*WS' + (dw*sa)*AS' + (dw*da)*CNT    fp32, in this order
    y = y * post_scale[o] + post_shift[o]           folded BatchNorm and bias
    y = y + residual                                if given
    y = max(y, 0) + slope * min(y, 0)               LeakyReLU, if slope is given
    out = clamp(rne((y - out_l) / out_s), 0, 2^out_bits - 1) as uint8, if out_s is given

Zero padding is zero in the real domain: padded taps add nothing to ACC, AS, WS or CNT.
Rounding is round-half-to-even everywhere (``torch.round``), the same as onnxruntime.

Tensor layouts: activations NHWC (conv) or [M, K] rows (linear), codes uint8.
Weights: packed rows (``ops.packing``) of K = kh*kw*C_in codes in (kh, kw, C_in) order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import KernelArgumentError
from ..quant.pauta import pauta_codes
from .packing import PACKABLE_BITS, packed_row_bytes, unpack_codes

Tensor = torch.Tensor
FP32_MAX = float(torch.finfo(torch.float32).max)


# ----------------------------------------------------------------------------- checks

def check_codes(x: Tensor, name: str, dims: int, bits: Optional[int] = None) -> None:
    """uint8, contiguous, ``dims``-D; codes within ``bits`` when given."""
    if not isinstance(x, torch.Tensor):
        raise KernelArgumentError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise KernelArgumentError(f"{name} must be uint8 codes, got {x.dtype}")
    if x.dim() != dims:
        raise KernelArgumentError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")
    if bits is not None:
        if bits not in PACKABLE_BITS:
            raise KernelArgumentError(f"{name}: bits must be one of {PACKABLE_BITS}, got {bits!r}")
        if x.numel() and bits < 8 and int(x.max()) >= 2 ** bits:
            raise KernelArgumentError(f"{name} holds codes >= 2^{bits} (max {int(x.max())})")


def check_vector(v: Optional[Tensor], name: str, n: int, optional: bool = False,
                 positive: bool = False) -> None:
    if v is None:
        if optional:
            return
        raise KernelArgumentError(f"{name} is required")
    if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.shape != (n,):
        got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
        raise KernelArgumentError(f"{name} must be float32 of shape ({n},), got {got}")
    if not bool(torch.isfinite(v).all()):
        raise KernelArgumentError(f"{name} holds NaN or Inf values")
    if positive and not bool((v > 0).all()):
        raise KernelArgumentError(f"{name} must be > 0 everywhere")


def check_scalar(x, name: str, positive: bool = False) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        raise KernelArgumentError(f"{name} must be a number, got {x!r}") from None
    if f != f or abs(f) > FP32_MAX:  # beyond fp32 it would become Inf inside the kernels
        raise KernelArgumentError(f"{name} must be a finite float32 value, got {f}")
    if positive and not f > 0:
        raise KernelArgumentError(f"{name} must be > 0, got {f}")
    return f


def check_packed(w_packed: Tensor, out_features: Optional[int], k: int, bits: int) -> int:
    check_codes(w_packed, "w_packed", 2)
    if bits not in PACKABLE_BITS:
        raise KernelArgumentError(f"w_bits must be one of {PACKABLE_BITS}, got {bits!r}")
    if w_packed.shape[1] != packed_row_bytes(k, bits):
        raise KernelArgumentError(
            f"w_packed rows are {w_packed.shape[1]} bytes, but K={k} codes of {bits} bits "
            f"need {packed_row_bytes(k, bits)}")
    if out_features is not None and w_packed.shape[0] != out_features:
        raise KernelArgumentError(f"w_packed has {w_packed.shape[0]} rows, expected {out_features}")
    return w_packed.shape[0]


def check_epilogue(o: int, out_rows_shape, w_scale, w_offset, a_scale, a_offset, post_scale,
                   post_shift, residual, slope, out_l, out_s, out_bits) -> None:
    check_vector(w_scale, "w_scale", o, positive=True)
    check_vector(w_offset, "w_offset", o)
    check_scalar(a_scale, "a_scale", positive=True)
    check_scalar(a_offset, "a_offset")
    check_vector(post_scale, "post_scale", o, optional=True)
    check_vector(post_shift, "post_shift", o, optional=True)
    if residual is not None:
        if residual.dtype != torch.float32 or tuple(residual.shape) != tuple(out_rows_shape):
            raise KernelArgumentError(
                f"residual must be float32 of shape {tuple(out_rows_shape)}, "
                f"got {residual.dtype} {tuple(residual.shape)}")
    if slope is not None:
        check_scalar(slope, "slope")
    if (out_s is None) != (out_bits is None) or (out_s is None) != (out_l is None):
        raise KernelArgumentError("out_l, out_s and out_bits must be given together")
    if out_s is not None:
        check_scalar(out_s, "out_s", positive=True)
        check_scalar(out_l, "out_l")
        if out_bits not in PACKABLE_BITS:
            raise KernelArgumentError(f"out_bits must be one of {PACKABLE_BITS}, got {out_bits!r}")


# ------------------------------------------------------------------- integer parts

def ref_quantize(x: Tensor, l: float, s: float, bits: int) -> Tensor:
    """fp32 ``x`` -> uint8 codes ``clamp(rne((x - l) / s), 0, 2^bits - 1)``.

    Raises on NaN/Inf input (a NaN has no code; see ``errors.InputError`` upstream).
    """
    if x.dtype != torch.float32:
        raise KernelArgumentError(f"quantize expects float32, got {x.dtype}")
    if bits not in PACKABLE_BITS:
        raise KernelArgumentError(f"bits must be one of {PACKABLE_BITS}, got {bits!r}")
    check_scalar(s, "s", positive=True)
    check_scalar(l, "l")
    if not bool(torch.isfinite(x).all()):
        raise KernelArgumentError("quantize got NaN or Inf values")
    return pauta_codes(x, torch.tensor(l, dtype=torch.float32), torch.tensor(s, dtype=torch.float32), bits)


def ref_linear_acc(x: Tensor, w_codes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Integer parts of a linear layer.

    Args: x uint8 [M, K]; w_codes uint8 [O, K].
    Returns: ACC int32 [M, O], AS int32 [M], WS int32 [O].
    """
    xi = x.to(torch.int32)
    wi = w_codes.to(torch.int32)
    return xi @ wi.t(), xi.sum(1, dtype=torch.int32), wi.sum(1, dtype=torch.int32)


def conv_out_size(h: int, k: int, stride: int, pad: int) -> int:
    return (h + 2 * pad - k) // stride + 1


def im2col_nhwc(x: Tensor, kh: int, kw: int, stride: int, pad: int) -> Tuple[Tensor, Tensor]:
    """Patches of an NHWC tensor in (kh, kw, C) order, zero outside the input.

    Returns: patches [B, Ho, Wo, kh*kw*C] (x's dtype) and the valid-tap mask
    int32 [Ho, Wo, kh*kw] (1 where the tap lies inside the input).
    """
    b, h, w, c = x.shape
    ho, wo = conv_out_size(h, kh, stride, pad), conv_out_size(w, kw, stride, pad)
    xp = torch.zeros(b, h + 2 * pad, w + 2 * pad, c, dtype=x.dtype)
    xp[:, pad:pad + h, pad:pad + w] = x
    ones = torch.zeros(h + 2 * pad, w + 2 * pad, dtype=torch.int32)
    ones[pad:pad + h, pad:pad + w] = 1
    taps, valid = [], []
    for i in range(kh):
        for j in range(kw):
            hs = slice(i, i + stride * (ho - 1) + 1, stride)
            ws = slice(j, j + stride * (wo - 1) + 1, stride)
            taps.append(xp[:, hs, ws])
            valid.append(ones[hs, ws])
    patches = torch.stack(taps, 3).reshape(b, ho, wo, kh * kw * c)
    return patches, torch.stack(valid, -1)


def ref_conv2d_acc(x: Tensor, w_codes: Tensor, kh: int, kw: int, stride: int, pad: int):
    """Integer parts of a conv layer (implicit zero padding in the real domain).

    Args: x uint8 NHWC [B, H, W, C]; w_codes uint8 [O, kh*kw*C] in (kh, kw, C) order.
    Returns: ACC int32 [B, Ho, Wo, O], AS int32 [B, Ho, Wo], WS int32 [Ho, Wo, O],
    CNT int32 [Ho, Wo].
    """
    o = w_codes.shape[0]
    c = x.shape[3]
    patches, valid = im2col_nhwc(x, kh, kw, stride, pad)
    b, ho, wo, k = patches.shape
    acc, as_, _ = ref_linear_acc(patches.reshape(-1, k), w_codes)
    tap_sums = w_codes.to(torch.int32).view(o, kh * kw, c).sum(2, dtype=torch.int32)  # [O, taps]
    ws = valid.reshape(-1, kh * kw) @ tap_sums.t()                  # [Ho*Wo, O]
    cnt = valid.sum(-1, dtype=torch.int32) * c
    return (acc.view(b, ho, wo, o), as_.view(b, ho, wo), ws.view(ho, wo, o).to(torch.int32),
            cnt.to(torch.int32))


def ref_bmm_acc(a: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Integer parts of the graph aggregation ``A @ V`` per task.

    Args: a uint8 [T, N, N]; v uint8 [T, N, D].
    Returns: ACC int32 [T, N, D], AS int32 [T, N] (row sums of a), VS int32 [T, D].
    """
    ai, vi = a.to(torch.int32), v.to(torch.int32)
    return torch.bmm(ai, vi), ai.sum(2, dtype=torch.int32), vi.sum(1, dtype=torch.int32)


# ------------------------------------------------------------------------ epilogue

ZERO_POINT_MAX = 255  # centring zero points are clamped to [0, 255]: int32-safe for K <= 33,025 (ops/bounds.py)


def ref_zero_split(offset: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    """Split real offsets into an integer zero point and a small fp32 remainder.

    ``z = clamp(rne(-offset / scale), 0, 255)`` (fp32 division), ``d = offset + scale * z``
    (fp32 product, then fp32 sum), so that ``offset + scale * q == scale * (q - z) + d``
    with ``|d| <= scale / 2`` whenever the range contains 0. Shapes: any (elementwise).
    Returns: z int32, d float32.
    """
    offset, scale = offset.float(), scale.float()
    z = torch.round(-offset / scale).clamp_(0, ZERO_POINT_MAX)
    return z.to(torch.int32), offset + scale * z


def ref_centered_parts(acc: Tensor, as_: Tensor, ws: Tensor, cnt: Tensor, zw: Tensor,
                       za: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Integer parts of the centred identity (all int32, exact).

    ``ACC' = ACC - zw*AS - za*WS + zw*za*CNT`` (= sum over valid taps of (qw-zw)(qa-za)),
    ``WS' = WS - zw*CNT``, ``AS' = AS - za*CNT``. acc [..., O]; as_/cnt broadcastable to
    [..., 1]; ws/zw broadcastable to [..., O]; za scalar.
    """
    i64 = torch.int64
    acc, as_, ws, cnt = acc.to(i64), as_.to(i64), ws.to(i64), cnt.to(i64)
    zw, za = zw.to(i64), za.to(i64)
    accp = acc - zw * as_ - za * ws + (zw * za) * cnt
    wsp = ws - zw * cnt
    asp = as_ - za * cnt
    if accp.numel() and int(accp.abs().max()) >= 2 ** 31:  # pragma: no cover - K beyond 33,025
        raise KernelArgumentError("centred accumulator exceeds int32 (reduction too long)")
    return accp.to(torch.int32), wsp.to(torch.int32), asp.to(torch.int32)


def ref_epilogue(acc: Tensor, as_: Tensor, ws: Tensor, cnt: Tensor, w_scale: Tensor,
                 w_offset: Tensor, a_scale: float, a_offset: float,
                 post_scale: Optional[Tensor] = None, post_shift: Optional[Tensor] = None,
                 residual: Optional[Tensor] = None, slope: Optional[float] = None,
                 out_l: Optional[float] = None, out_s: Optional[float] = None,
                 out_bits: Optional[int] = None) -> Tensor:
    """The fp32 epilogue of docs/integer-contract.md, broadcast over the last dim (channels).

    acc [..., O]; as_ [...] ; ws broadcastable to [..., O]; cnt broadcastable to [...].

    The identity ``sw*sa*ACC + sw*la*WS + lw*sa*AS + lw*la*CNT`` is evaluated in its
    *centred* form: offsets split by :func:`ref_zero_split` into integer zero points
    (zw [O], za) and remainders (dw [O], da); the zero points move into exact integer
    parts (:func:`ref_centered_parts`) and the fp32 part is::

        y = (sw*sa)*ACC' + (sw*da)*WS' + (dw*sa)*AS' + (dw*da)*CNT     fp32, in this order

    Mathematically identical to the plain identity, but its terms no longer cancel, so
    the fp32 error is that of one product of the result's size (~1e-7 relative) instead
    of the size of the largest offset term (measured 13x larger at 4 bits). That matters:
    each fp32 discrepancy near a rounding boundary flips a code of the next layer, and
    flips cascade through the network (2-bit tiny model: max logit diff vs fake-quant
    3e-8 centred vs 3e-2 plain). Under zero_point="snap", da and dw are ~0 and this is
    the standard asymmetric scheme ``s_w s_a sum (qw - zw)(qa - za)``.
    """
    sw = w_scale.float()
    sa, la = torch.tensor(float(a_scale)), torch.tensor(float(a_offset))
    zw, dw = ref_zero_split(w_offset, sw)
    za, da = ref_zero_split(la, sa)
    accp, wsp, asp = ref_centered_parts(acc, as_.unsqueeze(-1), ws, cnt.unsqueeze(-1), zw, za)
    y = ((sw * sa) * accp.float()
         + (sw * da) * wsp.float()
         + (dw * sa) * asp.float()
         + (dw * da) * cnt.float().unsqueeze(-1))
    if post_scale is not None:
        y = y * post_scale
    if post_shift is not None:
        y = y + post_shift
    if residual is not None:
        y = y + residual
    if slope is not None:
        y = torch.where(y >= 0, y, y * float(slope))
    if out_s is not None:
        return pauta_codes(y, torch.tensor(float(out_l)), torch.tensor(float(out_s)), out_bits)
    return y


# --------------------------------------------------------------------------- ops

def ref_qlinear(x: Tensor, w_packed: Tensor, w_bits: int, a_bits: int, w_scale: Tensor,
                w_offset: Tensor, a_scale: float, a_offset: float,
                post_scale: Optional[Tensor] = None, post_shift: Optional[Tensor] = None,
                residual: Optional[Tensor] = None, slope: Optional[float] = None,
                out_l: Optional[float] = None, out_s: Optional[float] = None,
                out_bits: Optional[int] = None) -> Tensor:
    """Quantized linear / 1x1 conv over rows.

    Args:
        x: uint8 [M, K] activation codes (< 2^a_bits).
        w_packed: uint8 [O, ceil(K/8)*w_bits], canonical packing.
        w_scale, w_offset: float32 [O] weight step and offset.
        a_scale, a_offset: the input quantizer's step and offset.
        post_scale, post_shift: float32 [O] folded BN/bias, optional.
        residual: float32 [M, O], optional.
        slope: LeakyReLU negative slope, optional.
        out_l, out_s, out_bits: re-quantize the output to codes, optional.
    Returns: float32 [M, O], or uint8 [M, O] codes when ``out_s`` is given.
    """
    check_codes(x, "x", 2, a_bits)
    m, k = x.shape
    o = check_packed(w_packed, None, k, w_bits)
    check_epilogue(o, (m, o), w_scale, w_offset, a_scale, a_offset, post_scale, post_shift,
                   residual, slope, out_l, out_s, out_bits)
    w_codes = unpack_codes(w_packed, w_bits, k)
    acc, as_, ws = ref_linear_acc(x, w_codes)
    cnt = torch.full((m,), k, dtype=torch.int32)
    return ref_epilogue(acc, as_, ws, cnt, w_scale, w_offset, a_scale, a_offset, post_scale,
                        post_shift, residual, slope, out_l, out_s, out_bits)


def ref_qconv2d(x: Tensor, w_packed: Tensor, w_bits: int, a_bits: int, kernel_size: int,
                stride: int, padding: int, w_scale: Tensor, w_offset: Tensor, a_scale: float,
                a_offset: float, post_scale: Optional[Tensor] = None,
                post_shift: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                slope: Optional[float] = None, out_l: Optional[float] = None,
                out_s: Optional[float] = None, out_bits: Optional[int] = None) -> Tensor:
    """Quantized conv2d, square kernel, NHWC.

    Args:
        x: uint8 [B, H, W, C] activation codes.
        w_packed: uint8 [O, ceil(k*k*C/8)*w_bits], codes in (kh, kw, C) order.
        kernel_size, stride, padding: ints (zero padding, real-domain zero).
        Others as :func:`ref_qlinear`; residual is float32 [B, Ho, Wo, O].
    Returns: float32 [B, Ho, Wo, O], or uint8 codes when ``out_s`` is given.
    """
    check_codes(x, "x", 4, a_bits)
    if kernel_size < 1 or stride < 1 or padding < 0:
        raise KernelArgumentError(
            f"bad conv geometry kernel_size={kernel_size} stride={stride} padding={padding}")
    b, h, w, c = x.shape
    k = kernel_size * kernel_size * c
    o = check_packed(w_packed, None, k, w_bits)
    ho, wo = conv_out_size(h, kernel_size, stride, padding), conv_out_size(w, kernel_size, stride, padding)
    if ho < 1 or wo < 1:
        raise KernelArgumentError(f"input {h}x{w} too small for kernel {kernel_size} pad {padding}")
    check_epilogue(o, (b, ho, wo, o), w_scale, w_offset, a_scale, a_offset, post_scale,
                   post_shift, residual, slope, out_l, out_s, out_bits)
    w_codes = unpack_codes(w_packed, w_bits, k)
    acc, as_, ws, cnt = ref_conv2d_acc(x, w_codes, kernel_size, kernel_size, stride, padding)
    return ref_epilogue(acc, as_, ws, cnt.unsqueeze(0), w_scale, w_offset, a_scale, a_offset,
                        post_scale, post_shift, residual, slope, out_l, out_s, out_bits)


def ref_node_rows(v: Tensor, node_bits) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-node widths of aggregation node codes (A2Q-style per-node bits).

    Args:
        v: uint8 [T, N, D] node codes on one grid of ``max(node_bits)`` bits.
        node_bits: ascending distinct widths, e.g. ``(2, 4, 8)``.
    Returns: ``(q, row_bits, row_offset)``: ``row_offset`` uint8 [T, N] the row's minimum
        code, ``q = v - row_offset`` uint8 [T, N, D], ``row_bits`` uint8 [T, N] the fewest
        widths ``b`` of ``node_bits`` with ``max_d q < 2^b``. Lossless: ``q + row_offset == v``.
        An empty row (D = 0) has offset 0 and the fewest widths.
    """
    bits = tuple(int(b) for b in node_bits)
    if len(bits) < 2 or list(bits) != sorted(set(bits)) or any(b not in PACKABLE_BITS for b in bits):
        raise KernelArgumentError(f"node_bits must be >= 2 ascending distinct widths of {PACKABLE_BITS}, "
                                  f"got {list(node_bits)}")
    check_codes(v, "v", 3, bits[-1])
    t, n, d = v.shape
    if d == 0:
        zeros = torch.zeros((t, n), dtype=torch.uint8)
        return v.clone(), torch.full((t, n), bits[0], dtype=torch.uint8), zeros
    lo = v.amin(-1)
    span = v.amax(-1).to(torch.int32) - lo.to(torch.int32)
    row_bits = torch.full((t, n), bits[-1], dtype=torch.uint8)
    for b in reversed(bits[:-1]):      # fewest widths last: it wins
        row_bits[span < 2 ** b] = b
    return v - lo.unsqueeze(-1), row_bits, lo


def count_node_widths(stats: dict, row_bits: Tensor) -> None:
    """Add ``{width: nodes}`` counts of ``row_bits`` (any shape) to ``stats``."""
    widths, counts = torch.unique(row_bits.cpu(), return_counts=True)
    for b, c in zip(widths.tolist(), counts.tolist()):
        stats[int(b)] = stats.get(int(b), 0) + int(c)


def check_node_rows(v: Tensor, row_bits: Tensor, row_offset: Tensor, v_bits: int) -> None:
    """``v`` [T, N, D] per-row codes below ``2^row_bits``, offsets uint8 [T, N], ``v + offset``
    on the ``v_bits`` grid."""
    t, n, _ = v.shape
    for name, x in (("row_bits", row_bits), ("row_offset", row_offset)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or tuple(x.shape) != (t, n):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise KernelArgumentError(f"{name} must be uint8 [{t}, {n}], got {got}")
    if v.numel() == 0 and row_offset.numel() == 0:
        return
    bad = [b for b in row_bits.unique().tolist() if b not in PACKABLE_BITS or b > v_bits]
    if bad:
        raise KernelArgumentError(f"row_bits holds widths {bad}: each must be one of {PACKABLE_BITS} and <= v_bits={v_bits}")
    if v.numel():
        top = (v.amax(-1).to(torch.int32) >= (1 << row_bits.to(torch.int32)))
        if bool(top.any()):
            raise KernelArgumentError("v holds a row's code >= 2^row_bits of that row")
        if int((v.amax(-1).to(torch.int32) + row_offset.to(torch.int32)).max()) >= 2 ** v_bits:
            raise KernelArgumentError(f"v + row_offset leaves the {v_bits}-bit grid")


def ref_qbmm(a: Tensor, v: Tensor, a_bits: int, v_bits: int, a_scale: float, a_offset: float,
             v_scale: float, v_offset: float, row_bits: Optional[Tensor] = None,
             row_offset: Optional[Tensor] = None) -> Tensor:
    """Quantized graph aggregation ``A @ V`` per task, both operands activations.

    Args:
        a: uint8 [T, N, N] codes of the normalised adjacency (offset a_offset, step a_scale).
        v: uint8 [T, N, D] codes of the node features (offset v_offset, step v_scale), or with
            ``row_bits`` / ``row_offset`` (uint8 [T, N], :func:`ref_node_rows`) per-node codes:
            node j's value is ``v_offset + v_scale * (v[j] + row_offset[j])``, its codes below
            ``2^row_bits[j]``, ``v_bits`` the width of the shared grid.
    Returns: float32 [T, N, D], the identity
        (sa*sv)*ACC + (sa*lv)*AS[t,i] + (la*sv)*VS[t,d] + (la*lv)*N
    evaluated centred (see :func:`ref_epilogue`): (za, da) = ref_zero_split(la, sa),
    (zv, dv) = ref_zero_split(lv, sv), then in int32 ACC' = ACC - zv*AS - za*VS + za*zv*N,
    AS' = AS - za*N, VS' = VS - zv*N, and in fp32, in this order,
        (sa*sv)*ACC' + (sa*dv)*AS'[t,i] + (da*sv)*VS'[t,d] + (da*dv)*N.
    Per-node codes enter ACC and VS as ``v + row_offset``: ACC += sum_j qa[i,j] offset[j],
    VS += sum_j offset[j] (int32), so the result equals the shared-grid aggregation exactly.
    """
    check_codes(a, "a", 3, a_bits)
    check_codes(v, "v", 3, v_bits)
    t, n, n2 = a.shape
    if n != n2 or v.shape[0] != t or v.shape[1] != n:
        raise KernelArgumentError(
            f"aggregation needs a [T, N, N] and v [T, N, D], got {tuple(a.shape)} and {tuple(v.shape)}")
    if (row_bits is None) != (row_offset is None):
        raise KernelArgumentError("row_bits and row_offset go together")
    if row_bits is not None:
        check_node_rows(v, row_bits, row_offset, v_bits)
    sa, la = check_scalar(a_scale, "a_scale", True), check_scalar(a_offset, "a_offset")
    sv, lv = check_scalar(v_scale, "v_scale", True), check_scalar(v_offset, "v_offset")
    acc, as_, vs = ref_bmm_acc(a, v)
    if row_offset is not None:
        off = row_offset.to(torch.int32)
        acc = acc + torch.bmm(a.to(torch.int64), off.to(torch.int64).unsqueeze(-1)).to(torch.int32)
        vs = vs + off.sum(-1, keepdim=True).to(torch.int32)
    f = lambda z: torch.tensor(z, dtype=torch.float32)  # noqa: E731  (fp32 values, as kernels use)
    za, da = ref_zero_split(f(la), f(sa))
    zv, dv = ref_zero_split(f(lv), f(sv))
    # centred identity (see ref_epilogue): roles a -> "weight" rows, v -> "activation" columns
    cnt = torch.tensor(n, dtype=torch.int32)
    accp = (acc.long() - za.long() * vs.long().unsqueeze(1) - zv.long() * as_.long().unsqueeze(-1)
            + za.long() * zv.long() * n).to(torch.int32)
    asp = (as_.long() - za.long() * n).to(torch.int32)   # sum_j (qa - za)  [T, N]
    vsp = (vs.long() - zv.long() * n).to(torch.int32)    # sum_j (qv - zv)  [T, D]
    return ((f(sa) * f(sv)) * accp.float()
            + (f(sa) * dv) * asp.float().unsqueeze(-1)
            + (da * f(sv)) * vsp.float().unsqueeze(1)
            + (da * dv) * cnt.float())
