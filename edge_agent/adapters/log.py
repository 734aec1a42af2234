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
import threading
import time
from collections import deque
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
PRIORITY = {
    "debug": 7, "info": 6, "notice": 5, "warning": 4, "error": 3, "critical": 2, "exception": 3,
}  # fmt: skip
# The last lines the agent logged, kept for the `logs` operation (docs/operations.md).
TAIL_LINES = 5000
TAIL_LINE_CHARS = 4096
TAIL_CHARS = 2 * 1024 * 1024
# Values of these keys never reach a line: whatever logs them by mistake.
SECRET_KEYS = frozenset(
    {"password", "passwd", "secret", "authorization", "credentials", "api_key", "private_key"}
)
MASK = "**********"


class Tail:
    """The last lines rendered, with when each was logged (any thread): at most `size`
    lines and `max_chars` characters (a debug storm of long lines stays a few MiB)."""

    def __init__(self, size: int = TAIL_LINES, max_chars: int = TAIL_CHARS) -> None:
        self._lines: deque[tuple[float, str]] = deque()
        self._size = size
        self._max_chars = max_chars
        self._chars = 0
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, text: str) -> None:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if len(text) > TAIL_LINE_CHARS:
            text = text[: TAIL_LINE_CHARS - 1] + "…"
        with self._lock:
            self._lines.append((time.time(), text))
            self._chars += len(text)
            while self._lines and (len(self._lines) > self._size or self._chars > self._max_chars):
                self._chars -= len(self._lines.popleft()[1])

    def redact(self, secret: str) -> None:
        """Never keep `secret` in a line (the MQTT password; credentials' contents)."""
        if len(secret) >= 4:
            with self._lock:
                self._secrets = {*self._secrets, secret}

    def last(self, lines: int, since_s: float | None = None) -> list[str]:
        """The newest `lines` lines, oldest first; only the last `since_s` seconds'."""
        with self._lock:
            snapshot = list(self._lines)
        if since_s is not None:
            horizon = time.time() - since_s
            snapshot = [item for item in snapshot if item[0] >= horizon]
        return [text for _, text in snapshot[-lines:]] if lines > 0 else []


TAIL = Tail()
_configured: dict[str, Any] = {"level": "info"}


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
    renderer = _Kept(renderer, TAIL, as_json=None if not console else _JSON)
    if writes_to_journal(out, os.environ if env is None else env):
        renderer = _JournalPriority(renderer)
    _configured["level"] = level
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _notice,
            _mask_secrets,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    """Change the level of every logger now (the `log-level` operation)."""
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    _configured["level"] = level
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]))


def level() -> str:
    return str(_configured["level"])


def _notice(_logger: Any, _name: str, event_dict: Any) -> Any:
    """`notice=True` marks an audit line (an operation and its outcome): level `notice`,
    syslog priority 5. Logged through `warning`, so no log level hides it."""
    if event_dict.pop("notice", False):
        event_dict["level"] = "notice"
    return event_dict


def _mask_secrets(_logger: Any, _name: str, event_dict: Any) -> Any:
    for key in SECRET_KEYS.intersection(event_dict):
        event_dict[key] = MASK
    return event_dict


_JSON = structlog.processors.JSONRenderer()


class _Kept:
    """Wraps the renderer: each line is also kept in the tail, as JSON (a terminal's
    colored line is rendered once more for it)."""

    def __init__(self, renderer: Any, tail: Tail, as_json: Any = None) -> None:
        self._renderer = renderer
        self._tail = tail
        self._as_json = as_json

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> str:
        kept = None
        if self._as_json is not None:
            kept = self._as_json(logger, method_name, dict(event_dict))
        text = str(self._renderer(logger, method_name, event_dict))
        self._tail.add(text if kept is None else str(kept))
        return text


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
