"""The model store: model files on disk, downloads, and proof that they are the pinned ones.

Adapter: files, HTTP, hashing, and the packages that carry bundled models. Downloads come
only from a models.lock URL or an operator's mirror (an HTTP base URL or a local
directory, for air-gapped fleets), never from anything chosen at run time.

Layout of the model directory (`<state_dir>/models` by default):
    <file>.gguf               verified files, ready to load
    .partial/<file>.part      downloads in progress (resumed with HTTP Range)
    .selection.json           the model loaded last and the one before (kept by `gc`)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from edge_agent.core.catalog import Catalog, ModelEntry, parse_lock
from edge_agent.core.errors import (
    ChecksumMismatch,
    ConfigError,
    ModelNotFound,
    StoreError,
    UnpinnedModel,
)
from edge_agent.core.retry import policy

CHUNK = 1024 * 1024
PARTIAL_DIR = ".partial"
SELECTION_FILE = ".selection.json"
DISK_MARGIN = 64 * 1024 * 1024
USER_AGENT = "edge-agent (models fetch)"

Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)


def load_lock(path: Path) -> Catalog:
    """models.lock, read and checked (core.catalog.parse_lock)."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read models.lock at {path}: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"models.lock at {path} is not JSON: {exc}") from exc
    return parse_lock(data, path)


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


def stored_path(entry: ModelEntry, model_dir: Path) -> Path:
    """Where the file of `entry` is or would be, without creating it."""
    return bundled_path(entry, model_dir) or model_dir / entry.file


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
            raise ModelNotFound(f"{entry.name}: {path} is not there; {hint}")
        return path
    if entry.bundled is not None and entry.bundled.assemble and not path.is_file():
        _assemble(entry, path)
    if not path.is_file():
        raise ModelNotFound(f"{entry.name}: {path} is missing from its package")
    return path


def _assemble(entry: ModelEntry, target: Path) -> None:
    assert entry.bundled is not None
    module = importlib.import_module(entry.bundled.package)
    target.parent.mkdir(parents=True, exist_ok=True)
    # one partial file per process: two assembling at once (an agent and `edge-agent
    # models`, or two test runs) each write their own, and each rename puts a whole file
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        module.assemble(partial, overwrite=True)
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise ModelNotFound(
            f"{entry.name}: could not assemble from {entry.bundled.package}: {exc}"
        ) from exc
    partial.replace(target)


def _pump(
    src: IO[bytes],
    *,
    out: IO[bytes] | None = None,
    digest: Any = None,
    progress: Progress | None = None,
    done: int = 0,
    total: int | None = None,
    limit: int | None = None,
) -> int:
    """The one copy loop: `src` block by block into `out` (then fsynced) and/or `digest`,
    reporting `done` plus the bytes so far of `total`; returns the bytes moved. Past
    `limit` bytes in all (`done` included) it stops with ValueError: a server that sends
    more than the pinned file must not fill the disk."""
    moved = 0
    while block := src.read(CHUNK):
        if limit is not None and done + moved + len(block) > limit:
            raise ValueError(f"the server sent more than the {limit} bytes models.lock pins")
        if out is not None:
            out.write(block)
        if digest is not None:
            digest.update(block)
        moved += len(block)
        if progress is not None:
            progress(done + moved, total)
    if out is not None:
        out.flush()
        os.fsync(out.fileno())
    return moved


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        _pump(handle, digest=digest, progress=progress, total=path.stat().st_size)
    return digest.hexdigest()


def verify(
    path: Path, entry: ModelEntry | None, allow_unpinned: bool, progress: Progress | None = None
) -> str:
    """Check size and sha256 against the entry; returns the digest. Raises on any mismatch."""
    if entry is None or entry.sha256 is None:
        if not allow_unpinned:
            what = f"{entry.name}" if entry else f"{path.name} (no models.lock entry)"
            raise UnpinnedModel(
                f"{what} has no sha256 in models.lock; pin it with `edge-agent models lock "
                f"{path}` or set model.allow_unpinned = true"
            )
        return sha256_file(path, progress)
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        raise ChecksumMismatch(
            f"{path}: {size} bytes, models.lock pins {entry.size} for {entry.name}"
        )
    digest = sha256_file(path, progress)
    if digest != entry.sha256:
        raise ChecksumMismatch(
            f"{path}: sha256 {digest} differs from the pin {entry.sha256} of {entry.name}"
        )
    return digest


def entry_for_path(catalog: Catalog, path: Path) -> ModelEntry | None:
    return catalog.by_file(path.name)


