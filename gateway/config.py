"""One settings object, built from command-line flags with environment defaults.

Every flag `--some-flag` can also be set as `MME_SOME_FLAG`; nothing else in the gateway reads the
environment (boto3's credential chain aside).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from gateway.render import OnnxBackend


@dataclass(frozen=True)
class Settings:
    store: str
    cache_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int = 8081  # KServe v2 gRPC edge; 0 turns it off
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    triton_http_url: str | None = None  # set both to use an existing Triton instead of the embedded one
    triton_grpc_url: str | None = None
    triton_http_port: int = 0  # embedded Triton's ports; 0 picks free ones
    triton_grpc_port: int = 0
    triton_metrics_port: int = 0
    onnx_backend: str = "auto"  # auto | python | onnxruntime
    instance_count: int = 1
    onnx_threads: int = 1
    wait_timeout_s: float = 60.0
    etag_ttl_s: float = 30.0
    load_timeout_s: float = 300.0
    max_artifact_bytes: int = 8 << 30
    max_artifact_files: int = 10_000
    instance_type: str | None = None  # a profile name (ml.g5.xlarge, ...), "auto", or None (the machine)
    memory_budget_bytes: int | None = None  # overrides the profile's / machine's memory
    memory_slack: float = 0.1  # share of memory kept free for unloads in flight
    memory_probe: str = "auto"  # auto | nvml | host
    disk_budget_bytes: int | None = None  # overrides the profile's NVMe / the cache disk's free space
    eviction_policy: str = "lru"
    model_cache: str = "enabled"  # SageMaker's ModelCacheSetting: enabled | disabled
    max_concurrency: int | None = None  # concurrent invocations (default: the profile's vCPUs; none if no profile)
    queue_timeout_s: float = 10.0  # how long an invocation waits for a slot before 429
    size_factor: float = 2.0  # footprint estimate = artifact bytes x factor + overhead, per instance
    max_concurrent_loads: int = 2
    admission_wait_s: float = 10.0
    min_residency_s: float = 2.0
    device_reserve_bytes: int = 256 << 20
    remeasure_interval_s: float = 2.0
    instance_kind: str = "auto"  # auto | cpu | gpu
    instance_overhead_bytes: int = 96 << 20  # a Python-backend stub process costs this much on its own
    log_level: str = "info"

    @property
    def embedded_triton(self) -> bool:
        return not (self.triton_http_url and self.triton_grpc_url)

    def resolved_onnx_backend(self) -> OnnxBackend:
        """The bundled Triton has only the Python backend; an external one is assumed to be a full Triton."""
        if self.onnx_backend == "auto":
            return OnnxBackend.PYTHON if self.embedded_triton else OnnxBackend.ONNXRUNTIME
        return OnnxBackend(self.onnx_backend)


def _env(name: str, default: object) -> object:
    return os.environ.get(f"MME_{name.upper().replace('-', '_')}", default)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    def opt(flag: str, default: object, help: str, **kw: object) -> None:
        parser.add_argument(f"--{flag}", default=_env(flag, default), help=help, **kw)  # type: ignore[arg-type]

    opt("store", None, "artifact store: a directory, file://dir or s3://bucket/prefix (required)")
    opt("cache-dir", "./.mme-cache", "local NVMe directory for staged models and the Triton repository", type=Path)
    opt("host", "127.0.0.1", "address to listen on")
    opt("port", 8080, "HTTP port", type=int)
    opt("grpc-port", 8081, "KServe v2 gRPC port (0: no gRPC edge)", type=int)
    opt("s3-endpoint-url", None, "S3 endpoint for MinIO and other S3-compatible stores")
    opt("s3-region", None, "S3 region (default: boto3's chain)")
    opt("triton-http-url", None, "use an existing Triton: its HTTP address (host:port); needs --triton-grpc-url")
    opt("triton-grpc-url", None, "use an existing Triton: its gRPC address (host:port)")
    opt("triton-http-port", 0, "embedded Triton's HTTP port (0: a free one)", type=int)
    opt("triton-grpc-port", 0, "embedded Triton's gRPC port (0: a free one)", type=int)
    opt("triton-metrics-port", 0, "embedded Triton's metrics port (0: a free one)", type=int)
    opt("onnx-backend", "auto", "serve ONNX with Triton's onnxruntime backend or the Python runner",
        choices=["auto", "python", "onnxruntime"])
    opt("instance-count", 1, "Triton instances per model when the artifact has no config", type=int)
    opt("onnx-threads", 1, "onnxruntime intra-op threads per instance of the Python runner", type=int)
    opt("wait-timeout", 60.0, "seconds a request waits for its model to load before 'not ready, retry'", type=float)
    opt("etag-ttl", 30.0, "seconds a loaded model's version is trusted before the store is checked again",
        type=float)
    opt("load-timeout", 300.0, "seconds Triton may take to load one model", type=float)
    opt("max-artifact-bytes", 8 << 30, "cap on the unpacked size of one artifact", type=int)
    opt("max-artifact-files", 10_000, "cap on the number of files in one artifact", type=int)
    opt("instance-type", None, "instance profile (ml.g5.xlarge, ...; see gateway/data/profiles.json) or 'auto' "
        "to read the machine: sets the memory budget, concurrency cap and NVMe budget")
    opt("memory-budget-bytes", None, "memory for loaded models (default: the profile's or the device's)", type=int)
    opt("memory-slack", 0.1, "share of memory kept free for unloads in flight", type=float)
    opt("memory-probe", "auto", "measure model memory with NVML (GPU) or host RSS", choices=["auto", "nvml", "host"])
    opt("disk-budget-bytes", None, "bytes of staged models on local disk (default: profile NVMe or free space)",
        type=int)
    opt("eviction-policy", "lru", "which idle model to unload first: lru (SageMaker's) or gdsf (size/cost aware)",
        choices=["lru", "gdsf"])
    opt("model-cache", "enabled", "SageMaker ModelCacheSetting: 'disabled' unloads and deletes after each call",
        choices=["enabled", "disabled"])
    opt("max-concurrency", None, "concurrent invocations (default: the profile's vCPUs; unlimited without one)",
        type=int)
    opt("queue-timeout", 10.0, "seconds an invocation waits for a concurrency slot before 429", type=float)
    opt("size-factor", 2.0, "footprint estimate: artifact bytes x this, plus the instance overhead", type=float)
    opt("instance-overhead-bytes", 96 << 20, "footprint estimate: memory of one model instance on its own", type=int)
    opt("max-concurrent-loads", 2, "models loaded into Triton at the same time; further loads wait for a slot",
        type=int)
    opt("admission-wait", 10.0, "seconds a load waits for busy models to free memory before 503 (retry)", type=float)
    opt("min-residency", 2.0, "seconds a newly loaded model is evicted only if nothing else can go", type=float)
    opt("device-reserve-bytes", 256 << 20, "device memory (GPU, or host RAM without one) never promised to a model",
        type=int)
    opt("remeasure-interval", 2.0, "seconds between background measurements of loaded models (0: off)", type=float)
    opt("instance-kind", "auto", "where rendered models run: auto (GPU when NVML sees one), cpu or gpu",
        choices=["auto", "cpu", "gpu"])
    opt("log-level", "info", "debug, info, warning or error")


def settings_from_args(args: argparse.Namespace) -> Settings:
    if not args.store:
        raise SystemExit("--store (or MME_STORE) is required: a directory or s3://bucket/prefix")
    if bool(args.triton_http_url) != bool(args.triton_grpc_url):
        raise SystemExit("--triton-http-url and --triton-grpc-url go together")
    if int(args.max_concurrent_loads) < 1:
        raise SystemExit("--max-concurrent-loads must be at least 1")
    return Settings(
        store=args.store,
        cache_dir=Path(args.cache_dir).resolve(),
        host=args.host,
        port=int(args.port),
        grpc_port=int(args.grpc_port),
        s3_endpoint_url=args.s3_endpoint_url,
        s3_region=args.s3_region,
        triton_http_url=args.triton_http_url,
        triton_grpc_url=args.triton_grpc_url,
        triton_http_port=int(args.triton_http_port),
        triton_grpc_port=int(args.triton_grpc_port),
        triton_metrics_port=int(args.triton_metrics_port),
        onnx_backend=args.onnx_backend,
        instance_count=int(args.instance_count),
        onnx_threads=int(args.onnx_threads),
        wait_timeout_s=float(args.wait_timeout),
        etag_ttl_s=float(args.etag_ttl),
        load_timeout_s=float(args.load_timeout),
        max_artifact_bytes=int(args.max_artifact_bytes),
        max_artifact_files=int(args.max_artifact_files),
        instance_type=args.instance_type,
        memory_budget_bytes=None if args.memory_budget_bytes is None else int(args.memory_budget_bytes),
        memory_slack=float(args.memory_slack),
        memory_probe=args.memory_probe,
        disk_budget_bytes=None if args.disk_budget_bytes is None else int(args.disk_budget_bytes),
        eviction_policy=args.eviction_policy,
        model_cache=args.model_cache,
        max_concurrency=None if args.max_concurrency is None else int(args.max_concurrency),
        queue_timeout_s=float(args.queue_timeout),
        size_factor=float(args.size_factor),
        instance_overhead_bytes=int(args.instance_overhead_bytes),
        max_concurrent_loads=int(args.max_concurrent_loads),
        admission_wait_s=float(args.admission_wait),
        min_residency_s=float(args.min_residency),
        device_reserve_bytes=int(args.device_reserve_bytes),
        remeasure_interval_s=float(args.remeasure_interval),
        instance_kind=args.instance_kind,
        log_level=args.log_level,
    )
