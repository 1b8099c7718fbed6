"""A model config may reach nothing outside its own model: no file outside its directory, no other model.

An artifact is untrusted, and its `config.pbtxt` can name files: `default_model_filename`,
`cc_model_filenames`, parameters such as the ONNX runner's `onnx_file`, the Python backend's
`EXECUTION_ENV_PATH`, warm-up data files, a backend `runtime`. Triton opens what they name, so an absolute or
escaping name (`/etc/passwd`, `../other-model/1/model.onnx`, a symlink leading out) would make it read another
tenant's model or any file the server can read. Extraction already refuses links that point out; this check
covers what the config itself names, after rendering, against the directories Triton will resolve it in.
Errors name the model and the field, never the path (which may be an internal one).

Two kinds of config reach further than files, and are refused outright (`check_config_fields`): an ensemble
(`platform: "ensemble"`, `ensemble_scheduling`) calls other Triton models by name, and Triton names follow
from store keys, so one key's artifact could call another key's model; repository agents
(`model_repository_agents`) run on the model directory before Triton loads it.
"""

from __future__ import annotations

import re
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from gateway.errors import InvalidArtifact

# Parameters whose value is a file or directory name that Triton or a runner of ours opens: ours (onnx_file,
# model_file), the Python backend's EXECUTION_ENV_PATH, and for other backends anything that says so. Other
# parameters of a Python-backend model are read by the model's own code, which can open what it likes anyway.
_FILE_PARAMETER = re.compile(r"(file|filename|files|path|dir|directory)$", re.IGNORECASE)
_PYTHON_FILE_PARAMETERS = {"onnx_file", "model_file", "EXECUTION_ENV_PATH"}
_MODEL_DIR_VARIABLE = "$$TRITON_MODEL_DIRECTORY"
_BACKEND_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _inside(base: Path, name: str) -> bool:
    """`name` is relative and, with any links followed, still lies under `base`."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    return (base / name).resolve().is_relative_to(base.resolve())


def _refuse(key: str, field: str) -> InvalidArtifact:
    return InvalidArtifact(
        f"artifact {key!r}: config.pbtxt field {field} names a file outside the model's own directory; "
        f"name a file inside the model's version directory (a relative name such as model.onnx)"
    )


def check_config_fields(config: mc.ModelConfig, key: str) -> None:
    """Raise InvalidArtifact naming the first field of `config` that reaches another model or runs an agent."""
    if config.platform == "ensemble" or config.backend == "ensemble":
        field = "platform" if config.platform == "ensemble" else "backend"
        raise InvalidArtifact(f"artifact {key!r}: config.pbtxt field {field} makes it an ensemble, which calls "
                              "other models by name and is not served here; serve each model as its own artifact")
    if config.WhichOneof("scheduling_choice") == "ensemble_scheduling":
        raise InvalidArtifact(f"artifact {key!r}: config.pbtxt field ensemble_scheduling calls other models by "
                              "name, which is not served here; serve each model as its own artifact")
    if config.HasField("model_repository_agents"):
        raise InvalidArtifact(f"artifact {key!r}: config.pbtxt field model_repository_agents runs repository "
                              "agents on the model before it loads, which this gateway does not allow; remove it")


def check_config_paths(config: mc.ModelConfig, root: Path, versions: list[Path], key: str) -> None:
    """Raise InvalidArtifact naming the first field of `config` that reaches outside `root` / its versions."""
    for field, name in _version_relative(config):
        if not all(_inside(version, name) for version in versions):
            raise _refuse(key, field)
    for field, value in _file_parameters(config):
        if value.startswith(_MODEL_DIR_VARIABLE):  # the Python backend substitutes the model directory
            relative = value[len(_MODEL_DIR_VARIABLE):].lstrip("/")
            if not _inside(root, relative):
                raise _refuse(key, field)
        elif not all(_inside(version, value) for version in versions):
            raise _refuse(key, field)
    for field, name in _warmup_files(config):
        if not _inside(root / "warmup", name):
            raise _refuse(key, field)
    if config.runtime and ("/" in config.runtime or not _BACKEND_NAME.match(Path(config.runtime).stem)):
        raise _refuse(key, "runtime")  # a library or model.py name, looked up in Triton's backend directory
    if config.backend and not _BACKEND_NAME.match(config.backend):
        raise InvalidArtifact(f"artifact {key!r}: config.pbtxt field backend is not a backend name")


def _version_relative(config: mc.ModelConfig) -> list[tuple[str, str]]:
    named = [("default_model_filename", config.default_model_filename)] if config.default_model_filename else []
    named += [(f"cc_model_filenames[{cc!r}]", name) for cc, name in config.cc_model_filenames.items()]
    return named


def _file_parameters(config: mc.ModelConfig) -> list[tuple[str, str]]:
    python = config.backend == "python"
    return [(f"parameters[{name!r}]", p.string_value) for name, p in config.parameters.items()
            if p.string_value and (name in _PYTHON_FILE_PARAMETERS if python else _FILE_PARAMETER.search(name))]


def _warmup_files(config: mc.ModelConfig) -> list[tuple[str, str]]:
    found = []
    for warmup in config.model_warmup:
        for name, tensor in warmup.inputs.items():
            if tensor.WhichOneof("input_data_type") == "input_data_file":
                found.append((f"model_warmup[{warmup.name!r}].inputs[{name!r}].input_data_file",
                               tensor.input_data_file))
    return found