# ---- downloads -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    path: Path
    source: str
    downloaded_bytes: int
    resumed_from: int
    sha256: str
    already_there: bool = False


def sources_for(entry: ModelEntry, mirror: str | None) -> list[str]:
    """Where to get `entry` from, in order: the operator's mirror first, then its URL."""
    out: list[str] = []
    if mirror:
        relative = entry.mirror or entry.file
        if "://" in mirror and not mirror.startswith("file://"):
            out.append(mirror.rstrip("/") + "/" + relative)
        else:
            base = Path(mirror.removeprefix("file://"))
            out.append(str(base / relative))
    if entry.url:
        out.append(entry.url)
    return out


def fetch(
    entry: ModelEntry,
    model_dir: Path,
    *,
    mirror: str | None = None,
    allow_unpinned: bool = False,
    progress: Progress | None = None,
    timeout: float = 30.0,
    retry_s: float = 120.0,
) -> Fetched:
    """Download `entry` into the model directory, resuming, verifying, renaming atomically.

    Refuses an unpinned entry before downloading anything (unless allowed), checks free
    disk first, writes only under .partial/, and moves the file into place only after its
    size and sha256 match, so the loader never sees a half-written or wrong file. A source
    that drops the connection or times out is tried again, resuming where it stopped, with
    jittered backoff for up to `retry_s` seconds (core/retry.py); one that answers 4xx or
    offers another size than the pin is not.
    """
    if entry.bundled is not None:
        raise StoreError(f"{entry.name} is bundled in a package: nothing to fetch")
    if not entry.pinned and not allow_unpinned:
        raise UnpinnedModel(
            f"{entry.name} has no sha256 in models.lock: refusing to download it. Pin it "
            "first (`edge-agent models lock URL`) or pass --allow-unpinned"
        )
    target = model_dir / entry.file
    if target.is_file():
        try:
            digest = verify(target, entry, allow_unpinned)
        except ChecksumMismatch:
            target.unlink()  # a wrong file where the loader looks: remove, fetch again
        else:
            return Fetched(target, str(target), 0, 0, digest, already_there=True)
    sources = sources_for(entry, mirror)
    if not sources:
        raise StoreError(f"{entry.name} has no URL in models.lock and no mirror is configured")
    partial_dir = model_dir / PARTIAL_DIR
    partial_dir.mkdir(parents=True, exist_ok=True)
    partial = partial_dir / f"{entry.file}.part"
    _check_disk(entry, partial, model_dir)
    errors: list[str] = []
    for source in sources:
        resumed = partial.stat().st_size if partial.exists() else 0
        try:
            attempts = policy(stop_after_s=retry_s, first_s=1.0, max_s=15.0,
                              on=(OSError,), when=transient)  # fmt: skip
            got = attempts(_download, source, partial, entry.file_bytes, progress, timeout)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            errors.append(f"{source}: {exc}")
            continue
        try:
            digest = verify(partial, entry, allow_unpinned)
        except ChecksumMismatch as exc:
            partial.unlink(missing_ok=True)  # never resume from bytes that proved wrong
            errors.append(f"{source}: {exc}")
            continue
        os.replace(partial, target)
        _fsync_dir(model_dir)
        return Fetched(target, source, got, resumed, digest)
    raise StoreError(f"could not fetch {entry.name}: " + "; ".join(errors))


def transient(exc: BaseException) -> bool:
    """Worth trying again: a dropped connection, a timeout, a 5xx; not a 4xx, a missing
    mirror file or a wrong size."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | PermissionError)


def _check_disk(entry: ModelEntry, partial: Path, model_dir: Path) -> None:
    expected = entry.file_bytes
    if expected is None:
        return
    have = partial.stat().st_size if partial.exists() else 0
    need = expected - have + DISK_MARGIN
    free = shutil.disk_usage(model_dir).free
    if free < need:
        raise StoreError(
            f"not enough disk in {model_dir} for {entry.name}: need {need / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free"
        )


def _download(
    source: str, partial: Path, expected: int | None, progress: Progress | None, timeout: float
) -> int:
    """Append the rest of `source` to `partial`; returns the bytes transferred."""
    have = partial.stat().st_size if partial.exists() else 0
    if "://" not in source:  # a local mirror directory
        return _copy_local(Path(source), partial, have, progress)
    _http_only(source)
    request = urllib.request.Request(source, headers={"User-Agent": USER_AGENT})  # noqa: S310
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as exc:
        exc.close()  # its socket: the retry keeps the exception, so nothing else closes it
        if exc.code == 416 and have and expected == have:
            return 0  # already complete
        raise
    with response:
        mode = "ab"
        if have and response.status != 206:
            have, mode = 0, "wb"  # the server ignored Range: start over
        total = _total(response.headers, have, expected)
        if expected is not None and total is not None and total != expected:
            raise ValueError(f"{source} offers {total} bytes; models.lock pins {expected}")
        with partial.open(mode) as out:
            written = _pump(response, out=out, progress=progress, done=have, total=total,
                            limit=expected)  # fmt: skip
    if total is not None and have + written != total:
        raise OSError(f"connection closed after {have + written} of {total} bytes")
    return written


def _http_only(source: str) -> None:
    """URLs come from models.lock or the operator's mirror; only http(s) is ever opened."""
    if urlsplit(source).scheme not in ("http", "https"):
        raise ValueError(f"{source}: only http(s) URLs or local paths are fetched")


