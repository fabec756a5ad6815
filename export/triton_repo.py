"""A Triton Inference Server model repository for an ONNX export (``export --triton-repo``).

Layout written (``DIR`` is what ``tritonserver --model-repository DIR`` reads)::

    DIR/
      NAME/                  one model; NAME is also ``name:`` in the config
        config.pbtxt         ModelConfig in protobuf text format (header comment first)
        1/                   version 1, the only one served (version_policy latest 1)
          model.onnx         the same bytes ``export --out`` writes

The config's inputs and outputs are read from the ONNX graph, never assumed. Every graph
input and output of our export has the episode (``tasks``) axis as dim 0, a symbolic
dim, so Triton batches along it: ``max_batch_size`` > 0 and ``dims`` without dim 0::

    images         float32 [tasks, N, 3, S, S]  -> TYPE_FP32  dims [N, 3, S, S]
    support_labels int64   [tasks, way*shot]    -> TYPE_INT64 dims [way*shot]
    logits         float32 [tasks, queries, way] -> TYPE_FP32 dims [queries, way]

A fixed dim 0 would cap the server at that many tasks per request: :class:`ExportError`.

Instance kinds (Triton core semantics): ``KIND_CPU`` runs anywhere; ``KIND_GPU`` with no
``gpus`` list means every GPU the server sees, and a server without a usable GPU (or a
CPU-only build) refuses to load the model ("has kind KIND_GPU but no GPUs are
available"); ``KIND_AUTO`` becomes GPU instances where GPUs exist, else CPU instances.
``instance_kind``: ``"auto"`` (the default: a valid config on every server), ``"cpu"``,
``"gpu"``, or ``"both"`` (a KIND_CPU and a KIND_GPU group: GPU servers only).

The text is rendered by protobuf itself (``tritonclient``'s ``model_config_pb2`` +
``text_format``) when tritonclient is installed, else by :func:`render_pbtxt`; both
start from the same :func:`config_fields` dict, whose keys are ModelConfig field names.
tritonclient is a test dependency only.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional

from qgnn_deploy.errors import ConfigError, ExportError

from . import write_bytes_atomic

#: first line of every config.pbtxt we write: how a re-export recognises its own output
MARKER = "# qgnn-deploy Triton model config (written by `qgnn-deploy export --triton-repo`)"
CONFIG_FILE = "config.pbtxt"
VERSION = "1"
MODEL_FILE = "model.onnx"  # the onnxruntime backend's default_model_filename
INSTANCE_KINDS = {"auto": ["KIND_AUTO"], "cpu": ["KIND_CPU"], "gpu": ["KIND_GPU"],
                  "both": ["KIND_CPU", "KIND_GPU"]}
DEFAULT_MAX_BATCH_SIZE = 64
#: how long the dynamic batcher holds a request for company: small next to one episode
#: (tiny preset, 4-bit, onnxruntime on one CPU thread: about 6 ms measured)
DEFAULT_QUEUE_DELAY_US = 500
# Triton model names become directory names and URL path segments (/v2/models/NAME)
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# ONNX TensorProto element type -> Triton DataType (the types Triton has)
_TRITON_TYPES = {
    "FLOAT": "TYPE_FP32", "DOUBLE": "TYPE_FP64", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16",
    "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "BOOL": "TYPE_BOOL", "STRING": "TYPE_STRING",
}

_HEADER = """\
# backend "onnxruntime" rather than platform "onnxruntime_onnx": `backend` names Triton's
#   ONNX Runtime backend directly; the platform string is the older alias for it.
# Batching: dim 0 of every tensor is the episode (tasks) axis, symbolic in model.onnx, so
#   max_batch_size > 0 and dims leave it out; one request may carry 1..max_batch_size
#   tasks and the dynamic batcher stacks requests along it. No preferred_batch_size:
#   ONNX Runtime has no per-batch-size engines, the batcher takes what the delay gathers.
# instance_group: KIND_CPU runs on any server; KIND_GPU needs a server that sees a GPU
#   (else the model fails to load); KIND_AUTO is GPU where one exists, else CPU.
"""


def check_model_name(name: str) -> str:
    """``name`` if it can be a Triton model directory (letters, digits, ``_ . -``, not
    starting with a dot); :class:`ConfigError` otherwise."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"model name {name!r} is not usable as a Triton model directory: use "
                          "letters, digits, '_', '.', '-', no path separators, not starting with '.' "
                          "(--model-name)")
    return name


