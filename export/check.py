"""Parity of an integer ONNX export with the reference engine (``export --check``).

Runs the export in onnxruntime next to the :class:`~qgnn_deploy.intmodel.IntModel` on
the ``reference`` op backend, episode batch by episode batch, and compares

* logits: max |diff|, share of queries with the same prediction (docs/integer-contract.md:
  <= 1e-3 and >= 99.9%);
* every quantized layer's input codes: the graph's code tensors are added as extra
  outputs of a private copy of the model and compared with the codes the reference
  layers consume (count of differing elements, largest difference), and the first layer
  in graph order whose codes differ;
* optionally (``float_tensors``) the same with the reference's FP32 layers resynced to the
  export's fp32 outputs, separating what the export computes from the float noise of
  two libraries' conv sums (see :func:`check_parity`).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from qgnn_deploy.ops.reference import ref_quantize


def _with_code_outputs(proto: onnx.ModelProto, code_tensors: Dict[str, str]) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    have = {o.name for o in m.graph.output}
    for t in dict.fromkeys(code_tensors.values()):
        if t not in have:
            m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.UINT8, None))
    return m.SerializeToString()


def _reference_codes(int_model) -> Tuple[Dict[str, torch.Tensor], list]:
    """Install hooks recording the codes each integer layer consumes (NHWC / rows)."""
    from qgnn_deploy.intmodel import IntAggregation, IntConv2d, IntLinear
    codes: Dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in int_model.integer_layers().items():
        if isinstance(layer, IntAggregation):
            def hook(mod, args, name=name):
                adj, nodes = args[0], args[1]
                codes[f"{name}:adj"] = ref_quantize(adj.float().contiguous(), mod.a_offset, mod.a_scale, mod.a_bits)
                codes[f"{name}:nodes"] = ref_quantize(nodes.float().contiguous(), mod.v_offset, mod.v_scale, mod.v_bits)
        elif isinstance(layer, (IntConv2d, IntLinear)):
            def hook(mod, args, name=name):
                x = args[0]
                if x.dtype != torch.uint8:
                    x = ref_quantize(x.float().contiguous(), mod.a_offset, mod.a_scale, mod.a_bits)
                codes[name] = x
        else:  # pragma: no cover
            continue
        handles.append(layer.register_forward_pre_hook(hook))
    return codes, handles


def _align(name: str, layer, onnx_codes: np.ndarray, ref: torch.Tensor,
           layout: str = "nchw") -> Tuple[np.ndarray, np.ndarray]:
    r = ref.cpu().numpy()
    if layout == "nhwc":                                          # the reference's own layout
        o = onnx_codes
    elif getattr(layer, "kind", "") == "conv2d":
        o = onnx_codes.transpose(0, 2, 3, 1)                      # NCHW -> NHWC
    elif getattr(layer, "input_hwc", None):
        h, w, c = layer.input_hwc                                 # reference: NHWC flatten
        r = r.reshape(-1, h, w, c).transpose(0, 3, 1, 2)
        o = onnx_codes
    else:
        o = onnx_codes
    return o.reshape(-1), r.reshape(-1)


def _with_outputs(proto: onnx.ModelProto, code_tensors: Dict[str, str],
                  float_tensors: Dict[str, Tuple[str, str]]) -> bytes:
    m = onnx.ModelProto()
    m.ParseFromString(_with_code_outputs(proto, code_tensors))
    have = {o.name for o in m.graph.output}
    for t, _ in dict.fromkeys(tuple(v) for v in float_tensors.values()):
        if t not in have:
            have.add(t)
            m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    return m.SerializeToString()


def _resync_hooks(int_model, float_tensors: Dict[str, Tuple[str, str]], res: Dict[str, np.ndarray]) -> list:
    """Forward hooks making the reference engine's FP32 layers return the export's fp32
    outputs (same values, the reference's layout), chunk by chunk along the batch axis."""
    layers = dict(int_model.named_layers())
    handles = []
    for name, (tensor, layout) in float_tensors.items():
        if name not in layers:
            continue
        y = res[tensor]
        if layout == "nchw":
            y = y.transpose(0, 2, 3, 1)                              # the reference's NHWC
        state = {"off": 0, "y": np.ascontiguousarray(y)}

        def hook(mod, args, out, state=state, name=name):
            want = state["y"].reshape((-1,) + tuple(out.shape[1:])) if out.dim() else state["y"]
            off = state["off"]
            if off + out.shape[0] > want.shape[0]:
                raise AssertionError(f"{name}: the export's fp32 output has {want.shape[0]} rows, "
                                     f"the reference consumed {off + out.shape[0]}")
            state["off"] = off + out.shape[0]
            return torch.from_numpy(want[off:off + out.shape[0]].copy()).to(out.dtype).reshape(out.shape)
        handles.append(layers[name].register_forward_hook(hook))
    return handles


def _bar(max_diff: float, agreement: float, mismatches: int, elements: int, code_max: int) -> bool:
    """docs/integer-contract.md: logits within 1e-3, >= 99.9% same predictions, codes off on at
    most 0.1% of elements and by at most 1."""
    return bool(max_diff <= 1e-3 and agreement >= 0.999
                and mismatches <= 0.001 * max(elements, 1) and code_max <= 1)


def check_parity(int_model, proto: onnx.ModelProto, code_tensors: Dict[str, str],
                 batches: Iterable, threads=None,
                 float_tensors: Optional[Dict[str, Tuple[str, str]]] = None) -> Dict[str, object]:
    """Compare the export (``proto``) with ``int_model`` on the reference backend.

    ``batches`` yields ``(images [T, N, 3, S, S], support_labels [T, NS], ...)``.
    Returns a JSON-ready dict: ``episodes``, ``queries``, ``agreement``,
    ``identical_predictions``, ``max_logit_diff``, ``code_elements``,
    ``code_mismatches``, ``code_max_diff``, ``code_mismatch_layers`` (worst 10),
    ``first_mismatch_layer`` (the first layer in graph order whose input codes differ, or
    None) and ``passed`` (the docs/integer-contract.md bar on the free-running engines).

    ``float_tensors`` (``build_onnx``'s ``info["float_tensors"]``): also run the
    reference with its FP32 layers (the stem conv, the last edge-MLP convs, bits=32
    layers) *resynced* to the export's fp32 outputs, reported under ``"resynced"`` with
    the same keys. Two libraries sum a float conv in different orders (last-ulp
    differences on most elements); where such a value sits on a quantizer's rounding
    boundary its code flips, and a low-bit model can amplify one flip into lost episode
    parity. The resynced run compares everything the export computes in integers and in
    the contract's fp32 epilogue, without that float noise. ``verdict``: ``"pass"``
    (free-running bar met), ``"layerwise-only"`` (only the resynced run meets it: the
    divergence starts in the FP32 layers' float sums) or ``"fail"``.
    """
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    float_tensors = dict(float_tensors or {})
    sess = ort.InferenceSession(_with_outputs(proto, code_tensors, float_tensors), so,
                                providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    layout = {p.key: p.value for p in proto.metadata_props}.get("qgnn_deploy.layout", "nchw")
    layers = dict(int_model.named_layers())
    order = list(code_tensors)
    modes = ("free", "resynced") if float_tensors else ("free",)
    acc = {mode: {"episodes": 0, "queries": 0, "same": 0, "max_diff": 0.0, "elements": 0,
                  "mismatches": 0, "code_max": 0, "per_layer": {}} for mode in modes}
    prev_backend = int_model.backend
    int_model.backend = "reference"
    ref_codes, handles = _reference_codes(int_model)
    try:
        for batch in batches:
            images, labels = batch[0], batch[1]
            res = dict(zip(out_names, sess.run(out_names, {"images": images.numpy(),
                                                            "support_labels": labels.numpy()})))
            got = res["logits"]
            for mode in modes:
                a = acc[mode]
                ref_codes.clear()
                extra = _resync_hooks(int_model, float_tensors, res) if mode == "resynced" else []
                try:
                    ref = int_model(images, labels).logits.numpy()
                finally:
                    for h in extra:
                        h.remove()
                a["episodes"] += ref.shape[0]
                a["queries"] += ref.shape[0] * ref.shape[1]
                a["same"] += int((got.argmax(-1) == ref.argmax(-1)).sum())
                a["max_diff"] = max(a["max_diff"], float(np.abs(got - ref).max()))
                for key, tensor in code_tensors.items():
                    if key not in ref_codes:
                        continue
                    o, r = _align(key, layers.get(key.split(":")[0]), res[tensor], ref_codes[key], layout)
                    if o.size != r.size:
                        raise AssertionError(f"{key}: {o.size} codes in the export vs {r.size}")
                    d = np.abs(o.astype(np.int16) - r.astype(np.int16))
                    bad = int((d > 0).sum())
                    a["elements"] += d.size
                    a["mismatches"] += bad
                    a["code_max"] = max(a["code_max"], int(d.max()) if d.size else 0)
                    if bad:
                        a["per_layer"][key] = a["per_layer"].get(key, 0) + bad
    finally:
        for h in handles:
            h.remove()
        int_model.backend = prev_backend

    def summary(a) -> Dict[str, object]:
        agreement = a["same"] / max(a["queries"], 1)
        worst = dict(sorted(a["per_layer"].items(), key=lambda kv: -kv[1])[:10])
        first = next((k for k in order if k in a["per_layer"]), None)
        return {"episodes": a["episodes"], "queries": a["queries"], "agreement": agreement,
                "identical_predictions": a["same"] == a["queries"], "max_logit_diff": a["max_diff"],
                "code_elements": a["elements"], "code_mismatches": a["mismatches"],
                "code_mismatch_rate": a["mismatches"] / max(a["elements"], 1),
                "code_max_diff": a["code_max"], "code_mismatch_layers": worst,
                "first_mismatch_layer": first,
                "passed": _bar(a["max_diff"], agreement, a["mismatches"], a["elements"], a["code_max"])}

    out = summary(acc["free"])
    verdict = "pass" if out["passed"] else "fail"
    if float_tensors:
        out["resynced"] = summary(acc["resynced"])
        if not out["passed"] and out["resynced"]["passed"]:
            verdict = "layerwise-only"
    out["verdict"] = verdict
    return out
