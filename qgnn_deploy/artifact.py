"""The ``.qgnn`` artifact: one safetensors file holding a folded :class:`IntModel`.

Layout::

    safetensors file
      tensors   "{layer}.{attr}"  e.g. "backbone.layer1.0.conv2.w_packed"  (uint8 packed codes),
                ".w_scale"/".w_offset" (fp32 [O], per-channel weights only), ".post_scale",
                ".post_shift" (fp32 [O], folded BN/bias), FP32 layers' ".weight"/".bias"
      metadata  "qgnn.header"         JSON (below), compact
                "qgnn.header_sha256"  SHA-256 of that JSON text (catches edited/bit-flipped headers)

    header = {"format": "qgnn-deploy/int-model", "format_version": 1,
              "package_version": "0.1.0", "config": config.to_dict() (ModelConfig, or
              models.egnn.EGNNConfig whose dict carries "family": "egnn"),
              "generations": K, "zero_point": "exact"|"snap",
              "packing": "lsb-stream-k8" (ops.packing.PackFormat),
              "layers": [{"name", "kind", bits, quantizer parameters, geometry,
                          "tensors": {attr: [dtype, shape]}}, ...],
              "tensor_sha256": SHA-256 over every tensor's bytes in sorted key order}

Per-tensor weight quantizers store ``w_scale``/``w_offset`` as header numbers (the
IntModel broadcasts them to [O]); JSON numbers round-trip fp32 values exactly.

Bits are recorded twice and must agree (loading checks it): each layer record's
``w_bits``/``a_bits`` (aggregation: ``a_bits`` adjacency, ``v_bits`` nodes) and the config's
``layer_bits`` ``{name: {"w", "a"}}`` (mixed precision, docs/mixed-precision.md; older
files' ``{name: bits}`` read as w = a) over its default ``bits``.

Loading reads the whole file once, checks the safetensors framing itself before any
allocation (header length against the file size, every tensor's byte range inside the
data region), the header hash, format and version, every tensor's dtype and shape
against the header, the data hash, and that no tensor is missing or extra; any
failure raises :class:`~qgnn_deploy.errors.ArtifactError` naming the file and the
problem. It never returns a partial model.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import ArtifactError, ConfigError, QGNNError

FORMAT = "qgnn-deploy/int-model"
FORMAT_VERSION = 1
HEADER_KEY = "qgnn.header"
HEADER_HASH_KEY = "qgnn.header_sha256"
#: safetensors' own parser refuses headers above 100 MB; ours are a few KB
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

_DTYPES = {"U8": torch.uint8, "F32": torch.float32, "I32": torch.int32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_DTYPE_SIZE = {"U8": 1, "F32": 4, "I32": 4}


# ---------------------------------------------------------------- records

def _layer_record(m: nn.Module) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(JSON-able description, tensors) of one IntModel layer."""
    from .intmodel import (FloatAggregation, FloatConv2d, FloatLinear, IntAggregation, IntConv2d,
                           IntLinear)
    rec: Dict[str, Any] = {"name": m.name, "kind": m.kind}
    tensors: Dict[str, torch.Tensor] = {}

    def opt(attr: str) -> None:
        t = getattr(m, attr)
        if t is not None:
            tensors[attr] = t

    if isinstance(m, (IntConv2d, IntLinear)):
        rec.update(w_bits=m.w_bits, a_bits=m.a_bits, a_scale=m.a_scale, a_offset=m.a_offset,
                   slope=m.slope, out_quant=None if m.out_quant is None else list(m.out_quant),
                   w_granularity=m.w_granularity)
        if isinstance(m, IntConv2d):
            rec.update(in_channels=m.in_channels, out_channels=m.out_channels,
                       kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                       residual=m.residual)
        else:
            rec.update(in_features=m.in_features, out_features=m.out_features,
                       input_hwc=None if m.input_hwc is None else list(m.input_hwc))
        tensors["w_packed"] = m.w_packed
        if m.w_granularity == "tensor":
            rec.update(w_scale=float(m.w_scale[0]), w_offset=float(m.w_offset[0]))
        else:
            tensors["w_scale"], tensors["w_offset"] = m.w_scale, m.w_offset
        opt("post_scale")
        opt("post_shift")
    elif isinstance(m, IntAggregation):
        rec.update(a_bits=m.a_bits, v_bits=m.v_bits, a_scale=m.a_scale, a_offset=m.a_offset,
                   v_scale=m.v_scale, v_offset=m.v_offset)
        if m.node_bits:
            rec["node_bits"] = list(m.node_bits)
    elif isinstance(m, (FloatConv2d, FloatLinear)):
        rec.update(slope=m.slope)
        if isinstance(m, FloatConv2d):
            rec.update(stride=m.stride, padding=m.padding, residual=m.residual)
        else:
            rec.update(input_hwc=None if m.input_hwc is None else list(m.input_hwc))
        tensors["weight"] = m.weight
        for attr in ("bias", "post_scale", "post_shift"):
            opt(attr)
    elif isinstance(m, FloatAggregation):
        pass
    else:  # pragma: no cover - IntModel only holds the types above
        raise ArtifactError(f"cannot serialise layer {m.name} of type {type(m).__name__}")
    rec["tensors"] = {k: [_DTYPE_NAMES[t.dtype], list(t.shape)] for k, t in tensors.items()}
    return rec, tensors


