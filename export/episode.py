"""The whole DPGN episode (ResNet-12 backbone + graph generations + prediction) as ONNX.

The graph mirrors :meth:`qgnn_deploy.models.QGNNModel.forward` op by op, NCHW, for the
*float* model: against a layer emitter that turns each conv / linear / aggregation (looked
up by its qualified name, e.g. ``backbone.layer1.0.conv2``) into ONNX nodes --
:class:`~qgnn_deploy.export.float_layers.FloatLayers` for the FP32 export,
:class:`~qgnn_deploy.export.int_layers.IntLayers` in its ``qdq`` form (QCDQ around float
Conv / MatMul). The integer forms do not use this file: they emit the integer model's own
episode description (:mod:`.episode_ops`). Everything
between the layers (pair features, edge updates, normalisations, concatenations,
pooling, the initial graph and the logits) is plain fp32 ONNX here.

Graph signature::

    images          float32 [tasks, N, 3, S, S]   N = way*shot + way (fixed by the config)
    support_labels  int64   [tasks, way*shot]
    logits          float32 [tasks, way, way]     (query rows x classes)

``tasks`` is a dynamic axis.
"""
from __future__ import annotations

import numpy as np

from .builder import DOUBLE, FLOAT, INT64, GraphBuilder

GRAPH_SLOPE = 0.01  # nn.LeakyReLU() default in the official graph modules
STEM_SLOPE = 0.01


