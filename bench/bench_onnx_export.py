"""Latency of the ONNX exports in onnxruntime: FP32 export vs the integer forms.

    python bench/bench_onnx_export.py --preset resnet12-cifarfs --bits 4 \
        --forms snap:fast,snap:integer,exact:integer --rounds 15 --threads 2

Builds (once, cached in ``--workdir``) a calibrated fake-quant model of the preset, its
FP32 twin, the FP32 export and the integer exports named by ``--forms``
(``zero_point:form``), then times every variant *interleaved* in one process (round
robin, so a shared, noisy machine slows all of them alike) on one batch of
``--tasks`` synthetic episodes, and prints p50 / min per variant and the ratio of p50s
to the FP32 export. ``--torch-every K`` also times torch FP32 every K-th round (it is
~5x slower than onnxruntime here; 0 disables). ``--parity`` runs ``check_parity`` of
each integer export against the reference engine first. ``--json`` writes the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build(args):
    from qgnn_deploy.backends.onnx import export_module
    from qgnn_deploy.benchmarks.episode import fp32_twin
    from qgnn_deploy.fold import fold
    from qgnn_deploy.sources import calibrated_model
    E = export_module()
    os.makedirs(args.workdir, exist_ok=True)
    tag = f"{args.preset}-w{args.bits}"
    qm = fp = None
    files, int_models = {}, {}
    fp_path = os.path.join(args.workdir, f"{tag}-fp32.pt")
    if os.path.exists(fp_path) and not args.rebuild:
        fp = torch.load(fp_path, weights_only=False)
    specs = [s.split(":") for s in args.forms.split(",") if s]
    for zp in sorted({zp for zp, _ in specs}):
        p = os.path.join(args.workdir, f"{tag}-{zp}.pt")
        if os.path.exists(p) and not args.rebuild:
            int_models[zp] = torch.load(p, weights_only=False)
            continue
        if qm is None:
            qm = calibrated_model(args.preset, args.bits, quiet=True)
        int_models[zp] = fold(qm, zero_point=zp)
        torch.save(int_models[zp], p)
    if fp is None:
        if qm is None:
            qm = calibrated_model(args.preset, args.bits, quiet=True)
        fp = fp32_twin(qm)
        torch.save(fp, fp_path)
    fp.eval()
    files["ort_fp32"] = os.path.join(args.workdir, f"{tag}-fp32.onnx")
    E.export_onnx(fp, files["ort_fp32"])
    for zp, form in specs:
        name = f"{zp}_{form}"
        files[name] = os.path.join(args.workdir, f"{tag}-{name}.onnx")
        E.export_onnx(int_models[zp], files[name], form=form)
    return E, fp, int_models, specs, files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="resnet12-cifarfs")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--forms", default="snap:fast,snap:integer,exact:integer",
                    help="comma-separated zero_point:form pairs")
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--torch-every", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/qgnn-bench-onnx")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from qgnn_deploy.data import calibration_episodes
    torch.set_num_threads(args.threads)
    E, fp, int_models, specs, files = build(args)
    images, labels = calibration_episodes(fp.config, tasks=args.tasks, seed=5)
    feed = {"images": images.numpy(), "support_labels": labels.numpy()}

    if args.parity:
        from qgnn_deploy.export.check import check_parity
        for zp, form in specs:
            im = int_models[zp]
            proto, info = E.build_onnx(im, form=form)
            r = check_parity(im, proto, info["code_tensors"],
                             [calibration_episodes(im.config, tasks=2, seed=3)], threads=args.threads)
            print(f"parity {zp}:{form}", json.dumps({k: r[k] for k in (
                "passed", "agreement", "max_logit_diff", "code_mismatches", "code_elements", "code_max_diff")}),
                flush=True)

    fns = {}
    for name, path in files.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        fns[name] = (lambda s=s: s.run(None, feed))

    def torch_fp32():
        with torch.no_grad():
            fp(images, labels)
    if args.torch_every:
        fns["torch_fp32"] = torch_fp32
    for f in fns.values():  # warm-up
        f()
    times = {k: [] for k in fns}
    for r in range(args.rounds):
        for k, f in fns.items():
            if k == "torch_fp32" and r % args.torch_every:
                continue
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    base = float(np.median(times["ort_fp32"]))
    rows = {}
    print(f"{args.preset} {args.bits}-bit, {args.tasks} tasks x {fp.config.num_nodes} images, "
          f"{args.threads} threads, {args.rounds} interleaved rounds")
    for k, v in times.items():
        rows[k] = {"p50_ms": float(np.median(v)), "min_ms": float(min(v)), "n": len(v),
                   "p50_vs_ort_fp32": float(np.median(v)) / base,
                   "bytes": os.path.getsize(files[k]) if k in files else None}
        print(f"{k:16s} p50 {rows[k]['p50_ms']:7.0f} ms  min {rows[k]['min_ms']:7.0f} ms  "
              f"p50/ORT-FP32 {rows[k]['p50_vs_ort_fp32']:.2f}x  n={len(v)}"
              + (f"  {rows[k]['bytes'] / 1e6:.1f} MB" if rows[k]["bytes"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
