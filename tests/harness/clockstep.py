"""Step the wall clock of an agent process, as NTP does after a Pi boots without a
real-time clock (tests/harness/clockstep.c, an LD_PRELOAD shim; the monotonic clock is
left alone, as NTP leaves it).

    clock = ClockStep(tmp / "offset")
    agent = start_agent_process(..., env=clock.env())
    clock.step(3600)     # an hour forward from here
    clock.step(-7200)    # two hours back

The shim is built once per source version into a cache outside the repository (a C
compiler is all it needs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("clockstep.c")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-agent" / "clockstep"


def why_unavailable() -> str | None:
    if shutil.which("cc") is None:
        return "no C compiler"
    return None


def build() -> Path:
    """Compile clockstep.c once per source version; the library's path."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    library = CACHE / f"clockstep-{digest}.so"
    if library.exists():
        return library
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = library.with_suffix(".tmp")
    subprocess.run(
        ["cc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-ldl"],
        check=True,
    )
    tmp.replace(library)
    return library


class ClockStep:
    """The offset file a shimmed process reads its wall clock's offset from."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0.0
        self.library = build()
        path.write_text("0\n")

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.library), "CLOCKSTEP_FILE": str(self.path)}

    def step(self, seconds: float) -> None:
        """Move the process's wall clock by `seconds` from where it is now."""
        self.offset += seconds
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{self.offset}\n")
        tmp.replace(self.path)
