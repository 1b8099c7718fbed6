"""The event loop's lag, measured: how late a short timer fires, observed into `mme_event_loop_lag_seconds`.

Everything the gateway serves runs on one event loop, so any work that holds it (a parse, a regular
expression, a big copy) delays every request and health check by as much. A timer every `INTERVAL_S` that
records how late it woke makes such stalls visible to operators and to the tests that bound them: a stall
of length L shows as a lag of at least L - INTERVAL_S.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Histogram

INTERVAL_S = 0.02


async def watch_lag(histogram: Histogram, interval_s: float = INTERVAL_S) -> None:
    """Observe the loop's lag until cancelled (about 50 wake-ups a second: a few microseconds of CPU each)."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(interval_s)
        histogram.observe(max(0.0, loop.time() - before - interval_s))
