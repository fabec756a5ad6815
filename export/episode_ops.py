"""The episode-op vocabulary (qgnn_deploy/ops/episode_ops.py) as ONNX nodes.

An integer model describes its episode once, against ``ops`` (``IntModel.episode``):
``TORCH_OPS`` runs it, ``plan.PlanBuilder`` compiles it for the cpu executor, and
:class:`OnnxEpisodeOps` here emits it as an ONNX graph -- the integer exports (forms
``integer``, ``fast``, ``standard``) of every family, and EGNN's FP32 export, follow the
model's own description, so a model family needs no second one for ONNX. Layers go to the
layer emitter: :class:`~.int_layers.IntLayers` (channels-last MatMulInteger with the
contract's epilogue) or :class:`~.float_layers.FoldedFloatLayers` (plain fp32 Conv / MatMul
of a folded FP32 model); the steps between them are fp32 ONNX ops in the operation order of
ops/episode_ops.py, with its float64 reductions (:class:`~.episode.EpisodeGraph` helpers), so
every quantizer sees the reference engine's fp32 values.

Values carry their per-task logical shape (as the plan builder's do). Maps of images
``[T, N, H, W, C]`` live in the graph as ``[T*N, H, W, C]`` (``merged``: what the conv
emitters take), everything else as ``[T, ...]``; :meth:`OnnxEpisodeOps.split` reshapes a
merged value when a graph op needs the tasks axis. DPGN's graph values are ``[T, N, ...]``;
EGNN's carry a graphs axis G (G = way query graphs of M = NS + 1 nodes, or one transductive
graph of M = N): nodes ``[T, G, M, E]``, edges ``[T, G, M, M]``, pairs ``[T, G, M, M, F]``.

A model family's ONNX export needs, besides the ops its description uses, its label-derived
episode inputs built in the graph (``_<family>_graph``, the counterpart of the family's
``graph_arrays`` in qgnn_deploy/intmodel.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from qgnn_deploy.config import config_family
from qgnn_deploy.errors import ExportError
from qgnn_deploy.ops.episode_ops import EDGE_EPS

from .builder import DOUBLE, FLOAT, INT64, GraphBuilder
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
    """Emits the episode vocabulary into graph ``g`` with layer emitter ``layers`` (channels
    last: an :class:`~.int_layers.IntLayers` integer form or a
    :class:`~.float_layers.FoldedFloatLayers`)."""

    def __init__(self, g: GraphBuilder, config, layers):
        if getattr(layers, "layout", None) != "nhwc":
            raise ExportError("the episode-op exporter takes a channels-last layer emitter")
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
        """The graph inputs ``images`` float32 [tasks, N, 3, S, S] and ``support_labels`` int64
        [tasks, NS], and the family's label-derived inputs built from the labels (the
        ``graph`` argument of ``IntModel.episode``): (images Value, graph Values)."""
        g, cfg = self.g, self.cfg
        n, s, ns = cfg.num_nodes, cfg.image_size, cfg.num_supports
        images = g.add_input("images", FLOAT, ["tasks", n, 3, s, s])
        labels = g.add_input("support_labels", INT64, ["tasks", ns])
        family = config_family(cfg)
        build = {"dpgn": self._dpgn_graph, "egnn": self._egnn_graph}.get(family)
        if build is None:
            raise ExportError(f"no ONNX episode inputs for model family {family!r} "
                              "(export/episode_ops.py: OnnxEpisodeOps._<family>_graph)")
        return Value(images, (n, 3, s, s)), build(labels)

    def _onehot(self, labels: str) -> Value:
        """The support labels one-hot [T, NS, way] float32."""
        g, cfg = self.g, self.cfg
        with self._scoped("prediction"):
            lab = g.op("Unsqueeze", [labels, g.i64([-1], "axes/last")], "labels")
            onehot = g.op("Cast", [g.op("Equal", [lab, g.i64(np.arange(cfg.way), "prediction/classes")], "eq")],
                          "onehot", to=FLOAT)
        return Value(onehot, (cfg.num_supports, cfg.way))

    def _dpgn_graph(self, labels: str):
        """DPGN's initial (distribution_node [T, N, NS], point_edge, distribution_edge [T, N, N],
        onehot [T, NS, way]) (models.qgnn.episode_graph)."""
        n, ns = self.cfg.num_nodes, self.cfg.num_supports
        dist_node, edge = self.eg.initial_graph(labels)
        return Value(dist_node, (n, ns)), Value(edge, (n, n)), Value(edge, (n, n)), self._onehot(labels)

    def _egnn_graph(self, labels: str):
        """EGNN's initial (edge_sim, edge_dsim [T, G, M, M], onehot [T, NS, way])
        (intmodel.egnn_graph_arrays): support pairs ``(same, 1 - same)``, every pair with a
        query 0.5 / 0.5; transductive (one graph of all N nodes, models.egnn.initial_edges): a
        query's self-edge (1, 0); otherwise (models.egnn.query_graph_edges) one graph per query,
        the supports then that query, the same edges in each."""
        g, cfg = self.g, self.cfg
        ns = cfg.num_supports
        graphs, m = (1, cfg.num_nodes) if cfg.transductive else (cfg.num_queries, ns + 1)
        edges = []
        with self._scoped("initial_graph"):
            a = g.op("Unsqueeze", [labels, g.i64([-1], "axes/last")], "li")
            b = g.op("Unsqueeze", [labels, g.i64([-2], "axes/second_last")], "lj")
            same = g.op("Cast", [g.op("Equal", [a, b], "same")], "same_f", to=FLOAT)     # [T, NS, NS]
            blocks = (("sim", same, 1.0), ("dsim", g.op("Sub", [g.f32(1.0, "const/one_f32"), same], "differ"), 0.0))
            for channel, block, self_edge in blocks:
                base = np.full((m, m), 0.5, np.float32)
                base[:ns, :ns] = 0.0       # the support block comes from the labels (padded with 0)
                if cfg.transductive:
                    q = np.arange(ns, m)
                    base[q, q] = self_edge
                e = g.op("Pad", [block, g.i64([0, 0, 0, 0, m - ns, m - ns]), g.f32(0.0, "const/zero_f32")],
                         f"{channel}_pad")
                e = g.op("Add", [e, g.f32(base, f"initial_graph/{channel}_base")], f"edge_{channel}")
                e = g.op("Unsqueeze", [e, g.i64([1], "axes/1")], f"{channel}_graphs")   # [T, 1, M, M]
                if graphs > 1:
                    e = g.op("Expand", [e, g.i64([1, graphs, m, m], "initial_graph/graphs_shape")],
                             f"{channel}_per_query")
                edges.append(Value(e, (graphs, m, m)))
        return (*edges, self._onehot(labels))

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
        """adj [T, ..., n, n] @ nodes [T, ..., n, D], each graph on its own."""
        *lead, n, _ = nodes.shape
        if tuple(adj.shape) != (*lead, n, n):
            raise ExportError(f"layer {module.name!r}: aggregates {adj.shape} adjacencies over {nodes.shape} nodes")
        with self._scoped(module.name.rsplit(".", 1)[0]):
            return Value(self.L.bmm(module.name, self.fp(self.split(adj)), self.fp(self.split(nodes)), nodes.shape),
                         nodes.shape)

    # -- maps ---------------------------------------------------------------
    def images_nhwc(self, images: Value) -> Value:
        g = self.g
        n, c, h, w = images.shape
        with self._scoped("backbone"):
            flat = g.op("Reshape", [images.name, g.i64([-1, c, h, w], "shape/images_flat")], "flatten_tasks")
        return Value(self.L.from_nchw(flat), (n, h, w, c), merged=True)

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

    def pairwise_absdiff(self, v: Value) -> Value:
        """``|v_i - v_j|`` per graph: [T, ..., M, C] -> [T, ..., M, M, C]."""
        g = self.g
        v = self.split(v)
        *lead, m, c = v.shape
        x = self.fp(v)
        d = g.op("Sub", [g.op("Unsqueeze", [x, g.i64([-2], "axes/second_last")], "vi"),
                         g.op("Unsqueeze", [x, g.i64([-3], "axes/third_last")], "vj")], "diff")
        return Value(g.op("Abs", [d], "absdiff"), (*lead, m, m, c))

    def take_rows(self, x: Value, index) -> Value:
        """Rows of each task's ``x`` [T, ..., C] (its per-task dims but the last flattened to rows
        R) by the constant ``index`` (shape L): one Gather, [T, *L, C]."""
        g = self.g
        idx = np.asarray(index, dtype=np.int64)
        x = self.split(x)
        c = x.shape[-1]
        rows = math.prod(x.shape[:-1])
        if idx.size == 0 or idx.min() < 0 or idx.max() >= rows:
            raise ExportError(f"take_rows of {x.shape} needs row indices in [0, {rows})")
        t = self.fp(x)
        if len(x.shape) > 2:
            t = g.op("Reshape", [t, g.i64([0, rows, c])], "as_rows")
        return Value(g.op("Gather", [t, g.i64(idx)], "take_rows", axis=1), (*idx.shape, c))

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
        """``1 / (1 + exp(-x))`` in float64, rounded once. Not onnxruntime's Sigmoid: its
        float64 kernel loses the relative precision below x ~ -30 and gives 0 from -37 on
        (torch: 6.3e-17 at -37.3), a difference EGNN's row normalisations of tiny
        similarities turn into O(1) changes of the edges."""
        g = self.g
        one = g.const(np.float64(1.0), "const/one_f64")
        d = g.op("Cast", [self.fp(x)], "sigmoid_f64in", to=DOUBLE)
        e = g.op("Exp", [g.op("Neg", [d], "sigmoid_neg")], "sigmoid_exp")
        y = g.op("Div", [one, g.op("Add", [one, e], "sigmoid_denominator")], "sigmoid_f64")
        return Value(g.op("Cast", [y], "sigmoid", to=FLOAT), x.shape, x.merged)

    def edge_update(self, sim: Value, prev_edge: Value) -> Value:
        return Value(self.eg.update_edges(self.fp(self.split(sim)), self.fp(self.split(prev_edge))),
                     prev_edge.shape)

    def edge_update_2ch(self, sim: Value, prev_sim: Value, prev_dsim: Value) -> Tuple[Value, Value]:
        """EGNN's edge update on [T, ..., M, M] (ops/episode_ops.py, same order): per channel
        ``E_c = l1_normalize_rows(w_c * M_c) * rowsum(M_c)``, ``M_c = prev_c * (1 - I)``, ``w =
        (sim, 1 - sim)``; ``E_sim + I``; both ``+ EDGE_EPS``; each divided by their sum."""
        g, eg = self.g, self.eg
        shape = prev_sim.shape
        if sim.shape != shape or prev_dsim.shape != shape or shape[-1] != shape[-2]:
            raise ExportError(f"edge_update_2ch of {sim.shape}, {prev_sim.shape}, {prev_dsim.shape}")
        m = shape[-1]
        s = self.fp(self.split(sim))
        eye = g.f32(np.eye(m, dtype=np.float32), f"const/eye_{m}")
        eps = g.f32(EDGE_EPS, "const/edge_eps")
        last = g.i64([-1], "axes/last")
        outs = []
        for w, prev, force in ((s, prev_sim, eye),
                               (g.op("Sub", [g.f32(1.0, "const/one_f32"), s], "dissimilarity"), prev_dsim, None)):
            masked = g.op("Mul", [self.fp(self.split(prev)), self.eg.off_diag(m)], "mask_diag")
            edge = eg.l1_normalize(g.op("Mul", [w, masked], "weighted"))
            edge = g.op("Mul", [edge, eg.f64("ReduceSum", [masked], "prev_sum", [last], keepdims=1)], "rescale")
            if force is not None:   # the dissimilarity channel adds zeros: nothing to emit
                edge = g.op("Add", [edge, force], "add_eye")
            outs.append(g.op("Add", [edge, eps], "add_eps"))
        total = g.op("Add", outs, "channel_sum")
        return (Value(g.op("Div", [outs[0], total], "sim_norm"), shape),
                Value(g.op("Div", [outs[1], total], "dsim_norm"), shape))

    def offdiag_l1_normalize(self, x: Value) -> Value:
        """``l1_normalize_rows(x * (1 - I))`` of every [n, n] matrix of [T, ..., n, n]."""
        x = self.split(x)
        masked = self.g.op("Mul", [self.fp(x), self.eg.off_diag(x.shape[-1])], "mask_diag")
        return Value(self.eg.l1_normalize(masked), x.shape)

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

    def label_scores(self, edge: Value, onehot: Value, first_row: Optional[int] = None) -> Value:
        """The rows from ``first_row`` (default NS) of ``edge`` [T, R, W], its first NS columns,
        times the one-hot labels [T, NS, way] (float64 sum): [T, R - first_row, way]."""
        g = self.g
        ns, way = onehot.shape
        r, w = edge.shape
        r0 = ns if first_row is None else int(first_row)
        if not 0 <= r0 < r or w < ns:
            raise ExportError(f"label_scores of {edge.shape} edges from row {r0}, {ns} supports")
        with self._scoped("prediction"):
            rows = g.op("Slice", [self.fp(self.split(edge)), g.i64([r0, 0]), g.i64([r, ns]), g.i64([1, 2])],
                        "query_rows")
            return Value(self.eg.f64("MatMul", [rows, onehot.name], "logits"), (r - r0, way))


__all__ = ["OnnxEpisodeOps", "Value"]