def _need(rec: Dict[str, Any], key: str, kind: type, where: str):
    if key not in rec:
        raise ArtifactError(f"{where}: header lacks {key!r}")
    v = rec[key]
    if kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise ArtifactError(f"{where}: {key} must be a finite number, got {v!r}")
        return float(v)
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ArtifactError(f"{where}: {key} must be an integer, got {v!r}")
        return v
    if not isinstance(v, kind):
        raise ArtifactError(f"{where}: {key} must be {kind.__name__}, got {v!r}")
    return v


def _bits(rec, key, where) -> int:
    from .ops.packing import PACKABLE_BITS
    b = _need(rec, key, int, where)
    if b not in PACKABLE_BITS:
        raise ArtifactError(f"{where}: {key}={b} is not a supported bit-width {PACKABLE_BITS}")
    return b


def _node_bits(rec, where) -> tuple:
    from .config import check_node_bits
    nb = rec.get("node_bits", [])
    if not isinstance(nb, list):
        raise ArtifactError(f"{where}: node_bits must be a list, got {type(nb).__name__}")
    try:
        return check_node_bits(nb, f"{where}: node_bits") if nb else ()
    except ConfigError as e:
        raise ArtifactError(str(e)) from None


def _scale(rec, key, where) -> float:
    s = _need(rec, key, float, where)
    if not s > 0:
        raise ArtifactError(f"{where}: {key} must be > 0, got {s}")
    return s


def _opt_number(rec, key, where) -> Optional[float]:
    return None if rec.get(key) is None else _need(rec, key, float, where)


def _expect(tensors: Dict[str, torch.Tensor], attr: str, shape: Tuple[int, ...], where: str,
            dtype=torch.float32, optional: bool = False) -> Optional[torch.Tensor]:
    t = tensors.get(attr)
    if t is None:
        if optional:
            return None
        raise ArtifactError(f"{where}: tensor {attr!r} is missing")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ArtifactError(f"{where}.{attr}: expected {dtype} {list(shape)}, found {t.dtype} {list(t.shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ArtifactError(f"{where}.{attr} holds NaN or Inf")
    return t


def _input_hwc(rec: Dict[str, Any], features: int, where: str) -> Optional[List[int]]:
    """A linear layer's (h, w, C) input shape (NHWC flatten order), checked against K."""
    hwc = rec.get("input_hwc")
    if hwc is not None and (not isinstance(hwc, list) or len(hwc) != 3
                            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in hwc)
                            or hwc[0] * hwc[1] * hwc[2] != features):
        raise ArtifactError(f"{where}: input_hwc {hwc!r} does not match in_features={features}")
    return hwc


