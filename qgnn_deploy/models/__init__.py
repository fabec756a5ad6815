"""The reference models, FP and PQ-quantized: ResNet-12 + DPGN (``QGNNModel``) and EGNN
(``EGNNModel``, :mod:`qgnn_deploy.models.egnn`)."""
from .dpgn import DPGN, D2PAgg, P2DAgg, PointSimilarity
from .egnn import EGNN_PRESETS, EGNNConfig, EGNNModel, EGNNOutput, build_egnn
from .layers import QAggregation, QConv2d, QLinear
from .qgnn import (EpisodeOutput, QGNNModel, episode_logits, has_quantized_layers, initial_graph,
                   quantizable_layers)
from .qgnn import build_model as build_dpgn
from .resnet12 import ResNet12, ResNet12Block


def build_model(config):
    """A fresh model for ``config``: :class:`EGNNModel` for an
    :class:`~qgnn_deploy.models.egnn.EGNNConfig`, else the DPGN :class:`QGNNModel` (FP when
    ``config.bits == 32`` and no per-layer overrides)."""
    if isinstance(config, EGNNConfig):
        return build_egnn(config)
    return build_dpgn(config)


__all__ = ["DPGN", "D2PAgg", "P2DAgg", "PointSimilarity", "QAggregation", "QConv2d", "QLinear",
           "EpisodeOutput", "QGNNModel", "build_model", "build_dpgn", "episode_logits", "has_quantized_layers",
           "initial_graph", "quantizable_layers", "ResNet12", "ResNet12Block", "EGNN_PRESETS", "EGNNConfig",
           "EGNNModel", "EGNNOutput", "build_egnn"]
