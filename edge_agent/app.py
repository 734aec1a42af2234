"""The composition root: the one place where settings, model, engine, worker, MQTT and
telemetry meet. `Agent.run()` is what `edge-agent run` and the systemd unit start.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import structlog

from edge_agent import __version__
from edge_agent.catalog import DEFAULT_MODEL, Catalog, ModelEntry, load_lock
from edge_agent.errors import ConfigError
from edge_agent.metrics import Metrics
from edge_agent.mqtt import Incoming, LinkConfig, MqttLink
from edge_agent.outbox import Outbox
from edge_agent.probe import BoardFacts, Sampler, board_facts
from edge_agent.protocol import KINDS, Delivery, JobLimits, ModelRef, Topics
from edge_agent.runner import JobRunner
from edge_agent.schema import SchemaLimits
from edge_agent.settings import Settings
from edge_agent.store import entry_for_path, locate, verify
from edge_agent.telemetry import Identity, TelemetryLoop, build_telemetry
from edge_agent.worker import Ack, Worker

log = structlog.get_logger("edge_agent.app")


def default_lock_path() -> Path:
    return Path(str(resources.files("edge_agent") / "data" / "models.lock"))


def load_catalog(settings: Settings) -> Catalog:
    return load_lock(settings.model.lock_file or default_lock_path())


@dataclass(frozen=True)
class LoadedModel:
    path: Path
    entry: ModelEntry | None
    sha256: str
    reason: str

    @property
    def ref(self) -> ModelRef:
        if self.entry is not None:
            return ModelRef(name=self.entry.name, quant=self.entry.quant, sha256=self.sha256)
        return ModelRef(name=self.path.stem, quant="unknown", sha256=self.sha256)


def resolve_model(settings: Settings, catalog: Catalog) -> LoadedModel:
    """The verified file to load: the configured entry or path, else the bundled default."""
    wanted = settings.model.name
    if wanted is None:
        entry = catalog.get(DEFAULT_MODEL)
        if entry is None:
            raise ConfigError(f"models.lock has no entry {DEFAULT_MODEL}")
        reason = "no model configured: the bundled default"
        path = locate(entry, settings.model_dir)
    elif (entry := catalog.get(wanted)) is not None:
        reason = f"configured: {wanted}"
        path = locate(entry, settings.model_dir)
    else:
        path = Path(wanted).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"model.name: {wanted!r} is neither a models.lock entry nor an existing file"
            )
        entry = entry_for_path(catalog, path)
        reason = f"configured path: {path}"
    digest = verify(path, entry, settings.model.allow_unpinned)
    return LoadedModel(path=path, entry=entry, sha256=digest, reason=reason)


def thread_counts(settings: Settings, cores: int) -> tuple[int, int]:
    """Generation leaves a core for the OS and MQTT on boards with 4 or more."""
    gen = settings.model.n_threads or (cores if cores <= 2 else cores - 1)
    batch = settings.model.n_threads_batch or cores
    return gen, batch


def job_limits(settings: Settings) -> JobLimits:
    j = settings.jobs
    return JobLimits(
        max_payload_bytes=j.max_payload_bytes,
        max_text_chars=j.max_text_chars,
        max_labels=j.max_labels,
        max_label_chars=j.max_label_chars,
        max_instructions_chars=j.max_instructions_chars,
        max_examples=j.max_examples,
        schema=SchemaLimits(
            max_depth=j.max_schema_depth,
            max_properties=j.max_schema_properties,
            max_enum=j.max_enum_values,
            max_string_chars=j.max_string_chars,
            max_items=j.max_array_items,
        ),
        reply_topic_prefixes=settings.mqtt.reply_topic_prefixes,
    )


def topics_for(settings: Settings) -> Topics:
    return Topics(
        prefix=settings.mqtt.topic_prefix,
        device_id=settings.device_id,
        share_group=settings.mqtt.share_group,
    )


def link_config(settings: Settings, will_topic: str | None) -> LinkConfig:
    m = settings.mqtt
    return LinkConfig(
        host=m.host,
        port=m.port,
        client_id=settings.client_id,
        protocol=m.protocol,
        keepalive_s=m.keepalive_s,
        session_expiry_s=m.session_expiry_s,
        receive_maximum=m.receive_maximum,
        username=m.username,
        password=m.password.get_secret_value() if m.password else None,
        tls=m.tls,
        ca_file=str(m.ca_file) if m.ca_file else None,
        cert_file=str(m.cert_file) if m.cert_file else None,
        key_file=str(m.key_file) if m.key_file else None,
        tls_insecure=m.tls_insecure,
        will_topic=will_topic,
        reconnect_min_s=m.reconnect_min_s,
        reconnect_max_s=m.reconnect_max_s,
    )


def next_session(state_dir: Path) -> int:
    """A counter that grows on every start, so dashboards can tell restarts from reconnects."""
    path = state_dir / "session"
    try:
        current = int(path.read_text().strip())
    except (OSError, ValueError):
        current = 0
    session = current + 1
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{session}\n")
        tmp.replace(path)
    except OSError as exc:
        log.warning("state.session_not_saved", error=str(exc))
    return session


class Agent:
    """One running edge-agent."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = topics_for(settings)
        self.metrics = Metrics()
        self._stop = threading.Event()
        self.board: BoardFacts | None = None
        self.model: LoadedModel | None = None
        self.session = 0
        self._link: MqttLink | None = None

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self) -> int:
        from edge_agent.engine import EngineConfig, LlamaEngine  # keeps `--help` fast

        s = self.settings
        self.session = next_session(s.state_dir)
        self.board = board_facts()
        catalog = load_catalog(s)
        self.model = resolve_model(s, catalog)
        gen_threads, batch_threads = thread_counts(s, self.board.cpu_cores)
        t0 = time.perf_counter()
        engine = LlamaEngine(
            self.model.path,
            EngineConfig(
                n_ctx=s.model.n_ctx or 2048,
                n_threads=gen_threads,
                n_threads_batch=batch_threads,
                n_ubatch=s.model.n_ubatch,
                max_sequences=s.jobs.max_labels + 1,
                prefix_cache_bytes=s.model.prefix_cache_mb * 1024 * 1024,
            ),
        )
        log.info(
            "model.loaded",
            name=self.model.ref.name,
            quant=self.model.ref.quant,
            path=str(self.model.path),
            sha256=self.model.sha256,
            reason=self.model.reason,
            load_ms=round((time.perf_counter() - t0) * 1000),
            threads=gen_threads,
            threads_batch=batch_threads,
            n_ctx=engine.facts.n_ctx,
        )
        link_holder: list[MqttLink] = []
        outbox = Outbox(_LazyLink(link_holder))
        worker = Worker(
            JobRunner(engine),
            outbox,
            self.metrics,
            topics=self.topics,
            limits=job_limits(s),
            model=self.model.ref,
            max_queue=s.jobs.max_queue,
        )
        link = MqttLink(
            link_config(s, will_topic=self.topics.status()),
            subscriptions=self._subscriptions,
            on_message=lambda msg, ack: self._dispatch(worker, msg, ack),
            on_connected=lambda _present: self._announce(),
        )
        link_holder.append(link)
        self._link = link
        sampler = Sampler(s.model_dir)
        identity = Identity(
            device=s.device_id,
            session=self.session,
            model_name=self.model.ref.name,
            model_quant=self.model.ref.quant,
        )
        telemetry = TelemetryLoop(
            s.telemetry.interval_s,
            make=lambda: build_telemetry(
                identity, sampler.read(), self.metrics.snapshot(), worker.depth
            ),
            publish=lambda payload: self._publish_telemetry(link, payload),
        )
        worker.start()
        link.start()
        telemetry.start()
        log.info(
            "agent.started",
            device=s.device_id,
            broker=s.mqtt.broker,
            session=self.session,
            version=__version__,
        )
        try:
            self._stop.wait()
        finally:
            log.info("agent.stopping")
            telemetry.stop()
            worker.stop(timeout=30.0)
            link.stop(final=(self.topics.status(), b"stopped"))
            engine.close()
            log.info("agent.stopped")
        return 0

    def _subscriptions(self) -> list[tuple[str, int]]:
        t = self.topics
        fleet = (
            [t.shared_fleet_jobs(k) for k in KINDS]
            if self.settings.mqtt.protocol == "5"
            else [t.fleet_jobs(k) for k in KINDS]
        )
        device = [t.device_jobs(k) for k in KINDS]
        control = [t.fleet_cancel(), t.device_cancel(), t.fleet_rebirth(), t.device_rebirth()]
        return [(topic, 1) for topic in [*fleet, *device, *control]]

    def _dispatch(self, worker: Worker, msg: Incoming, ack: Ack) -> None:
        t = self.topics
        if t.kind_of(msg.topic) is not None:
            worker.receive(
                Delivery(
                    topic=msg.topic,
                    payload=msg.payload,
                    received_at=time.time(),
                    response_topic=msg.response_topic,
                    correlation_data=msg.correlation_data,
                    expiry_s=msg.expiry_s,
                ),
                ack,
            )
            return
        ack()
        if msg.topic in (t.fleet_cancel(), t.device_cancel()):
            job_id = _cancel_id(msg.payload)
            if job_id is not None:
                found = worker.cancel(job_id)
                log.info("job.cancel_requested", job_id=job_id, found=found)
        elif msg.topic in (t.fleet_rebirth(), t.device_rebirth()):
            self._announce()

    def _publish_telemetry(self, link: MqttLink, payload: bytes) -> None:
        link.publish(self.topics.telemetry(), payload, qos=0)

    def _announce(self) -> None:
        """Publish presence on every connect (and on rebirth)."""
        if self._link is not None:
            self._link.publish(self.topics.status(), b"online", qos=1, retain=True)


class _LazyLink:
    """Lets the outbox exist before the link (they reference each other)."""

    def __init__(self, holder: list[MqttLink]) -> None:
        self._holder = holder

    def publish(self, topic: str, payload: bytes, **kwargs: Any) -> int | None:
        return self._holder[0].publish(topic, payload, **kwargs) if self._holder else None


def _cancel_id(payload: bytes) -> str | None:
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    job_id = data.get("id") if isinstance(data, dict) else None
    return job_id if isinstance(job_id, str) and job_id else None


def install_signal_handlers(agent: Agent) -> None:
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, agent.request_stop)
