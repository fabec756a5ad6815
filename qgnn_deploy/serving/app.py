"""The Ray Serve deployment of an integer model, and the calls that start and stop it.

Routes (docs/serving.md)::

    GET  /v1/health    200 {"status": "ok", model info}     once the replica has run the model
    GET  /v1/stats     model calls per replica: how many requests and tasks each call served
    POST /v1/episodes  {"images": [T][N][3][S][S], "support_labels": [T][way*shot]}
                       -> {"logits": [T][way][way], "predictions": [T][way]}

Each replica loads the ``.qgnn`` and runs the cpu backend's compiled plan. An episode
request is read and validated on its own (:mod:`qgnn_deploy.serving.validate`); only a
valid one joins a batch. ``ray.serve.batch`` gathers concurrent requests up to
``max_batch_tasks`` tasks, one model call runs them all, the logits are split back per
request. The model is batch-invariant: an answer does not depend on its batch-mates.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import ray
import torch
from ray import serve
from ray.actor import ActorHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import BackendUnavailableError, ConfigError
from . import ServeSettings
from .validate import RequestError, check_content_length, parse_episodes, read_body

APP_NAME = "qgnn"
# replicas live in Serve's namespace; the stats actor is put there so they find it by name
STATS_NAMESPACE = "serve"
LOGGING = {"log_level": "WARNING", "enable_access_log": False}
logger = logging.getLogger(__name__)


def _error(status: int, message: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _empty_counters() -> dict:
    return {"model_calls": 0, "requests": 0, "tasks": 0, "calls_by_requests": {}}


def _add_counters(into: dict, other: dict) -> None:
    for key in ("model_calls", "requests", "tasks"):
        into[key] += other[key]
    for k, n in other["calls_by_requests"].items():
        into["calls_by_requests"][k] = into["calls_by_requests"].get(k, 0) + n


@ray.remote(num_cpus=0)
class BatchStats:
    """Counters of the model calls of every replica. ``calls_by_requests`` maps a request
    count (a JSON key, so a string) to how many model calls served that many requests."""

    def __init__(self):
        self._replicas: Dict[str, dict] = {}

    def record(self, replica: str, requests: int, tasks: int) -> None:
        _add_counters(self._replicas.setdefault(replica, _empty_counters()),
                      {"model_calls": 1, "requests": requests, "tasks": tasks,
                       "calls_by_requests": {str(requests): 1}})

    def snapshot(self) -> dict:
        """``{"replicas": {replica_id: counters}, "total": counters}``."""
        total = _empty_counters()
        for counters in self._replicas.values():
            _add_counters(total, counters)
        return {"replicas": self._replicas, "total": total}


def _batch_tasks(episodes: List[Tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The size serve.batch measures a batch in: tasks, not requests."""
    return sum(images.shape[0] for images, _ in episodes)


