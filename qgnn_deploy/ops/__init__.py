"""The integer op set: reference semantics (``reference``), canonical packing
(``packing``) and the ``qgnn::*`` torch custom ops (``registry``).

``from qgnn_deploy.ops import qconv2d`` gives the custom op; the registry module is
imported on first use (registering the ops is cheap and touches no CUDA).
"""
from __future__ import annotations

import importlib

_REGISTRY_NAMES = ("quantize", "qconv2d", "qlinear", "qbmm", "node_rows", "pack", "unpack", "OP_OVERLOADS")


def __getattr__(name: str):
    if name in _REGISTRY_NAMES:
        return getattr(importlib.import_module("qgnn_deploy.ops.registry"), name)
    raise AttributeError(f"module 'qgnn_deploy.ops' has no attribute {name!r}")


__all__ = list(_REGISTRY_NAMES)
