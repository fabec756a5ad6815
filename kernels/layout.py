"""Load-time repacking of canonical packed weights into the Triton kernels' layout.

The artifact stores each output row as one LSB-first bit stream of K codes
(``qgnn_deploy.ops.packing``). The GPU kernels want, instead, 32-bit words laid out
``[K_words, O]`` (O contiguous, so a warp reading one word row of consecutive output
channels issues coalesced loads), with every conv tap's channel run starting on a word
boundary so that the per-K-row shift table is the same for every K block.

Repacked K axis (``Kp = taps * Cp``)::

    k' = tap * Cp + c        tap = i * kw + j (kernel row i, column j), c < C
    Cp = C rounded up to a multiple of 32; codes at c >= C are 0 (never read as data:
         the activation side is masked there, so they multiply a zero)

Words for 2, 4 and 8 bits (PER = 32 / bits codes per int32, little-endian inside)::

    words[w, o] bit:  31 ....................................... 0
                      | c(PER*w+PER-1) | ... | c(PER*w+1) | c(PER*w) |
    code k' = (words[k' // PER, o] >> ((k' % PER) * bits)) & (2^bits - 1)

3 bits do not divide 32, so they are split into two bit planes (no code straddles a
word, and the shift table stays a per-row constant)::

    lo[w, o]  : 16 two-bit fields  = code & 3   of k' = 16w .. 16w+15   (bits 2(k'%16)..)
    hi[w, o]  : 32 one-bit fields  = code >> 2  of k' = 32w .. 32w+31   (bit k'%32)
    code k'   = ((lo[k'//16] >> 2(k'%16)) & 3) | (((hi[k'//32] >> (k'%32)) & 1) << 2)

Words are stored as int32 (two's complement of the unsigned 32-bit pattern); the
kernels mask after the arithmetic shift, so the sign bit never leaks into a code.

Alongside the words we keep the integer weight sums the epilogue needs:
``tap_sums[tap, o] = sum_c qw[o, tap, c]`` (border-dependent WS of a conv) and
``row_sums[o]`` (WS of a linear layer). All of it is exact int32 host arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from qgnn_deploy.ops.packing import unpack_codes

K_ALIGN = 32  # every tap's channel run starts on a 32-code boundary (a whole word for all widths)


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class TritonWeight:
    """Weights of one layer in the Triton layout (see the module docstring).

    words:    int32 [Kp * bits / 32, O] (bits 2/4/8) or the 2-bit plane [Kp / 16, O] (3 bits)
    words_hi: int32 [Kp / 32, O], the 1-bit plane for 3 bits; ``words`` otherwise
    tap_sums: int32 [taps, O];  row_sums: int32 [O]
    """

    bits: int
    out_features: int
    k: int        # logical K = taps * C (what the canonical rows hold)
    taps: int
    channels: int
    cp: int       # channels per tap after padding to K_ALIGN
    words: torch.Tensor
    words_hi: torch.Tensor
    tap_sums: torch.Tensor
    row_sums: torch.Tensor

    @property
    def kp(self) -> int:
        return self.taps * self.cp

    @property
    def device(self) -> torch.device:
        return self.words.device


def _to_words(fields: torch.Tensor, width: int) -> torch.Tensor:
    """int64 fields [O, Kp] (each < 2^width) -> int32 words [Kp*width/32, O]."""
    o, kp = fields.shape
    per = 32 // width
    g = fields.view(o, kp // per, per)
    shifts = torch.arange(per, dtype=torch.int64) * width
    w = (g << shifts).sum(-1)                    # unsigned 32-bit pattern in int64
    w = torch.where(w >= 2 ** 31, w - 2 ** 32, w)  # reinterpret as two's complement int32
    return w.to(torch.int32).t().contiguous()


def repack(w_packed: torch.Tensor, bits: int, k: int, taps: int = 1,
           device: Optional[torch.device] = None) -> TritonWeight:
    """Canonical uint8 ``[O, ceil(K/8)*bits]`` -> :class:`TritonWeight` on ``device``.

    ``k = taps * C``; codes are in (kh, kw, C) order, so tap-major. Runs once per layer
    at load time (host arithmetic; the result is moved to ``device``).
    """
    if k % taps:
        raise ValueError(f"K={k} is not a multiple of taps={taps}")
    device = w_packed.device if device is None else device
    codes = unpack_codes(w_packed.detach().cpu(), bits, k)          # uint8 [O, K]
    o = codes.shape[0]
    c = k // taps
    cp = round_up(max(c, 1), K_ALIGN)
    padded = torch.zeros(o, taps, cp, dtype=torch.int64)
    padded[:, :, :c] = codes.view(o, taps, c).to(torch.int64)
    flat = padded.view(o, taps * cp)
    if bits == 3:
        words = _to_words(flat & 3, 2)
        words_hi = _to_words(flat >> 2, 1)
    else:
        words = _to_words(flat, bits)
        words_hi = words
    tap_sums = padded.sum(2).t().contiguous().to(torch.int32)       # [taps, O]
    row_sums = padded.sum((1, 2)).to(torch.int32)                   # [O]
    wd = words.to(device)
    wh = words_hi.to(device) if bits == 3 else wd
    return TritonWeight(bits, o, k, taps, c, cp, wd, wh, tap_sums.to(device), row_sums.to(device))