def _layer_from_record(rec: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> nn.Module:
    from .intmodel import (FloatAggregation, FloatConv2d, FloatLinear, IntAggregation, IntConv2d,
                           IntLinear)
    from .ops.packing import packed_row_bytes
    name = _need(rec, "name", str, "layer")
    kind = _need(rec, "kind", str, name)
    where = f"layer {name}"
    if kind in ("conv2d", "linear"):
        w_bits, a_bits = _bits(rec, "w_bits", where), _bits(rec, "a_bits", where)
        if kind == "conv2d":
            cin, o = _need(rec, "in_channels", int, where), _need(rec, "out_channels", int, where)
            k, st, pad = (_need(rec, key, int, where) for key in ("kernel_size", "stride", "padding"))
            if min(cin, o, k, st) < 1 or pad < 0:
                raise ArtifactError(f"{where}: bad conv geometry in the header")
            red = k * k * cin
        else:
            red, o = _need(rec, "in_features", int, where), _need(rec, "out_features", int, where)
            if min(red, o) < 1:
                raise ArtifactError(f"{where}: bad linear shape in the header")
        gran = _need(rec, "w_granularity", str, where)
        if gran == "tensor":
            w_scale = torch.full((o,), _scale(rec, "w_scale", where))
            w_offset = torch.full((o,), _need(rec, "w_offset", float, where))
        elif gran == "channel":
            w_scale = _expect(tensors, "w_scale", (o,), where)
            w_offset = _expect(tensors, "w_offset", (o,), where)
            if not bool((w_scale > 0).all()):
                raise ArtifactError(f"{where}.w_scale must be > 0")
        else:
            raise ArtifactError(f"{where}: unknown w_granularity {gran!r}")
        oq = rec.get("out_quant")
        if oq is not None:
            if not (isinstance(oq, list) and len(oq) == 3):
                raise ArtifactError(f"{where}: out_quant must be [l, s, bits]")
            oq_rec = {"l": oq[0], "s": oq[1], "bits": oq[2]}
            oq = (_need(oq_rec, "l", float, where), _scale(oq_rec, "s", where), _bits(oq_rec, "bits", where))
        common = dict(
            w_packed=_expect(tensors, "w_packed", (o, packed_row_bytes(red, w_bits)), where, torch.uint8),
            w_bits=w_bits, a_bits=a_bits, w_scale=w_scale, w_offset=w_offset,
            a_scale=_scale(rec, "a_scale", where), a_offset=_need(rec, "a_offset", float, where),
            post_scale=_expect(tensors, "post_scale", (o,), where, optional=True),
            post_shift=_expect(tensors, "post_shift", (o,), where, optional=True),
            slope=_opt_number(rec, "slope", where), out_quant=oq, w_granularity=gran)
        if kind == "conv2d":
            return IntConv2d(name, cin, o, k, st, pad, residual=bool(rec.get("residual", False)), **common)
        return IntLinear(name, red, o, input_hwc=_input_hwc(rec, red, where), **common)
    if kind == "bmm":
        return IntAggregation(name, _bits(rec, "a_bits", where), _bits(rec, "v_bits", where),
                              _scale(rec, "a_scale", where), _need(rec, "a_offset", float, where),
                              _scale(rec, "v_scale", where), _need(rec, "v_offset", float, where),
                              _node_bits(rec, where))
    if kind in ("conv2d_fp32", "linear_fp32"):
        w = tensors.get("weight")
        if w is None or w.dtype != torch.float32 or w.dim() != (4 if kind == "conv2d_fp32" else 2):
            raise ArtifactError(f"{where}: FP32 weight missing or of the wrong dtype/rank")
        w = _expect(tensors, "weight", tuple(w.shape), where)
        o = w.shape[0]
        vec = {a: _expect(tensors, a, (o,), where, optional=True) for a in ("bias", "post_scale", "post_shift")}
        slope = _opt_number(rec, "slope", where)
        if kind == "conv2d_fp32":
            stride, padding = _need(rec, "stride", int, where), _need(rec, "padding", int, where)
            if w.shape[2] != w.shape[3] or stride < 1 or padding < 0:
                raise ArtifactError(f"{where}: bad FP32 conv geometry (kernel {list(w.shape[2:])}, "
                                    f"stride {stride}, padding {padding})")
            return FloatConv2d(name, w, vec["bias"], stride, padding, vec["post_scale"],
                               vec["post_shift"], slope, bool(rec.get("residual", False)))
        return FloatLinear(name, w, vec["bias"], vec["post_scale"], vec["post_shift"], slope,
                           _input_hwc(rec, w.shape[1], where))
    if kind == "bmm_fp32":
        return FloatAggregation(name)
    raise ArtifactError(f"{where}: unknown layer kind {kind!r}")


# ------------------------------------------------------------------- save

def _digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_header(model, tensors_out: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """The artifact header of ``model``; fills ``tensors_out`` with the tensors to store."""
    from . import __version__
    from .ops.packing import PackFormat
    layers: List[Dict[str, Any]] = []
    for name, m in model.named_layers():
        rec, tensors = _layer_record(m)
        layers.append(rec)
        for attr, t in tensors.items():
            tensors_out[f"{name}.{attr}"] = t.detach().cpu().contiguous()
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
            "config": model.config.to_dict(), "generations": model.generations,
            "zero_point": model.zero_point, "packing": PackFormat.LSB_STREAM_K8.value,
            "layers": layers, "tensor_sha256": _digest(tensors_out)}


def save_int_model(model, path: str) -> int:
    """Write ``model`` (an IntModel) to ``path`` atomically; returns the file size in bytes."""
    from safetensors.torch import save
    tensors: Dict[str, torch.Tensor] = {}
    header = build_header(model, tensors)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False)
    blob = save(tensors, metadata={HEADER_KEY: text,
                                   HEADER_HASH_KEY: hashlib.sha256(text.encode()).hexdigest()})
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return len(blob)


