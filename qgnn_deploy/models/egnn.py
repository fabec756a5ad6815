"""EGNN (Kim et al., CVPR 2019, ``khy0809/fewshot-egnn``): conv encoder + edge-labelling
graph network, FP or PQ-quantized -- the QGNN-IC paper's second model family (sec. 4.7).

Module and parameter names follow the official ``model.py`` so an official checkpoint
(``{"enc_module_state_dict", "gnn_module_state_dict", "iteration", "val_acc",
"optimizer"}``, keys possibly prefixed ``module.``) loads one to one: the encoder
(``EmbeddingImagenet``) under ``backbone.`` and the graph (``GraphNetwork``) under ``gnn.``.

Encoder, per stage ``conv_{1..4}``: 3x3 conv (no bias; stage 2 unpadded, the others pad 1),
BN, MaxPool(2), LeakyReLU(0.2), then Dropout2d(0.4) after stage 3 and (0.5) after stage 4;
``layer_last`` = flatten, Linear (bias) -> emb_dim, BN1d. 84 px: 84 -> 42 -> 20 -> 10 -> 5,
so the Linear reads 256 * 5 * 5 = 6400 features.

Graph, layer l (1x1 convs over node / pair grids act as per-node / per-pair MLPs; every
LeakyReLU of the graph has nn.LeakyReLU()'s slope 0.01). Edges are [T, 2, N, N]: channel 0
similarity, channel 1 dissimilarity.

1. ``edge2node_net{l}`` (NodeUpdateNetwork): ``A = rownorm_L1(E * (1 - I))`` per channel;
   ``V = MLP([V || A_sim V || A_dsim V])``, MLP = conv 3D -> 2F, BN, LReLU, conv 2F -> F, BN,
   LReLU, [Dropout2d] (D = emb_dim in layer 0, F = node_features after).
2. ``node2edge_net{l}`` (EdgeUpdateNetwork): ``s = sigmoid(MLP(|v_i - v_j|))``, MLP = conv
   F -> 2G -> 2G -> G -> G (each BN, LReLU, [Dropout2d]) then ``conv_out`` G -> 1 (bias),
   G = edge_features; ``d = 1 - s``; with ``M = E * (1 - I)``:
   ``E = rownorm_L1([s, d] * M) * rowsum(M)`` (each channel's row keeps its sum), then
   ``E += [I, 0]``, ``E += 1e-6``, ``E /= E_sim + E_dsim`` (the two channels sum to 1).

Dropout runs in every layer but the last. Quantized (PQ, ``bits_for(name)``): every conv /
linear of the encoder but the first conv, every graph conv but ``conv_out``, and the
aggregation ``[A_sim; A_dsim] @ V`` (one :class:`QAggregation` on the stacked [T, 2N, N]
adjacency, as the official single ``bmm``). The first encoder conv and each ``conv_out``
stay FP32 (the paper keeps the layer next to the input and the last conv of each graph
layer's edge MLP in full precision), as :class:`F64Conv2d`.

Evaluation (the official ``ModelTrainer.eval``). Initial edges from the support labels:
support-support ``[same, 1 - same]``, every edge touching a query 0.5 / 0.5, a query's
self-edge (1, 0). *Transductive*: one graph of all ``N = way*shot + way`` nodes.
*Non-transductive*: one graph per query, the supports plus that query (``NS + 1`` nodes,
query last, its row / column 0.5 including its self-edge); the ``T * Q`` graphs run as one
batch, task-major. Their edges are assembled into [T, 2, N, N] as the official code does:
support block = mean over the task's query graphs, query rows / columns from the query's
own graph, query-query block 0. Prediction: the last layer's similarity rows of the
queries, support columns, times the support one-hot labels -> logits [T, Q, way].

Differences from the official code, on purpose: (a) in the non-transductive batch the
official code tiles the edges query-major (``repeat(num_queries, ...)``) but the nodes
task-major, so graph ``k`` gets the support edges of task ``k mod T``; we give each graph
its own task's. Both agree whenever all tasks share their support labels, which the
official loader always produces (class-major 0..way-1) and our episodes too. (b) Row sums,
L1 norms, the sigmoid and the FP32 convs are computed in float64 and rounded once
(:mod:`qgnn_deploy.ops.episode_ops`), so outputs match the official float32 ones to ~1e-6.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import EpisodeConfig, LayerBits, check_bits
from ..errors import CheckpointError, ConfigError
from ..ops.episode_ops import EDGE_EPS, TORCH_OPS, f32_row_sum, l1_normalize_rows
from .layers import F64Conv2d, QAggregation, QConv2d, QLinear
from .qgnn import check_episode, label_edges, quantizable_layers

BitsFor = Callable[[str], LayerBits]

FAMILY = "egnn"
ENCODER_SLOPE = 0.2   # nn.LeakyReLU(negative_slope=0.2) of the official encoder
GRAPH_SLOPE = 0.01    # nn.LeakyReLU() default, every graph MLP
NODE_RATIO = (2, 1)   # NodeUpdateNetwork widths: node_features * ratio
EDGE_RATIO = (2, 2, 1, 1)  # EdgeUpdateNetwork widths: edge_features * ratio
FP32_LAYER_NOTE = "the first encoder conv (backbone.conv_1.0) and each edge MLP's conv_out stay FP32 (paper)"


# ------------------------------------------------------------------ configuration

@dataclass(frozen=True)
class EGNNConfig(EpisodeConfig):
    """Architecture and quantization of an EGNN model.

    Attributes:
        way, shot: N-way K-shot episode, ``way*shot`` supports then one query per class.
        image_size: 84 (the official miniImageNet setting) or 32.
        widths: the four encoder stage widths (official 64, 96, 128, 256).
        emb_dim: encoder embedding size (official 128).
        node_features, edge_features: graph MLP base widths (official 96, 96).
        num_layers: graph layers (official 3).
        dropout: graph Dropout2d rate in every layer but the last (official 0.1 on
            miniImageNet, 0.0 on tieredImageNet).
        encoder_dropout: Dropout2d after encoder stages 3 and 4 (official 0.4, 0.5).
        transductive: default evaluation mode of ``forward`` (official default False).
        bits, layer_bits, weight_granularity: as :class:`qgnn_deploy.config.ModelConfig`;
            layer names look like ``"backbone.conv_2.0"``,
            ``"gnn.edge2node_net0.network.conv0"``, ``"gnn.edge2node_net0.aggregation"``,
            ``"gnn.node2edge_net1.sim_network.conv3"``.
    """

    way: int = 5
    shot: int = 1
    image_size: int = 84
    widths: Tuple[int, int, int, int] = (64, 96, 128, 256)
    emb_dim: int = 128
    node_features: int = 96
    edge_features: int = 96
    num_layers: int = 3
    dropout: float = 0.1
    encoder_dropout: Tuple[float, float] = (0.4, 0.5)
    transductive: bool = False
    bits: int = 32
    layer_bits: Dict[str, LayerBits] = field(default_factory=dict)
    weight_granularity: str = "tensor"

    _what = "EGNN"

    def __post_init__(self) -> None:
        self._normalise(encoder_dropout=float)

    @property
    def family(self) -> str:
        """The model family (``qgnn_deploy.config.config_family``); not a field."""
        return FAMILY

    @property
    def num_queries(self) -> int:
        return self.way

    @property
    def feature_side(self) -> int:
        """Side of the last encoder map: S -> S/2 -> (S/2 - 2)/2 -> /2 -> /2 (floors)."""
        side = self.image_size // 2
        side = (side - 2) // 2
        return side // 4

    def validate(self) -> "EGNNConfig":
        self._validate_episode()
        for name in ("emb_dim", "node_features", "edge_features", "num_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if len(self.encoder_dropout) != 2 or not all(0.0 <= p < 1.0 for p in self.encoder_dropout):
            raise ConfigError(f"encoder_dropout must be two rates in [0, 1), got {self.encoder_dropout}")
        if not isinstance(self.transductive, bool):
            raise ConfigError(f"transductive must be a bool, got {self.transductive!r}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        d["family"] = FAMILY  # a DPGN ModelConfig.from_dict rejects it: no silent mix-up
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "EGNNConfig":
        if isinstance(d, dict):
            d = dict(d)
            family = d.pop("family", FAMILY)
            if family != FAMILY:
                raise ConfigError(f"config is of model family {family!r}, not {FAMILY!r}")
        return super().from_dict(d)


EGNN_PRESETS: Dict[str, EGNNConfig] = {
    # The official miniImageNet 5-way 1-shot model (train.py defaults).
    "egnn-miniimagenet": EGNNConfig(),
    # Small widths for tests: a training step in a fraction of a second on 2 CPU cores.
    "egnn-tiny": EGNNConfig(image_size=32, widths=(16, 24, 32, 64), emb_dim=32, node_features=16,
                            edge_features=16),
}


def egnn_preset(name: str, bits: int = 32, **overrides: Any) -> EGNNConfig:
    """The configuration of EGNN preset ``name`` at ``bits`` (32 = FP model)."""
    if name not in EGNN_PRESETS:
        raise ConfigError(f"unknown EGNN preset {name!r}; choose one of {sorted(EGNN_PRESETS)}")
    return EGNN_PRESETS[name].replace(bits=check_bits(bits), **overrides)


# ------------------------------------------------------------------ encoder

class EmbeddingImagenet(nn.Module):
    """The official encoder: ``[B, 3, S, S] -> [B, emb_dim]``.

    ``conv_i`` = Sequential(conv 3x3, BN, MaxPool(2), LeakyReLU(0.2)[, Dropout2d]); index 0 is
    the conv, 1 the BN, as the official state-dict keys. ``layer_last`` = (Linear, BN1d).
    """

    def __init__(self, widths: Tuple[int, int, int, int], emb_dim: int, image_size: int,
                 encoder_dropout: Tuple[float, float], bits_for: BitsFor, per_channel: bool = False,
                 prefix: str = "backbone"):
        super().__init__()
        w = [3] + list(widths)
        pads = (1, 0, 1, 1)  # the official conv_2 has no padding
        drops = (0.0, 0.0) + tuple(encoder_dropout)
        for i in range(4):
            name = f"{prefix}.conv_{i + 1}.0"
            if i == 0:
                conv: nn.Module = F64Conv2d(w[0], w[1], 3, padding=pads[0], bias=False)  # FP32 (paper)
            else:
                conv = QConv2d(w[i], w[i + 1], 3, padding=pads[i], bias=False, bits=bits_for(name),
                               per_channel=per_channel)
            stage = [conv, nn.BatchNorm2d(w[i + 1]), nn.MaxPool2d(2), nn.LeakyReLU(ENCODER_SLOPE)]
            if i >= 2:  # the official stages 3 and 4 always hold their Dropout2d (index 4)
                stage.append(nn.Dropout2d(drops[i]))
            self.add_module(f"conv_{i + 1}", nn.Sequential(*stage))
        side = image_size // 2
        side = (side - 2) // 2
        side = side // 4
        if side < 1:
            raise ConfigError(f"image_size {image_size} is too small for the EGNN encoder")
        self.flat_features = widths[3] * side * side
        self.layer_last = nn.Sequential(
            QLinear(self.flat_features, emb_dim, bias=True, bits=bits_for(f"{prefix}.layer_last.0"),
                    per_channel=per_channel),
            nn.BatchNorm1d(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_4(self.conv_3(self.conv_2(self.conv_1(x))))
        return self.layer_last(torch.flatten(x, 1))


# ------------------------------------------------------------------ graph

def offdiag(x: torch.Tensor) -> torch.Tensor:
    """``x * (1 - I)`` on the last two dims."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return x * (1.0 - eye)


