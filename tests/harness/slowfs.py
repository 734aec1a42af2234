"""A directory on storage whose every fsync takes a second or more (tests/harness/slowfs.c, a FUSE
filesystem), for the chaos runs: the agent's state directory on it shows what a worn SD
card's slow flushes do to the agent.

    with SlowFs(tmp / "backing", tmp / "state", fsync_ms=1000) as state_dir:
        ... start an agent with --state-dir state_dir ...

The filesystem is real: SQLite's fsync goes through the kernel's FUSE driver to the
daemon, which waits `fsync_ms` before flushing the backing file. Needs root (or
user_allow_other), /dev/fuse, and libfuse3 (Debian packages fuse3, libfuse3-dev: the test
set-up installs them). The binary is built once into a cache outside the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.harness.native import compiled

SOURCE = Path(__file__).with_name("slowfs.c")


class SlowFsUnavailable(RuntimeError):
    """This machine cannot mount it (no /dev/fuse, no libfuse3, not root)."""


def why_unavailable() -> str | None:
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    if os.geteuid() != 0:
        return "mounting with allow_other needs root"
    if shutil.which("fusermount3") is None or not Path("/usr/include/fuse3/fuse.h").exists():
        return "libfuse3 is not installed (apt-get install fuse3 libfuse3-dev)"
    if shutil.which("cc") is None:
        return "no C compiler"
    return None


def build() -> Path:
    """Compile slowfs.c once per source version; the binary's path."""
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True, check=True
    ).stdout.split()
    return compiled(SOURCE, "slowfs", flags)


class SlowFs:
    """Mount a slowfs of `backing` on `mountpoint` for the duration of a `with`."""

    def __init__(self, backing: Path, mountpoint: Path, fsync_ms: int = 1000) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.fsync_ms = fsync_ms
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Path:
        why = why_unavailable()
        if why is not None:
            raise SlowFsUnavailable(why)
        binary = build()
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [str(binary), str(self.backing), str(self.mountpoint), "-f", "-o", "allow_other"],
            env={**os.environ, "SLOWFS_FSYNC_MS": str(self.fsync_ms)},
            # libfuse 3.14 warns about its own default thread limit on every mount
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not os.path.ismount(self.mountpoint):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise SlowFsUnavailable("slowfs did not mount")
            time.sleep(0.05)
        return self.mountpoint

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
