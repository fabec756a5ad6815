"""``qgnn-deploy bench``: end-to-end episode latency of our engines against what a user would run instead.

Examples::

    qgnn-deploy bench --preset resnet12-cifarfs --bits 4 --tasks 1
    qgnn-deploy bench --preset tiny --bits 4 --zero-point snap --threads 2 --json
    qgnn-deploy bench model.qgnn --backends cpu onnx --threads 2
    qgnn-deploy bench ckpt.pt --layers              # + per-layer kernels vs onnxruntime int8
    qgnn-deploy bench --preset tiny --bits 4 --profile --backends cpu --baselines   # where cpu's time goes
    qgnn-deploy bench qgnn_deploy/assets/egnn-tiny-w4.pt --tasks 1 --layers     # EGNN, its own layer shapes

Method (docs/measuring.md): one episode batch (``--tasks`` tasks x N images), warm-up
runs, then round-robin timed runs of every variant in this process; p50 / p90 per
variant; speed-ups are ratios of p50s from the same run. Baselines: torch FP32 and bf16
autocast (channels_last), onnxruntime on the FP32 export and on its int8 QDQ
quantization by onnxruntime's ``quantize_static``; every variant's accuracy on the same
synthetic test episodes sits next to its latency (``--accuracy-episodes``). Both model
families (DPGN, EGNN) run the same variants; ``--layers`` times the ResNet-12 conv shapes
for DPGN and the model's own quantized layers at ``--tasks`` tasks for EGNN.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..benchmarks.variants import BASELINES, DEFAULT_ENGINES, ENGINES
    from ..cli import add_source_arguments
    add_source_arguments(p)
    p.add_argument("--backends", nargs="+", choices=ENGINES, default=list(DEFAULT_ENGINES),
                   help="our engines to time; onnx is onnxruntime on our integer export "
                        f"(default: {' '.join(DEFAULT_ENGINES)}; reference is slow and triton "
                        "needs a CUDA GPU: ask for them)")
    p.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES),
                   help="what a user would run instead (default: all; none with a bare --baselines)")
    p.add_argument("--zero-point", choices=("exact", "snap"), default=None,
                   help="fold a checkpoint with real offsets (exact, the default) or offsets on the "
                        "grid (snap); the integer ONNX export follows. A .qgnn file keeps its own")
    p.add_argument("--accuracy-episodes", type=int, default=200,
                   help="synthetic test episodes every variant is evaluated on (default 200; 0 skips)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch, onnxruntime and the C++ kernels (default: all cores)")
    p.add_argument("--tasks", type=int, default=10, help="tasks per episode batch (default 10)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per variant (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per variant first (default 3)")
    p.add_argument("--layers", action="store_true",
                   help="also time the per-layer workloads (DPGN: the ResNet-12 conv shapes at batch 100 "
                        "and the aggregation; EGNN: the model's quantized layers at --tasks tasks)")
    p.add_argument("--profile", action="store_true",
                   help="also time every step of the cpu backend's compiled plan (per step and per kind)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def load_models(src, zero_point=None, quiet: bool = False):
    """(float model or None, integer model or None, {stage: reason}); a checkpoint or preset
    is folded with ``zero_point`` (None: exact), an artifact must match it."""
    from ..errors import ConfigError
    from ..sources import load_float_model
    why = {}
    if src.kind == "artifact":
        try:
            from ..artifact import load_int_model
        except ImportError as e:
            return None, None, {"artifact": f"reading .qgnn is unavailable in this build ({e})"}
        int_model = load_int_model(src.path)
        if zero_point is not None and zero_point != int_model.zero_point:
            raise ConfigError(f"{src.path!r} was folded with --zero-point {int_model.zero_point}, not "
                              f"{zero_point}: fold the checkpoint again with --zero-point {zero_point}")
        return None, int_model, why
    model = load_float_model(src, quiet=quiet)
    try:
        from ..fold import fold
    except ImportError as e:
        return model, None, {"fold": f"fold is unavailable in this build ({e})"}
    return model, fold(model, zero_point=zero_point or "exact"), why


def source_trained(src) -> bool:
    """False for a preset with no shipped checkpoint (calibrated only: accuracy is chance)."""
    from ..sources import embedded_checkpoint
    return src.kind != "preset" or (not src.layer_bits and embedded_checkpoint(src.preset, src.bits) is not None)


def layer_results(model, tasks, threads, repeats, warmup, log):
    """Per-layer workloads from qgnn_deploy.benchmarks.layers (DPGN: the ResNet-12 shapes;
    EGNN: the model's own layers at ``tasks`` tasks), or (None, reason)."""
    try:
        from ..benchmarks.layers import layer_shapes, run_layer_benchmarks
    except Exception as e:  # noqa: BLE001
        return None, f"per-layer benchmarks unavailable: {type(e).__name__}: {e}"
    cfg = model.config
    bits = cfg.bits if cfg.bits < 32 else 4
    convs, aggs = layer_shapes(cfg, tasks)
    log(f"per-layer workloads at {bits} bits: {len(convs)} conv and {len(aggs)} aggregation shapes")
    return run_layer_benchmarks(bits=(bits,), threads=threads, repeats=repeats, warmup=warmup,
                                conv_shapes=convs, agg_shapes=aggs), None


def plan_profile(int_model, tasks: int, threads: int, repeats: int) -> dict:
    """Per-step wall time of the compiled plan on the benchmark's episode batch (medians of
    ``repeats`` runs): ``{"total_ms", "by_kind": {kind: ms}, "steps": [{index, kind, name, ms}]}``."""
    from ..backends import cpu as cpu_backend
    from ..report import default_episode
    images, labels = default_episode(int_model.config, tasks, 0)
    old = cpu_backend._threads_override
    cpu_backend.set_num_threads(threads)
    try:
        int_model.profile(images, labels)  # warm-up: compiles the plan, fills the arena
        steps = int_model.profile(images, labels, repeats=repeats)
    finally:
        cpu_backend.set_num_threads(old)
    by_kind = {}
    for st in steps:
        by_kind[st["kind"]] = by_kind.get(st["kind"], 0.0) + st["ms"]
    return {"total_ms": sum(by_kind.values()), "tasks": tasks, "threads": threads,
            "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])), "steps": steps}


def format_profile(prof: dict, top: int = 12) -> str:
    total = prof["total_ms"] or 1.0
    lines = [f"cpu plan profile ({prof['tasks']} tasks, {prof['threads']} threads): {prof['total_ms']:.2f} ms "
             f"in {len(prof['steps'])} steps",
             "  by kind: " + ", ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f}%)" for k, v in prof["by_kind"].items()
                                       if v >= 0.005 * total)]
    for st in sorted(prof["steps"], key=lambda s: -s["ms"])[:top]:
        lines.append(f"  {st['ms']:8.3f} ms  {st['kind']:<20s} {st['name']}")
    return "\n".join(lines)


def run(args) -> int:
    from ..benchmarks.episode import format_results, run_episode_bench
    from ..errors import ConfigError
    from ..sources import parse_source
    if args.repeats < 1 or args.warmup < 0 or args.tasks < 1 or args.accuracy_episodes < 0:
        raise ConfigError("--repeats and --tasks must be >= 1, --warmup and --accuracy-episodes >= 0")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    threads = args.threads or os.cpu_count() or 1
    log = lambda s: print(f"bench: {s}", file=sys.stderr)  # noqa: E731
    src = parse_source(args)
    float_model, int_model, why = load_models(src, args.zero_point)
    for stage, reason in why.items():
        log(f"{stage}: unavailable: {reason}")
    out = run_episode_bench(float_model, int_model, backends=args.backends, baselines=args.baselines,
                            tasks=args.tasks, threads=threads, repeats=args.repeats,
                            warmup=args.warmup, accuracy_episodes=args.accuracy_episodes,
                            progress=not args.no_progress, log=log)
    out["source"] = src.label
    out["source_trained"] = source_trained(src)
    out["unavailable"].update(why)
    if args.layers:
        res, reason = layer_results(float_model or int_model, args.tasks, threads, args.repeats, args.warmup, log)
        if res is None:
            out["unavailable"]["layers"] = reason
        else:
            out["results"] += res
    if args.profile:
        from ..backends import is_backend_available
        if int_model is None or not is_backend_available("cpu"):
            out["unavailable"]["profile"] = "needs the integer model and the cpu backend"
        else:
            log("profiling the cpu plan")
            out["profile"] = plan_profile(int_model, args.tasks, threads, args.repeats)
    if args.json:
        print(json.dumps(out))
        return 0
    d = out["device"]
    print(f"device: {d['cpu']} ({d['cpu_count']} cores{', CUDA ' + d.get('gpu', '') if d['cuda'] else ''}), "
          f"threads {out['threads']}, batch {out['batch']['tasks']} tasks x "
          f"{out['batch']['images'] // out['batch']['tasks']} images of {out['batch']['image_size']} px "
          f"({out['family']}), "
          f"{out['warmup']} warm-up + {out['repeats']} timed runs each, zero point {out['zero_point']}")
    print("cpu flags: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in d["cpu_flags"].items()))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items() if v))
    print(format_results(out["results"]))
    acc = out["accuracy"]
    if acc:
        print(f"accuracy: {acc['way']}-way {acc['shot']}-shot, {acc['episodes']} synthetic test episodes "
              f"(seed {acc['seed']}), +- is the 95% interval"
              + ("" if out["source_trained"] else "; the model is UNTRAINED (calibrated only): "
                 "accuracy is chance, it only shows the variants agree"))
    if "profile" in out:
        print(format_profile(out["profile"]))
    for k, v in out["unavailable"].items():
        print(f"{k}: unavailable: {v}")
    return 0
