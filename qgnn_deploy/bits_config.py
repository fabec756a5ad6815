"""Per-layer weight / activation bit-widths from a JSON file (``--bits-config``).

The file (docs/mixed-precision.md)::

    {"default": {"w": 4, "a": 4},
     "layers": {"backbone.layer1.*":   {"w": 2, "a": 4},
                "gnn.*aggregation":    {"w": 8, "a": 3},
                "gnn.*point_sim*.0":   {"w": 3, "a": 2}}}

``w`` is the weight bit-width, ``a`` the input activation's; for a graph aggregation
``A @ V``, ``w`` is the adjacency ``A`` and ``a`` the node features ``V``. Each in
{2, 3, 4, 8}; 32 (FP32) only for both together. ``default`` applies to every quantizable
layer (absent: the model's own bits, FP32 for a preset); the ``layers`` patterns are
``fnmatch`` globs (case-sensitive; ``*`` crosses dots) on qualified layer names, applied in
file order, so a later match wins. A pattern that matches no quantizable layer, an unknown
key or a bit-width outside the set is a :class:`~qgnn_deploy.errors.ConfigError` naming it.

:func:`resolve_bits` is the one place a bits-config becomes a model configuration: the
result lists every quantizable layer in ``layer_bits``, so checkpoints and artifacts
record the resolved bits of each layer.
"""
from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .config import LayerBits, ModelConfig, check_layer_bits
from .errors import ConfigError

BITS_CONFIG_KEYS = ("default", "layers")


@dataclass(frozen=True)
class BitsConfig:
    """A checked bits-config: the default pair (None: the model's own) and the
    ``(pattern, bits)`` rules in file order."""

    default: Optional[LayerBits]
    layers: Tuple[Tuple[str, LayerBits], ...]


def _pair(value: Any, what: str) -> LayerBits:
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be an object {{\"w\": bits, \"a\": bits}}, got {value!r}")
    return check_layer_bits(value, what)


def parse_bits_config(obj: Any) -> BitsConfig:
    """Check the form of a parsed bits-config (a JSON object); ConfigError names the problem."""
    if not isinstance(obj, dict):
        raise ConfigError(f"a bits-config must be a JSON object with {list(BITS_CONFIG_KEYS)}, "
                          f"got a {type(obj).__name__}")
    unknown = sorted(set(obj) - set(BITS_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown bits-config key(s) {unknown}; the keys are {list(BITS_CONFIG_KEYS)}")
    default = _pair(obj["default"], "default") if "default" in obj else None
    layers = obj.get("layers", {})
    if not isinstance(layers, dict):
        raise ConfigError(f"bits-config 'layers' must be an object {{pattern: {{\"w\", \"a\"}}}}, "
                          f"got {layers!r}")
    return BitsConfig(default, tuple((str(pat), _pair(b, f"layers[{pat!r}]")) for pat, b in layers.items()))


def load_bits_config(path: str) -> Dict[str, Any]:
    """The JSON object of bits-config file ``path``, its form checked (errors name the file)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--bits-config {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--bits-config {path!r} is not valid JSON: {e}") from None
    try:
        parse_bits_config(obj)
    except ConfigError as e:
        raise ConfigError(f"--bits-config {path!r}: {e}") from None
    return obj


def quantizable_layer_names(config: ModelConfig) -> List[str]:
    """Qualified names of the layers of ``config``'s model that may be quantized."""
    import torch

    from .models import build_model, quantizable_layers
    with torch.device("meta"):  # names only: no weights allocated, the RNG untouched
        model = build_model(config.replace(bits=32, layer_bits={}))
    return list(quantizable_layers(model))


def resolve_bits(config_json: Dict[str, Any], model_config: ModelConfig) -> ModelConfig:
    """``model_config`` with the bits of bits-config ``config_json``: ``bits`` = the
    default's weight bits, ``layer_bits`` = the resolved pair of every quantizable layer."""
    rules = parse_bits_config(config_json)
    names = quantizable_layer_names(model_config)
    unmatched = [pat for pat, _ in rules.layers if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    if unmatched:
        raise ConfigError(f"bits-config pattern(s) {unmatched} match no quantizable layer; names look "
                          f"like {names[0]!r}, {names[-1]!r} ({len(names)} layers; the stem conv and "
                          "the last conv of each edge MLP stay FP32 and are not listed)")
    table: Dict[str, LayerBits] = {}
    for name in names:
        bits = rules.default or model_config.bits_for(name)
        for pat, b in rules.layers:
            if fnmatch.fnmatchcase(name, pat):
                bits = b
        table[name] = bits
    default = rules.default or LayerBits(model_config.bits, model_config.bits)
    return model_config.replace(bits=default.w, layer_bits=table)


__all__ = ["BitsConfig", "BITS_CONFIG_KEYS", "load_bits_config", "parse_bits_config",
           "quantizable_layer_names", "resolve_bits"]
