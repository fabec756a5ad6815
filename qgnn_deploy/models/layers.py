"""Quantization-aware layers: FP or PQ-quantized conv, linear and graph aggregation.

Each quantized layer keeps its float weight (the QAT master copy) and two Pauta
quantizers: ``weight_quant`` on the weight (``bits.w`` bits) and ``act_quant`` on its
input (``bits.a`` bits); the aggregation has ``adj_quant`` (``bits.w``) and ``node_quant``
(``bits.a``). ``bits`` is a :class:`~qgnn_deploy.config.LayerBits`; an int means the same
width for both. With 32 bits the layer is exactly its torch parent, so state-dict keys stay
those of the official DPGN code (``weight``, ``bias``) and FP checkpoints load directly.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerBits, check_layer_bits, check_node_bits
from ..errors import ConfigError
from ..ops.episode_ops import f32_conv2d
from ..ops.reference import count_node_widths, ref_node_rows
from ..quant.pauta import PautaQuantizer

Bits = Union[int, LayerBits]


def _quantizers(module: nn.Module, bits: Bits, out_channels: int, per_channel: bool) -> None:
    module.bits = check_layer_bits(bits, "bits")
    if module.bits.quantized:
        module.weight_quant = PautaQuantizer(module.bits.w, out_channels if per_channel else None)
        module.act_quant = PautaQuantizer(module.bits.a)
    else:
        module.weight_quant = None
        module.act_quant = None


class QConv2d(nn.Conv2d):
    """``nn.Conv2d`` with PQ on weight (``bits.w``) and input activation (``bits.a``) below 32 bits."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = False, bits: Bits = 32, per_channel: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         bias=bias)
        _quantizers(self, bits, out_channels, per_channel)

    @property
    def quantized(self) -> bool:
        return self.bits.quantized

    def fp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The full-precision product ``W * A`` (AQD's ``A_f``)."""
        return self._conv_forward(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(self.act_quant(x), self.weight_quant(self.weight), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.bits.w}, a_bits={self.bits.a}"


class F64Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose products are summed in float64 and rounded once to float32: the
    FP32 layers of the paper (stem conv, edge-MLP output convs). Every engine -- this model,
    the integer model's reference and compiled plan -- then produces the same float32
    values whatever its summation order (ops/episode_ops.py); the stem's outputs feed two
    quantizers per pixel, where a last-ulp difference would flip codes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return f32_conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0])


class QLinear(nn.Linear):
    """``nn.Linear`` with PQ on weight (``bits.w``) and input activation (``bits.a``) below 32 bits."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: Bits = 32,
                 per_channel: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        _quantizers(self, bits, out_features, per_channel)

    @property
    def quantized(self) -> bool:
        return self.bits.quantized

    def fp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return F.linear(x, self.weight, self.bias)
        return F.linear(self.act_quant(x), self.weight_quant(self.weight), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.bits.w}, a_bits={self.bits.a}"


class QAggregation(nn.Module):
    """The graph aggregation ``A @ V`` (batched), with PQ on both operands.

    ``A``: [T, N, N] normalised adjacency (``bits.w``), ``V``: [T, N, D] node features
    (``bits.a``). With ``node_bits`` (A2Q-style per-node bits, e.g. ``(2, 4, 8)``) the node
    quantizer runs at ``max(node_bits)`` and each node row is stored at the fewest widths of
    the set that hold its codes minus the row's minimum code (ops.reference.ref_node_rows):
    the values are those of the ``max(node_bits)`` grid, so per-node bits lose nothing at a
    given step; QAT trades the step against :meth:`soft_node_bits` (training/losses.py).
    """

    def __init__(self, bits: Bits = 32, node_bits: Tuple[int, ...] = ()):
        super().__init__()
        self.bits = check_layer_bits(bits, "bits")
        self.node_bits = check_node_bits(node_bits) if self.bits.quantized and node_bits else ()
        if self.node_bits and self.bits.a != self.node_bits[-1]:
            raise ConfigError(f"per-node widths {list(self.node_bits)} need the node grid at "
                              f"{self.node_bits[-1]} bits, got bits.a={self.bits.a}")
        self.last_soft_node_bits: Optional[torch.Tensor] = None
        self.node_stats: Optional[Dict[int, int]] = None  # set to {} to count {width: nodes}
        if self.bits.quantized:
            self.adj_quant: Optional[PautaQuantizer] = PautaQuantizer(self.bits.w)
            self.node_quant: Optional[PautaQuantizer] = PautaQuantizer(self.bits.a)
        else:
            self.adj_quant = None
            self.node_quant = None

    @property
    def quantized(self) -> bool:
        return self.bits.quantized

    def fp_forward(self, adj: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        return torch.bmm(adj, nodes)

    def soft_node_bits(self, nodes: torch.Tensor) -> torch.Tensor:
        """Differentiable mean per-node width ``log2(1 + span_j / s)`` over the nodes of
        ``nodes`` [T, N, D] (span_j: the row's value range clipped to the quantizer's),
        a smooth stand-in for the integer rule's mean width; its gradient grows the step."""
        q = self.node_quant
        lo, hi = q.l, q.r
        x = torch.minimum(torch.maximum(nodes, lo), hi)
        span = x.amax(-1) - x.amin(-1)
        return torch.log2(1.0 + span / q.step_with_grad()).mean()

    def forward(self, adj: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return torch.bmm(adj, nodes)
        vq = self.node_quant(nodes)
        if self.node_bits and self.training:
            self.last_soft_node_bits = self.soft_node_bits(nodes)
        if self.node_bits and self.node_stats is not None:
            count_node_widths(self.node_stats, ref_node_rows(self.node_quant.codes(nodes.detach()),
                                                             self.node_bits)[1])
        return torch.bmm(self.adj_quant(adj), vq)

    def extra_repr(self) -> str:
        nb = f", per-node widths {list(self.node_bits)}" if self.node_bits else ""
        return f"adj_bits={self.bits.w}, node_bits={self.bits.a}{nb}"
