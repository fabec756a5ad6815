"""``qgnn-deploy report``: Bit-FLOPs, parameters and bytes per layer vs the FP32 model.

Examples::

    qgnn-deploy report --preset resnet12-cifarfs --bits 4            # tables + paper comparison
    qgnn-deploy report model.qgnn --json > report.json
    qgnn-deploy report ckpt.pt --csv --plot report.png

Units: MACs (multiply-accumulates), FLOPs = 2 x MACs, Bit-FLOPs = FLOPs x b_w x b_a.
The default workload is the paper's Table 6 one: ONE image through the backbone plus ONE
graph task; ``--workload task`` counts one whole task (all its images).
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import add_source_arguments
    add_source_arguments(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object on stdout")
    fmt.add_argument("--markdown", action="store_true", help="markdown tables (the default)")
    fmt.add_argument("--csv", action="store_true", help="one CSV row per layer + totals")
    p.add_argument("--plot", metavar="FILE.png", help="write per-layer Bit-FLOPs and a graph-layer "
                   "weight histogram with its PQ range")
    p.add_argument("--workload", choices=["paper", "task"], default="paper",
                   help="paper: 1 image through the backbone + 1 graph task (Table 6); "
                        "task: one whole task (default: paper)")
    p.add_argument("--sensitivity", action="store_true", help="instead: each layer's accuracy and logit "
                   "error when lowered alone from a uniform PTQ base (a checkpoint SOURCE; as select-bits)")
    from .select_bits import add_analysis_arguments
    add_analysis_arguments(p)


def load_model_for_report(src, quiet: bool = False):
    """(model, float_model_or_None) for a Source: an IntModel for artifacts, else the
    fake-quant / FP QGNNModel (which is also the float model for the histogram)."""
    from ..sources import load_float_model
    if src.kind == "artifact":
        try:
            from ..artifact import load_int_model
        except ImportError as e:
            from ..errors import BackendUnavailableError
            raise BackendUnavailableError(
                f"reading .qgnn artifacts is unavailable in this build ({e})") from None
        return load_int_model(src.path), None
    model = load_float_model(src, quiet=quiet)
    return model, model


def build_report(model, workload: str = "paper"):
    """(report dict, paper comparison dict or None) for ``model``."""
    from ..report import count_bit_flops, is_paper_model, paper_comparison
    rep = count_bit_flops(model, per_image_backbone=(workload == "paper"))
    d = rep.to_dict()
    paper = None
    if workload == "paper" and is_paper_model(getattr(model, "config", None)):
        paper = paper_comparison(rep)
        d["paper_comparison"] = paper
    return d, paper


def run(args) -> int:
    from ..report import render_csv, render_markdown
    from ..sources import parse_source
    src = parse_source(args)
    if args.sensitivity:
        from .select_bits import run_sensitivity_report
        return run_sensitivity_report(args, src)
    model, float_model = load_model_for_report(src, quiet=False)
    d, paper = build_report(model, args.workload)
    d["source"] = src.label
    if args.plot:
        from ..plots import plot_report
        plot_report(d, args.plot, model=float_model, title=f"{src.label}: {d['model']}")
        d["plot"] = args.plot
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(d))
    elif args.csv:
        sys.stdout.write(render_csv(d))
    else:
        sys.stdout.write(render_markdown(d, paper))
    return 0
