"""A throwaway local broker for `edge-agent demo` and the tests.

Adapter over the `mosquitto` binary (Debian package `mosquitto`): a private config on a
free loopback port, its own persistence directory, and stop/kill/restart for fault tests.
Fleets run their own broker (deploy/mosquitto/); this is never used in production.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> Path | None:
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    for candidate in MOSQUITTO_PATHS:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a broker (a clean shutdown: final save, Wills), SIGKILL if it hangs."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class LocalBroker:
    """Mosquitto on 127.0.0.1:<free port>, configured the way our fleet config is."""

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        extra_config: str = "",
        binary: Path | None = None,
        verbose: bool = False,
    ) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise FileNotFoundError(
                "mosquitto is not installed (Debian: apt-get install mosquitto)"
            )
        self.binary = found
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="edge-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_config = extra_config
        self.verbose = verbose
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # Nagle's algorithm costs ~40-90 ms per request/reply round trip (REFERENCE.md §7).
            "set_tcp_nodelay true",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            "max_queued_messages 10000",
            "max_inflight_messages 20",
            # deploy/mosquitto/mosquitto.conf's limit: a client that publishes more is dropped
            "max_packet_size 131072",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # keep access to our private temp directory
        return "\n".join(lines) + "\n" + self.extra_config

    def start(self, timeout: float = 10.0) -> LocalBroker:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        self.process = subprocess.Popen(
            [str(self.binary), "-c", str(conf)],
            stdout=None if self.verbose else subprocess.DEVNULL,
            stderr=None if self.verbose else subprocess.DEVNULL,
            start_new_session=True,
        )
        if not wait_for_port(self.port, timeout):
            self.stop()
            raise RuntimeError(f"mosquitto did not start on port {self.port}; see {self.log_path}")
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no final autosave, no clean disconnects (a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process)

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()
