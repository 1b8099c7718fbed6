"""Artifact stores: where model archives live (a local directory or an S3 prefix)."""

from gateway.store.base import ArtifactStore, ObjectInfo, ProgressCallback
from gateway.store.factory import open_store

__all__ = ["ArtifactStore", "ObjectInfo", "ProgressCallback", "open_store"]
