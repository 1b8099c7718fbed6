"""Open the store a `--store` setting names."""

from __future__ import annotations

from pathlib import Path

from gateway.store.base import ArtifactStore
from gateway.store.local import LocalStore
from gateway.store.s3 import S3Store


def open_store(url: str, s3_endpoint_url: str | None = None, s3_region: str | None = None) -> ArtifactStore:
    """`s3://bucket/prefix` opens an S3Store; a path or `file://path` opens a LocalStore."""
    if url.startswith("s3://"):
        return S3Store(url, endpoint_url=s3_endpoint_url, region=s3_region)
    path = Path(url[len("file://") :] if url.startswith("file://") else url)
    if not path.is_dir():
        raise ValueError(f"store directory {path} does not exist")
    return LocalStore(path)
