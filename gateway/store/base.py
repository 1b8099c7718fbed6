"""The interface every artifact store implements.

Stores are synchronous (boto3 is); the manager runs them in worker threads so the event loop never blocks
on a download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes received since the previous call."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD of an artifact tells: enough to tell versions apart and to size the download."""

    key: str
    etag: str
    size: int


class ArtifactStore(Protocol):
    """A read-only view of `<prefix>/<key>` objects."""

    url: str
    """A stable identifier of the store and prefix (used to namespace Triton model names)."""

    def head(self, key: str) -> ObjectInfo:
        """Metadata of `key`; raises ModelNotFound if absent, StoreUnavailable if the store fails."""
        ...

    def fetch(self, info: ObjectInfo, dest: Path, progress: ProgressCallback | None = None) -> None:
        """Download the object `info` describes (from a `head` just before) to the file `dest`."""
        ...

    def list_keys(self, limit: int = 1000) -> list[ObjectInfo]:
        """Up to `limit` artifacts under the prefix, for listings and benchmarks."""
        ...
