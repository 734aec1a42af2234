"""The composition root: the one place where settings, model, engine, worker, MQTT and
telemetry meet. `Agent.run()` is what `edge-agent run` and the systemd unit start.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from edge_agent import __version__
from edge_agent.adapters import log as logs
from edge_agent.adapters.journal import POISON_AFTER_CRASHES, Journal, RunningMarker
from edge_agent.adapters.ledger import Ledger
from edge_agent.adapters.mqtt import (
    LinkConfig,
    MqttLink,
    PacketTooLarge,
    Subscription,
    tls_context,
)
from edge_agent.adapters.probe import BoardFacts, Sampler, board_facts, boot_id
from edge_agent.adapters.settings import Settings, operation_settings
from edge_agent.adapters.store import load_lock, record_loaded
from edge_agent.adapters.systemd import Notifier, Watchdog
from edge_agent.core.catalog import LABEL_SEQUENCES, Catalog
from edge_agent.core.clock import StepWatch
from edge_agent.core.errors import ConfigError, EngineUnavailable, JobError
from edge_agent.core.fairness import ShapeBudget
from edge_agent.core.metrics import Metrics
from edge_agent.core.operations import (
    NOT_BUILT,
    ConfigArgs,
    Failed,
    Mode,
    ModelArgs,
    Op,
    OpCode,
)
from edge_agent.core.protocol import (
    KINDS,
    JobLimits,
    Profile,
    Topics,
    check_profile,
)
from edge_agent.core.schema import SchemaLimits
from edge_agent.core.wire import WIRE_VERSION, Info
from edge_agent.service import reconfigure
from edge_agent.service.faults import Faults
from edge_agent.service.health import Health
from edge_agent.service.intake import Handing, Intake
from edge_agent.service.learning import (
    Learned,
    ProfileRows,
    learn,
    read_profile_rows,
    with_rows,
)
from edge_agent.service.loader import Loaded, import_engine, load_model
from edge_agent.service.modelswap import Fleet, ModelSwap, Progress
from edge_agent.service.operations import Operations
from edge_agent.service.outbox import Outbox
from edge_agent.service.runner import JobRunner
from edge_agent.service.telemetry import (
    Identity,
    TelemetryLoop,
    build_info,
    build_telemetry,
    encode,
    ha_discovery,
    status_line,
)
from edge_agent.service.worker import Worker

if TYPE_CHECKING:
    from edge_agent.adapters.engine import LlamaEngine

log = structlog.get_logger("edge_agent.app")

EX_SOFTWARE = 70  # the agent stopped itself: a thread died or stalled (sysexits.h)


def default_lock_path() -> Path:
    return Path(str(resources.files("edge_agent") / "data" / "models.lock"))


def load_catalog(settings: Settings) -> Catalog:
    return load_lock(settings.model.lock_file or default_lock_path())


def open_engine(path: Path, settings: Settings, board: BoardFacts) -> LlamaEngine:
    """Load `path` with the context the settings ask for."""
    from edge_agent.adapters.engine import EngineConfig, LlamaEngine

    gen_threads, batch_threads = thread_counts(settings, board.cpu_cores)
    parallel = parallel_jobs(settings, board.cpu_cores, board.ram_budget_bytes)
    return LlamaEngine(
        path,
        EngineConfig(
            n_ctx=settings.n_ctx,
            n_threads=gen_threads,
            n_threads_batch=batch_threads,
            n_ubatch=settings.model.n_ubatch,
            parallel=parallel,
            # A prefix slot per running job: a job whose shape is new builds its prefix
            # in a slot of its own while the others keep theirs (with one slot, every other
            # shape's jobs waited for the build: issue 21's new-labels flood).
            prefix_slots=parallel,
            label_sequences=min(settings.jobs.max_labels, LABEL_SEQUENCES),
            prefix_cache_bytes=settings.model.prefix_cache_mb * 1024 * 1024,
            kv_cache_type=settings.model.kv_cache_type,
        ),
    )


def parallel_jobs(settings: Settings, cores: int, ram_bytes: int) -> int:
    """Jobs at once: the setting, else 4 where batching paid on 2 cores (bench/throughput.py,
    Gemma-3-270M: 1.3x the classify and 1.7x the extract jobs/s of one at a time for 4 MiB;
    8 gave 1.4x and 1.8x for 12 MiB, and less on SmolLM2) and one job at a time on
    single-core or sub-GiB boards, where a burst would only share a starved core."""
    if settings.jobs.parallel is not None:
        return settings.jobs.parallel
    return 4 if cores >= 2 and ram_bytes >= 1024**3 else 1


def receive_window(parallel: int, max_queue: int) -> int:
    """Receive Maximum when unset: a batch running and the next one waiting, but never more
    than the queue holds (the broker's extra jobs would be answered `overloaded`)."""
    return min(2 * parallel, parallel + max_queue)


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
        max_prompt_chars=j.max_prompt_chars,
        schema=SchemaLimits(
            max_depth=j.max_schema_depth,
            max_properties=j.max_schema_properties,
            max_enum=j.max_enum_values,
            max_string_chars=j.max_string_chars,
            max_items=j.max_array_items,
        ),
        reply_topic_prefixes=settings.mqtt.reply_topic_prefixes,
    )


