"""``qgnn-deploy run SOURCE --backend B``: few-shot accuracy of a model on one engine.

Backends: ``reference`` / ``cpu`` / ``triton`` (the IntModel on that op backend),
``onnx`` (the exported graph in onnxruntime), ``torch`` (the float / fake-quant
model; needs a checkpoint or preset). A checkpoint or preset SOURCE is folded in
memory (exact offsets). For every backend but ``reference`` the reference engine also
runs on the same episodes and ``agreement_with_reference`` /
``max_logit_diff_vs_reference`` are reported, with ``verdict`` (``pass``,
``layerwise-only``, ``fail``: see :func:`qgnn_deploy.fold.parity_verdict`).
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import add_source_arguments
    add_source_arguments(p)
    p.add_argument("--backend", choices=("auto", "reference", "cpu", "cpu-eager", "triton", "onnx", "torch"),
                   default="auto", help="engine to run (default auto: triton with a CUDA GPU, "
                   "else cpu when the C++ extension is built, else reference)")
    p.add_argument("--episodes", type=int, default=100, help="evaluation episodes (default 100)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch, cpu, onnx)")
    p.add_argument("--seed", type=int, default=0, help="episode seed")
    p.add_argument("--dataset", default="synthetic", help="evaluation data set (default synthetic)")
    p.add_argument("--data-dir", default=None, help="data directory for real data sets")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _predictor(backend: str, int_model, float_model, threads):
    """``predict(images, support) -> logits`` for ``backend``."""
    import torch

    from ..errors import ConfigError
    if backend == "torch":
        if float_model is None:
            raise ConfigError("--backend torch runs the float / fake-quant model: give a checkpoint "
                              "or --preset, not a .qgnn file")
        from ..evaluate import model_predict
        return model_predict(float_model.eval())
    if backend == "onnx":
        from ..backends.onnx import OnnxSession
        sess = OnnxSession(int_model, threads=threads)
        return lambda images, support: sess(images, support)
    from ..backends import backend_module
    backend_module(backend)  # BackendUnavailableError with the fix, before any work
    if backend in ("cpu", "cpu-eager") and threads:
        mod = backend_module("cpu")
        if hasattr(mod, "set_num_threads"):
            mod.set_num_threads(threads)
    int_model.backend = backend
    # triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1
    device = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    model = int_model.to(device)

    def predict(images, support):
        return model(images.to(device), support.to(device)).logits.cpu()
    return predict


def _cpu_isa(backend: str):
    """The ISA path the cpu kernels ran on (None for other backends)."""
    if backend not in ("cpu", "cpu-eager"):
        return None
    from ..backends import backend_module
    return backend_module("cpu").active_isa()


def run(args) -> int:
    import copy

    import torch

    from ..artifact import load_int_model
    from ..errors import ConfigError
    from ..evaluate import evaluate
    from ..fold import compare_engines, fold
    from ..sources import load_float_model, parse_source

    if args.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {args.episodes}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.backend == "auto":
        from ..backends import default_backend
        args.backend = default_backend()
    src = parse_source(args)
    float_model = None
    if src.kind == "artifact":
        int_model = load_int_model(src.path)
    else:
        float_model = load_float_model(src)
        int_model = fold(float_model)
    config = int_model.config
    kw = dict(episodes=args.episodes, seed=args.seed, dataset=args.dataset, data_dir=args.data_dir,
              return_logits=True)
    predict = _predictor(args.backend, copy.deepcopy(int_model) if args.backend != "reference" else int_model,
                         float_model, args.threads)
    if float_model is not None and args.backend == "torch" and int_model.generations != config.generations:
        raise ConfigError("pruned generations are not supported with --backend torch")
    res = evaluate(predict, config, desc=args.backend, **kw)
    out = {"backend": args.backend, "source": src.label, "episodes": res["episodes"],
           "queries": res["queries"], "accuracy": res["accuracy"], "ci95": res["ci95"],
           "seconds": res["seconds"], "threads": torch.get_num_threads(),
           "generations": int_model.generations, "zero_point": int_model.zero_point,
           "isa": _cpu_isa(args.backend)}
    if args.backend != "reference":
        int_model.backend = "reference"
        ref = evaluate(lambda i, s: int_model(i, s).logits, config, desc="reference", **kw)
        cmp = compare_engines(ref["logits"], res["logits"])
        out.update(agreement_with_reference=cmp["agreement"],
                   max_logit_diff_vs_reference=cmp["max_logit_diff"],
                   reference_accuracy=ref["accuracy"])
        out["verdict"] = _verdict(args, cmp, int_model, float_model)
    if args.json:
        print(json.dumps(out))
    else:
        line = (f"{args.backend}: accuracy {out['accuracy']:.4f} +- {out['ci95']:.4f} on "
                f"{out['episodes']} episodes ({out['seconds']:.1f} s)")
        if "agreement_with_reference" in out:
            line += (f"; vs reference: agreement {out['agreement_with_reference']:.4f}, max |logit "
                     f"diff| {out['max_logit_diff_vs_reference']:.3g}, verdict {out['verdict']}")
        print(line)
    return 0


def _verdict(args, cmp, int_model, float_model) -> str:
    """``fold.parity_verdict`` of the cross-backend check. Where the episode bars are missed,
    the layer-wise diagnosis: ``torch`` -- every folded layer fed the fake-quant layer's
    input (``fold.layerwise_parity``); ``onnx`` -- the export with its FP32 layers resynced
    to the reference (``export --check``); the integer kernels must match outright."""
    from ..data import episode_batches
    from ..fold import episode_parity_ok, fake_quant_counterpart, layerwise_parity_batches, parity_verdict
    episode_ok = episode_parity_ok(cmp["agreement"], cmp["max_logit_diff"])
    if episode_ok or args.backend not in ("torch", "onnx"):
        return parity_verdict(episode_ok, episode_ok)
    batches = episode_batches(int_model.config, min(args.episodes, 10), args.seed, "test", args.dataset,
                              args.data_dir)
    if args.backend == "torch":
        lw = layerwise_parity_batches(fake_quant_counterpart(float_model, int_model.zero_point,
                                                             int_model.generations), int_model, batches)
        return parity_verdict(False, lw["passed"])
    from ..backends.onnx import export_module
    from qgnn_deploy.export.check import check_parity
    proto, info = export_module().build_onnx(int_model)
    chk = check_parity(int_model, proto, info["code_tensors"], batches, threads=args.threads,
                       float_tensors=info["float_tensors"])
    return parity_verdict(False, chk["resynced"]["passed"])
