"""Layer emitters for FP32 models: Conv / MatMul / BatchNormalization / LeakyRelu.

:class:`FloatLayers` (DPGN's float :class:`~qgnn_deploy.models.QGNNModel`, NCHW, for
:class:`~.episode.EpisodeGraph`): BatchNorm stays a ``BatchNormalization`` node (eval
statistics); onnxruntime folds it into the preceding Conv and fuses the LeakyReLU, so the
FP32 baseline is as fast as onnxruntime makes it, and the graph stays readable.

:class:`FoldedFloatLayers` (the folded FP32 model of any family, for
:class:`~.episode_ops.OnnxEpisodeOps`): the FP32 export emitted from the model's episode
description, for families that have no other (EGNN).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from qgnn_deploy.errors import ExportError

from .builder import GraphBuilder


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


class FloatLayers:
    """Emits the layers of a float :class:`~qgnn_deploy.models.QGNNModel`, by name."""

    layout = "nchw"

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


class FoldedFloatLayers:
    """Emits the layers of a *folded* FP32 model (``qgnn_deploy.fold.fold`` of an FP32 model:
    FloatConv2d / FloatLinear / FloatAggregation with the BatchNorm as ``post_scale`` /
    ``post_shift``) for :class:`~.episode_ops.OnnxEpisodeOps`, as a plain fp32 graph: Conv for
    the maps, MatMul for linears, 1x1 convs over ``[..., C]`` and the aggregation, the folded
    BatchNorm merged into weight and bias (what onnxruntime's BN fusion would make of it) --
    the nodes onnxruntime's ``quantize_static`` quantizes. The FP32 export of a family whose
    only episode description is the integer model's (EGNN).

    The episode ops see channels-last values (``layout``); a conv or pool output stays NCHW in
    the graph behind a lazy channels-last name (:meth:`from_nchw`), so a conv -> pool -> conv
    chain has no Transpose: one is emitted only for a channels-last consumer
    (:meth:`materialize`)."""

    layout = "nhwc"

    def __init__(self, g: GraphBuilder, model):
        self.g = g
        self.layers = dict(model.named_layers())
        self._nchw: Dict[str, str] = {}           # lazy channels-last name -> its NCHW tensor
        self._materialized: Dict[str, str] = {}

    def layer(self, name: str, kind: str):
        m = self.layers.get(name)
        if m is None:
            raise ExportError(f"layer {name!r}: not in the folded model")
        if getattr(m, "kind", None) != kind:
            raise ExportError(f"layer {name!r}: a float export needs FP32 layers ({kind}), found "
                              f"{type(m).__name__}; export the integer model instead")
        return m

    # -- layouts ------------------------------------------------------------
    def from_nchw(self, y_nchw: str) -> str:
        """A channels-last name for the NCHW tensor ``y_nchw``, transposed only when read as such."""
        name = self.g.fresh("nhwc_lazy")
        self._nchw[name] = y_nchw
        return name

    def materialize(self, x: str) -> str:
        """The channels-last fp32 tensor behind ``x``."""
        if x not in self._nchw:
            return x
        if x not in self._materialized:
            self._materialized[x] = self.g.op("Transpose", [self._nchw[x]], "to_nhwc", perm=[0, 2, 3, 1])
        return self._materialized[x]

    def nchw(self, x: str) -> str:
        """The NCHW tensor of channels-last ``x`` [B, H, W, C]."""
        return self._nchw.get(x) or self.g.op("Transpose", [x], "to_nchw", perm=[0, 3, 1, 2])

    # -- layers -------------------------------------------------------------
    def _merged(self, m, weight: torch.Tensor):
        """(weight * post_scale, bias * post_scale + post_shift) as fp32 arrays, the output
        channel first; bias None when the layer has neither bias nor shift."""
        w = weight.detach().float()
        b = None if m.bias is None else m.bias.detach().float()
        if m.post_scale is not None:
            w = w * m.post_scale.view(-1, *[1] * (w.dim() - 1))
            b = None if b is None else b * m.post_scale
        if m.post_shift is not None:
            b = m.post_shift.float() if b is None else b + m.post_shift
        return _np(w), None if b is None else _np(b)

    def _finish(self, y: str, m, residual: Optional[str]) -> str:
        if residual is not None:
            y = self.g.op("Add", [y, residual], "residual")
        if m.slope is not None:
            y = self.g.op("LeakyRelu", [y], "lrelu", alpha=float(m.slope))
        return y

    def _matmul(self, x: str, m, w_ok: np.ndarray, b: Optional[np.ndarray]) -> str:
        """x [..., K] @ w.T (+ b): one MatMul on the last dim, any leading shape."""
        g = self.g
        y = g.op("MatMul", [self.materialize(x), g.f32(np.ascontiguousarray(w_ok.T), f"{m.name}.weight_t")],
                 "matmul")
        return y if b is None else g.op("Add", [y, g.f32(b, f"{m.name}.bias")], "bias")

    def conv(self, name: str, x: str, residual: Optional[str] = None, hw=None) -> str:
        """Channels-last x [B, H, W, C] -> [B, Ho, Wo, O] (a Conv on the NCHW tensor); a 1x1
        conv on [..., C] (the graph MLPs' pairs and nodes) is a MatMul."""
        m = self.layer(name, "conv2d_fp32")
        w, b = self._merged(m, m.weight)
        if m.pointwise:
            res = None if residual is None else self.materialize(residual)
            return self._finish(self._matmul(x, m, w.reshape(m.out_channels, -1), b), m, res)
        g = self.g
        ins = [self.nchw(x), g.f32(w, f"{name}.weight")] + ([] if b is None else [g.f32(b, f"{name}.bias")])
        k, p = m.kernel_size, m.padding
        y = g.op("Conv", ins, "conv", kernel_shape=[k, k], strides=[m.stride] * 2, pads=[p] * 4)
        return self.from_nchw(self._finish(y, m, None if residual is None else self.nchw(residual)))

    def linear(self, name: str, x: str, residual: Optional[str] = None) -> str:
        """x [..., K] -> [..., O] (a flattened map in the fold's (h, w, C) order)."""
        m = self.layer(name, "linear_fp32")
        w, b = self._merged(m, m.weight)
        return self._finish(self._matmul(x, m, w, b), m, None if residual is None else self.materialize(residual))

    def bmm(self, name: str, adj: str, nodes: str, nodes_shape=None) -> str:
        """adj [T, ..., n, n] @ nodes [T, ..., n, D] (MatMul broadcasts the graph axes)."""
        self.layer(name, "bmm_fp32")
        return self.g.op("MatMul", [adj, nodes], "aggregate")

    # -- maps ---------------------------------------------------------------
    def maxpool(self, x: str, kernel: int, stride: int, pad: int, hw=None) -> str:
        y = self.g.op("MaxPool", [self.nchw(x)], "maxpool", kernel_shape=[kernel, kernel],
                      strides=[stride, stride], pads=[pad] * 4)
        return self.from_nchw(y)

    def flatten(self, x: str) -> str:
        """[B, H, W, C] -> [B, H*W*C] in (h, w, C) order, the fold's column order."""
        return self.g.op("Flatten", [self.materialize(x)], "flatten", axis=1)
