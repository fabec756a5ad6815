"""A restricted unpickler for the data sets' pickle files (CIFAR-100, miniImageNet).

Those files are pickles, and a pickle can name any callable. This one resolves only
the few globals numpy arrays need (``_reconstruct``, ``ndarray``, ``dtype``,
``scalar``) and ``_codecs.encode`` (Python 2 byte strings); builtin containers, bytes,
str and numbers are pickle opcodes and need no globals. Anything else is refused
with a :class:`DataError`.
"""
from __future__ import annotations

import _codecs
import io
import pickle
import pickletools
from typing import Any

import numpy as np

from ..errors import DataError

try:  # numpy >= 2
    from numpy._core import multiarray as _ma
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _ma

class _NdarrayType:
    """Stands for ``numpy.ndarray`` in a data pickle: usable only as the subtype argument
    of ``_reconstruct``, never called directly (``ndarray(shape)`` would allocate any
    size the file claims)."""


def _reconstruct(subtype, shape, dtype):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') + BUILD(state); the
    # state's data must then match its shape, so nothing larger than the file is made.
    if subtype is not _NdarrayType or tuple(shape) != (0,):
        raise pickle.UnpicklingError("numpy _reconstruct with an unexpected subtype or shape")
    return _ma._reconstruct(np.ndarray, (0,), dtype)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _ma.scalar,
    ("numpy._core.multiarray", "scalar"): _ma.scalar,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,
}


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")
        return fn


def safe_load(path: str, encoding: str = "bytes") -> Any:
    """Unpickle ``path`` allowing only containers, strings, numbers and numpy arrays.

    ``encoding="bytes"`` keeps Python 2 strings (the CIFAR archives) as bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        # Walk the opcodes first: a length field claiming more bytes than the file holds
        # fails here, before the unpickler would allocate it.
        for _ in pickletools.genops(data):
            pass
        return _Restricted(io.BytesIO(data), encoding=encoding).load()
    except FileNotFoundError:
        raise DataError(f"expected the pickle file {path!r}; it does not exist") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OverflowError, RecursionError) as e:
        raise DataError(f"{path!r} is not a valid data pickle ({type(e).__name__}: {e}); only "
                        "builtin containers, strings, numbers and numpy arrays are accepted") from None


def key(d: dict, name: str) -> Any:
    """``d[name]`` whether the pickle stored str or bytes keys; KeyError otherwise."""
    if name in d:
        return d[name]
    b = name.encode()
    if b in d:
        return d[b]
    raise KeyError(name)


def text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)
