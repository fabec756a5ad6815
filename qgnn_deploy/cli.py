"""``qgnn-deploy`` command line (docs/cli.md).

Each subcommand lives in ``qgnn_deploy/commands/<name>.py`` with ``add_arguments(parser)``
and ``run(args) -> int``; this file only dispatches, so ``qgnn-deploy --help`` imports
nothing heavy. Errors derived from :class:`qgnn_deploy.errors.QGNNError` print as one
line without a traceback (``--debug`` shows it) and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "train": "train a FP or QAT (PQ + AQD + SQD) checkpoint",
    "fold": "fold a checkpoint into a packed integer model (.qgnn) and verify it",
    "run": "evaluate a model on few-shot episodes with a backend",
    "export": "export a model to ONNX that stock onnxruntime runs",
    "report": "Bit-FLOPs, parameters and bytes per layer vs the FP32 model",
    "bench": "latency of every backend vs torch FP32 and onnxruntime",
    "quantize": "post-training quantization of an FP checkpoint (PQ ranges calibrated, no training)",
    "select-bits": "per-layer bit-widths under a Bit-FLOPs or bytes budget (sensitivity + search, PTQ)",
    "serve": "serve an integer model over HTTP on Ray Serve (local instance or a cluster)",
    "demo": "the whole pipeline on the embedded default model",
}


def add_source_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """SOURCE: a checkpoint, a .qgnn artifact, or --preset P with --bits B or --bits-config FILE."""
    p.add_argument("source", nargs="?", help="checkpoint (.pt) or integer model (.qgnn)")
    p.add_argument("--preset", help="model preset (tiny, resnet12-cifarfs; EGNN: egnn-tiny, "
                   "egnn-miniimagenet) instead of a file")
    bits = p.add_mutually_exclusive_group()
    bits.add_argument("--bits", type=int, help="bit-width with --preset (2, 3, 4, 8 or 32)")
    bits.add_argument("--bits-config", metavar="FILE.json",
                      help="per-layer weight/activation bits with --preset (docs/mixed-precision.md)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="qgnn-deploy",
        description="Integer inference for Pauta-quantized DPGN few-shot classifiers (QGNN-IC).")
    parser.add_argument("--version", action="version", version=f"qgnn-deploy {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: an unset subcommand flag must not overwrite `qgnn-deploy --debug CMD`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        mod = _command_module(name)
        if mod is not None:
            mod.add_arguments(p)
        p.set_defaults(_command=name)
    return parser


def _command_module(name: str):
    module = f"qgnn_deploy.commands.{name.replace('-', '_')}"  # select-bits -> select_bits
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import QGNNError
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    mod = _command_module(args.command)
    if mod is None:
        print(f"error: '{args.command}' is not available in this build", file=sys.stderr)
        return 2
    try:
        return int(mod.run(args) or 0)
    except QGNNError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
