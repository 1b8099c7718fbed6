"""Safe extraction of model archives.

An artifact is untrusted input: a tarball could write outside the target (`../`, absolute names), plant
links that point elsewhere or chain links so that a later member is written through them (`a -> .`,
`a/b -> ..`, `b/file`), replace a file by a link of the same name, create device files, or be a
decompression bomb. The gateway's own checks (`MemberCheck`) refuse all of that one member at a time, in
archive order, so they hold on an interpreter without tarfile's `data` filter or with a bypassable one; the
filter is applied on top where the interpreter has it.

The rules, which together mean no member is ever written through a link and every link ends on a regular
file inside the model:
- a name is relative, has no `..` step, and is used once: a second member of the same name, or a member
  named like a folder that earlier names passed through, is refused (the classic bypass replaces a folder or
  file by a link);
- every folder a name passes through is a real folder: never a symlink or hard link, seen earlier or later;
- a hard link names a regular file listed before it;
- a symlink, resolved from its own folder, stays inside and ends on a regular file of the archive: never on
  a folder, another link, or nothing. Symlinks to folders are refused altogether: models do not need them,
  they are what chains are built from, and a folder link makes one model directory appear under two names.
A symlink may come before the file it names; whether it ended on a regular file is settled by `finish()`
at the end of the stream, which is safe because no member can have been written through it meanwhile.
"""

from __future__ import annotations

import errno
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import DiskFailed, DiskFull, InvalidArtifact

_NO_ROOM = {errno.ENOSPC, errno.EDQUOT}
_DISK_FAILED = {errno.EIO, errno.EROFS}
_MAX_NAME_BYTES = 4096  # Linux's PATH_MAX: a longer name cannot be created anyway
_MAX_PART_BYTES = 255  # Linux's NAME_MAX, for one step of a name
_SHOWN_CHARS = 120  # how much of a member's name an error quotes


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


class _Folder:
    """A folder of the archive's tree: its entries by name (a sub-folder, or the kind of another member)."""

    __slots__ = ("entries", "listed")

    def __init__(self) -> None:
        self.entries: dict[str, _Folder | str] = {}
        self.listed = False  # a member names it (else only names passing through it do)


_FILE, _SYMLINK, _HARDLINK = "regular file", "symlink", "hard link"


class _ThroughLink(Exception):
    """A looked-up name passes through a link; the argument is the link's name."""


def _shown(name: str) -> str:
    """A member name for an error message: quoted, and cut short (a name can be kilobytes long)."""
    return repr(name if len(name) <= _SHOWN_CHARS else name[:_SHOWN_CHARS] + "...")


def _steps(name: str) -> list[str]:
    """The steps of a relative name, without empty and `.` steps (`./a//b` and `a/b` are one name)."""
    return [step for step in name.split("/") if step not in ("", ".")]


def _resolve(folder: list[str], target: str) -> list[str] | None:
    """`target` taken from `folder` by its steps alone, or None when a `..` climbs above the root."""
    resolved = list(folder)
    for step in _steps(target):
        if step != "..":
            resolved.append(step)
        elif not resolved:
            return None
        else:
            resolved.pop()
    return resolved


