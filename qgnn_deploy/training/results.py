"""The results table of assets/README.md: accuracy of checkpoints on the synthetic test
split, and PQ vs min-max weight quantization error.

    python -m qgnn_deploy.training.results CKPT [CKPT ...] [--episodes 1000] [--json]

DPGN and EGNN checkpoints (ours or official). EGNN is evaluated as its config says, by default
non-transductive (one graph per query: the official train.py / eval.py default
``--transductive False``); ``--transductive`` / ``--no-transductive`` override it.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    import torch

    from ..checkpoint import load_checkpoint, read_checkpoint
    from ..evaluate import evaluate, model_predict
    from .quant_error import learned_range_errors, summarize, weight_quant_errors
    p = argparse.ArgumentParser(prog="python -m qgnn_deploy.training.results")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shot", type=int, help="evaluate at another shot than the checkpoint's")
    p.add_argument("--threads", type=int)
    tr = p.add_mutually_exclusive_group()
    tr.add_argument("--transductive", dest="transductive", action="store_true", default=None,
                    help="EGNN: evaluate one graph per episode")
    tr.add_argument("--no-transductive", dest="transductive", action="store_false",
                    help="EGNN: evaluate one graph per query (the official default)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for path in args.checkpoints:
        ck = read_checkpoint(path)
        model = load_checkpoint(path).eval()
        egnn = getattr(model, "family", "dpgn") == "egnn"
        if args.transductive is not None and not egnn:
            from ..errors import ConfigError
            raise ConfigError(f"{path}: --transductive / --no-transductive apply to EGNN checkpoints only")
        changes = {} if args.shot is None else {"shot": args.shot}
        if args.transductive is not None:
            changes["transductive"] = args.transductive
        cfg = model.config.replace(**changes) if changes else model.config
        if cfg != model.config:
            fresh = type(model)(cfg)
            fresh.load_state_dict(model.state_dict())
            model = fresh.eval()
        r = evaluate(model_predict(model), cfg, episodes=args.episodes, seed=args.seed, desc=path)
        meta = ck.get("meta", {}) if isinstance(ck.get("meta"), dict) else {}
        state = ck["state_dict"] if isinstance(ck.get("state_dict"), dict) else model.state_dict()
        row = {"checkpoint": path, "family": "egnn" if egnn else "dpgn", "bits": cfg.bits,
               "way": cfg.way, "shot": cfg.shot,
               "aqd": meta.get("aqd"), "sqd": meta.get("sqd"), "accuracy": r["accuracy"],
               "ci95": r["ci95"], "episodes": r["episodes"]}
        if cfg.bits >= 32:
            row["quant_error_gnn"] = summarize(weight_quant_errors(state))
            row["quant_error_backbone"] = summarize(weight_quant_errors(state, "backbone."))
        else:
            row["quant_error_gnn_learned"] = learned_range_errors(state, cfg.bits)
            row["quant_error_backbone_learned"] = learned_range_errors(state, cfg.bits, "backbone.")
        if egnn:
            row["transductive"] = bool(cfg.transductive)
        rows.append(row)
        mode = (" (EGNN, transductive)" if cfg.transductive else " (EGNN, non-transductive)") if egnn else ""
        print(f"{path}: {cfg.bits}-bit {cfg.way}-way {cfg.shot}-shot{mode} accuracy "
              f"{100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f} %", file=sys.stderr)
    if args.json:
        print(json.dumps({"results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
