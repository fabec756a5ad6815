"""A bounded load test of a running ``qgnn-deploy serve``: fixed request count and time limit.

``clients`` threads, each on its own keep-alive connection, send ``POST /v1/episodes``
back to back until ``requests`` were sent in all or ``time_limit_s`` ran out (a request
still open then times out and counts as an error). Bodies are serialized once up front,
so the client spends its CPU on HTTP, not on JSON. Batching evidence comes from the
server: ``GET /v1/stats`` before and after, their difference is this run's model calls.

Plain Python (http.client, threads); no Ray.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from typing import List, Optional
from urllib.parse import urlsplit

import numpy as np

from ..config import ModelConfig


@dataclass
class Payload:
    """One request body: ``tasks`` episodes as JSON bytes, and the logits float32
    [tasks, way, way] the server must answer (None: not checked)."""

    body: bytes
    tasks: int
    expected: Optional[np.ndarray] = None


def make_payloads(config: ModelConfig, tasks: int = 1, count: int = 4, model=None) -> List[Payload]:
    """``count`` distinct bodies of ``tasks`` synthetic episodes each (seeds 0..count-1); with
    ``model`` (an IntModel), the answers it gives in process, for bit-exact checking."""
    from ..data import calibration_episodes
    payloads = []
    for seed in range(count):
        images, labels = calibration_episodes(config, tasks=tasks, seed=seed)
        body = json.dumps({"images": images.tolist(), "support_labels": labels.tolist()}).encode()
        expected = None if model is None else model(images, labels).logits.numpy()
        payloads.append(Payload(body, tasks, expected))
    return payloads


def get_json(url: str, timeout_s: float = 10.0) -> dict:
    """``GET url`` -> its JSON object (raises on a non-200 status)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
    try:
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {url}: HTTP {resp.status}: {data[:200]!r}")
        return json.loads(data)
    finally:
        conn.close()


def _stats_delta(before: dict, after: dict) -> dict:
    """Model calls between two ``/v1/stats`` totals: counters and ``calls_by_requests``."""
    b, a = before["total"], after["total"]
    by_requests = {int(k): n - b["calls_by_requests"].get(k, 0) for k, n in a["calls_by_requests"].items()}
    by_requests = {k: n for k, n in sorted(by_requests.items()) if n}
    calls = a["model_calls"] - b["model_calls"]
    requests = a["requests"] - b["requests"]
    active = [r for r, c in after["replicas"].items()
              if c["model_calls"] > before["replicas"].get(r, {"model_calls": 0})["model_calls"]]
    return {"model_calls": calls, "requests": requests, "tasks": a["tasks"] - b["tasks"],
            "calls_by_requests": by_requests, "max_requests_per_call": max(by_requests, default=0),
            "mean_requests_per_call": requests / calls if calls else 0.0, "replicas_used": len(active)}


def run_load(url: str, payloads: List[Payload], clients: int = 4, requests: int = 40,
             time_limit_s: float = 60.0) -> dict:
    """Load ``url`` (``http://host:port`` of the server) with ``requests`` requests from
    ``clients`` concurrent clients, payloads in turn; stops sending at ``time_limit_s``.

    Returns ``{clients, requests, sent, ok, errors, mismatches, seconds, throughput_rps,
    tasks_per_s, p50_ms, p99_ms, error_samples, batching}``: rates count answered (ok)
    requests only; ``mismatches`` are answers that differ from ``Payload.expected``;
    ``batching`` is :func:`_stats_delta` of the server's ``/v1/stats``.
    """
    if clients < 1 or requests < 1 or time_limit_s <= 0 or not payloads:
        raise ValueError("need clients >= 1, requests >= 1, time_limit_s > 0 and a payload")
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    stats_before = get_json(f"{url}/v1/stats")
    lock = threading.Lock()
    sent = 0
    latencies: List[float] = []
    tasks_done = 0
    errors: List[str] = []
    mismatches = 0
    start = time.perf_counter()
    deadline = start + time_limit_s

    def client() -> None:
        nonlocal sent, tasks_done, mismatches
        conn = http.client.HTTPConnection(host, port, timeout=time_limit_s)
        try:
            while True:
                with lock:
                    now = time.perf_counter()
                    if sent >= requests or now >= deadline:
                        return
                    payload = payloads[sent % len(payloads)]
                    sent += 1
                conn.timeout = deadline - now  # bounds the connect, and every read below
                if conn.sock is not None:
                    conn.sock.settimeout(conn.timeout)
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/v1/episodes", body=payload.body,
                                 headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    conn.close()  # reconnects on the next request
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                elapsed = time.perf_counter() - t0
                with lock:
                    if resp.status != 200:
                        errors.append(f"HTTP {resp.status}: {data[:200].decode(errors='replace')}")
                    elif payload.expected is not None and not np.array_equal(
                            np.asarray(json.loads(data)["logits"], dtype=np.float32), payload.expected):
                        mismatches += 1
                    else:
                        latencies.append(elapsed)
                        tasks_done += payload.tasks
        finally:
            conn.close()

    threads = [threading.Thread(target=client, name=f"loadtest-client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3
    return {"clients": clients, "requests": requests, "sent": sent, "ok": len(latencies),
            "errors": len(errors), "mismatches": mismatches, "seconds": seconds,
            "throughput_rps": len(latencies) / seconds, "tasks_per_s": tasks_done / seconds,
            "p50_ms": float(np.percentile(ms, 50)) if ms.size else None,
            "p99_ms": float(np.percentile(ms, 99)) if ms.size else None,
            "error_samples": errors[:3], "batching": _stats_delta(stats_before, get_json(f"{url}/v1/stats"))}
