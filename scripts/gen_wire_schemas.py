"""Write docs/protocol.schema.json, docs/telemetry.schema.json and
docs/operations.schema.json from the wire models (edge_agent/core/wire.py, protocol.JobIn
for jobs, core/operations.py for remote operations).

    .venv/bin/python scripts/gen_wire_schemas.py          # regenerate
    .venv/bin/python scripts/gen_wire_schemas.py --check  # exit 1 if stale (a test runs this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic.json_schema import models_json_schema

from edge_agent.core.operations import (
    BenchArgs,
    ConfigArgs,
    DrainArgs,
    LogLevelArgs,
    LogsArgs,
    ModelArgs,
    OperationIn,
    OperationState,
    RestartArgs,
)
from edge_agent.core.protocol import JobIn
from edge_agent.core.wire import Info, ReplyMessage, Telemetry

DOCS = Path(__file__).resolve().parent.parent / "docs"
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def telemetry() -> dict[str, Any]:
    schema = Telemetry.model_json_schema(mode="serialization")
    return {
        "$schema": DRAFT,
        "$id": "https://edge-agent.invalid/telemetry.schema.json",
        "description": "The periodic message on <prefix>/devices/<device_id>/telemetry "
        "(docs/telemetry.md). Generated from edge_agent/core/wire.py.",
        **{k: v for k, v in schema.items() if k != "description"},
    }


def protocol() -> dict[str, Any]:
    _, schema = models_json_schema(
        [(JobIn, "validation"), (ReplyMessage, "serialization"), (Info, "serialization")],
        ref_template="#/$defs/{model}",
    )
    return {
        "$schema": DRAFT,
        "$id": "https://edge-agent.invalid/protocol.schema.json",
        "title": "edge-agent wire contract v1",
        "description": "Jobs (JobIn: what a sensor publishes), replies (ReplyMessage) and the "
        "retained device info (Info); docs/protocol.md says what each field means. The "
        "status topic carries one of the plain strings online, offline, stopped. "
        "Generated from edge_agent/core/wire.py and edge_agent/core/protocol.py.",
        "anyOf": [{"$ref": f"#/$defs/{name}"} for name in ("JobIn", "ReplyMessage", "Info")],
        "$defs": schema["$defs"],
    }


def operations() -> dict[str, Any]:
    models = [OperationIn, DrainArgs, LogLevelArgs, LogsArgs, RestartArgs, ModelArgs, ConfigArgs,
              BenchArgs]  # fmt: skip
    _, schema = models_json_schema(
        [*((m, "validation") for m in models), (OperationState, "serialization")],
        ref_template="#/$defs/{model}",
    )
    return {
        "$schema": DRAFT,
        "$id": "https://edge-agent.invalid/operations.schema.json",
        "title": "edge-agent operations v1",
        "description": "Remote operations (docs/operations.md): the request an operator "
        "publishes to <prefix>/devices/<device>/operate/<operator> (OperationIn, with the "
        "args of its operation: DrainArgs, LogLevelArgs, LogsArgs, RestartArgs, ModelArgs, "
        "ConfigArgs, BenchArgs; resume and cancel take none) and the state the device keeps "
        "retained on <prefix>/devices/<device>/operations/<id> (OperationState). Generated from "
        "edge_agent/core/operations.py.",
        "anyOf": [{"$ref": "#/$defs/OperationIn"}, {"$ref": "#/$defs/OperationState"}],
        "$defs": schema["$defs"],
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    stale = []
    for name, build in (
        ("telemetry.schema.json", telemetry),
        ("protocol.schema.json", protocol),
        ("operations.schema.json", operations),
    ):
        path = DOCS / name
        text = render(build())
        if "--check" in sys.argv:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run scripts/gen_wire_schemas.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
