"""Rendering bare artifacts of every recognised format, for a Triton with the native backends and for the
bundled one (Python backend only). Configs written to disk are parsed back as Triton `ModelConfig`, so what
Triton would read is what is checked. TorchScript, TensorRT and FIL cannot be loaded here (no such backends
in the bundled Triton): these tests are what proves their configs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import lightgbm
import numpy as np
import pytest
import skops.io
import xgboost
from google.protobuf import text_format
from sklearn.ensemble import RandomForestClassifier
from tritonclient.grpc import model_config_pb2 as mc

from gateway.backends import FULL_TRITON, parse_backends, resolve_backends, resolve_onnx_backend
from gateway.errors import InvalidArtifact
from gateway.frameworks import TABULAR_MAX_BATCH_SIZE, TABULAR_QUEUE_DELAY_US
from gateway.onnx_io import read_signature
from gateway.render import OnnxBackend, RenderOptions, render_model_dir

FULL = RenderOptions(onnx_backend=OnnxBackend.ONNXRUNTIME, instance_kind="KIND_GPU", backends=FULL_TRITON)
BUNDLED = RenderOptions()  # the defaults describe the bundled Triton: Python backend only
rng = np.random.default_rng(0)
X = rng.uniform(0, 1, size=(200, 5)).astype(np.float32)
Y = X @ np.arange(5) + rng.normal(0, 0.1, 200)
IO_JSON = json.dumps({"inputs": [{"name": "INPUT__0", "data_type": "FP32", "dims": [-1, 3, 8, 8]}],
                      "outputs": [{"name": "OUTPUT__0", "data_type": "TYPE_FP32", "dims": [-1, 10]}]}).encode()


def _render(tmp_path: Path, files: dict[str, bytes], options: RenderOptions) -> tuple[mc.ModelConfig, Path, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    root, rendered = render_model_dir(tmp_path, "m-1", "k.tar.gz", options)
    config = text_format.Parse((root / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.name == "m-1"
    return config, root, rendered.framework


def _io(tensors: object) -> list[tuple[str, str, list[int]]]:
    return [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in tensors]  # type: ignore[attr-defined]


def _xgb(objective: str = "reg:squarederror", **params: object) -> xgboost.Booster:
    labels = (Y > Y.mean()).astype(int) if objective.startswith("binary") else Y
    if objective.startswith("multi"):
        labels = np.digitize(Y, np.quantile(Y, [0.33, 0.66]))
    return xgboost.train({"objective": objective, "max_depth": 2, **params}, xgboost.DMatrix(X, labels),
                         num_boost_round=2)


def test_torchscript_renders_pytorch_libtorch_with_io_from_the_sidecar(tmp_path: Path) -> None:
    config, root, framework = _render(tmp_path, {"model.pt": b"torchscript zip", "io.json": IO_JSON}, FULL)
    assert (config.backend, config.platform, config.default_model_filename) == ("pytorch", "pytorch_libtorch",
                                                                                 "model.pt")
    assert _io(config.input) == [("INPUT__0", "TYPE_FP32", [-1, 3, 8, 8])]
    assert _io(config.output) == [("OUTPUT__0", "TYPE_FP32", [-1, 10])]
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and framework == "torchscript"
    assert (root / "1" / "model.pt").is_file()


def test_torchscript_takes_its_io_from_a_config_fragment_too(tmp_path: Path) -> None:
    fragment = (b'input [{ name: "x" data_type: TYPE_FP32 dims: [4] }]\n'
                b'output [{ name: "y" data_type: TYPE_FP32 dims: [2] }]\nmax_batch_size: 16\n')
    config, _, _ = _render(tmp_path, {"model.pt": b"zip", "config.pbtxt": fragment}, FULL)
    assert config.platform == "pytorch_libtorch" and config.max_batch_size == 16
    assert _io(config.input) == [("x", "TYPE_FP32", [4])]


def test_torchscript_without_io_is_refused_saying_what_to_add(tmp_path: Path) -> None:
    with pytest.raises(InvalidArtifact, match="io.json or a config.pbtxt fragment"):
        _render(tmp_path, {"model.pt": b"zip"}, FULL)


def test_tensorrt_renders_the_tensorrt_backend_on_the_gpu_leaving_io_to_the_engine(tmp_path: Path) -> None:
    config, _, framework = _render(tmp_path, {"model.plan": b"engine"}, FULL)
    assert (config.backend, config.platform, config.default_model_filename) == ("tensorrt", "tensorrt_plan",
                                                                                 "model.plan")
    assert not config.input and not config.output and framework == "tensorrt"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU


@pytest.mark.parametrize("file_name, raw_format, model_type", [
    ("xgboost.json", "json", "xgboost_json"), ("xgboost.ubj", "ubj", "xgboost_ubj"),
    ("xgboost.model", "ubj", "xgboost_ubj"), ("xgboost.model", "json", "xgboost_json")])
def test_xgboost_on_a_full_triton_renders_fil_with_its_model_type(tmp_path: Path, file_name: str, raw_format: str,
                                                                  model_type: str) -> None:
    config, root, framework = _render(tmp_path, {file_name: bytes(_xgb().save_raw(raw_format))}, FULL)
    assert config.backend == "fil" and config.default_model_filename == file_name and framework == "xgboost"
    assert config.parameters["model_type"].string_value == model_type
    assert config.parameters["output_class"].string_value == "false"
    assert config.max_batch_size == TABULAR_MAX_BATCH_SIZE
    assert config.dynamic_batching.max_queue_delay_microseconds == TABULAR_QUEUE_DELAY_US
    assert _io(config.input) == [("input__0", "TYPE_FP32", [5])]
    assert _io(config.output) == [("output__0", "TYPE_FP32", [1])]
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert not (root / "1" / "model.py").exists()  # FIL needs no runner


@pytest.mark.parametrize("objective, params, outputs", [("binary:logistic", {}, 2),
                                                        ("multi:softprob", {"num_class": 3}, 3)])
def test_a_classifier_on_fil_answers_one_probability_per_class(tmp_path: Path, objective: str, params: dict,
                                                                 outputs: int) -> None:
    config, _, _ = _render(tmp_path, {"xgboost.json": bytes(_xgb(objective, **params).save_raw("json"))}, FULL)
    assert config.parameters["output_class"].string_value == "true"
    assert config.parameters["predict_proba"].string_value == "true"
    assert _io(config.output) == [("output__0", "TYPE_FP32", [outputs])]


def test_lightgbm_on_a_full_triton_renders_fil(tmp_path: Path) -> None:
    booster = lightgbm.train({"objective": "regression", "num_leaves": 3, "verbose": -1}, lightgbm.Dataset(X, Y),
                             num_boost_round=2)
    config, _, framework = _render(tmp_path, {"model.txt": booster.model_to_string().encode()}, FULL)
    assert config.backend == "fil" and config.parameters["model_type"].string_value == "lightgbm"
    assert _io(config.input) == [("input__0", "TYPE_FP32", [5])] and framework == "lightgbm"


def test_treelite_renders_fil_with_io_from_the_sidecar_and_is_refused_without_fil(tmp_path: Path) -> None:
    sidecar = json.dumps({"inputs": [{"name": "input__0", "data_type": "FP32", "dims": [5]}],
                          "outputs": [{"name": "output__0", "data_type": "FP32", "dims": [1]}]}).encode()
    config, _, _ = _render(tmp_path / "a", {"checkpoint.tl": b"tl", "io.json": sidecar}, FULL)
    assert config.backend == "fil" and config.parameters["model_type"].string_value == "treelite_checkpoint"
    assert _io(config.input) == [("input__0", "TYPE_FP32", [5])]
    with pytest.raises(InvalidArtifact, match="needs Triton's 'fil' backend"):
        _render(tmp_path / "b", {"checkpoint.tl": b"tl", "io.json": sidecar}, BUNDLED)


@pytest.mark.parametrize("files", [{"model.pt": b"zip", "io.json": IO_JSON}, {"model.plan": b"engine"}])
def test_torchscript_and_tensorrt_on_the_bundled_triton_are_refused_naming_the_backend(
        tmp_path: Path, files: dict[str, bytes]) -> None:
    with pytest.raises(InvalidArtifact, match=r"needs Triton's '(pytorch|tensorrt)' backend.*has: python"):
        _render(tmp_path, files, BUNDLED)


def test_xgboost_on_the_bundled_triton_gets_the_runner_with_batching(tmp_path: Path) -> None:
    config, root, _ = _render(tmp_path, {"xgboost.json": bytes(_xgb("binary:logistic").save_raw("json"))}, BUNDLED)
    assert config.backend == "python" and config.parameters["model_file"].string_value == "xgboost.json"
    assert (root / "1" / "model.py").read_text().startswith('"""A tree-model runner')
    assert config.parameters["framework"].string_value == "xgboost"
    assert config.max_batch_size == TABULAR_MAX_BATCH_SIZE and config.HasField("dynamic_batching")
    assert _io(config.output) == [("output__0", "TYPE_FP32", [1])]  # what Booster.predict answers
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_lightgbm_runner_stays_on_the_cpu_even_where_native_backends_get_the_gpu(tmp_path: Path) -> None:
    booster = lightgbm.train({"objective": "multiclass", "num_class": 3, "num_leaves": 3, "verbose": -1},
                             lightgbm.Dataset(X, np.digitize(Y, np.quantile(Y, [0.33, 0.66]))), num_boost_round=2)
    options = RenderOptions(instance_kind="KIND_GPU")
    config, root, _ = _render(tmp_path, {"model.txt": booster.model_to_string().encode()}, options)
    assert (root / "1" / "model.py").read_text().startswith('"""A tree-model runner')
    assert config.parameters["framework"].string_value == "lightgbm"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert _io(config.output) == [("output__0", "TYPE_FP32", [3])]


