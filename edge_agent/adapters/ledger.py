"""The operations ledger: the board's mode (serving, draining, drained) and the latest
state of each remote operation, in one small JSON file under the state directory,
replaced atomically on every change (write, fsync, rename).

A full or read-only disk does not stop an operation: the write fails, is logged, and
the state still goes to the broker; only what survives a restart is lost. A file that
does not parse (a torn write on a filesystem without atomic rename, a hand edit) is set
aside as `operations.json.bad` and the board starts serving with an empty ledger.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from edge_agent.core.operations import Mode, Record

log = structlog.get_logger("edge_agent.ledger")

MODES: tuple[Mode, ...] = ("serving", "draining", "drained")


@dataclass
class LedgerData:
    mode: Mode = "serving"
    records: dict[str, Record] = field(default_factory=dict)
    # the models.lock entry an operation switched to (None: the configured or automatic
    # choice); the next start loads it first
    model: str | None = None


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.problem: str | None = None

    def load(self) -> LedgerData:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return LedgerData()
        except OSError as exc:
            log.error("ledger.unreadable", path=str(self.path), error=str(exc))
            return LedgerData()
        try:
            data = json.loads(text)
            mode = data.get("mode", "serving")
            if mode not in MODES:
                raise ValueError(f"mode {mode!r}")
            records = [Record.from_dict(item) for item in data.get("operations", [])]
            model = data.get("model")
            if model is not None and not isinstance(model, str):
                raise ValueError(f"model {model!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("ledger.corrupt", path=str(self.path), error=str(exc))
            with contextlib.suppress(OSError):
                self.path.replace(self.path.with_suffix(".json.bad"))
            return LedgerData()
        return LedgerData(mode=mode, records={r.id: r for r in records}, model=model)

    def save(self, data: LedgerData) -> bool:
        body: dict[str, Any] = {
            "v": 1,
            "mode": data.mode,
            "model": data.model,
            "operations": [r.to_dict() for r in data.records.values()],
        }
        text = json.dumps(body, separators=(",", ":"))
        tmp = self.path.with_suffix(".json.tmp")
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with tmp.open("w") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                tmp.replace(self.path)
            except OSError as exc:
                if self.problem is None:
                    log.error("ledger.not_saved", path=str(self.path), error=str(exc))
                self.problem = f"operations ledger not saved: {exc}"
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                return False
            if self.problem is not None:
                log.info("ledger.saved_again", path=str(self.path))
            self.problem = None
            return True
