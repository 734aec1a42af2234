"""models.lock and the choice of model: which entry this board should run, and why.

Pure: the lock's data, the RAM estimate per entry, and `select()`, a function of the
board's facts and the operator's policy, testable on any laptop. Reading files, hashing and
downloading belong to `store`; probing the board belongs to `probe`.

Quality prior of an entry = the model's base score x the share of it its quantization
keeps (REFERENCE.md sections 1 and 3; docs/models.md shows the arithmetic):
    base score = mean of the published GSM8K and HumanEval scores of the instruct model
    retention  = % of FP16 quality kept at that quant, by size class
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.core.errors import ConfigError

LOCK_VERSION = 1
DEFAULT_MODEL = "smollm2-135m-instruct-q4_1"
MIB = 1024 * 1024
GIB = 1024 * MIB

# % of FP16 quality kept (REFERENCE.md section 3), columns by parameter count.
RETENTION: dict[str, dict[str, float]] = {
    "Q8_0": {"7-8B": 99.5, "3-4B": 99.2, "1-2B": 98.8},
    "Q6_K": {"7-8B": 99.0, "3-4B": 98.5, "1-2B": 97.5},
    "Q5_K_M": {"7-8B": 98.2, "3-4B": 97.0, "1-2B": 95.5},
    "Q4_K_M": {"7-8B": 96.5, "3-4B": 94.8, "1-2B": 91.0},
    "Q3_K_M": {"7-8B": 92.0, "3-4B": 88.5, "1-2B": 82.0},
    "Q2_K": {"7-8B": 83.0, "3-4B": 75.0, "1-2B": 65.0},
}
# Not in the table: Q4_1 (the bundled SmolLM2) and Q4_0 sit with Q4_K_M's retention, an
# approximation stated in docs/models.md.
RETENTION["Q4_1"] = RETENTION["Q4_K_M"]
RETENTION["Q4_0"] = RETENTION["Q4_K_M"]

# What the agent itself adds beside llama.cpp's buffers: the Python process with its
# libraries (52 MiB measured on x86-64 after imports) plus a margin, and the token piece
# table the constrained decoder keeps (about 48 bytes a token in Python objects).
AGENT_BASE_BYTES = 56 * MIB
# Bytes per block of 32 values: the lock's kv_bytes_per_token is for f16 (64).
KV_BYTES = {"f16": 64, "q8_0": 34}
# KV sequences that score multi-token labels, a round at a time (adapters/engine/classify.py):
# llama.cpp keeps a logits row of n_vocab floats per sequence (1 MiB each for Gemma's
# 262K vocabulary), so a few, not one per label.
LABEL_SEQUENCES = 8


def kv_sequences(parallel: int, max_labels: int) -> int:
    """The context's sequences: a prefix slot and a sequence per running job, and the
    label sequences."""
    return 2 * parallel + min(max_labels, LABEL_SEQUENCES)


PIECE_BYTES_PER_TOKEN = 48


def size_class(params: int) -> str:
    if params >= 5_000_000_000:
        return "7-8B"
    if params >= 2_500_000_000:
        return "3-4B"
    return "1-2B"  # the smallest column also stands for sub-1B models


def quality_prior(base_score: float, quant: str, params: int) -> float:
    """Expected quality (0-100) of a model with `base_score` at `quant`."""
    retention = RETENTION.get(quant.upper())
    if retention is None:
        raise ValueError(f"no quality retention figure for quant {quant}")
    return round(base_score * retention[size_class(params)] / 100.0, 2)


class Bundled(BaseModel):
    """A model shipped inside a Python package (no download, ever)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    package: str = Field(description="Import name of the package that carries the file.")
    path: str | None = Field(None, description="File inside the package directory.")
    assemble: bool = Field(
        False, description="The package rebuilds the file from chunks with its assemble()."
    )