# ------------------------------------------------------------------- load

def _frame(data: bytes, path: str) -> Tuple[Dict[str, Any], int]:
    """Validate the safetensors framing; return (its JSON header, data start offset)."""
    size = len(data)
    if size < 8:
        raise ArtifactError(f"{path!r} is truncated: {size} bytes, not even a safetensors header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
        raise ArtifactError(f"{path!r} is truncated or corrupt: its header claims {n} bytes but the "
                            f"file has {size} bytes in all")
    try:
        st_header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path!r}: corrupt safetensors header ({e})") from None
    if not isinstance(st_header, dict):
        raise ArtifactError(f"{path!r}: corrupt safetensors header (not an object)")
    body = size - 8 - n
    end_max = 0
    for key, info in st_header.items():
        if key == "__metadata__":
            continue
        try:
            dt, shape, (b0, b1) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError
                numel *= d
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path!r}: corrupt safetensors entry for tensor {key!r}") from None
        if dt not in _DTYPE_SIZE:
            raise ArtifactError(f"{path!r}: tensor {key!r} has dtype {dt}, not one a .qgnn file uses")
        if not (isinstance(b0, int) and isinstance(b1, int) and 0 <= b0 <= b1 <= body):
            raise ArtifactError(f"{path!r} is truncated or corrupt: tensor {key!r} spans bytes "
                                f"[{b0}, {b1}) of a {body}-byte data region")
        if b1 - b0 != numel * _DTYPE_SIZE[dt]:
            raise ArtifactError(f"{path!r}: tensor {key!r} claims shape {shape} ({dt}) but spans "
                                f"{b1 - b0} bytes")
        end_max = max(end_max, b1)
    if end_max != body:
        raise ArtifactError(f"{path!r}: {body - end_max} unexpected trailing bytes after the tensors "
                            "(corrupt or appended to)")
    return st_header, 8 + n


def read_header(path: str) -> Dict[str, Any]:
    """The verified JSON header of a .qgnn file (no tensors are built)."""
    return _read(path)[0]


def _read(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    if not os.path.isfile(path):
        raise ArtifactError(f"integer model {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    st_header, _ = _frame(data, path)
    meta = st_header.get("__metadata__")
    if not isinstance(meta, dict) or HEADER_KEY not in meta:
        raise ArtifactError(f"{path!r} is a safetensors file but not a qgnn-deploy integer model "
                            f"(no {HEADER_KEY!r} metadata)")
    text = meta[HEADER_KEY]
    if hashlib.sha256(str(text).encode()).hexdigest() != meta.get(HEADER_HASH_KEY):
        raise ArtifactError(f"{path!r}: the model header does not match its checksum (edited or corrupt)")
    try:
        header = json.loads(text)
    except ValueError as e:
        raise ArtifactError(f"{path!r}: unreadable model header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(f"{path!r}: not a {FORMAT} file (format {header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path!r} has format version {version!r}; this qgnn-deploy reads version "
                            f"{FORMAT_VERSION}: re-fold the checkpoint with this version")
    from .ops.packing import PackFormat
    if header.get("packing") not in {p.value for p in PackFormat}:
        raise ArtifactError(f"{path!r}: unknown packing layout {header.get('packing')!r}")
    # declared tensors (from our header) must be exactly the stored ones, same dtype and shape
    layers = header.get("layers")
    if not isinstance(layers, list):
        raise ArtifactError(f"{path!r}: header has no layer list")
    declared: Dict[str, Tuple[str, List[int]]] = {}
    names = set()
    for rec in layers:
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str) or not isinstance(rec.get("tensors"), dict):
            raise ArtifactError(f"{path!r}: malformed layer record {str(rec)[:80]}")
        if rec["name"] in names:
            raise ArtifactError(f"{path!r}: layer {rec['name']!r} appears twice in the header")
        names.add(rec["name"])
        for attr, spec in rec["tensors"].items():
            if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
                    and isinstance(spec[1], list)
                    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec[1])):
                raise ArtifactError(f"{path!r}: layer {rec['name']!r} declares tensor {attr!r} as "
                                    f"{str(spec)[:60]}; expected [dtype, [non-negative dims]]")
            declared[f"{rec['name']}.{attr}"] = (spec[0], list(spec[1]))
    stored = {k: (v["dtype"], list(v["shape"])) for k, v in st_header.items() if k != "__metadata__"}
    missing, extra = sorted(set(declared) - set(stored)), sorted(set(stored) - set(declared))
    if missing or extra:
        raise ArtifactError(f"{path!r}: tensors missing {missing[:5]} / unexpected {extra[:5]}")
    wrong = [f"{k}: header {declared[k]} vs file {stored[k]}" for k in declared if declared[k] != stored[k]]
    if wrong:
        raise ArtifactError(f"{path!r}: tensor dtype/shape differs from the header: {wrong[:3]}")
    from safetensors.torch import load
    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
        raise ArtifactError(f"{path!r}: corrupt tensor data ({type(e).__name__}: {e})") from None
    if _digest(tensors) != header.get("tensor_sha256"):
        raise ArtifactError(f"{path!r}: tensor data does not match its checksum (corrupt file)")
    return header, tensors


