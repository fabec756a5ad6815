"""The onnxruntime int8 baseline: the FP32 ONNX export quantized by onnxruntime's own tooling.

This is the route a user of onnxruntime takes instead of qgnn-deploy:
``quant_pre_process`` (onnx shape inference + onnxruntime graph optimization, which folds
BatchNorm into the convs), then ``quantize_static`` in QDQ format with per-channel int8
weights and uint8 activations (the combination onnxruntime recommends on x86-64, where
u8 x s8 runs on VNNI), MinMax ranges calibrated by a :class:`CalibrationDataReader` over
synthetic train-split episodes of the model's config (DPGN or EGNN: the same episode
contract). At session creation onnxruntime fuses the QDQ groups
into QLinearConv, QLinearLeakyRelu, QLinearAdd, QLinearMul (checked in its optimized
graph). The tool quantizes every conv, also the first backbone conv and the last conv of
each edge MLP that QGNN-IC keeps in FP32.

``quant_pre_process`` runs with ``skip_symbolic_shape=True``: onnxruntime's symbolic shape
inference stops with a TypeError on the FP32 export (it finds an elementwise output of
unknown rank), while onnx's own shape inference and the graph optimization go through.

Results are cached next to the onnx backend's exports (``default_cache_dir()``), keyed
by a SHA-256 of the FP32 file, the calibration settings and the onnxruntime version, so
only the first run pays for calibration.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Dict, Iterator, Optional

import numpy as np

#: synthetic train-split tasks the activation ranges are calibrated on, in batches
CALIBRATION_TASKS = 20
CALIBRATION_BATCH = 10
CALIBRATION_SEED = 0
#: bumped when the quantization recipe below changes (part of the cache key)
RECIPE_VERSION = 1


def _reader(config, tasks: int, seed: int):
    """A CalibrationDataReader yielding ``{"images", "support_labels"}`` feeds of synthetic
    train-split episodes (float32 [T, N, 3, S, S], int64 [T, way*shot])."""
    from onnxruntime.quantization import CalibrationDataReader

    from ..data import episode_batches

    class SyntheticEpisodeReader(CalibrationDataReader):
        def __init__(self):
            self._batches: Iterator = episode_batches(config, tasks, seed, split="train",
                                                      dataset="synthetic",
                                                      tasks_per_batch=CALIBRATION_BATCH)

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            batch = next(self._batches, None)
            if batch is None:
                return None
            images, support, _ = batch
            return {"images": images.numpy(), "support_labels": support.numpy()}

    return SyntheticEpisodeReader()


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs per-tensor warnings on the root logger (e.g. for the
    rank-1 BatchNorm1d scales it leaves per tensor); keep them off the user's terminal."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _recipe(tasks: int, seed: int) -> Dict[str, Any]:
    import onnxruntime
    return {"recipe": RECIPE_VERSION, "onnxruntime": onnxruntime.__version__, "format": "QDQ",
            "per_channel": True, "weight_type": "QInt8", "activation_type": "QUInt8",
            "calibrate_method": "MinMax", "calibration": {"dataset": "synthetic", "split": "train",
                                                          "tasks": tasks, "seed": seed}}


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quantize_qdq_int8(fp32_path: str, config, cache_dir: Optional[str] = None,
                      tasks: int = CALIBRATION_TASKS, seed: int = CALIBRATION_SEED) -> Dict[str, Any]:
    """Quantize the FP32 export at ``fp32_path`` (inputs ``images``, ``support_labels``) to
    int8 QDQ, calibrated on ``tasks`` synthetic train-split episodes of ``config``.

    Returns ``{"path", "cached", **recipe}``: the quantized file and how it was made.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..backends.onnx import default_cache_dir

    recipe = _recipe(tasks, seed)
    key = hashlib.sha256((_file_sha256(fp32_path) + json.dumps(recipe, sort_keys=True)).encode())
    d = cache_dir or default_cache_dir()
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{key.hexdigest()[:32]}-int8-qdq.onnx")
    if os.path.isfile(path):
        return {"path": path, "cached": True, **recipe}
    out = f"{path}.tmp-{os.getpid()}"  # written beside the cache entry, renamed when complete
    with tempfile.TemporaryDirectory(prefix="qgnn-qdq-") as tmp, _quiet_root_logger():
        pre = os.path.join(tmp, "preprocessed.onnx")
        quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
        quantize_static(pre, out, _reader(config, tasks, seed), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8)
    os.replace(out, path)
    return {"path": path, "cached": False, **recipe}


def qdq_summary(path: str) -> Dict[str, int]:
    """What the quantized graph holds: QuantizeLinear / DequantizeLinear counts; the int8
    weight initializers behind a DequantizeLinear, split into per-channel (1-D scale of
    > 1 element) and per-tensor ones; the int32 biases; the Conv / MatMul / Gemm nodes."""
    import onnx
    from onnx import TensorProto
    m = onnx.load(path)
    inits = {t.name: t for t in m.graph.initializer}
    out = {"quantize_linear": 0, "dequantize_linear": 0, "per_channel_int8_weights": 0,
           "per_tensor_int8_weights": 0, "int32_biases": 0, "conv_matmul_gemm_nodes": 0}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            out["quantize_linear"] += 1
        elif n.op_type == "DequantizeLinear":
            out["dequantize_linear"] += 1
            w, scale = inits.get(n.input[0]), inits.get(n.input[1])
            if w is None or scale is None:  # an activation's DequantizeLinear
                continue
            if w.data_type == TensorProto.INT32:
                out["int32_biases"] += 1
            elif w.data_type == TensorProto.INT8:
                per_channel = len(scale.dims) == 1 and scale.dims[0] > 1
                out["per_channel_int8_weights" if per_channel else "per_tensor_int8_weights"] += 1
        elif n.op_type in ("Conv", "MatMul", "Gemm"):
            out["conv_matmul_gemm_nodes"] += 1
    return out


__all__ = ["quantize_qdq_int8", "qdq_summary", "CALIBRATION_TASKS", "CALIBRATION_SEED"]
