"""CUB-200-2011 (200 bird classes, 100 / 50 / 50), read from the official image folders.

Expected layout (``data_dir`` is ``CUB_200_2011`` or its parent)::

    CUB_200_2011/images/<NNN.Class_name>/<image>.jpg
    [splits/{train,val,test}.txt]      optional: class folder names, one per line

Without split files the usual few-shot CUB split is used over the sorted class
folders: index i % 2 == 0 -> train, i % 4 == 1 -> val, i % 4 == 3 -> test
(100 / 50 / 50 for 200 classes). Images are resized to ``image_size`` (84).
"""
from __future__ import annotations

import os
from typing import Dict, List

from ..errors import DataError
from .base import IMAGENET_MEAN, IMAGENET_STD, ImageFewShot, check_disjoint, read_split_file

IMAGE_EXT = (".jpg", ".jpeg", ".png")


def default_split(classes: List[str]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {"train": [], "val": [], "test": []}
    for i, c in enumerate(sorted(classes)):
        out["train" if i % 2 == 0 else ("val" if i % 4 == 1 else "test")].append(c)
    return out


def load_cub(data_dir: str, image_size: int = 84) -> ImageFewShot:
    root = data_dir
    if os.path.isdir(os.path.join(data_dir, "CUB_200_2011")):
        root = os.path.join(data_dir, "CUB_200_2011")
    img_dir = os.path.join(root, "images")
    if not os.path.isdir(img_dir):
        raise DataError(f"CUB: expected the image folders CUB_200_2011/images/<class>/<image>.jpg under "
                        f"{data_dir!r}; {img_dir!r} does not exist")
    classes = sorted(d for d in os.listdir(img_dir) if os.path.isdir(os.path.join(img_dir, d)))
    if not classes:
        raise DataError(f"CUB: {img_dir!r} has no class folders")
    split_dir = next((d for d in (os.path.join(data_dir, "splits"), os.path.join(root, "splits"))
                      if os.path.isdir(d)), None)
    if split_dir:
        split_names = {s: read_split_file(os.path.join(split_dir, f"{s}.txt")) for s in ("train", "val", "test")}
    else:
        split_names = default_split(classes)
    check_disjoint("CUB", split_names)
    per_class: Dict[int, object] = {}
    splits: Dict[str, List[int]] = {}
    names: Dict[int, str] = {}
    for s in ("train", "val", "test"):
        if not split_names[s]:
            raise DataError(f"CUB: split {s!r} has no classes ({len(classes)} class folders in {img_dir!r})")
        splits[s] = []
        for c in split_names[s]:
            cdir = os.path.join(img_dir, c)
            if not os.path.isdir(cdir):
                raise DataError(f"CUB: split {s!r} names class {c!r} but {cdir!r} does not exist")
            files = sorted(os.path.join(cdir, f) for f in os.listdir(cdir) if f.lower().endswith(IMAGE_EXT))
            if not files:
                raise DataError(f"CUB: class folder {cdir!r} has no images ({'/'.join(IMAGE_EXT)})")
            gid = len(names)
            names[gid], per_class[gid] = c, files
            splits[s].append(gid)
    return ImageFewShot("cub", per_class, splits, names, image_size, IMAGENET_MEAN, IMAGENET_STD)
