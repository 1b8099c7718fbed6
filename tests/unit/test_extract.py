import io
import random
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import default
from gateway.errors import InvalidArtifact
from gateway import extract
from gateway.extract import ExtractLimits, MemberCheck, safe_extract
from tests.helpers import tar_gz

LIMITS = ExtractLimits(max_total_bytes=default("max_artifact_bytes"), max_files=default("max_artifact_files"))


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "a.tar.gz"
    path.write_bytes(data)
    return path


def _member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def test_a_plain_archive_extracts(tmp_path: Path) -> None:
    archive = _write(tmp_path, tar_gz({"m/config.pbtxt": b"x", "m/1/model.onnx": b"y"}))
    safe_extract(archive, tmp_path / "out", "k", LIMITS)
    assert (tmp_path / "out/m/1/model.onnx").read_bytes() == b"y"


@pytest.mark.parametrize(
    "members, extra, reason",
    [
        ({"../evil": b"x"}, [], "outside"),
        ({"/etc/evil": b"x"}, [], "outside"),
        ({"a/../../evil": b"x"}, [], "outside"),
        ({}, [_member("l", tarfile.SYMTYPE, "/etc/passwd")], "points outside"),
        ({}, [_member("d/l", tarfile.SYMTYPE, "../../x")], "points outside"),
        ({}, [_member("h", tarfile.LNKTYPE, "../x")], "points outside"),
        ({}, [_member("dev", tarfile.CHRTYPE)], "device"),
        ({}, [_member("fifo", tarfile.FIFOTYPE)], "device or FIFO"),
    ],
)
def test_unsafe_members_are_refused_before_anything_is_written(tmp_path, members, extra, reason) -> None:
    archive = _write(tmp_path, tar_gz(members, extra))
    with pytest.raises(InvalidArtifact, match=reason):
        safe_extract(archive, tmp_path / "out", "k", LIMITS)
    assert not any((tmp_path / "out").rglob("*"))


def test_links_to_regular_files_inside_are_allowed(tmp_path: Path) -> None:
    """Symlinks before or after the file they name, climbing with `..`, and hard links to an earlier file."""
    archive = _write(tmp_path, _tar_gz([_file("shared/graph.onnx"), _sym("1/model.onnx", "../shared/graph.onnx"),
                                         _hard("2/model.onnx", "shared/graph.onnx"),
                                         _sym("early.onnx", "later.onnx"), _file("later.onnx")]))
    safe_extract(archive, tmp_path / "out", "k", LIMITS)
    for name in ("1/model.onnx", "2/model.onnx", "early.onnx"):
        assert (tmp_path / "out" / name).read_bytes() == b"x"
    assert (tmp_path / "out/1/model.onnx").is_symlink() and (tmp_path / "out/early.onnx").is_symlink()


def test_an_archive_of_a_folder_s_contents_extracts(tmp_path: Path) -> None:
    """`tar czf m.tar.gz -C dir .` names the root `./` and every member under it."""
    archive = _write(tmp_path, _tar_gz([_dir("."), _file("./config.pbtxt"), _dir("./1"), _file("./1/model.onnx")]))
    safe_extract(archive, tmp_path / "out", "k", LIMITS)
    assert (tmp_path / "out/1/model.onnx").read_bytes() == b"x"


def test_caps_on_size_and_file_count(tmp_path: Path) -> None:
    archive = _write(tmp_path, tar_gz({f"f{i}": b"12345" for i in range(5)}))
    with pytest.raises(InvalidArtifact, match="more than 12 bytes"):
        safe_extract(archive, tmp_path / "o1", "k", replace(LIMITS, max_total_bytes=12))
    with pytest.raises(InvalidArtifact, match="more than 3 files"):
        safe_extract(archive, tmp_path / "o2", "k", replace(LIMITS, max_files=3))


