"""The embedded Triton's start-up: the numpy guard (its Python backend predates numpy 2), the allow-listed
environment its stubs inherit, and the secret its restricted APIs expect."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import pytest

from gateway.triton.auth import read_key
from gateway.triton.process import TritonProcess, TritonProcessConfig, stub_numpy_problem


@pytest.mark.parametrize(("version", "ok"), [("1.26.4", True), ("1.24.0", True), ("2.0.0", False), ("2.3.1", False)])
def test_numpy_guard(version: str, ok: bool) -> None:
    problem = stub_numpy_problem(version)
    assert (problem is None) == ok
    if not ok:
        assert "numpy<2" in problem and version in problem


def test_numpy_guard_without_numpy() -> None:
    assert "not installed" in (stub_numpy_problem(None) or "")


def _process(tmp_path: Path, api_key: str | None = None) -> TritonProcess:
    return TritonProcess(TritonProcessConfig(model_repository=tmp_path / "repo", work_dir=tmp_path / "work",
                                             api_key=api_key))


def test_triton_and_its_stubs_get_no_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MME_SIGV4_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_WEB_IDENTITY_TOKEN_FILE", "MME_API_KEYS"):
        monkeypatch.setenv(name, "secret-" + name)
    process = _process(tmp_path)
    env = process._env()
    assert not [name for name in env if name.startswith(("MME_", "AWS_"))]
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")  # where the stub finds python3
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(process.paths.libs)


def test_every_api_but_health_is_restricted_to_the_gateways_secret(tmp_path: Path) -> None:
    first, second = _process(tmp_path / "a"), _process(tmp_path / "b")
    assert first.api_key != second.api_key and len(first.api_key) >= 32  # a new random secret per start
    flags = [arg for arg in first.command() if "restricted" in arg]
    apis = "metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging"
    assert flags == [f"--http-restricted-api={apis}:mme-triton-key={first.api_key}",
                     f"--grpc-restricted-protocol={apis}:mme-triton-key={first.api_key}"]
    assert _process(tmp_path / "c", api_key="from-the-file").api_key == "from-the-file"


def test_the_secret_stays_out_of_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    process = _process(tmp_path, api_key="never-logged-secret")
    process.paths = dataclasses.replace(process.paths, binary=Path("/bin/true"))
    with caplog.at_level(logging.INFO, logger="gateway.triton.process"):
        process.start()
    process.stop()
    (start,) = [r for r in caplog.records if r.getMessage() == "triton.start"]
    assert "never-logged-secret" not in start.cmd and "mme-triton-key=<secret>" in start.cmd  # type: ignore[attr-defined]


@pytest.mark.parametrize(("text", "ok"), [("abc-DEF_123\n", True), ("", False), ("a b", False), ("a:b", False),
                                          ("a,b", False), ("a=b", False), ("é", False)])
def test_the_key_file_holds_one_usable_word(tmp_path: Path, text: str, ok: bool) -> None:
    path = tmp_path / "key"
    path.write_text(text)
    if ok:
        assert read_key(path) == text.strip()
    else:
        with pytest.raises(ValueError):
            read_key(path)
