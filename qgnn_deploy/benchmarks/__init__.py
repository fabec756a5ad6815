"""Benchmarks behind ``qgnn-deploy bench`` (per-layer workloads: :mod:`.layers`).

Lazy: importing the package imports neither torch's kernels nor onnxruntime.
"""
from __future__ import annotations

import importlib

__all__ = ["run_layer_benchmarks", "format_table"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".layers", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