class EpisodeServer:
    """One replica: the integer model on the cpu backend behind the three routes. A plain
    class (made a deployment in :func:`deploy`), so Ray pickles it by reference to this module."""

    def __init__(self, artifact: bytes, model_name: str, settings: ServeSettings, stats_name: str):
        from .. import __version__
        from ..artifact import load_int_model
        from ..backends import cpu
        from ..data import calibration_episodes
        # the bytes, not a path: a replica may run on a node that does not have the file
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.qgnn")
            with open(path, "wb") as f:
                f.write(artifact)
            self.model = load_int_model(path)
        self.model.backend = "cpu"
        torch.set_num_threads(settings.threads)
        cpu.set_num_threads(settings.threads)
        self.settings = settings
        self.config = self.model.config
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.stats = ray.get_actor(stats_name, namespace=STATS_NAMESPACE)
        # one thread runs the model; the compiled plan releases the GIL, so the event loop
        # reads and validates the next requests (the next batch) meanwhile
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qgnn-model")
        self._run_batch.set_max_batch_size(settings.max_batch_tasks)
        self._run_batch.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)
        # compile the plan now: the replica (and /v1/health) is ready only once the model ran
        self.executor.submit(self._logits, *calibration_episodes(self.config, tasks=1, seed=0)).result()
        cfg = self.config
        self.info = {"model": model_name, "way": cfg.way, "shot": cfg.shot, "num_nodes": cfg.num_nodes,
                     "num_supports": cfg.num_supports, "image_size": cfg.image_size, "bits": cfg.bits,
                     "generations": self.model.generations, "backend": "cpu", "isa": cpu.active_isa(),
                     "threads": settings.threads, "replicas": settings.replicas,
                     "max_batch_tasks": settings.max_batch_tasks, "batch_wait_ms": settings.batch_wait_ms,
                     "max_body_mb": settings.max_body_mb, "version": __version__}
        self.routes = {"/v1/health": ("GET", self._health), "/v1/stats": ("GET", self._stats),
                       "/v1/episodes": ("POST", self._episodes)}

    async def __call__(self, request: Request) -> JSONResponse:
        route = self.routes.get(request.url.path.rstrip("/") or "/")
        if route is None:
            return _error(404, f"no route {request.url.path}; routes: "
                               + ", ".join(f"{m} {p}" for p, (m, _) in self.routes.items()))
        method, handler = route
        if request.method != method:
            return _error(405, f"{request.url.path} takes {method}, not {request.method}", {"Allow": method})
        return await handler(request)

    async def _health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "replica": self.replica, **self.info})

    async def _stats(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse({"replica": self.replica, **await self.stats.snapshot.remote()})
        except ray.exceptions.RayError as e:  # a replica of a deployment being replaced
            return _error(503, f"batch stats unavailable: {type(e).__name__}")

    async def _episodes(self, request: Request) -> JSONResponse:
        limit = self.settings.max_body_bytes
        try:
            check_content_length(request.headers.get("content-length"), limit)
            body = await read_body(request.stream(), limit)
            images, labels = parse_episodes(body, self.config, self.settings.max_batch_tasks)
        except RequestError as e:
            return _error(e.status, str(e))
        try:
            logits = await self._run_batch((images, labels))
        except Exception as e:  # noqa: BLE001 - the client gets JSON, the replica keeps serving
            logger.exception("model call failed")
            return _error(500, f"the model failed on this batch: {type(e).__name__}: {e}")
        return JSONResponse({"logits": logits.tolist(), "predictions": logits.argmax(-1).tolist()})

    def _logits(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """images float32 [T, N, 3, S, S], labels int64 [T, way*shot] -> logits float32 [T, way, way]."""
        with torch.inference_mode():
            return self.model(images, labels).logits

    @serve.batch(batch_size_fn=_batch_tasks)  # sizes come from ServeSettings in __init__
    async def _run_batch(self, episodes: List[Tuple[torch.Tensor, torch.Tensor]]) -> List[torch.Tensor]:
        """Validated episodes (images [T_i, N, 3, S, S], labels [T_i, way*shot]) -> their
        logits [T_i, way, way], from one model call on all sum(T_i) tasks."""
        counts = [images.shape[0] for images, _ in episodes]
        images = torch.cat([images for images, _ in episodes])
        labels = torch.cat([labels for _, labels in episodes])
        logits = await asyncio.get_running_loop().run_in_executor(self.executor, self._logits, images, labels)
        try:  # awaited before the answers go out, so /v1/stats counts every answered request
            await self.stats.record.remote(self.replica, len(episodes), sum(counts))
        except ray.exceptions.RayError:
            logger.warning("batch stats not recorded: the stats actor is gone", exc_info=True)
        return list(torch.split(logits, counts))


@dataclass
class RunningApp:
    """A deployed application. ``stats`` is held: the stats actor lives as long as this handle."""

    url: str
    name: str
    stats: ActorHandle


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> bool:
    """Join the cluster at ``address``, or start a local single-node instance with ``num_cpus``
    CPUs (None: every core). True when this process started Ray, and so stops it."""
    kw = dict(include_dashboard=False, logging_level=logging.WARNING)
    if address:
        try:
            ray.init(address=address, **kw)
        except ConnectionError as e:
            raise BackendUnavailableError(f"cannot join the Ray cluster at {address!r}: {e} "
                                          "(start one with `ray start --head`)") from None
        return False
    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kw)
    return True


def deploy(model_path: str, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
           name: str = APP_NAME) -> RunningApp:
    """Deploy ``model_path`` with ``settings`` as application ``name`` on Serve's HTTP proxy at
    ``host:port``; returns once every replica has loaded and run the model."""
    needed = settings.replicas * settings.threads
    have = ray.cluster_resources().get("CPU", 0)
    if needed > have:  # Serve would wait for the CPUs for ever
        raise ConfigError(f"{settings.replicas} replicas x {settings.threads} threads need {needed} CPUs, "
                          f"the Ray cluster has {have:g}: lower --replicas / --threads")
    with open(model_path, "rb") as f:
        artifact = f.read()
    # a fresh actor per deployment: the one of a replaced deployment dies with its RunningApp
    stats_name = f"qgnn-batch-stats-{name}-{uuid.uuid4().hex[:8]}"
    stats = BatchStats.options(name=stats_name, namespace=STATS_NAMESPACE).remote()
    serve.start(http_options={"host": host, "port": port}, logging_config=LOGGING)
    # one batch runs while the next fills: each replica takes two batches' worth of requests
    app = serve.deployment(EpisodeServer).options(
        num_replicas=settings.replicas, ray_actor_options={"num_cpus": settings.threads},
        max_ongoing_requests=2 * settings.max_batch_tasks)
    try:
        serve.run(app.bind(artifact, os.path.basename(model_path), settings, stats_name), name=name,
                  route_prefix="/", logging_config=LOGGING)
    except RuntimeError as e:  # a replica failed to start, after Serve's retries
        raise BackendUnavailableError(f"Ray Serve could not start {model_path!r}: {e}") from None
    return RunningApp(url=f"http://{host}:{port}", name=name, stats=stats)


def stop(app: Optional[RunningApp], local: bool) -> None:
    """Undo :func:`start_ray` / :func:`deploy`: all of Serve and Ray when this process started
    the local instance; on a shared cluster only this application, then disconnect."""
    try:
        if local:
            serve.shutdown()
        elif app is not None:
            serve.delete(app.name)
    finally:
        ray.shutdown()
