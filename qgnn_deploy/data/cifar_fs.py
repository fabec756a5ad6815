"""CIFAR-FS: the CIFAR-100 python archive with a 64 / 16 / 20 class split.

Expected layout under ``data_dir``::

    cifar-100-python/train      pickles of the official archive (dicts with b"data"
    cifar-100-python/test       uint8 [n, 3072], b"fine_labels"; meta with
    cifar-100-python/meta       b"fine_label_names")
    splits/train.txt            CIFAR-FS class split (Bertinetto et al.): fine label
    splits/val.txt              names one per line, 64 / 16 / 20 of them
    splits/test.txt

As in CIFAR-FS, the archive's train and test images are pooled (600 per class).
The pickles are read with a restricted unpickler (numpy arrays and builtins only).
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from ..errors import DataError
from .base import (CIFAR_MEAN, CIFAR_STD, ImageFewShot, check_disjoint, empty_split_check,
                   read_split_file, require_dir)
from .safe_pickle import key, safe_load, text

LAYOUT = ("cifar-100-python/{train,test,meta} (the CIFAR-100 python archive) and "
          "splits/{train,val,test}.txt (class names, one per line)")


def _archive_part(path: str):
    d = safe_load(path)
    if not isinstance(d, dict):
        raise DataError(f"{path!r} should hold a dict (CIFAR-100 python format), got {type(d).__name__}")
    try:
        data = np.asarray(key(d, "data"))
        labels = np.asarray(key(d, "fine_labels"), dtype=np.int64)
    except KeyError as e:
        raise DataError(f"{path!r} lacks the key {e.args[0]!r} of the CIFAR-100 python format") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path!r}: expected uint8 data [n, 3072] and n fine_labels, got "
                        f"{data.dtype} {data.shape} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar_fs(data_dir: str, image_size: int = 32) -> ImageFewShot:
    require_dir(data_dir, f"the CIFAR-FS root holding {LAYOUT}")
    arch = os.path.join(data_dir, "cifar-100-python")
    require_dir(arch, "the CIFAR-100 python archive (cifar-100-python/{train,test,meta})")
    meta = safe_load(os.path.join(arch, "meta"))
    try:
        names = [text(n) for n in key(meta, "fine_label_names")]
    except (KeyError, TypeError):
        raise DataError(f"{os.path.join(arch, 'meta')!r} lacks fine_label_names") from None
    parts = [_archive_part(os.path.join(arch, p)) for p in ("train", "test")]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(f"{arch}: fine_labels outside [0, {len(names)})")
    split_names = {s: read_split_file(os.path.join(data_dir, "splits", f"{s}.txt"))
                   for s in ("train", "val", "test")}
    empty_split_check("CIFAR-FS", split_names, os.path.join(data_dir, "splits"))
    check_disjoint("CIFAR-FS", split_names)
    index = {n: i for i, n in enumerate(names)}
    unknown = [n for ns in split_names.values() for n in ns if n not in index]
    if unknown:
        raise DataError(f"CIFAR-FS split files name classes not in the archive's meta: {unknown[:5]}")
    per_class: Dict[int, np.ndarray] = {}
    splits: Dict[str, List[int]] = {}
    for s, ns in split_names.items():
        splits[s] = [index[n] for n in ns]
        for n in ns:
            per_class[index[n]] = images[labels == index[n]]
    return ImageFewShot("cifar-fs", per_class, splits, dict(enumerate(names)), image_size,
                        CIFAR_MEAN, CIFAR_STD)
