"""gateway.isolation: what children may see of the gateway's environment, the non-dumpable gateway (shown in
a real process, dropped to an unprivileged user when the tests run as root, since root reads any process),
and the `--model-code refuse` check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.errors import InvalidArtifact
from gateway.isolation import check_model_code, child_env
from tests.helpers import REPO_ROOT

GATEWAY_ENV = {
    "PATH": "/usr/bin", "HOME": "/home/gw", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TMPDIR": "/scratch",
    "LD_LIBRARY_PATH": "/opt/lib", "CUDA_VISIBLE_DEVICES": "0", "NVIDIA_VISIBLE_DEVICES": "all",
    "OMP_NUM_THREADS": "4", "PYTHONPATH": "/src",
    "MME_SIGV4_SECRET_ACCESS_KEY": "s", "MME_API_KEYS": "k", "AWS_SECRET_ACCESS_KEY": "a", "AWS_SESSION_TOKEN": "t",
    "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/t", "AWS_ROLE_ARN": "arn", "DATABASE_PASSWORD": "p", "HOSTNAME": "h",
}


def test_children_get_only_the_allow_listed_variables() -> None:
    env = child_env(source=GATEWAY_ENV)
    assert env == {name: GATEWAY_ENV[name] for name in (
        "PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS", "PYTHONPATH")}
    assert child_env({"PATH": "/venv/bin"}, source=GATEWAY_ENV)["PATH"] == "/venv/bin"


_READ_PARENT = textwrap.dedent('''
    import ctypes, json, os
    from gateway.isolation import is_dumpable, make_undumpable

    if os.geteuid() == 0:  # root reads any process whatever its flag: become an ordinary user first
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # setuid cleared the flag; a freshly started process has it set


    def child_reads_my_environ() -> str:
        pid = os.fork()
        if pid == 0:
            try:
                with open("/proc/%d/environ" % os.getppid(), "rb") as f:
                    f.read()
                os._exit(0)
            except PermissionError:
                os._exit(3)
            except BaseException:
                os._exit(4)
        return {0: "read", 3: "refused"}.get(os.waitpid(pid, 0)[1] >> 8, "error")


    before = child_reads_my_environ()
    made = make_undumpable()
    print(json.dumps({"before": before, "made": made, "after": child_reads_my_environ(), "dumpable": is_dumpable()}))
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_process_of_the_same_user_cannot_read_a_non_dumpable_gateway() -> None:
    out = subprocess.run([sys.executable, "-c", _READ_PARENT], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT, env={**os.environ, "MME_SIGV4_SECRET_ACCESS_KEY": "never-for-children"})
    assert json.loads(out.stdout) == {"before": "read", "made": True, "after": "refused", "dumpable": False}


_SERVE_PROBE = textwrap.dedent('''
    import sys
    import gateway.router.server, gateway.server
    from gateway import cli
    from gateway.isolation import is_dumpable

    def run(settings):
        print(is_dumpable())
        return 0

    gateway.server.run = gateway.router.server.run = run
    cli.main(sys.argv[1:])
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
@pytest.mark.parametrize("command", [["serve", "--store", "s"], ["router", "--instances", "127.0.0.1:1:2"]])
def test_serve_and_router_make_themselves_undumpable_before_serving(command: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", _SERVE_PROBE, *command], capture_output=True, text=True,
                         cwd=REPO_ROOT)
    assert out.stdout.strip().splitlines()[-1:] == ["False"], out.stderr[-2000:]


def _artifact(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize(("files", "reason"), [
    ({"1/model.py": b"x = 1"}, "1/model.py"),
    ({"m/1/helper.py": b"", "m/1/model.onnx": b""}, "m/1/helper.py"),
    ({"model.onnx": b"", "libtriton_onnxruntime.so": b""}, "libtriton_onnxruntime.so"),
    ({"1/model.plan": b"", "1/libplugin.so.8": b""}, "1/libplugin.so.8"),
    ({"model.onnx": b"", "triton_python_backend_stub": b""}, "triton_python_backend_stub"),
    ({"model.joblib": b""}, "model.joblib"),
    ({"model.pkl": b""}, "model.pkl"),
    ({"config.pbtxt": b'backend: "python"', "1/model.bin": b""}, 'names backend "python"'),
    ({"config.pbtxt": b'parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "e.tar.gz" } }',
      "model.onnx": b""}, "EXECUTION_ENV_PATH"),
    ({"config.pbtxt": b'platform: "onnxruntime_onnx" model_operations { op_library_filename: "ops.bin" }',
      "1/model.onnx": b""}, "model_operations"),
])
def test_code_is_refused_under_model_code_refuse(tmp_path: Path, files: dict[str, bytes], reason: str) -> None:
    root = _artifact(tmp_path, files)
    with pytest.raises(InvalidArtifact) as refused:
        check_model_code(root, "tenant/m.tar.gz", "refuse")
    message = str(refused.value)
    assert "tenant/m.tar.gz" in message and reason in message and "--model-code refuse" in message
    assert str(tmp_path) not in message
    check_model_code(root, "tenant/m.tar.gz", "allow")  # the default lets the same artifact through


def test_a_link_named_like_code_is_refused_whatever_it_points_at(tmp_path: Path) -> None:
    root = _artifact(tmp_path, {"1/notes.txt": b"import os", "1/model.bin": b""})
    (root / "1" / "model.py").symlink_to("notes.txt")
    with pytest.raises(InvalidArtifact, match="1/model.py"):
        check_model_code(root, "m.tar.gz", "refuse")


@pytest.mark.parametrize("files", [
    {"model.onnx": b"", "io.json": b"{}"},
    {"config.pbtxt": b'platform: "onnxruntime_onnx"', "1/model.onnx": b""},
    {"xgboost.json": b"{}", "config.pbtxt": b"max_batch_size: 0"},
    {"model.skops": b""},
    {"config.pbtxt": b"not a config {{{", "model.onnx": b""},  # render's to refuse, with its own message
])
def test_data_only_artifacts_pass_under_model_code_refuse(tmp_path: Path, files: dict[str, bytes]) -> None:
    check_model_code(_artifact(tmp_path, files), "m.tar.gz", "refuse")
