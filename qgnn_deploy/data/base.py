"""A few-shot data set over real images: in-memory uint8 arrays or lazily read image files.

Images are indexed per class; ``load(classes, instances)`` returns float32
[B, 3, S, S], resized to ``image_size`` (bilinear, antialiased) and normalised with the
data set's mean/std. ``augment`` (training) adds DPGN's random crop (pad 4 at 32 px,
8 at 84 px) and horizontal flip, drawn from the torch RNG.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

CIFAR_MEAN = (0.5071, 0.4866, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_image(path: str, size: int) -> np.ndarray:
    """An image file as uint8 [size, size, 3] (RGB, bilinear resize)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency of the real loaders
        raise DataError("reading image files needs pillow: pip install pillow") from None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image {path!r} listed by the data set does not exist") from None
    except OSError as e:
        raise DataError(f"cannot read image {path!r}: {e}") from None


class ImageFewShot:
    """Images grouped by class with a train/val/test class split.

    Args:
        name: data set name (for messages).
        per_class: ``{global class id: uint8 array [n, H, W, 3] or list of file paths}``.
        splits: ``{"train"|"val"|"test": [global class ids]}``.
        class_names: ``{global class id: name}``.
        image_size: output side S.
    """

    def __init__(self, name: str, per_class: Dict[int, object], splits: Dict[str, List[int]],
                 class_names: Dict[int, str], image_size: int, mean: Sequence[float],
                 std: Sequence[float]):
        self.name = name
        self.per_class = per_class
        self.splits = splits
        self.class_names = class_names
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._cache: Dict[tuple, np.ndarray] = {}
        for split, cls in splits.items():
            missing = [c for c in cls if c not in per_class or len(per_class[c]) == 0]
            if missing:
                raise DataError(f"{name}: split {split!r} names classes without images: "
                                f"{[class_names.get(c, c) for c in missing[:5]]}")

    def split_classes(self, split: str) -> List[int]:
        return list(self.splits[split])

    def class_sizes(self, split: str) -> List[int]:
        return [len(self.per_class[c]) for c in self.splits[split]]

    def _image(self, c: int, i: int) -> np.ndarray:
        src = self.per_class[c]
        if isinstance(src, np.ndarray):
            return src[i]
        k = (c, i)
        if k not in self._cache:
            self._cache[k] = read_image(src[i], self.image_size)
        return self._cache[k]

    def load(self, classes: torch.Tensor, instances: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """int64 [B] class ids and per-class instance indices -> float32 [B, 3, S, S]."""
        arr = np.stack([self._image(int(c), int(i)) for c, i in zip(classes.tolist(), instances.tolist())])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
        s = self.image_size
        if x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        if augment:
            x = random_crop_flip(x, 4 if s <= 32 else 8)
        return ((x - self.mean) / self.std).contiguous()


def random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop after zero padding ``pad`` and random horizontal flip. [B, 3, S, S]."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,))
    dx = torch.randint(0, 2 * pad + 1, (b,))
    flip = torch.rand(b) < 0.5
    out = torch.empty_like(x)
    for k in range(b):
        crop = xp[k, :, dy[k]:dy[k] + h, dx[k]:dx[k] + w]
        out[k] = crop.flip(-1) if flip[k] else crop
    return out


def read_split_file(path: str) -> List[str]:
    """Class names one per line (blank lines and ``#`` comments skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except FileNotFoundError:
        raise DataError(f"expected the split file {path!r} (class names, one per line)") from None


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DataError(f"expected {what} at {path!r}; it does not exist")
    return path


def check_disjoint(name: str, splits: Dict[str, List[str]]) -> None:
    seen: Dict[str, str] = {}
    for split, names in splits.items():
        for n in names:
            if n in seen and seen[n] != split:
                raise DataError(f"{name}: class {n!r} is in both the {seen[n]} and {split} splits")
            seen[n] = split


def index_classes(splits: Dict[str, List[str]]) -> Dict[str, int]:
    """Global class ids: train classes, then val, then test, in split-file order."""
    ids: Dict[str, int] = {}
    for split in ("train", "val", "test"):
        for n in splits.get(split, []):
            ids.setdefault(n, len(ids))
    return ids


def empty_split_check(name: str, splits: Dict[str, list], where: Optional[str] = None) -> None:
    for split in ("train", "val", "test"):
        if not splits.get(split):
            raise DataError(f"{name}: split {split!r} has no classes" + (f" (from {where})" if where else ""))
