"""DPGN graph network (docs/model.md), FP or PQ-quantized.

Module names follow the official ``dpgn.py`` (``initial_edge``,
``point_sim_generation_{l}``, ``point2distribution_generation_{l}``,
``distribution_sim_generation_{l}``, ``distribution2point_generation_{l}``) and the
Sequential indices of the edge MLPs shift exactly as there when a generation has no
dropout, so official ``gnn_module_state_dict`` keys load as is.

1x1 convs over the N x N grid act as per-pair MLPs. The last conv of every edge MLP
stays FP32, as in the paper.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
from torch import nn

from ..ops.episode_ops import TORCH_OPS
from .layers import F64Conv2d, QAggregation, QConv2d, QLinear

BitsFor = Callable[[str], int]
GRAPH_SLOPE = 0.01  # nn.LeakyReLU() default, as in the official graph modules


def edge_mlp(in_c: int, base_c: int, dropout: float, name: str, bits_for: BitsFor,
             per_channel: bool) -> nn.Sequential:
    """conv in->2b, BN, LReLU, [Drop], conv 2b->b, BN, LReLU, [Drop], conv b->1 (bias, FP32)."""
    layers: List[nn.Module] = []
    for cin, cout in ((in_c, base_c * 2), (base_c * 2, base_c)):
        idx = len(layers)
        layers += [QConv2d(cin, cout, 1, bits=bits_for(f"{name}.{idx}"), per_channel=per_channel),
                   nn.BatchNorm2d(cout), nn.LeakyReLU(GRAPH_SLOPE)]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
    layers.append(F64Conv2d(base_c, 1, 1, bias=True))  # FP32 (paper)
    return nn.Sequential(*layers)


def update_edges(sim: torch.Tensor, prev_edge: torch.Tensor) -> torch.Tensor:
    """DPGN edge update: mask the diagonal, scale by ``sim``, L1-normalise each row back
    to its previous sum, add identity (+1e-6), renormalise rows. Shapes [T, N, N]; row sums
    in float64 (ops/episode_ops.py, shared with the integer model)."""
    return TORCH_OPS.edge_update(sim, prev_edge)


class PointSimilarity(nn.Module):
    """Edge similarity ``sigmoid(MLP((v_i - v_j)^2))`` and the DPGN edge update.

    Also used for the distribution graph (the official code reuses it there)."""

    def __init__(self, in_c: int, base_c: int, dropout: float, name: str, bits_for: BitsFor,
                 per_channel: bool):
        super().__init__()
        self.point_sim_transform = edge_mlp(in_c, base_c, dropout, f"{name}.point_sim_transform",
                                            bits_for, per_channel)

    def pair_features(self, nodes: torch.Tensor) -> torch.Tensor:
        """[T, N, C] -> squared differences as an image [T, C, N, N]."""
        diff = (nodes.unsqueeze(2) - nodes.unsqueeze(1)) ** 2
        return diff.permute(0, 3, 1, 2)

    def forward(self, nodes: torch.Tensor, prev_edge: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pairs = self.pair_features(nodes)
        sim = TORCH_OPS.sigmoid(self.point_sim_transform(pairs)).squeeze(1)
        node_similarity_l2 = TORCH_OPS.neg_sum_last(pairs.movedim(1, -1))
        return update_edges(sim, prev_edge), node_similarity_l2


class P2DAgg(nn.Module):
    """Point-to-distribution: ``V_d = LeakyReLU(Linear([E_p[:, :, :NS] || V_d]))``."""

    def __init__(self, num_supports: int, name: str, bits_for: BitsFor, per_channel: bool):
        super().__init__()
        self.num_supports = num_supports
        self.p2d_transform = nn.Sequential(
            QLinear(2 * num_supports, num_supports, bias=True,
                    bits=bits_for(f"{name}.p2d_transform.0"), per_channel=per_channel),
            nn.LeakyReLU(GRAPH_SLOPE))

    def forward(self, point_edge: torch.Tensor, distribution_node: torch.Tensor) -> torch.Tensor:
        x = torch.cat([point_edge[:, :, :self.num_supports], distribution_node], dim=2)
        return self.p2d_transform(x)


class D2PAgg(nn.Module):
    """Distribution-to-point: ``V_p = MLP([V_p || rownorm(E_d (1 - I)) @ V_p])``."""

    def __init__(self, in_c: int, base_c: int, dropout: float, name: str, bits_for: BitsFor,
                 per_channel: bool, node_bits: Tuple[int, ...] = ()):
        super().__init__()
        self.aggregation = QAggregation(bits_for(f"{name}.aggregation"), node_bits)
        layers: List[nn.Module] = []
        for cin, cout in ((in_c, base_c * 2), (base_c * 2, base_c)):
            idx = len(layers)
            layers += [QConv2d(cin, cout, 1, bits=bits_for(f"{name}.point_node_transform.{idx}"),
                               per_channel=per_channel),
                       nn.BatchNorm2d(cout), nn.LeakyReLU(GRAPH_SLOPE)]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        self.point_node_transform = nn.Sequential(*layers)

    def adjacency(self, distribution_edge: torch.Tensor) -> torch.Tensor:
        return TORCH_OPS.offdiag_l1_normalize(distribution_edge)

    def forward(self, distribution_edge: torch.Tensor, point_node: torch.Tensor) -> torch.Tensor:
        agg = self.aggregation(self.adjacency(distribution_edge), point_node)
        feat = torch.cat([point_node, agg], -1).transpose(1, 2).unsqueeze(-1)  # [T, 2C, N, 1]
        return self.point_node_transform(feat).squeeze(-1).transpose(1, 2)


class DPGN(nn.Module):
    """The dual graph: point graph (instance level) and distribution graph."""

    def __init__(self, emb_dim: int, num_supports: int, generations: int, dropout: float,
                 bits_for: BitsFor, per_channel: bool = False, prefix: str = "gnn",
                 node_bits: Tuple[int, ...] = ()):
        super().__init__()
        self.generations = generations
        self.initial_edge = PointSimilarity(emb_dim, emb_dim, dropout, f"{prefix}.initial_edge",
                                            bits_for, per_channel)
        for l in range(generations):
            drop = dropout if l < generations - 1 else 0.0
            self.add_module(f"point2distribution_generation_{l}", P2DAgg(
                num_supports, f"{prefix}.point2distribution_generation_{l}", bits_for, per_channel))
            self.add_module(f"distribution2point_generation_{l}", D2PAgg(
                2 * emb_dim, emb_dim, drop, f"{prefix}.distribution2point_generation_{l}",
                bits_for, per_channel, node_bits))
            self.add_module(f"point_sim_generation_{l}", PointSimilarity(
                emb_dim, emb_dim, drop, f"{prefix}.point_sim_generation_{l}", bits_for, per_channel))
            self.add_module(f"distribution_sim_generation_{l}", PointSimilarity(
                num_supports, num_supports, drop, f"{prefix}.distribution_sim_generation_{l}",
                bits_for, per_channel))

    def generation(self, l: int):
        """(point_sim, p2d, distribution_sim, d2p) modules of generation ``l``."""
        return (getattr(self, f"point_sim_generation_{l}"),
                getattr(self, f"point2distribution_generation_{l}"),
                getattr(self, f"distribution_sim_generation_{l}"),
                getattr(self, f"distribution2point_generation_{l}"))

    def forward(self, middle_node, point_node, distribution_node, distribution_edge, point_edge):
        """Shapes: nodes [T, N, E], distribution_node [T, N, NS], edges [T, N, N].

        Returns lists (one entry per generation) of point edges, node L2 similarities
        and distribution edges, as the official code.
        """
        point_sims, node_sims, dist_sims = [], [], []
        point_edge, _ = self.initial_edge(middle_node, point_edge)
        for l in range(self.generations):
            p_sim, p2d, d_sim, d2p = self.generation(l)
            point_edge, node_sim = p_sim(point_node, point_edge)
            distribution_node = p2d(point_edge, distribution_node)
            distribution_edge, _ = d_sim(distribution_node, distribution_edge)
            point_node = d2p(distribution_edge, point_node)
            point_sims.append(point_edge)
            node_sims.append(node_sim)
            dist_sims.append(distribution_edge)
        return point_sims, node_sims, dist_sims
