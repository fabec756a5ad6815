"""The ``cpu`` backend's whole-episode executor: an IntModel's compiled plan in one native call.

::

    im.backend = "cpu"                 # IntModel.forward runs im.compiled() (this class)
    out = im(images, support_labels)   # EpisodeOutput, as every other backend returns
    prof = im.compiled().profile(images, support_labels)   # per-step wall times

The plan (:mod:`qgnn_deploy.plan`) is built once per model and validated once by the
native side (``_C.Plan``: every buffer, size and layer parameter). A call's episode is
checked as ``check_episode`` does, in three places: shapes and dtypes by the caller
(``IntModel.forward``), the support labels here once per distinct label batch, NaN / Inf
images by the plan's first step (which reads every value anyway; ``InputError`` either way).
The native run releases the GIL; concurrent calls are safe (each takes its own arena).
Threads: :func:`qgnn_deploy.backends.cpu.get_num_threads`.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from ..models.qgnn import check_support_labels
from . import cpu as cpu_ops

_DTYPE = {"u8": 0, "f32": 1}
_ROLE = {"input": 0, "output": 1, "temp": 2}
_GRAPH_CACHE = 16  # distinct support-label batches whose graph inputs are kept


def native_description(plan):
    """What ``_C.Plan`` is built from: (buffers [dtype, numel, role, arena offset, *shape] per
    task, steps as dicts of their parameters with "kind", "name", "in", "out", arena bytes per
    task)."""
    offsets, arena = plan.layout()
    buffers = [[_DTYPE[b.dtype], b.numel, _ROLE[b.role], max(offsets[b.id], 0), *b.shape] for b in plan.buffers]
    steps = [dict(st.params, kind=st.kind, name=st.name, **{"in": list(st.inputs), "out": list(st.outputs)})
             for st in plan.steps]
    return buffers, steps, arena


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A view of a CPU tensor (a copy of any other): ``numpy()`` alone where it can, as the
    episode's tensors usually are (detach / cpu / numpy were ~10 us of a tiny T=1 call,
    right after the native run had evicted the interpreter's data)."""
    try:
        return t.numpy()
    except (RuntimeError, TypeError):  # requires grad, or not on the CPU
        return t.detach().cpu().numpy()


class CpuPlan:
    """An IntModel's plan on the C++ executor: a snapshot of the model's constants (weights
    are repacked and epilogue tables derived here, once)."""

    def __init__(self, model):
        from ..plan import compile_plan
        self.plan = compile_plan(model)
        self.native = cpu_ops._call(cpu_ops._ext().Plan, *native_description(self.plan))
        self.input_ids = self.plan.inputs
        self.family, self.config = model.family_spec, model.config
        self.graph_names = [name for name, _ in self.family.graph_inputs(self.config)]
        self._graphs: Dict[tuple, List[np.ndarray]] = {}
        # the native run takes its inputs and returns its outputs in buffer order
        order = [b.id for b in self.plan.buffers if b.role == "input"]
        self._feed_at = {bid: i for i, bid in enumerate(order)}
        self._images_at = self._feed_at[self.input_ids["images"]]
        at = {b.id: i for i, b in enumerate(b for b in self.plan.buffers if b.role == "output")}
        self._named = [(key, [at[b] for b in bid] if isinstance(bid, list) else at[bid])
                       for key, bid in self.plan.outputs.items()]

    def _graph_feed(self, support_labels: torch.Tensor) -> List[np.ndarray]:
        """The plan's inputs for these labels in its order, the images' slot None: the
        label-derived ones are built once per distinct label batch (an application usually
        sends the same support labels every episode: building them was ~0.1 ms of a 2.5 ms
        tiny episode). Read-only arrays: the plan never writes its inputs, and concurrent
        callers share them."""
        labels = _numpy(support_labels)
        key = (labels.dtype.char, labels.shape, labels.tobytes())
        feed = self._graphs.get(key)
        if feed is None:
            check_support_labels(labels, self.config.way)  # only valid batches are kept
            feed = [None] * len(self._feed_at)
            for name, a in zip(self.graph_names, self.family.graph_arrays(labels, self.config)):
                a = np.ascontiguousarray(a)
                a.flags.writeable = False
                feed[self._feed_at[self.input_ids[name]]] = a
            if len(self._graphs) >= _GRAPH_CACHE:
                self._graphs.pop(next(iter(self._graphs)), None)  # the oldest
            self._graphs[key] = feed
        return feed

    def _run(self, images: torch.Tensor, support_labels: torch.Tensor, profile: bool, threads: int = 0):
        """(output arrays [T, *shape] in buffer order, per-step ns or None). Python's share
        of a tiny T=1 episode was ~45 us of its ~0.85 ms (the native run evicts the
        interpreter's data): as few calls per episode as it takes."""
        feed = list(self._graph_feed(support_labels))
        if images.dtype != torch.float32 or not images.is_contiguous():
            images = images.float().contiguous()
        feed[self._images_at] = _numpy(images)
        outs, ns = cpu_ops._call(self.native.run, images.shape[0], feed, threads or cpu_ops.get_num_threads(),
                                 profile)
        return outs, ns

    def run(self, images: torch.Tensor, support_labels: torch.Tensor, threads: int = 0):
        """images [T, N, 3, S, S] fp32, support_labels int [T, NS] (checked by the caller,
        ``IntModel.forward``) -> the family's output (EpisodeOutput for DPGN, EGNNOutput).
        ``threads``: 0 for :func:`~qgnn_deploy.backends.cpu.get_num_threads`."""
        outs, _ = self._run(images, support_labels, False, threads)
        t = torch.from_numpy
        named = {key: [t(outs[i]) for i in at] if isinstance(at, list) else t(outs[at]) for key, at in self._named}
        return self.family.output(named, self.config)

    def profile(self, images: torch.Tensor, support_labels: torch.Tensor,
                repeats: int = 1) -> List[Dict[str, object]]:
        """Per-step wall time (median over ``repeats`` runs): [{index, kind, name, ms}], in
        plan order. Inputs as :meth:`run` (``IntModel.profile`` validates them)."""
        runs = [self._run(images, support_labels, True)[1] for _ in range(max(1, repeats))]
        med = np.median(np.asarray(runs, dtype=np.float64), axis=0) / 1e6
        return [{"index": i, "kind": st.kind, "name": st.name, "ms": float(med[i])}
                for i, st in enumerate(self.plan.steps)]


__all__ = ["CpuPlan", "native_description"]
