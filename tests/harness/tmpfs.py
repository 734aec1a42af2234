"""A small real filesystem that fills up: a tmpfs of a few MiB mounted for the test, and a
filler file that takes all its free space (`fill`) until `free` removes it. The agent's
state directory on it meets the disk-full errors an SD card gives.

Needs root (mount); `why_unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from types import TracebackType


def why_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    return None


class Tmpfs:
    def __init__(self, path: Path, size_kib: int = 4096) -> None:
        self.path = path
        self.size_kib = size_kib
        self._filler = path / ".filler"

    def __enter__(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_kib}k,mode=0755", "tmpfs",
             str(self.path)],
            check=True,
        )  # fmt: skip
        return self

    def fill(self) -> int:
        """Take every free byte; the bytes written."""
        written = 0
        with self._filler.open("ab", buffering=0) as f:
            for size in (65536, 4096, 512, 1):
                while True:
                    try:
                        written += f.write(b"\0" * size)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", str(self.path)], check=True)
