"""Backend registry: which implementation the integer ops (``qgnn::*``) run on.

Op backends implement the integer op set function by function, named
``{prefix}_{op}`` in their module (``ref_qconv2d``, ``cpu_qconv2d``, ``triton_qconv2d``),
with exactly the signatures of :mod:`qgnn_deploy.ops.reference`:

    ==========  =================================  ========
    backend     module                             prefix
    ==========  =================================  ========
    reference   qgnn_deploy.backends.reference     ref
    cpu         qgnn_deploy.backends.cpu           cpu
    triton      qgnn_deploy.backends.triton        triton
    ==========  =================================  ========

Whole-model backends (not op backends; the ``run`` command knows them): ``onnx``
(``qgnn_deploy.backends.onnx``, onnxruntime on the exported graph) and ``torch`` (the
float / fake-quant :class:`~qgnn_deploy.models.QGNNModel`).

The backend in force is a context variable, so it is per thread / per asyncio task::

    with use_backend("cpu"):
        int_model(images, labels)         # every qgnn:: op calls cpu_<op>

A backend module may define ``is_available() -> bool`` (and ``unavailable_reason() ->
str``); a module that fails to import, or says it is unavailable, raises
:class:`~qgnn_deploy.errors.BackendUnavailableError` naming the fix. Modules load
lazily: importing this package imports no backend, no CUDA, no Triton.

``pack`` and ``unpack`` are storage-format ops: a backend that does not define them
uses the reference ones (they run once at load time, never in the hot path). Every
compute op (``quantize``, ``qconv2d``, ``qlinear``, ``qbmm``, ``node_rows``) must come from the
selected backend: there is no silent fallback to the reference for those.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from typing import Callable, Dict, Iterator, List

from ..errors import BackendUnavailableError, ConfigError

#: op backends: name -> (module, function prefix)
OP_BACKENDS: Dict[str, tuple] = {
    "reference": ("qgnn_deploy.backends.reference", "ref"),
    "cpu": ("qgnn_deploy.backends.cpu", "cpu"),
    "triton": ("qgnn_deploy.backends.triton", "triton"),
}
#: what an IntModel runs on (``IntModel.backend``): an op backend module by module, or
#: ``cpu-eager`` -- the cpu op backend module by module, where ``cpu`` runs the model's
#: compiled plan in one native call per episode batch
INT_MODEL_BACKENDS = ("reference", "cpu", "cpu-eager", "triton")
#: whole-model backends the ``run`` command also accepts
MODEL_BACKENDS = ("onnx", "torch")
ALL_BACKENDS = INT_MODEL_BACKENDS + MODEL_BACKENDS
#: integer ops of the op set (see qgnn_deploy.ops.registry)
OPS = ("quantize", "qconv2d", "qlinear", "qbmm", "node_rows", "pack", "unpack")
#: ops a backend may leave to the reference implementation (load-time only)
STORAGE_OPS = ("pack", "unpack")

_FIX = {
    "cpu": "build the C++ extension: `pip install --no-build-isolation -e .` "
           "(needs a C++17 compiler and pybind11)",
    "triton": "needs a CUDA GPU and `pip install triton`",
}

_current: contextvars.ContextVar[str] = contextvars.ContextVar("qgnn_backend", default="")
_fn_cache: Dict[tuple, Callable] = {}
_default = None  # default_backend(), decided once per process


def op_backend_of(name: str) -> str:
    """The op backend an IntModel backend name runs its ``qgnn::`` ops on (``cpu-eager`` -> ``cpu``)."""
    return "cpu" if name == "cpu-eager" else name


def _check_name(name: str) -> str:
    name = op_backend_of(name)
    if name not in OP_BACKENDS:
        extra = (f" ('{name}' is a whole-model backend: use the run command or its own API)"
                 if name in MODEL_BACKENDS else "")
        raise ConfigError(f"unknown op backend {name!r}; choose one of {sorted(OP_BACKENDS)}{extra}")
    return name


def backend_module(name: str):
    """Import and return the module of op backend ``name``; raise
    :class:`BackendUnavailableError` with the fix when it cannot be used here."""
    name = _check_name(name)
    module_name, _ = OP_BACKENDS[name]
    try:
        mod = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendUnavailableError(
            f"backend {name!r} is unavailable: cannot import {module_name} ({e}); "
            f"{_FIX.get(name, 'reinstall qgnn-deploy')}") from None
    check = getattr(mod, "is_available", None)
    if check is not None and not check():
        why = getattr(mod, "unavailable_reason", lambda: "")()
        raise BackendUnavailableError(
            f"backend {name!r} is unavailable here{': ' + why if why else ''}; "
            f"{_FIX.get(name, '')}".rstrip("; "))
    return mod


def backend_function(name: str, op: str) -> Callable:
    """The function implementing ``op`` on backend ``name`` (``{prefix}_{op}``; ``cpu-eager``
    names the cpu op backend)."""
    name = op_backend_of(name)
    key = (name, op)
    fn = _fn_cache.get(key)
    if fn is not None:
        return fn
    if op not in OPS:
        raise ConfigError(f"unknown integer op {op!r}; ops are {OPS}")
    mod = backend_module(name)
    prefix = OP_BACKENDS[name][1]
    fn = getattr(mod, f"{prefix}_{op}", None)
    if fn is None and op in STORAGE_OPS:
        fn = getattr(backend_module("reference"), f"ref_{op}")
    if fn is None:
        raise BackendUnavailableError(
            f"backend {name!r} ({OP_BACKENDS[name][0]}) does not implement {prefix}_{op}")
    _fn_cache[key] = fn
    return fn


def is_backend_available(name: str) -> bool:
    try:
        backend_module(name)
        return True
    except BackendUnavailableError:
        return False


def available_backends() -> List[str]:
    """Op backends usable in this process, in the order of :data:`OP_BACKENDS`."""
    return [n for n in OP_BACKENDS if is_backend_available(n)]


def default_backend() -> str:
    """``triton`` when CUDA is present and Triton works, else ``cpu`` when the C++
    extension loads, else ``reference``."""
    global _default
    if _default is None:
        import torch
        if torch.cuda.is_available() and is_backend_available("triton"):
            _default = "triton"
        elif is_backend_available("cpu"):
            _default = "cpu"
        else:
            _default = "reference"
    return _default


def current_backend() -> str:
    """The backend in force right now (default: :func:`default_backend`): the ``qgnn::`` ops
    dispatch to it (``cpu-eager``: the cpu op backend), an IntModel without a backend of
    its own runs on it (``cpu``: its compiled plan)."""
    name = _current.get()
    return name if name else default_backend()


def set_backend(name: str) -> contextvars.Token:
    """Select op backend ``name`` for this context (prefer :func:`use_backend`)."""
    backend_module(name)  # fail now, with the fix, rather than inside the first op
    return _current.set(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """``with use_backend("cpu"): ...`` runs every ``qgnn::`` op on that backend."""
    token = set_backend(name)
    try:
        yield name
    finally:
        _current.reset(token)


__all__ = ["OP_BACKENDS", "INT_MODEL_BACKENDS", "MODEL_BACKENDS", "ALL_BACKENDS", "OPS", "backend_module",
           "backend_function", "op_backend_of", "is_backend_available", "available_backends", "default_backend",
           "current_backend", "set_backend", "use_backend"]
