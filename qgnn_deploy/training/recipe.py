"""The paper's optimizer recipe per bit-width (section 4.2), scaled to the run length.

- FP32 pre-training: Adam, lr 1e-3, weight decay 1e-5.
- 3/4-bit QAT: Adam, lr 1e-2 (paper). Quantizer ranges train with the weights.
- 2-bit QAT: SGD, lr 3e-3 (paper; momentum 0.9 is our choice, the paper gives none).
- Every recipe: lr x0.1 every 15k of DPGN's 100k iterations, i.e. every 15% of the run
  (at least 1 iteration); ``lr_step`` overrides it.

EGNN (``family="egnn"``): FP32 training follows the official EGNN trainer (train.py,
miniImageNet): Adam, lr 1e-3, weight decay 1e-6, lr x0.5 every 15k of 100k iterations (every
15% of the run). QAT uses the paper's recipe above per bit-width, as for DPGN.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..errors import ConfigError

PAPER_RUN = 100_000
PAPER_STEP = 15_000


@dataclass
class Recipe:
    optimizer: str
    lr: float
    weight_decay: float = 1e-5
    momentum: float = 0.9
    lr_step: int = 0
    lr_gamma: float = 0.1

    def to_dict(self):
        return asdict(self)


def default_recipe(bits: int, iterations: int, optimizer: Optional[str] = None,
                   lr: Optional[float] = None, lr_step: Optional[int] = None,
                   family: str = "dpgn") -> Recipe:
    """The paper's recipe for ``bits`` (EGNN at FP32: the official EGNN one), with optional
    overrides."""
    if family not in ("dpgn", "egnn"):
        raise ConfigError(f"no recipe for model family {family!r}")
    if bits >= 32 and family == "egnn":
        r = Recipe("adam", 1e-3, weight_decay=1e-6, lr_gamma=0.5)
    elif bits >= 32:
        r = Recipe("adam", 1e-3)
    elif bits in (3, 4, 8):
        r = Recipe("adam", 1e-2)
    elif bits == 2:
        r = Recipe("sgd", 3e-3)
    else:
        raise ConfigError(f"no recipe for {bits} bits")
    if optimizer:
        if optimizer not in ("adam", "sgd"):
            raise ConfigError(f"--optimizer must be adam or sgd, got {optimizer!r}")
        r.optimizer = optimizer
    if lr is not None:
        r.lr = float(lr)
    r.lr_step = int(lr_step) if lr_step else max(1, round(iterations * PAPER_STEP / PAPER_RUN))
    return r


def build_optimizer(params, recipe: Recipe):
    """(optimizer, StepLR scheduler) for ``recipe``."""
    params = [p for p in params if p.requires_grad]
    if recipe.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                              weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=recipe.lr_step, gamma=recipe.lr_gamma)
    return opt, sched
