"""The scikit-learn conversion child (gateway.convert), run for real: a pickle the operator allowed runs code
in it, and that code finds none of the gateway's secrets and cannot take more than the child's limits."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from gateway.convert import child_memory_bytes, sklearn_to_onnx
from gateway.errors import InvalidArtifact

SECRETS = {"MME_SIGV4_SECRET_ACCESS_KEY": "sigv4-secret-for-no-child", "AWS_SECRET_ACCESS_KEY": "aws-secret-for-no-child",
           "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/no-child", "MME_API_KEYS": "ops invoke sha256:00"}


class _Runs:
    """Pickles as a call of exec(code): what a hostile model.pkl does when it is unpickled."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (self.code,)


def _convert_pickle(tmp_path: Path, code: str) -> str:
    model = tmp_path / "model.pkl"
    model.write_bytes(pickle.dumps(_Runs(code)))
    with pytest.raises(InvalidArtifact) as refused:
        sklearn_to_onnx(model, tmp_path / "model.onnx", "tenant/m.tar.gz", allow_pickle=True)
    assert "tenant/m.tar.gz" in str(refused.value)
    return str(refused.value)


def test_the_child_gets_none_of_the_gateways_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    seen = tmp_path / "seen.json"
    _convert_pickle(tmp_path, f"import os, json; open({str(seen)!r}, 'w').write(json.dumps(dict(os.environ)))")
    env = json.loads(seen.read_text())  # the code ran: the pickle was unpickled in the child
    assert not [name for name in env if name.startswith(("MME_", "AWS_"))], sorted(env)
    assert not set(SECRETS.values()) & set(env.values())


def test_the_child_cannot_take_more_memory_than_its_limit(tmp_path: Path) -> None:
    too_much = child_memory_bytes(1 << 10) + (1 << 30)
    message = _convert_pickle(tmp_path, f"kept = bytearray({too_much})")
    assert "memory" in message and str(child_memory_bytes((tmp_path / "model.pkl").stat().st_size)) in message


def test_the_child_cannot_write_a_file_over_its_limit(tmp_path: Path) -> None:
    big = tmp_path / "big"
    message = _convert_pickle(tmp_path, f"open({str(big)!r}, 'wb').truncate({child_memory_bytes(1 << 10) + (1 << 30)})")
    assert "wrote a file over its limit" in message
    assert not big.exists() or big.stat().st_size <= child_memory_bytes(1 << 20)