def check_options(max_batch_size: int, max_queue_delay_us: int, instance_kind: str) -> None:
    """:class:`ConfigError` unless ``max_batch_size`` >= 1, ``max_queue_delay_us`` >= 0
    (integers) and ``instance_kind`` is a key of :data:`INSTANCE_KINDS`."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if not is_int(max_batch_size) or max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be an integer >= 1 (the most tasks per batch), "
                          f"got {max_batch_size!r}")
    if not is_int(max_queue_delay_us) or max_queue_delay_us < 0:
        raise ConfigError(f"--max-queue-delay-us must be an integer >= 0, got {max_queue_delay_us!r}")
    if instance_kind not in INSTANCE_KINDS:
        raise ConfigError(f"--instance-kind must be one of {sorted(INSTANCE_KINDS)}, got {instance_kind!r}")


def check_target(repo_dir: str, model_name: str) -> str:
    """The model directory ``repo_dir/model_name`` if writing there loses no user file:
    absent, empty, or an earlier repository of ours (its config.pbtxt starts with
    :data:`MARKER`). :class:`ConfigError` otherwise. Nothing is created."""
    check_model_name(model_name)
    if os.path.exists(repo_dir) and not os.path.isdir(repo_dir):
        raise ConfigError(f"--triton-repo {repo_dir!r} exists and is not a directory")
    model_dir = os.path.join(repo_dir, model_name)
    if not os.path.lexists(model_dir):
        return model_dir
    if not os.path.isdir(model_dir) or os.path.islink(model_dir):
        raise ConfigError(f"{model_dir!r} exists and is not a plain directory; remove it or pick "
                          "another --model-name")
    if not os.listdir(model_dir) or _written_by_us(os.path.join(model_dir, CONFIG_FILE)):
        return model_dir
    raise ConfigError(f"{model_dir!r} exists and is not a Triton repository written by qgnn-deploy "
                      f"(no {CONFIG_FILE} starting with our header); refusing to write into it: "
                      "remove it or pick another --model-name / --triton-repo")


def _written_by_us(config_path: str) -> bool:
    try:
        with open(config_path, encoding="utf-8") as f:
            return f.readline().rstrip("\n") == MARKER
    except (OSError, UnicodeDecodeError):
        return False


def graph_io(model) -> Dict[str, List[Dict[str, Any]]]:
    """``{"inputs": [...], "outputs": [...]}`` of an ``onnx.ModelProto``, each
    ``{"name", "data_type" (TYPE_*), "dims" (without dim 0; -1 for a symbolic dim)}``.

    Raises :class:`ExportError` when a tensor's dim 0 is fixed (Triton could then not
    batch tasks) or its element type has no Triton data type."""
    import onnx
    initializers = {t.name for t in model.graph.initializer}  # IR < 4 lists them as inputs
    io: Dict[str, List[Dict[str, Any]]] = {}
    for key, values in (("inputs", [v for v in model.graph.input if v.name not in initializers]),
                        ("outputs", list(model.graph.output))):
        io[key] = []
        for v in values:
            tensor = v.type.tensor_type
            elem = onnx.TensorProto.DataType.Name(tensor.elem_type)
            if elem not in _TRITON_TYPES:
                raise ExportError(f"graph {key[:-1]} {v.name!r} has element type {elem}, "
                                  "which Triton has no data type for")
            dims = list(tensor.shape.dim)
            if not dims:
                raise ExportError(f"graph {key[:-1]} {v.name!r} has no shape: the tasks axis (dim 0) "
                                  "must be a dynamic dim for Triton to batch it")
            if dims[0].HasField("dim_value"):
                raise ExportError(f"graph {key[:-1]} {v.name!r} has a fixed dim 0 of {dims[0].dim_value}: "
                                  "the tasks axis must be dynamic (symbolic) for Triton to batch "
                                  "any number of tasks")
            io[key].append({"name": v.name, "data_type": _TRITON_TYPES[elem],
                            "dims": [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]})
    return io


class _Enum(str):
    """An enum value name (``TYPE_FP32``): written bare in text format, not quoted."""


def config_fields(model, name: str, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                  instance_kind: str = "auto",
                  max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> Dict[str, Any]:
    """The ModelConfig of ``model`` (an ``onnx.ModelProto``) as a dict keyed by
    ModelConfig field names (enum values as :class:`_Enum`); see the module docstring."""
    check_model_name(name)
    check_options(max_batch_size, max_queue_delay_us, instance_kind)
    io = graph_io(model)

    def tensors(entries):
        return [{"name": t["name"], "data_type": _Enum(t["data_type"]), "dims": t["dims"]}
                for t in entries]
    return {
        "name": name,
        "backend": "onnxruntime",
        "max_batch_size": max_batch_size,
        "version_policy": {"latest": {"num_versions": 1}},
        "input": tensors(io["inputs"]),
        "output": tensors(io["outputs"]),
        "dynamic_batching": {"max_queue_delay_microseconds": max_queue_delay_us},
        "instance_group": [{"kind": _Enum(kind), "count": 1} for kind in INSTANCE_KINDS[instance_kind]],
    }


def render_pbtxt(fields: Dict[str, Any], indent: str = "") -> str:
    """Protobuf text format of a :func:`config_fields` dict: scalars ``key: value``
    (strings quoted, :class:`_Enum` bare), scalar lists ``key: [ a, b ]``, messages
    ``key { ... }``, repeated messages one block each."""
    lines = []
    for key, value in fields.items():
        for item in value if isinstance(value, list) and value and isinstance(value[0], dict) else [value]:
            if isinstance(item, dict):
                lines.append(f"{indent}{key} {{\n{render_pbtxt(item, indent + '  ')}{indent}}}\n")
            elif isinstance(item, list):
                lines.append(f"{indent}{key}: [ {', '.join(_scalar(v) for v in item)} ]\n")
            else:
                lines.append(f"{indent}{key}: {_scalar(item)}\n")
    return "".join(lines)


def _scalar(value) -> str:
    if isinstance(value, _Enum):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(int(value))


def _protobuf_pbtxt(fields: Dict[str, Any]) -> Optional[str]:
    """The text protobuf renders for ``fields`` through Triton's own ModelConfig schema
    (unknown fields or enum values raise); None without tritonclient."""
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    message = json_format.ParseDict(fields, model_config_pb2.ModelConfig())
    return text_format.MessageToString(message)


def _header(description: str) -> str:
    extra = "".join(f"# {line}\n" for line in description.splitlines()) if description else ""
    return f"{MARKER}\n{extra}{_HEADER}"


def _config_text(model, name: str, max_batch_size: int, instance_kind: str,
                 max_queue_delay_us: int, description: str):
    fields = config_fields(model, name, max_batch_size, instance_kind, max_queue_delay_us)
    body = _protobuf_pbtxt(fields)
    return _header(description) + (render_pbtxt(fields) if body is None else body), fields


def triton_model_config(onnx_path: str, name: str, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                        instance_kind: str = "auto", max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                        description: str = "") -> str:
    """config.pbtxt text for the ONNX file ``onnx_path`` served as model ``name``
    (``description``: extra header comment lines)."""
    import onnx
    model = onnx.load(onnx_path, load_external_data=False)
    return _config_text(model, name, max_batch_size, instance_kind, max_queue_delay_us, description)[0]


def write_triton_repo(repo_dir: str, model_name: str, onnx_bytes: bytes,
                      max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, instance_kind: str = "auto",
                      max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                      description: str = "") -> Dict[str, Any]:
    """Write ``repo_dir/model_name/{config.pbtxt, 1/model.onnx}`` for the serialized ONNX
    model ``onnx_bytes`` (layout in the module docstring); each file atomically.

    Refuses (:class:`ConfigError`, before writing) a model directory that holds files and
    is not an earlier repository of ours; over our own output it replaces config.pbtxt and
    1/model.onnx and leaves any other file alone. Returns ``path``, ``model_name``,
    ``config``, ``model_file``, ``max_batch_size``, ``instance_groups``, ``inputs``,
    ``outputs`` (each ``{name, data_type, dims}``, dims without the batch dim)."""
    import onnx
    model_dir = check_target(repo_dir, model_name)
    model = onnx.load_model_from_string(onnx_bytes)
    # the whole config is built (and checked) before anything is written
    text, fields = _config_text(model, model_name, max_batch_size, instance_kind,
                                max_queue_delay_us, description)
    model_file = os.path.join(model_dir, VERSION, MODEL_FILE)
    config_file = os.path.join(model_dir, CONFIG_FILE)
    write_bytes_atomic(model_file, onnx_bytes)
    write_bytes_atomic(config_file, text.encode("utf-8"))

    def described(entries):
        return [{"name": t["name"], "data_type": str(t["data_type"]), "dims": list(t["dims"])}
                for t in entries]
    return {"path": repo_dir, "model_name": model_name, "config": config_file,
            "model_file": model_file, "max_batch_size": max_batch_size,
            "instance_groups": [str(g["kind"]) for g in fields["instance_group"]],
            "inputs": described(fields["input"]), "outputs": described(fields["output"])}


__all__ = ["triton_model_config", "write_triton_repo", "config_fields", "render_pbtxt", "graph_io",
           "check_target", "check_model_name", "check_options", "INSTANCE_KINDS",
           "DEFAULT_MAX_BATCH_SIZE", "DEFAULT_QUEUE_DELAY_US", "MARKER"]