def test_a_fragment_turns_batching_off_and_the_row_dimension_moves_into_the_dims(tmp_path: Path) -> None:
    files = {"xgboost.json": bytes(_xgb().save_raw("json")), "config.pbtxt": b"max_batch_size: 0\n"}
    config, _, _ = _render(tmp_path, files, BUNDLED)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert _io(config.input) == [("input__0", "TYPE_FP32", [-1, 5])]
    assert config.parameters["model_file"].string_value == "xgboost.json"  # template parameters survive


def test_a_fragment_overrides_the_queue_delay_and_instances(tmp_path: Path) -> None:
    fragment = (b"dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
                b"instance_group [{ kind: KIND_CPU count: 3 }]\n")
    config, _, _ = _render(tmp_path, {"xgboost.json": bytes(_xgb().save_raw("json")), "config.pbtxt": fragment},
                           FULL)
    assert config.backend == "fil" and config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 3)]


def test_a_corrupt_tree_model_is_a_422_naming_the_file_not_a_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidArtifact) as refused:
        _render(tmp_path, {"xgboost.json": b'{"learner": 12'}, BUNDLED)
    assert "xgboost.json is not a model XGBoost can read" in refused.value.message
    assert str(tmp_path) not in refused.value.message


def test_sklearn_skops_is_converted_to_onnx_and_the_original_dropped(tmp_path: Path) -> None:
    forest = RandomForestClassifier(n_estimators=3, max_depth=3, random_state=0).fit(X, Y > Y.mean())
    config, root, framework = _render(tmp_path, {"model.skops": skops.io.dumps(forest)}, BUNDLED)
    assert framework == "sklearn" and config.backend == "python"
    assert config.parameters["onnx_file"].string_value == "model.onnx" and not (root / "1/model.skops").exists()
    signature = read_signature(root / "1" / "model.onnx", "k")
    assert [(t.name, t.dims) for t in signature.inputs] == [("input__0", (-1, 5))]
    assert [t.name for t in signature.outputs] == ["label", "probabilities"]


