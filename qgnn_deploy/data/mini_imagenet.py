"""miniImageNet (100 classes, 64 / 16 / 20), in either layout DPGN-era code uses.

1. Pickles (DPGN / EGNN "compacted" style), one per split, under ``data_dir`` or
   ``data_dir/compacted_datasets``::

       mini_imagenet_train.pickle   mini_imagenet_val.pickle   mini_imagenet_test.pickle

   each holding one of
     - ``{class name: uint8 array [n, 84, 84, 3] or list of [84, 84, 3] arrays}``
     - ``{"data": uint8 [n, H, W, 3], "labels": [n] class names or ids}``
     - ``{"image_data": uint8 [n, H, W, 3], "class_dict": {class: [indices]}}``
   read with a restricted unpickler (numpy arrays and builtins only).
2. Image folder + split csv (Ravi & Larochelle's csv files)::

       images/<filename>.jpg
       train.csv  val.csv  test.csv      header "filename,label"

Classes of the three splits must be disjoint.
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List

import numpy as np

from ..errors import DataError
from .base import IMAGENET_MEAN, IMAGENET_STD, ImageFewShot, check_disjoint, require_dir
from .safe_pickle import key, safe_load, text

SPLITS = ("train", "val", "test")
LAYOUT = ("mini_imagenet_{train,val,test}.pickle (in the root or compacted_datasets/), or "
          "images/ plus {train,val,test}.csv with header 'filename,label'")


def _pickle_path(root: str, split: str):
    for sub in ("", "compacted_datasets", "mini_imagenet"):
        p = os.path.join(root, sub, f"mini_imagenet_{split}.pickle")
        if os.path.isfile(p):
            return p
    return None


def _images(x, where: str) -> np.ndarray:
    arr = np.stack([np.asarray(i) for i in x]) if isinstance(x, (list, tuple)) else np.asarray(x)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise DataError(f"{where}: expected uint8 images [n, H, W, 3], got {arr.dtype} {arr.shape}")
    return arr


def _read_pickle_split(path: str) -> Dict[str, np.ndarray]:
    """``{class name: uint8 [n, H, W, 3]}`` from one split pickle, whatever the layout."""
    d = safe_load(path, encoding="latin1")
    if not isinstance(d, dict):
        raise DataError(f"{path!r} should hold a dict, got {type(d).__name__}")
    try:
        data = key(d, "image_data")
        cdict = key(d, "class_dict")
        arr = _images(data, path)
    except KeyError:
        pass
    else:
        out = {}
        for c, idx in cdict.items():
            idx = np.asarray(idx)
            if idx.ndim != 1 or idx.dtype.kind not in "iu" or (idx.size and (idx.min() < 0 or idx.max() >= len(arr))):
                raise DataError(f"{path!r}: class_dict[{text(c)!r}] must list image indices in "
                                f"[0, {len(arr)})")
            out[text(c)] = arr[idx.astype(np.int64)]
        return out
    try:
        data, labels = key(d, "data"), key(d, "labels")
    except KeyError:
        data = labels = None
    if data is not None:
        arr = _images(data, path)
        labels = [text(l) for l in (labels.tolist() if isinstance(labels, np.ndarray) else labels)]
        if len(labels) != len(arr):
            raise DataError(f"{path!r}: {len(arr)} images but {len(labels)} labels")
        out: Dict[str, List[int]] = {}
        for i, l in enumerate(labels):
            out.setdefault(l, []).append(i)
        return {c: arr[idx] for c, idx in out.items()}
    if not d:
        raise DataError(f"{path!r} holds an empty dict")
    return {text(c): _images(v, f"{path!r} class {text(c)!r}") for c, v in d.items()}


def _read_csv(path: str) -> List[tuple]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"expected the split csv {path!r} (header 'filename,label')") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise DataError(f"{path!r}: expected the header 'filename,label', got {rows[0] if rows else 'nothing'}")
    out = []
    for n, r in enumerate(rows[1:], 2):
        if not r:
            continue
        if len(r) < 2:
            raise DataError(f"{path!r} line {n}: expected 'filename,label', got {r}")
        out.append((r[0].strip(), r[1].strip()))
    return out


def load_mini_imagenet(data_dir: str, image_size: int = 84) -> ImageFewShot:
    require_dir(data_dir, f"the miniImageNet root holding {LAYOUT}")
    pickles = {s: _pickle_path(data_dir, s) for s in SPLITS}
    per_class: Dict[int, object] = {}
    splits: Dict[str, List[int]] = {}
    names: Dict[int, str] = {}
    split_names: Dict[str, List[str]] = {}

    def add_split(s: str, by_class: Dict[str, object]) -> None:
        # classes of a split get consecutive global ids; splits must not share a class
        split_names[s] = sorted(by_class)
        check_disjoint("miniImageNet", split_names)
        splits[s] = []
        for c in split_names[s]:
            gid = len(names)
            names[gid], per_class[gid] = c, by_class[c]
            splits[s].append(gid)

    if all(pickles.values()):
        for s in SPLITS:
            add_split(s, _read_pickle_split(pickles[s]))
    elif os.path.isdir(os.path.join(data_dir, "images")) and all(
            os.path.isfile(os.path.join(data_dir, f"{s}.csv")) for s in SPLITS):
        img_dir = os.path.join(data_dir, "images")
        for s in SPLITS:
            by_class: Dict[str, List[str]] = {}
            for fn, label in _read_csv(os.path.join(data_dir, f"{s}.csv")):
                by_class.setdefault(label, []).append(os.path.join(img_dir, fn))
            add_split(s, by_class)
        missing = [p for ps in per_class.values() for p in ps[:1] if not os.path.isfile(p)]
        if missing:
            raise DataError(f"miniImageNet: csv names images missing from {img_dir!r}, e.g. {missing[0]!r}")
    else:
        found = sorted(os.listdir(data_dir))[:10]
        raise DataError(f"miniImageNet: expected {LAYOUT} under {data_dir!r}; found {found}")
    for s in SPLITS:
        if not splits.get(s):
            raise DataError(f"miniImageNet: split {s!r} has no classes")
    return ImageFewShot("mini-imagenet", per_class, splits, names, image_size, IMAGENET_MEAN, IMAGENET_STD)
