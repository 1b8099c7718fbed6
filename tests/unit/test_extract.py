import io
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import default
from gateway.errors import InvalidArtifact
from gateway.extract import ExtractLimits, safe_extract
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


def test_links_inside_the_directory_are_allowed(tmp_path: Path) -> None:
    archive = _write(tmp_path, tar_gz({"1/model.onnx": b"y"}, [_member("latest", tarfile.SYMTYPE, "1")]))
    safe_extract(archive, tmp_path / "out", "k", LIMITS)
    assert (tmp_path / "out/latest/model.onnx").read_bytes() == b"y"


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
