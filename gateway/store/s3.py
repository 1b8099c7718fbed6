"""S3 (or any S3-compatible store such as MinIO) as the artifact store, through boto3.

Credentials come from boto3's standard chain (environment, profile, instance role); `endpoint_url` points
at a non-AWS store. Downloads go through s3transfer (multipart, parallel ranges) with a progress callback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from gateway.errors import ModelNotFound, StoreUnavailable
from gateway.store.base import ObjectInfo, ProgressCallback

_MISSING = {"404", "NoSuchKey", "NotFound"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/") (prefix empty or ending in '/')."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


class S3Store:
    """Artifacts are objects `s3://bucket/<prefix><key>`."""

    def __init__(
        self,
        url: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" + (f"@{endpoint_url}" if endpoint_url else "")
        config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=32,
        )
        self._s3 = client or boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self._transfer = TransferConfig(max_concurrency=4, multipart_threshold=64 << 20)

    def _object_key(self, key: str) -> str:
        return self.prefix + key

    def _raise(self, key: str, exc: Exception) -> None:
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise ModelNotFound(f"model {key!r} not found in store {self.url}") from None
            raise StoreUnavailable(f"store {self.url} refused {key!r}: {code or exc}") from exc
        raise StoreUnavailable(f"store {self.url} failed for {key!r}: {exc}") from exc

    def head(self, key: str) -> ObjectInfo:
        try:
            resp = self._s3.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except (ClientError, BotoCoreError) as exc:
            self._raise(key, exc)
            raise  # unreachable; keeps type checkers honest
        return ObjectInfo(key=key, etag=str(resp["ETag"]).strip('"'), size=int(resp["ContentLength"]))

    def fetch(self, info: ObjectInfo, dest: Path, progress: ProgressCallback | None = None) -> None:
        try:
            self._s3.download_file(
                self.bucket,
                self._object_key(info.key),
                str(dest),
                Callback=progress,
                Config=self._transfer,
            )
        except (ClientError, BotoCoreError) as exc:
            self._raise(info.key, exc)

    def list_keys(self, limit: int = 1000) -> list[ObjectInfo]:
        infos: list[ObjectInfo] = []
        paginator = self._s3.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    if key and not key.endswith("/"):
                        infos.append(ObjectInfo(key=key, etag=str(obj["ETag"]).strip('"'), size=int(obj["Size"])))
                        if len(infos) >= limit:
                            return infos
        except (ClientError, BotoCoreError) as exc:
            self._raise(self.prefix or "/", exc)
        return infos
