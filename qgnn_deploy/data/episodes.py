"""N-way K-shot episodes, one query per class, tasks batched, deterministic under a seed.

Layout of one task (DPGN's): ``way * shot`` supports, class-major (label 0's shots,
then label 1's, ...), then ``way`` queries, one per class, in a random order given by
``query_labels``. Which classes of the split become labels 0..way-1 is random.

Task ``i`` of a stream depends only on ``(seed, split, i)`` (its own numpy generator),
so the episodes are the same whatever ``tasks_per_batch`` is and however many are drawn.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
DATASETS = ("synthetic", "cifar-fs", "mini-imagenet", "cub")


@dataclass
class EpisodeIndex:
    """Which instances make up a batch of tasks.

    classes / instances: int64 [T, N] global class id and instance index per node;
    support_labels int64 [T, way*shot]; query_labels int64 [T, way]."""

    classes: torch.Tensor
    instances: torch.Tensor
    support_labels: torch.Tensor
    query_labels: torch.Tensor


def _task_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(split.encode()), int(index)])))


def sample_tasks(class_ids, class_sizes, way: int, shot: int, seed: int, split: str,
                 start: int, count: int) -> EpisodeIndex:
    """Tasks ``start .. start+count-1`` of the stream ``(seed, split)``.

    class_ids: the split's global class ids; class_sizes: instances per class (same order).
    """
    class_ids = np.asarray(class_ids, dtype=np.int64)
    class_sizes = np.asarray(class_sizes, dtype=np.int64)
    eligible = np.nonzero(class_sizes >= shot + 1)[0]
    if len(eligible) < way:
        raise DataError(f"split {split!r} has {len(eligible)} classes with >= {shot + 1} images; "
                        f"a {way}-way {shot}-shot episode needs {way}")
    n = way * shot + way
    classes = np.empty((count, n), np.int64)
    instances = np.empty((count, n), np.int64)
    query_labels = np.empty((count, way), np.int64)
    for t in range(count):
        rng = _task_rng(seed, split, start + t)
        chosen = rng.choice(eligible, size=way, replace=False)          # label j -> class chosen[j]
        picks = [rng.choice(class_sizes[c], size=shot + 1, replace=False) for c in chosen]
        qorder = rng.permutation(way)
        for j, c in enumerate(chosen):
            classes[t, j * shot:(j + 1) * shot] = class_ids[c]
            instances[t, j * shot:(j + 1) * shot] = picks[j][:shot]
        for q, j in enumerate(qorder):
            classes[t, way * shot + q] = class_ids[chosen[j]]
            instances[t, way * shot + q] = picks[j][shot]
        query_labels[t] = qorder
    support_labels = np.repeat(np.arange(way, dtype=np.int64), shot)[None].repeat(count, 0)
    return EpisodeIndex(torch.from_numpy(classes), torch.from_numpy(instances),
                        torch.from_numpy(support_labels), torch.from_numpy(query_labels))


def get_dataset(dataset: str = "synthetic", data_dir: Optional[str] = None, image_size: int = 32):
    """The data set object for a name: ``split_classes``, ``class_sizes``, ``load``.

    Pass the object itself to :func:`episode_batches` to read a real data set only once."""
    if dataset == "synthetic":
        from .synthetic import SyntheticFewShot
        return SyntheticFewShot(image_size)
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    if not data_dir:
        raise DataError(f"--dataset {dataset} needs --data-dir (no data set can be downloaded here)")
    if dataset == "cifar-fs":
        from .cifar_fs import load_cifar_fs
        return load_cifar_fs(data_dir, image_size)
    if dataset == "mini-imagenet":
        from .mini_imagenet import load_mini_imagenet
        return load_mini_imagenet(data_dir, image_size)
    from .cub import load_cub
    return load_cub(data_dir, image_size)


def _check(config: ModelConfig, split: str, episodes: int, tasks_per_batch: int) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if episodes < 1 or tasks_per_batch < 1:
        raise ConfigError(f"episodes and tasks_per_batch must be >= 1, got {episodes}, {tasks_per_batch}")


def episode_batches(config: ModelConfig, episodes: int, seed: int = 0, split: str = "test",
                    dataset="synthetic", data_dir: Optional[str] = None, tasks_per_batch: int = 10,
                    start: int = 0, augment: bool = False,
                    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(images float32 [T, N, 3, S, S], support_labels int64 [T, way*shot],
    query_labels int64 [T, way])`` for ``episodes`` tasks in batches of ``tasks_per_batch``
    (the last batch may be smaller). ``dataset`` is a name or a data set object.
    """
    _check(config, split, episodes, tasks_per_batch)
    ds = get_dataset(dataset, data_dir, config.image_size) if isinstance(dataset, str) else dataset
    classes, sizes = ds.split_classes(split), ds.class_sizes(split)
    n, s = config.num_nodes, config.image_size
    for b0 in range(0, episodes, tasks_per_batch):
        count = min(tasks_per_batch, episodes - b0)
        idx = sample_tasks(classes, sizes, config.way, config.shot, seed, split, start + b0, count)
        images = ds.load(idx.classes.reshape(-1), idx.instances.reshape(-1), augment=augment)
        yield images.view(count, n, 3, s, s), idx.support_labels, idx.query_labels


def calibration_episodes(config: ModelConfig, tasks: int = 8, seed: int = 0,
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``tasks`` synthetic train-split episodes in one batch: (images float32
    [tasks, N, 3, S, S], support_labels int64 [tasks, way*shot])."""
    images, support, _ = next(episode_batches(config, tasks, seed, split="train",
                                              dataset="synthetic", tasks_per_batch=tasks))
    return images, support
