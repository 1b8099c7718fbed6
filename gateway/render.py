"""Turn an extracted artifact into a Triton model directory.

Accepted layouts (after descending into a single top-level folder, as `tar czf m.tar.gz mydir/` makes):
- a Triton model directory: `config.pbtxt` plus `<version>/model.*` (version folders optional: bare files are
  moved into `1/`);
- bare model files: `model.onnx` (ONNX) or `model.py` (Triton Python backend), with or without config.

The artifact's `config.pbtxt` is kept with its name rewritten; otherwise one is rendered from
`model_repo_templates/` with inputs and outputs read from the ONNX graph. ONNX destined for a Triton without
the onnxruntime backend is switched to the generic Python-backend runner.
"""

from __future__ import annotations

import shutil
import string
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.errors import InvalidArtifact
from gateway.onnx_io import Signature, TensorSpec, read_signature
from gateway.paths import PYTHON_BACKENDS_DIR, TEMPLATES_DIR

RUNNER_SOURCE = PYTHON_BACKENDS_DIR / "onnx_runner" / "model.py"
_ONNX_BACKENDS = {"onnxruntime"}
_ONNX_PLATFORMS = {"onnxruntime_onnx"}


class OnnxBackend(str, Enum):
    """How ONNX artifacts are served: Triton's native backend, or the Python-backend runner."""

    ONNXRUNTIME = "onnxruntime"
    PYTHON = "python"


@dataclass(frozen=True)
class RenderOptions:
    onnx_backend: OnnxBackend = OnnxBackend.PYTHON
    instance_kind: str = "KIND_CPU"  # Triton's native backends (see gateway.instance_kind)
    runner_instance_kind: str = "KIND_CPU"  # the Python-backend ONNX runner
    instance_count: int = 1
    onnx_threads: int = 1
    templates_dir: Path = TEMPLATES_DIR


@dataclass(frozen=True)
class RenderedModel:
    """What staging learned about the model it rendered."""

    framework: str  # "onnx" | "python" | "other"
    backend: str
    instance_count: int
    instance_kind: str  # the first instance group's kind: part of the class learned estimates are kept by


def _model_root(extracted: Path) -> Path:
    """Descend through a lone top-level folder that is not itself a version folder."""
    root = extracted
    while True:
        entries = [e for e in root.iterdir() if not e.name.startswith("._") and e.name != "__MACOSX"]
        if len(entries) == 1 and entries[0].is_dir() and not entries[0].name.isdigit():
            root = entries[0]
            continue
        return root


def _version_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _ensure_version_dir(root: Path) -> Path:
    """Return the newest version folder, creating `1/` from bare files when there is none."""
    versions = _version_dirs(root)
    if versions:
        return versions[-1]
    version = root / "1"
    version.mkdir()
    for entry in list(root.iterdir()):
        if entry.name not in ("config.pbtxt", "1"):
            shutil.move(str(entry), version / entry.name)
    return version


def _io(specs: tuple[TensorSpec, ...], target: object) -> None:
    for spec in specs:
        tensor = target.add()  # type: ignore[attr-defined]
        tensor.name = spec.name
        tensor.data_type = mc.DataType.Value(spec.data_type)
        tensor.dims.extend(spec.dims)


def _from_template(template: str, options: RenderOptions, kind: str, **values: object) -> mc.ModelConfig:
    path = options.templates_dir / template / "config.pbtxt"
    text = string.Template(path.read_text()).substitute(
        instance_kind=kind,
        instance_count=options.instance_count,
        intra_op_threads=options.onnx_threads,
        **values,
    )
    return text_format.Parse(text, mc.ModelConfig())


def _is_onnx_config(config: mc.ModelConfig) -> bool:
    return config.backend in _ONNX_BACKENDS or config.platform in _ONNX_PLATFORMS


def _to_python_runner(config: mc.ModelConfig, version: Path, onnx_file: str, options: RenderOptions) -> None:
    """Rewrite an onnxruntime config so the Python-backend runner serves the same graph."""
    config.backend = "python"
    config.platform = ""
    config.default_model_filename = ""
    if not config.instance_group:
        config.instance_group.add(count=options.instance_count)
    for group in config.instance_group:
        group.kind = mc.ModelInstanceGroup.Kind.Value(options.runner_instance_kind)
        if options.runner_instance_kind != "KIND_GPU":
            del group.gpus[:]
    config.parameters["onnx_file"].string_value = onnx_file
    config.parameters["intra_op_threads"].string_value = str(options.onnx_threads)
    shutil.copyfile(RUNNER_SOURCE, version / "model.py")


def _fill_io(config: mc.ModelConfig, signature: Signature) -> None:
    if not config.input:
        _io(signature.inputs, config.input)
    if not config.output:
        _io(signature.outputs, config.output)


def _parse_config(path: Path, key: str) -> mc.ModelConfig:
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise InvalidArtifact(f"artifact {key!r}: config.pbtxt is not a valid Triton model config: {exc}") from None


def _kind(config: mc.ModelConfig) -> str:
    if not config.instance_group:
        return "KIND_AUTO"
    return mc.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind)


def _instances(config: mc.ModelConfig) -> int:
    return sum(max(group.count, 1) for group in config.instance_group) or 1


def render_model_dir(extracted: Path, name: str, key: str, options: RenderOptions) -> tuple[Path, RenderedModel]:
    """Shape `extracted` in place into a Triton model directory named `name`; returns its root."""
    root = _model_root(extracted)
    config_path = root / "config.pbtxt"
    has_config = config_path.is_file()
    version = _ensure_version_dir(root)
    onnx_file = "model.onnx" if (version / "model.onnx").is_file() else None
    has_python = (version / "model.py").is_file()

    if has_config:
        config = _parse_config(config_path, key)
        onnx_file = config.default_model_filename or onnx_file if _is_onnx_config(config) else onnx_file
        if _is_onnx_config(config):
            if not onnx_file or not (version / onnx_file).is_file():
                raise InvalidArtifact(f"artifact {key!r}: its config names an ONNX model but {version.name}/ has none")
            _fill_io(config, read_signature(version / onnx_file, key))
            if options.onnx_backend is OnnxBackend.PYTHON:
                _to_python_runner(config, version, onnx_file, options)
            framework = "onnx"
        else:
            framework = "python" if config.backend == "python" else "other"
    elif has_python:
        config = _from_template("python", options, "KIND_CPU", name=name, model_file="model.py")
        framework = "python"
    elif onnx_file:
        signature = read_signature(version / onnx_file, key)
        if options.onnx_backend is OnnxBackend.PYTHON:
            config = _from_template("onnx_python", options, options.runner_instance_kind, name=name,
                                    model_file=onnx_file)
            shutil.copyfile(RUNNER_SOURCE, version / "model.py")
        else:
            config = _from_template("onnx", options, options.instance_kind, name=name, model_file=onnx_file)
        _fill_io(config, signature)
        framework = "onnx"
    else:
        found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())[:10]
        raise InvalidArtifact(
            f"artifact {key!r} holds no model: expected model.onnx or model.py (or a config.pbtxt), found {found}"
        )

    config.name = name
    config_path.write_text(text_format.MessageToString(config))
    return root, RenderedModel(framework=framework, backend=config.backend or config.platform,
                               instance_count=_instances(config), instance_kind=_kind(config))