class ModelEntry(BaseModel):
    """One artifact: one model at one quantization."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(description="Unique id used in config and on the command line.")
    family: str = Field(description="smollm2, gemma-3 or phi-4-mini.")
    model: str = Field(description="Upstream model name.")
    params: int = Field(ge=1, description="Parameter count.")
    quant: str
    file: str
    url: str | None = Field(None, description="Public download URL of the file.")
    mirror: str | None = Field(None, description="Path under a mirror base (air-gapped fleets).")
    bundled: Bundled | None = None
    size: int | None = Field(None, ge=1, description="Exact file size in bytes, once pinned.")
    approx_size: int | None = Field(
        None, ge=1, description="Size as published (rounded), used until `size` is pinned."
    )
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    license: str
    context_length: int = Field(ge=1)
    architecture: str
    n_vocab: int = Field(ge=1)
    n_layer: int = Field(ge=1)
    kv_bytes_per_token: int = Field(ge=1, description="f16 K+V bytes per token of context.")
    base_score: float = Field(ge=0, le=100, description="Mean published GSM8K and HumanEval.")
    quality: float = Field(ge=0, le=100, description="Expected quality prior, 0-100.")
    selectable: bool = Field(True, description="May be chosen by the selector.")
    pi5_tokens_per_second: float | None = Field(
        None, ge=0, description="Generation speed on a Raspberry Pi 5, 4 threads."
    )
    pi5_speed_source: str | None = Field(None, description="Where that figure comes from.")
    notes: str | None = None

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if "/" in value or value in ("", ".", ".."):
            raise ValueError("must be a plain file name")
        return value

    @property
    def pinned(self) -> bool:
        return self.sha256 is not None

    @property
    def file_bytes(self) -> int | None:
        return self.size or self.approx_size


class Lock(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    version: int
    models: tuple[ModelEntry, ...]


@dataclass(frozen=True)
class Catalog:
    """The entries of one models.lock, by name and by file name."""

    entries: tuple[ModelEntry, ...]
    source: Path | None = None

    def get(self, name: str) -> ModelEntry | None:
        return next((e for e in self.entries if e.name == name), None)

    def by_file(self, file_name: str) -> ModelEntry | None:
        return next((e for e in self.entries if e.file == file_name), None)

    def replace(self, entry: ModelEntry) -> Catalog:
        entries = tuple(entry if e.name == entry.name else e for e in self.entries)
        return Catalog(entries=entries, source=self.source)


def parse_lock(data: Any, source: Path | None = None) -> Catalog:
    try:
        lock = Lock.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"models.lock {source or ''}: {where}: {first['msg']}") from None
    if lock.version != LOCK_VERSION:
        raise ConfigError(f"models.lock {source or ''}: version {lock.version} is not supported")
    names = [e.name for e in lock.models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"models.lock {source or ''}: duplicate names {dupes}")
    return Catalog(entries=lock.models, source=source)


def dump_lock(catalog: Catalog) -> str:
    body = {
        "version": LOCK_VERSION,
        "models": [e.model_dump(mode="json", exclude_none=True) for e in catalog.entries],
    }
    return json.dumps(body, indent=2) + "\n"


# ---- RAM estimate ----------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Resident memory of the agent running one entry, by term (bytes)."""

    weights: int  # the file, mmapped: all of it is touched by inference
    kv_cache: int  # f16 K and V for n_ctx tokens
    compute: int  # llama.cpp's compute buffer: dominated by vocabulary x n_ubatch logits
    outputs: int  # the logits output buffer: one row per sequence (labels scored at once)
    agent: int  # Python, libraries, the token piece table

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.outputs + self.agent

    def to_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "compute": self.compute,
            "outputs": self.outputs,
            "agent": self.agent,
            "total": self.total,
        }


@dataclass(frozen=True)
class Runtime:
    """The llama.cpp context the agent will create (from settings)."""

    n_ctx: int = 2048
    n_ubatch: int = 128
    n_seq_max: int = kv_sequences(4, LABEL_SEQUENCES)
    kv_cache_type: str = "f16"


def estimate(entry: ModelEntry, runtime: Runtime) -> Estimate:
    weights = entry.file_bytes or 0
    return Estimate(
        weights=weights,
        kv_cache=entry.kv_bytes_per_token * runtime.n_ctx * KV_BYTES[runtime.kv_cache_type] // 64,
        compute=entry.n_vocab * runtime.n_ubatch * 4 + 2 * MIB,
        outputs=entry.n_vocab * 4 * runtime.n_seq_max,
        agent=AGENT_BASE_BYTES + entry.n_vocab * PIECE_BYTES_PER_TOKEN,
    )


# ---- selection -------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """The operator's say in the choice (settings: model.*)."""

    reserve_bytes: int = 192 * MIB
    reserve_fraction: float = 0.65
    pin: str | None = None
    exclude_families: tuple[str, ...] = ()
    min_tokens_per_second: float | None = None
    runtime: Runtime = field(default_factory=Runtime)
    # tokens/s this board measured (edge-agent bench), by entry; beats the lock's figure
    measured_speeds: dict[str, float] = field(default_factory=dict)


def budget(ram_bytes: int, cgroup_limit: int | None, policy: Policy) -> int:
    """Bytes the agent may use.

    On the board's RAM: RAM - reserve - reserve_fraction x (RAM above 2 GiB). Boards with
    more RAM run more beside the agent, and the margin keeps the mmapped weights in the page
    cache; with the defaults this reproduces REFERENCE.md's deployment table. Inside a memory
    cgroup lower than that (systemd MemoryMax=, which Ansible sizes for the agent), the
    limit is the budget: it already is the agent's own.
    """
    board = ram_bytes - policy.reserve_bytes
    board -= int(policy.reserve_fraction * max(0, ram_bytes - 2 * GIB))
    if cgroup_limit is not None and cgroup_limit < board:
        return cgroup_limit
    return max(0, board)


