"""``qgnn-deploy quantize``: post-training quantization of an FP checkpoint (no training).

Examples::

    qgnn-deploy quantize fp.pt --bits 4 --out w4-ptq.pt --json
    qgnn-deploy quantize dpgn_official.pth --preset resnet12-cifarfs --bits 3 \\
        --dataset cifar-fs --data-dir data/cifar-fs --out w3-ptq.pt
    qgnn-deploy fold w4-ptq.pt --out w4-ptq.qgnn              # deploy it
    qgnn-deploy train --bits 4 --init w4-ptq.pt --out w4.pt   # or fine-tune it (QAT)

The PQ ranges of every quantized layer are calibrated on ``--calibration-episodes``
train-split episodes (qgnn_deploy/quant/ptq.py: PQ's mean +- 3 std, then a per-layer
range search minimising the layer's output error); the FP and PTQ models are then
evaluated on ``--episodes`` test episodes. The output is a QAT-format checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="FP checkpoint: ours (bits 32) or an official DPGN one")
    bits = p.add_mutually_exclusive_group(required=True)
    bits.add_argument("--bits", type=int, choices=[2, 3, 4, 8], help="bit-width of the quantized layers")
    bits.add_argument("--bits-config", metavar="FILE.json",
                      help="per-layer weight/activation bits instead (docs/mixed-precision.md)")
    p.add_argument("--preset", default="resnet12-cifarfs",
                   help="model preset of an official DPGN checkpoint (ours carry their config)")
    p.add_argument("--way", type=int, help="official checkpoints: N-way (default the preset's)")
    p.add_argument("--shot", type=int, help="official checkpoints: K-shot (default the preset's)")
    p.add_argument("--dataset", default="synthetic",
                   choices=["synthetic", "cifar-fs", "mini-imagenet", "cub"])
    p.add_argument("--data-dir", help="data set root (real data sets; see qgnn_deploy/data)")
    p.add_argument("--calibration-episodes", type=int, default=32,
                   help="train-split episodes the ranges are calibrated on (default 32)")
    p.add_argument("--episodes", type=int, default=1000,
                   help="test episodes the FP and PTQ models are evaluated on (default 1000; 0 skips)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration and test episodes")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", required=True, help="QAT-format checkpoint to write")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _configs(args):
    """(FP config, quantized config) of the source checkpoint."""
    from ..checkpoint import is_official_dpgn, read_checkpoint
    from ..config import config_from_dict, preset_config
    from ..errors import CheckpointError, ConfigError
    obj = read_checkpoint(args.source)
    if is_official_dpgn(obj):
        extra = {k: v for k, v in (("way", args.way), ("shot", args.shot)) if v is not None}
        fp = preset_config(args.preset, 32, **extra)
    else:
        if args.way is not None or args.shot is not None:
            raise ConfigError("--way / --shot only go with an official DPGN checkpoint (ours carry their config)")
        try:
            fp = config_from_dict(obj.get("config"))
        except ConfigError as e:
            raise CheckpointError(f"{args.source!r} has an invalid model config: {e}") from None
        if fp.quantized:
            raise ConfigError(f"{args.source!r} is already quantized: post-training quantization "
                              "starts from an FP checkpoint (fold deploys this one)")
        fp = fp.replace(layer_bits={})
    if args.bits_config:
        from ..bits_config import load_bits_config, resolve_bits
        return fp, resolve_bits(load_bits_config(args.bits_config), fp)
    return fp, fp.replace(bits=args.bits)


def run(args) -> int:
    import torch

    from ..checkpoint import save_checkpoint
    from ..errors import ConfigError
    from ..evaluate import evaluate, model_predict
    from ..quant.ptq import calibration_batches, post_training_quantize
    from ..training.trainer import init_from
    if args.calibration_episodes < 1:
        raise ConfigError("--calibration-episodes must be >= 1")
    if args.episodes < 0:
        raise ConfigError("--episodes must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    fp_config, q_config = _configs(args)
    fp_model = init_from(args.source, fp_config).eval()
    q_model = init_from(args.source, q_config).eval()
    progress = not args.no_progress
    batches = calibration_batches(q_config, args.calibration_episodes, args.seed, args.dataset, args.data_dir)
    layers = post_training_quantize(fp_model, q_model, batches, progress=progress)
    out = {"source": args.source, "bits": args.bits, "bits_config": args.bits_config, "dataset": args.dataset,
           "calibration_episodes": args.calibration_episodes, "layers": layers}
    if args.episodes:
        common = dict(episodes=args.episodes, seed=args.seed, split="test", dataset=args.dataset,
                      data_dir=args.data_dir, progress=progress)
        fp_r = evaluate(model_predict(fp_model), fp_config, desc="eval fp32", **common)
        q_r = evaluate(model_predict(q_model), q_config, desc=f"eval w{q_config.bits}", **common)
        out.update(fp32_accuracy=fp_r["accuracy"], fp32_ci95=fp_r["ci95"], accuracy=q_r["accuracy"],
                   ci95=q_r["ci95"], episodes=q_r["episodes"])
    meta = {"ptq": {k: v for k, v in out.items() if k != "layers"},
            "command": ["qgnn-deploy"] + sys.argv[1:]}
    save_checkpoint(q_model, args.out, meta=meta)
    out["out"] = args.out
    if args.episodes:
        print(f"PTQ w{q_config.bits}: accuracy {100 * out['accuracy']:.2f} +- {100 * out['ci95']:.2f}% vs FP32 "
              f"{100 * out['fp32_accuracy']:.2f} +- {100 * out['fp32_ci95']:.2f}% on {out['episodes']} "
              f"{args.dataset} test episodes", file=sys.stderr)
    print(f"wrote {args.out} ({len(layers)} layers calibrated on {args.calibration_episodes} episodes)",
          file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    return 0
