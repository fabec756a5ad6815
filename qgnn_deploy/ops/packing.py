"""Canonical packed storage of n-bit weight codes (the one layout in a .qgnn artifact).

Codes are packed along the reduction dimension K of each output row, as one
little-endian bit stream: code ``k`` of a row occupies bits ``[bits*k, bits*k + bits)``
of that row, bit 0 being the least significant bit of the row's first byte. Each
row is padded with zero codes to a multiple of 8 values, so a row is exactly
``ceil(K / 8) * bits`` bytes and every group of 8 codes fills ``bits`` whole bytes:

    4-bit (2 codes per byte)        byte j:  [ c(2j+1) | c(2j) ]        bits 7..4 | 3..0
    2-bit (4 codes per byte)        byte j:  [ c(4j+3) | c(4j+2) | c(4j+1) | c(4j) ]
    3-bit (8 codes in 3 bytes)      group g = bytes 3g, 3g+1, 3g+2 (24 bits, LSB first):

        bit:  23 .. 21 | 20 .. 18 | 17 .. 15 | 14 .. 12 | 11 .. 9 | 8 .. 6 | 5 .. 3 | 2 .. 0
        code:    c7    |    c6    |    c5    |    c4    |    c3   |   c2   |   c1   |   c0
        byte 3g   = c0 | c1 << 3 | (c2 & 3) << 6
        byte 3g+1 = c2 >> 2 | c3 << 1 | c4 << 4 | (c5 & 1) << 7
        byte 3g+2 = c5 >> 1 | c6 << 2 | c7 << 5

    8-bit: one code per byte (the identity layout).

3-bit uses "8 values in 3 bytes" rather than 2-bit + 1-bit planes: one rule for every
width, and a row is still one contiguous stream. Backends repack at load time into
whatever their inner loop wants (e.g. the C++ kernels unpack to int8 tiles).
"""
from __future__ import annotations

import enum

import torch

from ..errors import KernelArgumentError

PACKABLE_BITS = (2, 3, 4, 8)


class PackFormat(enum.Enum):
    """Packing layouts known to the artifact format (stored by id in the header)."""

    #: little-endian bit stream along K, rows padded to a multiple of 8 codes
    LSB_STREAM_K8 = "lsb-stream-k8"


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes of one packed row of ``k`` codes."""
    return ((k + 7) // 8) * bits


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise KernelArgumentError(f"packing supports bits {PACKABLE_BITS}, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[O, K]`` (each < 2^bits) into uint8 ``[O, ceil(K/8)*bits]``."""
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise KernelArgumentError(
            f"pack_codes expects a 2-D uint8 tensor [O, K], got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 2 ** bits:
        raise KernelArgumentError(f"codes exceed the {bits}-bit range (max {int(codes.max())})")
    o, k = codes.shape
    k8 = (k + 7) // 8 * 8
    c = torch.zeros(o, k8, dtype=torch.int64)
    c[:, :k] = codes.to(torch.int64)
    groups = c.view(o, k8 // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (groups << shifts).sum(-1)  # [O, K8/8] holding 8*bits bits each
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [O, K8/8, bits]
    return out.reshape(o, k8 // 8 * bits).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[O, ceil(K/8)*bits]`` -> uint8 ``[O, K]``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise KernelArgumentError(
            f"unpack_codes expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    o = packed.shape[0]
    if k < 0 or packed.shape[1] != packed_row_bytes(k, bits):
        raise KernelArgumentError(
            f"packed rows of {packed.shape[1]} bytes do not hold K={k} codes of {bits} bits "
            f"(expected {packed_row_bytes(k, bits)} bytes)")
    groups = packed.to(torch.int64).view(o, packed.shape[1] // bits, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    word = (groups << byte_shifts).sum(-1)  # [O, K8/8]
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return codes.reshape(o, packed.shape[1] // bits * 8)[:, :k].to(torch.uint8)
