"""The ``onnx`` whole-model backend: the ONNX export run in stock onnxruntime.

::

    sess = OnnxSession(int_model, threads=2)          # builds (or reuses) the export
    logits = sess(images, support_labels)             # torch float32 [T, queries, way]
    fp = OnnxSession.from_float(qat_or_fp_model)      # the FP32 export, for baselines
    sess.path, sess.bytes                             # the file and its size

Exports are cached on disk under ``cache_dir`` (default ``$QGNN_CACHE_DIR`` or
``~/.cache/qgnn-deploy/onnx``), keyed by a SHA-256 of the package version, the export
options and the model's content (every buffer / parameter and every scalar attribute
of every module), so a changed model never reuses a stale file.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..errors import BackendUnavailableError, InputError

def export_module():
    """``qgnn_deploy.export``, imported on first use (it imports onnx)."""
    try:
        return importlib.import_module("qgnn_deploy.export")
    except ModuleNotFoundError as e:
        if e.name != "qgnn_deploy.export":
            raise
        raise BackendUnavailableError("qgnn_deploy.export is not installed; reinstall qgnn-deploy "
                                      "(`pip install -e .` from the repository)") from None


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError(f"the onnx backend needs onnxruntime ({e}); "
                                      "`pip install onnxruntime`") from None
    return onnxruntime


def default_cache_dir() -> str:
    return os.environ.get("QGNN_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "qgnn-deploy", "onnx")


def _scalar_attrs(m: torch.nn.Module) -> Dict[str, Any]:
    return {k: v for k, v in sorted(vars(m).items())
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, type(None)))}


def model_fingerprint(model: torch.nn.Module, options: Dict[str, Any]) -> str:
    """SHA-256 over the package version, ``options``, the config and the model content."""
    from .. import __version__
    h = hashlib.sha256()
    try:
        export_format = getattr(export_module(), "EXPORT_FORMAT", None)
    except Exception:  # noqa: BLE001 - the key must not fail where the export would
        export_format = None
    head = {"version": __version__, "export_format": export_format,
            "type": type(model).__name__, "options": options,
            "config": model.config.to_dict() if hasattr(model, "config") else None,
            "generations": getattr(model, "generations", None),
            "zero_point": getattr(model, "zero_point", None)}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name, m in model.named_modules():
        h.update(name.encode())
        h.update(json.dumps(_scalar_attrs(m), sort_keys=True, default=str).encode())
        for pname, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            h.update(pname.encode())
            if t is None:
                continue
            t = t.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def float_counterpart(model: torch.nn.Module) -> torch.nn.Module:
    """The FP32 model (DPGN :class:`QGNNModel` or :class:`EGNNModel`, as ``model``) with
    ``model``'s float weights (a fake-quant model loses its quantizers; an FP32 model is
    returned as is)."""
    from ..models import EGNNModel, QGNNModel, build_model, has_quantized_layers
    if not isinstance(model, (QGNNModel, EGNNModel)):
        raise InputError(f"an FP32 export needs a QGNNModel or an EGNNModel (checkpoint), got "
                         f"{type(model).__name__}")
    if not has_quantized_layers(model):
        return model
    fp = build_model(model.config.replace(bits=32, layer_bits={}))
    state = {k: v for k, v in model.state_dict().items() if k in fp.state_dict()}
    fp.load_state_dict(state, strict=True)
    return fp.eval()


class OnnxSession:
    """An exported model in an onnxruntime ``InferenceSession``.

    Args:
        model: an :class:`~qgnn_deploy.intmodel.IntModel` (any family), a ``QGNNModel`` or an
            ``EGNNModel`` (FP32, or fake-quant: folded first with ``zero_point``), or a path to
            an ``.onnx`` file.
        threads: onnxruntime intra-op threads (None: onnxruntime's default, all cores).
        cache_dir: where exports are cached (None: :func:`default_cache_dir`; ``False``
            disables the cache and exports to a temporary file).
        **export_options: passed to ``export_onnx`` (``form``, ``weights_format``,
            ``opset``, ``zero_point``).
    """

    def __init__(self, model, threads: Optional[int] = None, cache_dir=None, **export_options):
        ort = _ort()
        self.threads = threads
        self.info: Dict[str, Any] = {}
        if isinstance(model, (str, os.PathLike)):
            self.path = os.fspath(model)
            if not os.path.isfile(self.path):
                raise InputError(f"ONNX file {self.path!r} does not exist")
        else:
            self.path = self._build(model, cache_dir, export_options)
        self.bytes = os.path.getsize(self.path)
        so = ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            raise BackendUnavailableError(f"onnxruntime cannot load {self.path!r}: {e}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k: meta[k] for k in meta}
        cfg = self.metadata.get("qgnn_deploy.config")
        from ..config import config_from_dict
        from ..errors import QGNNError
        try:
            self.config = config_from_dict(json.loads(cfg)) if cfg else getattr(model, "config", None)
        except (ValueError, QGNNError) as e:
            raise InputError(f"{self.path!r}: its 'qgnn_deploy.config' metadata is not a valid model "
                             f"config ({e}); re-export the model") from None

    @classmethod
    def from_float(cls, model, threads: Optional[int] = None, cache_dir=None) -> "OnnxSession":
        """The FP32 export of ``model``'s float weights (baseline for latency and size)."""
        return cls(float_counterpart(model), threads=threads, cache_dir=cache_dir)

    def _build(self, model, cache_dir, options: Dict[str, Any]) -> str:
        exp = export_module()
        opts = exp.ExportOptions(**options).validate()
        key = model_fingerprint(model, vars(opts))
        if cache_dir is False:
            import tempfile
            d = tempfile.mkdtemp(prefix="qgnn-onnx-")
        else:
            d = cache_dir or default_cache_dir()
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{key[:32]}.onnx")
        info_path = path + ".json"
        if os.path.isfile(path) and os.path.isfile(info_path):
            with open(info_path) as f:
                self.info = json.load(f)
            self.info["cached"] = True
            return path
        self.info = exp.export_onnx(model, path, **vars(opts))
        tmp = f"{info_path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.info, f)
        os.replace(tmp, info_path)
        self.info["cached"] = False
        return path

    def run_numpy(self, images: np.ndarray, support_labels: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"images": images, "support_labels": support_labels})[0]

    def __call__(self, images, support_labels) -> torch.Tensor:
        """images float32 [T, N, 3, S, S], support_labels int [T, way*shot] -> logits
        float32 torch [T, queries, way] (one query per class: queries = way)."""
        images = torch.as_tensor(images)
        support_labels = torch.as_tensor(support_labels)
        if self.config is not None:
            from ..models.qgnn import check_episode
            check_episode(images, support_labels, self.config)
        x = images.detach().cpu().float().contiguous().numpy()
        lab = support_labels.detach().cpu().long().contiguous().numpy()
        return torch.from_numpy(self.run_numpy(x, lab))

    def __repr__(self) -> str:
        return (f"OnnxSession({self.path!r}, {self.bytes} bytes, threads={self.threads}, "
                f"kind={self.metadata.get('qgnn_deploy.kind')}, form={self.metadata.get('qgnn_deploy.form')})")


__all__ = ["OnnxSession", "export_module", "model_fingerprint", "float_counterpart", "default_cache_dir"]
