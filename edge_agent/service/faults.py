"""Test-only fault injection, so tests can show what the agent does when a thread dies or
wedges, without mocks.

Read once at start-up from the environment variable EDGE_AGENT_FAULT:

    inference-die:<job id>     the inference thread dies when it takes that job
    inference-wedge:<job id>   the inference thread hangs on that job, making no progress
                               (the systemd watchdog then stops, and systemd restarts the agent)

Nothing a message can carry turns a fault on: only the process's own environment, which
the operator (or a test) controls. Unset, every check is one comparison with None.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

log = structlog.get_logger("edge_agent.faults")

ENV = "EDGE_AGENT_FAULT"
KINDS = ("inference-die", "inference-wedge")


class InjectedFault(BaseException):
    """Raised by an injected fault: a BaseException, so the loop's own `except Exception`
    does not catch it, as it would not catch a real bug that ends a thread."""


@dataclass(frozen=True)
class Faults:
    kind: str | None = None
    job_id: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Faults:
        value = (os.environ if env is None else env).get(ENV, "")
        if not value:
            return cls()
        kind, _, job_id = value.partition(":")
        if kind not in KINDS or not job_id:
            log.warning("faults.ignored", value=value, expected=f"{'|'.join(KINDS)}:<job id>")
            return cls()
        log.warning("faults.armed", kind=kind, job_id=job_id)
        return cls(kind, job_id)

    def on_inference(self, job_id: str) -> None:
        """Called by the inference thread as it takes a job."""
        if self.kind is None or job_id != self.job_id:
            return
        log.warning("faults.fired", kind=self.kind, job_id=job_id)
        if self.kind == "inference-die":
            raise InjectedFault(f"injected: inference thread dies on job {job_id}")
        threading.Event().wait()  # inference-wedge: hang here, no progress, for good