class MemberCheck:
    """The gateway's own checks on an archive's members, fed one member at a time in archive order.

    `check` raises InvalidArtifact, naming the model and the member, for the first member that is unsafe given
    the ones before it; `finish` raises for what only the end of the archive settles (a symlink to a file that
    never came). Neither reads the archive again, so they can run on a stream. The tree of names kept between
    members holds one entry per name (members and the folders their names pass through), and that count is
    held to `max_files`, so its memory is bounded by the cap whatever the names' depth.
    """

    def __init__(self, key: str, limits: ExtractLimits) -> None:
        self._key = key
        self._limits = limits
        self._root = _Folder()
        self._entries = 0
        self._total_bytes = 0
        self._symlinks: list[tuple[str, str, list[str]]] = []  # (name, target, resolved) settled at finish()

    @property
    def total_bytes(self) -> int:
        """The unpacked size of the members checked so far, read from their headers."""
        return self._total_bytes

    def _refuse(self, reason: str) -> InvalidArtifact:
        return InvalidArtifact(f"artifact {self._key!r}: {reason}")

    def check(self, member: tarfile.TarInfo) -> None:
        """Refuse `member` if it is unsafe; otherwise record it for the checks of later members."""
        name = member.name
        steps = self._checked_name(name)
        if member.isdev() or member.isfifo():
            raise self._refuse(f"member {_shown(name)} is a device or FIFO, which a model never needs")
        if member.issym():
            kind = _SYMLINK
            self._check_symlink(name, member.linkname, steps)
        elif member.islnk():
            kind = _HARDLINK
            self._check_hard_link(name, member.linkname)
        elif member.isreg():
            kind = _FILE
        elif member.isdir():
            kind = ""
        else:
            raise self._refuse(f"member {_shown(name)} has an unsupported type")
        self._place(name, steps, kind)
        self._total_bytes += max(member.size, 0)
        if self._total_bytes > self._limits.max_total_bytes:
            raise InvalidArtifact(
                f"artifact {self._key!r} unpacks to more than {self._limits.max_total_bytes} bytes (the cap)"
            )

    def finish(self) -> None:
        """Refuse the archive if a symlink did not, in the end, lead to one of its regular files."""
        if self._entries == 0:
            raise InvalidArtifact(f"artifact {self._key!r} is an empty archive")
        for name, target, resolved in self._symlinks:
            self._check_link_end(name, target, resolved, final=True)

    def _checked_name(self, name: str) -> list[str]:
        if (not name or name.startswith("/") or "\\" in name or "\0" in name
                or ".." in name.split("/")):
            raise self._refuse(f"member {_shown(name)} would be written outside the model directory")
        steps = _steps(name)
        if (len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES
                or any(len(step.encode("utf-8", "surrogateescape")) > _MAX_PART_BYTES for step in steps)):
            raise self._refuse(f"member {_shown(name)} has a name too long for a file system")
        return steps

    def _lookup(self, steps: list[str]) -> _Folder | str | None:
        """What the tree holds at `steps`: a folder, a member's kind, None for nothing; raises through a link."""
        node: _Folder | str | None = self._root
        for depth, step in enumerate(steps):
            if not isinstance(node, _Folder):
                if node in (_SYMLINK, _HARDLINK):
                    raise _ThroughLink("/".join(steps[:depth]))
                return None  # under a regular file: nothing can be there
            node = node.entries.get(step)
            if node is None:
                return None
        return node

    def _place(self, name: str, steps: list[str], kind: str) -> None:
        """Record a member (kind "" for a folder) at `steps`, refusing a path through a link or a reused name."""
        folder = self._root
        for depth, step in enumerate(steps[:-1]):
            entry = folder.entries.get(step)
            if entry is None:
                entry = folder.entries[step] = _Folder()
                self._count()
            elif isinstance(entry, str):
                through = "/".join(steps[: depth + 1])
                if entry in (_SYMLINK, _HARDLINK):
                    raise self._refuse(f"member {_shown(name)} would be written through a link "
                                       f"({_shown(through)} is a {entry})")
                raise self._refuse(f"member {_shown(name)} would be written under a {entry} ({_shown(through)})")
            folder = entry
        if not steps:  # the archive's root itself (`./`): only as a folder, and once
            if kind or self._root.listed:
                raise self._refuse(f"member {_shown(name)} names the model directory itself twice or not as a folder")
            self._root.listed = True
            return
        last = steps[-1]
        existing = folder.entries.get(last)
        if existing is not None:
            if kind == "" and isinstance(existing, _Folder) and not existing.listed:
                existing.listed = True  # a folder listed after names that pass through it
                return
            earlier = "folder" if isinstance(existing, _Folder) else existing
            raise self._refuse(f"member {_shown(name)} comes twice in the archive (as a {earlier} and as a "
                               f"{kind or 'folder'}); each name may be used once")
        if kind:
            folder.entries[last] = kind
        else:
            new = folder.entries[last] = _Folder()
            new.listed = True
        self._count()

    def _count(self) -> None:
        self._entries += 1
        if self._entries > self._limits.max_files:
            raise InvalidArtifact(f"artifact {self._key!r} holds more than {self._limits.max_files} files (the cap)")

    def _check_hard_link(self, name: str, target: str) -> None:
        if target.startswith("/") or _resolve([], target) is None:
            raise self._refuse(f"link {_shown(name)} -> {_shown(target)} points outside the model directory")
        try:
            end = self._lookup(_steps(target)) if ".." not in target.split("/") else None
        except _ThroughLink:
            end = None
        if end != _FILE:
            raise self._refuse(f"hard link {_shown(name)} -> {_shown(target)} does not name a regular file "
                               "listed before it in the archive")

    def _check_symlink(self, name: str, target: str, steps: list[str]) -> None:
        resolved = _resolve(steps[:-1], target)
        if not target or target.startswith("/") or "\0" in target or resolved is None:
            raise self._refuse(f"link {_shown(name)} -> {_shown(target)} points outside the model directory")
        if len(target.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
            raise self._refuse(f"link {_shown(name)} has a target too long for a file system")
        if self._check_link_end(name, target, resolved, final=False):
            self._symlinks.append((name, target, resolved))

    def _check_link_end(self, name: str, target: str, resolved: list[str], final: bool) -> bool:
        """Refuse a symlink that ends on a folder or a link or passes through one (or, when `final`, on
        nothing); True when it is still open: its target has not come yet."""
        link = f"link {_shown(name)} -> {_shown(target)}"
        try:
            end = self._lookup(resolved)
        except _ThroughLink as through:
            raise self._refuse(f"{link} leads through a link ({_shown(str(through))})") from None
        if isinstance(end, _Folder):
            raise self._refuse(f"{link} points to a directory; links may only name a regular file of the archive")
        if end in (_SYMLINK, _HARDLINK):
            raise self._refuse(f"{link} points to another link; links may only name a regular file of the archive")
        if end is None and final:
            raise self._refuse(f"{link} points to nothing in the archive")
        return end is None


def _interpreter_filter() -> dict[str, str]:
    """tarfile's `data` filter where this interpreter has it: a second line behind MemberCheck."""
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def safe_extract(archive: Path, dest: Path, key: str, limits: ExtractLimits,
                 reserve: Callable[[int], None] | None = None) -> None:
    """Extract `archive` (tar, optionally gzip-compressed) into the empty directory `dest`.

    Raises InvalidArtifact, naming the model and the reason, for corrupt archives and anything unsafe, and
    DiskFull or DiskFailed when the local disk, not the archive, is the problem. `reserve` is called with the
    unpacked size read from the headers before anything is written, to make room for it (or refuse).
    """
    dest.mkdir(parents=True, exist_ok=True)
    filter_error: type[Exception] | tuple[()] = getattr(tarfile, "FilterError", ())
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            check = MemberCheck(key, limits)
            members = []
            for member in tar:  # streaming: a bomb is stopped at the cap, not after reading it all
                check.check(member)
                members.append(member)
            check.finish()
            if reserve is not None:
                reserve(check.total_bytes)
            tar.extractall(dest, members=members, **_interpreter_filter())  # type: ignore[arg-type]
    except (InvalidArtifact, DiskFull, DiskFailed):
        raise
    except filter_error:  # its message holds local paths; MemberCheck is stricter, so this is a second line
        raise InvalidArtifact(f"artifact {key!r} has a member that the archive filter refused") from None
    except OSError as exc:
        transient = disk_error(key, exc)
        if transient is not None:
            raise transient from None
        reason = exc.strerror if exc.filename is not None and exc.strerror else str(exc)  # never a local path
        raise InvalidArtifact(f"artifact {key!r} is not a readable .tar.gz: {reason}") from None
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
