"""Figures of the report: per-layer Bit-FLOPs FP32 vs quantized, and a graph layer's
weight histogram with its PQ range (in the spirit of the paper's figures 1 and 3).

matplotlib is imported lazily with the non-interactive Agg backend (no display needed).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn


def graph_weight_layer(model: nn.Module, index: int = 3) -> Optional[Tuple[str, nn.Module]]:
    """The ``index``-th (0-based; default the 4th, as the paper's figure 1b) conv / linear of
    the graph network that carries float weights, or None."""
    found = []
    for name, m in model.named_modules():
        if not name.startswith("gnn"):
            continue
        w = getattr(m, "weight", None)
        # layers with enough weights for a histogram (>= 1024), as the paper's figure
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and w.is_floating_point() and w.numel() >= 1024:
            found.append((name, m))
    if not found:
        return None
    return found[min(index, len(found) - 1)]


def weight_range(module: nn.Module) -> Dict[str, Any]:
    """The weight's PQ range [l, r]: the layer's learned one when quantized (per-tensor, or
    the widest per-channel span), else the Pauta initial range mean +- 3 std."""
    from .quant.pauta import pauta_init_range
    w = module.weight.detach().float()
    wq = getattr(module, "weight_quant", None)
    if wq is not None and bool(getattr(wq, "initialized", torch.tensor(True))):
        l, r = wq.l.detach().float(), wq.r.detach().float()
        source = f"learned PQ range ({wq.bits}-bit)"
        bits = int(wq.bits)
    else:
        l, r = pauta_init_range(w)
        source = "Pauta initial range (mean +- 3 std)"
        bits = None
    return {"l": float(l.min()), "r": float(r.max()), "min": float(w.min()), "max": float(w.max()),
            "source": source, "bits": bits}


def plot_report(report: Dict[str, Any], path: str, model: Optional[nn.Module] = None,
                title: str = "") -> str:
    """Write a PNG: (a) per-layer Bit-FLOPs, FP32 vs quantized (log scale); (b) weight
    histogram of a graph layer with the PQ range [l, r] and the min-max range marked.
    ``report`` is ``BitFlopReport.to_dict()``. Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    has_hist = model is not None and graph_weight_layer(model) is not None
    fig, axes = plt.subplots(1, 2 if has_hist else 1, figsize=(15 if has_hist else 11, 5.5),
                             gridspec_kw={"width_ratios": [2.2, 1]} if has_hist else None)
    ax = axes[0] if has_hist else axes
    x = range(len(layers))
    fp = [max(l["fp32_bit_flops"], 1) for l in layers]
    q = [max(l["bit_flops"], 1) for l in layers]
    ax.bar([i - 0.2 for i in x], fp, width=0.4, label="FP32 (FLOPs x 32 x 32)", color="#9aa5b1")
    ax.bar([i + 0.2 for i in x], q, width=0.4, label="quantized (FLOPs x b_w x b_a)", color="#d9480f")
    ax.set_yscale("log")
    ax.set_ylabel("Bit-FLOPs per layer (log)")
    ax.set_xlabel("layer (execution order)")
    t = report["total"]
    ax.set_title(f"(a) Bit-FLOPs per layer: total {t['fp32_bit_flops'] / 1e9:.3g} G FP32 vs "
                 f"{t['bit_flops'] / 1e9:.3g} G quantized ({(t['bit_flops_reduction'] or 1):.1f}x)")
    step = max(1, len(layers) // 24)
    ax.set_xticks(list(x)[::step])
    ax.set_xticklabels([_short(l["name"]) for l in layers][::step], rotation=75, fontsize=6)
    ax.legend(fontsize=8)
    if has_hist:
        name, layer = graph_weight_layer(model)
        rng = weight_range(layer)
        w = layer.weight.detach().float().flatten().numpy()
        ax2 = axes[1]
        ax2.hist(w, bins=80, color="#4c6ef5", alpha=0.85)
        ax2.axvline(rng["l"], color="#d9480f", ls="--", label=f"PQ l = {rng['l']:.3g}")
        ax2.axvline(rng["r"], color="#d9480f", ls="--", label=f"PQ r = {rng['r']:.3g}")
        ax2.axvline(rng["min"], color="#495057", ls=":", label="min / max (min-max range)")
        ax2.axvline(rng["max"], color="#495057", ls=":")
        ax2.set_title(f"(b) weights of {_short(name)}\n{rng['source']}", fontsize=9)
        ax2.set_xlabel("weight value")
        ax2.set_ylabel("count")
        ax2.legend(fontsize=7)
    return _save(fig, path, title)


def plot_bit_selection(points, front, selected, path: str, budget=None, title: str = "") -> str:
    """Write a PNG of ``select-bits``: accuracy vs (a) G Bit-FLOPs, (b) packed bytes, every
    evaluated configuration in grey, the points of ``front`` on each panel's own 2-D front
    joined, ``selected`` starred, the
    ``budget`` ``(metric, value)`` a dashed line. Points are ``{"bit_flops", "bytes",
    "accuracy"}`` dicts (accuracy a fraction). Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, scale, label, metric in ((axes[0], "bit_flops", 1e9, "G Bit-FLOPs (paper workload)", "bit_flops"),
                                          (axes[1], "bytes", 1.0, "packed bytes", "packed_bytes")):
        ax.scatter([p[key] / scale for p in points], [100 * p["accuracy"] for p in points], s=10,
                   color="#9aa5b1", label="evaluated (cached calibration)")
        # this panel's own 2-D front (the 3-D one, over both costs, is not monotone here)
        front_2d = [p for p in front if not any(q["accuracy"] >= p["accuracy"] and q[key] <= p[key]
                                                 and (q["accuracy"], q[key]) != (p["accuracy"], p[key])
                                                 for q in front)]
        front_2d.sort(key=lambda p: p[key])
        ax.plot([p[key] / scale for p in front_2d], [100 * p["accuracy"] for p in front_2d], "o-",
                color="#4c6ef5", ms=4, label="Pareto front")
        ax.scatter([selected[key] / scale], [100 * selected["accuracy"]], marker="*", s=220, color="#d9480f",
                   zorder=3, label="selected (full PTQ)")
        if budget is not None and budget[0] == metric:
            ax.axvline(budget[1] / scale, color="#d9480f", ls="--", lw=1, label="budget")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8)
    axes[0].set_title("(a) accuracy vs Bit-FLOPs")
    axes[1].set_title("(b) accuracy vs packed bytes")
    return _save(fig, path, title)


def _save(fig, path: str, title: str) -> str:
    """Title, lay out, write ``fig`` to ``path`` as PNG and free it; returns ``path``."""
    import matplotlib.pyplot as plt
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return (name.replace("distribution2point_generation_", "d2p")
            .replace("point2distribution_generation_", "p2d")
            .replace("distribution_sim_generation_", "dsim")
            .replace("point_sim_generation_", "psim")
            .replace("point_sim_transform", "mlp").replace("point_node_transform", "mlp")
            .replace("backbone.", "bb.").replace("gnn.", ""))


__all__ = ["plot_report", "plot_bit_selection", "graph_weight_layer", "weight_range"]
