"""A staged fleet run of one operation (`edge-agent ops`, docs/operations.md): which
devices go in which stage, and what each device's outcome was. Pure.

Stages, as a rollout: one device first; once it ended `successful` and answered a gate
job, a fraction of the rest; then all the others. The run stops after the first stage
in which a device did not end successful (or missed its gate): the devices of later
stages are `skipped`, untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Result = Literal["successful", "failed", "rejected", "timeout", "gate_failed", "skipped"]
# operations after which a device does not take a job on its own topic by design
NO_GATE = frozenset({"drain"})


def stages(devices: Sequence[str], fraction: float = 0.25) -> list[list[str]]:
    """[[first], [a fraction of the rest, at least one], [the others]] (empty stages
    dropped; order kept, so a run is reproducible from its device list)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], not {fraction}")
    devices = list(dict.fromkeys(devices))  # each device once
    if not devices:
        return []
    rest = devices[1:]
    second = max(1, math.ceil(len(rest) * fraction)) if rest else 0
    out = [devices[:1], rest[:second], rest[second:]]
    return [stage for stage in out if stage]


@dataclass
class Outcome:
    device: str
    stage: int
    result: Result | None = None  # None: still running
    state: str | None = None  # the operation's last state seen
    error: dict[str, Any] | None = None
    op_result: dict[str, Any] | None = None
    progress: str | None = None
    gate_ms: float | None = None
    history: list[str] = field(default_factory=list)
    rollback: str | None = None  # a model switch taken back: its final state, or "timeout"

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "stage": self.stage,
            "result": self.result,
            "state": self.state,
            "error": self.error,
            "op_result": self.op_result,
            "gate_ms": self.gate_ms,
            "states": self.history,
            "rollback": self.rollback,
        }


def all_successful(outcomes: Sequence[Outcome]) -> bool:
    return bool(outcomes) and all(o.result == "successful" for o in outcomes)


def stage_failed(outcomes: Sequence[Outcome]) -> bool:
    return any(o.result not in ("successful", None) for o in outcomes)


def to_roll_back(outcomes: Sequence[Outcome]) -> dict[str, str]:
    """device -> the model to switch back to: every device whose model switch went through
    (its gate included or not) in a run that stopped."""
    out: dict[str, str] = {}
    for o in outcomes:
        result = o.op_result or {}
        if (
            o.state == "successful"
            and result.get("changed")
            and isinstance(result.get("previous"), str)
        ):
            out[o.device] = result["previous"]
    return out
