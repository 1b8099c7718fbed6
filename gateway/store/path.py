"""One model at an explicit local path: what the SageMaker container API's `POST /models {url}` names.

SageMaker downloads and unpacks the artifact itself and hands the container a directory; a `.tar.gz` file
works too. A directory is packed into an uncompressed tar for staging, so registered models go through the
same safe extraction and rendering as store artifacts.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from pathlib import Path

from gateway.errors import ModelNotFound
from gateway.store.base import ObjectInfo, ProgressCallback


class PathSource:
    """An ArtifactStore holding exactly one artifact, `path`, under any key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"file://{path}"

    def head(self, key: str) -> ObjectInfo:
        if self.path.is_file():
            st = self.path.stat()
            return ObjectInfo(key=key, etag=f"{st.st_mtime_ns:x}-{st.st_size:x}", size=st.st_size)
        if self.path.is_dir():
            digest = hashlib.sha256()
            total = 0
            for file in sorted(p for p in self.path.rglob("*") if p.is_file()):
                st = file.stat()
                total += st.st_size
                digest.update(f"{file.relative_to(self.path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            return ObjectInfo(key=key, etag=digest.hexdigest()[:32], size=total)
        raise ModelNotFound(f"model {key!r}: {self.path} does not exist")

    def fetch(self, info: ObjectInfo, dest: Path, progress: ProgressCallback | None = None) -> None:
        if self.path.is_dir():
            with tarfile.open(dest, "w") as tar:
                for child in sorted(self.path.iterdir()):
                    tar.add(child, arcname=child.name)
        else:
            shutil.copyfile(self.path, dest)
        if progress:
            progress(info.size)

    def list_keys(self, limit: int = 1000) -> list[ObjectInfo]:
        return []
