"""The benchmark's configuration: typed dataclasses read from YAML or JSON, checked before anything starts.

A benchmark runs for minutes and starts gateways; a typo found after the third gateway is expensive. So
every key is checked against the dataclass fields (unknown keys are errors, with the allowed ones listed),
every value against its type, and cross-field rules in `__post_init__`. Errors name the offending path
(`concurrency.max_concurrency[1]`) so the fix is obvious.

Relative paths in a config (store, payload file, perf_analyzer binary) are taken from the directory the
command runs in, so `make bench` from the repository root and the paths in the README agree.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

HOURS_PER_MONTH = 720.0
"""Seed 001's month: 1,000 x 2 x $0.119 x H = $171,360 gives H = 720 (30 days), not 730."""


class BenchConfigError(ValueError):
    """A config that cannot run; the message names the key and what is wrong with it."""


@dataclass(frozen=True)
class TargetConfig:
    """One gateway to measure: a running one (`url`) or one the bench starts on the launcher's store.

    `instance_type` names a profile from gateway/data/profiles.json: its price drives the cost analysis,
    and a launched gateway gets it as `--instance-type`. `memory_budget_bytes` and `max_concurrency` are
    passed as flags too; `extra_args` go verbatim to `mme-gateway serve` (for flags this file does not
    know about).
    """

    name: str
    url: str | None = None
    instance_type: str | None = None
    memory_budget_bytes: int | None = None
    max_concurrency: int | None = None
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise BenchConfigError(f"targets: name {self.name!r} must be non-empty, without spaces or slashes")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise BenchConfigError(f"targets.{self.name}.url: expected http(s)://host:port, got {self.url!r}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise BenchConfigError(f"targets.{self.name}.memory_budget_bytes: must be positive")
        if self.max_concurrency is not None and self.max_concurrency <= 0:
            raise BenchConfigError(f"targets.{self.name}.max_concurrency: must be positive")

    @property
    def launched(self) -> bool:
        return self.url is None


@dataclass(frozen=True)
class LauncherConfig:
    """How gateways are started for targets without a URL: one subprocess per measured session."""

    store: str | None = None
    s3_endpoint_url: str | None = None
    python: str | None = None  # default: this interpreter
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0
    work_dir: str | None = None  # default: <out>/work (cache directories and gateway logs)

    def __post_init__(self) -> None:
        if self.startup_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise BenchConfigError("launcher: startup_timeout_s and stop_timeout_s must be positive")


@dataclass(frozen=True)
class SyntheticModelsConfig:
    """N generated models; model i gets sizes_bytes[i % len(sizes_bytes)] as its artifact size."""

    count: int = 10
    sizes_bytes: tuple[int, ...] = (100_000,)
    prefix: str = "synthetic-"
    dir: str | None = None  # default: <out>/store; must be the target's store when targets have URLs
    seed: int = 0
    frameworks: tuple[str, ...] = ("onnx",)  # model i is frameworks[i % len]: onnx, xgboost or lightgbm

    def __post_init__(self) -> None:
        if self.count <= 0:
            raise BenchConfigError("models.synthetic.count: must be positive")
        if not self.frameworks or set(self.frameworks) - {"onnx", "xgboost", "lightgbm"}:
            raise BenchConfigError("models.synthetic.frameworks: give one or more of onnx, xgboost, lightgbm")
        if not self.sizes_bytes or any(s < 1024 for s in self.sizes_bytes):
            raise BenchConfigError("models.synthetic.sizes_bytes: give at least one size, each >= 1024 bytes")


@dataclass(frozen=True)
class ModelsConfig:
    """Which models the workload spreads over, most popular first (Zipf rank = position in this list)."""

    source: Literal["store", "synthetic", "keys"] = "store"
    keys: tuple[str, ...] = ()
    limit: int | None = None
    synthetic: SyntheticModelsConfig = field(default_factory=SyntheticModelsConfig)

    def __post_init__(self) -> None:
        if self.source == "keys" and not self.keys:
            raise BenchConfigError("models.keys: source 'keys' needs at least one key")
        if self.limit is not None and self.limit <= 0:
            raise BenchConfigError("models.limit: must be positive")


@dataclass(frozen=True)
class WorkloadConfig:
    """Which model each invocation targets, and when invocations arrive (open loop only).

    zipf_alpha 0 is uniform; 1 is the classic long tail. `arrival` closed means each client sends its next
    invocation when the previous one answered; poisson and gamma are open-loop arrival processes at
    `rate_per_s` (gamma with shape k has a coefficient of variation 1/sqrt(k): k < 1 is burstier than
    Poisson, k = 1 is Poisson).
    """

    zipf_alpha: float = 1.0
    arrival: Literal["closed", "poisson", "gamma"] = "closed"
    rate_per_s: float | None = None
    gamma_shape: float = 0.5
    seed: int = 42

    def __post_init__(self) -> None:
        if self.zipf_alpha < 0:
            raise BenchConfigError("workload.zipf_alpha: must be >= 0 (0 is uniform)")
        if self.arrival != "closed" and (self.rate_per_s is None or self.rate_per_s <= 0):
            raise BenchConfigError(f"workload.rate_per_s: open-loop arrival {self.arrival!r} needs a positive rate")
        if self.gamma_shape <= 0:
            raise BenchConfigError("workload.gamma_shape: must be positive")


@dataclass(frozen=True)
class PayloadConfig:
    """Invocation examples, as the serverless benchmarking toolkit takes them: {"Body", "ContentType"}.

    `file` is a JSON-lines file; `examples` the same objects inline. CSV bodies are converted to KServe v2
    JSON (input `v2_input_name`, `v2_datatype`, shape [rows, columns]) when the gateway has no CSV support.
    """

    file: str | None = None
    examples: tuple[dict[str, Any], ...] = ()
    v2_input_name: str = "features"
    v2_datatype: Literal["FP32", "FP64", "INT32", "INT64"] = "FP32"

    def __post_init__(self) -> None:
        if not self.file and not self.examples:
            raise BenchConfigError("payloads: give a JSON-lines `file` or inline `examples`")


@dataclass(frozen=True)
class RequestConfig:
    """Bounds on every request; `route` auto prefers SageMaker /invocations for CSV and falls back to v2."""

    timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    route: Literal["auto", "sagemaker", "v2"] = "auto"

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise BenchConfigError("request: timeouts must be positive")


def _check_targets(section: str, names: tuple[str, ...] | None) -> None:
    if names is not None and not names:
        raise BenchConfigError(f"{section}.targets: leave it out for all targets, or name at least one")


@dataclass(frozen=True)
class StabilityConfig:
    """Invocations one after another on a fresh gateway per target: latency spread and cold starts."""

    enabled: bool = True
    invocations: int = 40
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.invocations <= 0:
            raise BenchConfigError("stability.invocations: must be positive")
        _check_targets("stability", self.targets)


@dataclass(frozen=True)
class CacheConfig:
    """The workload on a cold gateway per target: hit ratio, evictions, LoadedModelCount over time."""

    enabled: bool = True
    clients: int = 4
    duration_s: float | None = 20.0
    invocations: int | None = None
    poll_interval_s: float = 0.5
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.clients <= 0:
            raise BenchConfigError("cache.clients: must be positive")
        _check_run_length("cache", self.duration_s, self.invocations)
        if not 0.05 <= self.poll_interval_s <= 10:
            raise BenchConfigError("cache.poll_interval_s: must be between 0.05 and 10 seconds")
        _check_targets("cache", self.targets)


@dataclass(frozen=True)
class ConcurrencyConfig:
    """Per target, one gateway per max-concurrency setting, loaded with ceil(max_conc x multiplier) clients."""

    enabled: bool = True
    max_concurrency: tuple[int, ...] = (2, 4)
    client_multipliers: tuple[float, ...] = (1.0, 2.0)
    duration_s: float | None = 10.0
    invocations: int | None = None
    warmup: bool = True
    warmup_parallel: int = 1  # models loaded at once while warming up (parallel loads compete for CPU)
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.warmup_parallel <= 0:
            raise BenchConfigError("concurrency.warmup_parallel: must be positive")
        if not self.max_concurrency or any(m <= 0 for m in self.max_concurrency):
            raise BenchConfigError("concurrency.max_concurrency: give positive integers")
        if not self.client_multipliers or any(m <= 0 for m in self.client_multipliers):
            raise BenchConfigError("concurrency.client_multipliers: give positive numbers")
        _check_run_length("concurrency", self.duration_s, self.invocations)
        _check_targets("concurrency", self.targets)


@dataclass(frozen=True)
class PerfAnalyzerConfig:
    """Optional single-model passes through Triton's perf_analyzer against the gateway's KServe v2 edge."""

    enabled: bool = False
    binary: str | None = None  # default: perf_analyzer next to this interpreter, else on PATH
    model: str | None = None  # default: the most popular model
    shape: str = "features:1,6"
    measurement_interval_ms: int = 500
    stability_percentage: int = 100
    max_trials: int = 5
    concurrency_range: str = "1:4:1"
    timeout_s: float = 180.0
    extra_args: tuple[str, ...] = ()
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        parts = self.concurrency_range.split(":")
        if not 1 <= len(parts) <= 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise BenchConfigError(
                f"perf_analyzer.concurrency_range: expected start[:end[:step]], got {self.concurrency_range!r}")
        if self.measurement_interval_ms <= 0 or self.max_trials <= 0 or self.timeout_s <= 0:
            raise BenchConfigError("perf_analyzer: measurement_interval_ms, max_trials and timeout_s must be positive")
        _check_targets("perf_analyzer", self.targets)


@dataclass(frozen=True)
class CostConfig:
    """Prices come from the profiles file; these are the comparison and the recommendation's rules."""

    profiles_file: str | None = None  # default: gateway/data/profiles.json
    hours_per_month: float = HOURS_PER_MONTH
    mme_instances: int = 2
    single_model_instance_type: str = "ml.c5.large"
    single_model_instances: int = 2
    models_per_mme_endpoint: int | None = None  # None: one MME endpoint holds every model (seed 001)
    model_counts: tuple[int, ...] = (10, 1000)
    target_p99_ms: float = 1000.0
    max_error_rate: float = 0.01
    latency_scope: Literal["all", "warm"] = "all"

    def __post_init__(self) -> None:
        if self.hours_per_month <= 0:
            raise BenchConfigError("cost.hours_per_month: must be positive")
        if self.mme_instances <= 0 or self.single_model_instances <= 0:
            raise BenchConfigError("cost: instance counts must be positive")
        if self.models_per_mme_endpoint is not None and self.models_per_mme_endpoint <= 0:
            raise BenchConfigError("cost.models_per_mme_endpoint: must be positive")
        if any(n <= 0 for n in self.model_counts):
            raise BenchConfigError("cost.model_counts: must be positive")
        if self.target_p99_ms <= 0 or not 0 <= self.max_error_rate <= 1:
            raise BenchConfigError("cost: target_p99_ms must be positive and max_error_rate within [0, 1]")


def _check_run_length(section: str, duration_s: float | None, invocations: int | None) -> None:
    if (duration_s is None) == (invocations is None):
        raise BenchConfigError(f"{section}: give exactly one of duration_s and invocations")
    if (duration_s is not None and duration_s <= 0) or (invocations is not None and invocations <= 0):
        raise BenchConfigError(f"{section}: duration_s / invocations must be positive")


@dataclass(frozen=True)
class BenchConfig:
    """The whole benchmark: what to measure (targets, models), how (workload, payloads) and which passes."""

    targets: tuple[TargetConfig, ...]
    payloads: PayloadConfig
    name: str = "benchmark"
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    request: RequestConfig = field(default_factory=RequestConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    concurrency: ConcurrencyConfig = field(default_factory=ConcurrencyConfig)
    perf_analyzer: PerfAnalyzerConfig = field(default_factory=PerfAnalyzerConfig)
    cost: CostConfig = field(default_factory=CostConfig)

    def __post_init__(self) -> None:
        if not self.targets:
            raise BenchConfigError("targets: name at least one gateway to measure")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise BenchConfigError(f"targets: names must be unique, got {names}")
        for section in ("stability", "cache", "concurrency", "perf_analyzer"):
            wanted = getattr(self, section).targets or ()
            unknown = sorted(set(wanted) - set(names))
            if unknown:
                raise BenchConfigError(f"{section}.targets: unknown target(s) {unknown}; targets are {names}")
        launched = [t.name for t in self.targets if t.launched]
        if launched and not self.launcher.store and self.models.source != "synthetic":
            raise BenchConfigError(
                f"launcher.store: targets {launched} have no url, so the bench starts them and needs a store")
        if self.models.source == "store" and not self.launcher.store:
            raise BenchConfigError("models.source 'store' lists launcher.store; set it, or list models.keys")
        if self.models.source == "synthetic" and not all(t.launched for t in self.targets) \
                and not self.models.synthetic.dir:
            raise BenchConfigError(
                "models.synthetic.dir: targets with a url read their own store; name that store's directory")
        if self.models.source == "synthetic" and launched and self.launcher.store and self.models.synthetic.dir \
                and Path(self.launcher.store).resolve() != Path(self.models.synthetic.dir).resolve():
            raise BenchConfigError("models.synthetic.dir and launcher.store must be the same directory")

    def targets_for(self, section: str) -> list[TargetConfig]:
        """The targets a benchmark section runs on (all of them unless it names some)."""
        wanted = getattr(self, section).targets
        return [t for t in self.targets if wanted is None or t.name in wanted]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- reading ---------------------------------------------------------------------------------------------


def load_config(path: str | Path) -> BenchConfig:
    """Read a YAML (.yaml/.yml) or JSON config file into a validated BenchConfig."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise BenchConfigError(f"cannot read config {path}: {exc.strerror}") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise BenchConfigError(f"{path}: not valid YAML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BenchConfigError(f"{path}: not valid JSON: {exc}") from None
    return config_from_dict(data)


def config_from_dict(data: Any) -> BenchConfig:
    """Build a BenchConfig from plain data, checking keys and types on the way."""
    if not isinstance(data, dict):
        raise BenchConfigError("config: expected a mapping at the top level")
    data = dict(data)
    targets = data.get("targets")
    if isinstance(targets, dict):  # `targets: {name: {...}}` reads more naturally in YAML
        data["targets"] = [{"name": k, **(v or {})} for k, v in targets.items()]
    return _build(BenchConfig, data, "")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise BenchConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BenchConfigError(f"{where or 'config'}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}" if where else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BenchConfigError(f"{where or 'config'}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except BenchConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise BenchConfigError(f"{where or 'config'}: {exc}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise BenchConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise BenchConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise BenchConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise BenchConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BenchConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BenchConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # extra_args such as ["--max-concurrency", 4]
        if not isinstance(value, str):
            raise BenchConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
