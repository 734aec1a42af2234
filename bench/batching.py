"""How far a job's answer moves when it shares llama_decode with other jobs, and why.

    .venv/bin/python -m bench.batching               # 32 classify and 16 extract rows
    .venv/bin/python -m bench.batching --rows 8

The bundled SmolLM2-135M-Instruct Q4_1, 2 threads, the agent's engine. For N = 2, 4 and 8
jobs per batch (`jobs.parallel`), against the same jobs run one at a time:

1. classify (tests/data/eval/sensor_classify.jsonl): labels that differ (with how far the
   chosen label was ahead of the next when run alone), and the largest and median change
   of a label probability;
2. extract (sensor_extract.jsonl, greedy, the schema's constraint): answers not byte-identical;
3. the control: N copies of one classify job in one batch. The copies have the same tokens
   at the same positions, so any spread between them comes from where each sits in the
   batch and the KV buffer, that is from the order of floating-point sums (rounding), not
   from one job reading another's cells.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.performance import bundled_model
from edge_agent.adapters.engine import EngineConfig, LlamaEngine
from edge_agent.core.inference import Classification, Extraction, Task
from edge_agent.core.prompt import classify_plan, extract_plan
from edge_agent.core.schema import SchemaLimits, compile_schema, schema_for_fields
from edge_agent.service.runner import _constraint_for

ROOT = Path(__file__).resolve().parent.parent
EVAL = ROOT / "tests" / "data" / "eval"


def rows(name: str, n: int) -> list[dict[str, Any]]:
    lines = (EVAL / name).read_text().splitlines()
    return [json.loads(lines[i % len(lines)]) for i in range(n)]


def together(engine: LlamaEngine, tasks: Sequence[Task]) -> list[Any]:
    while not all(t.done for t in tasks):
        engine.step([t for t in tasks if not t.done])
    return [t.result() for t in tasks]


def in_groups(engine: LlamaEngine, jobs: Sequence[Job], n: int) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(jobs), n):
        out += together(engine, [job.begin(engine) for job in jobs[start : start + n]])
    return out


@dataclass(frozen=True)
class Job:
    row: dict[str, Any]
    node: Any = None  # the compiled schema of an extract job

    def begin(self, engine: LlamaEngine) -> Task:
        text = self.row["text"]
        if self.node is None:
            labels = self.row["labels"]
            return engine.begin_classify(classify_plan(labels, None, []), text, labels)
        plan = extract_plan(self.node, None, [])
        return engine.begin_extract(plan, text, _constraint_for(self.node).bind(text), 96)


def score_changes(a: Classification, b: Classification) -> list[float]:
    return [abs(a.scores[k] - b.scores[k]) for k in a.scores]


def margin(c: Classification) -> float:
    """How far the chosen label's probability is ahead of the next one's."""
    top = sorted(c.scores.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else 1.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=32, help="classify rows (extract: half)")
    args = parser.parse_args()
    model = bundled_model()
    cjobs = [Job(r) for r in rows("sensor_classify.jsonl", args.rows)]
    ejobs = [
        Job(r, compile_schema(schema_for_fields(r["fields"]), SchemaLimits()))
        for r in rows("sensor_extract.jsonl", max(1, args.rows // 2))
    ]
    print(
        "| jobs per batch | classify labels changed (their margin alone) | largest probability change "
        "| median change | extract answers changed | spread between identical copies |"
    )
    print("|---|---|---|---|---|---|", flush=True)
    alone_c: list[Classification] = []
    alone_e: list[Extraction] = []
    for n in (1, 2, 4, 8):
        engine = LlamaEngine(model, EngineConfig(n_threads=2, n_threads_batch=2, parallel=n))
        try:
            got_c = in_groups(engine, cjobs, n)
            got_e = in_groups(engine, ejobs, n)
            copies = together(engine, [cjobs[0].begin(engine) for _ in range(n)])
        finally:
            engine.close()
        if n == 1:
            alone_c, alone_e = got_c, got_e
            continue
        changes = [d for a, b in zip(alone_c, got_c, strict=True) for d in score_changes(a, b)]
        flipped = [a for a, b in zip(alone_c, got_c, strict=True) if a.label != b.label]
        margins = ", ".join(f"{margin(a):.3f}" for a in flipped) or "-"
        texts = sum(a.text != b.text for a, b in zip(alone_e, got_e, strict=True))
        spread = max(max(score_changes(copies[0], c)) for c in copies)
        print(
            f"| {n} | {len(flipped)} of {len(got_c)} ({margins}) | {max(changes):.3f} | "
            f"{statistics.median(changes):.4f} | {texts} of {len(got_e)} | {spread:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
