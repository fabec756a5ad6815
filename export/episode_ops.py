"""The episode-op vocabulary (qgnn_deploy/ops/episode_ops.py) as ONNX nodes.

An integer model describes its episode once, against ``ops`` (``IntModel.episode``):
``TORCH_OPS`` runs it, ``plan.PlanBuilder`` compiles it for the cpu executor, and
:class:`OnnxEpisodeOps` here emits it as an ONNX graph -- the integer exports (forms
``integer``, ``fast``, ``standard``) follow the model's own description, so a model family
needs no second one for ONNX. Layers go to :class:`~.int_layers.IntLayers` (channels-last
MatMulInteger with the contract's epilogue); the steps between them are fp32 ONNX ops with
the float64 reductions of ops/episode_ops.py (:class:`~.episode.EpisodeGraph` helpers).

Values carry their per-task logical shape (as the plan builder's do). Maps of images
``[T, N, H, W, C]`` live in the graph as ``[T*N, H, W, C]`` (``merged``: what the conv
emitters take), everything else as ``[T, ...]``; :meth:`OnnxEpisodeOps.split` reshapes a
merged value when a graph op needs the tasks axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np

from qgnn_deploy.errors import ExportError

from .builder import FLOAT, INT64, GraphBuilder
from .episode import EpisodeGraph


@dataclass(frozen=True)
class Value:
    """An ONNX tensor ``name`` holding per-task shape ``shape``; ``merged``: stored with
    the tasks and nodes axes merged (``[T*N, ...]``)."""

    name: str
    shape: Tuple[int, ...]
    merged: bool = False


Part = Union[Value, Tuple[Value, int, int]]


class OnnxEpisodeOps:
    """Emits the episode vocabulary into graph ``g`` with layer emitter ``layers``
    (an :class:`~.int_layers.IntLayers` in the channels-last layout)."""

    def __init__(self, g: GraphBuilder, config, layers):
        if getattr(layers, "layout", None) != "nhwc":
            raise ExportError("the episode-op exporter takes a channels-last integer layer emitter")
        self.g, self.L, self.cfg = g, layers, config
        self.eg = EpisodeGraph(g, config, layers)   # fp32 helpers (f64 reductions, edge update)

    # -- values -----------------------------------------------------------
    def fp(self, v: Value) -> str:
        """The fp32 tensor of ``v`` (lazy layout ops of the layer emitter applied)."""
        return self.L.materialize(v.name)

    def split(self, v: Value) -> Value:
        """``v`` with its tasks axis first ([T, N, ...])."""
        if not v.merged:
            return v
        shape = self.g.i64([-1, *v.shape], self.g.fresh("shape/split"))
        return Value(self.g.op("Reshape", [self.fp(v), shape], "split_tasks"), v.shape)

    def _scoped(self, name: str):
        return self.eg.scoped(name)

    # -- inputs -------------------------------------------------------------
    def episode_inputs(self):
        """Graph inputs and DPGN's initial graph: (images Value, (dist_node, point_edge,
        dist_edge, onehot) Values, support_labels name)."""
        g, cfg = self.g, self.cfg
        n, s, ns, way = cfg.num_nodes, cfg.image_size, cfg.num_supports, cfg.way
        images = g.add_input("images", FLOAT, ["tasks", n, 3, s, s])
        labels = g.add_input("support_labels", INT64, ["tasks", ns])
        dist_node, edge = self.eg.initial_graph(labels)
        with self._scoped("prediction"):
            lab = g.op("Unsqueeze", [labels, g.i64([-1], "axes/last")], "labels")
            onehot = g.op("Cast", [g.op("Equal", [lab, g.i64(np.arange(way), "prediction/classes")], "eq")],
                          "onehot", to=FLOAT)
        graph = (Value(dist_node, (n, ns)), Value(edge, (n, n)), Value(edge, (n, n)),
                 Value(onehot, (ns, way)))
        return Value(images, (n, 3, s, s)), graph

    # -- layers -------------------------------------------------------------
    def layer(self, module, x: Value, residual: Value = None) -> Value:
        name = module.name
        with self._scoped(name.rsplit(".", 1)[0]):
            if getattr(module, "is_conv", False) and not module.pointwise:
                n, h, w, _ = x.shape
                k, st, p = module.kernel_size, module.stride, module.padding
                ho, wo = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
                y = self.L.conv(name, x.name, residual=None if residual is None else self.fp(residual),
                                hw=(h, w))
                return Value(y, (n, ho, wo, module.out_channels), x.merged)
            out = module.out_channels if getattr(module, "is_conv", False) else module.out_features
            res = None if residual is None else self.fp(residual)
            y = (self.L.conv(name, x.name, residual=res) if getattr(module, "is_conv", False)
                 else self.L.linear(name, x.name, residual=res))
            return Value(y, (*x.shape[:-1], out), x.merged)

    def aggregate(self, module, adj: Value, nodes: Value) -> Value:
        with self._scoped(module.name.rsplit(".", 1)[0]):
            return Value(self.L.bmm(module.name, self.fp(self.split(adj)), self.fp(self.split(nodes))),
                         nodes.shape)

    # -- maps ---------------------------------------------------------------
    def images_nhwc(self, images: Value) -> Value:
        g = self.g
        n, c, h, w = images.shape
        with self._scoped("backbone"):
            flat = g.op("Reshape", [images.name, g.i64([-1, c, h, w], "shape/images_flat")], "flatten_tasks")
            y = g.op("Transpose", [flat], "to_nhwc", perm=[0, 2, 3, 1])
        return Value(y, (n, h, w, c), merged=True)

    def max_pool(self, x: Value, kernel: int, stride: int, padding: int = 0) -> Value:
        n, h, w, c = x.shape
        ho, wo = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
        if not x.merged:
            raise ExportError("max_pool: maps must come from the images (merged tasks axis)")
        return Value(self.L.maxpool(x.name, kernel, stride, padding, (h, w)), (n, ho, wo, c), True)

    def mean_hw(self, x: Value) -> Value:
        n, _, _, c = x.shape
        axes = self.g.i64([1, 2], "axes/hw_nhwc")
        return Value(self.eg.f64("ReduceMean", [self.fp(x)], "gap", [axes], keepdims=0), (n, c), x.merged)

    def flatten_hwc(self, x: Value) -> Value:
        n, h, w, c = x.shape
        if not x.merged:
            raise ExportError("flatten_hwc: maps must come from the images (merged tasks axis)")
        return Value(self.L.flatten(x.name), (n, h * w * c), True)

    # -- graph --------------------------------------------------------------
    def pairwise_sqdiff(self, v: Value) -> Value:
        g = self.g
        v = self.split(v)
        n, c = v.shape
        x = self.fp(v)
        d = g.op("Sub", [g.op("Unsqueeze", [x, g.i64([2], "axes/2")], "vi"),
                         g.op("Unsqueeze", [x, g.i64([1], "axes/1")], "vj")], "diff")
        return Value(g.op("Mul", [d, d], "sq"), (n, n, c))

    def neg_sum_last(self, x: Value) -> Value:
        """Lazy: emitted only if a graph output depends on it (DPGN's node similarities
        are a training signal, not part of the exported logits)."""
        x = self.split(x)

        def emit(t: str, codes: bool) -> str:
            s = self.eg.f64("ReduceSum", [t], "node_similarity", [self.g.i64([-1], "axes/last")], keepdims=0)
            return self.g.op("Neg", [s], "neg")
        return Value(self.L.lazy(self.fp(x), emit, "node_similarity"), x.shape[:-1])

    def squeeze_last(self, x: Value) -> Value:
        if x.shape[-1] != 1:
            raise ExportError(f"squeeze_last of a last dim {x.shape[-1]}")
        x = self.split(x)
        return Value(self.g.op("Squeeze", [self.fp(x), self.g.i64([-1], "axes/last")], "squeeze"), x.shape[:-1])

    def sigmoid(self, x: Value) -> Value:
        return Value(self.eg.f64("Sigmoid", [self.fp(x)], "sigmoid"), x.shape, x.merged)

    def edge_update(self, sim: Value, prev_edge: Value) -> Value:
        return Value(self.eg.update_edges(self.fp(self.split(sim)), self.fp(self.split(prev_edge))),
                     prev_edge.shape)

    def offdiag_l1_normalize(self, x: Value) -> Value:
        off, _ = self.eg.eye_consts()
        x = self.split(x)
        return Value(self.eg.l1_normalize(self.g.op("Mul", [self.fp(x), off], "mask_diag")), x.shape)

    def concat_last(self, parts: Sequence[Part]) -> Value:
        g = self.g
        cols, width, lead = [], 0, None
        for p in parts:
            v, a, b = (p if isinstance(p, tuple) else (p, 0, p.shape[-1]))
            v = self.split(v)
            t = self.fp(v)
            if (a, b) != (0, v.shape[-1]):
                t = g.op("Slice", [t, g.i64([a]), g.i64([b]), g.i64([-1])], "columns")
            cols.append(t)
            width += b - a
            lead = v.shape[:-1]
        return Value(g.op("Concat", cols, "cat", axis=-1), (*lead, width))

    def label_scores(self, edge: Value, onehot: Value) -> Value:
        g = self.g
        ns, way = onehot.shape
        n = edge.shape[0]
        with self._scoped("prediction"):
            rows = g.op("Slice", [self.fp(self.split(edge)), g.i64([ns, 0]), g.i64([n, ns]), g.i64([1, 2])],
                        "query_rows")
            return Value(self.eg.f64("MatMul", [rows, onehot.name], "logits"), (n - ns, way))


__all__ = ["OnnxEpisodeOps", "Value"]
