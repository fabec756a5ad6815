"""Automatic bit selection (SGQuant's ABS): per-layer sensitivities, then a budgeted search.

Method (``qgnn-deploy select-bits``, docs/mixed-precision.md)::

    base = uniform (w, a), default w4/a4; options of a layer = the pairs (w', a') with
    w' <= w, a' <= a from the candidate bits, (w, a) itself excluded
    1. calibrate: one sequential PTQ pass of the base model (quant/ptq.py); at each
       layer, the same calibration data also picks the layer's ranges at every option
    2. sensitivity: each layer ALONE at each option, the rest at base, on fixed
       validation episodes: accuracy change, logit MSE vs the base model's logits,
       Bit-FLOPs and bytes saved
    3. search: greedy multiple-choice knapsack on the measured sensitivities (cost = the
       layer's logit MSE, assumed additive over layers; gain = what it saves of the
       budgeted quantity), down to the budget, then back up where the slack allows
    4. verify: a full PTQ of the chosen configuration, evaluated on the same episodes

What is cached, and why it is valid or approximate:

* Ranges (step 1): ``cache[layer][(w', a')] = {operand: (l, r)}``. PTQ calibrates layer i
  on its inputs with the layers before it quantized. Here they are at base bits, so for
  a configuration that lowers layer i alone the cached ranges of layer i are exactly those
  a full PTQ would choose. The layers after i keep their base ranges, where a full PTQ
  would recalibrate them on inputs carrying layer i's larger error (their targets are
  the FP outputs either way): an approximation that slightly overstates the error of
  lowering layer i. Mixed configurations assembled from the cache (the greedy path and
  the uniform points of the Pareto front) carry that approximation for every layer; the
  chosen configuration is therefore calibrated again end to end (step 4).
* Backbone embeddings of the base model, per validation batch: lowering a graph layer
  leaves the backbone as it is, so those configurations run the graph network only.
* The validation episodes and the base logits, generated once.

Costs are exact and additive: with the report's 'paper' workload (one image through the
backbone, one graph task), a quantizable layer's Bit-FLOPs are FLOPs x w x a and its
packed bytes depend on w alone (qgnn_deploy/report.py), so a configuration's totals are
the fixed part (FP32-by-design layers, other parameters) plus a sum over layers.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import LayerBits, ModelConfig
from ..errors import ConfigError
from .ptq import calibration_batches, post_training_quantize, quantized_layers, search_ranges

#: metrics a budget may bound, as named in the report's ``total``
METRICS = ("bit_flops", "packed_bytes")
#: which of a layer's pair each quantizer takes
_OPERAND_BITS = {"weight_quant": "w", "adj_quant": "w", "act_quant": "a", "node_quant": "a"}

LayerBitsMap = Dict[str, LayerBits]
#: ``{layer: {LayerBits: {operand: (l, r)}}}``
RangeCache = Dict[str, Dict[LayerBits, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]]


def lowered_options(base: LayerBits, candidate_bits: Iterable[int]) -> List[LayerBits]:
    """The pairs a layer may be lowered to from ``base``, lowest first (``base`` excluded)."""
    ws = sorted({b for b in candidate_bits if b <= base.w} | {base.w})
    as_ = sorted({b for b in candidate_bits if b <= base.a} | {base.a})
    return [LayerBits(w, a) for w in ws for a in as_ if (w, a) != tuple(base)]


# ------------------------------------------------------------------ costs

@dataclass(frozen=True)
class CostModel:
    """Bit-FLOPs ('paper' workload) and packed bytes of any per-layer configuration."""

    fixed: Dict[str, int]                  # {metric: what the non-quantizable part costs}
    flops: Dict[str, int]                  # {layer: FLOPs}
    packed_bytes: Dict[str, Dict[int, int]]  # {layer: {w bits: packed bytes}}

    def layer_cost(self, name: str, bits: LayerBits, metric: str) -> int:
        if metric == "bit_flops":
            return self.flops[name] * bits.w * bits.a
        return self.packed_bytes[name][bits.w]

    def total(self, layer_bits: LayerBitsMap, metric: str) -> int:
        return self.fixed[metric] + sum(self.layer_cost(n, b, metric) for n, b in layer_bits.items())

    def totals(self, layer_bits: LayerBitsMap) -> Dict[str, int]:
        return {m: self.total(layer_bits, m) for m in METRICS}


def cost_model(config: ModelConfig, weight_bits: Iterable[int]) -> CostModel:
    """Count a uniform model of ``config``'s architecture at each of ``weight_bits`` (w = a)
    with :func:`~qgnn_deploy.report.count_bit_flops` (paper workload), split per layer."""
    from ..models import build_model
    from ..report import count_bit_flops
    flops: Dict[str, int] = {}
    packed: Dict[str, Dict[int, int]] = {}
    fixed: Dict[str, int] = {}
    with torch.random.fork_rng():  # fresh models and a random episode: leave the caller's RNG alone
        for w in sorted(set(weight_bits)):
            model = build_model(config.replace(bits=w, layer_bits={})).eval()
            rep = count_bit_flops(model, per_image_backbone=True)
            names = set(quantized_layers(model))
            rows = {l.name: l for l in rep.layers if l.name in names}
            if set(rows) != names:
                raise ConfigError(f"report rows miss quantizable layers {sorted(names - set(rows))[:3]}")
            total = rep.total()
            for n, l in rows.items():
                flops[n] = l.flops
                packed.setdefault(n, {})[w] = l.packed_bytes
            fixed = {"bit_flops": total["bit_flops"] - sum(l.bit_flops for l in rows.values()),
                     "packed_bytes": total["packed_bytes"] - sum(l.packed_bytes for l in rows.values())}
    return CostModel(fixed, flops, packed)


# ------------------------------------------------------------------ models and ranges

def float_model(path: str) -> nn.Module:
    """The FP model of checkpoint ``path``: an FP checkpoint as is, a QAT one's float weights
    (its quantizer ranges dropped), in eval mode."""
    from ..checkpoint import load_checkpoint
    from ..models import build_model
    src = load_checkpoint(path)
    if not src.config.quantized:
        return src.eval()
    fp = build_model(src.config.replace(bits=32, layer_bits={}))
    missing = [k for k in fp.state_dict() if k not in src.state_dict()]
    if missing:
        raise ConfigError(f"{path!r}: its float weights lack {missing[:3]}")
    fp.load_state_dict({k: v for k, v in src.state_dict().items() if k in fp.state_dict()})
    return fp.eval()


def quant_model(fp_model: nn.Module, config: ModelConfig) -> nn.Module:
    """A fresh model for quantized ``config`` holding ``fp_model``'s float weights (ranges unset)."""
    from ..models import build_model
    model = build_model(config)
    missing, unexpected = model.load_state_dict(fp_model.state_dict(), strict=False)
    not_quantizer = [k for k in missing if not k.endswith((".l", ".r", ".initialized"))]
    if unexpected or not_quantizer:
        raise ConfigError(f"the FP model does not fit {config}: {(unexpected + not_quantizer)[:3]}")
    return model.eval()


