"""The integer op set as ``torch.library.custom_op`` ops (namespace ``qgnn``).

=================  ==================================================================
op                 contract (see :mod:`qgnn_deploy.ops.reference` for the full spec)
=================  ==================================================================
qgnn::quantize     fp32 x -> uint8 codes ``clamp(rne((x - l) / s), 0, 2^bits - 1)``
qgnn::qconv2d      uint8 NHWC codes x packed weights -> fp32 [B,Ho,Wo,O] or uint8 codes
qgnn::qlinear      uint8 [M,K] codes x packed weights -> fp32 [M,O] or uint8 codes
qgnn::qbmm         uint8 [T,N,N] x uint8 [T,N,D] (both activations) -> fp32 [T,N,D]
qgnn::node_rows    uint8 [T,N,D] node codes -> per-node codes, widths and offsets (A2Q bits)
qgnn::pack         uint8 codes [O,K] -> canonical packed [O, ceil(K/8)*bits]
qgnn::unpack       canonical packed [O, ceil(K/8)*bits] -> uint8 codes [O,K]
=================  ==================================================================

Each op's implementation calls the function of the backend in force
(:func:`qgnn_deploy.backends.current_backend`, set with ``use_backend``), named
``{prefix}_{op}`` with the same positional arguments as here. Each has a shape-only
fake implementation, so ``torch.export`` / ``torch.onnx.export(dynamo=True)`` trace
through an :class:`~qgnn_deploy.intmodel.IntModel` without running any kernel; the
ONNX exporter maps these ops with ``custom_translation_table`` (keys: the
``torch.ops.qgnn.*.default`` overloads, also listed in :data:`OP_OVERLOADS`).

Scalars (offsets, steps, slope) travel as Python floats holding fp32 values; the
backends convert them to fp32 exactly.
"""
# No ``from __future__ import annotations``: custom_op infers the schema from real annotations.
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..backends import backend_function, current_backend


def _conv_out(h, k: int, stride: int, pad: int):
    return (h + 2 * pad - k) // stride + 1


# --------------------------------------------------------------------- quantize

@torch.library.custom_op("qgnn::quantize", mutates_args=())
def quantize(x: Tensor, l: float, s: float, bits: int) -> Tensor:
    """fp32 ``x`` (any shape) -> uint8 codes of the same shape."""
    return backend_function(current_backend(), "quantize")(x, l, s, bits)


@quantize.register_fake
def _quantize_fake(x, l, s, bits):
    return torch.empty_like(x, dtype=torch.uint8)


# ---------------------------------------------------------------------- qconv2d

@torch.library.custom_op("qgnn::qconv2d", mutates_args=())
def qconv2d(x: Tensor, w_packed: Tensor, w_bits: int, a_bits: int, kernel_size: int,
            stride: int, padding: int, w_scale: Tensor, w_offset: Tensor, a_scale: float,
            a_offset: float, post_scale: Optional[Tensor] = None,
            post_shift: Optional[Tensor] = None, residual: Optional[Tensor] = None,
            slope: Optional[float] = None, out_l: Optional[float] = None,
            out_s: Optional[float] = None, out_bits: Optional[int] = None) -> Tensor:
    """uint8 NHWC [B,H,W,C] -> fp32 [B,Ho,Wo,O] (uint8 codes when ``out_s`` is given)."""
    return backend_function(current_backend(), "qconv2d")(
        x, w_packed, w_bits, a_bits, kernel_size, stride, padding, w_scale, w_offset, a_scale,
        a_offset, post_scale, post_shift, residual, slope, out_l, out_s, out_bits)


@qconv2d.register_fake
def _qconv2d_fake(x, w_packed, w_bits, a_bits, kernel_size, stride, padding, w_scale, w_offset,
                  a_scale, a_offset, post_scale=None, post_shift=None, residual=None, slope=None,
                  out_l=None, out_s=None, out_bits=None):
    b, h, w, _ = x.shape
    shape = (b, _conv_out(h, kernel_size, stride, padding),
             _conv_out(w, kernel_size, stride, padding), w_packed.shape[0])
    return x.new_empty(shape, dtype=torch.uint8 if out_s is not None else torch.float32)


# ---------------------------------------------------------------------- qlinear

