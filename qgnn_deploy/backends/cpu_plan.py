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
    """What ``_C.Plan`` is built from: (buffers [dtype, numel, role, arena offset] per task,
    steps as dicts of their parameters with "kind", "name", "in", "out", arena bytes per task)."""
    offsets, arena = plan.layout()
    buffers = [[_DTYPE[b.dtype], b.numel, _ROLE[b.role], max(offsets[b.id], 0)] for b in plan.buffers]
    steps = [dict(st.params, kind=st.kind, name=st.name, **{"in": list(st.inputs), "out": list(st.outputs)})
             for st in plan.steps]
    return buffers, steps, arena


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
        self._graphs: Dict[tuple, Dict[int, np.ndarray]] = {}

    def _graph_feed(self, support_labels: torch.Tensor) -> Dict[int, np.ndarray]:
        """The label-derived plan inputs of these labels, built once per distinct label batch
        (an application usually sends the same support labels every episode: building them
        was ~0.1 ms of a 2.5 ms tiny episode). Read-only arrays: the plan never writes its
        inputs, and concurrent callers share them."""
        labels = support_labels.detach().cpu().numpy()
        key = (labels.dtype.char, labels.shape, labels.tobytes())
        feed = self._graphs.get(key)
        if feed is None:
            check_support_labels(labels, self.config.way)  # only valid batches are kept
            graph = self.family.graph_arrays(labels, self.config)
            feed = {self.input_ids[name]: a.reshape(-1) for name, a in zip(self.graph_names, graph)}
            for a in feed.values():
                a.flags.writeable = False
            if len(self._graphs) >= _GRAPH_CACHE:
                self._graphs.pop(next(iter(self._graphs)), None)  # the oldest
            self._graphs[key] = feed
        return feed

    def _run(self, images: torch.Tensor, support_labels: torch.Tensor, profile: bool):
        t = int(images.shape[0])
        feed = dict(self._graph_feed(support_labels))
        feed[self.input_ids["images"]] = images.detach().cpu().float().contiguous().numpy().reshape(-1)
        outs, ns = cpu_ops._call(self.native.run, t, feed, cpu_ops.get_num_threads(), profile)
        return t, outs, ns

    def _tensor(self, outs, bid: int, t: int) -> torch.Tensor:
        # numpy's reshape, then the tensor: half the cost of a torch view (7 outputs a call)
        return torch.from_numpy(outs[bid].reshape(t, *self.plan.buffers[bid].shape))

    def run(self, images: torch.Tensor, support_labels: torch.Tensor):
        """images [T, N, 3, S, S] fp32, support_labels int [T, NS] (checked by the caller,
        ``IntModel.forward``) -> the family's output (EpisodeOutput for DPGN, EGNNOutput)."""
        t, outs, _ = self._run(images, support_labels, False)
        named = {key: [self._tensor(outs, b, t) for b in bid] if isinstance(bid, list) else self._tensor(outs, bid, t)
                 for key, bid in self.plan.outputs.items()}
        return self.family.output(named, self.config)

    def profile(self, images: torch.Tensor, support_labels: torch.Tensor,
                repeats: int = 1) -> List[Dict[str, object]]:
        """Per-step wall time (median over ``repeats`` runs): [{index, kind, name, ms}], in
        plan order. Inputs as :meth:`run` (``IntModel.profile`` validates them)."""
        runs = [self._run(images, support_labels, True)[2] for _ in range(max(1, repeats))]
        med = np.median(np.asarray(runs, dtype=np.float64), axis=0) / 1e6
        return [{"index": i, "kind": st.kind, "name": st.name, "ms": float(med[i])}
                for i, st in enumerate(self.plan.steps)]


__all__ = ["CpuPlan", "native_description"]
