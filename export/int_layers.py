"""Integer layers of an :class:`~qgnn_deploy.intmodel.IntModel` as ONNX ops.

Forms (``IntLayers(form=...)``; which runtimes run each: ``qgnn_deploy.export.FORM_RUNTIMES``):

``"integer"`` (bit-exact for real-valued *and* snapped offsets), channels-last
    Activations stay NHWC ([rows, channels]) between layers, so every conv and linear is
    one integer GEMM (3x3 convs: Pad with the activation zero point + one Gather im2col
    by a precomputed index; 1x1: the rows themselves):
    codes   = Clip(QuantizeLinear(x - l, s, 0))                         uint8
    offsets split as in ``ref_zero_split``: l = -z s + d (integer z, small fp32 d)
    ACC'    = sum over valid taps (qa - za)(qw - zw), int32, exact; weights centred to
              INT8 at load (onnxruntime's u8 x s8 VNNI/AVX2 GEMM, ~2.5x its u8 x u8 one);
              per-channel zw costs nothing
    AS'     = MatMulInteger(codes, ones, za)   only when a weight remainder dw != 0
    y = ((c1*ACC' + t2) + c3*AS') + t4      fp32, the reference's order; terms whose
              constant is exactly 0 (snapped offsets) are left out. ``c1*ACC' [+ t2]``
              comes straight out of the GEMM: onnxruntime's contrib MatMulIntegerToFloat
              (a_scale 1, b_scale c1 per column, bias t2 when it does not depend on the
              position) computes float(ACC') * c1 then + t2 in fp32, bit-identical to
              Cast -> Mul -> Add (tests), two passes fewer
    then y*post_scale + post_shift as one BatchNormalization (mean 0, var 1, eps 0:
    bit-identical to Mul then Add), +residual, LeakyRelu. MaxPool runs on the uint8
    codes of the next quantizer (quantizing is monotone, so it commutes with max
    exactly) as onnxruntime's contrib NhwcMaxPool. Reproduces the reference engine's
    codes bit for bit (tests).

``"fast"`` (the default, ``"auto"``): ``"integer"`` with, on snapped layers (da = dw = 0),
    the epilogue constants merged into the GEMM -- one MatMulIntegerToFloat computing
    ``float(ACC') * (c1 post_scale) + post_shift``: per conv, one GEMM writing fp32,
    [+ residual], LeakyRelu, Sub, QuantizeLinear, Clip. Codes may differ from the
    reference on fp32 rounding ties of the merged constants (measured on the shipped tiny
    models, 2/3/4-bit snapped, 5 tasks: 0 of 5.6 M codes, logits within 3e-8); layers with
    real offsets are emitted exactly as in ``"integer"``.

``"standard"``: ``"integer"`` in standard ONNX ops only (default domain, no contrib op), for
    runtimes other than onnxruntime: the GEMM output is Cast -> Mul -> Add (what
    MatMulIntegerToFloat computes, bit for bit) and MaxPool is a standard MaxPool on the
    fp32 values (NCHW between two Transposes) whose quantizers then read it. Reproduces
    the reference engine's codes bit for bit, as ``"integer"`` does.

``"qdq"`` (snapped offsets only, ``l = -z s``)
    QuantizeLinear(x, s, z) -> Clip to the n-bit range -> DequantizeLinear  (QCDQ)
    DequantizeLinear(weight codes at their true width, sw per channel, zw)
    float Conv / MatMul, then the same fp32 epilogue.
    The standard QDQ form other runtimes consume. onnxruntime fuses QCDQ into
    QLinearConv only when a QuantizeLinear follows the Conv; in this model BatchNorm,
    the residual add and LeakyReLU sit between each conv and the next quantizer, so it
    runs these convs in float (measured: see the ``bench`` numbers in the report).
    Agrees with the reference engine within fp32 rounding (rare ties).

Weights: unpacked from the canonical packing at export time, stored as UINT4 (4-bit,
opset >= 21) / UINT2 (2-bit, opset >= 25) initializers with ``weights_format="native"``
(Cast/Sub/Cast to centred INT8 feed MatMulInteger, which takes 8-bit types only;
onnxruntime folds them at load), 3- and 8-bit codes in UINT8 containers.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from onnx import TensorProto, helper

from qgnn_deploy.errors import ExportError
from qgnn_deploy.ops.packing import unpack_codes
from qgnn_deploy.ops.reference import ref_conv2d_acc, ref_zero_split

from .builder import DOUBLE, FLOAT, INT8, INT32, UINT8, GraphBuilder

#: ONNX element types able to store n-bit codes natively, and the opset they need
NATIVE_TYPES = {4: (TensorProto.UINT4, 21), 2: (TensorProto.UINT2, 25)}
SNAP_TOL = 1e-5  # relative: an offset counts as snapped when |l + z s| <= tol * s


def choose_opset(model, weights_format: str, form: str = "integer") -> int:
    """21, or 25 when native storage needs UINT2 (a 2-bit weight layer, integer form)."""
    if weights_format == "native" and form != "qdq" and any(getattr(m, "w_bits", 32) == 2 and hasattr(m, "w_packed")
                                          for _, m in model.named_layers()):
        return 25
    return 21


def _pack_subbyte(codes: np.ndarray, bits: int) -> bytes:
    """ONNX raw layout of UINT4 / UINT2: consecutive elements from the low bits up."""
    per = 8 // bits
    flat = codes.reshape(-1).astype(np.uint8)
    pad = (-flat.size) % per
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
    groups = flat.reshape(-1, per).astype(np.uint16)
    out = np.zeros(groups.shape[0], np.uint16)
    for i in range(per):
        out |= groups[:, i] << (bits * i)
    return out.astype(np.uint8).tobytes()


def _f32(x) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class IntLayers:
    """Emits the layers of an IntModel, by the float model's qualified names."""

    def __init__(self, g: GraphBuilder, model, form: str = "auto", weights_format: str = "native",
                 opset: int = 21):
        self.g, self.model = g, model
        #: "auto" is "fast": the fastest form in onnxruntime, and on layers with real
        #: offsets it is the integer form (bench/bench_onnx_export.py, tests)
        self.form = "fast" if form == "auto" else form
        #: "fast": the integer form with the fp32 epilogue constants of snapped layers
        #: merged (one scale and one shift per output: c1*post_scale, t*post_scale +
        #: post_shift) -- fewer memory passes, codes identical up to fp32 rounding ties
        #: (measured by ``--check``)
        self.merged = self.form == "fast"
        #: onnxruntime contrib ops (com.microsoft MatMulIntegerToFloat, NhwcMaxPool): part
        #: of every stock onnxruntime build, no custom op library, but no other runtime
        #: has them; "standard" is the integer form without them
        self.contrib = self.form in ("integer", "fast")
        #: activation layout between layers: the integer forms keep NHWC (rows of
        #: channels) so every conv is a MatMulInteger; the qdq form stays NCHW
        self.layout = "nchw" if self.form == "qdq" else "nhwc"
        self.weights_format, self.opset = weights_format, opset
        self.layers = dict(model.named_layers())
        self._qcache: Dict[Tuple, str] = {}
        #: lazy tensors: name -> (source, emit(tensor, is_codes) -> tensor) for layout ops
        #: that commute with the (monotone, elementwise) quantizer: a quantizer of a lazy
        #: tensor quantizes the source and applies the op to the uint8 codes
        self._lazy: Dict[str, Tuple[str, object]] = {}
        self._materialized: Dict[str, str] = {}
        #: layer name (":adj"/":nodes" for aggregations) -> uint8 code tensor in the graph
        self.code_tensors: Dict[str, str] = {}
        #: FP32 layer name -> (fp32 output tensor in the graph, its layout "nchw" / "last"):
        #: ``check_parity(resync=True)`` feeds these to the reference engine's FP32 layers,
        #: whose fp32 sums no second library reproduces bit for bit
        self.float_tensors: Dict[str, Tuple[str, str]] = {}
        if self.form == "qdq":
            for name, m in model.integer_layers().items():
                self._check_snapped(name, m)

    # ------------------------------------------------------------ bookkeeping
    def layer(self, name: str):
        if name not in self.layers:
            raise ExportError(f"layer {name!r}: not in the integer model")
        return self.layers[name]

    def layer_bits(self) -> Dict[str, Dict[str, int]]:
        out = {}
        for name, m in self.layers.items():
            if hasattr(m, "v_bits"):
                out[name] = {"a_bits": m.a_bits, "v_bits": m.v_bits}
            else:
                out[name] = {"w_bits": m.w_bits, "a_bits": m.a_bits}
        return out

    def _check_snapped(self, name: str, m) -> None:
        pairs = []
        if hasattr(m, "v_bits"):
            pairs = [(m.a_offset, m.a_scale, m.a_bits), (m.v_offset, m.v_scale, m.v_bits)]
        else:
            pairs = [(m.a_offset, m.a_scale, m.a_bits)]
            pairs += list(zip(m.w_offset.tolist(), m.w_scale.tolist(), [m.w_bits] * len(m.w_scale)))
        for l, s, bits in pairs:
            z = round(-l / s)
            if abs(l + z * s) > SNAP_TOL * s or not 0 <= z <= 255:
                raise ExportError(
                    f"layer {name!r}: offset {l:.6g} (step {s:.6g}) is not on the integer grid "
                    f"(zero point {-l / s:.4f}); the 'qdq' form needs a model folded with "
                    "zero_point='snap' -- use form='integer' for real-valued offsets")

    # ---------------------------------------------------------------- weights
    def weight_codes(self, name: str, m) -> np.ndarray:
        """Unpacked codes uint8: conv [O, C, kh, kw]; linear [O, K] in the NCHW flatten order."""
        k = m.reduction
        codes = unpack_codes(m.w_packed.cpu(), m.w_bits, k)
        if m.kind == "conv2d":
            kk = m.kernel_size
            codes = codes.view(m.out_channels, kk, kk, m.in_channels).permute(0, 3, 1, 2)
        elif getattr(m, "input_hwc", None) and self.layout != "nhwc":
            h, w, c = m.input_hwc
            # the fold ordered K as an NHWC flatten; this graph flattens NCHW
            codes = codes.view(m.out_features, h, w, c).permute(0, 3, 1, 2).reshape(m.out_features, k)
        return np.ascontiguousarray(_np(codes))

    def weight_initializer(self, name: str, codes: np.ndarray, bits: int, suffix: str = "weight_codes") -> Tuple[str, int]:
        """Store ``codes`` at their true width when allowed; returns (name, elem_type)."""
        tname = f"{name}.{suffix}"
        native = NATIVE_TYPES.get(bits)
        # onnxruntime 1.31 fuses DequantizeLinear(uint2) + MatMul into an invalid
        # MatMulIntegerToFloat: in the qdq form 2-bit codes stay in UINT8 containers
        if self.form == "qdq" and bits == 2:
            native = None
        if self.weights_format == "native" and native and self.opset >= native[1]:
            dtype = native[0]
            self.g.raw_initializer(helper.make_tensor(tname, dtype, list(codes.shape),
                                                      _pack_subbyte(codes, bits), raw=True))
            return tname, dtype
        return self.g.const(codes.astype(np.uint8), tname), UINT8

    # ----------------------------------------------------------- activations
    def quantize(self, x: str, l: float, s: float, bits: int) -> str:
        """fp32 x -> uint8 codes ``clamp(rne((x - l) / s), 0, 2^bits - 1)`` (cached per input)."""
        key = (x, float(l), float(s), int(bits))
        if key in self._qcache:
            return self._qcache[key]
        g = self.g
        if x in self._lazy:
            src, emit = self._lazy[x]
            q = emit(self.quantize(src, l, s, bits), True)
            self._qcache[key] = q
            return q
        # rne((x - l) / s) as the contract writes it, in every form: for a snapped offset
        # l = -z s, QuantizeLinear(x, s, z) = rne(x / s) + z rounds differently (tiny
        # 3-bit snapped: 4771 of 5.6 M codes off by up to 4, 3 of 25 predictions changed)
        d = g.op("Sub", [x, g.f32(_np(_f32(l)))], "minus_offset")
        q = g.op("QuantizeLinear", [d, g.f32(_np(_f32(s))), g.const(np.uint8(0))], "quantize")
        if bits < 8:
            q = g.op("Clip", [q, g.const(np.uint8(0)), g.const(np.uint8(2 ** bits - 1))], "clip")
        self._qcache[key] = q
        return q

    def qcdq(self, x: str, l: float, s: float, bits: int, record: Optional[str] = None) -> str:
        """fp32 x -> QuantizeLinear(u8, zero point z) -> Clip -> DequantizeLinear (snapped l)."""
        key = ("qcdq", x, float(l), float(s), int(bits))
        if key in self._qcache:
            if record:
                self.code_tensors[record] = self._qcache[key + ("codes",)]
            return self._qcache[key]
        g = self.g
        sc, zp = g.f32(_np(_f32(s))), g.const(np.uint8(round(-l / s)))
        q = g.op("QuantizeLinear", [x, sc, zp], "quantize")
        if bits < 8:
            q = g.op("Clip", [q, g.const(np.uint8(0)), g.const(np.uint8(2 ** bits - 1))], "clip")
        out = g.op("DequantizeLinear", [q, sc, zp], "dequantize")
        self._qcache[key] = out
        self._qcache[key + ("codes",)] = q
        if record:
            self.code_tensors[record] = q
        return out

    def dq_weight(self, name: str, m, codes: np.ndarray, axis: int) -> str:
        """DequantizeLinear of the stored codes with per-output-channel step and zero point."""
        tname, dtype = self.weight_initializer(name, codes, m.w_bits)
        zp = np.rint(-_np(m.w_offset) / _np(m.w_scale)).astype(np.uint8)
        if dtype == UINT8:
            zname = self.g.const(zp, f"{name}.weight_zero_point")
        else:
            zname = self.g.raw_initializer(helper.make_tensor(
                f"{name}.weight_zero_point", dtype, [zp.size], _pack_subbyte(zp, m.w_bits), raw=True))
        return self.g.op("DequantizeLinear", [tname, self.g.f32(_np(m.w_scale), f"{name}.weight_scale"), zname],
                         "dequantize_weight", axis=axis)

    # -------------------------------------------------------------- epilogue
    def epilogue(self, y: str, m, channel_shape: Tuple[int, ...], residual: Optional[str]) -> str:
        """``y * post_scale + post_shift``, + residual, LeakyRelu (channels on ``channel_shape``)."""
        g = self.g
        if self.contrib and channel_shape == (-1,) and m.post_scale is not None and m.post_shift is not None:
            # one pass in onnxruntime; the standard form keeps Mul then Add (same bits):
            # OpenVINO 2026.4 scrambles the Reshape back from BatchNormalization's rows
            y = self.channel_affine(y, m.post_scale, m.post_shift, m, "post_affine", "post_")
        else:
            if m.post_scale is not None:
                y = g.op("Mul", [y, g.f32(_np(m.post_scale).reshape(channel_shape), f"{m.name}.post_scale")],
                         "post_scale")
            if m.post_shift is not None:
                y = g.op("Add", [y, g.f32(_np(m.post_shift).reshape(channel_shape), f"{m.name}.post_shift")],
                         "post_shift")
        return self.residual_and_slope(y, m, residual)

    def channel_affine(self, y: str, scale, shift, m, hint: str, prefix: str = "") -> str:
        """``y * scale + shift`` per last-axis channel in one pass: BatchNormalization with
        mean 0, var 1, epsilon 0 computes exactly that (1/sqrt(1) == 1; bit-identical to
        Mul then Add, checked by the tests); it wants channels on axis 1: [rows, O]."""
        g = self.g
        o = int(scale.numel())
        rows = g.op("Reshape", [y, g.i64([-1, o])], "rows")
        bn = g.op("BatchNormalization", [rows, g.f32(_np(scale), f"{m.name}.{prefix}scale"),
                                         g.f32(_np(shift), f"{m.name}.{prefix}shift"),
                                         g.f32(np.zeros(o, np.float32), f"const/zeros_{o}"),
                                         g.f32(np.ones(o, np.float32), f"const/ones_{o}")],
                  hint, epsilon=0.0)
        return g.op("Reshape", [bn, g.op("Shape", [y], "shape")], "unrows")

    def residual_and_slope(self, y: str, m, residual: Optional[str]) -> str:
        g = self.g
        if residual is not None:
            y = g.op("Add", [y, residual], "residual")
        if m.slope is not None:
            y = g.op("LeakyRelu", [y], "lrelu", alpha=float(m.slope))
        return y

    def zero_split_act(self, m):
        """(remainder d fp32, zero point z int32) of the activation offset (ref_zero_split)."""
        z, d = ref_zero_split(_f32(m.a_offset), _f32(m.a_scale))
        return d, z

    def zero_split_w(self, m):
        z, d = ref_zero_split(m.w_offset, m.w_scale)
        return z, d

    # --------------------------------------------------- integer form (NHWC rows)
    def mmi_weight(self, name: str, m, codes_ko: np.ndarray) -> Tuple[str, Optional[str]]:
        """The B operand [K, O] of MatMulInteger and its zero point (None: centred).

        Preferred: the *centred* codes ``qw - zw`` as INT8 (exact; per-channel zero points
        disappear and onnxruntime runs its u8 x s8 dot-product GEMM -- VNNI / AVX2 --,
        2-3x faster than u8 x u8). The graph stores the codes at their true width and
        computes ``Cast(int8)(Cast(int32)(codes) - zw)``, which onnxruntime folds at load.
        u8 x s8 GEMMs without VNNI add pairs of products in int16 (vpmaddubsw saturates),
        so this form is used only when ``2 * (2^a_bits - 1) * max|qw - zw| <= 32767``;
        otherwise uint8 codes with a per-column zero point (u8 x u8, exact)."""
        g = self.g
        zw = _np(self.zero_split_w(m)[0]).astype(np.int32)
        cen = codes_ko.astype(np.int32) - zw[None, :]
        tname, dtype = self.weight_initializer(name, codes_ko, m.w_bits)
        amax = 2 ** m.a_bits - 1
        if cen.size and cen.min() >= -128 and cen.max() <= 127 and 2 * amax * int(np.abs(cen).max()) <= 32767:
            w = g.op("Cast", [tname], "weight_i32", to=INT32)
            w = g.op("Sub", [w, g.const(zw, f"{name}.weight_zero_point")], "weight_centred")
            return g.op("Cast", [w], "weight_i8", to=INT8), None
        w = tname if dtype == UINT8 else g.op("Cast", [tname], "weight_u8", to=UINT8)
        return w, g.const(zw.astype(np.uint8), f"{name}.weight_zero_point")

    def integer_gemm(self, a: str, m, codes_ko: np.ndarray) -> Tuple[str, Optional[str]]:
        """``ACC' = sum (qa - za)(qw - zw)`` [..., O] int32 (MatMulInteger, exact) and
        ``AS' = sum (qa - za)`` [..., 1] (only when a weight offset remainder dw != 0)."""
        g = self.g
        za = int(self.zero_split_act(m)[1])
        za_t = g.const(np.uint8(za), f"{m.name}.act_zero_point")
        w, zw_t = self.mmi_weight(m.name, m, codes_ko)
        acc = g.op("MatMulInteger", [a, w, za_t] + ([zw_t] if zw_t else []), "acc")
        as_ = None
        if bool((self.zero_split_w(m)[1] != 0).any()):
            ones = g.const(np.ones((codes_ko.shape[0], 1), np.int8), f"{m.name}.ones")
            as_ = g.op("MatMulInteger", [a, ones, za_t], "act_sum")
        return acc, as_

    def affine_constants(self, m, ws: torch.Tensor, cnt: torch.Tensor):
        """``(c1, t2, c3, t4)`` of ref_epilogue's centred identity: c1 = sw*sa,
        t2 = (sw*da)*WS', c3 = dw*sa, t4 = (dw*da)*CNT with WS' = WS - zw*CNT; ``ws``
        [..., O] and ``cnt`` [..., 1] are the (border-dependent) WS and CNT."""
        sw, sa = m.w_scale.float(), _f32(m.a_scale)
        da, _ = self.zero_split_act(m)
        zw, dw = self.zero_split_w(m)
        wsp = (ws.long() - zw.long() * cnt.long()).to(torch.int32)
        return sw * sa, (sw * da) * wsp.float(), dw * sa, (dw * da) * cnt.float()

    def affine(self, acc: str, as_: Optional[str], m, ws: torch.Tensor, cnt: torch.Tensor) -> str:
        """``((c1*ACC' + t2) + c3*AS') + t4`` in ref_epilogue's order (see
        :meth:`affine_constants`), over channels-last tensors. Terms whose constant is
        exactly zero (snapped offsets: da = dw = 0) are left out: adding +0.0 changes
        nothing but the sign of a zero, which no later op or quantizer tells apart."""
        g = self.g
        c1, t2, c3, t4 = self.affine_constants(m, ws, cnt)
        has_t2 = bool((t2 != 0).any())
        y = self._gemm_to_float(acc, c1, t2 if has_t2 and t2.dim() == 1 else None, m)
        if y is None:
            y = g.op("Mul", [g.op("Cast", [acc], "acc_f32", to=FLOAT), g.f32(_np(c1), f"{m.name}.c_acc")],
                     "scale_acc")
            if has_t2:
                y = g.op("Add", [y, g.f32(_np(t2), f"{m.name}.t_wsum")], "add_wsum")
        elif has_t2 and t2.dim() != 1:
            y = g.op("Add", [y, g.f32(_np(t2), f"{m.name}.t_wsum")], "add_wsum")
        if as_ is not None:
            t3 = g.op("Mul", [g.op("Cast", [as_], "asum_f32", to=FLOAT), g.f32(_np(c3), f"{m.name}.c_asum")],
                      "scale_asum")
            y = g.op("Add", [y, t3], "add_asum")
        if bool((t4 != 0).any()):
            y = g.op("Add", [y, g.f32(_np(t4), f"{m.name}.t_count")], "add_count")
        return y

    def finish(self, acc: str, as_: Optional[str], m, ws, cnt, residual: Optional[str]) -> str:
        """Accumulators -> the layer's fp32 output (channels last), epilogue included."""
        # the merged epilogue only for snapped layers (da = dw = 0: y = c1*ACC'); with real
        # offsets merging the border terms into the shift measurably flips codes
        snapped = as_ is None and float(self.zero_split_act(m)[0]) == 0.0
        if self.merged and snapped:
            return self._merged_epilogue(acc, m, ws, cnt, residual)
        return self.epilogue(self.affine(acc, as_, m, ws, cnt), m, (-1,), residual)

    def _gemm_to_float(self, acc: str, scale: torch.Tensor, bias: Optional[torch.Tensor], m,
                       hint: str = "gemm_scale") -> Optional[str]:
        """Rewrite the MatMulInteger producing ``acc`` into onnxruntime's contrib
        MatMulIntegerToFloat: ``float(ACC') * scale [+ bias]`` computed in the GEMM's output
        pass, per output column (a_scale = 1, so a_scale * b_scale is ``scale`` exactly).
        onnxruntime evaluates it as an fp32 product then an fp32 sum -- bit-identical to
        Cast -> Mul -> Add (checked by the tests) -- and saves two passes over the
        accumulators. Returns None when ``acc`` is not a MatMulInteger output or the
        contrib ops are disabled."""
        if not self.contrib:
            return None
        node = next((n for n in reversed(self.g.nodes) if acc in n.output), None)
        if node is None or node.op_type != "MatMulInteger" or node.output[0] != acc:
            return None
        if any(n is not node and acc in n.input for n in self.g.nodes):
            return None
        g = self.g
        scale = scale.float().reshape(-1)
        a, b, za = node.input[0], node.input[1], node.input[2]
        zb = node.input[3] if len(node.input) > 3 else ""
        g.nodes.remove(node)
        ins = [a, b, g.f32(np.float32(1.0), "const/one_f32"),
               g.f32(_np(scale), f"{m.name}.{hint}_scale"), za, zb]
        if bias is not None:
            ins.append(g.f32(_np(bias.float().reshape(-1)), f"{m.name}.{hint}_bias"))
        return g.op("MatMulIntegerToFloat", ins, hint, domain="com.microsoft")

    def _merged_epilogue(self, acc: str, m, ws, cnt, residual: Optional[str]) -> str:
        """The "fast" form of a snapped layer (da = dw = 0, no AS' term): ``y = ACC' * (c1 ps)
        + shift`` with the post affine (folded BN) merged in, one MatMulIntegerToFloat, or
        one BatchNormalization (mean 0, var 1, epsilon 0: x * scale + bias in one pass)
        where the contrib op is not used; then + residual, LeakyRelu."""
        g = self.g
        c1, t2, _, t4 = self.affine_constants(m, ws, cnt)
        ps = m.post_scale.float() if m.post_scale is not None else torch.ones_like(c1)
        sh = m.post_shift.float() if m.post_shift is not None else torch.zeros_like(c1)
        o = int(c1.numel())
        # t2 and t4 are zeros here (da = dw = 0): the shift is the same at every position
        shift = ((t2 + t4) * ps + sh).reshape(-1, o)[0]
        scale = c1 * ps
        y = self._gemm_to_float(acc, scale, shift, m, "gemm_affine")
        if y is None:
            y = self.channel_affine(g.op("Cast", [acc], "acc_f32", to=FLOAT), scale, shift, m, "affine")
        return self.residual_and_slope(y, m, residual)

    def im2col(self, q: str, m, hw: Tuple[int, int], pad_value) -> Tuple[str, int, int]:
        """NHWC [B, H, W, C] -> patches [B, Ho, Wo, k*k*C] in (kh, kw, C) order: Pad with
        ``pad_value`` (codes: the activation zero point, so padded taps add 0 to ACC' and AS';
        fp32: 0.0), then one Gather of whole C-rows by a precomputed index."""
        g = self.g
        k, st, pad, c = m.kernel_size, m.stride, m.padding, m.in_channels
        h, w = hw
        ho, wo = (h + 2 * pad - k) // st + 1, (w + 2 * pad - k) // st + 1
        if pad:
            q = g.op("Pad", [q, g.i64([0, pad, pad, 0, 0, pad, pad, 0]),
                             g.const(pad_value, f"{m.name}.pad_value")], "pad", mode="constant")
        hp, wp = h + 2 * pad, w + 2 * pad
        flat = g.op("Reshape", [q, g.i64([0, hp * wp, c])], "rows")
        oy, ox = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
        ki, kj = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        idx = (oy.reshape(-1, 1) * st + ki.reshape(1, -1)) * wp + (ox.reshape(-1, 1) * st + kj.reshape(1, -1))
        col = g.op("Gather", [flat, g.i64(idx, f"{m.name}.im2col_index")], "im2col", axis=1)
        return g.op("Reshape", [col, g.i64([0, ho, wo, k * k * c])], "patches"), ho, wo

    def _conv_nhwc(self, m, x: str, residual: Optional[str], hw) -> str:
        """x NHWC fp32 [B, H, W, C] -> NHWC fp32 [B, Ho, Wo, O]: MatMulInteger on rows."""
        g = self.g
        k, st, pad = m.kernel_size, m.stride, m.padding
        q = self.code_tensors[m.name] = self.quantize(x, m.a_offset, m.a_scale, m.a_bits)
        za = int(self.zero_split_act(m)[1])
        codes = _np(unpack_codes(m.w_packed.cpu(), m.w_bits, m.reduction))   # [O, K] (kh, kw, C)
        codes_ko = np.ascontiguousarray(codes.T)
        if k == 1 and pad == 0:
            if st != 1:
                q = g.op("Slice", [q, g.i64([0, 0]), g.i64([2 ** 31 - 1] * 2), g.i64([1, 2]), g.i64([st, st])],
                         "stride")
            acc, as_ = self.integer_gemm(q, m, codes_ko)
            ws = torch.from_numpy(codes_ko).to(torch.int32).sum(0)            # [O]
            cnt = torch.tensor([m.in_channels], dtype=torch.int32)
            return self.finish(acc, as_, m, ws, cnt, residual)
        if hw is None:
            raise ExportError(f"layer {m.name!r}: padded conv needs its input size to precompute "
                              "the border terms")
        patches, _, _ = self.im2col(q, m, hw, np.uint8(za))
        acc, as_ = self.integer_gemm(patches, m, codes_ko)
        zero = torch.zeros(1, hw[0], hw[1], m.in_channels, dtype=torch.uint8)
        _, _, ws, cnt = ref_conv2d_acc(zero, torch.from_numpy(codes), k, k, st, pad)  # [Ho,Wo,O], [Ho,Wo]
        return self.finish(acc, as_, m, ws, cnt.unsqueeze(-1), residual)

    def lazy(self, src: str, emit, hint: str) -> str:
        name = self.g.fresh(f"{hint}_lazy")
        self._lazy[name] = (src, emit)
        return name

    def from_nchw(self, y_nchw: str) -> str:
        """An NHWC view of an NCHW fp32 tensor, built lazily: a quantizer of it quantizes
        the NCHW tensor and transposes the uint8 codes (4x less data than the fp32)."""
        return self.lazy(y_nchw, lambda t, codes: self.g.op("Transpose", [t], "to_nhwc", perm=[0, 2, 3, 1]),
                         "nhwc")

    def flatten(self, x: str) -> str:
        """Flatten(axis=1) of an NHWC tensor (the (h, w, C) order the fold uses), lazily."""
        return self.lazy(x, lambda t, codes: self.g.op("Flatten", [t], "flatten", axis=1), "flatten")

    def maxpool(self, x: str, kernel: int, stride: int, pad: int, hw: Tuple[int, int]) -> str:
        """MaxPool of an NHWC fp32 tensor, built lazily: quantizing commutes with max
        (the quantizer is monotone, ``q(max x) == max q(x)`` exactly), so a quantizer of the
        pooled tensor pools the uint8 codes instead (4x less data); only a float consumer
        (the GAP of the last block) pools in fp32. Without contrib ops: a standard MaxPool
        on the fp32 values (NCHW between two Transposes), which its quantizers then read."""
        g = self.g
        if not self.contrib:
            y = g.op("Transpose", [self.materialize(x)], "to_nchw", perm=[0, 3, 1, 2])
            y = g.op("MaxPool", [y], "maxpool", kernel_shape=[kernel, kernel], strides=[stride, stride],
                     pads=[pad] * 4)
            return g.op("Transpose", [y], "to_nhwc", perm=[0, 2, 3, 1])

        def emit(t: str, codes: bool) -> str:
            if codes:
                # onnxruntime's channels-last uint8 max pool (contrib NhwcMaxPool, one pass);
                # padding never wins a max over codes >= 0, so it equals padding with code 0
                return g.op("NhwcMaxPool", [t], "maxpool_codes", domain="com.microsoft",
                            kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4)
            low = g.f32(-np.inf, "const/minus_inf")
            return self._pool(t, kernel, stride, pad, hw, low)
        return self.lazy(x, emit, "maxpool")

    def _pool(self, x: str, kernel: int, stride: int, pad: int, hw, low: str) -> str:
        """Separable max pooling of NHWC ``x``: along W then along H (strided Slices + Max);
        ``low`` pads (-inf for fp32, code 0 for codes)."""
        g = self.g
        h, w = hw
        ho, wo = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
        if pad:
            x = g.op("Pad", [x, g.i64([0, pad, pad, 0, 0, pad, pad, 0]), low], "pool_pad", mode="constant")
        for axis, n_out in ((2, wo), (1, ho)):
            taps = [g.op("Slice", [x, g.i64([i]), g.i64([i + stride * (n_out - 1) + 1]), g.i64([axis]),
                                   g.i64([stride])], "pool_tap") for i in range(kernel)]
            x = g.op("Max", taps, "pool_max") if len(taps) > 1 else taps[0]
        return x

    def materialize(self, x: str) -> str:
        """The fp32 tensor behind a (possibly lazy) name."""
        if x not in self._lazy:
            return x
        if x not in self._materialized:
            src, emit = self._lazy[x]
            self._materialized[x] = emit(self.materialize(src), False)
        return self._materialized[x]

    # ------------------------------------------------------------------ layers
    def conv(self, name: str, x: str, bn: Optional[str] = None, slope: Optional[float] = None,
             residual: Optional[str] = None, hw: Optional[Tuple[int, int]] = None) -> str:
        """x float [B, C, H, W] -> float [B, O, Ho, Wo] (epilogue included), in ``self.layout``
        (NHWC: [B, H, W, C] -> [B, Ho, Wo, O], ``hw`` the input's size for padded convs).
        ``bn`` / ``slope`` name the float model's parts (the FloatLayers signature): folded
        into the integer layer, ignored here."""
        m = self.layer(name)
        if residual is not None and not getattr(m, "residual", False):
            raise ExportError(f"layer {name!r}: the graph adds a residual but the layer does not")
        if m.kind == "conv2d_fp32":
            return self._float_conv(m, x, residual, hw)
        if m.kind != "conv2d":
            raise ExportError(f"layer {name!r}: expected a conv layer, found {type(m).__name__}")
        if self.layout == "nhwc":
            return self._conv_nhwc(m, x, residual, hw)
        # the qdq form (NCHW): QCDQ activations, dequantized weights, a float Conv
        k, st, pad = m.kernel_size, m.stride, m.padding
        xd = self.qcdq(x, m.a_offset, m.a_scale, m.a_bits, record=name)
        y = self.g.op("Conv", [xd, self.dq_weight(name, m, self.weight_codes(name, m), axis=0)], "conv",
                      kernel_shape=[k, k], strides=[st, st], pads=[pad] * 4)
        return self.epilogue(y, m, (-1, 1, 1), residual)

    def _f64_matmul(self, x: str, w_ko: np.ndarray, bias, name: str) -> str:
        """x float [..., K] @ w [K, O] (+ bias), products summed in float64 and rounded once:
        the FP32 layers' contract (ops/episode_ops.py), so onnxruntime's summation order
        cannot flip a downstream code (its Conv has no float64 kernel; its MatMul has)."""
        g = self.g
        y = g.op("MatMul", [g.op("Cast", [x], "to_f64", to=DOUBLE),
                            g.const(np.ascontiguousarray(w_ko, dtype=np.float64), f"{name}.weight_t64")],
                 "matmul_f64")
        if bias is not None:
            y = g.op("Add", [y, g.const(_np(bias).astype(np.float64), f"{name}.bias64")], "bias_f64")
        return g.op("Cast", [y], "to_f32", to=FLOAT)

    def _float_conv(self, m, x: str, residual: Optional[str], hw: Optional[Tuple[int, int]] = None) -> str:
        g = self.g
        k = m.kernel_size
        if self.layout == "nhwc":
            # channels-last rows (im2col patches for k > 1) times the (kh, kw, C)-ordered weight
            x = self.materialize(x)
            if not (k == 1 and m.padding == 0 and m.stride == 1):
                if hw is None:
                    raise ExportError(f"layer {m.name!r}: an FP32 conv needs its input size")
                x, _, _ = self.im2col(x, m, hw, np.float32(0.0))
            w = _np(m.weight).transpose(0, 2, 3, 1).reshape(m.out_channels, -1).T   # [K, O]
            y = self._f64_matmul(x, w, m.bias, m.name)
            return self._record_float(m, self.epilogue(y, m, (-1,), residual), "last")
        ins = [x, g.f32(_np(m.weight), f"{m.name}.weight")]
        if m.bias is not None:
            ins.append(g.f32(_np(m.bias), f"{m.name}.bias"))
        y = g.op("Conv", ins, "conv", kernel_shape=[k, k], strides=[m.stride] * 2,
                 pads=[m.padding] * 4)
        return self._record_float(m, self.epilogue(y, m, (-1, 1, 1), residual), "nchw")

    def _record_float(self, m, y: str, layout: str) -> str:
        self.float_tensors[m.name] = (y, layout)
        return y

    def linear(self, name: str, x: str, bn: Optional[str] = None, slope: Optional[float] = None,
               residual: Optional[str] = None) -> str:
        """x float [..., K] -> float [..., O] (epilogue included)."""
        m = self.layer(name)
        g = self.g
        if m.kind == "linear_fp32":
            w = _np(m.weight)
            if getattr(m, "input_hwc", None) and self.layout != "nhwc":
                h, wd, c = m.input_hwc
                w = w.reshape(-1, h, wd, c).transpose(0, 3, 1, 2).reshape(w.shape[0], -1)
            if self.layout == "nhwc":
                y = self._f64_matmul(self.materialize(x), w.T, m.bias, name)
            else:
                y = g.op("MatMul", [self.materialize(x), g.f32(np.ascontiguousarray(w.T), f"{name}.weight_t")],
                         "matmul")
                if m.bias is not None:
                    y = g.op("Add", [y, g.f32(_np(m.bias), f"{name}.bias")], "bias")
            return self._record_float(m, self.epilogue(y, m, (-1,), residual), "last")
        if m.kind != "linear":
            raise ExportError(f"layer {name!r}: expected a linear layer, found {type(m).__name__}")
        codes_t = np.ascontiguousarray(self.weight_codes(name, m).T)  # [K, O]
        if self.form == "qdq":
            xd = self.qcdq(x, m.a_offset, m.a_scale, m.a_bits, record=name)
            y = g.op("MatMul", [xd, self.dq_weight(name, m, codes_t, axis=1)], "matmul")
            return self.epilogue(y, m, (-1,), residual)
        q = self.code_tensors[name] = self.quantize(x, m.a_offset, m.a_scale, m.a_bits)
        acc, as_ = self.integer_gemm(q, m, codes_t)
        ws = torch.from_numpy(codes_t).to(torch.int32).sum(0)            # [O]
        cnt = torch.tensor([m.in_features], dtype=torch.int32)
        return self.finish(acc, as_, m, ws, cnt, residual)

    def bmm(self, name: str, adj: str, nodes: str, nodes_shape: Optional[Sequence[int]] = None) -> str:
        """adj [T, ..., n, n] @ nodes [T, ..., n, D], both quantized -> fp32 [T, ..., n, D]: each
        graph on its own. ``nodes_shape``: the nodes' per-task shape ``(..., n, D)`` (EGNN: G graphs
        of M nodes, ``(G, M, D)``); default ``(N, D)``, one graph of the episode's N nodes."""
        m = self.layer(name)
        g = self.g
        lead, n = ((), self.model.config.num_nodes) if nodes_shape is None else (
            tuple(nodes_shape[:-2]), int(nodes_shape[-2]))
        cols = len(lead) + 2   # the last axis of [T, *lead, n, D]
        rows = cols - 1        # its node axis
        if m.kind == "bmm_fp32":
            if self.layout == "nhwc":  # float64 sums, as FloatAggregation
                y = g.op("MatMul", [g.op("Cast", [adj], "adj_f64", to=DOUBLE),
                                    g.op("Cast", [nodes], "nodes_f64", to=DOUBLE)], "aggregate_f64")
                return self._record_float(m, g.op("Cast", [y], "to_f32", to=FLOAT), "last")
            return self._record_float(m, g.op("MatMul", [adj, nodes], "aggregate"), "last")
        if self.form == "qdq":
            a = self.qcdq(adj, m.a_offset, m.a_scale, m.a_bits, record=f"{name}:adj")
            v = self.qcdq(nodes, m.v_offset, m.v_scale, m.v_bits, record=f"{name}:nodes")
            return g.op("MatMul", [a, v], "aggregate")
        qa = self.code_tensors[f"{name}:adj"] = self.quantize(adj, m.a_offset, m.a_scale, m.a_bits)
        qv = self.code_tensors[f"{name}:nodes"] = self.quantize(nodes, m.v_offset, m.v_scale, m.v_bits)
        sa, la, sv, lv = _f32(m.a_scale), _f32(m.a_offset), _f32(m.v_scale), _f32(m.v_offset)
        za, da = ref_zero_split(la, sa)
        zv, dv = ref_zero_split(lv, sv)
        za_t = g.const(np.uint8(int(za)), f"{name}.adj_zero_point")
        zv_t = g.const(np.uint8(int(zv)), f"{name}.nodes_zero_point")
        if m.node_bits:
            # per-node codes (ref_node_rows): q = qv - row minimum; the minimum's products come
            # back as one more integer product with the [T, N, 1] offsets
            off = g.op("ReduceMin", [qv, g.i64([cols], f"axes/{cols}")], "node_row_offset",
                       keepdims=1)                                                      # [T, ..., n, 1]
            qv = g.op("Sub", [qv, off], "node_row_codes")
            acc = g.op("MatMulInteger", [qa, qv, za_t, zv_t], "aggregate_integer")   # sum (qa-za)(q-zv)
            acc = g.op("Add", [acc, g.op("MatMulInteger", [qa, off, za_t, g.const(np.uint8(0))],
                                         "aggregate_offsets")], "aggregate_integer_rows")
        else:
            acc = g.op("MatMulInteger", [qa, qv, za_t, zv_t], "aggregate_integer")   # sum (qa-za)(qv-zv)
        as_ = g.op("ReduceSum", [g.op("Cast", [qa], "adj_i32", to=INT32), g.i64([cols], f"axes/{cols}")],
                   "adj_row_sum", keepdims=1)                              # [T, ..., n, 1]
        as_ = g.op("Sub", [as_, g.const(np.int32(int(za) * n))], "adj_row_sum_c")
        vs = g.op("ReduceSum", [g.op("Cast", [qv], "nodes_i32", to=INT32), g.i64([rows], f"axes/{rows}")],
                  "nodes_col_sum", keepdims=1)                             # [T, ..., 1, D]
        if m.node_bits:
            vs = g.op("Add", [vs, g.op("ReduceSum", [g.op("Cast", [off], "offsets_i32", to=INT32),
                                                     g.i64([rows], f"axes/{rows}")], "offsets_sum",
                                                    keepdims=1)],
                      "nodes_col_sum_rows")
        vs = g.op("Sub", [vs, g.const(np.int32(int(zv) * n))], "nodes_col_sum_c")

        def term(t: str, c: torch.Tensor, hint: str) -> str:
            return g.op("Mul", [g.op("Cast", [t], f"{hint}_f32", to=FLOAT),
                                g.f32(_np(c), f"{name}.c_{hint}")], f"scale_{hint}")
        y = g.op("Add", [term(acc, sa * sv, "acc"), term(as_, sa * dv, "adj_sum")], "add_adj_sum")
        y = g.op("Add", [y, term(vs, da * sv, "node_sum")], "add_node_sum")
        cnt = torch.tensor(n, dtype=torch.int32)
        return g.op("Add", [y, g.f32(_np((da * dv) * cnt.float()), f"{name}.t_count")], "add_count")
