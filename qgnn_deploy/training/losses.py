"""DPGN's training loss (docs/model.md).

Per generation l: edge BCE on the query edges of the point graph plus 0.1 x the same
on the distribution graph, plus 0.1 x the node cross-entropy of the query rows of the
L2 node similarity; generations before the last weighted 0.2, the last 1.0.
Edge BCE is balanced as in DPGN: mean over positive (same-class) edges plus mean over
negative edges, so the 1:(way-1) imbalance does not swamp the positives.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
import torch.nn.functional as F

from ..models.layers import QAggregation
from ..models.qgnn import EpisodeOutput, label_edges

DIST_WEIGHT = 0.1
NODE_WEIGHT = 0.1
EARLY_GENERATION_WEIGHT = 0.2


def query_edge_mask(num_supports: int, num_nodes: int) -> torch.Tensor:
    """[N, N] float, 1 on every edge that touches a query node (support-support edges 0)."""
    mask = torch.ones(num_nodes, num_nodes)
    mask[:num_supports, :num_supports] = 0
    return mask


def balanced_edge_bce(edges: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE of predicted edges [T, N, N] in (0, 1) against target edges [T, N, N] on ``mask``,
    positives and negatives averaged separately and summed."""
    loss = F.binary_cross_entropy(edges.clamp(1e-7, 1 - 1e-7), target, reduction="none")
    pos, neg = mask * target, mask * (1 - target)
    return (loss * pos).sum() / pos.sum().clamp_min(1) + (loss * neg).sum() / neg.sum().clamp_min(1)


def node_logits(node_similarity: torch.Tensor, support_labels: torch.Tensor, way: int) -> torch.Tensor:
    """Query rows of the node similarity [T, N, N] x support one-hot -> [T, Q, way]."""
    ns = support_labels.shape[1]
    onehot = F.one_hot(support_labels, way).to(node_similarity.dtype)
    return torch.bmm(node_similarity[:, ns:, :ns], onehot)


def dpgn_loss(out: EpisodeOutput, support_labels: torch.Tensor, query_labels: torch.Tensor,
              way: int) -> Dict[str, torch.Tensor]:
    """Total DPGN loss and its parts.

    Args: out from ``QGNNModel.forward``; support_labels int64 [T, NS]; query_labels int64 [T, way].
    Returns: dict with ``loss`` (scalar, differentiable), ``edge``, ``node`` (detached parts)
    and ``accuracy`` (query accuracy of the final logits).
    """
    labels = torch.cat([support_labels, query_labels], 1)
    target = label_edges(labels)
    ns, n = support_labels.shape[1], labels.shape[1]
    mask = query_edge_mask(ns, n).to(target.device).expand_as(target)
    gens = len(out.point_edges)
    total = torch.zeros((), device=target.device)
    edge_sum = node_sum = 0.0
    for l in range(gens):
        w = 1.0 if l == gens - 1 else EARLY_GENERATION_WEIGHT
        edge = balanced_edge_bce(out.point_edges[l], target, mask) + DIST_WEIGHT * balanced_edge_bce(
            out.distribution_edges[l], target, mask)
        # The L2 similarity can be in the hundreds: DPGN feeds it to CE as is.
        node = F.cross_entropy(node_logits(out.node_similarities[l], support_labels, way).reshape(-1, way),
                               query_labels.reshape(-1))
        total = total + w * (edge + NODE_WEIGHT * node)
        edge_sum += w * float(edge.detach())
        node_sum += w * float(node.detach())
    acc = (out.logits.argmax(-1) == query_labels).float().mean()
    return {"loss": total, "edge": torch.tensor(edge_sum), "node": torch.tensor(node_sum),
            "accuracy": acc.detach()}


def node_bits_penalty(model: nn.Module, target: float) -> Optional[torch.Tensor]:
    """``relu(mean soft width - target)`` over the aggregations with per-node widths, from
    their last training forward (``QAggregation.soft_node_bits``); None when there are none.

    Per-node widths lose nothing at a given step, so the task loss alone shrinks the step
    until every node takes the widest option; this term is the memory side of the trade."""
    soft = [m.last_soft_node_bits for m in model.modules()
            if isinstance(m, QAggregation) and m.last_soft_node_bits is not None]
    if not soft:
        return None
    return torch.relu(torch.stack(soft).mean() - float(target))
