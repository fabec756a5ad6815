"""HTTP serving of integer models on Ray Serve (``qgnn-deploy serve``, docs/serving.md).

Modules: ``validate`` (request bodies -> tensors, or errors with an HTTP status; plain
Python), ``app`` (the Ray Serve deployment and the calls that start and stop it; imports
Ray), ``loadtest`` (a bounded load-test client; plain Python). Importing this package, or
``validate`` / ``loadtest``, never imports Ray: it is the optional extra ``[serve]``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class ServeSettings:
    """What every replica of a deployment is told.

    Attributes:
        replicas: copies of the model, each its own Ray actor.
        threads: cpu-kernel threads of one replica, and the Ray CPUs it reserves.
        max_batch_tasks: most tasks one model call runs; also the most one request may hold.
        batch_wait_ms: how long a replica waits, after a request arrives, for others to join its batch.
        max_body_mb: the largest request body accepted (MiB).
    """

    replicas: int = 1
    threads: int = 1
    max_batch_tasks: int = 32
    batch_wait_ms: float = 10.0
    max_body_mb: float = 32.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2 ** 20)

    def check(self) -> "ServeSettings":
        """Self, or ConfigError naming the flag that is out of range."""
        for flag, value in (("--replicas", self.replicas), ("--threads", self.threads),
                            ("--max-batch-tasks", self.max_batch_tasks)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be an integer >= 1, got {value!r}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ConfigError(f"--batch-wait-ms must lie in [0, 10000], got {self.batch_wait_ms}")
        if not 0 < self.max_body_mb <= 4096:
            raise ConfigError(f"--max-body-mb must lie in (0, 4096], got {self.max_body_mb}")
        return self
