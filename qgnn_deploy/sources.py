"""Resolve a command's SOURCE: a checkpoint, a .qgnn artifact, or ``--preset P --bits B``.

A preset with bits means the embedded trained checkpoint where one ships
(``qgnn_deploy/assets/<preset>-w<bits>.pt``: ``tiny-w{32,4,3,2}.pt`` for the DPGN preset
``tiny``, ``egnn-tiny-w{32,4,3,2}.pt`` for the EGNN preset ``egnn-tiny``), else a freshly built model whose
quantizers are calibrated on synthetic episodes under a fixed seed (said on stderr).
``--preset P --bits-config FILE`` is always such a calibrated model, at the per-layer
bits the file resolves to (:mod:`qgnn_deploy.bits_config`). A checkpoint or artifact
carries its own bits: ``--bits`` / ``--bits-config`` with one is an error.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import LayerBits

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CALIBRATION_SEED = 0
CALIBRATION_TASKS = 8


@dataclass
class Source:
    """What a SOURCE names. ``kind`` is ``"checkpoint"``, ``"artifact"`` or ``"preset"``."""

    kind: str
    path: Optional[str] = None
    preset: Optional[str] = None
    bits: Optional[int] = None
    bits_config: Optional[str] = None  # the --bits-config file of a preset
    layer_bits: Dict[str, LayerBits] = field(default_factory=dict)  # what it resolved to

    @property
    def label(self) -> str:
        if self.path:
            return self.path
        if self.bits_config:
            return f"--preset {self.preset} --bits-config {self.bits_config}"
        return f"--preset {self.preset} --bits {self.bits}"


def embedded_checkpoint(preset: str, bits: int) -> Optional[str]:
    path = os.path.join(ASSETS, f"{preset}-w{bits}.pt")
    return path if os.path.isfile(path) else None


def parse_source(args) -> Source:
    """From argparse args with ``source``, ``preset``, ``bits``, ``bits_config`` (see
    cli.add_source_arguments); a bits-config is read and resolved here, before any work."""
    path, preset, bits = getattr(args, "source", None), getattr(args, "preset", None), getattr(args, "bits", None)
    bits_config = getattr(args, "bits_config", None)
    if path and preset:
        raise ConfigError("give either a SOURCE file or --preset/--bits, not both")
    if bits is not None and bits_config:
        raise ConfigError("give --bits (one bit-width) or --bits-config (per layer), not both")
    if preset:
        from .config import check_bits, preset_config
        config = preset_config(preset)  # validates the name
        if bits_config:
            from .bits_config import load_bits_config, resolve_bits
            resolved = resolve_bits(load_bits_config(bits_config), config)
            return Source("preset", preset=preset, bits=resolved.bits, bits_config=bits_config,
                          layer_bits=resolved.layer_bits)
        return Source("preset", preset=preset, bits=check_bits(32 if bits is None else bits, "--bits"))
    if not path:
        raise ConfigError("no SOURCE: give a checkpoint, a .qgnn file, or --preset P --bits B")
    if bits is not None or bits_config:
        raise ConfigError(f"--{'bits' if bits is not None else 'bits-config'} only goes with --preset: "
                          "a file carries its own per-layer bit-widths (`qgnn-deploy report FILE` lists them)")
    if not os.path.exists(path):
        raise ConfigError(f"SOURCE {path!r} does not exist")
    kind = "artifact" if path.endswith(".qgnn") else "checkpoint"
    return Source(kind, path=path)


def load_float_model(src: Source, quiet: bool = False):
    """The (fake-quant or FP) model a checkpoint or preset names (DPGN :class:`QGNNModel` or
    :class:`~qgnn_deploy.models.egnn.EGNNModel`, by its family), in eval mode."""
    from .checkpoint import load_checkpoint
    if src.kind == "artifact":
        raise ConfigError(f"{src.path!r} is an integer model; this needs a checkpoint or a preset")
    if src.kind == "checkpoint":
        return load_checkpoint(src.path).eval()
    if src.layer_bits:
        return calibrated_model(src.preset, src.bits, quiet=quiet, layer_bits=src.layer_bits)
    emb = embedded_checkpoint(src.preset, src.bits)
    if emb:
        return load_checkpoint(emb).eval()
    return calibrated_model(src.preset, src.bits, quiet=quiet)


def calibrated_model(preset: str, bits: int, quiet: bool = False, seed: int = CALIBRATION_SEED,
                     **overrides):
    """A fresh model of ``preset`` at ``bits`` (config fields ``overrides``, e.g. shot=5) whose
    PQ ranges are set by one forward pass over synthetic episodes (fixed seed), in eval mode."""
    import torch
    from .config import preset_config
    from .data import calibration_episodes
    from .models import build_model
    config = preset_config(preset, bits, **overrides)
    torch.manual_seed(seed)
    model = build_model(config)
    images, labels = calibration_episodes(config, tasks=CALIBRATION_TASKS, seed=seed)
    if not quiet:
        what = "with per-layer bits" if config.layer_bits else f"--bits {bits}"
        print(f"note: no trained checkpoint ships for --preset {preset} {what}; using a fresh "
              f"model calibrated on {CALIBRATION_TASKS} synthetic episodes (seed {seed})", file=sys.stderr)
    # BN statistics from the calibration batch (cumulative average, no dropout), PQ ranges
    # from the same pass.
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
        elif isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
    with torch.no_grad():
        model(images, labels)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model.eval()
