"""One settings object, built from command-line flags with environment defaults.

Each setting is declared once, as a field of `Settings`: its name, type, default, help and choices. The flag,
the environment variable and the parsing are derived from that field: `wait_timeout_s` is `--wait-timeout`
and `MME_WAIT_TIMEOUT` (dashes for underscores; a field in seconds drops its `_s`). Nothing else in the
gateway reads the environment (boto3's credential chain aside), and components that take a setting get it
from here instead of carrying a default of their own (`default()` serves code that runs without a Settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.instance_kind import CHOICES as INSTANCE_KINDS
from gateway.isolation import MODEL_CODE_CHOICES
from gateway.policy import POLICIES
from gateway.render import OnnxBackend

ENV_PREFIX = "MME_"
REQUIRED: Any = dataclasses.MISSING
MEMORY_PROBES = ("auto", "nvml", "host")  # what gateway.memory.detect_probe accepts
ONNX_BACKENDS = ("auto", *(backend.value for backend in OnnxBackend))


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Settings:
    store: str = setting(REQUIRED, "artifact store: a directory, file://dir or s3://bucket/prefix (required)")
    cache_dir: Path = setting(Path(".mme-cache"), "local NVMe directory for staged models and the Triton repository")
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8080, "HTTP port")
    grpc_port: int = setting(8081, "KServe v2 gRPC port (0: no gRPC edge)")
    s3_endpoint_url: str | None = setting(None, "S3 endpoint for MinIO and other S3-compatible stores")
    s3_region: str | None = setting(None, "S3 region (default: boto3's chain)")
    triton_http_url: str | None = setting(
        None, "use an existing Triton: its HTTP address (host:port); needs --triton-grpc-url")
    triton_grpc_url: str | None = setting(None, "use an existing Triton: its gRPC address (host:port)")
    triton_api_key_file: Path | None = setting(
        None, "a file holding the secret Triton's restricted APIs expect in the mme-triton-key header (start an "
        "external Triton with it); the embedded Triton uses it too, else a new random one per start")
    triton_http_port: int = setting(0, "embedded Triton's HTTP port (0: a free one)")
    triton_grpc_port: int = setting(0, "embedded Triton's gRPC port (0: a free one)")
    triton_metrics_port: int = setting(0, "embedded Triton's metrics port (0: a free one)")
    onnx_backend: str = setting(
        "auto", "serve ONNX with Triton's onnxruntime backend or the Python runner", ONNX_BACKENDS)
    triton_backends: str = setting(
        "auto", "backends the Triton in front has, comma-separated (onnxruntime,python,fil,...); auto: the "
        "embedded Triton's own, or a full Triton image for an external one")
    allow_pickle: bool = setting(
        False, "load scikit-learn pickles (model.pkl, model.joblib) to convert them to ONNX; a pickle runs code")
    model_code: str = setting(
        "allow", "refuse: artifacts that carry code (model.py or other Python, native libraries, pickles even "
        "with --allow-pickle, a Python-backend config) are 422; for stores whose writers are not trusted",
        MODEL_CODE_CHOICES)
    instance_count: int = setting(1, "Triton instances per model when the artifact has no config")
    onnx_threads: int = setting(1, "onnxruntime intra-op threads per instance of the Python runner")
    wait_timeout_s: float = setting(60.0, "seconds a request waits for its model to load before 'not ready, retry'")
    etag_ttl_s: float = setting(
        30.0, "seconds a loaded model's version is trusted before the store is checked again")
    load_timeout_s: float = setting(
        300.0, "seconds Triton may take to load one model; past it the load is stopped (its stubs killed)")
    load_failure_backoff_s: float = setting(
        60.0, "seconds a version that failed to load is refused before it is tried again (a new version: at once)")
    infer_timeout_s: float = setting(
        55.0, "seconds Triton may take to answer one request (under the 60 s clients allow); past it the model "
        "is treated as hung and restarted")
    max_artifact_bytes: int = setting(8 << 30, "cap on the unpacked size of one artifact")
    max_artifact_files: int = setting(10_000, "cap on the number of files in one artifact")
    instance_type: str | None = setting(
        None, "instance profile (ml.g5.xlarge, ...; see gateway/data/profiles.json) or 'auto' to read the machine: "
        "sets the memory budget, concurrency cap and NVMe budget")
    memory_budget_bytes: int | None = setting(
        None, "memory for loaded models (default: the profile's or the device's)")
    memory_slack: float = setting(0.1, "share of memory kept free for unloads in flight")
    memory_probe: str = setting("auto", "measure model memory with NVML (GPU) or host RSS", MEMORY_PROBES)
    disk_budget_bytes: int | None = setting(
        None, "bytes of staged models on local disk (default: profile NVMe or free space)")
    eviction_policy: str = setting(
        "lru", "which idle model to unload first: lru (SageMaker's) or gdsf (size/cost aware)", POLICIES)
    model_cache: str = setting(
        "enabled", "SageMaker ModelCacheSetting: 'disabled' unloads and deletes after each call",
        ("enabled", "disabled"))
    max_concurrency: int | None = setting(
        None, "concurrent invocations (default: the profile's vCPUs; unlimited without one)")
    queue_timeout_s: float = setting(10.0, "seconds an invocation waits for a concurrency slot before 429")
    size_factor: float = setting(2.0, "footprint estimate: artifact bytes x this, plus the instance overhead")
    instance_overhead_bytes: int = setting(96 << 20, "footprint estimate: memory of one model instance on its own")
    max_concurrent_loads: int = setting(
        2, "models loaded into Triton at the same time; further loads wait for a slot")
    admission_wait_s: float = setting(
        10.0, "seconds a load waits for busy models to free memory before 503 (retry)")
    min_residency_s: float = setting(2.0, "seconds a newly loaded model is evicted only if nothing else can go")
    device_reserve_bytes: int = setting(
        256 << 20, "device memory (GPU, or host RAM without one) never promised to a model")
    remeasure_interval_s: float = setting(
        2.0, "seconds between background measurements of loaded models (0: off)")
    instance_kind: str = setting(
        "auto", "where rendered models run: auto (GPU when NVML sees one), cpu or gpu", INSTANCE_KINDS)
    api_keys_file: Path | None = setting(
        None, "API keys, hashed: one 'NAME SCOPES sha256:HEX' line each (mme-gateway keys create); re-read on change")
    api_keys: str | None = setting(
        None, "API key lines as in --api-keys-file, separated by ';' or newlines (for a secret in the environment)")
    sigv4_access_key_id: str | None = setting(
        None, "accept AWS SigV4-signed SageMaker runtime calls made with this access key (invoke scope)")
    sigv4_secret_access_key: str | None = setting(
        None, "the secret of --sigv4-access-key-id (prefer the environment variable)")
    metrics_auth: bool = setting(False, "require an API key (any scope) for /metrics")
    insecure: bool = setting(
        False, "serve without API keys on a non-loopback address (anyone who reaches the port can load and "
        "unload models)")
    container_api: bool = setting(False, "serve the SageMaker multi-model container API (POST/GET/DELETE /models)")
    container_api_root: Path = setting(
        Path("/opt/ml/models"), "the only directory the container API's POST /models may load from")
    max_request_bytes: int = setting(
        64 << 20, "cap on one request's body, and on the tensors it declares, after decompression (413 beyond)")
    header_timeout_s: float = setting(10.0, "seconds a client may take to send a request's headers")
    body_timeout_s: float = setting(30.0, "seconds a request body may stall between two chunks (408 after)")
    log_level: str = setting("info", "debug, info, warning or error")

    @property
    def embedded_triton(self) -> bool:
        return not (self.triton_http_url and self.triton_grpc_url)


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}


def default(name: str) -> Any:
    """The declared default of setting `name`, for code that builds a component without a Settings."""
    value = FIELDS[name].default
    if value is dataclasses.MISSING:
        raise KeyError(f"setting {name!r} has no default")
    return value


def flag(name: str) -> str:
    """`--wait-timeout` for `wait_timeout_s`: dashes for underscores, and a field in seconds drops its `_s`."""
    return "--" + name.removesuffix("_s").replace("_", "-")


def env_var(name: str) -> str:
    """`MME_WAIT_TIMEOUT` for `wait_timeout_s`: the flag's name, upper case, underscores for dashes."""
    return ENV_PREFIX + flag(name)[2:].replace("-", "_").upper()


