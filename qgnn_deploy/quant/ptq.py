"""Post-training quantization (PTQ): PQ ranges for an FP model from calibration episodes.

No training: the quantized model keeps the FP weights (and BatchNorm statistics); only the
Pauta ranges ``(l, r)`` of every weight and input quantizer are chosen, layer by layer in
execution order::

    for each quantized layer i (conv / linear / aggregation):
        X_fp = layer i's input in the FP model, Y = layer i(X_fp) in FP32       (target)
        X_q  = layer i's input in the model whose layers < i are already quantized
        start: PQ's mean +- 3 std of W and of X_q (eqs. 4, 5: what QAT starts from)
        search, per operand: the PQ range itself and (l, r) = (max(c - a h, min),
            min(c + a h, max)) over the shrink factors a of SHRINK, c +- h the PQ range,
            min / max the data's,
            minimising || layer_q(X_q) - Y ||^2 (weights first, then the input, twice)

Sequential targets (``X_q`` in, FP output out) let a layer absorb the error of the layers
before it, which layer-by-layer independent calibration cannot. The shrink search matters
most at 2 bits, where mean +- 3 std spends most of the 4 levels on rare values.

Returns a QAT-format model: ``fold`` deploys it, ``train --init`` fine-tunes it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FP32_LAYER, LayerBits
from ..models.layers import QAggregation, QConv2d, QLinear
from .pauta import pauta_fake_quant, pauta_init_range

#: shrink factors of the PQ half-range tried for every operand (1.0 = PQ's own range)
SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.42, 0.35, 0.28, 0.22)
#: calibration samples a layer's search evaluates (images of a conv, rows otherwise)
MAX_SAMPLES = 4096


@dataclass
class Operand:
    """One quantizer of a layer: which module attribute, and how to view its range."""

    attr: str            # "weight_quant", "act_quant", "adj_quant", "node_quant"
    channels: bool       # per output channel (dim 0), else per tensor


def _operands(m: nn.Module) -> List[Operand]:
    if isinstance(m, QAggregation):
        return [Operand("adj_quant", False), Operand("node_quant", False)]
    return [Operand("weight_quant", m.weight_quant.channels is not None), Operand("act_quant", False)]


def quantized_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: layer}`` of the quantized conv / linear / aggregation layers, in model order."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (QConv2d, QLinear, QAggregation)) and m.quantized}


def _fq(x: torch.Tensor, lr: Tuple[torch.Tensor, torch.Tensor], bits: int) -> torch.Tensor:
    l, r = lr
    if l.dim():  # per output channel: broadcast over dim 0
        shape = (-1,) + (1,) * (x.dim() - 1)
        l, r = l.view(shape), r.view(shape)
    return pauta_fake_quant(x, l, r, bits)


def _layer_output(m: nn.Module, inputs: Tuple[torch.Tensor, ...],
                  ranges: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The layer on ``inputs`` with its operands fake-quantized under ``ranges``."""
    if isinstance(m, QAggregation):
        adj, nodes = inputs
        return torch.bmm(_fq(adj, ranges["adj_quant"], m.bits.w), _fq(nodes, ranges["node_quant"], m.bits.a))
    x = _fq(inputs[0], ranges["act_quant"], m.bits.a)
    w = _fq(m.weight, ranges["weight_quant"], m.bits.w)
    return m._conv_forward(x, w, m.bias) if isinstance(m, QConv2d) else F.linear(x, w, m.bias)