def calibrate_options(fp_model: nn.Module, base_model: nn.Module, batches, options: Sequence[LayerBits],
                      progress: bool = True) -> RangeCache:
    """PTQ of ``base_model`` (in place) and, per layer, its ranges at every pair of
    ``options`` searched on the same calibration data (see the module docstring)."""
    cache: RangeCache = {}

    def hook(name, m, inputs, target):
        cache[name] = {m.bits: {attr: (getattr(m, attr).l.detach().clone(), getattr(m, attr).r.detach().clone())
                                for attr in _OPERAND_BITS if getattr(m, attr, None) is not None}}
        for bits in options:
            cache[name][bits] = search_ranges(m, bits, inputs, target)

    post_training_quantize(fp_model, base_model, batches, progress=progress, layer_hook=hook)
    return cache


@torch.no_grad()
def apply_bits(model: nn.Module, layer_bits: LayerBitsMap, cache: RangeCache) -> None:
    """Set each quantized layer of ``model`` to its pair in ``layer_bits``, with the cached ranges."""
    for name, m in quantized_layers(model).items():
        bits = layer_bits[name]
        m.bits = bits
        for attr, (l, r) in cache[name][bits].items():
            q = getattr(m, attr)
            q.bits = getattr(bits, _OPERAND_BITS[attr])
            q.l.copy_(l)
            q.r.copy_(r)