def test_a_pickle_is_refused_unless_allowed_and_never_unpickled_when_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Trap:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    with pytest.raises(InvalidArtifact, match="is a pickle.*--allow-pickle"):
        _render(tmp_path / "a", {"model.pkl": pickle.dumps(Trap())}, BUNDLED)
    assert not marker.exists()


def test_an_allowed_pickle_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArtifact, match="does not hold a fitted scikit-learn model"):
        _render(tmp_path, {"model.joblib": pickle.dumps({"not": "a model"})}, RenderOptions(allow_pickle=True))


def test_a_config_for_a_backend_triton_lacks_is_refused_up_front(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "xgboost.json").write_bytes(b"{}")
    with pytest.raises(InvalidArtifact, match="needs Triton's 'fil' backend"):
        _render(tmp_path, {"config.pbtxt": b'backend: "fil"\n'}, BUNDLED)


def test_backends_come_from_the_flag_or_the_embedded_triton_or_a_full_image(tmp_path: Path) -> None:
    assert resolve_backends("python, fil", embedded=True) == {"python", "fil"}
    (tmp_path / "python").mkdir()
    assert resolve_backends("auto", embedded=True, backend_dir=tmp_path) == {"python"}
    assert resolve_backends("auto", embedded=True) == {"python"}  # the real bundled Triton
    assert resolve_backends("auto", embedded=False) == FULL_TRITON
    assert resolve_onnx_backend("auto", frozenset({"python"})) is OnnxBackend.PYTHON
    assert resolve_onnx_backend("auto", FULL_TRITON) is OnnxBackend.ONNXRUNTIME
    with pytest.raises(ValueError):
        parse_backends(" , ")