def _candidates(t: torch.Tensor, channels: bool) -> Iterator[Tuple[float, Tuple[torch.Tensor, torch.Tensor]]]:
    """(shrink, (l, r)) candidates: PQ's mean +- 3 std itself, then shrunk around its
    centre and clipped to the data's range."""
    l0, r0 = pauta_init_range(t, 0 if channels else None)
    yield 1.0, (l0, r0)
    flat = t.detach().float().reshape(t.shape[0] if channels else 1, -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    if not channels:
        lo, hi = lo[0], hi[0]
    c, h = (l0 + r0) / 2, (r0 - l0) / 2
    for a in SHRINK:
        l, r = torch.maximum(c - a * h, lo), torch.minimum(c + a * h, hi)
        r = torch.maximum(r, l + 1e-8)  # a constant operand: keep s > 0
        yield a, (l, r)


def _subsample(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[0] <= MAX_SAMPLES else t[:: -(-t.shape[0] // MAX_SAMPLES)]


class _Capture:
    """A forward hook recording every call's inputs and output of one layer."""

    def __init__(self, m: nn.Module):
        self.inputs: List[Tuple[torch.Tensor, ...]] = []
        self.outputs: List[torch.Tensor] = []
        self.handle = m.register_forward_hook(self._hook)

    def _hook(self, m, args, out):
        self.inputs.append(tuple(a.detach() for a in args))
        self.outputs.append(out.detach())

    def close(self):
        self.handle.remove()


def _as_samples(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Rows a layer's error is measured over: images of a conv / tasks of an aggregation
    (dim 0 as is), rows of a linear layer (all leading dims flattened)."""
    return t.reshape(-1, t.shape[-1]) if isinstance(m, QLinear) else t


#: ``layer_hook(name, layer, inputs, target)`` of :func:`post_training_quantize`
LayerHook = Callable[[str, nn.Module, Tuple[torch.Tensor, ...], torch.Tensor], None]


def post_training_quantize(fp_state_model: nn.Module, quant_model: nn.Module,
                           batches: List[Tuple[torch.Tensor, torch.Tensor]],
                           progress: bool = True,
                           layer_hook: Optional[LayerHook] = None) -> Dict[str, Dict[str, object]]:
    """Choose the PQ ranges of ``quant_model`` (same config as ``fp_state_model`` but with
    bits < 32, same float weights) on calibration ``batches`` [(images [T, N, 3, S, S],
    support_labels [T, way*shot])]; sets every quantizer's ``l`` / ``r`` in place.

    ``layer_hook``, if given, is called after each layer's search with that layer and the
    data it was calibrated on (``inputs``: its inputs with the earlier layers quantized,
    ``target``: its FP output, both subsampled), e.g. to :func:`search_ranges` at other bits.

    Returns, per layer, the chosen shrink factors and ranges and the output MSE under PQ's
    own range vs the chosen one: ``{name: {operand: {"shrink", "l", "r"}, "mse_pauta",
    "mse"}}`` (per-channel ranges reported as their min l / max r)."""
    from tqdm import tqdm
    fp_state_model.eval()
    quant_model.eval()
    layers = quantized_layers(quant_model)
    fp_layers = dict(fp_state_model.named_modules())
    bits = {n: m.bits for n, m in layers.items()}
    for m in layers.values():  # layers not yet calibrated run in FP32
        m.bits = FP32_LAYER
    report: Dict[str, Dict[str, object]] = {}
    try:
        for name, m in tqdm(layers.items(), desc="calibrate", unit="layer", file=sys.stderr,
                            disable=not progress, leave=False):
            xs_q, ys = [], []
            for images, labels in batches:
                cap_fp, cap_q = _Capture(fp_layers[name]), _Capture(m)
                try:
                    with torch.no_grad():
                        fp_state_model(images, labels)
                        quant_model(images, labels)
                finally:
                    cap_fp.close()
                    cap_q.close()
                xs_q += cap_q.inputs
                ys += cap_fp.outputs
            m.bits = bits[name]
            inputs = tuple(_subsample(torch.cat([_as_samples(m, x[i]) for x in xs_q]))
                           for i in range(len(xs_q[0])))
            target = _subsample(torch.cat([_as_samples(m, y) for y in ys]))
            report[name] = _search(m, inputs, target)
            if layer_hook is not None:
                layer_hook(name, m, inputs, target)
    finally:
        for n, m in layers.items():
            m.bits = bits[n]
    return report


def _search(m: nn.Module, inputs: Tuple[torch.Tensor, ...], target: torch.Tensor) -> Dict[str, object]:
    """Coordinate search of each operand's shrink factor; writes the winners into ``m``."""
    ops = _operands(m)
    if isinstance(m, QAggregation):
        tensors = {"adj_quant": inputs[0], "node_quant": inputs[1]}
    else:
        tensors = {"weight_quant": m.weight, "act_quant": inputs[0]}
    cands = {op.attr: list(_candidates(tensors[op.attr], op.channels)) for op in ops}
    choice = {op.attr: 0 for op in ops}  # candidate 0: PQ's own range (what QAT starts from)

    def err(ch: Dict[str, int]) -> float:
        ranges = {k: cands[k][i][1] for k, i in ch.items()}
        with torch.no_grad():
            return float((_layer_output(m, inputs, ranges) - target).pow(2).mean())

    mse_pauta = best = err(choice)
    for _ in range(2):
        for op in ops:
            for i in range(len(cands[op.attr])):
                trial = dict(choice, **{op.attr: i})
                e = err(trial)
                if e < best:
                    best, choice = e, trial
    out: Dict[str, object] = {}
    with torch.no_grad():
        for op in ops:
            a, (l, r) = cands[op.attr][choice[op.attr]]
            q = getattr(m, op.attr)
            q.l.copy_(l)
            q.r.copy_(r)
            q.initialized.fill_(True)
            out[op.attr] = {"shrink": a, "clipped": choice[op.attr] > 0, "l": float(l.min()), "r": float(r.max())}
    out["mse_pauta"] = mse_pauta
    out["mse"] = best
    return out


def search_ranges(m: nn.Module, bits: LayerBits, inputs: Tuple[torch.Tensor, ...],
                  target: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """``{operand: (l, r)}``: the ranges the search of :func:`post_training_quantize` picks
    for layer ``m`` at ``bits`` on its calibration ``inputs`` / ``target`` (as given to a
    ``layer_hook``). ``m`` (bits and ranges) is left as it was."""
    ops = _operands(m)
    saved_bits = m.bits
    saved = {op.attr: {k: t.detach().clone() for k, t in getattr(m, op.attr).state_dict().items()}
             for op in ops}
    m.bits = bits
    try:
        _search(m, inputs, target)
        return {op.attr: (getattr(m, op.attr).l.detach().clone(), getattr(m, op.attr).r.detach().clone())
                for op in ops}
    finally:
        m.bits = saved_bits
        for op in ops:
            getattr(m, op.attr).load_state_dict(saved[op.attr])


def calibration_batches(config, episodes: int, seed: int, dataset, data_dir: Optional[str],
                        tasks_per_batch: int = 8) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``episodes`` train-split episodes as [(images, support_labels)] batches."""
    from ..data import episode_batches
    return [(im, sl) for im, sl, _ in episode_batches(config, episodes, seed, "train", dataset, data_dir,
                                                       tasks_per_batch=tasks_per_batch)]


__all__ = ["post_training_quantize", "quantized_layers", "calibration_batches", "search_ranges", "SHRINK"]
