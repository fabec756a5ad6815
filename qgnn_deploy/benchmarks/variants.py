"""Names of the episode benchmark's variants (no torch import: the CLI parser reads them).

See :mod:`.episode` for what each variant runs.
"""
from __future__ import annotations

#: what a user would run instead of qgnn-deploy, in the order they are reported
BASELINES = ("torch_fp32", "torch_bf16", "onnxruntime_fp32", "onnxruntime_int8_qdq")
#: our engines (``bench --backends``), in the order they are reported; ``onnx`` is the row
#: ``onnxruntime_int`` (onnxruntime on our integer export)
ENGINES = ("onnx", "cpu", "cpu-eager", "reference", "triton")
DEFAULT_ENGINES = ("onnx", "cpu", "cpu-eager")
#: the IntModel backends among ENGINES
INT_BACKENDS = ("reference", "cpu", "cpu-eager", "triton")
#: rows every row is compared with (``speedup_vs_<name>``)
SPEEDUP_BASES = ("torch_fp32", "torch_bf16", "onnxruntime_fp32", "onnxruntime_int")

__all__ = ["BASELINES", "ENGINES", "DEFAULT_ENGINES", "INT_BACKENDS", "SPEEDUP_BASES"]
