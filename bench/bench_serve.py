"""Load test of ``qgnn-deploy serve`` on this machine: throughput, latency and batching.

    .venv/bin/python bench/bench_serve.py                       # tiny 4-bit, 1 and 2 replicas
    .venv/bin/python bench/bench_serve.py --model m.qgnn --replicas 1 --clients 1 8 --tasks 4

Starts a local Ray instance (``--num-cpus``), deploys the model (default: the shipped tiny
4-bit checkpoint, folded here) once per ``--replicas`` value, warms it up, then runs
:func:`qgnn_deploy.serving.loadtest.run_load` once per ``--clients`` value: ``--requests``
requests of ``--tasks`` synthetic episodes each, under ``--time-limit`` seconds, every
answer checked bit-exact against the model in this process. The client runs on the same
cores as the server. Prints a markdown table, then one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from qgnn_deploy.benchmarks.episode import device_info
from qgnn_deploy.serving import ServeSettings
from qgnn_deploy.serving.loadtest import make_payloads, run_load

COLUMNS = [("replicas", "replicas"), ("clients", "clients"), ("tasks/req", "tasks_per_request"),
           ("ok", "ok"), ("errors", "errors"), ("req/s", "throughput_rps"), ("tasks/s", "tasks_per_s"),
           ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"), ("model calls", "model_calls"),
           ("req/call mean", "mean_requests_per_call"), ("req/call max", "max_requests_per_call")]


def _parser() -> argparse.ArgumentParser:
    d = ServeSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=".qgnn to serve (default: tiny 4-bit, folded from the shipped checkpoint)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tasks", type=int, default=1, help="tasks per request (default 1)")
    p.add_argument("--requests", type=int, default=200, help="requests per load test (default 200)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per load test at most (default 60)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray instance")
    p.add_argument("--max-batch-tasks", type=int, default=d.max_batch_tasks)
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms)
    p.add_argument("--port", type=int, default=8000)
    return p


def _model(path, tmp):
    """(path of the .qgnn served, the same IntModel in process on the cpu backend)."""
    import qgnn_deploy
    from qgnn_deploy.sources import embedded_checkpoint
    if path is None:
        path = os.path.join(tmp, "tiny4.qgnn")
        qgnn_deploy.save_int_model(qgnn_deploy.fold(qgnn_deploy.load_checkpoint(embedded_checkpoint("tiny", 4))),
                                   path)
    model = qgnn_deploy.load_int_model(path)
    model.backend = "cpu"
    return path, model


def markdown(rows) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for _, key in COLUMNS:
            v = r[key]
            cells.append("-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from qgnn_deploy.serving import app
    log = lambda s: print(f"bench_serve: {s}", file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, model = _model(args.model, tmp)
        payloads = make_payloads(model.config, tasks=args.tasks, count=8, model=model)
        local = app.start_ray(num_cpus=args.num_cpus)
        running = None
        try:
            for replicas in args.replicas:
                settings = ServeSettings(replicas=replicas, max_batch_tasks=args.max_batch_tasks,
                                         batch_wait_ms=args.batch_wait_ms).check()
                log(f"deploying {replicas} replica(s)")
                running = app.deploy(path, settings, "127.0.0.1", args.port)
                run_load(running.url, payloads, clients=2 * replicas, requests=8 * replicas, time_limit_s=30)
                for clients in args.clients:
                    log(f"{replicas} replica(s), {clients} client(s), {args.requests} requests")
                    res = run_load(running.url, payloads, clients=clients, requests=args.requests,
                                   time_limit_s=args.time_limit)
                    b = res.pop("batching")
                    rows.append({"replicas": replicas, "tasks_per_request": args.tasks, **res,
                                 **{k: b[k] for k in ("model_calls", "mean_requests_per_call",
                                                      "max_requests_per_call", "replicas_used",
                                                      "calls_by_requests")}})
        finally:
            app.stop(running, local)
    dev = device_info()
    print(f"device: {dev['cpu']}, {dev['cpu_count']} cores (client and server share them); "
          f"batch limits {args.max_batch_tasks} tasks, {args.batch_wait_ms:g} ms wait")
    print(markdown(rows))
    print(json.dumps({"device": dev, "model": os.path.basename(args.model or "tiny4.qgnn"),
                      "max_batch_tasks": args.max_batch_tasks, "batch_wait_ms": args.batch_wait_ms,
                      "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
