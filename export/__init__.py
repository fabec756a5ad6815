"""ONNX export of QGNN-IC models (installs as ``qgnn_deploy.export``).

``export_onnx(model, path, **options)`` writes the *whole episode* -- backbone, graph
generations, edge updates, aggregation and prediction -- as one ONNX graph that stock
onnxruntime runs (no custom op library)::

    images float32 [tasks, N, 3, S, S], support_labels int64 [tasks, way*shot]
        -> logits float32 [tasks, queries, way]        (``tasks`` is a dynamic axis;
                                                         one query per class: queries = way)

Route: direct graph building with ``onnx.helper`` (not the dynamo exporter with a
``custom_translation_table``). Why:

* the integer layers need initializers of exact ONNX element types (UINT4 at opset 21,
  UINT2 at opset 25, 3-bit codes in UINT8) and constants precomputed per layer (the
  border terms WS/CNT of docs/integer-contract.md, the fp32 epilogue products in the
  reference's order). The custom ops carry weights as *packed* uint8 tensors; a
  translation function would have to unpack bit streams inside the graph or rely on
  constant folding, and onnxscript offers no say over the stored width;
* ``QGNNModel.forward`` validates its input with data-dependent checks and builds the
  initial graph from labels: tracing needs workarounds, and the result's node names and
  layout are the exporter's, not ours; here every node is named ``<layer>/<op>``;
* the IR version, opset, metadata and the dynamic ``tasks`` axis are set explicitly
  in one place, and anything we cannot express raises :class:`ExportError` naming the
  layer before a file is written.

The integer forms emit the integer model's own episode description (``IntModel.episode``
against the episode-op vocabulary, the one the compiled plan lowers: :mod:`.episode_ops`),
so a model family (DPGN, EGNN) is described once for the plan, the eager engines and ONNX.
DPGN's float export and the ``qdq`` form (DPGN only) build the float model's NCHW graph
(:mod:`.episode`); EGNN's float export emits its folded FP32 model through the episode ops.
Layer emitters: :mod:`.float_layers` (FP32 models: DPGN's NCHW graph, and folded FP32 models
for the episode ops) and :mod:`.int_layers` (integer model, four
forms: ``"integer"`` -- channels-last activations, every conv a MatMulInteger with int32
accumulators and the contract's fp32 epilogue, exact for real-valued and snapped
offsets --, ``"fast"`` -- the same with merged epilogue constants on snapped layers --,
``"standard"`` -- the integer form without onnxruntime's contrib ops -- and ``"qdq"`` --
QCDQ activations and DequantizeLinear weights around float Conv / MatMul, NCHW, the
standard QDQ form for snapped offsets). ``integer`` and ``fast`` use com.microsoft contrib
ops (MatMulIntegerToFloat, NhwcMaxPool), so only onnxruntime runs them; ``standard`` and
``qdq`` use the default ONNX domain only. See :func:`export_onnx` and :func:`portability`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from qgnn_deploy.errors import ConfigError, ExportError

WEIGHT_FORMATS = ("native", "uint8")
FORMS = ("auto", "integer", "fast", "standard", "qdq")
#: which runtimes run each form (``export --check`` reports it with the file's op domains)
FORM_RUNTIMES = {
    "integer": "onnxruntime only (com.microsoft contrib ops MatMulIntegerToFloat, NhwcMaxPool)",
    "fast": "onnxruntime only (com.microsoft contrib ops MatMulIntegerToFloat, NhwcMaxPool)",
    "standard": "any ONNX runtime: default-domain ops only (MatMulInteger, QuantizeLinear, MaxPool, ...; "
                "opset 21, 25 with UINT2 weights; --weights-format uint8 avoids UINT4/UINT2 tensors); "
                "measured: onnxruntime (exact), OpenVINO 2026.4 with f32 precision (snapped offsets "
                "within 1e-7 of the reference; its quantizer fusion breaks exactness on real-valued "
                "offsets; UINT2 refused)",
    "float": "any ONNX runtime with the standard opset (the FP32 export)",
    "qdq": "any runtime that reads standard QDQ (QuantizeLinear / DequantizeLinear around float "
           "Conv / MatMul); measured: onnxruntime, OpenVINO 2026.4",
}
DEFAULT_OPSET = 21
#: bumped whenever the emitted graph changes for the same model and options (the onnx
#: backend's cache key includes it): 2 = MatMulIntegerToFloat / NhwcMaxPool, auto = fast;
#: 4 = the episode's sigmoid as float64 Exp / Div (onnxruntime's float64 Sigmoid underflows);
#: 5 = fast form: snapped quantizers as Sub + QuantizeLinear like the other forms
EXPORT_FORMAT = 5


@dataclass
class ExportOptions:
    """Options of :func:`export_onnx`.

    form: integer layers as ``"integer"`` (channels-last MatMulInteger + the contract's
        fp32 epilogue, exact for any offsets), ``"fast"`` (the same, epilogue constants
        merged on snapped layers: codes identical up to fp32 ties), ``"standard"`` (the
        integer form in standard ONNX ops only, for runtimes without onnxruntime's contrib
        ops; exact), ``"qdq"`` (QCDQ + float conv; snapped offsets only), or ``"auto"``
        (``"fast"``: the fastest in onnxruntime; measured against the reference engine:
        0 code mismatches on resnet12-cifarfs and on the shipped tiny models, logits within
        3e-8).
        ``integer`` / ``fast`` run in onnxruntime only (``portability`` in the result).
    weights_format: ``"native"``: weight codes at their true width where ONNX has the
        type (UINT4 for 4-bit at opset >= 21, UINT2 for 2-bit at opset >= 25; 3-bit in
        UINT8); ``"uint8"``: every code in a UINT8 container.
    opset: ONNX opset (21 default; 25 when ``weights_format="native"`` and a layer has
        2-bit weights, unless given).
    zero_point: how to fold a fake-quant :class:`QGNNModel` first (``"exact"`` or
        ``"snap"``); ignored for FP32 models and integer models.
    """

    form: str = "auto"
    weights_format: str = "native"
    opset: Optional[int] = None
    zero_point: str = "exact"

    def validate(self) -> "ExportOptions":
        if self.form not in FORMS:
            raise ConfigError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.weights_format not in WEIGHT_FORMATS:
            raise ConfigError(f"weights_format must be one of {WEIGHT_FORMATS}, got {self.weights_format!r}")
        if self.zero_point not in ("exact", "snap"):
            raise ConfigError(f"zero_point must be 'exact' or 'snap', got {self.zero_point!r}")
        from .builder import IR_FOR_OPSET
        if self.opset is not None and self.opset not in IR_FOR_OPSET:
            raise ConfigError(f"opset must be one of {sorted(IR_FOR_OPSET)} "
                              f"(onnxruntime 1.31 runs opset <= 26), got {self.opset!r}")
        return self


def _is_int_model(model) -> bool:
    try:
        from qgnn_deploy.intmodel import IntModel
    except ImportError:
        return False
    return isinstance(model, IntModel)


def _is_quantized(model) -> bool:
    from qgnn_deploy.models import has_quantized_layers
    return has_quantized_layers(model)


def build_onnx(model, **options: Any):
    """The ONNX ``ModelProto`` of ``model`` (see :func:`export_onnx`); nothing is written.

    Returns ``(model_proto, info)``; ``info`` holds what the export chose (kind, form,
    opset, weights_format, per-layer bits)."""
    import onnx

    from qgnn_deploy import __version__
    from qgnn_deploy.models import EGNNModel, QGNNModel

    from .builder import GraphBuilder
    from .episode import EpisodeGraph

    opts = ExportOptions(**options).validate()
    if isinstance(model, (QGNNModel, EGNNModel)) and _is_quantized(model):
        model = _fold(model, opts.zero_point)
    g = GraphBuilder("qgnn_episode")
    if isinstance(model, QGNNModel):
        from .float_layers import FloatLayers
        config = model.config
        layers = FloatLayers(g, model)
        kind, form, bits = "fp32", "float", {}
        layout = layers.layout
        opset = opts.opset or DEFAULT_OPSET
    elif isinstance(model, EGNNModel):
        # no float twin of EGNN's episode description: the folded FP32 model, emitted op by op
        from .float_layers import FoldedFloatLayers
        model = _fold(model, "exact")
        config = model.config
        layers = FoldedFloatLayers(g, model)
        kind, form, bits = "fp32", "float", {}
        layout = layers.layout
        opset = opts.opset or DEFAULT_OPSET
    elif _is_int_model(model):
        from .int_layers import IntLayers, choose_opset
        config = model.config
        if model.family != "dpgn" and opts.form == "qdq":
            raise ExportError(f"form 'qdq' exports dpgn models only (it is built from DPGN's float NCHW "
                              f"graph, export/episode.py); export this {model.family} model with form "
                              "'integer', 'fast' or 'standard'")
        opset = opts.opset or choose_opset(model, opts.weights_format, opts.form)
        layers = IntLayers(g, model, form=opts.form, weights_format=opts.weights_format,
                           opset=opset)
        kind, form, bits = "integer", layers.form, layers.layer_bits()
        layout = layers.layout
    else:
        raise ExportError(f"cannot export a {type(model).__name__}: expected a QGNNModel or an EGNNModel "
                          "(FP32 or fake-quant) or an IntModel")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        if layout == "nhwc":
            # the model's own episode description (integer forms, folded FP32 EGNN), op by op
            from .builder import FLOAT
            from .episode_ops import OnnxEpisodeOps
            ops = OnnxEpisodeOps(g, config, layers)
            images, graph = ops.episode_inputs()
            logits = model.episode(ops, images, graph).logits          # [T, queries, way]
            g.add_output(logits.name, "logits", FLOAT, ["tasks", *logits.shape])
        else:
            EpisodeGraph(g, config, layers).build(getattr(model, "generations", None))
    finally:
        model.train(was_training)
    info = {"kind": kind, "form": form, "opset": opset, "portability": portability(g.nodes, form),
            "weights_format": opts.weights_format if kind == "integer" else "fp32",
            "layer_bits": bits, "code_tensors": dict(getattr(layers, "code_tensors", {})),
            "float_tensors": dict(getattr(layers, "float_tensors", {}))}
    meta = {"qgnn_deploy.version": __version__, "qgnn_deploy.kind": kind,
            "qgnn_deploy.form": form, "qgnn_deploy.weights_format": info["weights_format"],
            "qgnn_deploy.config": config.to_dict(), "qgnn_deploy.layer_bits": bits,
            "qgnn_deploy.zero_point": model.zero_point if kind == "integer" else "n/a",
            "qgnn_deploy.layout": layout}
    proto = g.model(opset, meta, doc=f"qgnn-deploy {__version__} {kind} export ({form})")
    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as e:  # our bug, but never write a broken file
        raise ExportError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    return proto, info


def portability(nodes, form: str) -> Dict[str, Any]:
    """Which runtimes run an export of ``form`` made of ``nodes``: the op domains it uses,
    its non-standard (contrib) ops, and the runtimes known to run the form."""
    contrib = sorted({n.op_type for n in nodes if n.domain not in ("", "ai.onnx")})
    return {"domains": sorted({n.domain or "ai.onnx" for n in nodes}), "contrib_ops": contrib,
            "standard_ops_only": not contrib, "runtimes": FORM_RUNTIMES[form]}


def _fold(model, zero_point: str):
    try:
        from qgnn_deploy.fold import fold
    except ImportError as e:
        raise ExportError(f"exporting a fake-quant model needs the fold ({e}); export an FP32 "
                          "model or a .qgnn integer model") from None
    return fold(model, zero_point=zero_point)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (a reader never
    sees half a model), creating the parent folder."""
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def export_onnx(model, path: str, **options: Any) -> Dict[str, Any]:
    """Export ``model`` to the ONNX file ``path`` (written atomically).

    Args:
        model: an FP32 :class:`~qgnn_deploy.models.QGNNModel` (exported as float), a
            fake-quant one (folded with ``zero_point`` first), or an
            :class:`~qgnn_deploy.intmodel.IntModel` (integer export).
        path: output file.
        **options: fields of :class:`ExportOptions` (``form``, ``weights_format``,
            ``opset``, ``zero_point``).
    Returns: a dict with ``path``, ``bytes`` and what the export chose (``kind``,
        ``form``, ``opset``, ``ir_version``, ``weights_format``, ``layer_bits``).
    Raises: :class:`ExportError` naming the layer for anything ONNX cannot express;
        no file is written then.
    """
    proto, info = build_onnx(model, **options)
    data = proto.SerializeToString()
    write_bytes_atomic(path, data)
    info.update(path=path, bytes=len(data), ir_version=proto.ir_version)
    return info


def read_metadata(path: str) -> Dict[str, Any]:
    """The ``qgnn_deploy.*`` metadata of an exported file, JSON values decoded."""
    import onnx
    m = onnx.load(path, load_external_data=False)
    out = {}
    for p in m.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except ValueError:
            out[p.key] = p.value
    return out


__all__ = ["export_onnx", "build_onnx", "ExportOptions", "read_metadata", "portability", "WEIGHT_FORMATS", "FORMS",
           "FORM_RUNTIMES", "EXPORT_FORMAT"]
