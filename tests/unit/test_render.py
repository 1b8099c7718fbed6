from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.demo import onnx_model
from gateway.errors import InvalidArtifact
from gateway.render import OnnxBackend, RenderOptions, render_model_dir


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _config(root: Path) -> mc.ModelConfig:
    return text_format.Parse((root / "config.pbtxt").read_text(), mc.ModelConfig())


ONNX = onnx_model("Chicago_IL").SerializeToString()


def test_bare_onnx_on_the_python_backend_gets_the_runner_and_graph_io(tmp_path: Path) -> None:
    root, rendered = render_model_dir(_tree(tmp_path, {"model.onnx": ONNX}), "m-1", "k", RenderOptions())
    config = _config(root)
    assert config.name == "m-1" and config.backend == "python"
    assert [(i.name, list(i.dims)) for i in config.input] == [("features", [-1, 6])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("price", [-1, 1])]
    assert config.parameters["onnx_file"].string_value == "model.onnx"
    assert (root / "1/model.py").read_text().startswith('"""A generic ONNX runner')
    assert rendered.framework == "onnx"


def test_bare_onnx_on_a_full_triton_uses_the_native_backend(tmp_path: Path) -> None:
    options = RenderOptions(onnx_backend=OnnxBackend.ONNXRUNTIME, instance_kind="KIND_GPU", instance_count=2)
    root, rendered = render_model_dir(_tree(tmp_path, {"model.onnx": ONNX}), "m", "k", options)
    config = _config(root)
    assert config.backend == "onnxruntime" and config.instance_group[0].count == 2
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.Kind.KIND_GPU
    assert not (root / "1/model.py").exists() and rendered.instance_count == 2


def test_a_model_directory_keeps_its_config_with_the_name_rewritten(tmp_path: Path) -> None:
    files = {"mymodel/config.pbtxt": b'name: "orig"\nbackend: "python"\nmax_batch_size: 4\n',
             "mymodel/2/model.py": b"pass\n"}
    root, rendered = render_model_dir(_tree(tmp_path, files), "new-name", "k", RenderOptions())
    config = _config(root)
    assert config.name == "new-name" and config.max_batch_size == 4 and (root / "2/model.py").exists()
    assert rendered.framework == "python"


def test_an_onnxruntime_config_is_switched_to_the_runner_on_the_python_backend(tmp_path: Path) -> None:
    files = {"config.pbtxt": b'platform: "onnxruntime_onnx"\ninstance_group [{ kind: KIND_GPU gpus: [0] }]\n',
             "1/model.onnx": ONNX}
    root, _ = render_model_dir(_tree(tmp_path, files), "m", "k", RenderOptions())
    config = _config(root)
    assert config.backend == "python" and config.platform == ""
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.Kind.KIND_CPU
    assert config.input[0].name == "features" and (root / "1/model.py").exists()


def test_no_model_inside_is_refused_naming_the_formats_never_the_listing(tmp_path: Path) -> None:
    files = {"secret-customer-list.csv": b"a,b", "nested/private.key": b"k"}
    with pytest.raises(InvalidArtifact) as refused:
        render_model_dir(_tree(tmp_path, files), "m", "cities/k.tar.gz", RenderOptions())
    message = refused.value.message
    assert "'cities/k.tar.gz' holds no model" in message and "model.onnx" in message and "xgboost.json" in message
    assert "secret-customer-list" not in message and "private.key" not in message and str(tmp_path) not in message


def test_a_broken_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArtifact, match="not a valid Triton model config"):
        render_model_dir(_tree(tmp_path, {"config.pbtxt": b"name: {{{", "1/model.py": b""}), "m", "k",
                         RenderOptions())
