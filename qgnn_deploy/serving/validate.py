"""Request bodies of ``POST /v1/episodes`` -> model inputs, or a :class:`RequestError` with a status.

Plain Python (no Ray, no web framework), so every rejection is testable on its own. The
server runs these before a request joins a batch: a bad request never reaches the model.

Statuses: 400 the body is not JSON (``NaN`` / ``Infinity`` literals included: Python's json
reads them, JSON has no such thing); 413 the body, or the number of tasks, is over the
server's limit; 422 JSON of the wrong structure -- not an object, missing or unknown keys,
wrong nesting or lengths, non-numbers, numbers that are not finite in float32, labels that
are not integers in ``[0, way)``.
"""
from __future__ import annotations

import json
from typing import AsyncIterable, List, Optional, Tuple

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import InputError
from ..models.qgnn import check_episode

EPISODE_KEYS = ("images", "support_labels")


class RequestError(InputError):
    """A request the server rejects: ``status`` is the HTTP status, the message names the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_content_length(header: Optional[str], max_bytes: int) -> None:
    """413 when the declared ``Content-Length`` is over ``max_bytes`` (400 when it is not a
    number); a missing header passes, :func:`read_body` then counts the bytes that arrive."""
    if header is None:
        return
    if not header.strip().isdigit():
        raise RequestError(400, f"Content-Length must be a byte count, got {header!r}")
    if int(header) > max_bytes:
        raise RequestError(413, f"body of {int(header)} bytes is over this server's limit of "
                                f"{max_bytes} bytes (--max-body-mb)")


async def read_body(chunks: AsyncIterable[bytes], max_bytes: int) -> bytes:
    """The body from its chunks; stops reading with 413 once more than ``max_bytes`` arrived
    (a client may send more than its Content-Length says, or none)."""
    parts: List[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"body is over this server's limit of {max_bytes} bytes (--max-body-mb)")
        parts.append(chunk)
    return b"".join(parts)


def _reject_constant(name: str):
    raise RequestError(400, f"body is not valid JSON: {name} is not a JSON number (send finite numbers)")


def _json_kind(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")


def _path(name: str, index: Tuple[int, ...]) -> str:
    return name + "".join(f"[{i}]" for i in index)


def _check_nested(value, shape: Tuple[int, ...], name: str, leaf_types: tuple, leaf_what: str,
                  index: Tuple[int, ...] = ()) -> None:
    """422 unless ``value`` is arrays nested exactly as ``shape`` with leaves of ``leaf_types``
    (``bool`` is never one: JSON ``true`` is not a number). ``shape[0]`` is checked by the caller."""
    want = shape[len(index)]
    if not isinstance(value, list):
        raise RequestError(422, f"{_path(name, index)} is {_json_kind(value)}, expected an array of {want}")
    if index and len(value) != want:
        raise RequestError(422, f"{_path(name, index)} has {len(value)} entries, expected {want} "
                                f"({name} is {''.join(f'[{d}]' for d in shape)})")
    if len(index) + 1 < len(shape):
        for i, item in enumerate(value):
            _check_nested(item, shape, name, leaf_types, leaf_what, index + (i,))
        return
    if not set(map(type, value)) <= set(leaf_types):  # one C-level pass over the row
        i, bad = next((i, v) for i, v in enumerate(value) if type(v) not in leaf_types)
        raise RequestError(422, f"{_path(name, index + (i,))} is {_json_kind(bad)}, expected {leaf_what}")


def parse_episodes(body: bytes, config: ModelConfig, max_tasks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``{"images": [T][N][3][S][S], "support_labels": [T][way*shot]}`` as JSON bytes ->
    (images float32 [T, N, 3, S, S], support_labels int64 [T, way*shot]) for ``config``
    (``N = way*shot + way``: the supports, then one query per class). ``1 <= T <= max_tasks``."""
    if not body.strip():
        raise RequestError(400, "empty body: expected a JSON object with keys " + ", ".join(EPISODE_KEYS))
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "body is not valid JSON for this server: nested too deeply") from None
    if not isinstance(doc, dict):
        raise RequestError(422, f"body must be a JSON object with keys {', '.join(EPISODE_KEYS)}, "
                                f"got {_json_kind(doc)}")
    for key in EPISODE_KEYS:
        if key not in doc:
            raise RequestError(422, f"missing key {key!r} (an episode request has {', '.join(EPISODE_KEYS)})")
    unknown = sorted(set(doc) - set(EPISODE_KEYS))
    if unknown:
        raise RequestError(422, f"unknown key {unknown[0]!r} (an episode request has {', '.join(EPISODE_KEYS)})")
    images, labels = doc["images"], doc["support_labels"]
    n, s, ns = config.num_nodes, config.image_size, config.num_supports
    for key, value in doc.items():
        if not isinstance(value, list):
            raise RequestError(422, f"{key} is {_json_kind(value)}, expected an array of tasks")
    tasks = len(images)
    if tasks == 0:
        raise RequestError(422, "images holds no tasks: send at least one episode")
    if tasks > max_tasks:
        raise RequestError(413, f"{tasks} tasks in one request is over this server's limit of {max_tasks} "
                                f"(--max-batch-tasks): split the request")
    if len(labels) != tasks:
        raise RequestError(422, f"support_labels has {len(labels)} tasks, images has {tasks}")
    _check_nested(images, (tasks, n, 3, s, s), "images", (int, float), "a number")
    _check_nested(labels, (tasks, ns), "support_labels", (int,), f"an integer class in [0, {config.way})")
    for t, row in enumerate(labels):
        for i, label in enumerate(row):
            if not 0 <= label < config.way:
                raise RequestError(422, f"support_labels[{t}][{i}] = {label} is outside [0, {config.way})")
    try:
        with np.errstate(over="ignore"):  # overflow to inf is reported below, by position
            pixels = np.asarray(images, dtype=np.float32)
    except OverflowError:  # an integer literal beyond float range
        raise RequestError(422, "images hold a number too large for float32") from None
    finite = np.isfinite(pixels)  # 1e39 parses, but is inf in float32
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise RequestError(422, f"{_path('images', where)} is not finite in float32")
    images_t = torch.from_numpy(pixels)
    labels_t = torch.tensor(labels, dtype=torch.int64)
    try:
        check_episode(images_t, labels_t, config)
    except InputError as e:  # the model's own contract, should the checks above ever drift from it
        raise RequestError(422, str(e)) from None
    return images_t, labels_t
