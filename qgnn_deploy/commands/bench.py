"""``qgnn-deploy bench``: end-to-end episode latency of every backend vs torch FP32 and onnxruntime.

Examples::

    qgnn-deploy bench --preset resnet12-cifarfs --bits 4
    qgnn-deploy bench model.qgnn --backends cpu onnx --threads 2 --json
    qgnn-deploy bench ckpt.pt --layers              # + per-layer kernels vs onnxruntime int8

Method (DESIGN.md section 6): one episode batch (10 tasks x N images by default), warm-up
runs, then round-robin timed runs of every variant in this process; p50 / p90 per
variant; speed-ups are ratios of p50s from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

BACKEND_CHOICES = ("reference", "cpu", "triton", "onnx")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import add_source_arguments
    add_source_arguments(p)
    p.add_argument("--backends", nargs="+", choices=BACKEND_CHOICES, default=["cpu", "triton", "onnx"],
                   help="engines to time next to torch FP32 and onnxruntime FP32 "
                        "(default: cpu triton onnx; reference is slow, ask for it)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch, onnxruntime and the C++ kernels (default: all cores)")
    p.add_argument("--tasks", type=int, default=10, help="tasks per episode batch (default 10)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per variant (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per variant first (default 3)")
    p.add_argument("--layers", action="store_true",
                   help="also time the per-layer workloads (conv shapes at batch 100, aggregation)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def load_models(src, quiet: bool = False):
    """(float model or None, integer model or None, {stage: reason})."""
    from ..sources import load_float_model
    why = {}
    if src.kind == "artifact":
        try:
            from ..artifact import load_int_model
        except ImportError as e:
            return None, None, {"artifact": f"reading .qgnn is unavailable in this build ({e})"}
        return None, load_int_model(src.path), why
    model = load_float_model(src, quiet=quiet)
    try:
        from ..fold import fold
    except ImportError as e:
        return model, None, {"fold": f"fold is unavailable in this build ({e})"}
    return model, fold(model), why


def layer_results(model, threads, repeats, warmup, log):
    """Per-layer workloads from qgnn_deploy.benchmarks.layers, or (None, reason)."""
    try:
        from ..benchmarks.layers import run_layer_benchmarks
    except Exception as e:  # noqa: BLE001
        return None, f"per-layer benchmarks unavailable: {type(e).__name__}: {e}"
    cfg = getattr(model, "config", None)
    bits = cfg.bits if cfg is not None and cfg.bits < 32 else 4
    log(f"per-layer workloads at {bits} bits")
    return run_layer_benchmarks(bits=(bits,), threads=threads, repeats=repeats, warmup=warmup), None


def run(args) -> int:
    from ..benchmarks.episode import format_results, run_episode_bench
    from ..errors import ConfigError
    from ..sources import parse_source
    if args.repeats < 1 or args.warmup < 0 or args.tasks < 1:
        raise ConfigError("--repeats and --tasks must be >= 1, --warmup >= 0")
    threads = args.threads or os.cpu_count() or 1
    log = lambda s: print(f"bench: {s}", file=sys.stderr)  # noqa: E731
    src = parse_source(args)
    float_model, int_model, why = load_models(src)
    for stage, reason in why.items():
        log(f"{stage}: unavailable: {reason}")
    out = run_episode_bench(float_model, int_model, backends=args.backends, tasks=args.tasks,
                            threads=threads, repeats=args.repeats, warmup=args.warmup,
                            progress=not args.no_progress, log=log)
    out["source"] = src.label
    out["unavailable"].update(why)
    if args.layers:
        res, reason = layer_results(float_model or int_model, threads, args.repeats, args.warmup, log)
        if res is None:
            out["unavailable"]["layers"] = reason
        else:
            out["results"] += res
    if args.json:
        print(json.dumps(out))
        return 0
    d = out["device"]
    print(f"device: {d['cpu']} ({d['cpu_count']} cores{', CUDA ' + d.get('gpu', '') if d['cuda'] else ''}), "
          f"threads {out['threads']}, batch {out['batch']['tasks']} tasks x "
          f"{out['batch']['images'] // out['batch']['tasks']} images of {out['batch']['image_size']} px, "
          f"{out['warmup']} warm-up + {out['repeats']} timed runs each")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items() if v))
    print(format_results(out["results"]))
    for k, v in out["unavailable"].items():
        print(f"{k}: unavailable: {v}")
    return 0