class NodeUpdateNetwork(nn.Module):
    """``V' = MLP([V || A_sim V || A_dsim V])``, ``A = rownorm_L1(E * (1 - I))`` per channel.

    Keys: ``network.conv{l}`` / ``network.norm{l}`` (the official ones); the aggregation has
    no parameters (quantizer ranges only, when quantized).
    """

    def __init__(self, in_features: int, num_features: int, dropout: float, name: str,
                 bits_for: BitsFor, per_channel: bool = False):
        super().__init__()
        self.aggregation = QAggregation(bits_for(f"{name}.aggregation"))
        chans = [in_features * 3] + [num_features * r for r in NODE_RATIO]
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        for l in range(len(NODE_RATIO)):
            layers[f"conv{l}"] = QConv2d(chans[l], chans[l + 1], 1, bias=False,
                                         bits=bits_for(f"{name}.network.conv{l}"), per_channel=per_channel)
            layers[f"norm{l}"] = nn.BatchNorm2d(chans[l + 1])
            layers[f"relu{l}"] = nn.LeakyReLU(GRAPH_SLOPE)
            if dropout > 0 and l == len(NODE_RATIO) - 1:
                layers[f"drop{l}"] = nn.Dropout2d(dropout)
        self.network = nn.Sequential(layers)

    @staticmethod
    def adjacency(edges: torch.Tensor) -> torch.Tensor:
        """[T, 2, N, N] edges -> [T, 2N, N]: the L1-normalised off-diagonal rows of the
        similarity channel, then those of the dissimilarity channel."""
        return l1_normalize_rows(offdiag(edges)).flatten(1, 2)

    def forward(self, nodes: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """nodes [T, N, D], edges [T, 2, N, N] -> [T, N, num_features]."""
        n = nodes.shape[1]
        agg = self.aggregation(self.adjacency(edges), nodes)              # [T, 2N, D]
        feat = torch.cat([nodes, agg[:, :n], agg[:, n:]], -1)             # [T, N, 3D]
        out = self.network(feat.transpose(1, 2).unsqueeze(-1))            # [T, F, N, 1]
        return out.squeeze(-1).transpose(1, 2)


class EdgeUpdateNetwork(nn.Module):
    """``s = sigmoid(MLP(|v_i - v_j|))``, ``d = 1 - s`` and EGNN's edge update.

    Keys: ``sim_network.conv{l}`` / ``norm{l}`` (l = 0..3) and ``sim_network.conv_out``
    (the official ``separate_dissimilarity=False`` form: no ``dsim_network``).
    """

    def __init__(self, in_features: int, num_features: int, dropout: float, name: str,
                 bits_for: BitsFor, per_channel: bool = False):
        super().__init__()
        chans = [in_features] + [num_features * r for r in EDGE_RATIO]
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        for l in range(len(EDGE_RATIO)):
            layers[f"conv{l}"] = QConv2d(chans[l], chans[l + 1], 1, bias=False,
                                         bits=bits_for(f"{name}.sim_network.conv{l}"), per_channel=per_channel)
            layers[f"norm{l}"] = nn.BatchNorm2d(chans[l + 1])
            layers[f"relu{l}"] = nn.LeakyReLU(GRAPH_SLOPE)
            if dropout > 0:
                layers[f"drop{l}"] = nn.Dropout2d(dropout)
        layers["conv_out"] = F64Conv2d(chans[-1], 1, 1, bias=True)  # FP32 (paper)
        self.sim_network = nn.Sequential(layers)

    @staticmethod
    def pair_features(nodes: torch.Tensor) -> torch.Tensor:
        """[T, N, F] -> ``|v_i - v_j|`` as an image [T, F, N, N]."""
        return (nodes.unsqueeze(2) - nodes.unsqueeze(1)).abs().permute(0, 3, 1, 2)

    def similarity(self, nodes: torch.Tensor) -> torch.Tensor:
        """[T, N, F] -> [T, 1, N, N] in (0, 1)."""
        return TORCH_OPS.sigmoid(self.sim_network(self.pair_features(nodes)))

    @staticmethod
    def update(sim: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """sim [T, 1, N, N], previous edges [T, 2, N, N] -> new edges [T, 2, N, N]."""
        n = edges.shape[-1]
        prev = offdiag(edges)
        prev_sum = f32_row_sum(prev)                                        # [T, 2, N, 1]
        new = l1_normalize_rows(torch.cat([sim, 1.0 - sim], 1) * prev) * prev_sum
        force = torch.zeros(2, n, n, dtype=new.dtype, device=new.device)
        force[0] = torch.eye(n, dtype=new.dtype, device=new.device)
        new = new + force
        new = new + EDGE_EPS
        return new / new.sum(1, keepdim=True)

    def forward(self, nodes: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        return self.update(self.similarity(nodes), edges)


class GraphNetwork(nn.Module):
    """The official ``GraphNetwork``: per layer ``edge2node_net{l}`` then ``node2edge_net{l}``.

    ``forward(nodes [T, N, emb_dim], edges [T, 2, N, N]) -> [edges after each layer]``.
    """

    def __init__(self, in_features: int, node_features: int, edge_features: int, num_layers: int,
                 dropout: float, bits_for: BitsFor, per_channel: bool = False, prefix: str = "gnn"):
        super().__init__()
        self.num_layers = num_layers
        for l in range(num_layers):
            drop = dropout if l < num_layers - 1 else 0.0
            self.add_module(f"edge2node_net{l}", NodeUpdateNetwork(
                in_features if l == 0 else node_features, node_features, drop,
                f"{prefix}.edge2node_net{l}", bits_for, per_channel))
            self.add_module(f"node2edge_net{l}", EdgeUpdateNetwork(
                node_features, edge_features, drop, f"{prefix}.node2edge_net{l}", bits_for, per_channel))

    def layer(self, l: int) -> Tuple[NodeUpdateNetwork, EdgeUpdateNetwork]:
        return getattr(self, f"edge2node_net{l}"), getattr(self, f"node2edge_net{l}")

    def forward(self, nodes: torch.Tensor, edges: torch.Tensor) -> List[torch.Tensor]:
        out = []
        for l in range(self.num_layers):
            node_net, edge_net = self.layer(l)
            nodes = node_net(nodes, edges)
            edges = edge_net(nodes, edges)
            out.append(edges)
        return out


# ------------------------------------------------------------------ episodes

def initial_edges(support_labels: torch.Tensor, num_queries: int) -> torch.Tensor:
    """The transductive graph's initial edges [T, 2, N, N] from support labels int [T, NS]:
    support pairs ``[same, 1 - same]``, every pair with a query 0.5 / 0.5, query self-edges (1, 0)."""
    t, ns = support_labels.shape
    n = ns + num_queries
    same = label_edges(support_labels)
    edge = torch.full((t, 2, n, n), 0.5, device=support_labels.device)
    edge[:, 0, :ns, :ns] = same
    edge[:, 1, :ns, :ns] = 1.0 - same
    q = torch.arange(ns, n, device=support_labels.device)
    edge[:, 0, q, q] = 1.0
    edge[:, 1, q, q] = 0.0
    return edge


def query_graph_edges(support_labels: torch.Tensor) -> torch.Tensor:
    """A non-transductive query graph's initial edges [T, 2, NS+1, NS+1] (the official
    ones: supports from the labels, everything touching the query 0.5, its self-edge too)."""
    t, ns = support_labels.shape
    same = label_edges(support_labels)
    edge = torch.full((t, 2, ns + 1, ns + 1), 0.5, device=support_labels.device)
    edge[:, 0, :ns, :ns] = same
    edge[:, 1, :ns, :ns] = 1.0 - same
    return edge


def assemble_query_graphs(graph_edges: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Per-query graphs [T, Q, 2, NS+1, NS+1] -> the episode's edges [T, 2, N, N] (official
    assembly: support block averaged over the queries, query rows / columns from each
    query's graph, query-query block 0)."""
    t, q, _, m, _ = graph_edges.shape
    ns = m - 1
    full = graph_edges.new_zeros(t, 2, num_nodes, num_nodes)
    full[:, :, :ns, :ns] = graph_edges[:, :, :, :ns, :ns].double().mean(1).float()
    full[:, :, :ns, ns:] = graph_edges[:, :, :, :ns, -1].permute(0, 2, 3, 1)
    full[:, :, ns:, :ns] = graph_edges[:, :, :, -1, :ns].transpose(1, 2)
    return full


class EGNNOutput:
    """logits [T, Q, way]: the last layer's query-to-support similarity x support one-hot.
    edges: per layer [T, 2, N, N] (channel 0 similarity, 1 dissimilarity; non-transductive:
    assembled from the query graphs). embeddings [T, N, emb_dim]. query_graph_edges:
    non-transductive only, per layer [T, Q, 2, NS+1, NS+1] as the graph computed them.

    :meth:`deferred` builds ``edges`` and ``query_graph_edges`` on their first access (the
    compiled plan's outputs: the assembly was ~0.5 ms of a 2 ms egnn-tiny episode, and a
    classifier reads only the logits)."""

    def __init__(self, logits: torch.Tensor, edges: List[torch.Tensor], embeddings: torch.Tensor,
                 query_graph_edges: Optional[List[torch.Tensor]] = None, transductive: bool = False):
        self.logits, self.embeddings, self.transductive = logits, embeddings, bool(transductive)
        self._graphs: Any = (edges, query_graph_edges)

    @classmethod
    def deferred(cls, logits: torch.Tensor, embeddings: torch.Tensor, transductive: bool,
                 graphs: Callable[[], Tuple[List[torch.Tensor], Optional[List[torch.Tensor]]]]) -> "EGNNOutput":
        """An output whose ``graphs() -> (edges, query_graph_edges)`` runs once, when either is
        first read (a race between threads computes the same values twice, harmlessly)."""
        out = cls(logits, [], embeddings, None, transductive)
        out._graphs = graphs
        return out

    def _built(self) -> Tuple[List[torch.Tensor], Optional[List[torch.Tensor]]]:
        if callable(self._graphs):
            self._graphs = self._graphs()
        return self._graphs

    @property
    def edges(self) -> List[torch.Tensor]:
        return self._built()[0]

    @property
    def query_graph_edges(self) -> Optional[List[torch.Tensor]]:
        return self._built()[1]

    def __repr__(self) -> str:
        return (f"EGNNOutput(logits {tuple(self.logits.shape)}, embeddings {tuple(self.embeddings.shape)}, "
                f"transductive={self.transductive})")

    @property
    def similarity_edges(self) -> List[torch.Tensor]:
        """Per layer, the similarity channel [T, N, N]."""
        return [e[:, 0] for e in self.edges]


class EGNNModel(nn.Module):
    """Encoder + edge-labelling graph. ``forward(images, support_labels) -> EGNNOutput``.

    images: float32 [T, N, 3, S, S], N = way*shot supports (class-major) then ``way`` queries;
    support_labels: int64 [T, way*shot] in [0, way).
    """

    family = FAMILY

    def __init__(self, config: EGNNConfig):
        super().__init__()
        self.config = config.validate()
        per_channel = config.weight_granularity == "channel"
        self.backbone = EmbeddingImagenet(config.widths, config.emb_dim, config.image_size,
                                          config.encoder_dropout, config.bits_for, per_channel)
        self.gnn = GraphNetwork(config.emb_dim, config.node_features, config.edge_features,
                                config.num_layers, config.dropout, config.bits_for, per_channel)
        names = set(quantizable_layers(self))
        unknown = sorted(set(config.layer_bits) - names)
        if unknown:
            raise ConfigError(f"layer_bits names unknown layers {unknown}; quantizable EGNN layers "
                              f"look like {sorted(names)[:3]} ... ({FP32_LAYER_NOTE})")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[T, N, 3, S, S] -> [T, N, emb_dim].

        In training mode each node position is encoded as its own batch of T images, as
        the official trainer does (BatchNorm statistics per node position); in eval mode the
        result is the same either way and all T*N images go in one batch."""
        t, n = images.shape[:2]
        if self.training:
            return torch.stack([self.backbone(images[:, i]) for i in range(n)], 1)
        return self.backbone(images.reshape(t * n, *images.shape[2:])).view(t, n, -1)

    def forward(self, images: torch.Tensor, support_labels: torch.Tensor,
                transductive: Optional[bool] = None) -> EGNNOutput:
        check_episode(images, support_labels, self.config)
        transductive = self.config.transductive if transductive is None else bool(transductive)
        labels = support_labels.long()
        emb = self.embed(images)
        way, ns = self.config.way, self.config.num_supports
        if transductive:
            edges = self.gnn(emb, initial_edges(labels, way).to(emb.device))
            graphs = None
        else:
            t, e = emb.shape[0], emb.shape[-1]
            nodes = torch.cat([emb[:, :ns].unsqueeze(1).expand(t, way, ns, e),
                               emb[:, ns:].unsqueeze(2)], 2).reshape(t * way, ns + 1, e)
            init = query_graph_edges(labels).to(emb.device)
            init = init.unsqueeze(1).expand(t, way, *init.shape[1:]).reshape(t * way, *init.shape[1:])
            graphs = [g.view(t, way, *g.shape[1:]) for g in self.gnn(nodes, init)]
            edges = [assemble_query_graphs(g, self.config.num_nodes) for g in graphs]
        onehot = nn.functional.one_hot(labels, way).float()
        logits = TORCH_OPS.label_scores(edges[-1][:, 0], onehot)
        return EGNNOutput(logits, edges, emb, graphs, transductive)


def build_egnn(config: EGNNConfig) -> EGNNModel:
    """A fresh EGNN model for ``config`` (FP when ``config.bits == 32`` and no overrides)."""
    return EGNNModel(config)


# ------------------------------------------------------------------ official checkpoints

OFFICIAL_PARTS = (("enc_module_state_dict", "backbone."), ("gnn_module_state_dict", "gnn."))
_QUANT_SUFFIXES = tuple(f".{q}.{p}" for q in ("weight_quant", "act_quant", "adj_quant", "node_quant")
                        for p in ("l", "r", "initialized"))


def is_official_egnn(obj: Any) -> bool:
    """Whether ``obj`` has the official checkpoint's two state dicts and EGNN keys."""
    if not isinstance(obj, dict) or not all(isinstance(obj.get(p), dict) for p, _ in OFFICIAL_PARTS):
        return False
    return any("edge2node_net" in str(k) for k in obj["gnn_module_state_dict"])


def _strip_module(state: Dict[str, Any]) -> Dict[str, Any]:
    return {(k[7:] if isinstance(k, str) and k.startswith("module.") else k): v for k, v in state.items()}


def _keys_message(title: str, keys: List[str]) -> str:
    if not keys:
        return ""
    more = f" ... (+{len(keys) - 12} more)" if len(keys) > 12 else ""
    return f"\n  {title} ({len(keys)}): {', '.join(map(str, keys[:12]))}{more}"


def load_official_egnn(obj: Dict[str, Any], config: Optional[EGNNConfig] = None,
                       source: str = "<dict>", strict: bool = True) -> EGNNModel:
    """Build an EGNN for ``config`` (default: the ``egnn-miniimagenet`` preset, FP) from an
    official checkpoint dict (``torch.load`` of ``model_best.pth.tar``).

    Keys may carry DataParallel's ``module.`` prefix. Missing, unexpected, misshapen or
    non-tensor entries raise :class:`CheckpointError` naming them (``strict=False`` loads
    what fits). In a quantized model the PQ ranges are absent from an official checkpoint
    and are initialised from the first batch (the QAT starting point)."""
    config = config or EGNN_PRESETS["egnn-miniimagenet"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source!r}: an official EGNN checkpoint is a dict, got {type(obj).__name__}")
    state: Dict[str, Any] = {}
    for part, prefix in OFFICIAL_PARTS:
        if not isinstance(obj.get(part), dict):
            raise CheckpointError(f"{source!r}: {part} is missing or not a dict "
                                  f"(top-level keys: {sorted(map(str, obj))[:10]})")
        state.update({f"{prefix}{k}": v for k, v in _strip_module(obj[part]).items()})
    model = build_egnn(config)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_QUANT_SUFFIXES)]
    unexpected = [k for k in state if k not in own]
    bad_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items()
                 if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    not_tensor = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if strict and (missing or unexpected or bad_shape or not_tensor):
        raise CheckpointError(
            f"official EGNN checkpoint {source!r} does not fit the model:"
            + _keys_message("missing keys", missing) + _keys_message("unexpected keys", unexpected)
            + _keys_message("shape mismatches", bad_shape) + _keys_message("non-tensor entries", not_tensor)
            + "\n  (model keys are the official ones with 'backbone.' for enc_module_state_dict and "
              "'gnn.' for gnn_module_state_dict; check way/shot/image size/widths/num_layers)")
    usable = {k: v for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)
    model.checkpoint_meta = {"source": "official-egnn", "iteration": obj.get("iteration"),
                             "val_acc": obj.get("val_acc")}
    return model


def to_official_egnn(model: EGNNModel) -> Dict[str, Any]:
    """``model``'s FP weights in the official checkpoint layout (quantizer ranges dropped)."""
    parts: Dict[str, Dict[str, torch.Tensor]] = {part: {} for part, _ in OFFICIAL_PARTS}
    for k, v in model.state_dict().items():
        if k.endswith(_QUANT_SUFFIXES):
            continue
        for part, prefix in OFFICIAL_PARTS:
            if k.startswith(prefix):
                parts[part][k[len(prefix):]] = v.detach().clone()
    meta = getattr(model, "checkpoint_meta", {}) or {}
    return {"iteration": int(meta.get("iteration") or 0), **parts,
            "val_acc": float(meta.get("val_acc") or 0.0), "optimizer": {}}


__all__ = ["EGNNConfig", "EGNN_PRESETS", "egnn_preset", "EmbeddingImagenet", "NodeUpdateNetwork",
           "EdgeUpdateNetwork", "GraphNetwork", "EGNNModel", "EGNNOutput", "build_egnn",
           "initial_edges", "query_graph_edges", "assemble_query_graphs", "load_official_egnn",
           "to_official_egnn", "is_official_egnn"]
