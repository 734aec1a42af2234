"""structlog set-up: JSON lines off a terminal (journald, files), readable on one.

Event names are stable and dotted (`job.completed`, `mqtt.reconnect_scheduled`); values go
in keywords. `bind_job` puts the job id on every line logged while a job runs.

Under systemd, journald gives every line of a service's output priority 6 (info) unless
the line starts with an sd-daemon(3) prefix `<N>`. When `$JOURNAL_STREAM` says our output
stream is the journal, each line gets the prefix of its level, so `journalctl -p warning`
finds warnings and errors (and no info lines); elsewhere lines are left as they are.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# syslog priorities, as sd-daemon(3) prefixes them
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def configure(
    level: str = "info",
    fmt: str = "auto",
    stream: Any = None,
    env: Mapping[str, str] | None = None,
) -> None:
    out = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and hasattr(out, "isatty") and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if console
        else structlog.processors.JSONRenderer()
    )
    if writes_to_journal(out, os.environ if env is None else env):
        renderer = _JournalPriority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def writes_to_journal(stream: Any, env: Mapping[str, str]) -> bool:
    """$JOURNAL_STREAM is "<device>:<inode>" of the stream systemd connected to the
    journal; it names ours only if our stream's descriptor is that very socket."""
    value = env.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)


class _JournalPriority:
    """Wraps the renderer: `<N>` before each line, N the syslog priority of its level."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> str:
        level = str(event_dict.get("level", method_name))
        text = self._renderer(logger, method_name, event_dict)
        return f"<{PRIORITY.get(level, 6)}>{text}"


def bind_job(job_id: str | None) -> None:
    structlog.contextvars.clear_contextvars()
    if job_id is not None:
        structlog.contextvars.bind_contextvars(job_id=job_id)
