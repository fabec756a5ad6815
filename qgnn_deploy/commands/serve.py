"""``qgnn-deploy serve MODEL.qgnn``: the model over HTTP on Ray Serve, until Ctrl-C.

Examples::

    qgnn-deploy serve model.qgnn                          # local Ray on every core, port 8000
    qgnn-deploy serve model.qgnn --replicas 2 --num-cpus 2 --port 8080
    ray start --head && qgnn-deploy serve model.qgnn --address auto --replicas 8

Starts a local Ray instance (bounded by ``--num-cpus``) or joins the cluster at
``--address``, deploys ``--replicas`` replicas of the model on the cpu backend, prints the
URL once every replica has run the model, and serves until Ctrl-C or SIGTERM; then it
removes what it started (the local instance; on a cluster only its own application).
Routes, batching and limits: docs/serving.md. Needs the extra ``[serve]`` (Ray Serve).
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..serving import ServeSettings
    d = ServeSettings()
    p.add_argument("model", help="integer model (.qgnn) to serve")
    p.add_argument("--replicas", type=int, default=d.replicas, help=f"model replicas (default {d.replicas})")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (auto, or HEAD:6379 of `ray start --head`) instead of "
                        "starting a local instance")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray instance (default: every core); not with --address")
    p.add_argument("--threads", type=int, default=d.threads,
                   help=f"cpu-kernel threads per replica, also the Ray CPUs each reserves (default {d.threads})")
    p.add_argument("--max-batch-tasks", type=int, default=d.max_batch_tasks,
                   help=f"most tasks in one model call, and in one request (default {d.max_batch_tasks})")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help=f"how long a request waits for others to share its model call (default {d.batch_wait_ms:g})")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_mb,
                   help=f"largest request body accepted, MiB (default {d.max_body_mb:g})")


def _serving_app():
    """qgnn_deploy.serving.app, or BackendUnavailableError saying how to install Ray Serve."""
    from ..errors import BackendUnavailableError
    try:
        importlib.import_module("ray.serve")
    except ImportError as e:
        raise BackendUnavailableError(f"serve needs Ray Serve, which is not installed ({e}): "
                                      "pip install 'qgnn-deploy[serve]' (or pip install 'ray[serve]>=2.40')") from None
    from ..serving import app
    return app


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    from ..artifact import load_int_model
    from ..errors import ConfigError
    from ..serving import ServeSettings

    settings = ServeSettings(replicas=args.replicas, threads=args.threads, max_batch_tasks=args.max_batch_tasks,
                             batch_wait_ms=args.batch_wait_ms, max_body_mb=args.max_body_mb).check()
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must lie in [1, 65535], got {args.port}")
    if args.address and args.num_cpus is not None:
        raise ConfigError("--num-cpus sizes the local Ray instance; a cluster joined with --address has its own")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus must be >= 1, got {args.num_cpus}")
    cpus = args.num_cpus or os.cpu_count() or 1
    if not args.address and settings.replicas * settings.threads > cpus:  # before Ray starts
        raise ConfigError(f"{settings.replicas} replicas x {settings.threads} threads need "
                          f"{settings.replicas * settings.threads} CPUs, the local instance has {cpus}: "
                          "lower --replicas / --threads or raise --num-cpus")
    app = _serving_app()
    config = load_int_model(args.model).config  # ArtifactError here, before Ray starts
    # SIGTERM (kill, a process manager) stops the server as cleanly as Ctrl-C
    signal.signal(signal.SIGTERM, _raise_interrupt)
    local = app.start_ray(args.address, args.num_cpus)
    running = None
    try:
        running = app.deploy(args.model, settings, args.host, args.port)
        print(f"serving {os.path.basename(args.model)} ({config.way}-way {config.shot}-shot, "
              f"{settings.replicas} replica{'s' if settings.replicas > 1 else ''}) at {running.url}: "
              f"POST {running.url}/v1/episodes, GET {running.url}/v1/health; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        app.stop(running, local)
    return 0