def _dest(name: str) -> str:
    return flag(name)[2:].replace("-", "_")


@functools.cache
def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _kind(name: str, schema: type = Settings) -> type:
    """str, int, float, bool or Path: the field's type, with the None of an optional one left out."""
    hint = _hints(schema)[name]
    if isinstance(hint, types.UnionType):
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint not in (str, int, float, bool, Path):
        raise TypeError(f"setting {name!r}: no flag parsing for {hint!r}")
    return typing.cast(type, hint)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(text: str | bool) -> bool:
    """`--container-api`, `--container-api=false`, `MME_CONTAINER_API=1`: the usual spellings, nothing else."""
    if isinstance(text, bool):
        return text
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise argparse.ArgumentTypeError(f"{text!r} is not a yes/no value ({'/'.join(_TRUE)} or {'/'.join(_FALSE)})")


def parse(name: str, text: Any, schema: type = Settings) -> Any:
    """A flag's or an environment variable's text as setting `name`'s type."""
    kind = _kind(name, schema)
    return parse_bool(text) if kind is bool else kind(text)


def add_arguments(parser: argparse.ArgumentParser, schema: type) -> None:
    """One flag per field of the settings dataclass `schema`; its environment variable, when set, replaces the
    declared default."""
    for f in dataclasses.fields(schema):
        name = f.name
        kind = _kind(name, schema)
        declared = None if f.default is dataclasses.MISSING else f.default
        switch = {"nargs": "?", "const": True, "type": parse_bool} if kind is bool else {
            "type": None if kind is str else kind}
        parser.add_argument(
            flag(name), default=os.environ.get(env_var(name), declared), help=f.metadata["help"],
            choices=f.metadata["choices"], **switch,
        )


