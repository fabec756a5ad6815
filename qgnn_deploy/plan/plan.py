"""The compiled plan: a flat list of steps over buffers, the lowered form of an integer model.

Every buffer holds ``T`` times its per-task size (T = tasks in the call), so one plan
serves any T; its storage is an ``input`` array, an ``output`` array the executor
allocates per call, or a slot of one reused arena (``temp``, placed by :meth:`Plan.layout`
so that buffers whose lifetimes do not overlap share memory).

Step vocabulary (``Step.kind``; shapes per task, NHWC maps, see ops/episode_ops.py and
ops/reference.py for the exact semantics each reproduces):

==========================  ===========================================================
``quantize``                fp32 -> uint8 codes ``clamp(rne((x - l) / s), 0, 2^bits - 1)``
``qconv``                   quantized conv, uint8 NHWC -> fp32 or codes (fused epilogue)
``qlinear``                 quantized linear / pointwise conv over rows
``qbmm``                    quantized graph aggregation ``A @ V`` per graph (optional row offsets)
``node_rows``               per-node codes: codes minus the row minimum, and that minimum
``conv_f32`` / ``linear_f32``  FP32 layers, products summed in float64; a conv with ``nchw``
                            reads the NCHW images (their layout change fused in)
``bmm_f32``                 FP32 aggregation, float64 sums
``nchw_to_nhwc``            layout change of the input images
``max_pool`` / ``mean_hw``  pooling of NHWC maps (fp32 or codes) / global average
``pairwise_sqdiff``         ``(v_i - v_j)^2`` over node pairs
``pairwise_absdiff``        ``|v_i - v_j|`` over node pairs (EGNN's edge features)
``neg_sum_last``            ``-sum`` over the last dim (float64)
``sigmoid``                 float64 logistic, rounded once
``edge_update``             DPGN's masked, similarity-weighted row renormalisation
``edge_update_2ch``         the two-channel (similarity, dissimilarity) update of EGNN:
                            per channel the masked, ``(s, 1 - s)``-weighted L1 row
                            renormalisation, ``+ [I, 0] + eps``, channels divided by their
                            sum; two outputs
``offdiag_l1_normalize``    ``F.normalize(x (1 - I), p=1)`` of every N x N matrix
``concat_last``             concatenation of column ranges on the last dim
``take_rows``               per task, a constant list of rows of ``[R, C]`` (fp32 or codes)
``label_scores``            query rows x support one-hot labels (float64 sums); square edges
                            from row NS (DPGN), or ``rows`` x ``n`` edges from ``first_row``
==========================  ===========================================================

Graph steps (``qbmm``, ``bmm_f32``, ``node_rows``' rows, ``pairwise_*``, ``edge_update*``,
``offdiag_l1_normalize``) take an optional ``batch``: graphs per task, each of the step's
N x N / N x D geometry on its own (EGNN's non-transductive episode runs ``way`` query graphs
per task); absent, one graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple


ALIGN = 64  # bytes; per-task slot offsets are multiples of it, so T * offset stays aligned
DTYPE_BYTES = {"u8": 1, "f32": 4}
ROLES = ("input", "output", "temp")


@dataclass
class Buffer:
    """One storage buffer: ``numel`` elements per task of ``dtype``; ``shape`` per task."""

    id: int
    dtype: str
    numel: int
    role: str
    name: str
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass
class Step:
    """``kind`` reads buffers ``inputs`` (-1: an absent optional input) and writes
    ``outputs``; ``name`` is the layer or op it comes from (profiles, errors)."""

    kind: str
    name: str
    inputs: List[int]
    outputs: List[int]
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    buffers: List[Buffer]
    steps: List[Step]
    outputs: Dict[str, Any]          # name -> buffer id, or list of ids
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def inputs(self) -> Dict[str, int]:
        return {b.name: b.id for b in self.buffers if b.role == "input"}

    def layout(self) -> Tuple[List[int], int]:
        """Per-task byte offsets of the ``temp`` buffers in the arena (-1 for the others)
        and the arena's per-task size: greedy first fit by lifetime (first write .. last read)."""
        first, last = {}, {}
        for i, st in enumerate(self.steps):
            for b in st.outputs + [b for b in st.inputs if b >= 0]:
                first.setdefault(b, i)
                last[b] = i
        offsets = [-1] * len(self.buffers)
        live: List[Tuple[int, int, int]] = []  # (offset, size, last step)
        size = 0
        order = sorted((first[b.id], b.id) for b in self.buffers if b.role == "temp" and b.id in first)
        for start, bid in order:
            live = [s for s in live if s[2] >= start]
            need = -(-self.buffers[bid].nbytes // ALIGN) * ALIGN
            off = 0
            for o, n, _ in sorted(live):
                if off + need <= o:
                    break
                off = max(off, o + n)
            offsets[bid] = off
            live.append((off, need, last[bid]))
            size = max(size, off + need)
        return offsets, size

    def summary(self) -> str:
        """One line per step: kind, name, shapes (per task)."""
        lines = []
        for i, st in enumerate(self.steps):
            ins = ", ".join("-" if b < 0 else f"{self.buffers[b].dtype}{list(self.buffers[b].shape)}"
                            for b in st.inputs)
            outs = ", ".join(f"{self.buffers[b].dtype}{list(self.buffers[b].shape)}" for b in st.outputs)
            lines.append(f"{i:4d} {st.kind:<20s} {st.name:<52s} {ins} -> {outs}")
        return "\n".join(lines)


__all__ = ["Plan", "Step", "Buffer", "ALIGN", "DTYPE_BYTES"]
