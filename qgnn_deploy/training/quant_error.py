"""PQ vs min-max quantization error on a model's weights (paper section 3.2's claim).

Both quantizers are uniform with ``2^n`` levels and round-to-nearest; they differ only
in the range: min-max uses ``[min(W), max(W)]``, PQ ``mean(W) -/+ 3 std(W)`` (Pauta
criterion; values outside are clipped). Error of a tensor: relative L2,
``||W - Q(W)||_2 / ||W||_2``.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..quant.pauta import pauta_fake_quant, pauta_init_range


def relative_error(w: torch.Tensor, l: torch.Tensor, r: torch.Tensor, bits: int) -> float:
    q = pauta_fake_quant(w.float(), l, r, bits)
    return float((w - q).norm() / w.norm().clamp_min(1e-12))


def weight_quant_errors(state_dict: Dict[str, torch.Tensor], prefix: str = "gnn.",
                        bits_list=(2, 3, 4)) -> List[Dict[str, object]]:
    """Per conv / linear weight under ``prefix`` (the graph network by default): PQ and
    min-max relative errors at each bit-width. Quantizer parameters are skipped."""
    rows = []
    for name, w in state_dict.items():
        if not name.startswith(prefix) or not name.endswith(".weight") or w.dim() < 2:
            continue
        w = w.detach().float()
        l_pq, r_pq = pauta_init_range(w)
        l_mm, r_mm = w.min(), w.max()
        row = {"layer": name[:-len(".weight")], "numel": w.numel()}
        for b in bits_list:
            row[f"pq_w{b}"] = relative_error(w, l_pq, r_pq, b)
            row[f"minmax_w{b}"] = relative_error(w, l_mm, r_mm, b)
        rows.append(row)
    return rows


def summarize(rows: List[Dict[str, object]], bits_list=(2, 3, 4)) -> Dict[str, Dict[str, float]]:
    """Mean relative error over layers per bit-width, and PQ's reduction in points."""
    out = {}
    for b in bits_list:
        pq = sum(r[f"pq_w{b}"] for r in rows) / len(rows)
        mm = sum(r[f"minmax_w{b}"] for r in rows) / len(rows)
        out[f"w{b}"] = {"pq": pq, "minmax": mm, "reduction_points": 100 * (mm - pq),
                        "layers": len(rows)}
    return out


def learned_range_errors(state_dict: Dict[str, torch.Tensor], bits: int,
                         prefix: str = "gnn.") -> Dict[str, float]:
    """A QAT checkpoint's weights under its *learned* PQ ranges vs min-max at ``bits``:
    mean relative L2 error over the quantized layers under ``prefix``."""
    pq, mm = [], []
    for name, w in state_dict.items():
        if not name.startswith(prefix) or not name.endswith(".weight"):
            continue
        base = name[:-len(".weight")]
        l, r = state_dict.get(f"{base}.weight_quant.l"), state_dict.get(f"{base}.weight_quant.r")
        if l is None or r is None:
            continue
        w = w.float()
        shape = (-1,) + (1,) * (w.dim() - 1)
        l_, r_ = (l.view(shape), r.view(shape)) if l.dim() else (l, r)
        pq.append(relative_error(w, l_, r_, bits))
        mm.append(relative_error(w, w.min(), w.max(), bits))
    if not pq:
        return {"layers": 0}
    n = len(pq)
    return {"pq": sum(pq) / n, "minmax": sum(mm) / n, "reduction_points": 100 * (sum(mm) - sum(pq)) / n,
            "layers": n}
