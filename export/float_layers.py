"""Layer emitter for the FP32 model: Conv / MatMul / BatchNormalization / LeakyRelu.

BatchNorm stays a ``BatchNormalization`` node (eval statistics): onnxruntime folds it
into the preceding Conv and fuses the LeakyReLU, so the FP32 baseline is as fast as
onnxruntime makes it, and the graph stays readable.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from qgnn_deploy.errors import ExportError

from .builder import GraphBuilder


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


class FloatLayers:
    """Emits the layers of a float :class:`~qgnn_deploy.models.QGNNModel`, by name."""

    def __init__(self, g: GraphBuilder, model: nn.Module):
        self.g, self.model = g, model

    def module(self, name: str, kinds) -> nn.Module:
        try:
            m = self.model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"layer {name!r}: not found in the model") from None
        if not isinstance(m, kinds):
            raise ExportError(f"layer {name!r}: expected {kinds}, found {type(m).__name__}")
        if getattr(m, "quantized", False):
            raise ExportError(f"layer {name!r}: fake-quant layer (w{m.bits.w}a{m.bits.a}) in a float "
                              "export; fold the model first (export_onnx does it for QGNNModel)")
        return m

    def batchnorm(self, name: str, x: str) -> str:
        bn = self.module(name, nn.modules.batchnorm._BatchNorm)
        if bn.running_mean is None:
            raise ExportError(f"layer {name!r}: BatchNorm without running statistics")
        g = self.g
        weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
        bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        return g.op("BatchNormalization",
                    [x, g.f32(_np(weight), f"{name}.weight"), g.f32(_np(bias), f"{name}.bias"),
                     g.f32(_np(bn.running_mean), f"{name}.running_mean"),
                     g.f32(_np(bn.running_var), f"{name}.running_var")],
                    "bn", epsilon=float(bn.eps))

    def _epilogue(self, y: str, bn: Optional[str], slope: Optional[float],
                  residual: Optional[str]) -> str:
        if bn is not None:
            y = self.batchnorm(bn, y)
        if residual is not None:
            y = self.g.op("Add", [y, residual], "residual")
        if slope is not None:
            y = self.g.op("LeakyRelu", [y], "lrelu", alpha=float(slope))
        return y

    def conv(self, name: str, x: str, bn: Optional[str] = None, slope: Optional[float] = None,
             residual: Optional[str] = None) -> str:
        """x float NCHW -> float NCHW: conv, [BN], [+ residual], [LeakyReLU]."""
        m = self.module(name, nn.Conv2d)
        if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ExportError(f"layer {name!r}: only dense, undilated, zero-padded convs export")
        g = self.g
        ins = [x, g.f32(_np(m.weight), f"{name}.weight")]
        if m.bias is not None:
            ins.append(g.f32(_np(m.bias), f"{name}.bias"))
        ph, pw = m.padding
        y = g.op("Conv", ins, "conv", kernel_shape=list(m.kernel_size), strides=list(m.stride),
                 pads=[ph, pw, ph, pw])
        return self._epilogue(y, bn, slope, residual)

    def linear(self, name: str, x: str, bn: Optional[str] = None, slope: Optional[float] = None,
               residual: Optional[str] = None) -> str:
        """x float [..., K] -> [..., O]."""
        m = self.module(name, nn.Linear)
        g = self.g
        y = g.op("MatMul", [x, g.f32(_np(m.weight).T, f"{name}.weight_t")], "matmul")
        if m.bias is not None:
            y = g.op("Add", [y, g.f32(_np(m.bias), f"{name}.bias")], "bias")
        return self._epilogue(y, bn, slope, residual)

    def bmm(self, name: str, adj: str, nodes: str) -> str:
        """adj [T, N, N] @ nodes [T, N, D]."""
        m = self.model.get_submodule(name)
        if getattr(m, "quantized", False):
            raise ExportError(f"layer {name!r}: fake-quant aggregation in a float export")
        return self.g.op("MatMul", [adj, nodes], "aggregate")
