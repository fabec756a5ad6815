"""Training: DPGN loss, AQD + SQD self-distillation, the paper's optimizer recipe, the loop."""
from .distill import AQD, SQD, Distillation, aqd_layer_loss, aqd_layers, gram, sqd_layer_loss, sqd_layers
from .losses import dpgn_loss
from .recipe import Recipe, build_optimizer, default_recipe
from .trainer import TrainingDiverged, TrainOptions, init_from, train, validate

__all__ = ["AQD", "SQD", "Distillation", "aqd_layer_loss", "aqd_layers", "gram", "sqd_layer_loss",
           "sqd_layers", "dpgn_loss", "Recipe", "build_optimizer", "default_recipe",
           "TrainingDiverged", "TrainOptions", "init_from", "train", "validate"]
