"""The ``cpu`` backend's whole-episode executor: an IntModel's compiled plan in one native call.

::

    im.backend = "cpu"                 # IntModel.forward runs im.compiled() (this class)
    out = im(images, support_labels)   # EpisodeOutput, as every other backend returns
    prof = im.compiled().profile(images, support_labels)   # per-step wall times

The plan (:mod:`qgnn_deploy.plan`) is built once per model and validated once by the
native side (``_C.Plan``: every buffer, size and layer parameter); a call checks the
episode (``check_episode``: shapes, dtypes, NaN/Inf, labels) and hands the arrays over.
The native run releases the GIL; concurrent calls are safe (each takes its own arena).
Threads: :func:`qgnn_deploy.backends.cpu.get_num_threads`.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from ..models.qgnn import EpisodeOutput
from . import cpu as cpu_ops

_DTYPE = {"u8": 0, "f32": 1}
_ROLE = {"input": 0, "output": 1, "temp": 2}


class CpuPlan:
    """An IntModel's plan on the C++ executor. ``stamp`` identifies the model state it was
    built from (IntModel.compiled rebuilds it when that changes)."""

    def __init__(self, model, stamp=None):
        from ..plan import compile_plan
        self.plan = compile_plan(model)
        self.stamp = stamp
        offsets, arena = self.plan.layout()
        buffers = [[_DTYPE[b.dtype], b.numel, _ROLE[b.role], max(offsets[b.id], 0)] for b in self.plan.buffers]
        steps = [dict(st.params, kind=st.kind, name=st.name, **{"in": st.inputs, "out": st.outputs})
                 for st in self.plan.steps]
        self.native = cpu_ops._call(cpu_ops._ext().Plan, buffers, steps, arena)
        self.input_ids = self.plan.inputs
        self.arena_bytes_per_task = arena

    def _run(self, images: torch.Tensor, graph, profile: bool):
        t = int(images.shape[0])
        arrays = (images, *graph)
        names = ("images", "distribution_node", "point_edge", "distribution_edge", "onehot")
        feed = {self.input_ids[n]: a.detach().cpu().float().contiguous().numpy().reshape(-1)
                for n, a in zip(names, arrays)}
        outs, ns = cpu_ops._call(self.native.run, t, feed, cpu_ops.get_num_threads(), profile)
        return t, outs, ns

    def _tensor(self, outs, bid: int, t: int) -> torch.Tensor:
        return torch.from_numpy(outs[bid]).view(t, *self.plan.buffers[bid].shape)

    def run(self, images: torch.Tensor, graph) -> EpisodeOutput:
        """images [T, N, 3, S, S] fp32 and the episode graph (``episode_graph``) -> EpisodeOutput."""
        t, outs, _ = self._run(images, graph, False)
        o = self.plan.outputs
        lst = lambda key: [self._tensor(outs, b, t) for b in o[key]]  # noqa: E731
        return EpisodeOutput(self._tensor(outs, o["logits"], t), lst("point_edges"),
                             lst("node_similarities"), lst("distribution_edges"))

    def profile(self, images: torch.Tensor, graph, repeats: int = 1) -> List[Dict[str, object]]:
        """Per-step wall time (median over ``repeats`` runs): [{index, kind, name, ms}], in
        plan order. Inputs as :meth:`run` (``IntModel.profile`` validates them)."""
        runs = np.asarray([self._run(images, graph, True)[2] for _ in range(max(1, repeats))], dtype=np.float64)
        med = np.median(runs, axis=0) / 1e6
        return [{"index": i, "kind": st.kind, "name": st.name, "ms": float(med[i])}
                for i, st in enumerate(self.plan.steps)]


__all__ = ["CpuPlan"]
