"""Operation `config` (docs/operations.md): a partial settings change, checked exactly as
config.toml is, applied at once where the setting allows it and by a drained restart
where it does not, and kept across restarts when the operator asks.

Some settings are not the broker's to change: the ones that decide how the board reaches
the broker, who it is, where it keeps its state, which files it may load or read. A wrong
value there would cut the board off from the very channel that could undo it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edge_agent.adapters.settings import (
    Settings,
    operation_settings,
    save_operation_settings,
)
from edge_agent.core.operations import Failed, OpCode

# Not changed by an operation: identity, state, the broker connection, what may be loaded
# or read from disk, and where metrics listen.
DENIED = (
    "device_id",
    "state_dir",
    "mqtt",
    "model.name",
    "model.lock_file",
    "model.allow_unpinned",
    "model.dir",
    "profiles",
    "telemetry.prometheus_bind",
    "telemetry.prometheus_port",
)
# Effective at once, without a restart.
LIVE = ("log.level", "jobs.min_confidence", "jobs.max_queue", "health.exit_after_s")


@dataclass(frozen=True)
class Change:
    settings: Settings  # the settings with the change
    changed: dict[str, tuple[Any, Any]]  # dotted key -> (from, to)
    live: tuple[str, ...]
    restart: tuple[str, ...]


def leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the nested values (an empty object is a leaf of its own)."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def merged(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def plan(current: Settings, wanted: dict[str, Any], persist: bool) -> Change:
    """The change checked (Failed `invalid_argument` naming the field otherwise)."""
    if not wanted:
        raise Failed(OpCode.INVALID_ARGUMENT, "set: name at least one setting")
    for key in leaves(wanted):
        for denied in DENIED:
            if key == denied or key.startswith(denied + "."):
                raise Failed(
                    OpCode.INVALID_ARGUMENT,
                    f"{key}: not changed by an operation (identity, state, the broker "
                    "connection and what may be loaded are config.toml's alone)",
                )
    now_values = leaves(current.model_dump(mode="json"))
    for key, value in leaves(wanted).items():
        wrong = _type_problem(now_values.get(key), value)
        if wrong is not None:
            raise Failed(OpCode.INVALID_ARGUMENT, f"{key}: {wrong}")
    try:
        after = Settings.model_validate(merged(current.model_dump(), wanted))
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = ".".join(str(part) for part in problem["loc"]) or "settings"
        raise Failed(OpCode.INVALID_ARGUMENT, f"{field}: {problem['msg']}") from exc
    before, now = leaves(current.model_dump(mode="json")), leaves(after.model_dump(mode="json"))
    changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
    live = tuple(k for k in changed if k in LIVE)
    restart = tuple(k for k in changed if k not in LIVE)
    if restart and not persist:
        raise Failed(
            OpCode.INVALID_ARGUMENT,
            f"{', '.join(restart)}: effective only after a restart, which would forget it; "
            "send persist: true",
        )
    return Change(after, changed, live, restart)


def _type_problem(current: Any, value: Any) -> str | None:
    """JSON's types are the contract, as for jobs: the settings model would read "9" or
    true as a number, as it must for the environment, but an operation says what it means."""
    if current is None or isinstance(value, dict):
        return None
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(current))
    return None if ok else f"expected {type(current).__name__}, not {type(value).__name__}"


def persist(state_dir: Path, wanted: dict[str, Any], op_id: str, requester: str) -> None:
    """Keep the change for the next starts (above config.toml and the environment)."""
    settings, by, _problem = operation_settings(state_dir)
    at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    for key in leaves(wanted):
        by[key] = {"id": op_id, "requester": requester, "at": at}
    try:
        save_operation_settings(state_dir, merged(settings, wanted), by)
    except OSError as exc:
        raise Failed(OpCode.INTERNAL_ERROR, f"the change could not be kept: {exc}") from exc


def forget(state_dir: Path) -> list[str]:
    """Drop every persisted change (args `reset`); the keys it held."""
    settings, _by, _problem = operation_settings(state_dir)
    try:
        (state_dir / "settings.operations.json").unlink(missing_ok=True)
    except OSError as exc:
        raise Failed(OpCode.INTERNAL_ERROR, f"could not forget the changes: {exc}") from exc
    return sorted(leaves(settings)) if settings else []
