"""Turn an extracted artifact into a Triton model directory.

Accepted layouts (after descending into a single top-level folder, as `tar czf m.tar.gz mydir/` makes):
- a Triton model directory: `config.pbtxt` naming a backend or platform, plus `<version>/model.*` (version
  folders optional: bare files are moved into `1/`);
- bare model files in one of the formats `gateway.frameworks` recognises (ONNX, a `model.py`, TorchScript,
  TensorRT, XGBoost, LightGBM, treelite, scikit-learn), optionally with `io.json` (inputs and outputs) and a
  `config.pbtxt` fragment (a config without a backend: its fields override the rendered ones).

A full `config.pbtxt` is kept with its name rewritten; otherwise one is rendered from `model_repo_templates/`
for the format and the backends the Triton in front of the gateway has: the native backend where it has it,
else a Python-backend runner (ONNX, XGBoost, LightGBM), else a 422 saying which backend is missing.
scikit-learn models are converted to ONNX at staging; pickles only when the operator allows them. Every file
the final config names must lie inside the model, and the artifact's config may not be an ensemble or name
repository agents (gateway.containment).
"""

from __future__ import annotations

import re
import shutil
import string
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.containment import check_config_fields, check_config_paths
from gateway.convert import INPUT_NAME, OUTPUT_NAME, inspect_model, sklearn_to_onnx
from gateway.errors import InvalidArtifact
from gateway.frameworks import (TABULAR_MAX_BATCH_SIZE, TABULAR_QUEUE_DELAY_US, Format, detect, expected_files,
                                fil_model_type)
from gateway.isolation import check_model_code
from gateway.onnx_io import Signature, TensorSpec, read_signature
from gateway.sidecar import read_sidecar
from gateway.paths import PYTHON_BACKENDS_DIR, TEMPLATES_DIR

RUNNER_SOURCE = PYTHON_BACKENDS_DIR / "onnx_runner" / "model.py"
RUNNER_SOURCES = {  # runner template -> the model.py it copies next to the model file
    "onnx_python": RUNNER_SOURCE,
    "xgboost_python": PYTHON_BACKENDS_DIR / "tree_runner" / "model.py",
    "lightgbm_python": PYTHON_BACKENDS_DIR / "tree_runner" / "model.py",
}
SIDECAR = "io.json"
_ONNX_BACKENDS = {"onnxruntime"}
_ONNX_PLATFORMS = {"onnxruntime_onnx"}
_PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch", "tensorrt_plan": "tensorrt",
                      "tensorflow_graphdef": "tensorflow", "tensorflow_savedmodel": "tensorflow"}
_MAX_BATCH_SIZE_SET = re.compile(r"^\s*max_batch_size\s*:", re.MULTILINE)


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
    backends: frozenset[str] = frozenset({"python"})  # what the Triton in front has (gateway.backends)
    allow_pickle: bool = False  # scikit-learn pickles run code when loaded: refused unless the operator allows
    model_code: str = "allow"  # "refuse": artifacts carrying code are refused (gateway.isolation)


@dataclass(frozen=True)
class RenderedModel:
    """What staging learned about the model it rendered."""

    framework: str  # a gateway.frameworks framework ("onnx", "xgboost", ...), or "other" for a full config
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
        max_batch_size=TABULAR_MAX_BATCH_SIZE,
        queue_delay_us=TABULAR_QUEUE_DELAY_US,
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
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise InvalidArtifact(f"artifact {key!r}: config.pbtxt is not a valid Triton model config: {exc}") from None
    check_config_fields(config, key)  # a full config or a fragment, before anything it says is acted on
    return config


def _kind(config: mc.ModelConfig) -> str:
    if not config.instance_group:
        return "KIND_AUTO"
    return mc.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind)


def _instances(config: mc.ModelConfig) -> int:
    return sum(max(group.count, 1) for group in config.instance_group) or 1




def _backend_of(config: mc.ModelConfig) -> str:
    return config.backend or _PLATFORM_BACKENDS.get(config.platform, "")


