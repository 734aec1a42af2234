"""`edge-agent eval`: how well a model does on a dataset of classify or extract rows, and
whether its confidence means something.

The row format is that of tests/data/eval (its README.md):
    classify  {"text", "labels", "label"}
    extract   {"text", "fields": {name: "string"|"number"|"integer"}, "expected": {...}}
              or {"text", "schema": {...}, "expected": {...}}

Rows are split so prompts cannot be tuned to the rows they are scored on: a row's `split`
("tune" or "test") if it has one, else every third row (0, 3, 6, ...) is "tune" and the
rest "test". Each row runs as a job would (`protocol.parse_job`, `runner.JobRunner`), with
up to `examples` few-shot examples taken from the tune rows of the same shape (per label,
for classify; never the row itself), as a profile would give them. Results come per
split; the reliability table sets the confidence of each answer (classify) or extracted
field against how often it was right.

Users run it on their own data to choose a model, a profile and a threshold.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.core.errors import ConfigError, JobError
from edge_agent.core.inference import Engine
from edge_agent.core.metrics import percentile
from edge_agent.core.protocol import Delivery, JobLimits, Topics, parse_job
from edge_agent.core.schema import problems, schema_for_fields
from edge_agent.core.wire import ClassifyResult
from edge_agent.service.rows import TEST, TUNE
from edge_agent.service.runner import JobRunner

Progress = Callable[[int, int], None]
BINS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)
_TOPICS = Topics("eval", "eval", "eval")
_LIMITS = JobLimits(max_prompt_chars=1_000_000, max_text_chars=1_000_000)


@dataclass
class Score:
    """One split's figures."""

    rows: int = 0
    classify_rows: int = 0
    correct: int = 0
    extract_rows: int = 0
    exact: int = 0
    fields_total: int = 0
    fields_right: int = 0
    valid: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.classify_rows if self.classify_rows else None

    @property
    def exact_match(self) -> float | None:
        return self.exact / self.extract_rows if self.extract_rows else None

    @property
    def field_accuracy(self) -> float | None:
        return self.fields_right / self.fields_total if self.fields_total else None

    @property
    def validity(self) -> float | None:
        return self.valid / self.extract_rows if self.extract_rows else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "accuracy": _round(self.accuracy),
            "exact_match": _round(self.exact_match),
            "field_accuracy": _round(self.field_accuracy),
            "schema_validity": _round(self.validity),
        }


@dataclass
class EvalResult:
    dataset: str
    model: str
    examples: int
    splits: dict[str, Score] = field(default_factory=lambda: {TUNE: Score(), TEST: Score()})
    latencies_ms: list[float] = field(default_factory=list)
    confusions: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (confidence, right) of every answer (classify) or extracted field, test split only
    judged: list[tuple[float, bool]] = field(default_factory=list)
    # every row's answer in row order: the label (classify) or the data (extract), for
    # comparing two runs row by row (bench/kvcache.py)
    answers: list[Any] = field(default_factory=list)

    @property
    def test(self) -> Score:
        return self.splits[TEST]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "model": self.model,
            "examples": self.examples,
            "tune": self.splits[TUNE].to_dict(),
            "test": self.splits[TEST].to_dict(),
            "latency_ms_p50": _round(percentile(self.latencies_ms, 50), 1),
            "latency_ms_p95": _round(percentile(self.latencies_ms, 95), 1),
            "top_confusions": [
                {"expected": a, "got": b, "count": n}
                for (a, b), n in self.confusions.most_common(5)
            ],
            "reliability": reliability(self.judged),
        }


def reliability(judged: Sequence[tuple[float, bool]]) -> list[dict[str, Any]]:
    """Confidence bins against how often the answers in them were right."""
    out = []
    for lo, hi in itertools.pairwise(BINS):
        inside = [right for conf, right in judged if lo <= conf < hi]
        out.append(
            {
                "from": lo,
                "to": min(hi, 1.0),
                "answers": len(inside),
                "right": _round(sum(inside) / len(inside)) if inside else None,
            }
        )
    return out


def above(judged: Sequence[tuple[float, bool]], threshold: float) -> tuple[int, float | None]:
    """How many answers are at or above `threshold`, and how often those are right."""
    picked = [right for conf, right in judged if conf >= threshold]
    return len(picked), (sum(picked) / len(picked) if picked else None)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def evaluate(
    engine: Engine,
    rows: Sequence[dict[str, Any]],
    dataset: str,
    model: str,
    examples: int = 2,
    progress: Progress = lambda _done, _total: None,
) -> EvalResult:
    """Run every row as a job; score it against its expected answer. The engine starts
    from a clean state, so the figures do not depend on what it ran before."""
    result = EvalResult(dataset=dataset, model=model, examples=examples)
    engine.reset()
    runner = JobRunner(engine)
    for index, row in enumerate(rows, start=1):
        score = result.splits[row["_split"]]
        job = _job(row, [r for r in rows if r["_split"] == TUNE and r is not row], examples)
        start = time.perf_counter()
        outcome = runner.run(job, lambda: False)
        result.latencies_ms.append((time.perf_counter() - start) * 1000)
        found = outcome.result
        result.answers.append(found.label if isinstance(found, ClassifyResult) else found.data)
        if isinstance(found, ClassifyResult):
            right = found.label == row["label"]
            score.classify_rows += 1
            score.correct += right
            if not right:
                result.confusions[(row["label"], found.label)] += 1
            if row["_split"] == TEST:
                result.judged.append((found.confidence, right))
        else:
            data, expected = found.data, row["expected"]
            score.extract_rows += 1
            score.exact += data == expected
            score.valid += job.node is not None and not problems(data, job.node)
            for name, value in expected.items():
                right = _same_value(data.get(name), value)
                score.fields_total += 1
                score.fields_right += right
                if row["_split"] == TEST and name in found.confidence:
                    result.judged.append((found.confidence[name], right))
        score.rows += 1
        progress(index, len(rows))
    return result


def _job(row: dict[str, Any], tune: list[dict[str, Any]], examples: int) -> Any:
    """The row as a job, with few-shot examples from the tune rows of its shape."""
    body: dict[str, Any] = {"id": "eval", "text": row["text"]}
    if row["_kind"] == "classify":
        body.update(kind="classify", labels=row["labels"])
        shots = []
        for label in row["labels"]:
            same = [r for r in tune if r["labels"] == row["labels"] and r["label"] == label]
            shots += [{"text": r["text"], "answer": label} for r in same[:examples]]
    else:
        schema = row.get("schema") or schema_for_fields(row["fields"])
        body.update(kind="extract", schema=schema)
        same = [r for r in tune if (r.get("schema") or schema_for_fields(r["fields"])) == schema]
        shots = [{"text": r["text"], "answer": r["expected"]} for r in same[:examples]]
    if shots:
        body["examples"] = shots
    delivery = Delivery(f"eval/jobs/{body['kind']}", json.dumps(body).encode(), time.time())
    try:
        return parse_job(delivery, _TOPICS, _LIMITS)
    except JobError as exc:
        raise ConfigError(f"row {row['text'][:40]!r}: {exc.message}") from exc


def _same_value(got: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        try:
            return abs(float(got) - float(want)) < 1e-9
        except (TypeError, ValueError):
            return False
    return bool(got == want)