def values_from_args(args: argparse.Namespace, schema: type) -> dict[str, Any]:
    """Every field of `schema` from parsed arguments, typed, and checked against its choices."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        name = f.name
        value = getattr(args, _dest(name))
        if value is not None:
            try:
                value = parse(name, value, schema)
            except (ValueError, argparse.ArgumentTypeError) as exc:  # from the environment: argparse never saw it
                raise SystemExit(f"{env_var(name)}: {exc}") from None
        choices = f.metadata["choices"]
        if choices and value not in choices:  # argparse checks a flag's value, not one from the environment
            raise SystemExit(f"{flag(name)} (or {env_var(name)}) must be one of {', '.join(choices)}, not {value!r}")
        values[name] = value
    return values


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, Settings)


def settings_from_args(args: argparse.Namespace) -> Settings:
    if not args.store:
        raise SystemExit(f"{flag('store')} (or {env_var('store')}) is required: a directory or s3://bucket/prefix")
    values = values_from_args(args, Settings)
    if bool(values["triton_http_url"]) != bool(values["triton_grpc_url"]):
        raise SystemExit(f"{flag('triton_http_url')} and {flag('triton_grpc_url')} go together")
    if values["max_concurrent_loads"] < 1:
        raise SystemExit(f"{flag('max_concurrent_loads')} must be at least 1")
    values["cache_dir"] = values["cache_dir"].resolve()
    return Settings(**values)