@dataclass(frozen=True)
class Candidate:
    entry: ModelEntry
    estimate: Estimate
    fits: bool
    reason: str  # why kept or rejected, for --explain and the device's info

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.entry.name,
            "family": self.entry.family,
            "model": self.entry.model,
            "quant": self.entry.quant,
            "file": self.entry.file,
            "quality": self.entry.quality,
            "estimate_bytes": self.estimate.total,
            "estimate": self.estimate.to_dict(),
            "pinned": self.entry.pinned,
            "pi5_tokens_per_second": self.entry.pi5_tokens_per_second,
            "kept": self.fits,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Selection:
    selected: Candidate
    ranked: tuple[Candidate, ...]  # kept candidates, best first: the fallback chain
    candidates: tuple[Candidate, ...]  # every entry considered, with its verdict
    budget_bytes: int
    ram_bytes: int
    cgroup_limit_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "selected": self.selected.to_dict(),
            "fallbacks": [c.entry.name for c in self.ranked[1:]],
            "budget_bytes": self.budget_bytes,
            "ram_bytes": self.ram_bytes,
            "cgroup_limit_bytes": self.cgroup_limit_bytes,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def select(catalog: Catalog, ram_bytes: int, cgroup_limit: int | None, policy: Policy) -> Selection:
    """The best entry for this board, the ones to fall back to, and why each was judged so.

    Best = highest quality prior among entries whose estimate fits the budget; ties go to
    the smaller estimate. The bundled default is always last in the chain: it needs no
    download and is the smallest, so a board always has something to run.
    """
    limit = budget(ram_bytes, cgroup_limit, policy)
    verdicts: list[Candidate] = []
    for entry in catalog.entries:
        est = estimate(entry, policy.runtime)
        reason = _rejection(entry, est, limit, policy)
        kept = reason is None
        if reason is None and policy.pin == entry.name:
            over = est.total > limit
            reason = "pinned by the operator" + (
                f" (over the budget: {_gib(est.total)} > {_gib(limit)})" if over else ""
            )
        elif reason is None:
            reason = "fits the budget" + ("" if entry.pinned else "; not pinned yet")
        verdicts.append(Candidate(entry, est, kept, reason))
    kept_ones = sorted(
        (c for c in verdicts if c.fits),
        key=lambda c: (-c.entry.quality, c.estimate.total, c.entry.name),
    )
    fallback = next((c for c in verdicts if c.entry.name == DEFAULT_MODEL), None)
    if fallback is not None and fallback not in kept_ones:
        forced = Candidate(
            fallback.entry,
            fallback.estimate,
            True,
            f"last resort: {fallback.reason}" if not fallback.fits else fallback.reason,
        )
        verdicts = [forced if c is fallback else c for c in verdicts]
        kept_ones.append(forced)
    elif fallback is not None:  # keep the bundled default last: it is the safety net
        kept_ones.remove(fallback)
        kept_ones.append(fallback)
    if not kept_ones:
        raise ConfigError("models.lock has no entry this board can run")
    return Selection(
        selected=kept_ones[0],
        ranked=tuple(kept_ones),
        candidates=tuple(verdicts),
        budget_bytes=limit,
        ram_bytes=ram_bytes,
        cgroup_limit_bytes=cgroup_limit,
    )


def _rejection(entry: ModelEntry, est: Estimate, limit: int, policy: Policy) -> str | None:
    if policy.pin is not None:
        return None if entry.name == policy.pin else f"operator pinned {policy.pin}"
    if not entry.selectable:
        return "not for automatic choice (test stand-in)"
    if entry.family in policy.exclude_families:
        return f"family {entry.family} excluded by the operator"
    if entry.file_bytes is None:
        return "size unknown"
    if est.total > limit:
        return f"too big ({_gib(est.total)} > {_gib(limit)})"
    floor = policy.min_tokens_per_second
    measured = policy.measured_speeds.get(entry.name)
    speed = measured if measured is not None else entry.pi5_tokens_per_second
    if floor is not None and (speed is None or speed < floor):
        shown = "unknown" if speed is None else f"{speed:g}"
        where = "measured here" if measured is not None else "on a Pi 5"
        return f"too slow ({shown} < {floor:g} tokens/s {where})"
    return None


def _gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GiB', '2048' (MiB when unit-less) -> bytes."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1024, "M": MIB, "G": GIB, "T": 1024 * GIB}
    if raw and raw[-1] in units:
        return int(float(raw[:-1]) * units[raw[-1]])
    return int(float(raw) * MIB)
