"""Labeled rows: what `edge-agent eval` scores and what a profile learns from (the format of
tests/data/eval/README.md), read and checked, with errors that name the file and the line.

    classify  {"text", "labels", "label"}
    extract   {"text", "fields": {name: "string"|"number"|"integer"}, "expected": {...}}
              or {"text", "schema": {...}, "expected": {...}}

Each row gets `_kind` ("classify" or "extract"), `_split` ("tune": every third row from
the first, unless the row says "split"; else "test") and `_line` (its line number).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from edge_agent.core.errors import ConfigError
from edge_agent.core.schema import schema_for_fields

TUNE, TEST = "tune", "test"


def load_rows(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: not JSON: {exc}") from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ConfigError(f"{path}:{number}: a row needs at least `text`, a string")
        if "labels" in row and "label" in row:
            row["_kind"] = "classify"
            labels = row["labels"]
            if not (
                isinstance(labels, list)
                and labels
                and all(isinstance(x, str) for x in labels)
                and isinstance(row["label"], str)
                and row["label"] in labels
            ):
                raise ConfigError(
                    f"{path}:{number}: `labels` must be a list of strings holding `label`"
                )
        elif "expected" in row and ("fields" in row or "schema" in row):
            row["_kind"] = "extract"
            if not isinstance(row["expected"], dict):
                raise ConfigError(f"{path}:{number}: `expected` must be an object")
        else:
            raise ConfigError(
                f"{path}:{number}: neither a classify row (labels, label) nor an extract row "
                "(fields or schema, expected)"
            )
        split = row.get("split")
        if split not in (None, TUNE, TEST):
            raise ConfigError(f'{path}:{number}: split must be "{TUNE}" or "{TEST}"')
        row["_split"] = split or (TUNE if len(rows) % 3 == 0 else TEST)
        row["_line"] = number
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def schema_of(row: dict[str, Any]) -> dict[str, Any]:
    """An extract row's JSON Schema (`schema`, or the one `fields` stands for)."""
    schema = row.get("schema")
    if isinstance(schema, dict):
        return schema
    try:
        return schema_for_fields(row["fields"])
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"line {row.get('_line')}: `fields` is not usable: {exc}") from exc


def file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
