"""PlanBuilder: lowers an integer model into a compiled plan by running its episode symbolically.

``IntModel.episode(ops, ...)`` is written against the episode-op vocabulary
(:mod:`qgnn_deploy.ops.episode_ops`); given a :class:`PlanBuilder` as ``ops``, every call
records a :class:`~qgnn_deploy.plan.plan.Step` on symbolic :class:`Value` s instead of
computing. Values have a per-task shape (the tasks axis T is left out: every buffer of
a plan holds T times its per-task size, so one plan serves any T).

This is the one place where a layer's folded parameters are turned into step
parameters; the native executor derives the kernels' epilogue tables from them
(``csrc/qgemm.cpp`` ``prepare_layer``, the same derivation the eager ops use).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError
from ..intmodel import (FloatAggregation, FloatConv2d, FloatLinear, IntAggregation, IntConv2d,
                        IntLinear)
from .plan import Buffer, Plan, Step

#: steps that run a folded layer; their second input is the residual
LAYER_KINDS = ("qconv", "qlinear", "conv_f32", "linear_f32")


@dataclass(frozen=True)
class Value:
    """A symbolic tensor: storage buffer ``buf``, per-task ``shape``, ``dtype`` (u8 | f32)."""

    buf: int
    shape: Tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _np(t: Optional[torch.Tensor], dtype=np.float32) -> Optional[np.ndarray]:
    return None if t is None else np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype, copy=False))


class PlanBuilder:
    """Records episode ops as plan steps (same method names and semantics as TorchEpisodeOps)."""

    def __init__(self):
        self.buffers: List[Buffer] = []
        self.steps: List[Step] = []
        self._quantized: Dict[tuple, Value] = {}

    # -- values -----------------------------------------------------------
    def new(self, shape: Sequence[int], dtype: str, role: str = "temp", name: str = "") -> Value:
        shape = tuple(int(v) for v in shape)
        self.buffers.append(Buffer(len(self.buffers), dtype, math.prod(shape), role, name, shape))
        return Value(len(self.buffers) - 1, shape, dtype)

    def input(self, name: str, shape: Sequence[int]) -> Value:
        return self.new(shape, "f32", "input", name)

    @staticmethod
    def view(x: Value, shape: Sequence[int]) -> Value:
        shape = tuple(int(v) for v in shape)
        if math.prod(shape) != x.numel:
            raise ConfigError(f"plan: cannot view {x.shape} as {shape}")
        return Value(x.buf, shape, x.dtype)

    def _step(self, kind: str, name: str, inputs: Sequence[Optional[Value]], outputs: Sequence[Value],
              **params) -> None:
        ins = [-1 if v is None else v.buf for v in inputs]
        self.steps.append(Step(kind, name, ins, [v.buf for v in outputs], params))

    def finish(self, outputs: Dict[str, object], **meta) -> Plan:
        """The plan whose named outputs are ``outputs`` (Values or lists of Values)."""
        names: Dict[str, object] = {}
        for key, val in outputs.items():
            vals = val if isinstance(val, list) else [val]
            for i, v in enumerate(vals):
                b = self.buffers[v.buf]
                if b.role == "input":
                    raise ConfigError(f"plan: output {key} is an input")
                if b.role == "output":  # one buffer, two names: copy so each output owns its array
                    v = self._copy(v, f"{key}[{i}]")
                    b = self.buffers[v.buf]
                self.buffers[v.buf] = Buffer(b.id, b.dtype, b.numel, "output",
                                             key if not isinstance(val, list) else f"{key}[{i}]", v.shape)
                vals[i] = v
            names[key] = [v.buf for v in vals] if isinstance(val, list) else vals[0].buf
        self._fuse_requantization()
        self._fuse_shortcuts()
        self._residual_in_place()
        self._fuse_input_layout()
        return self._compact(names, meta)

    def _readers(self) -> Dict[int, List[int]]:
        """buffer id -> the steps reading it, in order."""
        readers: Dict[int, List[int]] = {}
        for i, st in enumerate(self.steps):
            for b in st.inputs:
                readers.setdefault(b, []).append(i)
        return readers

    def _fuse_requantization(self) -> None:
        """A layer whose fp32 output only feeds quantizers -- directly, or through max-pools,
        which commute with them (the quantizer is monotone) -- emits the codes itself, one set
        per distinct quantizer (at most 3), and the max-pools run on codes: the fp32 map is
        never written (the stem; a ResNet block's conv3, whose pooled output feeds the next
        block's two convs and, pooled again, layer_second)."""
        readers = self._readers()

        def uses(buf: int, path: tuple):
            """[(quantize step, max-pool steps on the way)] of ``buf``, or None."""
            if self.buffers[buf].role != "temp" or not readers.get(buf):
                return None
            found = []
            for c in readers[buf]:
                cs = self.steps[c]
                if cs.kind == "quantize":
                    found.append((c, path))
                elif cs.kind == "max_pool" and (more := uses(cs.outputs[0], path + (c,))) is not None:
                    found += more
                else:
                    return None
            return found

        drop, rename, insert = set(), {}, {}
        key = lambda st: (st.params["l"], st.params["s"], st.params["bits"])  # noqa: E731
        for st in self.steps:
            y = st.outputs[0]
            if st.kind not in LAYER_KINDS or "requant" in st.params or self.buffers[y].dtype != "f32":
                continue
            found = uses(y, ())
            if not found:
                continue
            keys = list(dict.fromkeys(key(self.steps[d]) for d, _ in found))
            if len(keys) > 3:
                continue
            codes = [self.new(self.buffers[y].shape, "u8").buf for _ in keys]
            st.outputs[:] = codes
            st.params["requant"] = keys
            pools: Dict[tuple, int] = {}
            for d, path in found:
                k = keys.index(key(self.steps[d]))
                src = codes[k]
                for c in path:  # the same pools, on codes
                    if (c, k) not in pools:
                        ps = self.steps[c]
                        out = self.new(self.buffers[ps.outputs[0]].shape, "u8").buf
                        insert.setdefault(c, []).append(Step("max_pool", ps.name, [src], [out], dict(ps.params)))
                        pools[(c, k)] = out
                        drop.add(c)
                    src = pools[(c, k)]
                rename[self.steps[d].outputs[0]] = src
                drop.add(d)
        if not drop:
            return
        steps = []
        for i, st in enumerate(self.steps):
            steps += insert.get(i, [])
            if i not in drop:
                st.inputs[:] = [rename.get(b, b) for b in st.inputs]
                steps.append(st)
        self.steps = steps

    def _fuse_shortcuts(self) -> None:
        """A pointwise layer whose fp32 output is only another pointwise layer's residual (a
        ResNet block's shortcut conv feeding conv3) runs inside that layer's step, tile by
        tile: the residual map (4 bytes per element, the largest tensor of a block) is
        never written to memory."""
        producer = {b: i for i, st in enumerate(self.steps) for b in st.outputs}
        readers = self._readers()
        drop = set()
        for i, st in enumerate(self.steps):
            if st.kind != "qlinear" or len(st.inputs) < 2 or st.inputs[1] < 0:
                continue
            res = st.inputs[1]
            j = producer.get(res)
            sc = self.steps[j] if j is not None else None
            if (sc is None or sc.kind != "qlinear" or "requant" in sc.params or len(sc.outputs) != 1
                    or (len(sc.inputs) > 1 and sc.inputs[1] >= 0) or readers.get(res) != [i]
                    or self.buffers[res].role != "temp" or sc.params["rows"] != st.params["rows"]
                    or sc.params["w_packed"].shape[0] != st.params["w_packed"].shape[0]):
                continue
            st.params["shortcut"] = {k: v for k, v in sc.params.items() if k != "rows"}
            st.inputs[1] = sc.inputs[0]
            st.name = f"{st.name} + {sc.name}"
            drop.add(j)
        self.steps = [st for i, st in enumerate(self.steps) if i not in drop]

    def _fuse_input_layout(self) -> None:
        """An images layout change (``nchw_to_nhwc``) whose only reader is an FP32 conv
        without residual (the stem) runs inside that conv's zero-bordered copy (``nchw``):
        one pass over the images instead of two, the NaN / Inf check with it, and no NHWC
        copy of them in the arena."""
        readers = self._readers()
        drop = set()
        for i, st in enumerate(self.steps):
            if st.kind != "nchw_to_nhwc":
                continue
            y = st.outputs[0]
            reads = readers.get(y, [])
            conv = self.steps[reads[0]] if len(reads) == 1 else None
            if (conv is None or conv.kind != "conv_f32" or conv.inputs[0] != y or self.buffers[y].role != "temp"
                    or (len(conv.inputs) > 1 and conv.inputs[1] >= 0)):
                continue
            conv.inputs[0] = st.inputs[0]
            conv.params["nchw"] = 1
            drop.add(i)
        self.steps = [st for i, st in enumerate(self.steps) if i not in drop]

    def _compact(self, names: Dict[str, object], meta) -> Plan:
        """The plan without the buffers no step uses any more, renumbered in order."""
        used = {b for st in self.steps for b in st.inputs + st.outputs if b >= 0}
        keep = [b for b in self.buffers if b.id in used or b.role != "temp"]
        new_id = {b.id: i for i, b in enumerate(keep)}
        buffers = [Buffer(new_id[b.id], b.dtype, b.numel, b.role, b.name, b.shape) for b in keep]
        steps = [Step(st.kind, st.name, [new_id[b] if b >= 0 else -1 for b in st.inputs],
                      [new_id[b] for b in st.outputs], st.params) for st in self.steps]
        remap = lambda v: [new_id[b] for b in v] if isinstance(v, list) else new_id[v]  # noqa: E731
        return Plan(buffers, steps, {k: remap(v) for k, v in names.items()}, meta)

    def _residual_in_place(self) -> None:
        """A layer adding a residual it is the last reader of writes its fp32 output over it:
        the epilogue then loads and stores the same addresses. Two distinct buffers whose
        addresses agree modulo 4 KiB made the loads wait on unrelated stores (measured: a 1x1
        64-channel conv with residual 3x slower at some relative offsets)."""
        last = {}
        for i, st in enumerate(self.steps):
            for b in st.inputs:
                last[b] = i
        for i, st in enumerate(self.steps):
            if st.kind not in LAYER_KINDS or len(st.inputs) < 2 or st.inputs[1] < 0:
                continue
            res, out = st.inputs[1], st.outputs[0]
            rb, ob = self.buffers[res], self.buffers[out]
            # a fused shortcut's second input is its u8 codes, not a residual
            if (last.get(res) != i or rb.role != "temp" or ob.role != "temp" or ob.dtype != "f32"
                    or rb.dtype != "f32" or rb.numel != ob.numel or res == st.inputs[0]):
                continue
            st.outputs[0] = res
            for later in self.steps[i + 1:]:
                later.inputs[:] = [res if b == out else b for b in later.inputs]
                for k, b in enumerate(later.outputs):
                    if b == out:  # pragma: no cover - a buffer has one writer
                        later.outputs[k] = res
            for j in range(i + 1, len(self.steps)):
                for b in self.steps[j].inputs:
                    last[b] = max(last.get(b, j), j)

    def _copy(self, x: Value, name: str) -> Value:
        y = self.new(x.shape, x.dtype)
        self._step("concat_last", name, [x], [y], rows=x.numel // x.shape[-1],
                   parts=[(x.shape[-1], 0, x.shape[-1])])
        return y

    # -- layers -----------------------------------------------------------
    def _codes(self, x: Value, l: float, s: float, bits: int, name: str) -> Value:
        """``x``'s codes under ``(l, s, bits)``: u8 values pass as they are (a producer with a
        fused requantization emitted them), fp32 values get one quantize step per quantizer."""
        if x.dtype == "u8":
            return x
        key = (x.buf, x.shape, float(l), float(s), int(bits))
        if key not in self._quantized:
            q = self.new(x.shape, "u8")
            self._step("quantize", f"{name}.quantize", [x], [q], n=x.numel, l=float(l), s=float(s),
                       bits=int(bits))
            self._quantized[key] = q
        return self._quantized[key]

    @staticmethod
    def _epilogue(m) -> dict:
        p = {"post_scale": _np(m.post_scale), "post_shift": _np(m.post_shift), "slope": m.slope}
        return p

    def _quant_params(self, m) -> dict:
        p = dict(w_packed=_np(m.w_packed, np.uint8), w_bits=m.w_bits, a_bits=m.a_bits,
                 w_scale=_np(m.w_scale), w_offset=_np(m.w_offset), a_scale=m.a_scale, a_offset=m.a_offset,
                 **self._epilogue(m))
        if m.out_quant is not None:
            p["requant"] = [(m.out_l, m.out_s, m.out_bits)]
        return p

    def layer(self, m, x: Value, residual: Optional[Value] = None) -> Value:
        if isinstance(m, (IntConv2d, IntLinear)):
            codes = self._codes(x, m.a_offset, m.a_scale, m.a_bits, m.name)
            dtype = "u8" if m.out_quant is not None else "f32"
            if isinstance(m, IntLinear) or m.pointwise:
                k = codes.shape[-1]
                if k != m.reduction:
                    raise ConfigError(f"plan: {m.name} takes {m.reduction} features, got {codes.shape}")
                out_c = m.out_features if isinstance(m, IntLinear) else m.out_channels
                y = self.new(codes.shape[:-1] + (out_c,), dtype)
                self._step("qlinear", m.name, [codes, residual], [y], rows=codes.numel // k, k=k,
                           **self._quant_params(m))
                return y
            n, h, w, c = codes.shape
            ho = (h + 2 * m.padding - m.kernel_size) // m.stride + 1
            wo = (w + 2 * m.padding - m.kernel_size) // m.stride + 1
            y = self.new((n, ho, wo, m.out_channels), dtype)
            self._step("qconv", m.name, [codes, residual], [y], images=n, h=h, w=w, c=c, ks=m.kernel_size,
                       stride=m.stride, pad=m.padding, **self._quant_params(m))
            return y
        if isinstance(m, (FloatConv2d, FloatLinear)):
            if x.dtype != "f32":
                raise ConfigError(f"plan: the FP32 layer {m.name} received codes (bad fold)")
            bias = _np(m.bias)
            if isinstance(m, FloatLinear) or m.pointwise:
                weight = _np(m.weight.reshape(m.weight.shape[0], -1))
                o, k = weight.shape
                y = self.new(x.shape[:-1] + (o,), "f32")
                self._step("linear_f32", m.name, [x, residual], [y], rows=x.numel // k, k=k, weight=weight,
                           bias=bias, **self._epilogue(m))
                return y
            n, h, w, c = x.shape
            ks = m.kernel_size
            ho = (h + 2 * m.padding - ks) // m.stride + 1
            wo = (w + 2 * m.padding - ks) // m.stride + 1
            y = self.new((n, ho, wo, m.out_channels), "f32")
            weight = _np(m.weight.permute(0, 2, 3, 1))  # [O, kh, kw, C]: NHWC taps
            self._step("conv_f32", m.name, [x, residual], [y], images=n, h=h, w=w, c=c, o=m.out_channels,
                       ks=ks, stride=m.stride, pad=m.padding, weight=weight, bias=bias, **self._epilogue(m))
            return y
        raise ConfigError(f"plan: cannot lower a {type(m).__name__} layer")

    def aggregate(self, m, adj: Value, nodes: Value) -> Value:
        *lead, n, d = nodes.shape
        if tuple(adj.shape) != (*lead, n, n):
            raise ConfigError(f"plan: {m.name} aggregates {adj.shape} adjacencies over {nodes.shape} nodes")
        batch = math.prod(lead)   # graphs per task
        y = self.new(nodes.shape, "f32")
        extra = {} if batch == 1 else {"batch": batch}
        if isinstance(m, IntAggregation):
            qa = self._codes(adj, m.a_offset, m.a_scale, m.a_bits, f"{m.name}.adjacency")
            qv = self._codes(nodes, m.v_offset, m.v_scale, m.v_bits, f"{m.name}.nodes")
            ins = [qa, qv]
            if m.node_bits:  # per-node codes and row offsets (the widths are implied)
                q, off = self.new(nodes.shape, "u8"), self.new((*lead, n), "u8")
                self._step("node_rows", f"{m.name}.nodes", [qv], [q, off], n=batch * n, d=d,
                           node_bits=list(m.node_bits))
                ins = [qa, q, off]
            self._step("qbmm", m.name, ins, [y], n=n, d=d, a_bits=m.a_bits, v_bits=m.v_bits,
                       a_scale=m.a_scale, a_offset=m.a_offset, v_scale=m.v_scale, v_offset=m.v_offset, **extra)
        elif isinstance(m, FloatAggregation):
            self._step("bmm_f32", m.name, [adj, nodes], [y], n=n, d=d, **extra)
        else:
            raise ConfigError(f"plan: cannot lower a {type(m).__name__} aggregation")
        return y

    # -- maps -------------------------------------------------------------
    def images_nhwc(self, images: Value) -> Value:
        n, c, h, w = images.shape
        y = self.new((n, h, w, c), "f32")
        self._step("nchw_to_nhwc", "images", [images], [y], images=n, c=c, h=h, w=w)
        return y

    def max_pool(self, x: Value, kernel: int, stride: int, padding: int = 0) -> Value:
        n, h, w, c = x.shape
        ho, wo = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
        y = self.new((n, ho, wo, c), x.dtype)
        self._step("max_pool", "max_pool", [x], [y], images=n, h=h, w=w, c=c, ks=kernel, stride=stride,
                   pad=padding)
        return y

    def mean_hw(self, x: Value) -> Value:
        n, h, w, c = x.shape
        y = self.new((n, c), "f32")
        self._step("mean_hw", "mean_pool", [x], [y], images=n, h=h, w=w, c=c)
        return y

    def flatten_hwc(self, x: Value) -> Value:
        return self.view(x, (x.shape[0], x.numel // x.shape[0]))

    # -- graph ------------------------------------------------------------
    def pairwise_sqdiff(self, v: Value) -> Value:
        n, c = v.shape
        y = self.new((n, n, c), "f32")
        self._step("pairwise_sqdiff", "pairs", [v], [y], n=n, c=c)
        return y

    def pairwise_absdiff(self, v: Value) -> Value:
        *lead, n, c = v.shape
        y = self.new((*lead, n, n, c), "f32")
        self._step("pairwise_absdiff", "pairs", [v], [y], n=n, c=c, batch=math.prod(lead))
        return y

    def take_rows(self, x: Value, index) -> Value:
        idx = np.asarray(index, dtype=np.int64)
        c = x.shape[-1]
        rows = x.numel // c
        if idx.size == 0 or idx.min() < 0 or idx.max() >= rows:
            raise ConfigError(f"plan: take_rows of {x.shape} needs row indices in [0, {rows}), got "
                              f"{idx.reshape(-1)[:8].tolist()}")
        y = self.new(tuple(idx.shape) + (c,), x.dtype)
        self._step("take_rows", "rows", [x], [y], rows=rows, c=c, index=[int(i) for i in idx.reshape(-1)])
        return y

    def neg_sum_last(self, x: Value) -> Value:
        y = self.new(x.shape[:-1], "f32")
        self._step("neg_sum_last", "node_similarity", [x], [y], rows=x.numel // x.shape[-1], c=x.shape[-1])
        return y

    def squeeze_last(self, x: Value) -> Value:
        if x.shape[-1] != 1:
            raise ConfigError(f"plan: squeeze_last of {x.shape}")
        return self.view(x, x.shape[:-1])

    def sigmoid(self, x: Value) -> Value:
        y = self.new(x.shape, "f32")
        self._step("sigmoid", "sigmoid", [x], [y], n=x.numel)
        return y

    def edge_update(self, sim: Value, prev_edge: Value) -> Value:
        n = prev_edge.shape[-1]
        y = self.new((n, n), "f32")
        self._step("edge_update", "edge_update", [sim, prev_edge], [y], n=n)
        return y

    def edge_update_2ch(self, sim: Value, prev_sim: Value, prev_dsim: Value):
        *lead, n, n2 = prev_sim.shape
        if n != n2 or sim.shape != prev_sim.shape or prev_dsim.shape != prev_sim.shape:
            raise ConfigError(f"plan: edge_update_2ch of {sim.shape}, {prev_sim.shape}, {prev_dsim.shape}")
        y0, y1 = self.new(prev_sim.shape, "f32"), self.new(prev_sim.shape, "f32")
        self._step("edge_update_2ch", "edge_update", [sim, prev_sim, prev_dsim], [y0, y1], n=n,
                   batch=math.prod(lead))
        return y0, y1

    def offdiag_l1_normalize(self, x: Value) -> Value:
        *lead, n, n2 = x.shape
        if n != n2:
            raise ConfigError(f"plan: offdiag_l1_normalize of {x.shape}")
        y = self.new(x.shape, "f32")
        batch = math.prod(lead)
        self._step("offdiag_l1_normalize", "adjacency", [x], [y], n=n, **({} if batch == 1 else {"batch": batch}))
        return y

    def concat_last(self, parts) -> Value:
        vals, spans = [], []
        for p in parts:
            v, a, b = p if isinstance(p, tuple) else (p, 0, p.shape[-1])
            vals.append(v)
            spans.append((v.shape[-1], int(a), int(b)))
        lead = vals[0].shape[:-1]
        if any(v.shape[:-1] != lead for v in vals):
            raise ConfigError(f"plan: concat of {[v.shape for v in vals]}")
        y = self.new(lead + (sum(b - a for _, a, b in spans),), vals[0].dtype)
        self._step("concat_last", "concat", vals, [y], rows=math.prod(lead), parts=spans)
        return y

    def label_scores(self, edge: Value, onehot: Value, first_row: Optional[int] = None) -> Value:
        ns, way = onehot.shape
        if first_row is None:
            n = edge.shape[-1]
            if tuple(edge.shape) != (n, n):
                raise ConfigError(f"plan: label_scores of {edge.shape} edges")
            y = self.new((n - ns, way), "f32")
            self._step("label_scores", "logits", [edge, onehot], [y], n=n, ns=ns, way=way)
            return y
        if len(edge.shape) != 2 or not 0 <= first_row < edge.shape[0] or edge.shape[1] < ns:
            raise ConfigError(f"plan: label_scores of {edge.shape} rows from row {first_row}, {ns} supports")
        rows, width = edge.shape
        y = self.new((rows - first_row, way), "f32")
        self._step("label_scores", "logits", [edge, onehot], [y], n=width, ns=ns, way=way, rows=rows,
                   first_row=int(first_row))
        return y


__all__ = ["PlanBuilder", "Value"]
