"""Metrics and checkpoints of one run, sent to MLflow by a background thread.

Training must not wait on the tracking server: `MetricsLogger.log` queues a
batch and returns at once. While the server cannot be reached, the thread
retries the oldest item with exponential backoff and keeps the order, so an
outage delays metrics but loses none. `close` waits for the queue to drain.
What is still unsent at its timeout goes to a spool file, and the next logger
of the same run (a resume) sends that file first.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Seconds between retries while the server is unreachable: doubling up to the cap.
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
# Seconds `close` waits for a request in flight after its timeout. The item of
# that request is spooled too, so it may reach the server twice. That is
# harmless because each batch keeps the timestamp taken in `log`, and MLflow
# 3.17's SQL store skips a metric whose key, value, timestamp and step it has.
_ABANDON_WAIT_S = 5.0


class TrackingError(RuntimeError):
    """Metrics could not be delivered to MLflow (rejected, or the server stayed unreachable)."""


@dataclass
class _Metrics:
    step: int
    timestamp_ms: int
    values: dict[str, float]

    def describe(self) -> str:
        return f"metrics of step {self.step}"


@dataclass
class _Checkpoint:
    path: Path

    def describe(self) -> str:
        return f"the upload of {self.path}"


def failure_reason(error: Exception) -> str:
    """Return the useful part of a failed request's message, without urllib3's retry chain."""
    message = str(error)
    # A socket error ("[Errno 111] Connection refused") deep inside the chain.
    socket_error = re.search(r"\[Errno -?\d+\] [^'\"()]+", message)
    if socket_error:
        return socket_error.group(0).strip()
    first_line = message.split("Response body", 1)[0].strip().rstrip(".")
    return first_line.splitlines()[0][:200] if first_line else type(error).__name__


def _is_permanent(error: Exception) -> bool:
    """Return whether the server rejected the request itself (4xx), so a retry would fail too."""
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return False
    status = error.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


class MetricsLogger:
    """Log metric dictionaries and checkpoint files into one existing run; rank 0 only.

    Args:
        spool_path: file that keeps metrics still unsent at `close`; a logger
            created later with the same path sends them before anything else.
    """

    def __init__(self, tracking_uri: str, run_id: str, spool_path: Path | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.spool_path = spool_path
        self._queue: deque[_Metrics | _Checkpoint] = deque(self._read_spool())
        self._condition = threading.Condition()
        self._closing = False
        self._abandoned = False
        self._rejected: list[str] = []
        self._thread = threading.Thread(
            target=self._send_loop, name=f"mlflow-sender-{run_id[:8]}", daemon=True
        )
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue one step's metrics; the timestamp is taken now, not when they are sent."""
        item = _Metrics(step, int(time.time() * 1000), {k: float(v) for k, v in metrics.items()})
        with self._condition:
            self._queue.append(item)
            self._condition.notify()

    def log_checkpoint(self, path: Path) -> None:
        """Queue an upload of the checkpoint at `path` into the run's `checkpoints/` artifacts."""
        with self._condition:
            # The file at `path` is replaced by each newer checkpoint, so one
            # queued upload of it already sends the newest one.
            if any(isinstance(item, _Checkpoint) and item.path == path for item in self._queue):
                return
            self._queue.append(_Checkpoint(path))
            self._condition.notify()

    def last_step(self, key: str) -> int:
        """Return the highest step logged for `key` in this run, 0 if none; a blocking call."""
        history = self.client.get_metric_history(self.run_id, key)
        sent = max((metric.step for metric in history), default=0)
        spooled = [item.step for item in self._queue if isinstance(item, _Metrics)]
        return max([sent, *spooled])

    @property
    def pending(self) -> int:
        with self._condition:
            return len(self._queue)

    def close(self, timeout_s: float | None = None) -> None:
        """Wait until everything queued is sent, at most `timeout_s` seconds.

        Raises:
            TrackingError: the server rejected some metrics, or was still
                unreachable at the timeout; unsent metrics are then saved to
                `spool_path` when one is set.
        """
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            with self._condition:
                self._abandoned = True
                self._condition.notify_all()
            self._thread.join(_ABANDON_WAIT_S)
        with self._condition:
            unsent = list(self._queue)
            self._queue.clear()
        if unsent:
            where = self._write_spool(unsent)
            raise TrackingError(
                f"{len(unsent)} metric batches or uploads of run {self.run_id} were not sent to "
                f"{self.tracking_uri} within {timeout_s} s: {where}"
            )
        if self._rejected:
            raise TrackingError(
                f"MLflow rejected {len(self._rejected)} requests of run {self.run_id}: "
                f"{self._rejected[0]}"
            )

    def _send_loop(self) -> None:
        backoff = FIRST_BACKOFF_S
        failing_since: float | None = None
        while True:
            with self._condition:
                while not self._queue and not self._closing:
                    self._condition.wait()
                if self._abandoned or not self._queue:
                    return
                item = self._queue[0]
            try:
                self._send(item)
            except Exception as exc:  # noqa: BLE001 - a network error may come as any type
                if _is_permanent(exc):
                    log.error("MLflow rejected %s of run %s: %s", item.describe(), self.run_id, exc)
                    self._rejected.append(str(exc))
                else:
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.warning(
                            "MLflow server %s unreachable, training goes on and metrics "
                            "wait in memory (%d queued); retrying: %s",
                            self.tracking_uri, self.pending, failure_reason(exc),
                        )  # fmt: skip
                    with self._condition:
                        self._condition.wait_for(lambda: self._abandoned, timeout=backoff)
                    backoff = min(2 * backoff, MAX_BACKOFF_S)
                    continue
            if failing_since is not None:
                log.warning(
                    "MLflow server %s reachable again after %.0f s; sending %d queued items",
                    self.tracking_uri, time.monotonic() - failing_since, self.pending,
                )  # fmt: skip
                failing_since = None
                backoff = FIRST_BACKOFF_S
            with self._condition:
                self._queue.popleft()

    def _send(self, item: _Metrics | _Checkpoint) -> None:
        from mlflow.entities import Metric

        if isinstance(item, _Checkpoint):
            self.client.log_artifact(self.run_id, str(item.path), artifact_path="checkpoints")
            return
        batch = [
            Metric(key, value, item.timestamp_ms, item.step) for key, value in item.values.items()
        ]
        self.client.log_batch(self.run_id, metrics=batch)

    def _read_spool(self) -> list[_Metrics]:
        if self.spool_path is None or not self.spool_path.is_file():
            return []
        lines = self.spool_path.read_text().splitlines()
        items = [_Metrics(**json.loads(line)) for line in lines if line.strip()]
        # Once queued, the items are sent or spooled again by `close`.
        self.spool_path.unlink()
        log.info("sending %d metric batches saved by an earlier attempt", len(items))
        return items

    def _write_spool(self, unsent: list[_Metrics | _Checkpoint]) -> str:
        metrics = [item for item in unsent if isinstance(item, _Metrics)]
        if self.spool_path is None or not metrics:
            return "they are lost"
        from resmom.paths import write_text_atomic

        lines = [json.dumps(item.__dict__) for item in metrics]
        write_text_atomic(self.spool_path, "\n".join(lines) + "\n")
        return (
            f"saved to {self.spool_path}; `rmctl run --resume {self.run_id}` sends them "
            "once the server is reachable"
        )
