"""One model at a local path under the container-API root: what `POST /models {url}` names.

SageMaker downloads and unpacks the artifact itself and hands the container a directory under
`/opt/ml/models`; a `.tar.gz` file works too. The path must lie under `--container-api-root` both as written
and once every link is resolved (a link inside the root pointing out of it is refused), so the API can
reach neither the rest of the disk nor another gateway's cache. A directory is packed into an uncompressed
tar for staging, counted against the same caps as an archive while it is walked and packed, so an oversized
tree stops at the cap instead of being copied; links inside it travel as links, which the safe extraction
refuses when they point outside the model. Errors name the model, never a path or a file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path

from gateway.errors import InvalidArtifact, InvalidRequest, ModelNotFound
from gateway.extract import ExtractLimits
from gateway.store.base import ObjectInfo, ProgressCallback


def resolve_under(root: Path, url: str, name: str) -> Path:
    """The real path `url` names (`file:///...`, an absolute path or one relative to `root`) if it lies
    under `root` as written and as resolved; InvalidRequest if not, ModelNotFound if nothing is there."""
    text = url.removeprefix("file://")
    root = Path(os.path.abspath(root))
    written = Path(os.path.normpath(text if os.path.isabs(text) else os.path.join(root, text)))
    real_root = root.resolve()
    outside = InvalidRequest(f"model {name!r}: url must name a file or directory inside the container API root "
                             "(--container-api-root)")
    if not (written.is_relative_to(root) or written.is_relative_to(real_root)):
        raise outside
    try:
        real = written.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a link loop, unreadable
        raise ModelNotFound(f"model {name!r}: url names nothing inside the container API root") from None
    if real == real_root or not real.is_relative_to(real_root):
        raise outside
    return real


class PathSource:
    """An ArtifactStore holding exactly one artifact, `path` (already checked by `resolve_under`)."""

    def __init__(self, path: Path, limits: ExtractLimits) -> None:
        self.path = path
        self.limits = limits
        self.url = f"file://{path}"

    def _files(self, key: str) -> list[Path]:
        """Every regular file under the directory, links not followed, stopping at the caps."""
        files: list[Path] = []
        total = 0
        try:
            for dirpath, dirnames, filenames in os.walk(self.path, onerror=_raise):
                dirnames.sort()
                for name in sorted(filenames):
                    file = Path(dirpath) / name
                    files.append(file)
                    total += file.lstat().st_size
                    if len(files) > self.limits.max_files:
                        raise InvalidArtifact(f"model {key!r} holds more than {self.limits.max_files} files (the cap)")
                    if total > self.limits.max_total_bytes:
                        raise InvalidArtifact(
                            f"model {key!r} holds more than {self.limits.max_total_bytes} bytes (the cap)")
        except OSError:
            raise InvalidArtifact(f"model {key!r}: its directory cannot be read by the gateway") from None
        return files

    def head(self, key: str) -> ObjectInfo:
        try:
            is_file, is_dir = self.path.is_file(), self.path.is_dir()
        except OSError:
            is_file = is_dir = False
        if is_file:
            st = self.path.stat()
            if st.st_size > self.limits.max_total_bytes:
                raise InvalidArtifact(f"model {key!r} is larger than {self.limits.max_total_bytes} bytes (the cap)")
            return ObjectInfo(key=key, etag=f"{st.st_mtime_ns:x}-{st.st_size:x}", size=st.st_size)
        if is_dir:
            digest = hashlib.sha256()
            total = 0
            for file in self._files(key):
                st = file.lstat()
                total += st.st_size
                digest.update(f"{file.relative_to(self.path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            return ObjectInfo(key=key, etag=digest.hexdigest()[:32], size=total)
        raise ModelNotFound(f"model {key!r}: its url no longer names a file or directory")

    def fetch(self, info: ObjectInfo, dest: Path, progress: ProgressCallback | None = None) -> None:
        if not self.path.is_dir():
            shutil.copyfile(self.path, dest)
        else:
            counted = {"files": 0, "bytes": 0}

            def capped(member: tarfile.TarInfo) -> tarfile.TarInfo:
                counted["files"] += 1
                counted["bytes"] += max(member.size, 0)
                if counted["files"] > self.limits.max_files or counted["bytes"] > self.limits.max_total_bytes:
                    raise InvalidArtifact(f"model {info.key!r} grew past the caps while it was packed")
                return member

            try:
                with tarfile.open(dest, "w") as tar:
                    for child in sorted(self.path.iterdir()):
                        tar.add(child, arcname=child.name, filter=capped)
            except OSError:
                raise InvalidArtifact(f"model {info.key!r}: its directory cannot be read by the gateway") from None
        if progress:
            progress(info.size)

    def list_keys(self, limit: int = 1000) -> list[ObjectInfo]:
        return []


def _raise(error: OSError) -> None:
    raise error
