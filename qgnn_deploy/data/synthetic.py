"""The procedural few-shot data set ("synthetic"): the embedded default, no files.

100 classes split 64 / 16 / 20 (train / val / test, like CIFAR-FS), 600 instances per
class, 32 px (or 84 px). Everything is a pure function of ``(dataset_seed, class,
instance)`` through an integer hash, so any instance renders identically on any
machine, in any batch, in any order, without storing pixels.

A class is a generative prototype: a star-like shape ``R(phi) = r0 (1 + a cos(k phi)
+ b cos(m phi + psi))`` (filled or hollow), filled with an oriented stripe texture
mixing two class colours, on a class background colour. An instance draws its own
pose (rotation, translation, scale), colour jitter, brightness, background gradient,
a clutter blob of random colour and pixel noise. Classes live in a continuous
parameter space, so some pairs are close: 5-way accuracy is meaningful and
low-bit quantization visibly hurts it.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

NUM_CLASSES = 100
INSTANCES_PER_CLASS = 600
SPLITS = {"train": range(0, 64), "val": range(64, 80), "test": range(80, 100)}
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)

NUM_SCHEMES = 5
_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (int64 tensors holding values in [0, 2^32)).

    Constants stay below 2^31 so every product fits in int64 without overflow."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x46CA68B7) & _M32
    x = x ^ (x >> 16)
    return x


def _key(*parts) -> torch.Tensor:
    """Hash a tuple of int64 tensors / ints into one int64 key tensor (broadcast)."""
    h = torch.tensor(0x9E3779B9, dtype=torch.int64)
    for p in parts:
        p = torch.as_tensor(p, dtype=torch.int64)
        h = _hash32(h ^ _hash32(p + 0x632BE5AB))
    return h


def _uniform(key: torch.Tensor, slot: int) -> torch.Tensor:
    """Uniform [0, 1) float32 from ``key`` (any shape) and a parameter slot number."""
    return _hash32(key ^ _hash32(torch.tensor(slot * 0x2545F491 + 1, dtype=torch.int64))).float() / 4294967296.0


def class_parameters(dataset_seed: int, classes: torch.Tensor) -> dict:
    """Prototype parameters of ``classes`` (int64 [B]); each value float32 [B] or [B, 3]."""
    k = _key(dataset_seed, classes, 1)
    u = lambda s: _uniform(k, s)  # noqa: E731
    out = {
        "lobes": torch.floor(u(0) * 6),               # k in {0..5}: 0 = ellipse-ish
        "lobe_amp": 0.12 + 0.3 * u(1),
        "harm": 2 + torch.floor(u(2) * 4),            # second harmonic m in {2..5}
        "harm_amp": 0.2 * u(3),
        "harm_phase": 2 * math.pi * u(4),
        "radius": 0.38 + 0.2 * u(5),
        "hollow": (u(6) < 0.3).float(),
        "aspect": 0.7 + 0.6 * u(7),
        "stripe_freq": 1.0 + 5.0 * u(8),
        "stripe_angle": math.pi * u(9),
        "stripe_contrast": 0.2 + 0.8 * u(10),
    }
    # Colours come from a few shared schemes, so colour alone rarely tells two classes
    # of an episode apart: shape and texture have to.
    scheme = torch.floor(u(11) * NUM_SCHEMES).long()
    sk = _key(dataset_seed, scheme, 3)
    su = lambda s: _uniform(sk, s)  # noqa: E731
    scolour = lambda s: torch.stack([su(s), su(s + 1), su(s + 2)], -1)  # noqa: E731
    out.update({"fg1": scolour(0), "fg2": scolour(3), "bg": scolour(6)})
    return out


def render(dataset_seed: int, classes: torch.Tensor, instances: torch.Tensor, size: int = 32,
           normalize: bool = True) -> torch.Tensor:
    """Render instances: ``classes``, ``instances`` int64 [B] -> float32 [B, 3, size, size].

    With ``normalize`` the values are ``(x - MEAN) / STD`` per channel, else in [0, 1].
    """
    classes = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
    instances = torch.as_tensor(instances, dtype=torch.int64).reshape(-1)
    b = classes.numel()
    p = class_parameters(dataset_seed, classes)
    key = _key(dataset_seed, classes, instances, 2)
    u = lambda s: _uniform(key, s)  # noqa: E731
    col = lambda t: t.view(b, 1, 1) if t.dim() == 1 else t.view(b, 3, 1, 1)  # noqa: E731

    # Pose: rotation, translation, scale.
    rot = 2 * math.pi * u(0)
    cx, cy = 0.5 * (u(1) - 0.5), 0.5 * (u(2) - 0.5)
    scale = 0.75 + 0.5 * u(3)
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")                    # [S, S]
    xs, ys = xx.unsqueeze(0) - col(cx), yy.unsqueeze(0) - col(cy)        # [B, S, S]
    c, s = col(torch.cos(rot)), col(torch.sin(rot))
    xr = (c * xs + s * ys) / col(scale)
    yr = (-s * xs + c * ys) / col(scale * p["aspect"])
    rad = torch.sqrt(xr * xr + yr * yr + 1e-8)
    ang = torch.atan2(yr, xr)

    # Shape mask: soft inside test against the class radius profile.
    amp = p["lobe_amp"] * (0.6 + 0.8 * u(27))                          # per-instance shape jitter
    prof = col(p["radius"]) * (1 + col(amp) * torch.cos(col(p["lobes"]) * ang)
                               + col(p["harm_amp"]) * torch.cos(col(p["harm"]) * ang + col(p["harm_phase"])))
    sharp = size / 2.0
    inside = torch.sigmoid((prof - rad) * sharp * 2)
    ring = torch.sigmoid((rad - 0.55 * prof) * sharp * 2)
    mask = inside * (1 - col(p["hollow"]) * (1 - ring))                 # [B, S, S]

    # Texture: stripes in the object's frame mixing the two class colours.
    ta = col(p["stripe_angle"] + 0.6 * (u(28) - 0.5))
    phase = 2 * math.pi * u(4)
    t = 0.5 + 0.5 * torch.sin(math.pi * col(p["stripe_freq"] * (0.75 + 0.5 * u(29))) * (xr * torch.cos(ta) + yr * torch.sin(ta))
                              + col(phase))
    t = 0.5 + (t - 0.5) * col(p["stripe_contrast"])
    jitter = lambda base, s0: (base + 0.45 * (torch.stack([u(s0), u(s0 + 1), u(s0 + 2)], -1) - 0.5)).clamp(0, 1)  # noqa: E731
    fg1, fg2, bg = jitter(p["fg1"], 5), jitter(p["fg2"], 8), jitter(p["bg"], 11)
    fg = col(fg1) * t.unsqueeze(1) + col(fg2) * (1 - t.unsqueeze(1))    # [B, 3, S, S]

    # Background: class colour with a random linear gradient.
    g_ang = 2 * math.pi * u(14)
    grad = (col(torch.cos(g_ang)) * xx + col(torch.sin(g_ang)) * yy) * col(0.3 * u(15))
    back = col(bg) + grad.unsqueeze(1)

    # Clutter: an ellipse of a random colour somewhere, behind the object.
    ex, ey = 1.6 * (u(16) - 0.5), 1.6 * (u(17) - 0.5)
    er = 0.1 + 0.25 * u(18)
    blob = torch.sigmoid((er.view(b, 1, 1) - torch.sqrt((xx - col(ex)) ** 2 + 0.5 * (yy - col(ey)) ** 2)) * sharp * 2)
    blob = blob * (u(19) < 0.7).float().view(b, 1, 1)
    blob_col = torch.stack([u(20), u(21), u(22)], -1)
    back = back * (1 - blob.unsqueeze(1)) + col(blob_col) * blob.unsqueeze(1)

    img = back * (1 - mask.unsqueeze(1)) + fg * mask.unsqueeze(1)
    img = img * (0.75 + 0.5 * u(23)).view(b, 1, 1, 1)                                  # brightness

    # Pixel noise: hashed per (instance, pixel) so it is deterministic and batch-independent.
    pix = torch.arange(3 * size * size, dtype=torch.int64).view(1, 3, size, size)
    nkey = _hash32(key.view(b, 1, 1, 1) ^ _hash32(pix + 0x1B873593))
    n1 = _uniform(nkey, 24)
    n2 = _uniform(nkey, 25)
    img = img + (0.08 + 0.12 * u(26)).view(b, 1, 1, 1) * (n1 + n2 - 1.0) * 1.7
    img = img.clamp(0, 1)
    if normalize:
        img = (img - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return img.contiguous()


class SyntheticFewShot:
    """The procedural data set behind ``dataset="synthetic"``.

    ``split_classes(split)`` gives global class ids; ``load(classes, instances)`` renders
    float32 [B, 3, S, S], normalised.
    """

    name = "synthetic"

    def __init__(self, image_size: int = 32, dataset_seed: int = 0):
        self.image_size = int(image_size)
        self.dataset_seed = int(dataset_seed)

    def split_classes(self, split: str) -> Sequence[int]:
        return list(SPLITS[split])

    def class_sizes(self, split: str) -> Sequence[int]:
        return [INSTANCES_PER_CLASS] * len(SPLITS[split])

    def load(self, classes: torch.Tensor, instances: torch.Tensor, augment: bool = False) -> torch.Tensor:
        # augment is ignored: the generator's own pose/colour variation is the augmentation.
        return render(self.dataset_seed, classes, instances, self.image_size)

    def sample_grid(self, split: str, per_class: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
        """A [classes * per_class, 3, S, S] grid of instances (for looking at the data)."""
        cls = torch.tensor(self.split_classes(split)).repeat_interleave(per_class)
        inst = torch.arange(per_class).repeat(len(self.split_classes(split)))
        return render(self.dataset_seed, cls, inst, self.image_size, normalize=False), cls