def configured_profiles(settings: Settings) -> dict[str, Profile]:
    """The profiles as configured, unchecked (a profile with rows gets its labels or
    schema from them: `job_profiles`)."""
    return {
        name: Profile(
            kind=p.kind,
            instructions=p.instructions,
            labels=p.labels,
            schema=p.json_schema,
            examples=tuple((e.text, e.answer) for e in p.examples),
            label_descriptions=tuple(p.label_descriptions.items()),
            min_confidence=p.min_confidence,
        )
        for name, p in settings.profiles.items()
    }


def job_profiles(
    settings: Settings, rows: Mapping[str, ProfileRows] | None = None
) -> dict[str, Profile]:
    """The configured profiles, checked: one that could never make a valid job is a
    configuration error (exit 78), not a stream of rejected jobs. A profile with a rows
    file takes its labels or schema from the rows (`rows`: read already, else read here)."""
    limits = job_limits(settings)
    configured = configured_profiles(settings)
    if rows is None:
        rows = read_profile_rows(settings, configured)
    out = with_rows(configured, rows)
    for name, profile in out.items():
        try:
            check_profile(name, profile, limits)
        except JobError as exc:
            raise ConfigError(f"profiles.{name}: {exc.message}") from exc
    return out


def topics_for(settings: Settings) -> Topics:
    return Topics(
        prefix=settings.mqtt.topic_prefix,
        device_id=settings.device_id,
        share_group=settings.mqtt.share_group,
        discovery_prefix=settings.telemetry.discovery_prefix,
    )


def link_config(settings: Settings, will_topic: str | None, parallel: int = 1) -> LinkConfig:
    """The MQTT link's settings for an agent that runs `parallel` jobs at once."""
    m = settings.mqtt
    return LinkConfig(
        host=m.host,
        port=m.port,
        client_id=settings.client_id,
        protocol=m.protocol,
        keepalive_s=m.keepalive_s,
        session_expiry_s=m.session_expiry_s,
        receive_maximum=m.receive_maximum or receive_window(parallel, settings.jobs.max_queue),
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
        max_packet_bytes=m.max_packet_bytes,
    )


def check_connection_settings(link: LinkConfig) -> None:
    """Refuse what can never connect (TLS files missing, unreadable, mismatched) with a
    ConfigError naming the setting, and warn about a password sent in clear text."""
    if link.tls:
        tls_context(link.ca_file, link.cert_file, link.key_file, link.tls_insecure)
    elif link.password is not None and link.host not in ("localhost", "127.0.0.1", "::1"):
        log.warning(
            "mqtt.password_in_clear",
            broker=f"{link.host}:{link.port}",
            hint="use an mqtts:// broker URL or mqtt.ca_file",
        )


