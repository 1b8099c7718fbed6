"""The NVMe tier: artifacts downloaded from the store and rendered as Triton model directories.

Layout under the cache directory:
- `repo/<triton name>/`     the rendered model directory; Triton's `--model-repository` points at `repo/`;
- `meta/<triton name>.json` which key and ETag the directory was built from, and its size on disk; the
                            file's modification time is the model's last use, so disk LRU survives restarts;
- `tmp/`                    downloads and extractions in progress (wiped at start).

At start, whatever that metadata does not account for under the current naming is deleted: directories
staged under an older naming (whose names kept fewer hash bits, and whose metadata lacks the namespace),
damaged metadata, and a directory whose metadata was never written. A name is only ever served for the key
and namespace its metadata records, and only if that is the name they have now.

A directory moves into `repo/` only when complete (rename on the same file system), so Triton never sees a
half-written model and a crash leaves at worst a stale `tmp/` entry. The tier has a byte budget: staged
models that are not loaded are deleted least recently used first when a new artifact needs the room
(SageMaker keeps evicted models on disk until the volume fills, and so do we).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Collection, Protocol

from gateway.errors import DiskFull
from gateway.extract import ExtractLimits, disk_error, safe_extract
from gateway.naming import ModelKey, is_name_of
from gateway.render import RenderOptions, RenderedModel, render_model_dir
from gateway.store.base import ArtifactStore, ObjectInfo

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 1.0


@dataclass(frozen=True)
class StagedArtifact:
    """A model directory on local disk, and where it came from."""

    key: str
    triton_name: str
    namespace: str  # the store's URL, or a registered model's: the name's hash covers it
    etag: str
    artifact_bytes: int
    disk_bytes: int
    framework: str
    backend: str
    instance_count: int
    staged_at: float
    download_s: float
    instance_kind: str = "KIND_CPU"  # absent from metadata written before it was recorded


class Staging(Protocol):
    """What the manager needs of the NVMe tier (the cache benchmark stands in a timing model)."""

    budget_bytes: int | None

    def staged(self, triton_name: str) -> StagedArtifact | None: ...
    def all_staged(self) -> list[StagedArtifact]: ...
    def used_bytes(self) -> int: ...
    def touch(self, triton_name: str) -> None: ...
    def make_room(self, need_bytes: int, protected: Collection[str]) -> list[str]: ...
    def stage(self, model: ModelKey, info: ObjectInfo, source: ArtifactStore | None = None,
              protected: Collection[str] = ()) -> StagedArtifact: ...
    def remove(self, triton_name: str) -> None: ...


class _Progress:
    """Logs download progress at most once a second (boto3 calls back from several threads)."""

    def __init__(self, key: str, total: int) -> None:
        self.key, self.total, self.done = key, total, 0
        self._last = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= _PROGRESS_EVERY_S:
            self._last = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            log.info(
                "model.download.progress",
                extra={"model": self.key, "bytes": self.done, "total_bytes": self.total, "percent": round(pct, 1)},
            )


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (links not followed)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class StagingArea:
    """Downloads, extracts and renders artifacts under `root`, within a byte budget."""

    def __init__(
        self,
        root: Path,
        store: ArtifactStore,
        render: RenderOptions,
        limits: ExtractLimits,
        budget_bytes: int | None = None,
    ) -> None:
        self.root = root
        self.repo = root / "repo"
        self.meta = root / "meta"
        self.tmp = root / "tmp"
        self.store = store
        self.render = render
        self.limits = limits
        self.budget_bytes = budget_bytes
        for path in (self.repo, self.meta, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self._lock = threading.Lock()  # staging runs in worker threads; sizes are shared with the loop
        self._sizes: dict[str, int] = {}  # `remove` keeps it in step, the sweep's deletions included
        self._sizes = {a.triton_name: a.disk_bytes for a in self._sweep()}

    def _sweep(self) -> list[StagedArtifact]:
        """Delete what no current metadata accounts for (see the module's docstring) and return what is kept,
        each metadata file read once; a later request for a deleted key stages it again under its current name
        (the footprint ledger is keyed by ETag, so its measurements still apply)."""
        for tmp in self.meta.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        found = {p.stem for p in self.meta.glob("*.json")} | {p.name for p in self.repo.iterdir()}
        kept: list[StagedArtifact] = []
        stale: list[str] = []
        for name in sorted(found):
            artifact = self.staged(name)
            if artifact is None:
                stale.append(name)
            else:
                kept.append(artifact)
        for name in stale:
            self.remove(name)
        if stale:
            log.warning("staging.stale_removed", extra={"triton_names": stale})
        return kept

    # -- what is on disk -------------------------------------------------------------------------------

    def model_dir(self, triton_name: str) -> Path:
        return self.repo / triton_name

    def _meta_path(self, triton_name: str) -> Path:
        return self.meta / f"{triton_name}.json"

    def staged(self, triton_name: str) -> StagedArtifact | None:
        """What is on disk for this model, or None: also when the metadata or directory is damaged, or the
        metadata is not of a model that has this name now (an older naming's, or not this name's)."""
        try:
            data = json.loads(self._meta_path(triton_name).read_text())
            artifact = StagedArtifact(**data)
        except (OSError, ValueError, TypeError):
            return None
        if artifact.triton_name != triton_name or not is_name_of(triton_name, artifact.key, artifact.namespace):
            return None
        return artifact if self.model_dir(triton_name).is_dir() else None

    def all_staged(self) -> list[StagedArtifact]:
        found = []
        for meta in self.meta.glob("*.json"):
            artifact = self.staged(meta.stem)
            if artifact:
                found.append(artifact)
        return found

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def touch(self, triton_name: str) -> None:
        """Mark a staged model as just used (disk LRU order)."""
        try:
            os.utime(self._meta_path(triton_name))
        except OSError:
            pass

    def _last_used(self, triton_name: str) -> float:
        try:
            return self._meta_path(triton_name).stat().st_mtime
        except OSError:
            return 0.0

    # -- the disk budget -----------------------------------------------------------------------------------

    def make_room(self, need_bytes: int, protected: Collection[str]) -> list[str]:
        """Delete least recently used staged models, never one in `protected` (loaded or in use), until
        `need_bytes` more fit in the budget. Returns the names removed; fitting is best effort."""
        if self.budget_bytes is None:
            return []
        removed: list[str] = []
        with self._lock:
            candidates = sorted((n for n in self._sizes if n not in protected), key=self._last_used)
            used = sum(self._sizes.values())
        for name in candidates:
            if used + need_bytes <= self.budget_bytes:
                break
            with self._lock:
                freed = self._sizes.get(name, 0)
            self.remove(name)
            used -= freed
            removed.append(name)
        return removed

    # -- staging -------------------------------------------------------------------------------------------

    def stage(self, model: ModelKey, info: ObjectInfo, source: ArtifactStore | None = None,
              protected: Collection[str] = ()) -> StagedArtifact:
        """Download `model` (the version `info` describes), extract safely, render; blocking, run in a thread.
        Room for the unpacked model is made from its size in the tar headers (staged models not in
        `protected` go first); a full or failing local disk is a transient DiskFull/DiskFailed."""
        try:
            return self._stage(model, info, source, {*protected, model.triton_name})
        except OSError as exc:
            transient = disk_error(model.key, exc)
            if transient is None:
                raise
            log.warning("model.staging_disk_error", extra={"model": model.key, "error": str(exc)})
            raise transient from None

    def _room_for(self, key: str, need_bytes: int, protected: Collection[str]) -> None:
        """Make room for `need_bytes` more within the disk budget and on the file system, or DiskFull."""
        removed = self.make_room(need_bytes, protected)
        if removed:
            log.info("model.disk_room_made", extra={"model": key, "need_bytes": need_bytes, "removed": removed})
        with self._lock:
            used = sum(self._sizes.values())
        free = shutil.disk_usage(self.tmp).free
        if (self.budget_bytes is not None and used + need_bytes > self.budget_bytes) or need_bytes > free:
            raise DiskFull(f"model {key!r} unpacks to {need_bytes} bytes, more than the local disk has room for "
                           "now (every staged model left is loaded or in use); retry later")

    def _stage(self, model: ModelKey, info: ObjectInfo, source: ArtifactStore | None,
               protected: Collection[str]) -> StagedArtifact:
        work = Path(tempfile.mkdtemp(prefix=f"{model.triton_name}-", dir=self.tmp))
        try:
            archive = work / "artifact"
            progress = _Progress(model.key, info.size)
            started = time.monotonic()
            (source or self.store).fetch(info, archive, progress)
            download_s = time.monotonic() - started
            log.info(
                "model.downloaded",
                extra={"model": model.key, "bytes": info.size, "etag": info.etag, "download_s": round(download_s, 4)},
            )
            extracted = work / "x"
            safe_extract(archive, extracted, model.key, self.limits,
                         reserve=lambda total: self._room_for(model.key, total, protected))
            archive.unlink()
            root, rendered = render_model_dir(extracted, model.triton_name, model.key, self.render)
            return self._install(model, info, root, rendered, download_s)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _install(
        self, model: ModelKey, info: ObjectInfo, root: Path, rendered: RenderedModel, download_s: float
    ) -> StagedArtifact:
        target = self.model_dir(model.triton_name)
        self.remove(model.triton_name)
        os.replace(root, target)
        artifact = StagedArtifact(
            key=model.key,
            triton_name=model.triton_name,
            namespace=model.namespace,
            etag=info.etag,
            artifact_bytes=info.size,
            disk_bytes=dir_bytes(target),
            framework=rendered.framework,
            backend=rendered.backend,
            instance_count=rendered.instance_count,
            instance_kind=rendered.instance_kind,
            staged_at=time.time(),
            download_s=download_s,
        )
        meta = self._meta_path(model.triton_name)
        tmp = meta.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(artifact)))
        os.replace(tmp, meta)
        with self._lock:
            self._sizes[model.triton_name] = artifact.disk_bytes
        return artifact

    def remove(self, triton_name: str) -> None:
        """Delete a staged model from disk (the caller makes sure Triton no longer has it loaded)."""
        with self._lock:
            self._sizes.pop(triton_name, None)
        self._meta_path(triton_name).unlink(missing_ok=True)
        target = self.model_dir(triton_name)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix="trash-", dir=self.tmp))
            os.replace(target, trash / "m")
            shutil.rmtree(trash, ignore_errors=True)
