"""The reference model: ResNet-12 + DPGN, in FP and PQ-quantized form."""
from .dpgn import DPGN, D2PAgg, P2DAgg, PointSimilarity
from .layers import QAggregation, QConv2d, QLinear
from .qgnn import (EpisodeOutput, QGNNModel, build_model, episode_logits, has_quantized_layers,
                   initial_graph, quantizable_layers)
from .resnet12 import ResNet12, ResNet12Block

__all__ = ["DPGN", "D2PAgg", "P2DAgg", "PointSimilarity", "QAggregation", "QConv2d", "QLinear",
           "EpisodeOutput", "QGNNModel", "build_model", "episode_logits", "has_quantized_layers", "initial_graph",
           "quantizable_layers", "ResNet12", "ResNet12Block"]
