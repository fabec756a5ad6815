"""Few-shot evaluation: accuracy over query nodes with DPGN's 95% confidence interval.

``predict(images [T, N, 3, S, S], support_labels [T, way*shot]) -> logits [T, way, way]``
(query rows x class columns, queries in node order) is any engine: the fake-quant
torch model, the reference integer engine, the C++/Triton/ONNX backends.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch

from .config import ModelConfig
from .errors import InputError

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def confidence_interval(per_episode: np.ndarray) -> float:
    """DPGN's convention: ``1.96 * std(per-episode accuracy) / sqrt(episodes)`` (population std)."""
    per_episode = np.asarray(per_episode, dtype=np.float64)
    if per_episode.size == 0:
        return float("nan")
    return float(1.96 * per_episode.std() / math.sqrt(per_episode.size))


def model_predict(model: torch.nn.Module) -> Predict:
    """A ``predict`` for a :class:`QGNNModel` (eval mode, no grad)."""
    def predict(images, support_labels):
        with torch.no_grad():
            return model(images, support_labels).logits
    return predict


def evaluate(predict: Predict, config: ModelConfig, episodes: int = 600, seed: int = 0,
             split: str = "test", dataset="synthetic", data_dir: Optional[str] = None,
             progress: bool = True, tasks_per_batch: int = 10, return_logits: bool = False,
             desc: str = "eval") -> Dict[str, object]:
    """Accuracy of ``predict`` on ``episodes`` tasks of ``split``.

    Returns a dict: ``accuracy`` (fraction of queries correct, in [0, 1]), ``ci95`` (same
    units), ``episodes``, ``queries``, ``way``, ``shot``, ``split``, ``dataset``, ``seed``,
    ``seconds``; with ``return_logits`` also ``logits`` float32 [episodes, way, way],
    ``query_labels`` int64 [episodes, way] and ``predictions`` int64 [episodes, way]
    (argmax; ties go to the lowest class index), for agreement checks between engines.
    Episodes depend only on (seed, split, dataset), so two engines see the same tasks.
    """
    from tqdm import tqdm

    from .data import episode_batches
    t0 = time.perf_counter()
    per_episode, all_logits, all_labels = [], [], []
    bar = tqdm(total=episodes, desc=desc, unit="ep", file=sys.stderr, disable=not progress,
               leave=False)
    for images, support, query in episode_batches(config, episodes, seed, split, dataset, data_dir,
                                                  tasks_per_batch=tasks_per_batch):
        logits = torch.as_tensor(predict(images, support)).detach().float().cpu()
        if tuple(logits.shape) != (images.shape[0], config.way, config.way):
            raise InputError(f"predict returned logits of shape {tuple(logits.shape)}, expected "
                             f"[{images.shape[0]}, {config.way}, {config.way}]")
        correct = (logits.argmax(-1) == query).float().mean(1)
        per_episode.append(correct.numpy())
        if return_logits:
            all_logits.append(logits)
            all_labels.append(query)
        bar.update(images.shape[0])
        bar.set_postfix(acc=f"{np.concatenate(per_episode).mean():.4f}")
    bar.close()
    acc = np.concatenate(per_episode)
    out: Dict[str, object] = {
        "accuracy": float(acc.mean()), "ci95": confidence_interval(acc), "episodes": int(acc.size),
        "queries": int(acc.size * config.way), "way": config.way, "shot": config.shot,
        "split": split, "dataset": dataset if isinstance(dataset, str) else getattr(dataset, "name", "?"),
        "seed": seed, "seconds": time.perf_counter() - t0,
    }
    if return_logits:
        logits = torch.cat(all_logits)
        out["logits"] = logits
        out["query_labels"] = torch.cat(all_labels)
        out["predictions"] = logits.argmax(-1)
    return out
