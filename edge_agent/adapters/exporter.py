"""The Prometheus adapter: an optional /metrics endpoint with the telemetry figures.

Only this module imports prometheus_client. A custom collector turns the same snapshot the
MQTT telemetry publishes into metrics at scrape time, so both views always agree and
nothing is updated on the inference path. Names are stable (docs/telemetry.md), and
deploy/grafana/edge-agent.json is built on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

Snapshot = Callable[[], tuple[dict[str, Any], dict[str, Any]]]  # (telemetry, identity labels)

GAUGES = {
    # metric name: (path in the telemetry message, help)
    "edge_agent_session": ("session", "Start counter of the agent (grows on every start)."),
    "edge_agent_uptime_seconds": ("uptime_s", "Seconds since the agent started."),
    "edge_agent_queue_depth": ("queue_depth", "Jobs waiting or running."),
    "edge_agent_tokens_per_second": ("tokens_per_second", "Generation speed of the last job."),
    "edge_agent_tokens_per_second_avg": ("tokens_per_second_avg", "Generation speed, smoothed."),
    "edge_agent_prompt_tokens_per_second": (
        "prompt_tokens_per_second",
        "Prompt speed of the last job.",
    ),
    "edge_agent_prompt_tokens_per_second_avg": (
        "prompt_tokens_per_second_avg",
        "Prompt speed, smoothed.",
    ),
    "edge_agent_time_to_first_token_ms": ("time_to_first_token_ms", "Prompt time of the last job."),
    "edge_agent_last_token_timestamp_seconds": (
        "last_token_at",
        "Unix time of the last token produced.",
    ),
    "edge_agent_cpu_percent": ("cpu_percent", "Board CPU use, percent."),
    "edge_agent_load1": ("load_1m", "Load average over one minute."),
    "edge_agent_memory_total_bytes": ("memory.total_bytes", "Board RAM."),
    "edge_agent_memory_available_bytes": ("memory.available_bytes", "RAM available."),
    "edge_agent_rss_bytes": ("memory.agent_rss_bytes", "Agent resident memory."),
    "edge_agent_swap_used_bytes": ("memory.swap_used_bytes", "Swap in use."),
    "edge_agent_disk_free_bytes": ("disk_free_bytes", "Free disk in the model directory."),
    "edge_agent_soc_temperature_celsius": ("soc_temperature_c", "SoC temperature."),
    "edge_agent_spool_pending": ("spool.spool_pending", "Replies waiting for the broker."),
    "edge_agent_intake_backlog": ("intake_backlog", "Deliveries waiting to be read."),
    "edge_agent_poison_jobs": ("spool.poison_jobs", "Jobs refused for crashing the agent."),
}
COUNTERS = {
    "edge_agent_duplicate_jobs": ("counters.duplicate_jobs", "Jobs answered from the journal."),
    "edge_agent_handed_back": ("counters.handed_back", "Fleet jobs handed back."),
}


def _get(message: dict[str, Any], path: str) -> Any:
    value: Any = message
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class _TelemetryCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        message, labels = self._snapshot()
        device = str(message.get("device", ""))
        info = GaugeMetricFamily("edge_agent_info", "The agent and its model.", labels=[*labels])
        info.add_metric([str(v) for v in labels.values()], 1.0)
        yield info
        for name, (path, text) in GAUGES.items():
            value = _get(message, path)
            if isinstance(value, int | float) and not isinstance(value, bool):
                gauge = GaugeMetricFamily(name, text, labels=["device"])
                gauge.add_metric([device], float(value))
                yield gauge
        latency = GaugeMetricFamily(
            "edge_agent_job_latency_ms",
            "Job latency over the window.",
            labels=["device", "quantile"],
        )
        for quantile, key in (("0.5", "latency_ms_p50"), ("0.95", "latency_ms_p95")):
            if isinstance(message.get(key), int | float):
                latency.add_metric([device, quantile], float(message[key]))
        yield latency
        jobs = CounterMetricFamily(
            "edge_agent_jobs", "Jobs by outcome since start.", labels=["device", "outcome"]
        )
        for outcome, count in (message.get("jobs") or {}).items():
            jobs.add_metric([device, outcome], float(count))
        yield jobs
        dropped = CounterMetricFamily(
            "edge_agent_spool_dropped",
            "Replies dropped from the spool.",
            labels=["device", "reason"],
        )
        spool = message.get("spool") or {}
        dropped.add_metric([device, "full"], float(spool.get("spool_dropped_full", 0)))
        dropped.add_metric([device, "expired"], float(spool.get("spool_dropped_expired", 0)))
        dropped.add_metric([device, "unsendable"], float(spool.get("spool_dropped_unsendable", 0)))
        yield dropped
        health = message.get("health") or {}
        up = GaugeMetricFamily(
            "edge_agent_healthy",
            "1 when every agent thread is alive and progressing, 0 when degraded.",
            labels=["device"],
        )
        up.add_metric([device], 1.0 if health.get("state") == "ok" else 0.0)
        yield up
        puback = GaugeMetricFamily(
            "edge_agent_puback_ms",
            "Time from a job's arrival to its acknowledgement, over the window.",
            labels=["device", "quantile"],
        )
        for quantile, key in (("0.5", "puback_ms_p50"), ("0.99", "puback_ms_p99")):
            if isinstance(message.get(key), int | float):
                puback.add_metric([device, quantile], float(message[key]))
        yield puback
        for name, (path, text) in COUNTERS.items():
            counter = CounterMetricFamily(name, text, labels=["device"])
            counter.add_metric([device], float(_get(message, path) or 0))
            yield counter
        throttled = message.get("throttled")
        if isinstance(throttled, dict):
            flags = GaugeMetricFamily(
                "edge_agent_throttled", "Pi firmware throttling flags.", labels=["device", "flag"]
            )
            for flag, on in throttled.items():
                flags.add_metric([device, flag], 1.0 if on else 0.0)
            yield flags


class MetricsServer:
    """The /metrics endpoint (a thread of prometheus_client's)."""

    def __init__(self, port: int, bind: str, snapshot: Snapshot) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_TelemetryCollector(snapshot))
        self._server, self._thread = start_http_server(port, addr=bind, registry=self.registry)
        self.port = int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
