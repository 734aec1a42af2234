"""Operation `model` (docs/operations.md): switch the running agent to another models.lock
entry without ever leaving it without a model.

    resolve ──► fetch (mirror or URL, resumable, retried) and verify the sha256
            ──► plan: beside the old model if memory allows, else drain first
            ──► load ──► learn the profiles' rows ──► answer a test job
            ──► swap between jobs ──► close the old one

Every step before the swap leaves the old model serving, untouched: a failure there ends
the operation `failed` and the board goes on as it was. On the drain-first path the old
model is closed before the new one loads; if the new one does not load or answer, the old
one is loaded again. Nothing is kept until the swap is done: a process that dies on the
way starts again with the model it had.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from edge_agent.adapters.probe import BoardFacts, available_ram
from edge_agent.adapters.settings import Settings
from edge_agent.adapters.store import fetch, locate, verify
from edge_agent.core.catalog import Catalog, ModelEntry, estimate
from edge_agent.core.errors import ChecksumMismatch, ModelError, ModelNotFound, StoreError
from edge_agent.core.operations import Failed, Mode, ModelArgs, OpCode
from edge_agent.core.protocol import Delivery, JobLimits, Topics, parse_job, reply_route
from edge_agent.service.loader import Loaded, policy_for, selection_for
from edge_agent.service.runner import JobRunner
from edge_agent.service.worker import Worker

log = structlog.get_logger("edge_agent.modelswap")

TEST_LABELS = ("normal", "fault")
PAUSE_S = 120.0  # the longest the swap waits for the running jobs to finish

Progress = Callable[[str, int | None, int | None], None]  # message, done, total


@dataclass
class Fleet:
    """What a drain-first switch needs of the agent (the operations service gives it)."""

    leave: Callable[[], None]
    join: Callable[[], None]
    in_flight: Callable[[], int]
    serving: Callable[[], bool]  # the board was taking fleet jobs before the switch
    show: Callable[[Mode], None]  # the mode dashboards see meanwhile (not kept)


class ModelSwap:
    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Callable[[], Catalog],
        board: BoardFacts,
        open_engine: Callable[[Path], Any],
        learn: Callable[[Any, str], Mapping[str, Any]],
        worker: Worker,
        runner: JobRunner,
        current: Callable[[], Loaded[Any]],
        swapped: Callable[[Loaded[Any], Mapping[str, Any]], None],
        fatal: Callable[[str], None],
        topics: Topics,
        limits: JobLimits,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.board = board
        self.open_engine = open_engine
        self.learn = learn
        self.worker = worker
        self.runner = runner
        self.current = current
        self.swapped = swapped
        self.fatal = fatal
        self.topics = topics
        self.limits = limits

    def switch(self, args: ModelArgs, fleet: Fleet, progress: Progress) -> dict[str, Any]:
        t0 = time.monotonic()
        deadline = t0 + args.timeout_s
        old = self.current()
        entry = self._resolve(args.name)
        if old.entry is not None and entry.name == old.entry.name:
            return {"model": entry.name, "changed": False, "seconds": 0.0}
        path, fetched = self._fetch(entry, args.url, progress, deadline)
        need = estimate(entry, policy_for(self.settings).runtime).total
        free = available_ram()
        reserve = self.settings.model.reserve_mb * 1024 * 1024
        beside = args.plan == "auto" and need + reserve <= free
        plan = "beside" if beside else "drain_first"
        memory = {"plan": plan, "needed_bytes": need, "available_bytes": free,
                  "reserve_bytes": reserve}  # fmt: skip
        log.info("model.switching", name=entry.name, frm=old.ref.name, **memory)
        if beside:
            new, learned, timings = self._prepare(entry, path, progress)
            waited = self._swap_in(new, learned, old)
        else:
            new, learned, timings, waited = self._drained_swap(
                entry, path, old, fleet, progress, deadline
            )
        timings["swap_wait_s"] = round(waited, 3)
        self.swapped(new, learned)
        log.info("model.switched", name=entry.name, frm=old.ref.name, seconds=round(
            time.monotonic() - t0, 2), plan=plan)  # fmt: skip
        return {
            "model": entry.name,
            "quant": entry.quant,
            "sha256": new.sha256,
            "previous": old.ref.name,
            "changed": True,
            "downloaded_bytes": fetched,
            "memory": memory,
            "timings_s": timings,
            "seconds": round(time.monotonic() - t0, 3),
        }

    # ---- the steps ---------------------------------------------------------------------

    def _resolve(self, name: str) -> ModelEntry:
        catalog = self.catalog()
        if name != "auto":
            entry = catalog.get(name)
            if entry is None:
                known = ", ".join(e.name for e in catalog.entries[:12])
                raise Failed(OpCode.UNKNOWN_MODEL, f"{name!r} is not in models.lock ({known})")
            return entry
        # back to the configured (or automatic) choice: the first of its chain on this board
        for candidate in selection_for(self.settings, catalog, self.board).ranked:
            try:
                locate(candidate.entry, self.settings.model_dir)
            except ModelNotFound:
                continue
            return candidate.entry
        raise Failed(OpCode.UNKNOWN_MODEL, "no model of the automatic choice is on this board")

    def _fetch(
        self, entry: ModelEntry, url: str | None, progress: Progress, deadline: float
    ) -> tuple[Path, int]:
        """The verified file: on the board already (checked again), or downloaded."""
        model_dir = self.settings.model_dir
        allow = self.settings.model.allow_unpinned
        if not entry.pinned and not allow:
            raise Failed(OpCode.HASH_MISMATCH, f"{entry.name} has no sha256 in models.lock")
        try:
            path = locate(entry, model_dir)
        except ModelNotFound:
            path = None
        if path is not None:
            progress(f"verifying {path.name}", None, None)
            try:
                verify(path, entry, allow)
            except ChecksumMismatch as exc:
                raise Failed(OpCode.HASH_MISMATCH, str(exc)) from exc
            return path, 0
        source = entry.model_copy(update={"url": url, "mirror": None}) if url else entry
        mirror = None if url else self.settings.model.mirror
        shown = [0.0]

        def downloaded(done: int, total: int | None) -> None:
            now = time.monotonic()
            if now - shown[0] >= 1.0 or done == total:
                shown[0] = now
                progress(f"downloading {entry.file}", done, total)

        try:
            retry_s = max(1.0, min(300.0, deadline - time.monotonic()))
            got = fetch(source, model_dir, mirror=mirror, allow_unpinned=allow,
                        progress=downloaded, retry_s=retry_s)  # fmt: skip
        except StoreError as exc:
            code = OpCode.HASH_MISMATCH if "sha256" in str(exc) else OpCode.DOWNLOAD_FAILED
            raise Failed(code, str(exc)) from exc
        except ModelError as exc:
            raise Failed(OpCode.DOWNLOAD_FAILED, str(exc)) from exc
        return got.path, got.downloaded_bytes

    def _prepare(
        self, entry: ModelEntry, path: Path, progress: Progress
    ) -> tuple[Loaded[Any], dict[str, Any], dict[str, float]]:
        """Load, learn, test: the new model and what its profiles learned, ready to serve
        (or Failed, and closed)."""
        timings: dict[str, float] = {}
        t = time.monotonic()
        progress(f"loading {entry.name}", None, None)
        try:
            digest = verify(path, entry, self.settings.model.allow_unpinned)
            engine = self.open_engine(path)
        except ChecksumMismatch as exc:
            raise Failed(OpCode.HASH_MISMATCH, str(exc)) from exc
        except ModelError as exc:
            raise Failed(OpCode.LOAD_FAILED, str(exc)) from exc
        timings["load_s"] = round(time.monotonic() - t, 3)
        new = Loaded(engine, path, entry, digest, "switched by operation model")
        try:
            t = time.monotonic()
            progress(f"learning the profiles' rows with {entry.name}", None, None)
            learned = dict(self.learn(engine, digest))
            timings["learn_s"] = round(time.monotonic() - t, 3)
            t = time.monotonic()
            progress(f"answering a test job with {entry.name}", None, None)
            test = JobRunner(engine, min_confidence=self.runner.min_confidence,
                             learned=learned, tokens=engine.tokens)  # fmt: skip
            self._test_job(test)
            timings["test_s"] = round(time.monotonic() - t, 3)
        except Failed:
            engine.close()
            raise
        except Exception as exc:
            engine.close()
            raise Failed(OpCode.TEST_FAILED, f"{entry.name} could not answer: {exc!r}") from exc
        return new, learned, timings

    def _test_job(self, runner: JobRunner) -> None:
        data = {"id": "model-switch-test", "kind": "classify", "labels": list(TEST_LABELS),
                "text": "Pump P-3 is running at 1450 rpm, vibration 1.2 mm/s."}  # fmt: skip
        payload = json.dumps(data).encode()
        delivery = Delivery(
            topic=self.topics.device_jobs("classify"),
            payload=payload,
            received_at=time.monotonic(),
            kind="classify",
            wall_at=time.time(),
        )
        route = reply_route(delivery, data, self.topics, self.limits)
        job = parse_job(delivery, self.topics, self.limits, {}, data=data, route=route)
        runner.check_budget(job)
        outcome = runner.run(job, lambda: False)
        label = getattr(outcome.result, "label", None)
        if label not in TEST_LABELS:
            raise Failed(OpCode.TEST_FAILED, f"the test job was answered {label!r}")

    def _swap_in(self, new: Loaded[Any], learned: Mapping[str, Any], old: Loaded[Any]) -> float:
        """Between jobs: the runner takes the new engine; the old one is closed."""
        t = time.monotonic()
        if not self.worker.pause(PAUSE_S):
            new.engine.close()
            raise Failed(OpCode.TIMEOUT, f"jobs still ran after {PAUSE_S:g} s; nothing changed")
        try:
            self.runner.use(new.engine, learned, new.engine.tokens)
        finally:
            self.worker.resume(new.ref)
        waited = time.monotonic() - t
        old.engine.close()
        return waited

    def _drained_swap(
        self,
        entry: ModelEntry,
        path: Path,
        old: Loaded[Any],
        fleet: Fleet,
        progress: Progress,
        deadline: float,
    ) -> tuple[Loaded[Any], dict[str, Any], dict[str, float], float]:
        """Too little memory for both: drain, close the old model, load the new one; if
        it fails, load the old one again."""
        serving = fleet.serving()
        t = time.monotonic()
        fleet.show("draining")
        fleet.leave()
        try:
            while fleet.in_flight() > 0 and time.monotonic() < deadline:
                progress(f"draining before the switch: {fleet.in_flight()} job(s) left", None,
                         None)  # fmt: skip
                time.sleep(0.2)
            if not self.worker.pause(max(1.0, deadline - time.monotonic())):
                raise Failed(OpCode.TIMEOUT, "jobs still ran at the timeout; nothing changed")
            waited = time.monotonic() - t
            try:
                # fleet jobs the broker delivered late are refused `overloaded` meanwhile
                # (the intake must not tokenize with a closed engine)
                self.runner.suspend(f"switching to {entry.name}")
                old.engine.close()
                try:
                    new, learned, timings = self._prepare(entry, path, progress)
                except Failed:
                    progress(f"loading {old.ref.name} again", None, None)
                    self._reopen(old)
                    raise
                self.runner.use(new.engine, learned, new.engine.tokens)
                self.worker.resume(new.ref)
            except BaseException:
                self.worker.resume()
                raise
        finally:
            fleet.show("serving" if serving else "drained")
            if serving:
                fleet.join()
        return new, learned, timings, waited

    def _reopen(self, old: Loaded[Any]) -> None:
        """The old model again, after the new one failed on the drain-first path. It
        served a moment ago; should it not load now, the process ends (exit 70) and the
        loader's chain starts it with what it can load."""
        try:
            engine = self.open_engine(old.path)
            learned = dict(self.learn(engine, old.sha256))
        except Exception as exc:
            log.critical("model.reload_failed", name=old.ref.name, error=repr(exc))
            self.fatal(f"the old model {old.ref.name} did not load again: {exc!r}")
            raise
        old.engine = engine
        self.runner.use(engine, learned, engine.tokens)
