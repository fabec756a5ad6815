"""``qgnn-deploy train``: FP pre-training or QAT (PQ + AQD + SQD) of a QGNN-IC checkpoint,
DPGN (``--preset tiny`` / ``resnet12-cifarfs``) or EGNN (``--preset egnn-tiny`` /
``egnn-miniimagenet``: the official EGNN loss, AQD on the encoder, SQD on the graph).

Examples::

    qgnn-deploy train --preset tiny --bits 32 --iterations 2000 --out fp.pt
    qgnn-deploy train --preset tiny --bits 2 --init fp.pt --iterations 600 --out w2.pt
    qgnn-deploy train ... --out w2.pt --resume          # continue an interrupted run
    qgnn-deploy train --preset tiny --bits-config mixed.json --init fp.pt --out mixed.pt
    qgnn-deploy train --preset egnn-tiny --bits 4 --init egnn-fp.pt --out egnn-w4.pt
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny",
                   help="model preset: DPGN tiny, resnet12-cifarfs; EGNN egnn-tiny, egnn-miniimagenet")
    p.add_argument("--dataset", default="synthetic",
                   choices=["synthetic", "cifar-fs", "mini-imagenet", "cub"])
    p.add_argument("--data-dir", help="data set root (real data sets; see qgnn_deploy/data)")
    bits = p.add_mutually_exclusive_group()
    bits.add_argument("--bits", type=int, default=32, choices=[2, 3, 4, 8, 32],
                      help="bit-width of the quantized layers (32 = FP pre-training)")
    bits.add_argument("--bits-config", metavar="FILE.json",
                      help="per-layer weight/activation bits instead (docs/mixed-precision.md)")
    p.add_argument("--node-bits", metavar="B,B,...",
                   help="per-node aggregation widths, e.g. 2,4,8 (A2Q-style; docs/mixed-precision.md; DPGN only)")
    p.add_argument("--node-bits-target", type=float,
                   help="mean per-node width the penalty aims under (default: the second widest)")
    p.add_argument("--node-bits-weight", type=float, default=0.1, help="weight of that penalty (0.1)")
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--image-size", type=int, choices=[32, 84], help="default: the preset's (32)")
    p.add_argument("--iterations", type=int, default=1000, help="episode batches to train on")
    p.add_argument("--tasks", type=int, default=10, help="episodes per batch")
    p.add_argument("--no-aqd", action="store_true", help="disable attention quantization distillation")
    p.add_argument("--no-sqd", action="store_true", help="disable stochastic quantization distillation")
    p.add_argument("--lambda1", type=float, default=0.7, help="AQD loss weight")
    p.add_argument("--lambda2", type=float, default=1.0, help="SQD loss weight")
    p.add_argument("--init", help="initialise from a checkpoint of the same family (ours, or an official "
                   "DPGN / EGNN one), e.g. FP for QAT")
    p.add_argument("--transductive", action="store_true",
                   help="EGNN only: one graph per episode (official --transductive True); default: one "
                        "graph per query, as the official default")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=["adam", "sgd"], help="override the paper's recipe")
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--lr-step", type=int,
                   help="lr x0.1 every this many iterations (default: 15%% of the run, as 15k of 100k)")
    p.add_argument("--val-every", type=int, default=0, help="validate every N iterations (default: 5 times)")
    p.add_argument("--val-episodes", type=int, default=100)
    p.add_argument("--save-every", type=int, default=0, help="write a resumable checkpoint every N iterations")
    p.add_argument("--slim", action="store_true",
                   help="final checkpoint without optimizer/training state (small, not resumable)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--out", required=True, help="checkpoint to write")


def run(args) -> int:
    import torch

    from ..config import check_node_bits
    from ..training import TrainOptions, train
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = TrainOptions(
        out=args.out, preset=args.preset, bits=args.bits, bits_config=args.bits_config,
        node_bits=check_node_bits(args.node_bits or "", "--node-bits"),
        node_bits_target=args.node_bits_target, node_bits_weight=args.node_bits_weight,
        dataset=args.dataset, data_dir=args.data_dir,
        way=args.way, shot=args.shot, image_size=args.image_size, iterations=args.iterations,
        tasks=args.tasks, aqd=not args.no_aqd, sqd=not args.no_sqd, lambda1=args.lambda1,
        lambda2=args.lambda2, init=args.init, resume=args.resume, seed=args.seed,
        optimizer=args.optimizer, lr=args.lr, lr_step=args.lr_step, val_every=args.val_every,
        val_episodes=args.val_episodes, save_every=args.save_every, slim=args.slim,
        progress=not args.no_progress, command=["qgnn-deploy"] + sys.argv[1:],
        transductive=True if args.transductive else None)
    try:
        summary = train(opts)
    except KeyboardInterrupt:
        return 130
    print(f"wrote {summary['out']} ({summary['iterations']} iterations, {summary['seconds']:.0f} s)",
          file=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items()}))
    return 0
