"""The ``reference`` op backend: the pure-PyTorch integer engine of
:mod:`qgnn_deploy.ops.reference` under the backend naming scheme (``ref_<op>``).

It is the specification, always available, CPU tensors only, written to be read.
"""
from __future__ import annotations

from ..ops.packing import pack_codes, unpack_codes
from ..ops.reference import ref_node_rows, ref_qbmm, ref_qconv2d, ref_qlinear, ref_quantize


def ref_pack(codes, bits: int):
    """uint8 codes [O, K] -> canonical packed rows [O, ceil(K/8)*bits]."""
    return pack_codes(codes, bits)


def ref_unpack(packed, bits: int, k: int):
    """Canonical packed rows [O, ceil(K/8)*bits] -> uint8 codes [O, K]."""
    return unpack_codes(packed, bits, k)


def is_available() -> bool:
    return True


__all__ = ["ref_quantize", "ref_qconv2d", "ref_qlinear", "ref_qbmm", "ref_node_rows", "ref_pack", "ref_unpack",
           "is_available"]