def switched_model(settings: Settings, catalog: Catalog) -> Settings:
    """The settings with the model an operation switched to (kept in the operations
    ledger), if any: it is tried first; should it not load, the loader's chain goes on
    as always, down to the bundled default."""
    name = Ledger(settings.state_dir / "operations.json").load().model
    if name is None:
        return settings
    if catalog.get(name) is None:
        log.warning("model.switch_ignored", name=name, reason="no longer in models.lock")
        return settings
    log.info("model.switched_by_operation", name=name)
    return settings.model_copy(update={"model": settings.model.model_copy(update={"name": name})})


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

    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self._ready = False
        self.topics = topics_for(settings)
        self.metrics = Metrics()
        self._stop = threading.Event()
        self.board: BoardFacts | None = None
        self.model: Loaded[LlamaEngine] | None = None
        self.session = 0
        self._link: MqttLink | None = None
        self._info: dict[str, Any] | None = None
        self._discovery: list[tuple[str, dict[str, Any]]] = []
        self._telemetry: TelemetryLoop | None = None
        self.health = Health()
        self.rows: dict[str, ProfileRows] = {}
        self.learned: dict[str, Learned] = {}
        self.operations: Operations | None = None
        self._identity: Identity | None = None
        self._intake: Intake | None = None
        self._exit_code = 0  # what the process exits with once stopped (0: asked to stop)

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def exit_with(self, code: int) -> None:
        """Stop, and exit with `code` (operation restart: 75, which systemd restarts)."""
        self._exit_code = code
        self._stop.set()

    def run(self) -> int:
        s = self.settings
        notifier = self.notifier
        board = self.board = board_facts()
        parallel = parallel_jobs(s, board.cpu_cores, board.ram_budget_bytes)
        link_settings = link_config(s, will_topic=self.topics.status(), parallel=parallel)
        if link_settings.password:
            logs.TAIL.redact(link_settings.password)  # the `logs` operation never sends it
        changed, by, problem = operation_settings(s.state_dir)
        if problem is not None:
            log.error("settings.operations_unreadable", problem=problem)
        elif changed:  # `edge-agent config --sources` says which and who
            log.warning("settings.from_operations", keys=sorted(by), notice=True)
        check_connection_settings(link_settings)  # before minutes of model loading
        # profiles' rows files too: a row that does not parse is exit 78, not a late surprise
        self.rows = read_profile_rows(s, configured_profiles(s))
        job_profiles(s, self.rows)
        # systemd arms the watchdog when the process starts: ping through the model load too
        # (TimeoutStartSec= bounds that), then only while jobs make progress.
        watchdog = Watchdog(notifier, self._progressing)
        watchdog.start()
        try:
            return self._serve(link_settings, self._load())
        finally:
            watchdog.stop()
            notifier.close()

    def _loaded(self) -> Loaded[LlamaEngine]:
        assert self.model is not None
        return self.model

    def _learn(self, engine: Any, sha256: str) -> dict[str, Learned]:
        """What the profiles' rows teach `engine` (a model switch learns them again)."""
        if not self.rows:
            return {}
        s = self.settings
        return learn(self.rows, job_profiles(s, self.rows), engine, engine.tokens,
                     engine.facts.n_layer, sha256, s.state_dir / "learned")  # fmt: skip

    def _swapped(self, new: Loaded[LlamaEngine], learned: Mapping[str, Learned]) -> None:
        """A model switch is done: what the agent tells about itself follows."""
        self.model = new
        self.learned = dict(learned)
        if self._intake is not None:
            self._intake.model = new.ref
        if new.entry is not None:
            record_loaded(self.settings.model_dir, new.entry.name)
        if self._identity is not None:
            self._identity = replace(
                self._identity, model_name=new.ref.name, model_quant=new.ref.quant
            )
            self._info = self._device_info(new, self._identity)
        self.notifier.status(f"serving {new.ref.name} over {self.settings.mqtt.broker}")
        self._announce()
        if self._telemetry is not None:
            self._telemetry.publish_now()

    def _learning_progress(self, profile: str, done: int, total: int) -> None:
        """systemctl status shows how far learning a profile's rows is (every 10th row)."""
        if done == total or done % 10 == 0:
            self.notifier.status(f"learning profile {profile}'s rows: {done} of {total}")

    def _progressing(self) -> bool:
        """The watchdog's test: every supervised thread alive and none stalled (an idle
        inference thread is fine; a running job must decode something now and then).
        Conditions that degrade health without a dead thread (a full disk, a greedy
        requester) do not stop it: a restart would not cure them."""
        return not self.health.report().fatal

    def _load(self) -> Loaded[LlamaEngine]:
        s = self.settings
        try:
            import_engine()  # before choosing a model: a missing library fails them all
        except EngineUnavailable as exc:
            log.critical("engine.unavailable", reason=str(exc))
            raise
        self.session = next_session(s.state_dir)
        board = self.board = self.board or board_facts()
        catalog = load_catalog(s)
        s = self.settings = switched_model(s, catalog)
        gen_threads, batch_threads = thread_counts(s, board.cpu_cores)
        t0 = time.perf_counter()
        self.notifier.status("selecting, verifying and loading the model")
        loaded = load_model(s, catalog, board, lambda path: open_engine(path, s, board))
        engine = loaded.engine
        self.model = loaded
        if self.rows:
            self.notifier.status("learning from the profiles' rows")
            self.learned = learn(
                self.rows,
                job_profiles(s, self.rows),
                engine,
                engine.tokens,
                engine.facts.n_layer,
                loaded.sha256,
                s.state_dir / "learned",
                progress=self._learning_progress,
            )
        log.info(
            "model.loaded",
            name=loaded.ref.name,
            quant=loaded.ref.quant,
            path=str(loaded.path),
            sha256=loaded.sha256,
            reason=loaded.reason,
            load_ms=round((time.perf_counter() - t0) * 1000),
            threads=gen_threads,
            threads_batch=batch_threads,
            n_ctx=engine.facts.n_ctx,
            parallel=engine.capacity,
        )
        return loaded

    def _serve(self, link_settings: LinkConfig, loaded: Loaded[LlamaEngine]) -> int:
        s = self.settings
        notifier = self.notifier
        engine = loaded.engine
        health = self.health
        stall = s.health.stall_after_s
        p = self._pipeline(link_settings, loaded)
        outbox, worker, intake, link = p.outbox, p.worker, p.intake, p.link
        sampler = Sampler(s.model_dir)
        identity = self._identity = Identity(
            device=s.device_id,
            session=self.session,
            model_name=loaded.ref.name,
            model_quant=loaded.ref.quant,
        )
        self._info = self._device_info(loaded, identity)
        snapshot = self._snapshot(p, sampler)

        def tick() -> dict[str, Any]:
            payload = snapshot()
            if self._ready:
                notifier.status(status_line(payload, link.connected))
            return payload

        telemetry = TelemetryLoop(
            s.telemetry.interval_s,
            make=tick,
            publish=lambda payload: self._publish_telemetry(link, payload),
            beat=health.beat("telemetry", max(stall, 3 * s.telemetry.interval_s)),
        )
        self._telemetry = telemetry
        health.watch("telemetry", telemetry.problem)
        if s.telemetry.home_assistant:
            self._discovery = self._ha_configs(sampler)
        exporter = self._start_exporter(snapshot, loaded) if s.telemetry.prometheus_port else None
        outbox.start()
        worker.start()
        intake.start()
        p.operations.start()
        notifier.status(f"model {loaded.ref.name} loaded; connecting to {s.mqtt.broker}")
        link.start()
        telemetry.start()
        log.info(
            "agent.started",
            device=s.device_id,
            broker=s.mqtt.broker,
            session=self.session,
            version=__version__,
        )
        code = 0
        try:
            code = self._watch(telemetry)
        finally:
            self._shutdown(p, engine, telemetry, exporter, code)
        return code

    def _shutdown(
        self, p: _Pipeline, engine: Any, telemetry: TelemetryLoop, exporter: Any, code: int
    ) -> None:
        """Stop the threads in order: nothing new in, running jobs finish (up to their
        grace), their replies out, then the link and the journal."""
        s = self.settings
        intake, worker, outbox, link, journal = p.intake, p.worker, p.outbox, p.link, p.journal
        degraded = code == EX_SOFTWARE
        log.info("agent.stopping", degraded=degraded)
        self.notifier.stopping()
        telemetry.stop()
        if exporter is not None:
            exporter.close()
        intake.stop()  # what it had not read stays unacknowledged: redelivered later
        p.operations.stop()
        worker.stop(grace=min(5.0, s.jobs.stop_grace_s) if degraded else s.jobs.stop_grace_s)
        # A stop that ended running jobs is not a crash: they are not counted toward
        # poison at the next start (the worker clears the marker once it drops them;
        # this covers a worker stuck in one engine step past its grace).
        p.marker.clear()
        outbox.drain(timeout=10.0)
        # A degraded stop is a failure: leave `offline` (as the Last Will would) rather
        # than `stopped`, which tells dashboards someone stopped it on purpose.
        link.stop(final=(self.topics.status(), b"offline" if degraded else b"stopped"))
        outbox.stop()
        if not degraded:  # a wedged thread may still be inside llama.cpp
            engine.close()
        journal.close()
        log.info("agent.stopped", exit_code=code)

    def _snapshot(self, p: _Pipeline, sampler: Sampler) -> Callable[[], dict[str, Any]]:
        """What makes one telemetry message (the timer's, and /metrics')."""

        def clamped(fields: list[str]) -> None:
            log.warning("telemetry.clamped", fields=fields)
            self.metrics.bump("telemetry_clamped", len(fields))

        def identity() -> Identity:
            assert self._identity is not None  # set before telemetry starts
            return self._identity

        def snapshot() -> dict[str, Any]:
            counters = {**self.metrics.snapshot(), "spool": p.journal.counts()}
            counters["health"] = self.health.report().to_dict()
            counters["intake_backlog"] = p.intake.backlog
            counters["mode"] = p.operations.mode
            return build_telemetry(
                identity(), sampler.read(), counters, p.worker.depth, on_clamped=clamped
            )

        return snapshot

    def _pipeline(self, link_settings: LinkConfig, loaded: Loaded[LlamaEngine]) -> _Pipeline:
        """Journal, outbox, inference, intake and the MQTT link, wired: a message goes
        link -> intake -> worker -> outbox -> link (docs/architecture.md)."""
        s = self.settings
        health = self.health
        stall = s.health.stall_after_s
        journal = Journal(
            s.state_dir / "journal.db",
            dedup_window_s=s.jobs.dedup_window_s,
            spool_max=s.jobs.spool_max,
            synchronous=s.jobs.journal_sync.upper(),
            boot=boot_id(),
        )
        health.watch("journal", lambda: journal.problem)
        marker = RunningMarker(s.state_dir / "running")
        suspects = self._count_crash(marker, journal)
        link_holder: list[MqttLink] = []
        outbox = Outbox(_LazyLink(link_holder), journal, self.metrics, health.beat("outbox", stall))
        runner = JobRunner(
            loaded.engine,
            min_confidence=s.jobs.min_confidence,
            learned=self.learned,
            tokens=loaded.engine.tokens,
        )
        worker = Worker(
            runner,
            outbox,
            self.metrics,
            topics=self.topics,
            model=loaded.ref,
            max_queue=s.jobs.max_queue,
            suspects=suspects,
            beat=health.beat("inference", stall),
            marker=marker,
            faults=Faults.from_env(),
            window=link_settings.receive_maximum
            if s.mqtt.protocol == "5"
            else loaded.engine.capacity + s.jobs.max_queue,
            fair_window_s=s.jobs.fair_window_s,
            aging_s=s.jobs.aging_s,
        )
        health.watch("scheduler", worker.condition)
        controls = _Controls(self, worker, link_holder)
        operations = Operations(
            topics=self.topics,
            controls=controls,
            ledger=Ledger(s.state_dir / "operations.json"),
            publish=_LazyLink(link_holder).publish,
            session=self.session,
            beat=health.beat("operations", stall),
        )
        self.operations = operations
        health.watch("ledger", lambda: operations.ledger.problem)
        mode = operations.recover()
        if mode != "serving":
            log.warning("agent.mode", mode=mode, notice=True, reason="left so by the last run")
        intake = Intake(
            topics=self.topics,
            limits=job_limits(s),
            worker=worker,
            outbox=outbox,
            metrics=self.metrics,
            model=loaded.ref,
            journal=journal,
            profiles=job_profiles(s, self.rows),
            handing=Handing(s.jobs.handoff, s.jobs.handoff_keep, s.jobs.handoff_max_hops),
            mqtt5=s.mqtt.protocol == "5",
            budget=runner.check_budget,
            shape=runner.shape,
            shapes=ShapeBudget(s.jobs.new_shapes_per_minute, s.jobs.new_shapes_burst),
            on_rebirth=self._announce,
            on_ha_online=self._ha_online,
            on_operation=operations.submit,
            draining=lambda: operations.mode != "serving",
            beat=health.beat("intake", stall),
        )
        controls.intake = intake  # its backlog counts as jobs held while draining
        controls.runner = runner
        self._intake = intake
        controls.swap = ModelSwap(
            settings=s,
            catalog=lambda: load_catalog(s),
            board=self.board or board_facts(),
            open_engine=lambda path: open_engine(path, s, self.board or board_facts()),
            learn=self._learn,
            worker=worker,
            runner=runner,
            current=self._loaded,
            swapped=self._swapped,
            fatal=lambda why: self.exit_with(EX_SOFTWARE),
            topics=self.topics,
            limits=job_limits(s),
        )
        link = MqttLink(
            link_settings,
            subscriptions=self._subscriptions,
            on_message=intake.submit,
            on_connected=lambda _present: self._on_connected(outbox),
            on_disconnected=lambda: self._on_disconnected(outbox),
            on_published=outbox.on_published,
            on_acked=self.metrics.record_ack,
        )
        link_holder.append(link)
        self._link = link
        return _Pipeline(journal, outbox, worker, intake, link, marker, operations)

    def _watch(self, telemetry: TelemetryLoop) -> int:
        """The main thread: wait for a stop signal, watching health. A change of health is
        published at once (info and telemetry); without a systemd watchdog to do it, a
        degraded agent ends itself after `health.exit_after_s` so it gets restarted."""
        state = "ok"
        clock = StepWatch(time.time, time.monotonic)
        while not self._stop.wait(1.0):
            step = clock.check()
            if step is not None:
                # Durations and deadlines run on the monotonic clock: nothing expires or
                # revives; the step is only told (a Pi without a real-time clock gets its
                # time from NTP after boot).
                log.warning("clock.stepped", seconds=round(step, 3))
                self.metrics.bump("clock_steps")
            report = self.health.report()
            if report.state != state:
                state = report.state
                log.warning("health.changed", state=state, reasons=list(report.reasons))
                self._announce()
                telemetry.publish_now()
            if (
                report.fatal
                and self.notifier.watchdog_s is None
                and self.health.degraded_for() >= self.settings.health.exit_after_s
            ):
                log.critical("agent.exiting_degraded", reasons=list(report.reasons))
                return EX_SOFTWARE
        return self._exit_code

    def _count_crash(self, marker: RunningMarker, journal: Journal) -> set[str]:
        """If the last process died while running jobs, find the one to blame: a job that
        was running alone is counted (one that did it twice is answered `job_crashed`
        from then on, never run again). Jobs that were running together are suspects:
        each runs alone until it has been answered, so a second crash names the job."""
        left = marker.take()
        if len(left) == 1:
            digest, job_id = left[0]
            count = journal.note_crash(digest, job_id)
            log.error(
                "agent.died_while_running",
                job_id=job_id,
                times=count,
                poison=count >= POISON_AFTER_CRASHES,
            )
            return set()
        if left:
            log.error("agent.died_while_running", job_ids=[job_id for _, job_id in left])
        return {digest for digest, _ in left}

    def fleet_topics(self) -> list[str]:
        """The fleet's job topics (shared under MQTT 5): left while drained."""
        t = self.topics
        if self.settings.mqtt.protocol == "5":
            return [t.shared_fleet_jobs(k) for k in KINDS]
        return [t.fleet_jobs(k) for k in KINDS]

    def _subscriptions(self) -> list[Subscription]:
        t = self.topics
        serving = self.operations is None or self.operations.mode == "serving"
        fleet = self.fleet_topics() if serving else []
        device = [t.device_jobs(k) for k in KINDS]
        control = [t.fleet_cancel(), t.device_cancel(), t.fleet_rebirth(), t.device_rebirth()]
        control.append(t.operate())
        if self.settings.telemetry.home_assistant:
            control.append(t.ha_status())
        return [Subscription(topic) for topic in [*fleet, *device, *control]]

    def _on_connected(self, outbox: Outbox) -> None:
        model = self.model.ref.name if self.model is not None else "?"
        line = f"serving {model} over {self.settings.mqtt.broker}"
        if not self._ready:
            self._ready = True
            self.notifier.ready(line)  # model loaded and broker connected: Type=notify READY
        else:
            self.notifier.status(line)
        self._announce()
        if self.operations is not None:
            self.operations.republish()  # states that changed while the broker was away
        outbox.flush()  # replies that waited for the broker go out oldest first

    def _ha_online(self) -> None:
        """Home Assistant (re)started: announce again, with fresh figures."""
        self._announce()
        if self._telemetry is not None:
            self._telemetry.publish_now()

    def _on_disconnected(self, outbox: Outbox) -> None:
        outbox.on_link_lost()
        if not self._stop.is_set():
            self.notifier.status(f"broker {self.settings.mqtt.broker} unreachable, reconnecting")

    def _publish_telemetry(self, link: MqttLink, payload: bytes) -> None:
        link.publish(self.topics.telemetry(), payload, qos=0)

    def _announce(self) -> None:
        """Publish device info, then presence, on every connect (and on rebirth, and when
        health changes). One message the broker would not take (too large for its packet
        limit) is logged and skipped; the others still go."""
        link = self._link
        if link is None:
            return
        messages: list[tuple[str, bytes]] = []
        if self._info is not None:
            info = Info.model_validate({**self._info, "health": self.health.report().to_dict()})
            messages.append((self.topics.info(), encode(info.model_dump(mode="json"))))
        messages.extend((topic, encode(config)) for topic, config in self._discovery)
        messages.append((self.topics.status(), b"online"))
        for topic, payload in messages:
            try:
                link.publish(topic, payload, qos=1, retain=True)
            except PacketTooLarge as exc:
                log.error("announce.too_large", topic=topic, error=str(exc))

    def _ha_configs(self, sampler: Sampler) -> list[tuple[str, dict[str, Any]]]:
        assert self.board is not None
        s = self.settings
        return ha_discovery(
            topics=self.topics,
            version=__version__,
            board_model=self.board.board_model,
            architecture=self.board.architecture,
            has_soc_temperature=sampler.read().soc_temperature_c is not None,
            interval_s=s.telemetry.interval_s,
        )

    def _start_exporter(
        self, snapshot: Callable[[], dict[str, Any]], loaded: Loaded[LlamaEngine]
    ) -> Any:
        from edge_agent.adapters.exporter import MetricsServer

        assert self.board is not None
        assert self.settings.telemetry.prometheus_port is not None
        labels = {
            "device": self.settings.device_id,
            "version": __version__,
            "model": loaded.ref.name,
            "quant": loaded.ref.quant,
            "architecture": self.board.architecture,
            "board": self.board.board_model or "unknown",
        }
        server = MetricsServer(
            self.settings.telemetry.prometheus_port,
            self.settings.telemetry.prometheus_bind,
            lambda: (snapshot(), labels),
        )
        log.info("metrics.serving", port=server.port, bind=self.settings.telemetry.prometheus_bind)
        return server

    def _device_info(self, loaded: Loaded[LlamaEngine], identity: Identity) -> dict[str, Any]:
        s = self.settings
        assert self.board is not None
        gen, batch = thread_counts(s, self.board.cpu_cores)
        limits = job_limits(s)
        capabilities = {
            "kinds": list(KINDS),
            "wire_version": WIRE_VERSION,
            "mqtt_protocol": s.mqtt.protocol,
            "max_payload_bytes": limits.max_payload_bytes,
            "max_text_chars": limits.max_text_chars,
            "max_labels": limits.max_labels,
            "max_label_chars": limits.max_label_chars,
            "max_examples": limits.max_examples,
            "schema": {
                "max_depth": limits.schema.max_depth,
                "max_properties": limits.schema.max_properties,
                "max_string_chars": limits.schema.max_string_chars,
                "max_array_items": limits.schema.max_items,
            },
            "max_queue": s.jobs.max_queue,
            "parallel": loaded.engine.capacity,
            # what each profile learned from its rows, and how good it is (docs/profiles.md)
            "profiles": {name: got.report.to_dict() for name, got in self.learned.items()},
            # the layer tap's own context, which learned classify profiles read through
            "profiles_tap_bytes": int(getattr(loaded.engine, "tap_bytes", 0)),
            # remote operations this agent runs (docs/operations.md)
            "operations": [op.value for op in Op if op not in NOT_BUILT],
        }
        model = loaded.report()
        model["context"] = loaded.engine.facts.n_ctx
        model["architecture"] = loaded.engine.facts.architecture
        runtime = {
            "n_threads": gen,
            "n_threads_batch": batch,
            "n_ctx": loaded.engine.facts.n_ctx,
            "n_ubatch": s.model.n_ubatch,
            "parallel": loaded.engine.capacity,
        }
        return build_info(identity, __version__, self.board.to_dict(), model, capabilities, runtime)


