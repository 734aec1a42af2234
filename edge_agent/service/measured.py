"""What `edge-agent bench` measured on this board, kept per model in <state_dir>/bench.json.

service/benchmark.py writes the figures; the running agent reads the speeds at start-up
(the selector's speed preference, service/loader.py). Kept apart from the benchmark so
that `edge-agent run` does not import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BENCH_FILE = "bench.json"


def load(state_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((state_dir / BENCH_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save(state_dir: Path, model: str, figures: dict[str, Any]) -> Path:
    """Keep the figures per model (the latest run of each)."""
    path = state_dir / BENCH_FILE
    known = load(state_dir)
    known[model] = figures
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=2))
    tmp.replace(path)
    return path


def measured_speeds(state_dir: Path) -> dict[str, float]:
    """Generation tokens/s this board measured, by models.lock entry name."""
    return {
        name: float(figures["tokens_per_second"])
        for name, figures in load(state_dir).items()
        if isinstance(figures, dict) and figures.get("tokens_per_second")
    }