@torch.library.custom_op("qgnn::qlinear", mutates_args=())
def qlinear(x: Tensor, w_packed: Tensor, w_bits: int, a_bits: int, w_scale: Tensor,
            w_offset: Tensor, a_scale: float, a_offset: float,
            post_scale: Optional[Tensor] = None, post_shift: Optional[Tensor] = None,
            residual: Optional[Tensor] = None, slope: Optional[float] = None,
            out_l: Optional[float] = None, out_s: Optional[float] = None,
            out_bits: Optional[int] = None) -> Tensor:
    """uint8 [M,K] -> fp32 [M,O] (uint8 codes when ``out_s`` is given)."""
    return backend_function(current_backend(), "qlinear")(
        x, w_packed, w_bits, a_bits, w_scale, w_offset, a_scale, a_offset, post_scale,
        post_shift, residual, slope, out_l, out_s, out_bits)


@qlinear.register_fake
def _qlinear_fake(x, w_packed, w_bits, a_bits, w_scale, w_offset, a_scale, a_offset,
                  post_scale=None, post_shift=None, residual=None, slope=None, out_l=None,
                  out_s=None, out_bits=None):
    return x.new_empty((x.shape[0], w_packed.shape[0]),
                       dtype=torch.uint8 if out_s is not None else torch.float32)


# ------------------------------------------------------------------------- qbmm

@torch.library.custom_op("qgnn::qbmm", mutates_args=())
def qbmm(a: Tensor, v: Tensor, a_bits: int, v_bits: int, a_scale: float, a_offset: float,
         v_scale: float, v_offset: float, row_bits: Optional[Tensor] = None,
         row_offset: Optional[Tensor] = None) -> Tensor:
    """uint8 [T,N,N] x uint8 [T,N,D] -> fp32 [T,N,D] (the graph aggregation); per-node codes
    with row_bits / row_offset uint8 [T,N] (ref_node_rows)."""
    return backend_function(current_backend(), "qbmm")(
        a, v, a_bits, v_bits, a_scale, a_offset, v_scale, v_offset, row_bits, row_offset)


@qbmm.register_fake
def _qbmm_fake(a, v, a_bits, v_bits, a_scale, a_offset, v_scale, v_offset, row_bits=None, row_offset=None):
    return v.new_empty((v.shape[0], a.shape[1], v.shape[2]), dtype=torch.float32)


@torch.library.custom_op("qgnn::node_rows", mutates_args=())
def node_rows(v: Tensor, node_bits: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """uint8 [T,N,D] shared-grid node codes -> (codes - row minimum, row_bits [T,N], row_offset [T,N])."""
    return backend_function(current_backend(), "node_rows")(v, node_bits)


@node_rows.register_fake
def _node_rows_fake(v, node_bits):
    return (torch.empty_like(v), v.new_empty(v.shape[:2], dtype=torch.uint8),
            v.new_empty(v.shape[:2], dtype=torch.uint8))


# ------------------------------------------------------------------ pack/unpack

@torch.library.custom_op("qgnn::pack", mutates_args=())
def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [O,K] -> canonical packed uint8 [O, ceil(K/8)*bits]."""
    return backend_function(current_backend(), "pack")(codes, bits)


@pack.register_fake
def _pack_fake(codes, bits):
    return codes.new_empty((codes.shape[0], (codes.shape[1] + 7) // 8 * bits), dtype=torch.uint8)


@torch.library.custom_op("qgnn::unpack", mutates_args=())
def unpack(packed: Tensor, bits: int, k: int) -> Tensor:
    """Canonical packed uint8 [O, ceil(K/8)*bits] -> uint8 codes [O,K]."""
    return backend_function(current_backend(), "unpack")(packed, bits, k)


@unpack.register_fake
def _unpack_fake(packed, bits, k):
    return packed.new_empty((packed.shape[0], k), dtype=torch.uint8)


#: op name -> the OpOverload the exporters and counters see in traced graphs
OP_OVERLOADS = {
    "quantize": torch.ops.qgnn.quantize.default,
    "qconv2d": torch.ops.qgnn.qconv2d.default,
    "qlinear": torch.ops.qgnn.qlinear.default,
    "qbmm": torch.ops.qgnn.qbmm.default,
    "node_rows": torch.ops.qgnn.node_rows.default,
    "pack": torch.ops.qgnn.pack.default,
    "unpack": torch.ops.qgnn.unpack.default,
}

__all__ = ["quantize", "qconv2d", "qlinear", "qbmm", "node_rows", "pack", "unpack", "OP_OVERLOADS"]