@dataclass(frozen=True)
class _Pipeline:
    journal: Journal
    outbox: Outbox
    worker: Worker
    intake: Intake
    link: MqttLink
    marker: RunningMarker
    operations: Operations


class _Controls:
    """What remote operations may do to a running agent (service.operations.Controls)."""

    def __init__(
        self,
        agent: Agent,
        worker: Worker,
        link: list[MqttLink],
        intake: Intake | None = None,
    ) -> None:
        self.agent = agent
        self.worker = worker
        self._link = link
        self.intake = intake
        self.swap: ModelSwap | None = None
        self.runner: JobRunner | None = None

    def leave_fleet(self) -> None:
        if self._link:
            self._link[0].unsubscribe(self.agent.fleet_topics())

    def join_fleet(self) -> None:
        if self._link:
            self._link[0].subscribe([Subscription(t) for t in self.agent.fleet_topics()])

    def in_flight(self) -> int:
        return self.worker.depth + (self.intake.backlog if self.intake is not None else 0)

    def cancel_all(self, why: str) -> tuple[int, int]:
        return self.worker.cancel_all(why)

    def set_log_level(self, level: str) -> None:
        logs.set_level(level)

    def configured_log_level(self) -> str:
        return self.agent.settings.log.level

    def log_tail(self, lines: int, since_s: float | None) -> list[str]:
        return logs.TAIL.last(lines, since_s)

    def payload_room(self, topic: str) -> int:
        return self._link[0].payload_room(topic) if self._link else 0

    def mode_changed(self, mode: Mode) -> None:
        line = f"{mode}: operation drain" if mode != "serving" else "serving again"
        self.agent.notifier.status(line)
        if self.agent._telemetry is not None:
            self.agent._telemetry.publish_now()

    def exit_for_restart(self, code: int) -> None:
        self.agent.exit_with(code)

    def switch_model(self, args: ModelArgs, fleet: Fleet, progress: Progress) -> dict[str, Any]:
        assert self.swap is not None
        return self.swap.switch(args, fleet, progress)

    def run_bench(self, rounds: int, progress: Progress) -> dict[str, Any]:
        """The board's benchmark on the serving engine, between jobs: no job starts
        meanwhile (queued ones wait; drain first to send them elsewhere)."""
        from edge_agent.service.benchmark import run_bench, save

        agent, runner = self.agent, self.runner
        assert runner is not None
        assert agent.model is not None
        assert agent.board is not None
        if not self.worker.pause(120.0):
            raise Failed(OpCode.TIMEOUT, "jobs still ran after 120 s; no benchmark")
        try:
            ref = agent.model.ref
            result = run_bench(
                runner.engine,
                model=(ref.name, ref.quant, ref.sha256),
                threads=thread_counts(agent.settings, agent.board.cpu_cores),
                cpu_cores=agent.board.cpu_cores,
                rounds=rounds,
                progress=lambda phase, done, total: progress(f"benchmark: {phase}", done, total),
            )
        finally:
            self.worker.resume()
        try:
            save(result, agent.settings.state_dir)  # the selector's speed preference reads it
        except OSError as exc:
            log.warning("bench.not_saved", error=str(exc))
        return result.to_dict()

    def apply_config(
        self, args: ConfigArgs, op_id: str, requester: str
    ) -> tuple[dict[str, Any], bool]:
        agent = self.agent
        state_dir = agent.settings.state_dir
        if args.reset:
            keys = reconfigure.forget(state_dir)
            return {"reset": keys, "restart": bool(keys)}, bool(keys)
        change = reconfigure.plan(agent.settings, args.set, args.persist)
        if args.persist:
            reconfigure.persist(state_dir, args.set, op_id, requester)
        new = change.settings
        if "log.level" in change.live:
            logs.set_level(new.log.level)
        if "jobs.min_confidence" in change.live and self.runner is not None:
            self.runner.min_confidence = new.jobs.min_confidence
        if "jobs.max_queue" in change.live:
            self.worker.max_queue = new.jobs.max_queue
        agent.settings = new  # health.exit_after_s and the log level to revert to follow
        result = {
            "changed": {k: {"from": a, "to": b} for k, (a, b) in change.changed.items()},
            "live": list(change.live),
            "restart": bool(change.restart),
            "persisted": args.persist,
        }
        return result, bool(change.restart)


class _LazyLink:
    """Lets the outbox exist before the link (they reference each other)."""

    def __init__(self, holder: list[MqttLink]) -> None:
        self._holder = holder

    @property
    def connected(self) -> bool:
        return bool(self._holder) and self._holder[0].connected

    def publish(self, topic: str, payload: bytes, **kwargs: Any) -> int | None:
        return self._holder[0].publish(topic, payload, **kwargs) if self._holder else None

    def payload_room(self, topic: str, **kwargs: Any) -> int:
        return self._holder[0].payload_room(topic, **kwargs) if self._holder else 0


def install_signal_handlers(agent: Agent) -> None:
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, agent.request_stop)
