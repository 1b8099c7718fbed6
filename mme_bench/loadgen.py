"""Drive invocations at a gateway: one after another, closed-loop clients, or open-loop arrivals.

Every driver returns a `Segment`: the records plus the gateway's /metrics before and after, so each
measured configuration has both the client's and the gateway's account of it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
from tqdm import tqdm

from mme_bench.client import Invoker, Outcome
from mme_bench.scrape import MISSES, Snapshot, scrape
from mme_bench.stats import Record
from mme_bench.workload import ModelChooser, PayloadCycle

RETRY_CLASSES = ("not_ready", "throttle", "timeout", "connection")


@dataclass
class Segment:
    """One measured configuration's invocations and the gateway's counters around them."""

    level: str
    records: list[Record]
    elapsed_s: float
    before: Snapshot | None
    after: Snapshot | None
    max_concurrency: int | None = None
    clients: int | None = None
    exact_cold: bool = False  # cold flags from the miss counter per call (sequential runs only)


@dataclass
class SessionContext:
    """What every driver in one gateway session shares."""

    benchmark: str
    session: str
    target: str
    invoker: Invoker
    scraper: aiohttp.ClientSession
    chooser: ModelChooser
    payloads: PayloadCycle
    t0: float  # monotonic time the gateway was ready: record times are relative to it
    progress: bool = True
    seen: set[str] = field(default_factory=set)
    _seq: int = 0

    def record(self, model: str, payload: int, started: float, outcome: Outcome, level: str, *, cold: bool,
               first_call: bool, client_wait_ms: float = 0.0, max_concurrency: int | None = None,
               clients: int | None = None) -> Record:
        self._seq += 1
        return Record(
            benchmark=self.benchmark, session=self.session, target=self.target, level=level, seq=self._seq,
            model=model, payload=payload, route=outcome.route, t_s=round(started - self.t0, 4),
            latency_ms=round(outcome.latency_ms, 3), status=outcome.status, code=outcome.code,
            error_class=outcome.error_class, cold=cold, first_call=first_call, fallback=outcome.fallback,
            client_wait_ms=round(client_wait_ms, 3), max_concurrency=max_concurrency, clients=clients,
        )

    def first(self, model: str) -> bool:
        """True the first time `model` is sent in this session (a cold start on a fresh gateway)."""
        if model in self.seen:
            return False
        self.seen.add(model)
        return True

    def bar(self, desc: str, total: int | None) -> tqdm:
        # disable=None: bars only on a terminal, so logs captured to a file stay clean
        return tqdm(total=total, desc=desc, unit="inv", leave=False, disable=None if self.progress else True,
                    dynamic_ncols=True)


async def run_sequential(ctx: SessionContext, count: int, level: str) -> Segment:
    """`count` invocations one after another. Each one's cold flag is exact: the gateway's cache-miss
    counter is read before and after it (nothing else runs meanwhile); the first call of a model counts
    as cold too when /metrics cannot be read."""
    before = await scrape(ctx.scraper, ctx.invoker.base_url)
    records = []
    start = time.monotonic()
    prev = before
    with ctx.bar(f"{ctx.benchmark} {ctx.target}", count) as bar:
        for _ in range(count):
            model, payload = ctx.chooser.next(), ctx.payloads.next()
            first = ctx.first(model)
            started = time.monotonic()
            outcome = await ctx.invoker.invoke(model, payload)
            snap = await scrape(ctx.scraper, ctx.invoker.base_url)
            if prev is not None and snap is not None:
                cold = snap.value(*MISSES) > prev.value(*MISSES)
            else:
                cold = first
            prev = snap or prev
            records.append(ctx.record(model, payload.index, started, outcome, level, cold=cold, first_call=first,
                                      max_concurrency=None, clients=1))
            bar.update(1)
    elapsed = time.monotonic() - start
    after = await scrape(ctx.scraper, ctx.invoker.base_url)
    # The per-call scrapes are outside each latency but inside `elapsed`; tps for one client is 1/latency.
    busy_s = sum(r.latency_ms for r in records) / 1000.0
    return Segment(level, records, busy_s or elapsed, before, after, None, 1, exact_cold=before is not None)


async def run_closed(ctx: SessionContext, clients: int, level: str, duration_s: float | None,
                     invocations: int | None, max_concurrency: int | None = None) -> Segment:
    """`clients` concurrent clients, each sending its next invocation when the previous one answered,
    until `duration_s` has passed or `invocations` have been sent."""
    before = await scrape(ctx.scraper, ctx.invoker.base_url)
    records: list[Record] = []
    start = time.monotonic()
    deadline = start + duration_s if duration_s is not None else None
    budget = [invocations if invocations is not None else -1]

    async def client(bar: tqdm) -> None:
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return
            if budget[0] == 0:
                return
            budget[0] -= 1
            model, payload = ctx.chooser.next(), ctx.payloads.next()
            first = ctx.first(model)
            started = time.monotonic()
            outcome = await ctx.invoker.invoke(model, payload)
            records.append(ctx.record(model, payload.index, started, outcome, level, cold=first, first_call=first,
                                      max_concurrency=max_concurrency, clients=clients))
            bar.update(1)

    with ctx.bar(f"{ctx.benchmark} {ctx.target} {level}", invocations) as bar:
        await asyncio.gather(*(client(bar) for _ in range(clients)))
    elapsed = time.monotonic() - start
    after = await scrape(ctx.scraper, ctx.invoker.base_url)
    return Segment(level, records, elapsed, before, after, max_concurrency, clients)


async def run_open(ctx: SessionContext, schedule: list[float], clients: int, level: str,
                   max_concurrency: int | None = None) -> Segment:
    """Open-loop arrivals at the instants in `schedule` (seconds from now), at most `clients` in flight.

    An arrival that finds every client busy waits; that wait is recorded as `client_wait_ms` beside the
    latency, so a saturated gateway shows up instead of silently slowing the arrival rate."""
    before = await scrape(ctx.scraper, ctx.invoker.base_url)
    records: list[Record] = []
    slots = asyncio.Semaphore(clients)
    start = time.monotonic()

    async def one(at: float, bar: tqdm) -> None:
        model, payload = ctx.chooser.next(), ctx.payloads.next()
        async with slots:
            first = ctx.first(model)
            started = time.monotonic()
            outcome = await ctx.invoker.invoke(model, payload)
        records.append(ctx.record(model, payload.index, started, outcome, level, cold=first, first_call=first,
                                  client_wait_ms=max(0.0, (started - (start + at)) * 1000.0),
                                  max_concurrency=max_concurrency, clients=clients))
        bar.update(1)

    tasks = []
    with ctx.bar(f"{ctx.benchmark} {ctx.target} {level}", len(schedule)) as bar:
        for at in schedule:
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(at, bar)))
        await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    after = await scrape(ctx.scraper, ctx.invoker.base_url)
    return Segment(level, records, elapsed, before, after, max_concurrency, clients)


async def warm_up(ctx: SessionContext, keys: list[str], parallel: int, attempts: int = 5) -> list[str]:
    """Load every model once before a measured run (not recorded); returns the models that never answered.

    Not-ready and throttled answers are retried: a warm-up is there to load models, not to measure."""
    failed: list[str] = []
    sem = asyncio.Semaphore(max(1, parallel))

    async def one(key: str) -> None:
        async with sem:
            for attempt in range(attempts):
                outcome = await ctx.invoker.invoke(key, ctx.payloads.next())
                if outcome.error_class == "ok":
                    ctx.seen.add(key)
                    return
                if outcome.error_class not in RETRY_CLASSES:
                    break
                await asyncio.sleep(0.5 * (attempt + 1))
            failed.append(key)

    await asyncio.gather(*(one(k) for k in keys))
    return failed
