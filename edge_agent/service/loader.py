"""The fallback chain at start-up: choose, find, verify and load a model, or say why not.

Orchestration over `catalog.select` (pure), `store` (files) and an engine factory. If the
chosen file is missing, corrupt, unpinned, of an architecture this llama.cpp cannot load,
or cannot get its memory, the reason is logged and the next candidate is tried; the
bundled default closes the chain. The outcome, with every reason, goes into the device's
retained info message.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

import structlog

from edge_agent.adapters.probe import BoardFacts
from edge_agent.adapters.settings import Settings
from edge_agent.adapters.store import entry_for_path, locate, record_loaded, verify
from edge_agent.core.catalog import (
    Catalog,
    ModelEntry,
    Policy,
    Runtime,
    Selection,
    kv_sequences,
    select,
)
from edge_agent.core.errors import ConfigError, EngineUnavailable, ModelError, ModelNotFound
from edge_agent.core.wire import ModelRef
from edge_agent.service.measured import measured_speeds

log = structlog.get_logger("edge_agent.loader")

E = TypeVar("E")


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass
class Loaded(Generic[E]):
    engine: E
    path: Path
    entry: ModelEntry | None
    sha256: str
    reason: str
    skipped: list[Skipped] = field(default_factory=list)
    selection: Selection | None = None

    @property
    def ref(self) -> ModelRef:
        if self.entry is not None:
            return ModelRef(name=self.entry.name, quant=self.entry.quant, sha256=self.sha256)
        return ModelRef(name=self.path.stem, quant="unknown", sha256=self.sha256)

    def report(self) -> dict[str, Any]:
        """The choice, for the device's info message and `edge-agent select`."""
        entry = self.entry
        return {
            "name": self.ref.name,
            "family": entry.family if entry else None,
            "model": entry.model if entry else None,
            "quant": self.ref.quant,
            "file": self.path.name,
            "sha256": self.sha256,
            "reason": self.reason,
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "budget_bytes": self.selection.budget_bytes if self.selection else None,
        }


def policy_for(settings: Settings) -> Policy:
    m = settings.model
    pin = m.name if m.name is not None and not _looks_like_path(m.name) else None
    return Policy(
        reserve_bytes=m.reserve_mb * 1024 * 1024,
        reserve_fraction=m.reserve_fraction,
        pin=pin,
        exclude_families=m.exclude_families,
        min_tokens_per_second=m.min_tokens_per_second,
        runtime=Runtime(
            n_ctx=settings.n_ctx,
            n_ubatch=m.n_ubatch,
            # the most jobs it would run at once (parallel_jobs: 4 unless set)
            n_seq_max=kv_sequences(settings.jobs.parallel or 4, settings.jobs.max_labels),
            kv_cache_type=settings.model.kv_cache_type,
        ),
        measured_speeds=measured_speeds(settings.state_dir),
    )


def _looks_like_path(name: str) -> bool:
    return "/" in name or name.endswith(".gguf")


def selection_for(
    settings: Settings, catalog: Catalog, board: BoardFacts, ram_bytes: int | None = None
) -> Selection:
    ram = ram_bytes if ram_bytes is not None else board.ram_total_bytes
    cgroup = None if ram_bytes is not None else board.cgroup_memory_max_bytes
    pinned = policy_for(settings).pin
    if pinned is not None and catalog.get(pinned) is None:
        raise ConfigError(f"model.name: {pinned!r} is not in models.lock and is not a .gguf path")
    return select(catalog, ram, cgroup, policy_for(settings))


def load_model(
    settings: Settings,
    catalog: Catalog,
    board: BoardFacts,
    open_engine: Callable[[Path], E],
) -> Loaded[E]:
    """Walk the chain until a model loads; raise ModelError listing every reason if none does."""
    m = settings.model
    if m.name is not None and _looks_like_path(m.name):
        path = Path(m.name).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.name: {path} does not exist")
        entry = entry_for_path(catalog, path)
        digest = verify(path, entry, m.allow_unpinned)
        engine = open_engine(path)
        return Loaded(engine, path, entry, digest, f"configured path {path}")
    selection = selection_for(settings, catalog, board)
    skipped: list[Skipped] = []
    for candidate in selection.ranked:
        entry = candidate.entry
        try:
            path = locate(entry, settings.model_dir)
        except ModelNotFound as exc:  # not downloaded: common and expected, so quiet
            log.debug("model.skipped", name=entry.name, reason=str(exc))
            skipped.append(Skipped(entry.name, "not downloaded"))
            continue
        try:
            digest = verify(path, entry, m.allow_unpinned)
            engine = open_engine(path)
        except ModelError as exc:
            log.warning("model.skipped", name=entry.name, reason=str(exc))
            skipped.append(Skipped(entry.name, str(exc)))
            continue
        reason = candidate.reason
        if skipped:
            reason = f"{reason}; after {len(skipped)} candidate(s) could not be used"
        record_loaded(settings.model_dir, entry.name)
        log.info("model.selected", name=entry.name, reason=reason, skipped=len(skipped))
        return Loaded(engine, path, entry, digest, reason, skipped, selection)
    listed = "; ".join(f"{s.name}: {s.reason}" for s in skipped)
    raise ModelError(f"no model could be loaded: {listed}")


# Shared libraries llama-cpp-python's own libraries link against, and the Debian / Raspberry
# Pi OS package that provides each (a minimal image may lack libgomp1).
LIBRARY_PACKAGES = {
    "libgomp.so.1": "libgomp1",
    "libstdc++.so.6": "libstdc++6",
    "libgcc_s.so.1": "libgcc-s1",
    "libopenblas.so.0": "libopenblas0",
    "libc.so.6": "libc6",
    "libm.so.6": "libc6",
}
_MISSING = re.compile(r"(lib[\w.+-]+?\.so(?:\.[\d.]+)?): cannot open shared object file")


def import_engine() -> ModuleType:
    """Import the llama.cpp adapter, or raise EngineUnavailable saying which system library
    is missing and which package provides it (rather than a traceback from ctypes)."""
    try:
        return importlib.import_module("edge_agent.adapters.engine")
    except (ImportError, OSError, RuntimeError) as exc:
        raise EngineUnavailable(library_problem(str(exc))) from exc


def library_problem(message: str) -> str:
    """One sentence for an operator from a dynamic loader's error message."""
    found = _MISSING.search(message)
    if found is None:
        return f"llama.cpp's libraries cannot be loaded: {message}"
    library = found.group(1)
    package = LIBRARY_PACKAGES.get(library)
    fix = (
        f"install the package {package} (apt-get install {package})"
        if package
        else "install the package that provides it (apt-file search " + library + ")"
    )
    return f"llama.cpp's libraries cannot be loaded: {library} is missing; {fix}"
