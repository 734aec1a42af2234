"""The test harness's own C helpers (slowfs.c, clockstep.c), compiled once per source version
into a cache outside the repository: only a C compiler is needed, as on a fresh Debian with
build-essential."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-agent"


def compiled(source: Path, name: str, flags: list[str]) -> Path:
    """`source` built with `cc -O2 -Wall <flags>` into the cache as `name-<digest>`."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = CACHE / source.stem / f"{name}-{digest}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # two runs at once
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(tmp), str(source), *flags], check=True)
    tmp.replace(target)
    return target
