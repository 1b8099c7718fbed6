"""An artifact cannot make the gateway or Triton open files outside itself (issue 10: a config.pbtxt with
`default_model_filename: "/abs/path/other.onnx"` served another tenant's model, and `/etc/passwd` was
opened). Against a real gateway: each escape is a 422 naming the TargetModel and the field, never a path, no
load reaches Triton, and the model next door keeps answering. Issue 19: nor can it call another key's model
(an ensemble)."""

from __future__ import annotations

import json
import tarfile

import pytest

from gateway.demo import onnx_model
from tests.helpers import GatewayProcess, http, tar_gz, v2_request

HOUSE = [[1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0]]
PY_MODEL = b"class TritonPythonModel:\n    def execute(self, requests):\n        return []\n"


def _infer(gw: GatewayProcess, key: str) -> tuple[int, str]:
    status, raw, _ = http("POST", f"{gw.url}/v2/models/{key}/infer", v2_request(HOUSE))
    return status, raw.decode(errors="replace")


def _assert_refused(gw: GatewayProcess, key: str, field: str) -> None:
    status, text = _infer(gw, key)
    assert status == 422, text
    assert key in text and field in text
    for leak in ("/etc", "passwd", str(gw.cache_dir), "/repo/", "Traceback"):
        assert leak not in text, text
    assert not [e for e in gw.events("model.loaded") if e["model"] == key]
    status, raw, _ = http("POST", f"{gw.url}/invocations", b"1994,3188,5,1.5,1.62,3",
                          {"X-Amzn-SageMaker-Target-Model": key, "Content-Type": "text/csv"})
    assert 400 <= status < 500 and b"passwd" not in raw and str(gw.cache_dir).encode() not in raw


def test_default_model_filename_pointing_at_etc_passwd_is_refused_and_never_opened(
        s3_gateway: GatewayProcess, put_s3) -> None:  # type: ignore[no-untyped-def]
    key = "contain/reads-system-file.tar.gz"
    config = b'backend: "python"\ndefault_model_filename: "/etc/passwd"\n'
    put_s3(key, tar_gz({"config.pbtxt": config, "1/model.py": PY_MODEL}))
    _assert_refused(s3_gateway, key, "default_model_filename")
    triton_log = (s3_gateway.cache_dir / "triton" / "triton.log").read_text(errors="replace")
    assert "passwd" not in triton_log  # Triton was never asked to load it


def test_an_absolute_path_to_another_models_file_is_refused(s3_gateway: GatewayProcess, put_s3) -> None:  # type: ignore[no-untyped-def]
    assert _infer(s3_gateway, "Chicago_IL.tar.gz")[0] == 200  # another tenant's model, staged on this disk
    (other,) = [p for p in (s3_gateway.cache_dir / "repo").glob("*/1/model.onnx") if "chicago" in str(p).lower()]
    key = "contain/borrower.tar.gz"
    config = f'platform: "onnxruntime_onnx"\ndefault_model_filename: "{other}"\n'.encode()
    put_s3(key, tar_gz({"config.pbtxt": config, "1/model.onnx": onnx_model("Houston_TX").SerializeToString()}))
    _assert_refused(s3_gateway, key, "default_model_filename")
    assert _infer(s3_gateway, "Chicago_IL.tar.gz")[0] == 200  # the neighbour is untouched


@pytest.mark.parametrize("value", ["../../../../etc/passwd", "/etc/passwd"])
def test_the_runners_onnx_file_parameter_cannot_escape(s3_gateway: GatewayProcess, put_s3, value: str) -> None:  # type: ignore[no-untyped-def]
    key = f"contain/param-{len(value)}.tar.gz"
    fragment = f'parameters {{ key: "onnx_file" value: {{ string_value: "{value}" }} }}\n'.encode()
    put_s3(key, tar_gz({"config.pbtxt": fragment, "model.onnx": onnx_model("Houston_TX").SerializeToString()}))
    _assert_refused(s3_gateway, key, "onnx_file")


def test_a_refused_artifact_fixed_under_a_new_name_is_served(s3_gateway: GatewayProcess, put_s3) -> None:  # type: ignore[no-untyped-def]
    """The refusal is about the config, not the model: the same graph named from inside is served."""
    key = "contain/fixed.tar.gz"
    config = b'platform: "onnxruntime_onnx"\ndefault_model_filename: "graph.onnx"\n'
    put_s3(key, tar_gz({"config.pbtxt": config, "1/graph.onnx": onnx_model("Houston_TX").SerializeToString()}))
    status, text = _infer(s3_gateway, key)
    assert status == 200, text
    assert json.loads(text)["outputs"][0]["name"] == "price"


def test_an_ensemble_calling_another_keys_model_is_refused(s3_gateway: GatewayProcess, put_s3) -> None:  # type: ignore[no-untyped-def]
    """Issue 19: an ensemble names other Triton models, and Triton names follow from store keys, so one key's
    artifact could answer with another key's model. Refused with 422 naming the field; the neighbour is fine."""
    assert _infer(s3_gateway, "Chicago_IL.tar.gz")[0] == 200  # another tenant's model, staged and loaded
    (other,) = [p for p in (s3_gateway.cache_dir / "repo").glob("*/1/model.onnx") if "chicago" in str(p).lower()]
    key = "contain/ensemble.tar.gz"
    config = (f'platform: "ensemble"\nmax_batch_size: 0\n'
              'input [{ name: "features" data_type: TYPE_FP32 dims: [-1, 6] }]\n'
              'output [{ name: "price" data_type: TYPE_FP32 dims: [-1, 1] }]\n'
              f'ensemble_scheduling {{ step [{{ model_name: "{other.parent.parent.name}" model_version: -1 '
              'input_map { key: "features" value: "features" } output_map { key: "price" value: "price" } }] }\n')
    version = tarfile.TarInfo("1")
    version.type = tarfile.DIRTYPE
    put_s3(key, tar_gz({"config.pbtxt": config.encode()}, [version]))
    _assert_refused(s3_gateway, key, "platform")
    status, text = _infer(s3_gateway, "Chicago_IL.tar.gz")  # the next normal request, for another model
    assert status == 200, text


def test_a_symlink_chain_is_refused_by_the_gateways_own_checks(s3_gateway: GatewayProcess, put_s3) -> None:  # type: ignore[no-untyped-def]
    """Issue 19, item 10: `a -> .`, `a/b -> ..`, `b/file` was refused only by tarfile's data filter, whose
    message held the staging path. Now the gateway's own checks refuse it, by member, with no path."""
    def link(name: str, target: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = tarfile.SYMTYPE, target
        return info

    key = "contain/symlink-chain.tar.gz"
    escaping = tarfile.TarInfo("b/file")
    escaping.size = 1
    put_s3(key, tar_gz({"model.onnx": onnx_model("Houston_TX").SerializeToString()},
                       [link("a", "."), link("a/b", ".."), escaping]))
    status, text = _infer(s3_gateway, key)
    assert status == 422, text
    assert key in text and "'a' -> '.' points to a directory" in text
    assert str(s3_gateway.cache_dir) not in text and "/tmp" not in text
    assert _infer(s3_gateway, "Chicago_IL.tar.gz")[0] == 200
