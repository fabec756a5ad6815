"""The QGNN-IC model: ResNet-12 backbone + DPGN, FP or PQ-quantized, one episode batch at a time."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, InputError
from ..ops.episode_ops import TORCH_OPS
from .dpgn import DPGN
from .layers import QAggregation, QConv2d, QLinear
from .resnet12 import ResNet12

#: Layers the paper keeps FP32 whatever the bit-width (name patterns).
FP32_LAYER_NOTE = "the first backbone conv and the last conv of each edge MLP stay FP32 (paper)"


@dataclass
class EpisodeOutput:
    """logits [T, Q, way]: query rows of the last point graph x support one-hot labels.
    point_edges / node_similarities / distribution_edges: per generation, [T, N, N]."""

    logits: torch.Tensor
    point_edges: List[torch.Tensor]
    node_similarities: List[torch.Tensor]
    distribution_edges: List[torch.Tensor]


def label_edges(labels: torch.Tensor) -> torch.Tensor:
    """[T, N] labels -> [T, N, N] float, 1 where the labels agree."""
    return (labels.unsqueeze(-1) == labels.unsqueeze(-2)).float()


def initial_graph_arrays(support_labels: np.ndarray, num_queries: int):
    """DPGN's initial graph as numpy float32 arrays (support_labels int [T, NS]):
    distribution_node [T, N, NS], point_edge [T, N, N], distribution_edge [T, N, N]."""
    t, ns = support_labels.shape
    n = ns + num_queries
    same = (support_labels[:, :, None] == support_labels[:, None, :]).astype(np.float32)
    dist_node = np.empty((t, n, ns), np.float32)
    dist_node[:, :ns] = same
    dist_node[:, ns:] = np.float32(1.0 / ns)
    edge = np.zeros((t, n, n), np.float32)
    edge[:, :ns, :ns] = same
    edge[:, ns:, :ns] = np.float32(1.0 / ns)
    edge[:, :ns, ns:] = np.float32(1.0 / ns)
    edge[:, ns:, ns:] = np.eye(num_queries, dtype=np.float32)
    return dist_node, edge, edge.copy()


def episode_graph_arrays(support_labels: np.ndarray, way: int):
    """:func:`episode_graph` in numpy: the initial graph and the one-hot labels [T, NS, way]."""
    onehot = (support_labels[:, :, None] == np.arange(way)).astype(np.float32)
    return (*initial_graph_arrays(support_labels, way), onehot)


def initial_graph(support_labels: torch.Tensor, num_queries: int):
    """DPGN's initial distribution nodes and point / distribution edges.

    Args: support_labels int64 [T, NS].
    Returns: distribution_node [T, N, NS], point_edge [T, N, N], distribution_edge [T, N, N].
    """
    arrays = initial_graph_arrays(support_labels.detach().cpu().numpy(), num_queries)
    return tuple(torch.from_numpy(a) for a in arrays)


def episode_graph(support_labels: torch.Tensor, way: int, device=None):
    """The episode's label-derived inputs: DPGN's initial graph (distribution_node [T, N, NS],
    point_edge [T, N, N], distribution_edge [T, N, N]) and the support one-hot labels
    [T, NS, way] float32."""
    arrays = episode_graph_arrays(support_labels.detach().cpu().numpy(), way)
    return tuple(torch.from_numpy(a).to(device) for a in arrays)


def check_episode_shapes(images: torch.Tensor, support_labels: torch.Tensor, config: ModelConfig) -> None:
    """Raise :class:`InputError` unless the batch has an episode's types and shapes for ``config``
    (values unchecked: :func:`check_episode` checks them too)."""
    n, s = config.num_nodes, config.image_size
    if (isinstance(images, torch.Tensor) and isinstance(support_labels, torch.Tensor) and images.dim() == 5
            and images.shape[1:] == (n, 3, s, s) and images.is_floating_point()
            and support_labels.dtype in (torch.int64, torch.int32)
            and support_labels.shape == (images.shape[0], config.num_supports)):
        return  # one test on the way of every episode; the messages below say what is wrong
    if not isinstance(images, torch.Tensor) or images.dim() != 5:
        raise InputError(f"images must be a 5-D tensor [tasks, {n}, 3, {s}, {s}], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise InputError(f"images must be floating point, got {images.dtype}")
    if images.shape[1] != n:
        raise InputError(f"an episode of {config.way}-way {config.shot}-shot has {n} images per task "
                         f"({config.num_supports} support + {config.way} query), got {images.shape[1]}")
    if tuple(images.shape[2:]) != (3, s, s):
        raise InputError(f"images must be 3x{s}x{s} for this model, got {tuple(images.shape[2:])}")
    if not isinstance(support_labels, torch.Tensor) or support_labels.dtype not in (
            torch.int64, torch.int32) or tuple(support_labels.shape) != (images.shape[0], config.num_supports):
        got = (f"{support_labels.dtype} {tuple(support_labels.shape)}" if isinstance(support_labels, torch.Tensor)
               else type(support_labels).__name__)
        raise InputError(f"support_labels must be int64 [{images.shape[0]}, {config.num_supports}], got {got}")


def check_support_labels(labels: np.ndarray, way: int) -> None:
    """Raise :class:`InputError` unless every support label (int array) lies in [0, way)."""
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= way):
        raise InputError(f"support labels must lie in [0, {way})")


def check_episode(images: torch.Tensor, support_labels: torch.Tensor, config: ModelConfig) -> None:
    """Raise :class:`InputError` unless the batch is a valid episode for ``config``: types and
    shapes, finite images, labels in range."""
    check_episode_shapes(images, support_labels, config)
    # numpy on CPU tensors: single-threaded, and it leaves torch's OpenMP workers asleep
    # (waking them here slowed the compiled plan's own threads that follow)
    finite = (np.isfinite(images.detach().numpy()).all()
              if images.device.type == "cpu" and images.dtype in (torch.float32, torch.float64, torch.float16)
              else torch.isfinite(images).all())
    if not bool(finite):
        raise InputError("images contain NaN or Inf values")
    check_support_labels(support_labels.detach().cpu().numpy(), config.way)


class QGNNModel(nn.Module):
    """Backbone + DPGN. ``forward(images, support_labels) -> EpisodeOutput``.

    images: float32 [T, N, 3, S, S], N = way*shot supports then ``way`` queries;
    support_labels: int64 [T, way*shot] in [0, way).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        per_channel = config.weight_granularity == "channel"
        bits_for = config.bits_for
        self.backbone = ResNet12(config.widths, config.emb_dim, config.image_size, bits_for,
                                 per_channel, config.leaky_slope_backbone)
        self.gnn = DPGN(config.emb_dim, config.num_supports, config.generations, config.dropout,
                        bits_for, per_channel, node_bits=config.node_bits)
        self._check_layer_names(config)

    def _check_layer_names(self, config: ModelConfig) -> None:
        names = set(quantizable_layers(self))
        unknown = sorted(set(config.layer_bits) - names)
        if unknown:
            raise ConfigError(f"layer_bits names unknown layers {unknown}; quantizable layers "
                              f"look like {sorted(names)[:3]} ... ({FP32_LAYER_NOTE})")

    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[T, N, 3, S, S] -> (last [T, N, E], second [T, N, E])."""
        t, n = images.shape[:2]
        last, second = self.backbone(images.reshape(t * n, *images.shape[2:]))
        return last.view(t, n, -1), second.view(t, n, -1)

    def forward(self, images: torch.Tensor, support_labels: torch.Tensor) -> EpisodeOutput:
        check_episode(images, support_labels, self.config)
        return run_episode(self.embed, self.gnn, images, support_labels.long(), self.config.way)


def run_episode(embed, gnn, images: torch.Tensor, support_labels: torch.Tensor,
                way: int) -> EpisodeOutput:
    """Embed the images, run the dual graph from DPGN's initial graph, predict.

    Shared by the float model and the integer model (``embed`` / ``gnn`` of either)."""
    last, second = embed(images)
    dist_node, point_edge, dist_edge = initial_graph(support_labels, way)
    dev = images.device
    point_sims, node_sims, dist_sims = gnn(second, last, dist_node.to(dev), dist_edge.to(dev),
                                           point_edge.to(dev))
    return EpisodeOutput(episode_logits(point_sims[-1], support_labels, way),
                         point_sims, node_sims, dist_sims)


def episode_logits(point_edge: torch.Tensor, support_labels: torch.Tensor, way: int) -> torch.Tensor:
    """Query x support rows of the point graph times the support one-hot labels: [T, Q, way]
    (float64 sums, as the integer model's ``label_scores``)."""
    return TORCH_OPS.label_scores(point_edge, F.one_hot(support_labels.long(), way).float())


def quantizable_layers(model: nn.Module):
    """``{qualified name: layer}`` of every conv / linear / aggregation that PQ may quantize
    (FP32-by-design layers excluded)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QConv2d, QLinear, QAggregation)):
            out[name] = m
    return out


def has_quantized_layers(model: nn.Module) -> bool:
    """Whether any conv / linear / aggregation of ``model`` is fake-quantized."""
    return any(m.quantized for m in quantizable_layers(model).values())


def build_model(config: ModelConfig) -> QGNNModel:
    """A fresh QGNN-IC model for ``config`` (FP when ``config.bits == 32`` and no overrides)."""
    return QGNNModel(config)
