"""`edge-agent eval`: how well a model does on a dataset of classify or extract rows.

The row format is ../shared/eval's (tests/data/eval/README.md):
    classify  {"text", "labels", "label"}
    extract   {"text", "fields": {name: "string"|"number"|"integer"}, "expected": {...}}
              or {"text", "schema": {...}, "expected": {...}}
Users run it on their own data to choose a model for their fleet.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.constraint import JsonConstraint
from edge_agent.errors import ConfigError
from edge_agent.metrics import percentile
from edge_agent.prompt import classify_plan, extract_plan
from edge_agent.schema import SchemaLimits, compile_schema, problems, schema_for_fields

Progress = Callable[[int, int], None]


def load_rows(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: not JSON: {exc}") from exc
        if not isinstance(row, dict) or "text" not in row:
            raise ConfigError(f"{path}:{number}: a row needs at least `text`")
        if "labels" in row and "label" in row:
            row["_kind"] = "classify"
        elif "expected" in row and ("fields" in row or "schema" in row):
            row["_kind"] = "extract"
        else:
            raise ConfigError(
                f"{path}:{number}: neither a classify row (labels, label) nor an extract row "
                "(fields or schema, expected)"
            )
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


@dataclass
class EvalResult:
    dataset: str
    model: str
    rows: int = 0
    classify_rows: int = 0
    correct: int = 0
    extract_rows: int = 0
    exact: int = 0
    fields_total: int = 0
    fields_right: int = 0
    valid: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    confusions: Counter[tuple[str, str]] = field(default_factory=Counter)

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
            "dataset": self.dataset,
            "model": self.model,
            "rows": self.rows,
            "accuracy": _round(self.accuracy),
            "exact_match": _round(self.exact_match),
            "field_accuracy": _round(self.field_accuracy),
            "schema_validity": _round(self.validity),
            "latency_ms_p50": _round(percentile(self.latencies_ms, 50), 1),
            "latency_ms_p95": _round(percentile(self.latencies_ms, 95), 1),
            "top_confusions": [
                {"expected": a, "got": b, "count": n}
                for (a, b), n in self.confusions.most_common(5)
            ],
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def evaluate(
    engine: Any,
    rows: Sequence[dict[str, Any]],
    dataset: str,
    model: str,
    progress: Progress = lambda _done, _total: None,
) -> EvalResult:
    result = EvalResult(dataset=dataset, model=model)
    constraints: dict[str, JsonConstraint] = {}
    for index, row in enumerate(rows, start=1):
        start = time.perf_counter()
        if row["_kind"] == "classify":
            labels = list(row["labels"])
            found = engine.classify(classify_plan(labels, None, []), row["text"], labels)
            result.classify_rows += 1
            if found.label == row["label"]:
                result.correct += 1
            else:
                result.confusions[(row["label"], found.label)] += 1
        else:
            schema = row.get("schema") or schema_for_fields(row["fields"])
            key = json.dumps(schema, sort_keys=True)
            if key not in constraints:
                constraints[key] = JsonConstraint(compile_schema(schema, SchemaLimits()))
            out = engine.extract(extract_plan(schema, None, []), row["text"], constraints[key], 256)
            data = json.loads(out.text)
            expected = row["expected"]
            result.extract_rows += 1
            result.exact += data == expected
            result.valid += not problems(data, schema)
            for name, value in expected.items():
                result.fields_total += 1
                result.fields_right += _same_value(data.get(name), value)
        result.latencies_ms.append((time.perf_counter() - start) * 1000)
        result.rows += 1
        progress(index, len(rows))
    return result


def _same_value(got: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        try:
            return abs(float(got) - float(want)) < 1e-9
        except (TypeError, ValueError):
            return False
    return bool(got == want)
