"""Safe extraction of model archives.

An artifact is untrusted input: a tarball could write outside the target (`../`, absolute names), plant
links that point elsewhere, create device files, or be a decompression bomb. Every member is checked before
anything is written, and the stdlib's `data` filter is applied on top where the interpreter has it.
"""

from __future__ import annotations

import errno
import os
import posixpath
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import DiskFailed, DiskFull, InvalidArtifact

_NO_ROOM = {errno.ENOSPC, errno.EDQUOT}
_DISK_FAILED = {errno.EIO, errno.EROFS}


def disk_error(key: str, exc: OSError) -> DiskFull | DiskFailed | None:
    """The transient error for a failure of the local disk (not of the artifact), or None."""
    if exc.errno in _NO_ROOM:
        return DiskFull(f"model {key!r}: the local disk has no room for it now; retry later")
    if exc.errno in _DISK_FAILED:
        return DiskFailed(f"model {key!r}: the local disk failed while staging it ({os.strerror(exc.errno)}); "
                          "retry later")
    return None


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


def safe_extract(archive: Path, dest: Path, key: str, limits: ExtractLimits,
                 reserve: Callable[[int], None] | None = None) -> None:
    """Extract `archive` (tar, optionally gzip-compressed) into the empty directory `dest`.

    Raises InvalidArtifact, naming the model and the reason, for corrupt archives and anything unsafe, and
    DiskFull or DiskFailed when the local disk, not the archive, is the problem. `reserve` is called with the
    unpacked size read from the headers before anything is written, to make room for it (or refuse).
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
            if reserve is not None:
                reserve(total)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **kwargs)  # type: ignore[arg-type]
    except (InvalidArtifact, DiskFull, DiskFailed):
        raise
    except OSError as exc:
        transient = disk_error(key, exc)
        if transient is not None:
            raise transient from None
        raise InvalidArtifact(f"artifact {key!r} is not a readable .tar.gz: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
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