# ------------------------------------------------------------------ measuring

@dataclass
class ValidationSet:
    """Fixed validation episodes and the base model's outputs on them."""

    batches: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (images, support, query [T, way])
    embeddings: List[Tuple[torch.Tensor, torch.Tensor]]             # DPGN: base backbone (last, second); else []
    logits: List[torch.Tensor]                                      # base logits [T, way, way]
    accuracy: float


def _is_dpgn(model: nn.Module) -> bool:
    from ..models.qgnn import QGNNModel
    return isinstance(model, QGNNModel)


def validation_set(base_model: nn.Module, config: ModelConfig, episodes: int, seed: int,
                   dataset="synthetic", data_dir: Optional[str] = None) -> ValidationSet:
    from ..data import episode_batches
    batches = [(im, s, q) for im, s, q in episode_batches(config, episodes, seed, "val", dataset, data_dir,
                                                          tasks_per_batch=10)]
    with torch.no_grad():  # DPGN: the graph layers' options reuse the base backbone's embeddings
        embeddings = [base_model.embed(im) for im, _, _ in batches] if _is_dpgn(base_model) else []
    vset = ValidationSet(batches, embeddings, [], 0.0)  # no base logits yet: _run skips the MSE
    vset.accuracy, _, vset.logits = _run(base_model, vset, reuse_backbone=True, keep_logits=True)
    return vset


def _run(model: nn.Module, vset: ValidationSet, reuse_backbone: bool, keep_logits: bool = False):
    """(accuracy, logit MSE vs the base logits, logits) of ``model`` on ``vset``."""
    from ..models.qgnn import run_episode
    correct, sq_err, count, kept = 0, 0.0, 0, []
    with torch.no_grad():
        for i, (images, support, query) in enumerate(vset.batches):
            if vset.embeddings:
                embed = (lambda _images, i=i: vset.embeddings[i]) if reuse_backbone else model.embed
                logits = run_episode(embed, model.gnn, images, support.long(), model.config.way).logits.float()
            else:
                logits = model(images, support.long()).logits.float()
            correct += int((logits.argmax(-1) == query).sum())
            count += query.numel()
            if vset.logits:
                sq_err += float((logits - vset.logits[i]).pow(2).sum())
            if keep_logits:
                kept.append(logits)
    mse = sq_err / sum(t.numel() for t in vset.logits) if vset.logits else 0.0
    return correct / count, mse, kept


def measure(model: nn.Module, vset: ValidationSet, layer_bits: LayerBitsMap, base_layer_bits: LayerBitsMap,
            cache: RangeCache) -> Tuple[float, float]:
    """(accuracy, logit MSE vs base) of ``model`` set to ``layer_bits`` from the cache."""
    apply_bits(model, layer_bits, cache)
    backbone_as_base = all(layer_bits[n] == base_layer_bits[n] for n in layer_bits if n.startswith("backbone."))
    acc, mse, _ = _run(model, vset, reuse_backbone=backbone_as_base)
    return acc, mse


def layer_sensitivity(model: nn.Module, vset: ValidationSet, cache: RangeCache, base_layer_bits: LayerBitsMap,
                      options: Sequence[LayerBits], costs: CostModel, progress: bool = True) -> List[Dict[str, Any]]:
    """Each layer alone at each option (the rest at base). Returns one entry per layer,
    sorted by the accuracy lost at its lowest option (ties: logit MSE), most costly first:
    ``{"layer", "accuracy_drop", "logit_mse", "options": [{"w", "a", "accuracy",
    "accuracy_drop", "logit_mse", "bit_flops_saved", "bytes_saved"}, ...]}`` (options
    lowest first; accuracies as fractions, drops vs the base model's accuracy)."""
    from tqdm import tqdm
    out = []
    bar = tqdm(total=len(base_layer_bits) * len(options), desc="sensitivity", unit="cfg", file=sys.stderr,
               disable=not progress, leave=False)
    for name, base in base_layer_bits.items():
        rows = []
        for bits in options:
            acc, mse = measure(model, vset, dict(base_layer_bits, **{name: bits}), base_layer_bits, cache)
            rows.append({"w": bits.w, "a": bits.a, "accuracy": acc, "accuracy_drop": vset.accuracy - acc,
                         "logit_mse": mse,
                         "bit_flops_saved": costs.layer_cost(name, base, "bit_flops")
                         - costs.layer_cost(name, bits, "bit_flops"),
                         "bytes_saved": costs.layer_cost(name, base, "packed_bytes")
                         - costs.layer_cost(name, bits, "packed_bytes")})
            bar.update(1)
        out.append({"layer": name, "accuracy_drop": rows[0]["accuracy_drop"], "logit_mse": rows[0]["logit_mse"],
                    "options": rows})
    bar.close()
    apply_bits(model, base_layer_bits, cache)
    out.sort(key=lambda e: (-e["accuracy_drop"], -e["logit_mse"]))
    return out


