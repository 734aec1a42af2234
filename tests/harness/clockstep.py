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

import shutil
from pathlib import Path

from tests.harness.native import compiled

SOURCE = Path(__file__).with_name("clockstep.c")


def why_unavailable() -> str | None:
    if shutil.which("cc") is None:
        return "no C compiler"
    return None


def build() -> Path:
    """Compile clockstep.c once per source version; the library's path."""
    return compiled(SOURCE, "clockstep.so", ["-shared", "-fPIC", "-ldl"])


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