def _quantizable_names(config) -> List[str]:
    """The quantizable layer names of ``config``'s model (either family)."""
    from .intmodel import family_of
    if family_of(config).name == "dpgn":
        from .bits_config import quantizable_layer_names
        return quantizable_layer_names(config)
    from .models.egnn import build_egnn
    from .models.qgnn import quantizable_layers
    with torch.device("meta"):  # names only: no weights allocated, the RNG untouched
        model = build_egnn(config.replace(bits=32, layer_bits={}))
    return list(quantizable_layers(model))


def _config_from_header(d):
    """The model config of a header: ``family`` "egnn" -> models.egnn.EGNNConfig, absent or
    "dpgn" -> ModelConfig (every DPGN artifact)."""
    from .config import ModelConfig
    if not isinstance(d, dict):
        return ModelConfig.from_dict(d)  # raises ConfigError naming the problem
    family = d.get("family", "dpgn")
    if family == "egnn":
        from .models.egnn import EGNNConfig
        return EGNNConfig.from_dict(d)
    if family != "dpgn":
        raise ArtifactError(f"unknown model family {family!r} in the header (known: dpgn, egnn)")
    return ModelConfig.from_dict({k: v for k, v in d.items() if k != "family"})


def _check_layer_bits(config, layers: Dict[str, nn.Module]) -> None:
    """Every quantizable layer's record has the bits its config resolves to."""
    from .intmodel import layer_bits
    for name in _quantizable_names(config):
        if name in layers and layer_bits(layers[name]) != config.bits_for(name):
            got, want = layer_bits(layers[name]), config.bits_for(name)
            raise ArtifactError(f"layer {name} holds w={got.w} a={got.a} bits but the header's config "
                                f"says w={want.w} a={want.a}")


def load_int_model(path: str, backend: Optional[str] = None):
    """Load a .qgnn file as an :class:`~qgnn_deploy.intmodel.IntModel` (or raise ArtifactError)."""
    from .intmodel import IntModel
    from .ops.bounds import check_int_model
    header, tensors = _read(path)
    try:
        config = _config_from_header(header.get("config"))
        layers = {}
        for rec in header["layers"]:
            prefix = rec["name"] + "."
            own = {k[len(prefix):]: v for k, v in tensors.items()
                   if k.startswith(prefix) and "." not in k[len(prefix):]}
            layers[rec["name"]] = _layer_from_record(rec, own)
        gens = header.get("generations")
        if isinstance(gens, bool) or not isinstance(gens, int):
            raise ArtifactError(f"generations must be an integer, got {gens!r}")
        model = IntModel(config, layers, generations=gens, zero_point=header.get("zero_point"),
                         backend=backend)
        _check_layer_bits(config, layers)
        check_int_model(model)  # int32 accumulators cannot overflow for any layer it holds
    except ArtifactError as e:
        raise ArtifactError(f"{path!r}: {e}") from None
    except QGNNError as e:
        raise ArtifactError(f"{path!r}: invalid model description: {e}") from None
    model.artifact_header = header
    return model.eval()


def expected_artifact_bytes(model) -> Dict[str, int]:
    """The size budget of DESIGN/issue 4: packed weight bits / 8 + FP32 parameters x 4.

    ``packed``: sum(weight params x w_bits) / 8 over integer layers; ``fp32``: FP32 layer
    weights and biases plus the per-channel fp32 vectors (folded BN = the BN affine
    parameters, per-channel quantizer ranges).
    """
    packed = fp32 = 0
    for _, m in model.named_layers():
        _, tensors = _layer_record(m)
        for attr, t in tensors.items():
            if attr == "w_packed":
                o = t.shape[0]
                packed += o * (m.reduction * m.w_bits) // 8
            else:
                fp32 += t.numel() * 4
    return {"packed": packed, "fp32": fp32, "total": packed + fp32}


__all__ = ["save_int_model", "load_int_model", "read_header", "expected_artifact_bytes",
           "FORMAT", "FORMAT_VERSION"]
