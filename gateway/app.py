"""The composition root of the services: build them from Settings, start them in order, supervise Triton,
stop them. The edges that serve clients are started beside them by `gateway.server`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.backends import resolve_backends, resolve_onnx_backend
from gateway import redact
from gateway.config import Settings, flag
from gateway.dataplane import DataPlane
from gateway.extract import ExtractLimits
from gateway.manager import ManagerConfig, ModelManager
from gateway.budget import BudgetConfig
from gateway.footprint import TritonMeter
from gateway.instance_kind import resolve_instance_kinds
from gateway.ledger import FootprintLedger
from gateway.loop_lag import watch_lag
from gateway.memory import detect_probe
from gateway.metrics import Metrics
from gateway.policy import make_policy
from gateway.render import RenderOptions
from gateway.resources import resolve
from gateway.staging import StagingArea
from gateway.store import open_store
from gateway.stubs import Stubs
from gateway.triton.auth import read_key
from gateway.triton.control import TritonControl
from gateway.triton.grpc import TritonGrpc
from gateway.triton.http import TritonHttp
from gateway.triton.process import TritonProcess, TritonProcessConfig

log = logging.getLogger(__name__)

_WATCH_INTERVAL_S = 1.0


class Gateway:
    """The running gateway's services: store, NVMe staging, Triton (embedded or external) and its clients,
    the manager, and the data plane every edge calls."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.store = open_store(settings.store, settings.s3_endpoint_url, settings.s3_region)
        self.probe = detect_probe(settings.memory_probe)
        kinds = resolve_instance_kinds(settings.instance_kind, gpu_present=self.probe.kind == "nvml")
        backends = resolve_backends(settings.triton_backends, embedded=settings.embedded_triton)
        render = RenderOptions(
            onnx_backend=resolve_onnx_backend(settings.onnx_backend, backends),
            instance_kind=kinds.native,
            runner_instance_kind=kinds.runner,
            instance_count=settings.instance_count,
            onnx_threads=settings.onnx_threads,
            backends=backends,
            allow_pickle=settings.allow_pickle,
            model_code=settings.model_code,
        )
        limits = ExtractLimits(max_total_bytes=settings.max_artifact_bytes, max_files=settings.max_artifact_files)
        self.resources = resolve(settings, self.probe, settings.cache_dir)
        self.staging = StagingArea(settings.cache_dir, self.store, render, limits, self.resources.disk_budget_bytes)
        self.triton: TritonProcess | None = None
        api_key = _triton_api_key(settings)
        if settings.embedded_triton:
            self.triton = TritonProcess(
                TritonProcessConfig(
                    model_repository=self.staging.repo,
                    work_dir=settings.cache_dir / "triton",
                    http_port=settings.triton_http_port,
                    grpc_port=settings.triton_grpc_port,
                    metrics_port=settings.triton_metrics_port,
                    api_key=api_key,
                )
            )
            http_url, grpc_url = self.triton.http_url, self.triton.grpc_url
            api_key = self.triton.api_key
        else:
            http_url, grpc_url = str(settings.triton_http_url), str(settings.triton_grpc_url)
            if api_key is None:
                log.warning("triton.api_open", extra={"hint": f"without {flag('triton_api_key_file')} the gateway "
                                                              "sends no secret: Triton's API must then be open to "
                                                              "every client that reaches it"})
        self.control = TritonControl(grpc_url, load_timeout_s=settings.load_timeout_s, api_key=api_key)
        self.triton_http = TritonHttp(http_url, timeout_s=settings.infer_timeout_s, api_key=api_key)
        self.triton_grpc = TritonGrpc(grpc_url, api_key=api_key)
        self.manager = ModelManager(
            self.store,
            self.staging,
            self.control,
            self.metrics,
            policy=make_policy(settings.eviction_policy),
            probe=self.probe,
            meter=TritonMeter(self.probe, self._triton_pid if self.triton else None, self.staging.repo),
            ledger=FootprintLedger(settings.cache_dir / "footprints.json"),
            config=ManagerConfig(
                wait_timeout_s=settings.wait_timeout_s,
                etag_ttl_s=settings.etag_ttl_s,
                model_cache_enabled=settings.model_cache == "enabled",
                load_failure_backoff_s=settings.load_failure_backoff_s,
            ),
            budget=BudgetConfig.from_settings(settings, memory_budget_bytes=self.resources.memory_budget_bytes),
            stubs=Stubs(self._triton_pid if self.triton else None, self.staging.repo),
        )
        self.dataplane = DataPlane(self.manager, self.triton_http, self.triton_grpc, self.metrics,
                                   max_concurrency=self.resources.max_concurrency,
                                   queue_timeout_s=settings.queue_timeout_s,
                                   max_request_bytes=settings.max_request_bytes,
                                   infer_timeout_s=settings.infer_timeout_s)
        redact.configure({str(settings.cache_dir): "<cache>", self.store.url: "<store>",
                          settings.s3_endpoint_url or "": "<store endpoint>", http_url: "<triton>",
                          grpc_url: "<triton>"}, self.dataplane.names)
        self._watcher: asyncio.Task[None] | None = None
        self._memory_watch: asyncio.Task[None] | None = None
        self._lag_watch: asyncio.Task[None] | None = None
        self.started = False

    def _triton_pid(self) -> int | None:
        return self.triton.pid if self.triton else None

    async def start(self) -> None:
        if self.triton:
            self.triton.start()
            await self.triton.wait_ready(self.control.is_ready)
        else:
            await self._wait_external_ready()
        await self.triton_http.start()
        await self.triton_grpc.start()
        await self.manager.reconcile()
        if self.triton:
            self._watcher = asyncio.create_task(self._watch_triton(), name="triton-watch")
        if self.settings.remeasure_interval_s > 0:
            self._memory_watch = asyncio.create_task(self.manager.budget.watch(), name="memory-watch")
        self._lag_watch = asyncio.create_task(watch_lag(self.metrics.loop_lag), name="loop-lag")
        self.dataplane.checks.start()
        self.started = True
        log.info("gateway.started", extra={"store": self.store.url, "cache_dir": str(self.settings.cache_dir)})

    async def _wait_external_ready(self, timeout_s: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await self.control.is_ready():
            if loop.time() > deadline:
                raise TimeoutError(f"Triton at {self.control.grpc_url} not ready after {timeout_s}s")
            await asyncio.sleep(0.5)

    async def _watch_triton(self) -> None:
        """Restart the embedded Triton if it dies, then reconcile: every model it had is gone."""
        assert self.triton is not None
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            if self.triton.running():
                continue
            self.manager.suspend()  # until it is back, known models answer 503 "retry", never "unknown model"
            self.triton.reap()  # its orphaned stubs go with it
            log.error("triton.exited", extra={"code": self.triton.exit_code(), "log_tail": self.triton.log_tail(10)})
            self.metrics.triton_restarts.inc()
            try:
                self.triton.start()
                await self.triton.wait_ready(self.control.is_ready)
                await self.manager.reconcile()
                self.manager.resume()
            except Exception:
                log.exception("triton.restart_failed")
                await asyncio.sleep(5)

    @property
    def ready(self) -> bool:
        """Serving and able to load: started, Triton up, and not every load slot held by a load being
        stopped after --load-timeout."""
        loader = self.manager.loader
        return (self.started and self.manager.triton_up
                and loader.wedged < self.settings.max_concurrent_loads)

    async def stop(self) -> None:
        self.started = False
        for task in (self._watcher, self._memory_watch, self._lag_watch):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.dataplane.checks.close()
        await self.triton_http.close()
        await self.triton_grpc.close()
        await self.control.close()
        if self.triton:
            await asyncio.to_thread(self.triton.stop)
        log.info("gateway.stopped")


def _triton_api_key(settings: Settings) -> str | None:
    """The secret in --triton-api-key-file, or None when none is configured; SystemExit naming the setting
    when the file cannot be used."""
    if settings.triton_api_key_file is None:
        return None
    try:
        return read_key(settings.triton_api_key_file)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{flag('triton_api_key_file')}: {exc}") from None
