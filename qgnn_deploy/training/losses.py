"""The training losses: DPGN's (:func:`dpgn_loss`) and EGNN's (:func:`egnn_loss`); docs/model.md.

DPGN.

Per generation l: edge BCE on the query edges of the point graph plus 0.1 x the same
on the distribution graph, plus 0.1 x the node cross-entropy of the query rows of the
L2 node similarity; generations before the last weighted 0.2, the last 1.0.
Edge BCE is balanced as in DPGN: mean over positive (same-class) edges plus mean over
negative edges, so the 1:(way-1) imbalance does not swamp the positives.

EGNN, as the official ``ModelTrainer.train`` (``khy0809/fewshot-egnn`` train.py) computes it:
per layer l, on that layer's edges ``E_l`` [T, 2, N, N] (non-transductive: assembled from the
query graphs as the official code does, :func:`~qgnn_deploy.models.egnn.assemble_query_graphs`),
``loss = BCE(1 - E_l[:, 0], 1 - y)`` elementwise (``nn.BCELoss(reduction='none')`` on the
dissimilarity of the similarity channel, log clamped at -100 as torch does), y = 1 where the
labels agree. Mask: the query edges (every pair touching a query; support-support pairs out),
times the evaluation mask, which in the non-transductive setting also drops the query-query
block (self-edges included). Balanced: ``sum(loss m y) / sum(m y) + sum(loss m (1-y)) /
sum(m (1-y))``, sums over the whole batch (not per task). Total: the mean over the layers of
``0.5 x L_l`` for every layer but the last and ``1.0 x L_last`` (``torch.mean(torch.cat(...))``,
so divided by the number of layers). No node loss (the official ``node_loss`` is never used).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
import torch.nn.functional as F

from ..models.layers import QAggregation
from ..models.qgnn import EpisodeOutput, label_edges

EGNN_EARLY_LAYER_WEIGHT = 0.5
EGNN_LAST_LAYER_WEIGHT = 1.0

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


# ------------------------------------------------------------------ EGNN

def egnn_edge_masks(num_supports: int, num_nodes: int, transductive: bool):
    """(query edge mask, evaluation mask), each [N, N] float, as the official trainer builds
    them (no unlabeled supports): the query mask is 1 on every pair touching a query; the
    evaluation mask is 1 everywhere, but 0 on the query-query block when non-transductive."""
    query = query_edge_mask(num_supports, num_nodes)
    evaluation = torch.ones(num_nodes, num_nodes)
    if not transductive:
        evaluation[num_supports:, num_supports:] = 0
    return query, evaluation


def egnn_layer_edge_loss(edges: torch.Tensor, target: torch.Tensor, query_mask: torch.Tensor,
                         evaluation_mask: torch.Tensor) -> torch.Tensor:
    """One layer's balanced query-edge BCE (official ``pos_query_edge_loss +
    neg_query_edge_loss``). edges [T, 2, N, N], target [T, N, N] (1 = same class), masks
    broadcastable to [T, N, N]."""
    loss = F.binary_cross_entropy(1 - edges[:, 0], 1 - target, reduction="none")
    pos = query_mask * target * evaluation_mask
    neg = query_mask * (1 - target) * evaluation_mask
    return (loss * pos).sum() / pos.sum() + (loss * neg).sum() / neg.sum()


def egnn_loss(out, support_labels: torch.Tensor, query_labels: torch.Tensor,
              way: int) -> Dict[str, torch.Tensor]:
    """Total EGNN loss (official train.py) and its parts.

    Args: out, an :class:`~qgnn_deploy.models.egnn.EGNNOutput` (its ``transductive`` says
    which evaluation mask applies); support_labels int64 [T, NS]; query_labels int64 [T, way].
    Returns: ``loss`` (scalar, differentiable), ``edge`` (the last layer's query-edge loss,
    what the official trainer logs as ``train/edge_loss``; detached), ``layers`` (each
    layer's, detached [L]), ``node`` (0: EGNN has no node loss) and ``accuracy`` (query
    accuracy of the final logits).
    """
    labels = torch.cat([support_labels, query_labels], 1)
    target = label_edges(labels)
    ns, n = support_labels.shape[1], labels.shape[1]
    qmask, emask = egnn_edge_masks(ns, n, bool(out.transductive))
    qmask, emask = qmask.to(target.device), emask.to(target.device)
    layers = [egnn_layer_edge_loss(e, target, qmask, emask) for e in out.edges]
    weights = [EGNN_EARLY_LAYER_WEIGHT] * (len(layers) - 1) + [EGNN_LAST_LAYER_WEIGHT]
    total = torch.stack([w * l for w, l in zip(weights, layers)]).mean()
    acc = (out.logits.argmax(-1) == query_labels).float().mean()
    return {"loss": total, "edge": layers[-1].detach(), "layers": torch.stack(layers).detach(),
            "node": torch.zeros(()), "accuracy": acc.detach()}


def model_loss(model: nn.Module, out, support_labels: torch.Tensor, query_labels: torch.Tensor,
               way: int) -> Dict[str, torch.Tensor]:
    """The training loss of ``model``'s family: :func:`egnn_loss` or :func:`dpgn_loss`."""
    if getattr(model, "family", "dpgn") == "egnn":
        return egnn_loss(out, support_labels, query_labels, way)
    return dpgn_loss(out, support_labels, query_labels, way)