class EpisodeGraph:
    """Builds the episode graph of ``config`` with layer emitter ``layers``."""

    def __init__(self, g: GraphBuilder, config, layers):
        self.g, self.cfg, self.L = g, config, layers
        self.n = config.num_nodes
        self.ns = config.num_supports
        self.q = config.way

    # -------------------------------------------------------------- helpers
    def scoped(self, scope: str):
        g = self.g

        class _Scope:
            def __enter__(self_):
                self_.prev = g.scope
                g.scope = scope

            def __exit__(self_, *exc):
                g.scope = self_.prev
        return _Scope()

    def f64(self, op_type: str, tensors, hint: str, extra=(), **attrs) -> str:
        """``op_type`` on the float64 casts of ``tensors`` (then the ``extra`` inputs, e.g.
        reduction axes), rounded once to float32: the reductions, the sigmoid and the logits
        of ops/episode_ops.py, which every engine computes this way so that none of them
        can flip a downstream code."""
        g = self.g
        cast = [g.op("Cast", [x], f"{hint}_f64in", to=DOUBLE) for x in tensors]
        return g.op("Cast", [g.op(op_type, cast + list(extra), f"{hint}_f64", **attrs)], hint, to=FLOAT)

    def lrelu(self, x: str, slope: float) -> str:
        return self.g.op("LeakyRelu", [x], "lrelu", alpha=float(slope))

    # ------------------------------------------------------------- backbone
    def block(self, x: str, i: int) -> str:
        p = f"backbone.layer{i}.0"
        slope = self.cfg.leaky_slope_backbone
        with self.scoped(p):
            residual = self.L.conv(f"{p}.conv", x, bn=f"{p}.bn")
            out = self.L.conv(f"{p}.conv1", x, bn=f"{p}.bn1", slope=slope)
            out = self.L.conv(f"{p}.conv2", out, bn=f"{p}.bn2", slope=slope)
            out = self.L.conv(f"{p}.conv3", out, bn=f"{p}.bn3", slope=slope, residual=residual)
            return self.g.op("MaxPool", [out], "maxpool", kernel_shape=[3, 3], strides=[2, 2],
                             pads=[1, 1, 1, 1])

    def backbone(self, images: str):
        """images [T, N, 3, S, S] -> (last, second) [T, N, E]."""
        g, s = self.g, self.cfg.image_size
        x = g.op("Reshape", [images, g.i64([-1, 3, s, s], "shape/images_flat")], "flatten_tasks")
        with self.scoped("backbone"):
            x = self.L.conv("backbone.conv1", x, bn="backbone.bn1", slope=STEM_SLOPE)
        x = self.block(x, 1)
        x = self.block(x, 2)
        inter = self.block(x, 3)
        x = self.block(inter, 4)
        emb = self.cfg.emb_dim
        shape = g.i64([-1, self.n, emb], "shape/nodes")
        with self.scoped("backbone.layer_last"):
            axes = g.i64([2, 3], "axes/hw")
            pooled = self.f64("ReduceMean", [x], "gap", [axes], keepdims=0)
            last = self.L.linear("backbone.layer_last.0", pooled, bn="backbone.layer_last.1")
            last = g.op("Reshape", [last, shape], "nodes")
        with self.scoped("backbone.layer_second"):
            pooled = g.op("MaxPool", [inter], "maxpool2", kernel_shape=[2, 2], strides=[2, 2])
            flat = g.op("Flatten", [pooled], "flatten", axis=1)
            second = self.L.linear("backbone.layer_second.0", flat, bn="backbone.layer_second.1")
            second = g.op("Reshape", [second, shape], "nodes")
        return last, second

    # ---------------------------------------------------------------- graph
    def initial_graph(self, labels: str):
        """DPGN's initial distribution nodes [T, N, NS] and edges [T, N, N]."""
        g, n, ns, q = self.g, self.n, self.ns, self.q
        with self.scoped("initial_graph"):
            a = g.op("Unsqueeze", [labels, g.i64([-1], "axes/last")], "li")
            b = g.op("Unsqueeze", [labels, g.i64([-2], "axes/second_last")], "lj")
            same = g.op("Cast", [g.op("Equal", [a, b], "same")], "same_f", to=FLOAT)  # [T,NS,NS]
            dist_node = g.op("Pad", [same, g.i64([0, 0, 0, 0, q, 0]),
                                     g.f32(1.0 / ns)], "dist_node")
            base = np.zeros((n, n), np.float32)
            base[ns:, :ns] = 1.0 / ns
            base[:ns, ns:] = 1.0 / ns
            base[ns:, ns:] = np.eye(q, dtype=np.float32)
            padded = g.op("Pad", [same, g.i64([0, 0, 0, 0, q, q]), g.f32(0.0)], "edge_pad")
            edge = g.op("Add", [padded, g.f32(base, "initial_graph/edge_base")], "edge")
        return dist_node, edge

    def off_diag(self, n=None) -> str:
        """``1 - I`` [n, n] as an initializer (n: the episode's N by default)."""
        n = self.n if n is None else int(n)
        name = "const/off_diag" if n == self.n else f"const/off_diag_{n}"
        return self.g.f32(1.0 - np.eye(n, dtype=np.float32), name)

    def eye_consts(self):
        """(1 - I, I + 1e-6) as [N, N] initializers: the diagonal mask and the identity the
        edge update adds back."""
        eye = np.eye(self.n, dtype=np.float32)
        return self.off_diag(), self.g.f32(eye + np.float32(1e-6), "const/eye_eps")

    def l1_normalize(self, x: str) -> str:
        """``F.normalize(x, p=1, dim=-1)``: x / max(sum |x|, 1e-12)."""
        g = self.g
        norm = self.f64("ReduceSum", [g.op("Abs", [x], "abs")], "l1", [g.i64([-1], "axes/last")], keepdims=1)
        norm = g.op("Max", [norm, g.f32(1e-12, "const/eps_normalize")], "l1_clamp")
        return g.op("Div", [x, norm], "normalize")

    def update_edges(self, sim: str, prev_edge: str) -> str:
        g = self.g
        off, eye_eps = self.eye_consts()
        last = g.i64([-1], "axes/last")
        prev = g.op("Mul", [prev_edge, off], "mask_diag")
        prev_sum = self.f64("ReduceSum", [prev], "prev_sum", [last], keepdims=1)
        edge = self.l1_normalize(g.op("Mul", [sim, prev], "sim_x_prev"))
        edge = g.op("Mul", [edge, prev_sum], "rescale")
        edge = g.op("Add", [edge, eye_eps], "add_eye")
        total = self.f64("ReduceSum", [edge], "row_sum", [last], keepdims=1)
        return g.op("Div", [edge, total], "rownorm")

    def similarity(self, name: str, nodes: str, prev_edge: str, dropout: bool) -> str:
        """PointSimilarity: nodes [T, N, C], prev_edge [T, N, N] -> new edge [T, N, N].

        ``dropout``: whether the edge MLP has Dropout2d layers (shifts its Sequential
        indices: convs at 0, 4, 8 with dropout, 0, 3, 6 without)."""
        g = self.g
        with self.scoped(name):
            vi = g.op("Unsqueeze", [nodes, g.i64([2], "axes/2")], "vi")
            vj = g.op("Unsqueeze", [nodes, g.i64([1], "axes/1")], "vj")
            d = g.op("Sub", [vi, vj], "diff")
            sq = g.op("Mul", [d, d], "sq")
            x = g.op("Transpose", [sq], "pairs", perm=[0, 3, 1, 2])   # [T, C, N, N]
            t = f"{name}.point_sim_transform"
            x = self.L.conv(f"{t}.0", x, bn=f"{t}.1", slope=GRAPH_SLOPE)
            idx = (4, 8) if dropout else (3, 6)
            x = self.L.conv(f"{t}.{idx[0]}", x, bn=f"{t}.{idx[0] + 1}", slope=GRAPH_SLOPE)
            x = self.L.conv(f"{t}.{idx[1]}", x)  # FP32 by design, with bias
            sim = self.f64("Sigmoid", [x], "sigmoid")
            sim = g.op("Squeeze", [sim, g.i64([1], "axes/1")], "sim")
            return self.update_edges(sim, prev_edge)

    def p2d(self, name: str, point_edge: str, dist_node: str) -> str:
        g, ns = self.g, self.ns
        with self.scoped(name):
            sup = g.op("Slice", [point_edge, g.i64([0]), g.i64([ns]), g.i64([2])], "support_cols")
            x = g.op("Concat", [sup, dist_node], "cat", axis=2)
            return self.L.linear(f"{name}.p2d_transform.0", x, slope=GRAPH_SLOPE)

    def d2p(self, name: str, dist_edge: str, point_node: str) -> str:
        g = self.g
        with self.scoped(name):
            off, _ = self.eye_consts()
            adj = self.l1_normalize(g.op("Mul", [dist_edge, off], "mask_diag"))
            agg = self.L.bmm(f"{name}.aggregation", adj, point_node)
            feat = g.op("Concat", [point_node, agg], "cat", axis=2)          # [T, N, 2C]
            t = f"{name}.point_node_transform"
            feat = g.op("Transpose", [feat], "to_nchw", perm=[0, 2, 1])       # [T, 2C, N]
            feat = g.op("Unsqueeze", [feat, g.i64([3], "axes/3")], "as_image")  # [T, 2C, N, 1]
            x = self.L.conv(f"{t}.0", feat, bn=f"{t}.1", slope=GRAPH_SLOPE)
            x = self.L.conv(f"{t}.3", x, bn=f"{t}.4", slope=GRAPH_SLOPE)
            x = g.op("Squeeze", [x, g.i64([3], "axes/3")], "squeeze")
            return g.op("Transpose", [x], "to_nodes", perm=[0, 2, 1])

    def logits(self, point_edge: str, labels: str) -> str:
        g, ns, n, way = self.g, self.ns, self.n, self.cfg.way
        with self.scoped("prediction"):
            rows = g.op("Slice", [point_edge, g.i64([ns, 0]), g.i64([n, ns]), g.i64([1, 2])],
                        "query_rows")
            lab = g.op("Unsqueeze", [labels, g.i64([-1], "axes/last")], "labels")
            onehot = g.op("Equal", [lab, g.i64(np.arange(way), "prediction/classes")], "eq")
            onehot = g.op("Cast", [onehot], "onehot", to=FLOAT)
            return self.f64("MatMul", [rows, onehot], "logits")

    # ---------------------------------------------------------------- build
    def build(self, generations=None) -> None:
        """The whole graph, running ``generations`` generations (default: the config's)."""
        g, cfg = self.g, self.cfg
        generations = cfg.generations if generations is None else int(generations)
        s = cfg.image_size
        images = g.add_input("images", FLOAT, ["tasks", self.n, 3, s, s])
        labels = g.add_input("support_labels", INT64, ["tasks", self.ns])
        last, second = self.backbone(images)
        dist_node, edge = self.initial_graph(labels)
        has_drop = cfg.dropout > 0
        point_edge = self.similarity("gnn.initial_edge", second, edge, has_drop)
        dist_edge = edge
        point_node = last
        for l in range(generations):
            drop = has_drop and l < cfg.generations - 1  # layer names follow the source model
            point_edge = self.similarity(f"gnn.point_sim_generation_{l}", point_node, point_edge,
                                         drop)
            dist_node = self.p2d(f"gnn.point2distribution_generation_{l}", point_edge, dist_node)
            dist_edge = self.similarity(f"gnn.distribution_sim_generation_{l}", dist_node,
                                        dist_edge, drop)
            point_node = self.d2p(f"gnn.distribution2point_generation_{l}", dist_edge, point_node)
        out = self.logits(point_edge, labels)
        g.add_output(out, "logits", FLOAT, ["tasks", cfg.way, cfg.way])
