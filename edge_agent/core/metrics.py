"""Counters and windows the worker updates and telemetry reads.

Thread-safe and cheap: the worker records one outcome per job; telemetry takes a snapshot
on its timer. Nothing here touches the model or the network.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

OUTCOMES = ("done", "failed", "rejected", "expired", "cancelled")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class _Ewma:
    alpha: float
    value: float | None = None

    def add(self, sample: float) -> None:
        self.value = (
            sample if self.value is None else self.alpha * sample + (1 - self.alpha) * self.value
        )


class Metrics:
    """Inference figures since start; latencies over the last `window` jobs."""

    def __init__(self, window: int = 256, alpha: float = 0.2) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(OUTCOMES, 0)
        self._latency: deque[float] = deque(maxlen=window)
        self._acks: deque[float] = deque(maxlen=window)
        self._ttft: float | None = None
        self._tps_last: float | None = None
        self._pps_last: float | None = None
        self._tps = _Ewma(alpha)
        self._pps = _Ewma(alpha)
        self._last_token_at: float | None = None
        # The same moment on the monotonic clock, for stall detection: the wall clock can
        # step by hours when a Pi without an RTC gets its time from NTP after boot.
        self._last_progress: float | None = None
        self._extra: dict[str, int] = {}
        self.started_at = time.time()

    def count(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] = self._counts.get(outcome, 0) + 1

    def bump(self, name: str, by: int = 1) -> None:
        """Other counters (e.g. spool drops, duplicate deliveries)."""
        with self._lock:
            self._extra[name] = self._extra.get(name, 0) + by

    def record_job(
        self,
        total_ms: float,
        first_token_ms: float | None,
        tokens_per_second: float | None,
        prompt_tokens_per_second: float | None,
    ) -> None:
        with self._lock:
            self._latency.append(total_ms)
            if first_token_ms is not None:
                self._ttft = first_token_ms
            if tokens_per_second is not None:
                self._tps_last = tokens_per_second
                self._tps.add(tokens_per_second)
            if prompt_tokens_per_second is not None:
                self._pps_last = prompt_tokens_per_second
                self._pps.add(prompt_tokens_per_second)

    def record_ack(self, seconds: float) -> None:
        """A job's delivery was acknowledged (PUBACK sent) this long after it arrived."""
        with self._lock:
            self._acks.append(seconds * 1000.0)

    def progress(self) -> None:
        """The engine produced a token: forward progress, which the watchdog checks."""
        self._last_token_at = time.time()
        self._last_progress = time.monotonic()

    @property
    def last_token_at(self) -> float | None:
        return self._last_token_at

    @property
    def last_progress(self) -> float | None:
        """time.monotonic() of the last forward progress."""
        return self._last_progress

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latencies = list(self._latency)
            acks = list(self._acks)
            return {
                "jobs": dict(self._counts),
                "counters": dict(self._extra),
                "latency_ms_p50": _round(percentile(latencies, 50)),
                "latency_ms_p95": _round(percentile(latencies, 95)),
                "latency_window": len(latencies),
                "puback_ms_p50": _round(percentile(acks, 50)),
                "puback_ms_p99": _round(percentile(acks, 99)),
                "time_to_first_token_ms": _round(self._ttft),
                "tokens_per_second": _round(self._tps_last),
                "tokens_per_second_avg": _round(self._tps.value),
                "prompt_tokens_per_second": _round(self._pps_last),
                "prompt_tokens_per_second_avg": _round(self._pps.value),
                "last_token_at": _round(self._last_token_at, 3),
            }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)
