"""Every file an artifact's config names stays inside the model: rendering refuses the rest with 422 naming the
field, never the path, and before anything the config names is opened."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.demo import onnx_model
from gateway.errors import InvalidArtifact
from gateway.render import OnnxBackend, RenderOptions, render_model_dir

ONNX = onnx_model("Chicago_IL").SerializeToString()
PY_CONFIG = 'backend: "python"\n'
ONNX_CONFIG = 'platform: "onnxruntime_onnx"\n'


def _artifact(root: Path, config: str, files: dict[str, bytes] | None = None) -> Path:
    (root / "1").mkdir(parents=True)
    (root / "config.pbtxt").write_text(config)
    for name, data in (files or {"model.py": b"pass\n"}).items():
        (root / "1" / name).write_bytes(data)
    return root


def _refused(root: Path, options: RenderOptions = RenderOptions()) -> str:
    with pytest.raises(InvalidArtifact) as refused:
        render_model_dir(root, "m", "tenant/model.tar.gz", options)
    assert refused.value.status == 422
    message = refused.value.message
    assert "'tenant/model.tar.gz'" in message
    assert "/etc" not in message and str(root) not in message and "passwd" not in message
    return message


@pytest.mark.parametrize("name", ["/etc/passwd", "../../other/1/model.onnx", "../config.pbtxt", "/"])
def test_default_model_filename_outside_the_version_directory_is_refused(tmp_path: Path, name: str) -> None:
    root = _artifact(tmp_path, PY_CONFIG + f'default_model_filename: "{name}"\n')
    assert "default_model_filename" in _refused(root)


def test_an_onnx_config_naming_another_models_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    other = tmp_path / "other-tenant" / "1"
    other.mkdir(parents=True)
    (other / "model.onnx").write_bytes(ONNX)
    root = _artifact(tmp_path / "a", ONNX_CONFIG + f'default_model_filename: "{other / "model.onnx"}"\n',
                     {"model.onnx": ONNX})
    for backend in OnnxBackend:  # refused whether the runner or the native backend would serve it
        assert "default_model_filename" in _refused(root, RenderOptions(onnx_backend=backend))


def test_a_symlink_leading_out_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(ONNX)
    root = _artifact(tmp_path / "a", ONNX_CONFIG + 'default_model_filename: "link.onnx"\n', {"model.onnx": ONNX})
    os.symlink(outside, root / "1" / "link.onnx")
    assert "default_model_filename" in _refused(root)


@pytest.mark.parametrize("key", ["onnx_file", "model_file", "EXECUTION_ENV_PATH"])
def test_parameters_naming_files_outside_are_refused(tmp_path: Path, key: str) -> None:
    config = PY_CONFIG + f'parameters {{ key: "{key}" value: {{ string_value: "/etc/passwd" }} }}\n'
    assert f"parameters[{key!r}]" in _refused(_artifact(tmp_path, config))


def test_a_python_model_s_own_parameters_are_its_code_s_business(tmp_path: Path) -> None:
    """Neither Triton nor a runner opens them; the model's code, which can open any file anyway, reads them."""
    config = PY_CONFIG + 'parameters { key: "trace_dir" value: { string_value: "/tmp/traces" } }\n'
    render_model_dir(_artifact(tmp_path, config), "m", "k", RenderOptions())


def test_execution_env_path_must_stay_in_the_model_directory(tmp_path: Path) -> None:
    inside = 'parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "$$TRITON_MODEL_DIRECTORY/env.tar.gz" } }'
    render_model_dir(_artifact(tmp_path / "ok", PY_CONFIG + inside + "\n"), "m", "k", RenderOptions())
    outside = inside.replace("/env.tar.gz", "/../../x/env.tar.gz")
    assert "EXECUTION_ENV_PATH" in _refused(_artifact(tmp_path / "bad", PY_CONFIG + outside + "\n"))


def test_cc_model_filenames_and_warmup_files_and_runtime_are_checked(tmp_path: Path) -> None:
    cc = PY_CONFIG + 'cc_model_filenames { key: "8.6" value: "/abs/model.plan" }\n'
    assert "cc_model_filenames" in _refused(_artifact(tmp_path / "cc", cc))
    warmup = PY_CONFIG + ('model_warmup [{ name: "w" batch_size: 1 inputs { key: "x" value: { data_type: TYPE_FP32 '
                          'dims: [1] input_data_file: "../../../etc/passwd" } } }]\n')
    assert "input_data_file" in _refused(_artifact(tmp_path / "warm", warmup))
    runtime = PY_CONFIG + 'runtime: "/tmp/evil.so"\n'
    assert "runtime" in _refused(_artifact(tmp_path / "rt", runtime))


def test_the_runners_own_onnx_file_parameter_is_checked_after_rendering(tmp_path: Path) -> None:
    """A fragment may override any rendered field, the runner's file name included."""
    (tmp_path / "model.onnx").write_bytes(ONNX)
    (tmp_path / "config.pbtxt").write_text('parameters { key: "onnx_file" value: { string_value: "../../x.onnx" } }\n')
    assert "onnx_file" in _refused(tmp_path)


def test_names_inside_the_model_are_accepted(tmp_path: Path) -> None:
    config = ONNX_CONFIG + 'default_model_filename: "sub/graph.onnx"\n'
    root = _artifact(tmp_path, config, {"model.onnx": ONNX})
    (root / "1" / "sub").mkdir()
    (root / "1" / "sub" / "graph.onnx").write_bytes(ONNX)
    root, rendered = render_model_dir(root, "m", "k", RenderOptions())
    assert rendered.framework == "onnx" and 'string_value: "sub/graph.onnx"' in (root / "config.pbtxt").read_text()


# -- fields that reach other models or run before the load (issue 19, item 11) --------------------------------

ENSEMBLE_STEPS = ('ensemble_scheduling { step [{ model_name: "other-tenants-model-0123abcd" model_version: -1 '
                  'input_map { key: "features" value: "x" } output_map { key: "price" value: "y" } }] }\n')
AGENTS = 'model_repository_agents { agents [{ name: "checksum" parameters { key: "MD5:1/model.py" value: "x" } }] }\n'


@pytest.mark.parametrize("config, field", [
    ('platform: "ensemble"\n' + ENSEMBLE_STEPS, "platform"),  # a full ensemble config
    ('platform: "ensemble"\n', "platform"),
    ('backend: "ensemble"\n', "backend"),
    (PY_CONFIG + ENSEMBLE_STEPS, "ensemble_scheduling"),
    (PY_CONFIG + AGENTS, "model_repository_agents"),
    (PY_CONFIG + "model_repository_agents {}\n", "model_repository_agents"),
])
def test_a_full_config_may_not_call_other_models_or_name_repository_agents(tmp_path: Path, config: str,
                                                                           field: str) -> None:
    message = _refused(_artifact(tmp_path, config))
    assert f"field {field}" in message and "other-tenants-model" not in message and "checksum" not in message


@pytest.mark.parametrize("fragment, field", [(ENSEMBLE_STEPS, "ensemble_scheduling"),
                                             (AGENTS, "model_repository_agents")])
def test_a_fragment_over_a_bare_model_may_not_add_them_either(tmp_path: Path, fragment: str, field: str) -> None:
    (tmp_path / "model.onnx").write_bytes(ONNX)
    (tmp_path / "config.pbtxt").write_text(fragment)
    assert f"field {field}" in _refused(tmp_path)