@pytest.mark.parametrize("data", [b"", b"not a tarball at all", b"\x1f\x8b\x08\x00garbage-after-gzip-magic"])
def test_corrupt_archives_are_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(InvalidArtifact, match="k"):
        safe_extract(_write(tmp_path, data), tmp_path / "out", "k", LIMITS)


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    data = tar_gz({"model.onnx": bytes(range(256)) * 400})
    with pytest.raises(InvalidArtifact, match="not a readable"):
        safe_extract(_write(tmp_path, data[: len(data) // 2]), tmp_path / "out", "k", LIMITS)


def test_uncompressed_tar_is_accepted(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("model.onnx")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"z"))
    safe_extract(_write(tmp_path, buf.getvalue()), tmp_path / "out", "k", LIMITS)
    assert (tmp_path / "out/model.onnx").read_bytes() == b"z"


def _small_tmpfs(path: Path, size: str) -> bool:
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_local_disk_is_a_transient_error_not_a_bad_artifact(tmp_path: Path) -> None:
    import subprocess

    from gateway.errors import DiskFull

    disk = tmp_path / "disk"
    if not _small_tmpfs(disk, "2m"):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        archive = tmp_path / "big.tar.gz"
        archive.write_bytes(tar_gz({"model.onnx": b"x", "pad.bin": bytes(4 << 20)}))
        with pytest.raises(DiskFull, match="'big'"):
            safe_extract(archive, disk / "x", "big", ExtractLimits(max_total_bytes=1 << 30, max_files=100))
        seen = []

        def refuse(total: int) -> None:
            seen.append(total)
            raise DiskFull("no room")

        with pytest.raises(DiskFull):  # the reservation hears the unpacked size before anything is written
            safe_extract(archive, disk / "y", "big", ExtractLimits(max_total_bytes=1 << 30, max_files=100),
                         reserve=refuse)
        assert seen == [(4 << 20) + 1] and not any((disk / "y").iterdir())
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _sym(name: str, target: str) -> tarfile.TarInfo:
    return _member(name, tarfile.SYMTYPE, target)


def _hard(name: str, target: str) -> tarfile.TarInfo:
    return _member(name, tarfile.LNKTYPE, target)


def _dir(name: str) -> tarfile.TarInfo:
    return _member(name, tarfile.DIRTYPE)


def _file(name: str, data: bytes = b"x") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


def _tar_gz(members: list[tarfile.TarInfo]) -> bytes:
    """A .tar.gz of hand-made members in this order (regular files hold b"x")."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(b"x") if info.isreg() else None)
    return buf.getvalue()


@pytest.fixture
def no_data_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter's `data` filter switched off: the gateway's own checks must stand alone."""
    off = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    monkeypatch.setattr(extract, "_interpreter_filter", lambda: off)


CHAINS = {  # issue 19, item 10, and its variants: each one writes outside, or through a link, without checks
    "the issue's chain": ([_sym("a", "."), _sym("a/b", ".."), _file("b/file")], "directory"),
    "a link to the parent from a folder": ([_dir("a"), _sym("a/b", ".."), _file("a/b/file")], "directory"),
    "a symlink to a folder that comes later": ([_sym("latest", "1"), _file("1/model.onnx")], "directory"),
    "a symlink to a folder that came earlier": ([_file("1/model.onnx"), _sym("latest", "1")], "directory"),
    "a file through a symlink": ([_file("f"), _sym("l", "f"), _file("l/x")], "through a link"),
    "a file through a hard link": ([_file("f"), _hard("h", "f"), _file("h/x")], "through a link"),
    "a folder then a symlink of its name": ([_dir("d"), _file("f"), _sym("d", "f")], "twice"),
    "a file's folder then a symlink of its name": ([_file("d/x"), _file("f"), _sym("d", "f")], "twice"),
    "a symlink then a folder of its name": ([_file("f"), _sym("d", "f"), _dir("d"), _file("d/x")], "twice"),
    "a file then a symlink of its name": ([_file("f"), _file("g"), _sym("f", "g")], "twice"),
    "a symlink then a file of its name": ([_file("g"), _sym("f", "g"), _file("f")], "twice"),
    "a file twice": ([_file("f"), _file("f")], "twice"),
    "a hard link to a symlink": ([_file("f"), _sym("s", "f"), _hard("h", "s")], "regular file"),
    "a hard link to a later file": ([_hard("h", "f"), _file("f")], "regular file"),
    "a hard link to a folder": ([_dir("d"), _hard("h", "d")], "regular file"),
    "a link to a link to outside": ([_sym("l1", "l2"), _sym("l2", "../x")], "points outside"),
    "a link to a later link": ([_file("f"), _sym("l1", "l2"), _sym("l2", "f")], "another link"),
    "a link to an earlier link": ([_file("f"), _sym("l2", "f"), _sym("l1", "l2")], "another link"),
    "a link through a link": ([_file("f"), _sym("s", "f"), _sym("t", "s/x")], "through a link"),
    "a link to nothing": ([_file("f"), _sym("l", "missing")], "nothing in the archive"),
    "a name with a parent step": ([_dir("a"), _file("a/../b")], "outside"),
}


@pytest.mark.parametrize("members, reason", list(CHAINS.values()), ids=list(CHAINS))
def test_link_chains_are_refused_by_the_gateways_own_checks(tmp_path: Path, no_data_filter: None,
                                                           members: list[tarfile.TarInfo], reason: str) -> None:
    (tmp_path / "model").mkdir()
    archive = _write(tmp_path / "model", _tar_gz(members))
    out = tmp_path / "model" / "out"
    with pytest.raises(InvalidArtifact, match=reason) as refused:
        safe_extract(archive, out, "k", LIMITS)
    assert "'k'" in refused.value.message and str(tmp_path) not in refused.value.message
    assert not any(out.iterdir())  # refused before anything was written, inside the model directory or out
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "model", archive, out]


def test_the_checks_run_one_member_at_a_time() -> None:
    """Each refusal comes at the member that makes the archive unsafe, with no second pass: fit for a stream."""
    check = MemberCheck("k", LIMITS)
    with pytest.raises(InvalidArtifact, match="'a' -> '.' points to a directory"):
        check.check(_sym("a", "."))
    check = MemberCheck("k", LIMITS)
    for member in (_file("f"), _sym("l", "f")):
        check.check(member)
    with pytest.raises(InvalidArtifact, match="'l/x' would be written through a link"):
        check.check(_file("l/x"))
    check = MemberCheck("k", LIMITS)  # a symlink's target may come later: the end of the stream settles it
    for member in (_sym("latest", "1"), _file("1/model.onnx")):
        check.check(member)
    with pytest.raises(InvalidArtifact, match="points to a directory"):
        check.finish()


def test_names_are_bounded(tmp_path: Path) -> None:
    """Names a file system cannot hold are refused by name, never with a local path; deep names count every
    folder they pass through against the file cap, so the checks' memory is bounded by the cap."""
    for members, reason in (([_file("x" * 300)], "too long"), ([_file("a/" * 2100 + "f")], "too long"),
                            ([_file("a/" * 20 + "f")], "more than 10 files")):
        with pytest.raises(InvalidArtifact, match=reason) as refused:
            safe_extract(_write(tmp_path, _tar_gz(members)), tmp_path / "out", "k", replace(LIMITS, max_files=10))
        assert str(tmp_path) not in refused.value.message and len(refused.value.message) < 400


_FUZZ_NAMES = ["a", "b", "a/b", "b/a", "a/b/c", ".", "c", "a/c", "b/file", "./a", "a/./b"]
_FUZZ_TARGETS = [".", "..", "a", "b", "a/b", "../a", "../..", "c", "b/file", "a/../b", "./c", "x", "../b/file"]


def _random_archive(rng: random.Random) -> bytes:
    members = []
    for _ in range(rng.randint(1, 5)):
        name, roll = rng.choice(_FUZZ_NAMES), rng.random()
        if roll < 0.35:
            members.append(_sym(name, rng.choice(_FUZZ_TARGETS)))
        elif roll < 0.5:
            members.append(_hard(name, rng.choice(_FUZZ_TARGETS)))
        else:
            members.append(_dir(name) if roll < 0.65 else _file(name))
    return _tar_gz(members)


def test_random_archives_of_links_never_write_outside(tmp_path: Path, no_data_filter: None) -> None:
    """Seeded: 400 archives of up to 5 files, folders and links over a few names and targets (an ad-hoc run of
    28,000 found nothing). Each is refused, or extracts to a tree with no folder link and nothing resolving
    out; nothing is ever written beside the model directory."""
    rng = random.Random(19)
    extracted = 0
    for i in range(400):
        case = tmp_path / str(i)
        case.mkdir()
        archive, out = _write(case, _random_archive(rng)), case / "out"
        try:
            safe_extract(archive, out, "k", LIMITS)
        except InvalidArtifact as refused:
            assert "'k'" in refused.message and str(tmp_path) not in refused.message
            assert not any(out.iterdir())
        else:
            extracted += 1
            for path in out.rglob("*"):
                assert not (path.is_symlink() and path.is_dir()) and path.resolve().is_relative_to(out.resolve())
        assert sorted(case.iterdir()) == [archive, out]
    assert 20 < extracted < 380  # both outcomes were exercised
