"""Checkpoints: our QAT/FP models (state dict + config, DPGN or EGNN) and official DPGN / EGNN
FP checkpoints.

Everything is read with ``torch.load(..., weights_only=True)``: a checkpoint can hold
tensors, numbers, strings, lists and dicts, never code.

Our format (``format: "qgnn-deploy/checkpoint"``, version 1)::

    {"format": ..., "version": 1, "config": config.to_dict(),
     "state_dict": {...}, "meta": {...}, optional "optimizer"/"training" entries}

``config`` is a :class:`~qgnn_deploy.config.ModelConfig` dict (DPGN: no ``family`` key) or an
:class:`~qgnn_deploy.models.egnn.EGNNConfig` dict (``"family": "egnn"``);
:func:`qgnn_deploy.config.config_from_dict` dispatches on that key.

Official DPGN format: ``{"enc_module_state_dict", "gnn_module_state_dict",
"iteration", "test_acc", "optimizer"}``, keys possibly prefixed with ``module.``.
Official EGNN format (``khy0809/fewshot-egnn``): the same two state dicts, ``"iteration"``,
``"val_acc"``, ``"optimizer"``; told apart by its graph keys (``edge2node_net0...``,
:func:`~qgnn_deploy.models.egnn.is_official_egnn`).
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch

from .config import ModelConfig, config_family, config_from_dict
from .errors import CheckpointError
from .models import QGNNModel, build_model
from .models.egnn import EGNN_PRESETS, EGNNConfig, EGNNModel, is_official_egnn, load_official_egnn

AnyModel = Union[QGNNModel, EGNNModel]
AnyConfig = Union[ModelConfig, EGNNConfig]

FORMAT = "qgnn-deploy/checkpoint"
VERSION = 1
_QUANT_KEY = re.compile(r"\.(weight_quant|act_quant|adj_quant|node_quant)\.(l|r|initialized)$")


def save_checkpoint(model: AnyModel, path: str, meta: Optional[Dict[str, Any]] = None,
                    **extra: Any) -> str:
    """Write ``model`` (DPGN or EGNN: config + state dict) to ``path`` atomically; returns ``path``."""
    payload = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "meta": dict(meta or {})}
    payload.update(extra)
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str) -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]} "
            "(checkpoints are loaded with weights_only=True; a truncated or non-torch file fails here)"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, expected a dict")
    return obj


def is_official_dpgn(obj: Dict[str, Any]) -> bool:
    """Whether ``obj`` has the official two-state-dict layout and is not an EGNN one."""
    return ("enc_module_state_dict" in obj and "gnn_module_state_dict" in obj
            and not is_official_egnn(obj))


def _family_mismatch(path: str, what: str, config: Any) -> CheckpointError:
    want = "an EGNNConfig (e.g. preset_config('egnn-miniimagenet'))" if what.endswith("EGNN") else \
        "a DPGN ModelConfig (e.g. preset_config('resnet12-cifarfs'))"
    return CheckpointError(f"{path!r} is {what} checkpoint, but the config given is "
                           f"{type(config).__name__} ({config_family(config).upper()}); pass {want}")


def load_checkpoint(path: str, config: Optional[AnyConfig] = None,
                    strict: bool = True) -> AnyModel:
    """Load our checkpoint (DPGN or EGNN, by its recorded config), or an official DPGN /
    EGNN one (then ``config`` gives the model; default: the ``resnet12-cifarfs`` preset
    for DPGN, ``egnn-miniimagenet`` for EGNN, at FP32)."""
    obj = read_checkpoint(path)
    if is_official_egnn(obj):
        if config is not None and config_family(config) != "egnn":
            raise _family_mismatch(path, "an official EGNN", config)
        return load_official_egnn(obj, config or EGNN_PRESETS["egnn-miniimagenet"], source=path,
                                  strict=strict)
    if is_official_dpgn(obj):
        if config is not None and config_family(config) != "dpgn":
            raise _family_mismatch(path, "an official DPGN", config)
        from .config import preset_config
        return load_official_dpgn(obj, config or preset_config("resnet12-cifarfs"), source=path)
    if obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path!r} is neither a qgnn-deploy checkpoint nor an official DPGN or EGNN checkpoint "
            f"(top-level keys: {sorted(map(str, obj))[:10]}; official files hold "
            "'enc_module_state_dict' and 'gnn_module_state_dict')")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path!r} has checkpoint version {obj.get('version')!r}; "
                              f"this qgnn-deploy reads version {VERSION}")
    try:
        ckpt_config = config_from_dict(obj["config"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path!r} has an invalid model config: {e}") from None
    if config is not None and config_family(config) != config_family(ckpt_config):
        raise _family_mismatch(path, f"a qgnn-deploy {config_family(ckpt_config).upper()}", config)
    model = build_model(config or ckpt_config)
    state = obj.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path!r} has no state_dict")
    _load_state(model, state, path, strict=strict, allow_missing_quant=False)
    model.checkpoint_meta = obj.get("meta", {})
    return model


def _load_state(model: AnyModel, state: Dict[str, Any], source: str, strict: bool,
                allow_missing_quant: bool) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if allow_missing_quant:
        missing = [k for k in missing if not _QUANT_KEY.search(k)]
    unexpected = [k for k in state if k not in own]
    bad_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items()
                 if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    not_tensor = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if strict and (missing or unexpected or bad_shape or not_tensor):
        raise CheckpointError(_mismatch_message(source, missing, unexpected, bad_shape, not_tensor))
    usable = {k: v for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)


def _mismatch_message(source: str, missing: List[str], unexpected: List[str],
                      bad_shape: List[str], not_tensor: List[str]) -> str:
    def show(title: str, keys: List[str]) -> str:
        if not keys:
            return ""
        head = ", ".join(keys[:12])
        more = f" ... (+{len(keys) - 12} more)" if len(keys) > 12 else ""
        return f"\n  {title} ({len(keys)}): {head}{more}"
    return (f"checkpoint {source!r} does not fit the model:"
            + show("missing keys", missing) + show("unexpected keys", unexpected)
            + show("shape mismatches", bad_shape) + show("non-tensor entries", not_tensor)
            + "\n  (check --preset/--bits/way/shot/image size against how it was trained)")


# ------------------------------------------------------------------ official DPGN

_SEQ = re.compile(r"^(.*\.(?:point_sim_transform))\.(\d+)\.(.+)$")


def _strip_module(keys: Iterable[Tuple[str, Any]]) -> Dict[str, Any]:
    return {(k[7:] if k.startswith("module.") else k): v for k, v in keys}


def _sequential_indices(keys: Iterable[str]) -> Dict[str, List[int]]:
    """``{edge-MLP Sequential prefix: the indices of its parameterised layers}``."""
    out: Dict[str, List[int]] = {}
    for k in keys:
        m = _SEQ.match(k)
        if m and int(m.group(2)) not in out.setdefault(m.group(1), []):
            out[m.group(1)].append(int(m.group(2)))
    return out


def _renumber_edge_mlps(gnn_state: Dict[str, Any], model: QGNNModel) -> Dict[str, Any]:
    """Map official edge-MLP Sequential indices onto ours by the order of the
    parameterised layers (conv, BN, conv, BN, conv), whatever dropout shifted them."""
    ours_idx, theirs_idx = _sequential_indices(model.gnn.state_dict()), _sequential_indices(gnn_state)
    out = {}
    for k, v in gnn_state.items():
        m = _SEQ.match(k)
        if not m or m.group(1) not in ours_idx:
            out[k] = v
            continue
        theirs, mine = sorted(theirs_idx[m.group(1)]), sorted(ours_idx[m.group(1)])
        pos = theirs.index(int(m.group(2)))
        new_idx = mine[pos] if pos < len(mine) and len(theirs) == len(mine) else int(m.group(2))
        out[f"{m.group(1)}.{new_idx}.{m.group(3)}"] = v
    return out


def load_official_dpgn(obj: Dict[str, Any], config: ModelConfig, source: str = "<dict>",
                       strict: bool = True) -> QGNNModel:
    """Build a model for ``config`` (FP or quantized) from an official DPGN checkpoint dict.

    In a quantized model the PQ ranges are absent from the checkpoint and are
    initialised from the first batch (the QAT starting point).
    """
    for part in ("enc_module_state_dict", "gnn_module_state_dict"):
        if not isinstance(obj.get(part), dict):
            raise CheckpointError(f"{source!r}: {part} is missing or not a dict")
    model = build_model(config)
    enc = _strip_module(obj["enc_module_state_dict"].items())
    gnn = _renumber_edge_mlps(_strip_module(obj["gnn_module_state_dict"].items()), model)
    state = {f"backbone.{k}": v for k, v in enc.items()}
    state.update({f"gnn.{k}": v for k, v in gnn.items()})
    _load_state(model, state, source, strict=strict, allow_missing_quant=True)
    model.checkpoint_meta = {"source": "official-dpgn", "iteration": obj.get("iteration"),
                             "test_acc": obj.get("test_acc")}
    return model


def to_official_dpgn(model: QGNNModel) -> Dict[str, Any]:
    """The official DPGN layout of ``model``'s FP weights (quantizer ranges dropped)."""
    enc, gnn = {}, {}
    for k, v in model.state_dict().items():
        if _QUANT_KEY.search(k):
            continue
        if k.startswith("backbone."):
            enc[k[len("backbone."):]] = v.clone()
        elif k.startswith("gnn."):
            gnn[k[len("gnn."):]] = v.clone()
    return {"enc_module_state_dict": enc, "gnn_module_state_dict": gnn, "iteration": 0,
            "test_acc": 0.0, "optimizer": {}}
