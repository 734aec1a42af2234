"""systemd's notify protocol, in a few lines over $NOTIFY_SOCKET (no extra dependency).

    READY=1      the model is loaded and the broker connected (Type=notify)
    STATUS=...   what the agent is doing, shown by `systemctl status`
    STOPPING=1   a clean shutdown began
    WATCHDOG=1   sent only while the agent makes forward progress (WatchdogSec=): a wedged
                 inference stops the pings and systemd restarts the service

Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("edge_agent.systemd")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        path = environ.get("NOTIFY_SOCKET")
        self.address: str | None = None
        if path:
            # "@name" is a socket in the abstract namespace (a leading NUL byte).
            self.address = "\0" + path[1:] if path.startswith("@") else path
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_s: float | None = int(usec) / 1e6 if watched else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    self._sock = socket.socket(socket.AF_UNIX, kind)
                self._sock.sendto(message, self.address)
            except OSError as exc:
                log.warning("systemd.notify_failed", error=str(exc))
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """Pings the watchdog at half its period while `healthy()` says the agent progresses."""

    def __init__(self, notifier: Notifier, healthy: Callable[[], bool]) -> None:
        self.notifier = notifier
        self.healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0

    def start(self) -> None:
        if self.notifier.watchdog_s is None:
            return
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        assert self.notifier.watchdog_s is not None
        period = self.notifier.watchdog_s / 2
        wedged_since: float | None = None
        while not self._stop.wait(period):
            if self.healthy():
                wedged_since = None
                if self.notifier.notify("WATCHDOG=1"):
                    self.pings += 1
            elif wedged_since is None:
                wedged_since = time.monotonic()
                log.error("systemd.watchdog_withheld", reason="no forward progress")
