"""Writes docs/configuration.md from the settings model, so the doc cannot drift.

.venv/bin/python scripts/gen_config_doc.py          # rewrite the file
.venv/bin/python scripts/gen_config_doc.py --check  # exit 1 if it is stale (a test runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from edge_agent.adapters.settings import Settings

OUT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
HEADER = """# Configuration

Generated from `edge_agent/adapters/settings.py` by `scripts/gen_config_doc.py`; do not edit
by hand.

Sources, later ones winning: defaults, the TOML file (`/etc/edge-agent/config.toml`, or
`--config PATH`), systemd credentials (`$CREDENTIALS_DIRECTORY`, read as a secrets
directory: the file `mqtt__password` sets `mqtt.password`; `tls_key` is the client key
when `mqtt.cert_file` is set and `mqtt.key_file` is not; an empty file means unset),
`EDGE_AGENT_*` environment variables, the changes `config` operations persisted
(`<state_dir>/settings.operations.json`, docs/operations.md), command-line flags.
`edge-agent config --sources` prints each value and where it came from. Nested fields use
a table in TOML (`[mqtt]` / `broker = ...`) and a double underscore in the environment
(`EDGE_AGENT_MQTT__BROKER`). Unknown keys are errors. A bad value stops the agent with
exit status 78 and names the field.

Example:

```toml
device_id = "pi-07"

[mqtt]
broker = "mqtts://broker.lan:8883"
ca_file = "/etc/edge-agent/ca.crt"
username = "pi-07"

[jobs]
max_queue = 8

[profiles.severity]            # a sensor then sends {"id", "profile": "severity", "text"}
kind = "classify"
instructions = "Rate how urgent the sensor message is."
labels = ["normal", "warning", "critical"]
examples = [{text = "Freezer F-2 holding at -19.8 C.", answer = "normal"}]

[profiles.reading]
kind = "extract"
schema = {type = "object", properties = {device = {type = "string"}, value = {type = "number"}}}
```
"""


def _default(info: Any) -> str:
    if info.default_factory is not None:
        return "(computed)"
    if info.default is PydanticUndefined:
        return "(required)"
    value = info.default
    if isinstance(value, BaseModel):
        return ""
    return f"`{value!r}`" if value not in (None, ()) else "unset"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows: list[str] = []
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((name, annotation))
            continue
        key = f"{prefix}{name}"
        env = "EDGE_AGENT_" + key.upper().replace(".", "__")
        rows.append(f"| `{key}` | {_default(info)} | `{env}` | {info.description} |")
    for name, sub in nested:
        rows.append("")
        rows.append(f"## [{name}]")
        rows.append("")
        rows.append(f"{(sub.__doc__ or '').strip()}")
        rows.append("")
        rows.append("| setting | default | environment | meaning |")
        rows.append("|---|---|---|---|")
        rows.extend(_rows(sub, f"{prefix}{name}."))
    return rows


def render() -> str:
    lines = [
        HEADER,
        "## Top level",
        "",
        "| setting | default | environment | meaning |",
        "|---|---|---|---|",
    ]
    lines.extend(_rows(Settings, ""))
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run scripts/gen_config_doc.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