def _total(headers: object, have: int, expected: int | None) -> int | None:
    content_range = getattr(headers, "get", lambda _k: None)("Content-Range")
    if content_range and "/" in content_range:
        tail = content_range.rsplit("/", 1)[1]
        if tail.isdigit():
            return int(tail)
    length = getattr(headers, "get", lambda _k: None)("Content-Length")
    if length and str(length).isdigit():
        return have + int(length)
    return expected


def _copy_local(source: Path, partial: Path, have: int, progress: Progress | None) -> int:
    if not source.is_file():
        raise FileNotFoundError(f"{source} is not in the mirror")
    total = source.stat().st_size
    with source.open("rb") as src, partial.open("ab" if have else "wb") as out:
        src.seek(have)
        return _pump(src, out=out, progress=progress, done=have, total=total)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def digest_source(
    source: str, keep: Path | None = None, progress: Progress | None = None, timeout: float = 30
) -> tuple[int, str]:
    """(size, sha256) of a local file or URL, for `models lock`; optionally keep a copy."""
    if "://" not in source or source.startswith("file://"):
        path = Path(source.removeprefix("file://"))
        if keep is not None and keep.resolve() != path.resolve():
            shutil.copyfile(path, keep)
        return path.stat().st_size, sha256_file(path, progress)
    digest = hashlib.sha256()
    _http_only(source)
    request = urllib.request.Request(source, headers={"User-Agent": USER_AGENT})  # noqa: S310
    with (
        urllib.request.urlopen(request, timeout=timeout) as response,  # noqa: S310
        keep.open("wb") if keep is not None else contextlib.nullcontext() as out,
    ):
        total = _total(response.headers, 0, None)
        size = _pump(response, out=out, digest=digest, progress=progress, total=total)
    return size, digest.hexdigest()


def file_name_of(source: str) -> str:
    return Path(urlsplit(source).path).name if "://" in source else Path(source).name


# ---- what is stored, and cleaning up ----------------------------------------------------


def record_loaded(model_dir: Path, name: str) -> None:
    """Remember the model just loaded, and the one before it (kept by gc for rollback)."""
    path = model_dir / SELECTION_FILE
    state = read_selection(model_dir)
    if state.get("current") != name:
        state = {"current": name, "previous": state.get("current"), "at": time.time()}
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)
    except OSError:
        pass  # a read-only model directory only costs gc its memory


def read_selection(model_dir: Path) -> dict[str, object]:
    try:
        data = json.loads((model_dir / SELECTION_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def stored_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.glob("*.gguf") if p.is_file()) if model_dir.is_dir() else []


@dataclass(frozen=True)
class Removal:
    path: Path
    bytes: int
    why: str


def plan_gc(catalog: Catalog, model_dir: Path, keep_names: Iterable[str]) -> list[Removal]:
    """Files `gc` would delete: model files not kept, and abandoned partial downloads."""
    keep_files = {e.file for e in catalog.entries if e.name in set(keep_names)}
    keep_files |= {e.file for e in catalog.entries if e.bundled is not None}
    out: list[Removal] = []
    for path in stored_files(model_dir):
        if path.name not in keep_files:
            out.append(Removal(path, path.stat().st_size, "not the current or previous model"))
    partial_dir = model_dir / PARTIAL_DIR
    if partial_dir.is_dir():
        for path in sorted(partial_dir.iterdir()):
            if path.is_file():
                out.append(Removal(path, path.stat().st_size, "abandoned partial download"))
    return out
