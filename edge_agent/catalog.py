"""models.lock: the pinned list of model files the agent may load.

Pure: parsing and lookups over data handed in. Reading files, hashing and downloading
belong to `store`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.errors import ConfigError

LOCK_VERSION = 1
DEFAULT_MODEL = "smollm2-135m-instruct-q4_1"


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
    family: str
    model: str = Field(description="Upstream model name.")
    params: int = Field(ge=1, description="Parameter count.")
    quant: str
    file: str
    url: str | None = None
    mirror: str | None = Field(None, description="Path under a mirror base (air-gapped fleets).")
    bundled: Bundled | None = None
    size: int | None = Field(None, ge=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    license: str
    context_length: int = Field(ge=1)
    architecture: str
    n_vocab: int = Field(ge=1)
    n_layer: int = Field(ge=1)
    kv_bytes_per_token: int = Field(ge=1, description="f16 K+V bytes per token of context.")
    quality: float = Field(ge=0, le=100, description="Expected quality prior, 0-100.")
    selectable: bool = Field(True, description="May be chosen by the selector.")
    pi5_tokens_per_second: float | None = Field(
        None, ge=0, description="Generation speed on a Raspberry Pi 5, 4 threads."
    )
    notes: str | None = None

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if "/" in value or value in ("", ".", ".."):
            raise ValueError("must be a plain file name")
        return value


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


def load_lock(path: Path) -> Catalog:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read models.lock at {path}: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"models.lock at {path} is not JSON: {exc}") from exc
    return parse_lock(data, path)


def dump_lock(catalog: Catalog) -> str:
    body = {
        "version": LOCK_VERSION,
        "models": [e.model_dump(mode="json", exclude_none=True) for e in catalog.entries],
    }
    return json.dumps(body, indent=2) + "\n"
