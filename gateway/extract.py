"""Safe extraction of model archives.

An artifact is untrusted input: a tarball could write outside the target (`../`, absolute names), plant
links that point elsewhere, create device files, or be a decompression bomb. Every member is checked before
anything is written, and the stdlib's `data` filter is applied on top where the interpreter has it.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import InvalidArtifact


@dataclass(frozen=True)
class ExtractLimits:
    """Caps that bound what one archive may unpack to (--max-artifact-bytes and --max-artifact-files)."""

    max_total_bytes: int
    max_files: int


def _check_member(member: tarfile.TarInfo, key: str) -> None:
    name = member.name
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm == ".." or norm.startswith("../") or "\\" in name or "\0" in name:
        raise InvalidArtifact(f"artifact {key!r}: member {name!r} would be written outside the model directory")
    if member.isdev() or member.isfifo():
        raise InvalidArtifact(f"artifact {key!r}: member {name!r} is a device or FIFO, which a model never needs")
    if member.issym() or member.islnk():
        target = member.linkname
        resolved = posixpath.normpath(
            posixpath.join(posixpath.dirname(norm), target) if member.issym() else target
        )
        if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise InvalidArtifact(f"artifact {key!r}: link {name!r} -> {target!r} points outside the model directory")
    elif not (member.isfile() or member.isdir()):
        raise InvalidArtifact(f"artifact {key!r}: member {name!r} has an unsupported type")


def safe_extract(archive: Path, dest: Path, key: str, limits: ExtractLimits) -> None:
    """Extract `archive` (tar, optionally gzip-compressed) into the empty directory `dest`.

    Raises InvalidArtifact, naming the model and the reason, for corrupt archives and anything unsafe.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = []
            total = 0
            for member in tar:  # streaming: a bomb is stopped at the cap, not after reading it all
                _check_member(member, key)
                total += max(member.size, 0)
                if total > limits.max_total_bytes:
                    raise InvalidArtifact(
                        f"artifact {key!r} unpacks to more than {limits.max_total_bytes} bytes (the cap)"
                    )
                members.append(member)
                if len(members) > limits.max_files:
                    raise InvalidArtifact(f"artifact {key!r} holds more than {limits.max_files} files (the cap)")
            if not members:
                raise InvalidArtifact(f"artifact {key!r} is an empty archive")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **kwargs)  # type: ignore[arg-type]
    except InvalidArtifact:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise InvalidArtifact(f"artifact {key!r} is not a readable .tar.gz: {exc}") from None
    _check_tree(dest, key)


def _check_tree(root: Path, key: str) -> None:
    """Belt and braces: after extraction, no path under `root` may resolve outside it."""
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if not path.resolve().is_relative_to(real_root):
                raise InvalidArtifact(f"artifact {key!r}: {path.relative_to(root)} resolves outside the model directory")
