"""Run the configured benchmarks: one gateway session per (benchmark, target[, max-concurrency]).

A fresh gateway (fresh cache directory) per session keeps benchmarks from warming each other's caches:
the stability and cache benchmarks see real cold starts, and a concurrency level is measured after an
explicit warm-up rather than after whatever ran before it. Sessions run one after another, so two
gateways never compete for the machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp

from mme_bench.client import Invoker
from mme_bench.config import BenchConfig, TargetConfig
from mme_bench.launcher import GatewaySession, start_gateway
from mme_bench.loadgen import Segment, SessionContext, run_closed, run_open, run_sequential, warm_up
from mme_bench.models import ModelInfo, resolve_models
from mme_bench.perf import PerfResult, run_perf_analyzer
from mme_bench.scrape import MetricsPoller, scrape
from mme_bench.workload import ModelChooser, PayloadCycle, arrival_schedule, load_payloads

log = logging.getLogger(__name__)


@dataclass
class SessionLog:
    """One gateway's lifetime in the run: what was measured on it and what it reported over time."""

    benchmark: str
    target: TargetConfig
    name: str
    url: str
    max_concurrency: int | None
    segments: list[Segment]
    timeline: list[dict[str, float]]
    log_path: Path | None


@dataclass
class RunData:
    """Everything the analysis, charts and report are computed from."""

    config: BenchConfig
    models: list[ModelInfo]
    sessions: list[SessionLog] = field(default_factory=list)
    perf: list[PerfResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started_at: str = ""
    wall_s: float = 0.0

    def sessions_of(self, benchmark: str) -> list[SessionLog]:
        return [s for s in self.sessions if s.benchmark == benchmark]


Body = Callable[[SessionContext], Awaitable[list[Segment]]]


class BenchRunner:
    def __init__(self, cfg: BenchConfig, out_dir: Path, progress: bool = True) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.work_dir = Path(cfg.launcher.work_dir) if cfg.launcher.work_dir else out_dir / "work"
        self.progress = progress
        self._csv_routes: dict[str, str] = {}  # per gateway kind: the CSV route that worked
        self._noted: set[str] = set()
        self._stopping: list[GatewaySession] = []
        self.launcher = cfg.launcher  # run() fills in the store once the model set is known

    async def run(self) -> RunData:
        cfg = self.cfg
        started = time.monotonic()
        models, store = resolve_models(cfg, self.out_dir)
        self.launcher = dataclasses.replace(cfg.launcher, store=store)
        self.payloads = load_payloads(cfg.payloads)
        self.keys = [m.key for m in models]
        data = RunData(cfg, models, started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.data = data
        log.info("bench.start", extra={"bench": cfg.name, "models": len(models), "targets": len(cfg.targets),
                                       "out": str(self.out_dir)})
        if cfg.stability.enabled:
            for t in cfg.targets_for("stability"):
                await self._session("stability", t, None, self._stability)
        if cfg.cache.enabled:
            for t in cfg.targets_for("cache"):
                await self._session("cache", t, None, self._cache)
        if cfg.concurrency.enabled:
            for t in cfg.targets_for("concurrency"):
                for mc in cfg.concurrency.max_concurrency:
                    await self._session("concurrency", t, mc, self._concurrency(mc))
        if cfg.perf_analyzer.enabled:
            for t in cfg.targets_for("perf_analyzer"):
                await self._session("perf_analyzer", t, None, self._perf(t))
        data.wall_s = time.monotonic() - started
        log.info("bench.measured", extra={"wall_s": round(data.wall_s, 1), "sessions": len(data.sessions)})
        return data

    def close(self) -> None:
        """Wait for every gateway this run started to exit (SIGKILL after the stop timeout)."""
        while self._stopping:
            self._stopping.pop().stop(self.cfg.launcher.stop_timeout_s)

    # -- sessions ---------------------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            self.data.notes.append(text)

    async def _session(self, benchmark: str, target: TargetConfig, mc: int | None, body: Body) -> None:
        cfg = self.cfg
        name = f"{benchmark}-{target.name}" + (f"-mc{mc}" if mc is not None else "")
        # Started on the loop's (main) thread on purpose: see launcher._die_with_parent. Nothing is being
        # measured while a gateway starts, so blocking the loop for those seconds costs nothing.
        gw = start_gateway(target, self.launcher, self.work_dir / name, mc)
        route_key = target.url or "launched"
        try:
            async with Invoker(gw.url, cfg.request.timeout_s, cfg.request.connect_timeout_s, cfg.request.route,
                               pool_size=self._most_clients() + 8) as invoker, \
                    aiohttp.ClientSession() as scraper:
                if route_key in self._csv_routes and cfg.request.route == "auto":
                    invoker.csv_route = self._csv_routes[route_key]
                t0 = time.monotonic()
                poller = MetricsPoller(gw.url, cfg.cache.poll_interval_s, t0)
                poller.start(scraper)
                ctx = SessionContext(benchmark, name, target.name, invoker, scraper,
                                     ModelChooser(self.keys, cfg.workload.zipf_alpha, cfg.workload.seed),
                                     PayloadCycle(self.payloads), t0, self.progress)
                try:
                    segments = await body(ctx)
                finally:
                    await poller.stop()
                final = await scrape(scraper, gw.url)
                if final is not None:  # the last state belongs on the over-time charts too
                    poller.record(final)
                if invoker.csv_route and route_key not in self._csv_routes:
                    self._csv_routes[route_key] = invoker.csv_route
                if invoker.fallback_reason:
                    self._note(f"CSV payloads went to KServe v2 (converted to JSON, input "
                               f"{cfg.payloads.v2_input_name!r}) because {invoker.fallback_reason}")
        finally:
            # SIGTERM now, reap in close(): a gateway takes seconds to drain and stop its Triton, and that can
            # overlap the next gateway's start (measuring only begins once that one answers ready).
            gw.terminate()
            self._stopping.append(gw)
        self.data.sessions.append(SessionLog(benchmark, target, name, gw.url, mc, segments, poller.rows,
                                             gw.log_path))
        log.info("bench.session_done", extra={"session": name, "segments": len(segments),
                                              "invocations": sum(len(s.records) for s in segments)})

    def _most_clients(self) -> int:
        """The most concurrent clients any benchmark uses: the connection pool must not be the bottleneck."""
        c = self.cfg.concurrency
        return max(self.cfg.cache.clients, math.ceil(max(c.max_concurrency) * max(c.client_multipliers)))

    # -- benchmark bodies -------------------------------------------------------------------------------

    async def _stability(self, ctx: SessionContext) -> list[Segment]:
        return [await run_sequential(ctx, self.cfg.stability.invocations, "sequential")]

    async def _drive(self, ctx: SessionContext, clients: int, level: str, duration_s: float | None,
                     invocations: int | None, mc: int | None) -> Segment:
        w = self.cfg.workload
        if w.arrival == "closed":
            return await run_closed(ctx, clients, level, duration_s, invocations, mc)
        schedule = arrival_schedule(w, duration_s, invocations, w.seed).tolist()
        return await run_open(ctx, schedule, clients, level, mc)

    async def _cache(self, ctx: SessionContext) -> list[Segment]:
        c = self.cfg.cache
        level = self._level(None, c.clients)
        return [await self._drive(ctx, c.clients, level, c.duration_s, c.invocations, None)]

    def _level(self, mc: int | None, clients: int) -> str:
        w = self.cfg.workload
        arrival = "closed" if w.arrival == "closed" else f"{w.arrival} {w.rate_per_s:g}/s"
        return (f"mc={mc} " if mc is not None else "") + f"clients={clients} {arrival}"

    def _concurrency(self, mc: int) -> Body:
        async def body(ctx: SessionContext) -> list[Segment]:
            c = self.cfg.concurrency
            if c.warmup:
                failed = await warm_up(ctx, self.keys, parallel=min(mc, c.warmup_parallel))
                if failed:
                    self._note(f"{ctx.session}: warm-up could not load {len(failed)} model(s): {failed[:5]}")
            segments = []
            for mult in c.client_multipliers:
                clients = max(1, math.ceil(mc * mult))
                segments.append(await self._drive(ctx, clients, self._level(mc, clients), c.duration_s,
                                                  c.invocations, mc))
            return segments
        return body

    def _perf(self, target: TargetConfig) -> Body:
        async def body(ctx: SessionContext) -> list[Segment]:
            pa = self.cfg.perf_analyzer
            model = pa.model or self.keys[0]
            await warm_up(ctx, [model], parallel=1)
            result = await asyncio.to_thread(run_perf_analyzer, pa, target.name, ctx.invoker.base_url, model,
                                             self.out_dir / "raw" / "perf_analyzer")
            self.data.perf.append(result)
            if result.status != "ok":
                self._note(f"perf_analyzer pass on {target.name} {result.status}: {result.note}")
            return []
        return body
