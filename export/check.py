"""Parity of an integer ONNX export with the reference engine (``export --check``).

Runs the export in onnxruntime next to the :class:`~qgnn_deploy.intmodel.IntModel` on
the ``reference`` op backend, episode batch by episode batch, and compares

* logits: max |diff|, share of queries with the same prediction (DESIGN.md section 3:
  <= 1e-3 and >= 99.9%);
* every quantized layer's input codes: the graph's code tensors are added as extra
  outputs of a private copy of the model and compared with the codes the reference
  layers consume (count of differing elements, largest difference).
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

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


def check_parity(int_model, proto: onnx.ModelProto, code_tensors: Dict[str, str],
                 batches: Iterable, threads=None) -> Dict[str, object]:
    """Compare the export (``proto``) with ``int_model`` on the reference backend.

    ``batches`` yields ``(images [T, N, 3, S, S], support_labels [T, NS], ...)``.
    Returns a JSON-ready dict: ``episodes``, ``queries``, ``agreement``,
    ``identical_predictions``, ``max_logit_diff``, ``code_elements``,
    ``code_mismatches``, ``code_max_diff``, ``code_mismatch_layers`` (worst 10).
    """
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    sess = ort.InferenceSession(_with_code_outputs(proto, code_tensors), so,
                                providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    layout = {p.key: p.value for p in proto.metadata_props}.get("qgnn_deploy.layout", "nchw")
    layers = dict(int_model.named_layers())
    prev_backend = int_model.backend
    int_model.backend = "reference"
    ref_codes, handles = _reference_codes(int_model)
    episodes = queries = same = 0
    max_diff = 0.0
    elements = mismatches = code_max = 0
    per_layer: Dict[str, int] = {}
    try:
        for batch in batches:
            images, labels = batch[0], batch[1]
            ref_codes.clear()
            ref = int_model(images, labels).logits.numpy()
            res = dict(zip(out_names, sess.run(out_names, {"images": images.numpy(),
                                                            "support_labels": labels.numpy()})))
            got = res["logits"]
            episodes += ref.shape[0]
            queries += ref.shape[0] * ref.shape[1]
            same += int((got.argmax(-1) == ref.argmax(-1)).sum())
            max_diff = max(max_diff, float(np.abs(got - ref).max()))
            for key, tensor in code_tensors.items():
                if key not in ref_codes:
                    continue
                o, r = _align(key, layers.get(key.split(":")[0]), res[tensor], ref_codes[key], layout)
                if o.size != r.size:
                    raise AssertionError(f"{key}: {o.size} codes in the export vs {r.size}")
                d = np.abs(o.astype(np.int16) - r.astype(np.int16))
                bad = int((d > 0).sum())
                elements += d.size
                mismatches += bad
                code_max = max(code_max, int(d.max()) if d.size else 0)
                if bad:
                    per_layer[key] = per_layer.get(key, 0) + bad
    finally:
        for h in handles:
            h.remove()
        int_model.backend = prev_backend
    agreement = same / max(queries, 1)
    worst = dict(sorted(per_layer.items(), key=lambda kv: -kv[1])[:10])
    return {"episodes": episodes, "queries": queries, "agreement": agreement,
            "identical_predictions": same == queries, "max_logit_diff": max_diff,
            "code_elements": elements, "code_mismatches": mismatches,
            "code_mismatch_rate": mismatches / max(elements, 1), "code_max_diff": code_max,
            "code_mismatch_layers": worst,
            "passed": bool(max_diff <= 1e-3 and agreement >= 0.999
                           and mismatches <= 0.001 * max(elements, 1) and code_max <= 1)}
