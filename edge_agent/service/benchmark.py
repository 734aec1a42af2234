"""`edge-agent bench`: how fast this board runs its model, in the figures the reply and
telemetry use. Orchestration over an engine; the results are kept in the state directory
(bench.json, service/measured.py) where the selector's speed preference reads them.
"""

from __future__ import annotations

import platform
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_agent.core.constraint import JsonConstraint
from edge_agent.core.metrics import percentile
from edge_agent.core.prompt import Message, PromptPlan, classify_plan, extract_plan
from edge_agent.core.schema import SchemaLimits, compile_schema
from edge_agent.service import measured

Progress = Callable[[str, int, int], None]  # (phase, done, total)

CLASSIFY_SAMPLES = [
    "Pump P-3 vibration 9.1 mm/s, above the alarm threshold.",
    "Freezer F-2 holding at -19.8 C, door closed.",
    "Smoke detected in hall 2, sprinklers active.",
    "Battery of tag T-9 at 15 percent, replace soon.",
    "Boiler B-2 outlet temperature 96 C, safety valve opened twice.",
    "Conveyor C-1 running at nominal speed.",
]
EXTRACT_SAMPLES = [
    "Sensor TS-7 reports humidity 48.5 % in the server room.",
    "Meter EM-2: voltage 229.8 V on phase L3.",
    "Vibration sensor VB-9 on fan F2 reads 4.4 mm/s.",
]
LABELS = ["normal", "warning", "critical"]
READING = {
    "type": "object",
    "properties": {
        "device": {"type": "string"},
        "metric": {"type": "string"},
        "value": {"type": "number"},
        "unit": {"type": "string"},
    },
    "required": ["device", "metric", "value", "unit"],
}
LONG_TEXT = {"type": "object", "properties": {"notes": {"type": "string", "maxLength": 256}}}


@dataclass(frozen=True)
class BenchResult:
    model: str
    quant: str
    sha256: str | None
    architecture: str
    cpu_cores: int
    n_threads: int
    n_threads_batch: int
    n_ctx: int
    prompt_tokens_per_second: float
    tokens_per_second: float
    constrained_tokens_per_second: float
    classify_ms_p50: float
    classify_ms_p95: float
    extract_ms_p50: float
    extract_ms_p95: float
    jobs: int
    measured_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_bench(
    engine: Any,
    *,
    model: tuple[str, str, str | None],
    threads: tuple[int, int],
    cpu_cores: int,
    rounds: int = 3,
    progress: Progress = lambda _phase, _done, _total: None,
) -> BenchResult:
    """Prompt and generation speed, constrained speed, and job latency (p50/p95)."""
    steps = rounds * 3 + rounds * (len(CLASSIFY_SAMPLES) + len(EXTRACT_SAMPLES))
    done = 0

    def tick(phase: str) -> None:
        nonlocal done
        done += 1
        progress(phase, done, steps)

    prompt_rates, gen_rates, constrained_rates = [], [], []
    filler = " ".join(f"Rule {i}: report the reading exactly as sent." for i in range(25))
    for _ in range(rounds):
        # A fresh instruction text each round, so nothing comes from the prefix cache.
        plan = PromptPlan(fixed=(Message("system", f"{uuid.uuid4().hex}. {filler}"),))
        t = engine.generate_free(plan, "Pump P-3 vibration 9.1 mm/s.", 0)
        prompt_rates.append(t.prompt_tokens_per_second or 0.0)
        tick("prompt")
        t = engine.generate_free(plan, "Describe the pump in detail.", 64)
        gen_rates.append(t.tokens_per_second or 0.0)
        tick("generation")
        notes = compile_schema(LONG_TEXT, SchemaLimits())
        schema_plan = extract_plan(notes, "Write long notes about the message.", [])
        constraint = JsonConstraint(notes)
        found = engine.extract(schema_plan, "Describe the pump in detail.", constraint, 64)
        constrained_rates.append(found.timings.tokens_per_second or 0.0)
        tick("constrained")
    classify_ms: list[float] = []
    extract_ms: list[float] = []
    c_plan = classify_plan(LABELS, None, [])
    reading = compile_schema(READING, SchemaLimits())
    e_plan = extract_plan(reading, None, [])
    e_constraint = JsonConstraint(reading)
    for _ in range(rounds):
        for text in CLASSIFY_SAMPLES:
            start = time.perf_counter()
            engine.classify(c_plan, text, LABELS)
            classify_ms.append((time.perf_counter() - start) * 1000)
            tick("classify")
        for text in EXTRACT_SAMPLES:
            start = time.perf_counter()
            engine.extract(e_plan, text, e_constraint, 128)
            extract_ms.append((time.perf_counter() - start) * 1000)
            tick("extract")
    name, quant, sha = model
    return BenchResult(
        model=name,
        quant=quant,
        sha256=sha,
        architecture=platform.machine(),
        cpu_cores=cpu_cores,
        n_threads=threads[0],
        n_threads_batch=threads[1],
        n_ctx=int(getattr(getattr(engine, "facts", None), "n_ctx", 0)),
        prompt_tokens_per_second=round(statistics.median(prompt_rates), 1),
        tokens_per_second=round(statistics.median(gen_rates), 1),
        constrained_tokens_per_second=round(statistics.median(constrained_rates), 1),
        classify_ms_p50=round(percentile(classify_ms, 50) or 0.0, 1),
        classify_ms_p95=round(percentile(classify_ms, 95) or 0.0, 1),
        extract_ms_p50=round(percentile(extract_ms, 50) or 0.0, 1),
        extract_ms_p95=round(percentile(extract_ms, 95) or 0.0, 1),
        jobs=len(classify_ms) + len(extract_ms),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def save(result: BenchResult, state_dir: Path) -> Path:
    """Keep the figures per model (the latest run of each) in <state_dir>/bench.json."""
    return measured.save(state_dir, result.model, result.to_dict())
