"""A local directory as the artifact store: the embedded default and the demo's store."""

from __future__ import annotations

from pathlib import Path

from gateway.errors import ModelNotFound
from gateway.store.base import ObjectInfo, ProgressCallback

_CHUNK = 1 << 20


class LocalStore:
    """Artifacts are files under `root`; the ETag is derived from size and modification time.

    mtime+size is what `make`-style tools trust too: it changes whenever a file is replaced by a copy or an
    upload, and costs one stat() instead of hashing the file on every freshness check.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ModelNotFound(f"model {key!r} is not under the store {self.url}")
        return path

    def _info(self, key: str, path: Path) -> ObjectInfo:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ModelNotFound(f"model {key!r} not found in store {self.url}") from None
        if not path.is_file():
            raise ModelNotFound(f"model {key!r} in store {self.url} is not a file")
        return ObjectInfo(key=key, etag=f"{st.st_mtime_ns:x}-{st.st_size:x}", size=st.st_size)

    def head(self, key: str) -> ObjectInfo:
        return self._info(key, self._path(key))

    def fetch(self, info: ObjectInfo, dest: Path, progress: ProgressCallback | None = None) -> None:
        path = self._path(info.key)
        with path.open("rb") as src, dest.open("wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                if progress:
                    progress(len(chunk))

    def list_keys(self, limit: int = 1000) -> list[ObjectInfo]:
        infos: list[ObjectInfo] = []
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                key = path.relative_to(self.root).as_posix()
                infos.append(self._info(key, path))
                if len(infos) >= limit:
                    break
        return infos