def _check_backend(config: mc.ModelConfig, options: RenderOptions, key: str) -> None:
    """A config for a backend this Triton lacks would fail inside Triton; say which backend, up front."""
    backend = _backend_of(config)
    available = options.backends | {options.onnx_backend.value}
    if backend and backend not in available:
        raise InvalidArtifact(
            f"artifact {key!r} needs Triton's {backend!r} backend, which the Triton behind this gateway does not "
            f"have (it has: {', '.join(sorted(available))})"
        )


def _merge_fragment(config: mc.ModelConfig, fragment: mc.ModelConfig, fragment_text: str) -> None:
    """The artifact's fields win over the template's; parameters are merged key by key."""
    for field, value in fragment.ListFields():
        if field.name == "name":
            continue
        target = getattr(config, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target.MergeFrom(value)  # parameters, cc_model_filenames: the fragment's keys win
        elif field.label == field.LABEL_REPEATED:
            config.ClearField(field.name)
            getattr(config, field.name).extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(config, field.name, value)
    if _MAX_BATCH_SIZE_SET.search(fragment_text):  # proto3 cannot tell an explicit 0 from an absent field
        config.max_batch_size = fragment.max_batch_size
    if config.max_batch_size == 0:
        config.ClearField("dynamic_batching")  # Triton batches only models that declare a batch size


def _tabular_signature(num_features: int, num_outputs: int, batched: bool) -> Signature:
    """FIL's tensor names; without Triton batching the row dimension is part of the dims."""
    rows = () if batched else (-1,)
    return Signature(inputs=(TensorSpec(INPUT_NAME, "TYPE_FP32", (*rows, num_features)),),
                     outputs=(TensorSpec(OUTPUT_NAME, "TYPE_FP32", (*rows, num_outputs)),))


def _render_onnx(name: str, version: Path, onnx_file: str, key: str, options: RenderOptions) -> mc.ModelConfig:
    signature = read_signature(version / onnx_file, key)
    if options.onnx_backend is OnnxBackend.PYTHON:
        config = _from_template("onnx_python", options, options.runner_instance_kind, name=name, model_file=onnx_file)
        shutil.copyfile(RUNNER_SOURCE, version / "model.py")
    else:
        config = _from_template("onnx", options, options.instance_kind, name=name, model_file=onnx_file)
    _fill_io(config, signature)
    return config


def _render_bare(fmt: Format, model_file: str, name: str, version: Path, key: str,
                 options: RenderOptions) -> tuple[mc.ModelConfig, tuple[int, int] | None]:
    """The template's config for `fmt`, and for a tree model its (features, outputs) per row."""
    if fmt.framework == "python":
        return _from_template("python", options, "KIND_CPU", name=name, model_file=model_file), None
    if fmt.framework == "onnx" or fmt.converted_to_onnx:
        return _render_onnx(name, version, model_file, key, options), None
    native = fmt.backend in options.backends
    if not native and fmt.runner_template is None:
        raise InvalidArtifact(
            f"artifact {key!r}: {model_file} ({fmt.framework}) needs Triton's {fmt.backend!r} backend, which the "
            f"Triton behind this gateway does not have (it has: {', '.join(sorted(options.backends))})"
        )
    values: dict[str, object] = {"name": name, "model_file": model_file,
                                 "model_type": fil_model_type(version / model_file), "output_class": "false"}
    if fmt.framework not in ("xgboost", "lightgbm"):  # treelite: its tensors come from io.json or a fragment
        return _from_template(fmt.native_template, options, options.instance_kind, **values), None
    tabular = inspect_model(fmt.framework, version / model_file, key)
    if native:  # FIL answers a classifier with one probability per class (two for a binary one)
        values["output_class"] = str(tabular.classifier).lower()
        outputs = max(tabular.num_outputs, 2) if tabular.classifier else tabular.num_outputs
        config = _from_template(fmt.native_template, options, options.instance_kind, **values)
        return config, (tabular.num_features, outputs)
    template = str(fmt.runner_template)  # the runner answers what the library's predict() answers
    shutil.copyfile(RUNNER_SOURCES[template], version / "model.py")
    kind = "KIND_GPU" if options.instance_kind == "KIND_GPU" and tabular.gpu else "KIND_CPU"
    return _from_template(template, options, kind, **values), (tabular.num_features, tabular.num_outputs)


def _no_model(key: str) -> InvalidArtifact:
    return InvalidArtifact(
        f"artifact {key!r} holds no model this gateway recognises: expected one of {expected_files()} (or a "
        f"config.pbtxt naming a backend)"
    )


def _sklearn_to_onnx(fmt: Format, model_file: str, version: Path, key: str, options: RenderOptions) -> str:
    """Convert a scikit-learn model to `model.onnx` beside it and drop the original; returns 'model.onnx'."""
    if fmt.pickle and not options.allow_pickle:
        raise InvalidArtifact(
            f"artifact {key!r}: {model_file} is a pickle, which runs code when it is loaded, and this gateway "
            f"does not load pickles; save the model with skops (model.skops) or export it to ONNX (model.onnx), "
            f"or have the operator allow pickles (--allow-pickle)"
        )
    onnx_file = "model.onnx"
    sklearn_to_onnx(version / model_file, version / onnx_file, key, options.allow_pickle)
    (version / model_file).unlink()
    return onnx_file


def render_model_dir(extracted: Path, name: str, key: str, options: RenderOptions) -> tuple[Path, RenderedModel]:
    """Shape `extracted` in place into a Triton model directory named `name`; returns its root."""
    check_model_code(extracted, key, options.model_code)
    root = _model_root(extracted)
    config_path = root / "config.pbtxt"
    artifact_config = _parse_config(config_path, key) if config_path.is_file() else None
    version = _ensure_version_dir(root)

    if artifact_config is not None and (artifact_config.backend or artifact_config.platform):
        config, framework = _render_full(artifact_config, version, key, options)
    else:
        found = detect(version)
        if found is None:
            raise _no_model(key)
        fmt, model_file = found
        framework = fmt.framework
        if fmt.converted_to_onnx:
            model_file = _sklearn_to_onnx(fmt, model_file, version, key, options)
        config, tabular = _render_bare(fmt, model_file, name, version, key, options)
        if artifact_config is not None:
            _merge_fragment(config, artifact_config, config_path.read_text())
        if (version / SIDECAR).is_file():
            _fill_io(config, read_sidecar(version / SIDECAR, key))
        if tabular is not None:
            _fill_io(config, _tabular_signature(*tabular, batched=config.max_batch_size > 0))
        if fmt.framework in ("torchscript", "treelite") and not (config.input and config.output):
            raise InvalidArtifact(
                f"artifact {key!r}: {model_file} ({fmt.framework}) does not declare its inputs and outputs; "
                f"add {SIDECAR} or a config.pbtxt fragment with input and output"
            )

    config.name = name
    _check_backend(config, options, key)
    check_config_paths(config, root, _version_dirs(root), key)
    config_path.write_text(text_format.MessageToString(config))
    return root, RenderedModel(framework=framework, backend=config.backend or config.platform,
                               instance_count=_instances(config), instance_kind=_kind(config))


def _render_full(config: mc.ModelConfig, version: Path, key: str, options: RenderOptions) -> tuple[mc.ModelConfig, str]:
    """An artifact's own complete config: ONNX switched to the runner where needed, anything else kept."""
    if not _is_onnx_config(config):
        return config, "python" if config.backend == "python" else "other"
    check_config_paths(config, version.parent, _version_dirs(version.parent), key)  # before a named file is opened
    onnx_file = config.default_model_filename or "model.onnx"
    if not (version / onnx_file).is_file():
        raise InvalidArtifact(f"artifact {key!r}: its config names an ONNX model but version {version.name} has none")
    _fill_io(config, read_signature(version / onnx_file, key))
    if options.onnx_backend is OnnxBackend.PYTHON:
        _to_python_runner(config, version, onnx_file, options)
    return config, "onnx"
