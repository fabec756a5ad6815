"""``qgnn-deploy export``: write the whole episode as ONNX that stock onnxruntime runs.

Examples::

    qgnn-deploy export model.qgnn --out model.onnx --check --json
    qgnn-deploy export --preset tiny --bits 4 --zero-point snap --form qdq --out w4.onnx
    qgnn-deploy export fp.pt --out fp32.onnx                # an FP32 checkpoint
    qgnn-deploy export w4.pt --fp32 --out baseline.onnx      # a QAT model's float weights
    qgnn-deploy export w4.pt --triton-repo models --json     # models/w4/{config.pbtxt,1/model.onnx}
    qgnn-deploy export --preset egnn-tiny --bits 4 --out egnn.onnx   # either model family

A ``.qgnn`` artifact exports as is; a fake-quant checkpoint / preset is folded first
(``--zero-point``); an FP32 model exports as float. ``--check`` runs the export in
onnxruntime next to the reference engine on sample episodes and prints the parity
figures (``--json``: one JSON object on stdout; notes go to stderr). The exit status
is 1 when the check fails its bars (docs/integer-contract.md). Every result says which
runtimes run the file (``portability``: its op domains, contrib ops, and the runtimes
known to run the form). ``--triton-repo DIR`` also (or instead of ``--out``) writes a
Triton Inference Server model repository, ``DIR/NAME/config.pbtxt`` + ``DIR/NAME/1/model.onnx``
(``qgnn_deploy.export.triton_repo``; docs/onnx.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import add_source_arguments
    add_source_arguments(p)
    p.add_argument("--out", help="the .onnx file to write (this, --triton-repo, or both)")
    p.add_argument("--triton-repo", metavar="DIR",
                   help="also write a Triton model repository: DIR/NAME/config.pbtxt and "
                        "DIR/NAME/1/model.onnx")
    p.add_argument("--model-name", help="the Triton model name (default: the stem of SOURCE; "
                                        "'qgnn' for a preset)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="Triton max_batch_size: the most tasks (episodes) one batch holds "
                        "(default 64)")
    p.add_argument("--max-queue-delay-us", type=int, default=None,
                   help="Triton dynamic batching: how long a request may wait for others "
                        "(microseconds, default 500)")
    p.add_argument("--instance-kind", choices=["auto", "cpu", "gpu", "both"],
                   help="Triton instance_group: KIND_AUTO (GPU where the server has one, else "
                        "CPU: valid on every server), KIND_CPU, KIND_GPU, or a CPU and a GPU "
                        "group ('both'; gpu and both load only on a server that sees a GPU); "
                        "default auto")
    p.add_argument("--form", default="auto", choices=["auto", "integer", "fast", "standard", "qdq"],
                   help="integer layers as channels-last MatMulInteger + the contract's fp32 "
                        "epilogue ('integer', bit-exact), the same with merged epilogue constants on "
                        "snapped layers ('fast', = auto: the fastest; codes identical up to fp32 "
                        "ties) -- both use onnxruntime contrib ops, so only onnxruntime runs them --, "
                        "the integer form in standard ONNX ops only ('standard', bit-exact in "
                        "onnxruntime, for other runtimes too), or QCDQ + float conv ('qdq', snapped "
                        "offsets only)")
    p.add_argument("--weights-format", default="native", choices=["native", "uint8"],
                   help="'native': 4-bit weights as UINT4 (opset 21), 2-bit as UINT2 (opset 25), "
                        "3-bit in UINT8; 'uint8': every code in a UINT8 container")
    p.add_argument("--opset", type=int, help="ONNX opset (default 21, or 25 for UINT2 weights)")
    p.add_argument("--zero-point", default="exact", choices=["exact", "snap"],
                   help="how a fake-quant checkpoint is folded before export")
    p.add_argument("--fp32", action="store_true",
                   help="export the float model (a fake-quant model's float weights) instead")
    p.add_argument("--check", action="store_true",
                   help="compare the export in onnxruntime with the reference engine")
    p.add_argument("--episodes", type=int, default=20, help="episodes for --check")
    p.add_argument("--seed", type=int, default=0, help="episode seed for --check")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads for --check")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _load(args, src):
    """(model to export, IntModel for --check or None) of the parsed SOURCE ``src``."""
    from ..sources import load_float_model
    if src.kind == "artifact":
        if args.fp32:
            from ..errors import ConfigError
            raise ConfigError("--fp32 needs a checkpoint or a preset, not a .qgnn integer model")
        from ..artifact import load_int_model
        im = load_int_model(src.path)
        return im, im
    model = load_float_model(src, quiet=args.json)
    from ..backends.onnx import float_counterpart
    from ..models import has_quantized_layers
    quantized = has_quantized_layers(model)
    if args.fp32 or not quantized:
        return float_counterpart(model), None
    from ..fold import fold
    im = fold(model, zero_point=args.zero_point)
    return im, im


_TRITON_FLAGS = ("model_name", "max_batch_size", "max_queue_delay_us", "instance_kind")


def _triton_target(args, src):
    """The checked Triton options (model dir free to write, name, batch size...) as a dict,
    or None without --triton-repo; raises ConfigError before anything slow runs."""
    from ..errors import ConfigError
    if not args.triton_repo:
        given = [f"--{f.replace('_', '-')}" for f in _TRITON_FLAGS if getattr(args, f) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only meaningful with --triton-repo DIR")
        return None
    from qgnn_deploy.export import triton_repo
    name = args.model_name
    if name is None:
        name = "qgnn" if src.kind == "preset" else os.path.splitext(os.path.basename(src.path))[0]
    target = {"repo_dir": args.triton_repo, "model_name": name,
              "max_batch_size": triton_repo.DEFAULT_MAX_BATCH_SIZE if args.max_batch_size is None
              else args.max_batch_size,
              "max_queue_delay_us": triton_repo.DEFAULT_QUEUE_DELAY_US if args.max_queue_delay_us is None
              else args.max_queue_delay_us,
              "instance_kind": args.instance_kind or "auto"}
    triton_repo.check_options(target["max_batch_size"], target["max_queue_delay_us"],
                              target["instance_kind"])
    triton_repo.check_target(target["repo_dir"], name)
    return target


def run(args) -> int:
    from ..backends.onnx import export_module
    from ..errors import ConfigError
    from ..sources import parse_source
    exp = export_module()
    if not args.out and not args.triton_repo:
        raise ConfigError("nothing to write: give --out FILE.onnx, --triton-repo DIR, or both")
    if args.check and args.episodes < 1:
        raise ConfigError("--episodes must be >= 1")
    src = parse_source(args)  # a bits-config is resolved here, once
    triton = _triton_target(args, src)
    model, int_model = _load(args, src)
    opts = dict(form=args.form, weights_format=args.weights_format, opset=args.opset,
                zero_point=args.zero_point)
    proto, info = exp.build_onnx(model, **opts)
    data = proto.SerializeToString()
    if args.out:
        exp.write_bytes_atomic(args.out, data)
    repo = None
    if triton is not None:
        from qgnn_deploy.export.triton_repo import write_triton_repo
        description = (f"source: {src.label}; {info['kind']} export, form {info['form']}, "
                       f"opset {info['opset']}, IR {proto.ir_version}\n"
                       f"runs on: {info['portability']['runtimes']}")
        repo = write_triton_repo(onnx_bytes=data, description=description, **triton)
    code_tensors = info.pop("code_tensors", {})
    float_tensors = info.pop("float_tensors", {})
    result = {"source": src.label, "out": args.out or repo["model_file"], "bytes": len(data),
              "ir_version": proto.ir_version, **info}
    if repo is not None:
        result["triton_repo"] = repo
    result["layer_bits"] = len(info.get("layer_bits") or {})  # count; the file has the table
    status = 0
    if args.check:
        if int_model is None:
            result["check"] = _check_float(model, proto, args)
        else:
            from ..data import episode_batches
            batches = episode_batches(int_model.config, args.episodes, seed=args.seed)
            from qgnn_deploy.export.check import check_parity
            chk = check_parity(int_model, proto, code_tensors, batches, threads=args.threads,
                               float_tensors=float_tensors)
            result["check"] = chk
        # "layerwise-only": every integer layer is exact once the FP32 layers' outputs are
        # shared; the free-running gap comes from rounding-tie flips the model amplifies
        verdict = result["check"].get("verdict", "pass" if result["check"]["passed"] else "fail")
        status = 0 if verdict in ("pass", "layerwise-only") else 1
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"wrote {result['out']}: {result['bytes']} bytes, {result['kind']} ({result['form']}), "
              f"opset {result['opset']}, IR {result['ir_version']}")
        if repo is not None:
            print(f"wrote Triton model repository {repo['path']}: model {repo['model_name']!r} "
                  f"({repo['config']}, {repo['model_file']}), max_batch_size {repo['max_batch_size']}, "
                  f"instance groups {', '.join(repo['instance_groups'])}")
        print(f"runs on: {result['portability']['runtimes']}")
        if args.check:
            c = result["check"]
            print(f"check vs {'torch FP32' if int_model is None else 'the reference engine'}: "
                  f"{c['episodes']} episodes, agreement {c['agreement']:.4f}, "
                  f"max |logit diff| {c['max_logit_diff']:.3g}"
                  + (f", code mismatches {c['code_mismatches']}/{c['code_elements']}"
                     if 'code_mismatches' in c else "")
                  + (" -- PASSED" if c["passed"] else " -- FAILED"))
            if c.get("verdict") == "layerwise-only":
                print(f"  integer layers exact when fed the export's FP32-layer outputs; the gap starts "
                      f"at {c.get('first_mismatch_layer')} from an fp32 rounding tie in an FP32 layer")
    if status:
        print("error: the export does not meet the parity bars", file=sys.stderr)
    return status


def _check_float(model, proto, args):
    """FP32 export vs torch FP32 (bar: max |logit diff| <= 1e-4)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from ..data import episode_batches
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if args.threads:
        so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    episodes = queries = same = 0
    max_diff = 0.0
    for images, labels, _ in episode_batches(model.config, args.episodes, seed=args.seed):
        with torch.no_grad():
            ref = model(images, labels).logits.numpy()
        got = sess.run(["logits"], {"images": images.numpy(), "support_labels": labels.numpy()})[0]
        episodes += ref.shape[0]
        queries += ref.shape[0] * ref.shape[1]
        same += int((got.argmax(-1) == ref.argmax(-1)).sum())
        max_diff = max(max_diff, float(np.abs(got - ref).max()))
    agreement = same / max(queries, 1)
    return {"reference": "torch-fp32", "episodes": episodes, "queries": queries,
            "agreement": agreement, "identical_predictions": same == queries,
            "max_logit_diff": max_diff, "passed": bool(max_diff <= 1e-4)}