# ------------------------------------------------------------------ search

def _layer_choices(sensitivity: List[Dict[str, Any]], base_layer_bits: LayerBitsMap
                   ) -> Dict[str, Dict[LayerBits, float]]:
    """``{layer: {pair: logit MSE}}``, the base pair at 0."""
    return {e["layer"]: {base_layer_bits[e["layer"]]: 0.0,
                         **{LayerBits(o["w"], o["a"]): o["logit_mse"] for o in e["options"]}}
            for e in sensitivity}


def greedy_path(sensitivity: List[Dict[str, Any]], costs: CostModel, base_layer_bits: LayerBitsMap,
                metric: str) -> List[LayerBitsMap]:
    """Configurations from base down to the cheapest in ``metric``, one layer move per step:
    the move of least (logit MSE added) / (``metric`` saved); error assumed additive."""
    errors = _layer_choices(sensitivity, base_layer_bits)
    current = dict(base_layer_bits)
    path = [dict(current)]
    while True:
        best = None
        for name, choices in errors.items():
            now_cost, now_err = costs.layer_cost(name, current[name], metric), choices[current[name]]
            for bits, err in choices.items():
                saved = now_cost - costs.layer_cost(name, bits, metric)
                if saved <= 0:
                    continue
                key = ((err - now_err) / saved, -saved)
                if best is None or key < best[0]:
                    best = (key, name, bits)
        if best is None:
            return path
        current[best[1]] = best[2]
        path.append(dict(current))


def search_config(sensitivity: List[Dict[str, Any]], costs: CostModel, base_layer_bits: LayerBitsMap,
                  metric: str, budget: float) -> LayerBitsMap:
    """The configuration of least predicted logit MSE found with ``metric`` <= ``budget``:
    the first greedy-path point under budget, then layers raised back (largest error
    reduction first) while the slack allows. ConfigError when even the cheapest is over."""
    path = greedy_path(sensitivity, costs, base_layer_bits, metric)
    fitting = [p for p in path if costs.total(p, metric) <= budget]
    if not fitting:
        raise ConfigError(f"no configuration meets the budget: the cheapest costs "
                          f"{costs.total(path[-1], metric)} {metric}")
    chosen = dict(fitting[0])
    errors = _layer_choices(sensitivity, base_layer_bits)
    while True:
        total = costs.total(chosen, metric)
        best = None
        for name, choices in errors.items():
            for bits, err in choices.items():
                gain = choices[chosen[name]] - err
                extra = costs.layer_cost(name, bits, metric) - costs.layer_cost(name, chosen[name], metric)
                if gain > 0 and total + extra <= budget and (best is None or gain > best[0]):
                    best = (gain, name, bits)
        if best is None:
            return chosen
        chosen[best[1]] = best[2]


