"""Pauta quantization (paper eqs. 4-7) with learnable range and straight-through rounding.

For a tensor X and n bits, with a learned range ``l < r``::

    l, r initialised to mean(X) -/+ 3 std(X)            (eqs. 4, 5; first batch)
    s      = (r - l) / (2^n - 1)                         (eq. 6)
    code   = clamp(round_half_even((X - l) / s), 0, 2^n - 1)
    X_hat  = l + s * code

Eq. 7 writes the code as ``round(clip(X - l, 0, r - l) / s)``; mathematically the
same, we compute the form above because it is the one every integer backend
(C++, Triton, onnxruntime) reproduces bit for bit: one fp32 subtraction, one fp32
division, round-half-to-even, clamp. Gradients: straight-through through the
rounding, so ``l`` and ``r`` receive gradients through the clip and through ``s``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError

PAUTA_K = 3.0  # the Pauta criterion: values beyond mean +- 3 sigma are outliers
MIN_RANGE = 1e-8


def pauta_step(l: torch.Tensor, r: torch.Tensor, bits: int) -> torch.Tensor:
    """Step ``s = (r - l) / (2^bits - 1)`` in fp32 (eq. 6)."""
    return (r - l) / float(2 ** bits - 1)


def pauta_codes(x: torch.Tensor, l, s, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(rne((x - l) / s), 0, 2^bits - 1)`` as uint8.

    Args:
        x: float32 tensor of any shape.
        l, s: offset and step, python floats or fp32 tensors broadcastable to ``x``.
        bits: 2..8.
    Returns:
        uint8 tensor of ``x``'s shape. NaN maps to code 0 (never UB); callers
        reject NaN inputs before they reach a quantizer.
    """
    qmax = float(2 ** bits - 1)
    u = torch.round((x.float() - l) / s)
    u = torch.nan_to_num(u, nan=0.0)
    return u.clamp_(0.0, qmax).to(torch.uint8)


def pauta_init_range(x: torch.Tensor, dim: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean - 3 std, mean + 3 std)`` over all of ``x`` or per index of ``dim``."""
    x = x.detach().float()
    if dim is None:
        mean, std = x.mean(), x.std(unbiased=False) if x.numel() > 1 else x.new_tensor(0.0)
    else:
        flat = x.transpose(0, dim).reshape(x.shape[dim], -1)
        mean, std = flat.mean(1), flat.std(1, unbiased=False)
    l = mean - PAUTA_K * std
    r = mean + PAUTA_K * std
    r = torch.maximum(r, l + MIN_RANGE)  # constant tensors: keep s > 0
    return l, r


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, qmax):
        return torch.round(u).clamp_(0.0, qmax)

    @staticmethod
    def backward(ctx, g):
        return g, None


def pauta_fake_quant(x: torch.Tensor, l: torch.Tensor, r: torch.Tensor, bits: int) -> torch.Tensor:
    """``l + s * code`` with straight-through rounding; differentiable in x, l, r.

    ``l``/``r`` are scalars (per tensor) or broadcastable per-channel tensors.
    """
    qmax = float(2 ** bits - 1)
    s = pauta_step(l, r, bits)
    u = (x - l) / s
    # clip(X - l, 0, r - l) / s of eq. 7: the gradient to x vanishes outside [l, r],
    # and l, r get theirs through s and the clip bounds.
    u = torch.minimum(torch.maximum(u, torch.zeros_like(u)), torch.full_like(u, qmax))
    return l + s * _RoundSTE.apply(u, qmax)


class PautaQuantizer(nn.Module):
    """A PQ quantizer with learnable ``l`` and ``r``.

    Args:
        bits: 2, 3, 4 or 8.
        channels: ``None`` for one range per tensor, else the number of output
            channels (dim 0) for per-channel weight quantization.

    The range is initialised from the first tensor it sees (mean +- 3 std), in
    training or eval mode alike, so a fresh model is calibrated by one forward pass.
    """

    def __init__(self, bits: int, channels: Optional[int] = None):
        super().__init__()
        if bits not in (2, 3, 4, 8):
            raise ConfigError(f"PautaQuantizer bits must be 2, 3, 4 or 8, got {bits}")
        self.bits = bits
        self.channels = channels
        shape = () if channels is None else (channels,)
        self.l = nn.Parameter(torch.zeros(shape))
        self.r = nn.Parameter(torch.ones(shape))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.channels}"

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        l, r = pauta_init_range(x, None if self.channels is None else 0)
        self.l.copy_(l)
        self.r.copy_(r)
        self.initialized.fill_(True)

    def _bcast(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channels is None:
            return p
        return p.view((-1,) + (1,) * (x.dim() - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.initialize(x)
        return pauta_fake_quant(x, self._bcast(self.l, x), self._bcast(self.r, x), self.bits)

    def step_with_grad(self) -> torch.Tensor:
        """fp32 step(s) ``s``, differentiable in ``l`` and ``r``."""
        return pauta_step(self.l, self.r, self.bits)

    def step(self) -> torch.Tensor:
        """fp32 step(s) ``s``, detached."""
        return pauta_step(self.l.detach(), self.r.detach(), self.bits)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of ``x`` under the current range (no gradient)."""
        return pauta_codes(x, self._bcast(self.l.detach(), x), self._bcast(self.step(), x), self.bits)
