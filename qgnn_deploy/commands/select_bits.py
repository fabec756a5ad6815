"""``qgnn-deploy select-bits``: per-layer bit-widths under a Bit-FLOPs or bytes budget.

Examples::

    qgnn-deploy select-bits fp.pt --budget-bit-flops 1.2 --out mixed.json --plot pareto.png
    qgnn-deploy select-bits fp.pt --budget-bytes 120000 --out mixed.json --json
    qgnn-deploy quantize fp.pt --bits-config mixed.json --out mixed-ptq.pt   # deploy it (fold) ...
    qgnn-deploy train --preset tiny --bits-config mixed.json --init fp.pt --out mixed.pt  # ... or fine-tune

SGQuant's automatic bit selection on PTQ models (qgnn_deploy/quant/bit_selection.py):
each layer's sensitivity (the layer alone lowered from a uniform base), a greedy search on
them under the budget, then the chosen configuration calibrated and evaluated end to end.
Budgets are the units of ``report``: ``--budget-bit-flops`` in 1e9 of ``total.bit_flops``
(paper workload), ``--budget-bytes`` in bytes of ``total.packed_bytes``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_analysis_arguments(p: argparse.ArgumentParser) -> None:
    """The calibration / sensitivity options shared with ``report --sensitivity``."""
    p.add_argument("--base-bits", type=int, default=4, help="uniform base bit-width (w = a) layers are "
                   "lowered from (default 4)")
    p.add_argument("--candidate-bits", default="2,3,4,8", help="bit-widths a layer's w and a may take, "
                   "those below the base are tried (default 2,3,4,8)")
    p.add_argument("--episodes", type=int, default=20,
                   help="validation episodes each configuration is measured on (default 20)")
    p.add_argument("--calibration-episodes", type=int, default=8,
                   help="train-split episodes the PTQ ranges are calibrated on (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration and validation episodes")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "cifar-fs", "mini-imagenet", "cub"])
    p.add_argument("--data-dir", help="data set root (real data sets; see qgnn_deploy/data)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="checkpoint: FP, or QAT (its float weights are used)")
    p.add_argument("--budget-bit-flops", type=float, metavar="G",
                   help="at most G x 1e9 Bit-FLOPs (report's total.bit_flops, paper workload)")
    p.add_argument("--budget-bytes", type=float, metavar="B",
                   help="at most B bytes of packed model (report's total.packed_bytes)")
    p.add_argument("--out", required=True, metavar="CFG.json", help="bits-config file to write")
    p.add_argument("--pareto-points", type=int, default=8,
                   help="configurations along the greedy path evaluated for the Pareto front (default 8)")
    p.add_argument("--plot", metavar="FILE.png", help="write the accuracy vs Bit-FLOPs / bytes plot")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_analysis_arguments(p)


def check_analysis_arguments(args):
    """(base LayerBits, candidate bits) from the shared options; ConfigError when invalid."""
    from ..config import QUANT_BITS, LayerBits
    from ..errors import ConfigError
    if args.episodes < 1:
        raise ConfigError("--episodes must be >= 1")
    if args.calibration_episodes < 1:
        raise ConfigError("--calibration-episodes must be >= 1")
    if args.base_bits not in QUANT_BITS:
        raise ConfigError(f"--base-bits must be one of {list(QUANT_BITS)}, got {args.base_bits}")
    try:
        candidates = sorted({int(b) for b in args.candidate_bits.split(",")})
    except ValueError:
        raise ConfigError(f"--candidate-bits must be comma-separated ints, got {args.candidate_bits!r}") from None
    bad = [b for b in candidates if b not in QUANT_BITS]
    if bad:
        raise ConfigError(f"--candidate-bits {bad} not in {list(QUANT_BITS)}")
    return LayerBits(args.base_bits, args.base_bits), candidates


def prepare_source(path: str, base, candidates):
    """bit_selection.prepare on checkpoint ``path``, with a ConfigError for a SOURCE that
    is not one of ours."""
    from ..errors import CheckpointError, ConfigError
    from ..quant.bit_selection import prepare
    if not os.path.isfile(path):
        raise ConfigError(f"SOURCE {path!r} does not exist")
    if path.endswith(".qgnn"):
        raise ConfigError(f"SOURCE {path!r} is an integer model; this needs a checkpoint (FP or QAT)")
    try:
        return prepare(path, base, candidates)
    except CheckpointError as e:
        raise ConfigError(f"SOURCE {path!r} is not a usable qgnn-deploy checkpoint: {e}") from None


def analyse_from_args(args, fp_model, config, options, costs):
    import torch

    from ..quant.bit_selection import analyse
    if args.threads:
        torch.set_num_threads(args.threads)
    return analyse(fp_model, config, options, costs, episodes=args.episodes,
                   calibration_episodes=args.calibration_episodes, seed=args.seed, dataset=args.dataset,
                   data_dir=args.data_dir, progress=not args.no_progress)


def run_sensitivity_report(args, src) -> int:
    """``report SOURCE --sensitivity``: the table, or ``{"source", ..., "sensitivity"}`` with --json."""
    from ..errors import ConfigError
    from ..quant.bit_selection import sensitivity_markdown
    if src.kind != "checkpoint":
        raise ConfigError("--sensitivity needs a checkpoint SOURCE (FP or QAT)")
    if args.csv or args.plot:
        raise ConfigError("--sensitivity prints a markdown table or --json, not --csv / --plot")
    base, candidates = check_analysis_arguments(args)
    an = analyse_from_args(args, *prepare_source(src.path, base, candidates))
    if args.json:
        print(json.dumps({"source": src.label, "base_bits": base.to_dict(), "base_accuracy": an.vset.accuracy,
                          "episodes": args.episodes, "split": "val", "sensitivity": an.sensitivity}))
    else:
        sys.stdout.write(sensitivity_markdown(an.sensitivity, an.vset.accuracy))
    return 0


def run(args) -> int:
    from ..errors import ConfigError
    from ..quant import bit_selection as bs
    budgets = {"bit_flops": args.budget_bit_flops, "packed_bytes": args.budget_bytes}
    given = {m: v for m, v in budgets.items() if v is not None}
    if len(given) != 1:
        raise ConfigError("give exactly one of --budget-bit-flops G and --budget-bytes B")
    (metric, value), = given.items()
    if not value > 0:
        raise ConfigError(f"the budget must be positive, got {value}")
    if args.pareto_points < 1:
        raise ConfigError("--pareto-points must be >= 1")
    budget = value * 1e9 if metric == "bit_flops" else value
    base, candidates = check_analysis_arguments(args)
    fp_model, config, options, costs = prepare_source(args.source, base, candidates)
    cheapest = {n: options[0] for n in config.layer_bits}  # every layer at its lowest w and a
    unit = (lambda x: f"{x / 1e9:.4f} G Bit-FLOPs") if metric == "bit_flops" else (lambda x: f"{x:.0f} bytes")
    if costs.total(cheapest, metric) > budget:
        raise ConfigError(f"no configuration meets a budget of {unit(budget)}: the cheapest (every layer "
                          f"w{options[0].w}a{options[0].a}) costs {unit(costs.total(cheapest, metric))}, the "
                          f"base w{base.w}a{base.a} {unit(costs.total(config.layer_bits, metric))}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"--out {args.out!r}: folder {out_dir!r} does not exist")

    an = analyse_from_args(args, fp_model, config, options, costs)
    chosen = bs.search_config(an.sensitivity, costs, an.base_layer_bits, metric, budget)
    progress = not args.no_progress
    points = bs.candidate_points(an, metric, args.pareto_points, progress=progress)
    _, verified = bs.verify(an, chosen, progress=progress)
    selected = bs.evaluated_point(an, chosen, "selected", verified["accuracy"], verified["logit_mse"],
                                  calibration="full")
    selected.update(bit_flops=verified["bit_flops"], bytes=verified["bytes"])
    front = bs.pareto_front(points + [selected])
    bits_config = bs.to_bits_config(chosen, base)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(bits_config, f, indent=2)
        f.write("\n")
    result = {"source": args.source, "out": args.out, "budget": {"metric": metric, "value": budget},
              "config": bits_config, "summary": selected["summary"], "bit_flops": verified["bit_flops"],
              "bytes": verified["bytes"], "accuracy": verified["accuracy"], "logit_mse": verified["logit_mse"],
              "base": {"bits": base.to_dict(), "accuracy": an.vset.accuracy, **costs.totals(an.base_layer_bits)},
              "episodes": args.episodes, "split": "val", "calibration_episodes": args.calibration_episodes,
              "pareto": front, "sensitivity": an.sensitivity}
    if args.plot:
        from ..plots import plot_bit_selection
        plot_bit_selection(points + [selected], front, selected, args.plot, budget=(metric, budget),
                           title=f"{args.source}: accuracy on {args.episodes} val episodes")
        result["plot"] = args.plot
        print(f"wrote {args.plot}", file=sys.stderr)
    spent = verified["bit_flops"] if metric == "bit_flops" else verified["bytes"]
    print(f"wrote {args.out}: {selected['summary']}; {unit(spent)} (budget {unit(budget)}), PTQ accuracy {100 * verified['accuracy']:.2f}% on {args.episodes} val "
          f"episodes (base w{base.w}a{base.a}: {100 * an.vset.accuracy:.2f}%)", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        sys.stdout.write(f"Selected: {selected['summary']}\n"
                         f"  {verified['bit_flops'] / 1e9:.4f} G Bit-FLOPs, {verified['bytes']} packed bytes, "
                         f"accuracy {100 * verified['accuracy']:.2f}% (full PTQ, {args.episodes} val episodes)\n\n"
                         f"Pareto front of the {len(points) + 1} configurations evaluated:\n\n"
                         + bs.pareto_markdown(front))
    return 0