def pareto_front(points: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The points no other point dominates (accuracy >=, bit_flops <=, bytes <=, one strictly),
    one per distinct (bit_flops, bytes, accuracy), sorted by bit_flops."""
    def dominates(p, q):
        return (p["accuracy"] >= q["accuracy"] and p["bit_flops"] <= q["bit_flops"] and p["bytes"] <= q["bytes"]
                and (p["accuracy"], p["bit_flops"], p["bytes"]) != (q["accuracy"], q["bit_flops"], q["bytes"]))
    front, seen = [], set()
    for p in points:
        key = (p["accuracy"], p["bit_flops"], p["bytes"])
        if key not in seen and not any(dominates(q, p) for q in points):
            seen.add(key)
            front.append(p)
    return sorted(front, key=lambda p: (p["bit_flops"], p["bytes"]))


# ------------------------------------------------------------------ files and summaries

def to_bits_config(layer_bits: LayerBitsMap, base: LayerBits) -> Dict[str, Any]:
    """The bits-config JSON object of ``layer_bits``: ``default`` = base, one exact-name
    pattern per layer that differs from it."""
    return {"default": base.to_dict(),
            "layers": {n: b.to_dict() for n, b in layer_bits.items() if b != base}}


def summarize(layer_bits: LayerBitsMap) -> str:
    """``"w4a4 x20, w2a4 x16"``: how many layers have each pair, most common first."""
    counts: Dict[LayerBits, int] = {}
    for b in layer_bits.values():
        counts[b] = counts.get(b, 0) + 1
    return ", ".join(f"w{b.w}a{b.a} x{c}" for b, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def sensitivity_markdown(sensitivity: List[Dict[str, Any]], base_accuracy: float) -> str:
    """One row per layer (the order given), one column per option: accuracy drop in points
    and logit MSE."""
    if not sensitivity:
        return ""
    pairs = [f"w{o['w']}a{o['a']}" for o in sensitivity[0]["options"]]
    lines = [f"Sensitivity: each layer alone lowered from the base (accuracy {100 * base_accuracy:.2f}%); "
             "cells: accuracy drop (points) / logit MSE vs the base model",
             "", "| # | layer | " + " | ".join(pairs) + " |", "|---|---|" + "---|" * len(pairs)]
    for i, e in enumerate(sensitivity, 1):
        cells = [f"{100 * o['accuracy_drop']:+.1f} / {o['logit_mse']:.2e}" for o in e["options"]]
        lines.append(f"| {i} | {e['layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_markdown(front: List[Dict[str, Any]]) -> str:
    lines = ["| G Bit-FLOPs | packed bytes | accuracy (%) | logit MSE | calibration | what | bits |",
             "|---|---|---|---|---|---|---|"]
    for p in front:
        lines.append(f"| {p['bit_flops'] / 1e9:.4f} | {p['bytes']} | {100 * p['accuracy']:.2f} | "
                     f"{p['logit_mse']:.2e} | {p['calibration']} | {p['what']} | {p['summary']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the whole procedure

@dataclass
class Analysis:
    """What the calibration and sensitivity steps produce, reused by the search."""

    fp_model: nn.Module
    base_model: nn.Module        # calibrated at base; apply_bits moves it between configurations
    base: LayerBits
    base_layer_bits: LayerBitsMap
    options: List[LayerBits]
    costs: CostModel
    cache: RangeCache
    vset: ValidationSet
    batches: list                # calibration batches
    sensitivity: List[Dict[str, Any]]


def prepare(path: str, base: LayerBits, candidate_bits: Sequence[int]):
    """(FP model, base config, options, cost model): the cheap part, so that inputs can be
    checked (e.g. a budget against the cheapest configuration) before any work."""
    from ..bits_config import quantizable_layer_names
    fp_model = float_model(path)
    options = lowered_options(base, candidate_bits)
    if not options:
        raise ConfigError(f"no candidate bit-width {sorted(candidate_bits)} is below the base w{base.w}a{base.a}")
    names = quantizable_layer_names(fp_model.config)
    config = fp_model.config.replace(bits=base.w, layer_bits={n: base for n in names})
    costs = cost_model(config, {base.w} | {o.w for o in options})
    return fp_model, config, options, costs


def analyse(fp_model: nn.Module, config: ModelConfig, options: List[LayerBits], costs: CostModel,
            episodes: int, calibration_episodes: int, seed: int = 0, dataset="synthetic",
            data_dir: Optional[str] = None, progress: bool = True) -> Analysis:
    """Steps 1 and 2 of the module docstring on ``episodes`` validation episodes."""
    base_layer_bits = dict(config.layer_bits)
    base = LayerBits(config.bits, config.bits)  # prepare's uniform base
    base_model = quant_model(fp_model, config)
    batches = calibration_batches(config, calibration_episodes, seed, dataset, data_dir)
    cache = calibrate_options(fp_model, base_model, batches, options, progress=progress)
    vset = validation_set(base_model, config, episodes, seed, dataset, data_dir)
    sens = layer_sensitivity(base_model, vset, cache, base_layer_bits, options, costs, progress=progress)
    return Analysis(fp_model, base_model, base, base_layer_bits, options, costs, cache, vset, batches, sens)


def evaluated_point(an: Analysis, layer_bits: LayerBitsMap, what: str, accuracy: Optional[float] = None,
                    mse: Optional[float] = None, calibration: str = "cached") -> Dict[str, Any]:
    """A Pareto candidate: measured from the cache unless ``accuracy`` / ``mse`` are given."""
    if accuracy is None:
        accuracy, mse = measure(an.base_model, an.vset, layer_bits, an.base_layer_bits, an.cache)
    totals = an.costs.totals(layer_bits)
    return {"bit_flops": totals["bit_flops"], "bytes": totals["packed_bytes"], "accuracy": accuracy,
            "logit_mse": mse, "calibration": calibration, "what": what, "summary": summarize(layer_bits),
            "config": to_bits_config(layer_bits, an.base)}


def verify(an: Analysis, layer_bits: LayerBitsMap, progress: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """Full PTQ of ``layer_bits`` on the calibration batches, evaluated on the validation set:
    (the PTQ model, {"accuracy", "logit_mse", "bit_flops", "bytes"} with the counts of
    :func:`~qgnn_deploy.report.count_bit_flops` on that model)."""
    from ..report import count_bit_flops
    model = quant_model(an.fp_model, an.fp_model.config.replace(bits=an.base.w, layer_bits=layer_bits))
    post_training_quantize(an.fp_model, model, an.batches, progress=progress)
    acc, mse, _ = _run(model, an.vset, reuse_backbone=False)
    with torch.random.fork_rng():
        total = count_bit_flops(model, per_image_backbone=True).total()
    return model, {"accuracy": acc, "logit_mse": mse, "bit_flops": total["bit_flops"],
                   "bytes": total["packed_bytes"]}


def candidate_points(an: Analysis, metric: str, pareto_points: int, progress: bool = True) -> List[Dict[str, Any]]:
    """Every configuration evaluated from the cache: the base, each single-layer option
    (from the sensitivity), up to ``pareto_points`` configurations along the greedy path,
    and each uniform option pair."""
    from tqdm import tqdm
    points = [evaluated_point(an, an.base_layer_bits, "base", an.vset.accuracy, 0.0)]
    for e in an.sensitivity:
        for o in e["options"]:
            points.append(evaluated_point(an, dict(an.base_layer_bits, **{e["layer"]: LayerBits(o["w"], o["a"])}),
                                          f"{e['layer']} alone", o["accuracy"], o["logit_mse"]))
    path = greedy_path(an.sensitivity, an.costs, an.base_layer_bits, metric)
    step = max(1, -(-(len(path) - 1) // max(pareto_points, 1)))
    todo = [(p, f"greedy step {i}") for i, p in list(enumerate(path))[step::step]]
    todo += [({n: o for n in an.base_layer_bits}, "uniform") for o in an.options if o.w == o.a]
    for layer_bits, what in tqdm(todo, desc="pareto", unit="cfg", file=sys.stderr, disable=not progress,
                                 leave=False):
        points.append(evaluated_point(an, layer_bits, what))
    apply_bits(an.base_model, an.base_layer_bits, an.cache)
    return points


__all__ = ["Analysis", "CostModel", "ValidationSet", "METRICS", "analyse", "apply_bits", "calibrate_options",
           "candidate_points", "cost_model", "evaluated_point", "float_model", "greedy_path", "layer_sensitivity",
           "lowered_options", "measure", "pareto_front", "pareto_markdown", "prepare", "quant_model",
           "search_config", "sensitivity_markdown", "summarize", "to_bits_config", "validation_set", "verify"]
