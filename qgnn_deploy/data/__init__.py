"""Few-shot data: the procedural default data set, real loaders, the episode sampler.

``episode_batches`` is what training and evaluation iterate; ``calibration_episodes``
is what a fresh model's quantizers are calibrated on.
"""
from .episodes import (DATASETS, SPLITS, EpisodeIndex, calibration_episodes, episode_batches,
                       get_dataset, sample_tasks)
from .base import ImageFewShot
from .synthetic import SyntheticFewShot, render

__all__ = ["DATASETS", "SPLITS", "EpisodeIndex", "calibration_episodes", "episode_batches",
           "get_dataset", "sample_tasks", "ImageFewShot", "SyntheticFewShot", "render"]
