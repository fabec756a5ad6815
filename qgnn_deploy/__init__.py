"""qgnn-deploy: integer inference for Pauta-quantized DPGN few-shot classifiers (QGNN-IC).

Importing the package is cheap: it initialises no CUDA and compiles nothing. The C++
extension, Triton and onnxruntime load lazily when a backend or exporter needs them.

Public API (mirrored by the ``qgnn-deploy`` command line)::

    build_model, save_checkpoint, load_checkpoint, fold, load_int_model,
    export_onnx, count_bit_flops
"""
from __future__ import annotations

import importlib
import os
import sys
import types

__version__ = "0.1.0"


def _source_checkout_subpackages() -> None:
    # setup.py installs the repository's top-level kernels/ and export/ folders as
    # qgnn_deploy.kernels / qgnn_deploy.export. When the package is used straight from a
    # source checkout (no pip install), let the same names resolve to those folders.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if (os.path.isfile(os.path.join(root, "setup.py"))
            and os.path.isfile(os.path.join(root, "export", "__init__.py"))
            and root not in __path__):
        __path__.append(root)


_source_checkout_subpackages()

_LAZY = {
    "ModelConfig": "qgnn_deploy.config",
    "preset_config": "qgnn_deploy.config",
    "PRESETS": "qgnn_deploy.config",
    "build_model": "qgnn_deploy.models",
    "QGNNModel": "qgnn_deploy.models",
    "save_checkpoint": "qgnn_deploy.checkpoint",
    "load_checkpoint": "qgnn_deploy.checkpoint",
    "load_official_dpgn": "qgnn_deploy.checkpoint",
    "fold": "qgnn_deploy.fold",
    "IntModel": "qgnn_deploy.intmodel",
    "load_int_model": "qgnn_deploy.artifact",
    "save_int_model": "qgnn_deploy.artifact",
    "export_onnx": "qgnn_deploy.export",
    "count_bit_flops": "qgnn_deploy.report",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # bound once; _Package keeps submodule imports off it
        return value
    raise AttributeError(f"module 'qgnn_deploy' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module. Importing a submodule makes Python set the package attribute
    of the submodule's name to the module (``import qgnn_deploy.fold`` sets
    ``qgnn_deploy.fold``); where that name is an exported function, the function stays.
    The submodule itself is in ``sys.modules`` (``from qgnn_deploy.fold import x`` works;
    ``import qgnn_deploy.fold as m`` gives the function, as attribute access does)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
