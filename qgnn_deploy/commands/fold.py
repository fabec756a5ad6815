"""``qgnn-deploy fold SOURCE --out MODEL.qgnn``: fold, save, and verify against the fake-quant model.

Verification runs the reference integer engine next to the fake-quant model on
evaluation episodes (test split of the synthetic data set unless --dataset says
otherwise) and reports ``agreement`` (fraction of queries with the same prediction),
``max_logit_diff``, ``episodes`` and ``artifact_bytes``. With ``--zero-point snap`` it
also folds the exact model and reports the accuracy change snapping causes.

It also runs the layer-wise, input-resynced check (:func:`qgnn_deploy.fold.layerwise_parity`)
on the same episodes: every integer layer fed exactly the codes its fake-quant layer
quantized, its output compared at the same point (``layerwise``: worst code-mismatch rate
and difference, worst fp32 relative error, the worst layer). Episode-level agreement of a
4-bit model can miss the bar through the model's own sensitivity (one fp32 rounding
difference flips a code at a rounding boundary and the flip cascades); the layer-wise
figures say whether the fold itself is right. ``verdict`` (also one line on stderr) says it
for scripts: ``pass`` (episode bars met, every layer right), ``layerwise-only`` (every layer
right, episode bars missed through the model's sensitivity), ``fail`` (a layer is wrong);
null with ``--episodes 0``.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import add_source_arguments
    add_source_arguments(p)
    p.add_argument("--out", required=True, help="where to write the integer model (.qgnn)")
    p.add_argument("--zero-point", choices=("exact", "snap"), default="exact",
                   help="keep real-valued offsets (exact) or round them to the grid (snap)")
    p.add_argument("--generations", type=int, default=None,
                   help="keep only the first K graph generations (default: all)")
    p.add_argument("--episodes", type=int, default=20,
                   help="evaluation episodes for the self-check (0 skips it; default 20)")
    p.add_argument("--seed", type=int, default=0, help="episode seed")
    p.add_argument("--dataset", default="synthetic", help="evaluation data set (default synthetic)")
    p.add_argument("--data-dir", default=None, help="data directory for real data sets")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args) -> int:
    import os

    from ..artifact import expected_artifact_bytes, save_int_model
    from ..errors import ConfigError
    from ..fold import episode_parity_ok, fake_quant_counterpart, fold, parity_verdict
    from ..sources import load_float_model, parse_source

    if not args.out.endswith(".qgnn"):
        raise ConfigError(f"--out must name a .qgnn file, got {args.out!r}")
    if args.episodes < 0:
        raise ConfigError(f"--episodes must be >= 0, got {args.episodes}")
    src = parse_source(args)
    model = load_float_model(src)
    int_model = fold(model, zero_point=args.zero_point, generations=args.generations,
                     backend="reference")
    size = save_int_model(int_model, args.out)
    budget = expected_artifact_bytes(int_model)
    result = {"source": src.label, "out": os.path.abspath(args.out), "zero_point": args.zero_point,
              "generations": int_model.generations, "artifact_bytes": size,
              "expected_bytes": budget["total"], "packed_weight_bytes": budget["packed"],
              "fp32_bytes": budget["fp32"], "episodes": 0, "agreement": None,
              "max_logit_diff": None, "verdict": None}
    if args.episodes:
        fq = fake_quant_counterpart(model, args.zero_point, args.generations)
        check = _verify(fq, int_model, args, "fold check")
        result.update(episodes=check["episodes"], agreement=check["agreement"],
                      max_logit_diff=check["max_logit_diff"], queries=check["queries"],
                      accuracy=check["accuracy"], fake_quant_accuracy=check["reference_accuracy"],
                      ci95=check["ci95"])
        result["layerwise"] = _layerwise(fq, int_model, args)
        result["verdict"] = parity_verdict(episode_parity_ok(check["agreement"], check["max_logit_diff"]),
                                           result["layerwise"]["passed"])
        if args.zero_point == "snap":
            exact = fold(model, zero_point="exact", generations=args.generations, backend="reference")
            acc_exact = _accuracy(exact, args, "exact fold")
            result.update(accuracy_exact=acc_exact, accuracy_change=check["accuracy"] - acc_exact)
    _print(result, args.json)
    if args.episodes:
        print(verdict(result), file=sys.stderr)
        sys.stderr.flush()
    return 0


def _layerwise(fq, int_model, args):
    """Layer-wise, input-resynced parity on the verification episodes (summary figures;
    per-layer rows only for the layers past a bar)."""
    from ..data import episode_batches
    from ..fold import layerwise_parity_batches
    lw = layerwise_parity_batches(fq, int_model, episode_batches(
        int_model.config, args.episodes, args.seed, "test", args.dataset, args.data_dir,
        tasks_per_batch=10))
    layers = lw.pop("layers")
    lw["failing_layers"] = {n: r for n, r in layers.items() if not _row_ok(r)}
    return lw


def _row_ok(row) -> bool:
    from ..fold import CODE_DIFF_BAR, CODE_MISMATCH_BAR, REL_ERROR_BAR
    if row["input_code_mismatches"]:
        return False
    if row["output"] == "codes":
        return row["code_mismatch_rate"] <= CODE_MISMATCH_BAR and row["code_max_diff"] <= CODE_DIFF_BAR
    return row["max_rel_error"] <= REL_ERROR_BAR


def verdict(result) -> str:
    """The one-line verdict of a fold check (episode level and layer-wise)."""
    from ..fold import AGREEMENT_BAR, LOGIT_DIFF_BAR, episode_parity_ok
    lw = result["layerwise"]
    episode_ok = episode_parity_ok(result["agreement"], result["max_logit_diff"])
    ep = (f"episode parity {'PASS' if episode_ok else 'MISS'} (agreement {result['agreement']:.4f} "
          f"[bar >= {AGREEMENT_BAR}], max |logit diff| {result['max_logit_diff']:.2e} "
          f"[bar <= {LOGIT_DIFF_BAR:g}], {result['episodes']} episodes)")
    layer = (f"layer-wise {'PASS' if lw['passed'] else 'FAIL'} (codes off on "
             f"{100 * lw['max_code_mismatch_rate']:.4f}% max, by <= {lw['max_code_diff']}; fp32 "
             f"rel err {lw['max_rel_error']:.1e}; worst {lw['worst_layer']})")
    if result["verdict"] == "fail":
        head = "fold verdict: fail: the folded model is wrong at layer " + str(lw["worst_layer"])
    elif result["verdict"] == "pass":
        head = "fold verdict: pass"
    else:
        head = ("fold verdict: layerwise-only: fold verified layer-wise, but episode-level parity "
                "missed: the model amplifies fp32 rounding ties (code flips at rounding boundaries cascade)")
    return f"{head}; {ep}; {layer}"


def _accuracy(int_model, args, desc) -> float:
    from ..evaluate import evaluate
    return evaluate(lambda i, s: int_model(i, s).logits, int_model.config, episodes=args.episodes,
                    seed=args.seed, dataset=args.dataset, data_dir=args.data_dir, desc=desc)["accuracy"]


def _verify(fq, int_model, args, desc):
    """Reference engine vs fake-quant model on the same episodes."""
    from ..evaluate import evaluate, model_predict
    from ..fold import compare_engines
    kw = dict(episodes=args.episodes, seed=args.seed, dataset=args.dataset, data_dir=args.data_dir,
              return_logits=True)
    ref = evaluate(model_predict(fq), int_model.config, desc="fake-quant", **kw)
    ours = evaluate(lambda i, s: int_model(i, s).logits, int_model.config, desc=desc, **kw)
    cmp = compare_engines(ref["logits"], ours["logits"])
    return {**cmp, "episodes": ours["episodes"], "accuracy": ours["accuracy"], "ci95": ours["ci95"],
            "reference_accuracy": ref["accuracy"]}


def _print(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(f"wrote {result['out']}: {result['artifact_bytes']} bytes "
          f"(budget: {result['packed_weight_bytes']} packed + {result['fp32_bytes']} fp32 = "
          f"{result['expected_bytes']})")
    if result["episodes"]:
        print(f"reference engine vs fake-quant on {result['episodes']} episodes: agreement "
              f"{result['agreement']:.4f}, max |logit diff| {result['max_logit_diff']:.3g}, "
              f"accuracy {result['accuracy']:.4f} +- {result['ci95']:.4f}")
        lw = result["layerwise"]
        print(f"layer-wise (inputs resynced): {'pass' if lw['passed'] else 'FAIL'}, max code "
              f"mismatch rate {lw['max_code_mismatch_rate']:.2e} (max diff {lw['max_code_diff']}), "
              f"max fp32 rel error {lw['max_rel_error']:.2e}, worst layer {lw['worst_layer']}")
    if "accuracy_change" in result:
        print(f"zero-point snap: accuracy {result['accuracy']:.4f} vs exact "
              f"{result['accuracy_exact']:.4f} (change {result['accuracy_change']:+.4f})")
    sys.stdout.flush()
