"""Inference requests checked without holding the event loop: small ones in place, big ones in a worker process.

Every request's JSON header or gRPC declarations are parsed before Triton sees them (`gateway.infer_limits`).
Parsing is linear but not free: Python's json takes 20 to 120 ns a byte depending on the shape of the
document (8 MiB of nested arrays: about 0.9 s), and the event loop serves every other request, health check
and timer meanwhile. Threads would not help, because the parsers hold the GIL; so what would cost more than
a few milliseconds (a JSON header over `INLINE_BYTES`, a gRPC message whose parsed part is over it) is parsed
in a worker process, and the loop only copies the bytes to it. Compressed bodies are inflated on a thread
(zlib lets go of the GIL). Small requests, nearly all of them, are checked in place as before: no copy, no
hop. The same workers write large CSV answers (`offload`), which is Python work per value too.

The workers start with the gateway (`spawn`: a clean interpreter that imports only the checks), one per two
cores, at least two and at most four, at a lower CPU priority than the gateway (nice 10), so that a flood of
big requests slows their own checks, not the loop that serves everything else. A worker that dies (its
memory, a signal) is replaced and the request that was in it is refused with 503 "retry": what killed it is
not trusted to run here.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable, Mapping
from typing import TypeVar
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from gateway.errors import GatewayError, InvalidRequest, RequestCheckFailed
from gateway.grpc_wire import OverBudget, RequestScan, WireError, scan_request
from gateway.infer_limits import check_grpc_request, check_header, inflate, split_http_request
from gateway.isolation import make_undumpable
from gateway.triton.http import Body

log = logging.getLogger(__name__)

T = TypeVar("T")
INLINE_BYTES = 64 << 10  # parsed in place up to this size: a few milliseconds at worst
_NICE = 10  # the workers yield the CPU to the event loop (and to Triton): on 2 cores they competed with it


def _worker_start() -> None:
    """In each worker: yield the CPU to the loop, and be as unreadable to model code as the gateway is (a spawned
    worker starts with the gateway's environment, which a dumpable process would show in /proc)."""
    os.nice(_NICE)
    make_undumpable()


def malformed(exc: WireError) -> InvalidRequest:
    """Bytes no protobuf parser would accept are the client's error (400, INVALID_ARGUMENT)."""
    return InvalidRequest(f"malformed ModelInferRequest: {exc}")


def checked(scan: RequestScan, cap: int) -> None:
    """`check_grpc_request`; a refusal carries the request's model name and id, which a stream answers with."""
    try:
        check_grpc_request(scan, cap)
    except GatewayError as exc:
        exc.model_name, exc.request_id = scan.model_name, scan.id  # type: ignore[attr-defined]
        raise


def _checked_scan(raw: bytes, cap: int) -> RequestScan:
    """In a worker: the whole scan and check of a gRPC request; only what the loop needs comes back (the
    names and where `model_name` sits, not the inputs)."""
    try:
        scan = scan_request(raw)
    except WireError as exc:
        raise malformed(exc) from None
    checked(scan, cap)
    return RequestScan(scan.model_name, scan.model_version, scan.id, [], scan.raw_lengths, scan.name_spans)


class RequestChecker:
    """The checks of `gateway.infer_limits`, run where they do not stall the loop."""

    def __init__(self, cap: int, workers: int | None = None) -> None:
        self.cap = cap
        self.workers = workers or min(4, max(2, (os.cpu_count() or 2) // 2))
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the workers now (in the background), so the first big request does not wait for them."""
        self._executor().submit(int)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_start)
        return self._pool

    async def http(self, key: str, body: Body, headers: Mapping[str, str]) -> tuple[Body, dict[str, str]]:
        """A KServe v2 HTTP infer body checked: the body and headers to forward, or the error."""
        lowered = {k.lower(): v for k, v in headers.items()}
        encoding = lowered.get("content-encoding")
        if encoding and encoding.strip().lower() != "identity":
            joined = body if isinstance(body, bytes) else b"".join(body)
            body = await asyncio.to_thread(inflate, key, joined, encoding, self.cap)
            del lowered["content-encoding"]
        parts = split_http_request(key, body, lowered, self.cap)
        if len(parts.header) <= INLINE_BYTES:
            check_header(key, parts.header, parts.binary_length, self.cap)
        else:
            await self._run(check_header, key, parts.header, parts.binary_length, self.cap)
        return parts.body, parts.forward

    async def grpc(self, raw: bytes) -> RequestScan:
        """A serialized ModelInferRequest scanned and checked (`gateway.grpc_wire`, `gateway.infer_limits`)."""
        try:
            scan = scan_request(raw, INLINE_BYTES)
        except OverBudget:
            return await self._run(_checked_scan, raw, self.cap)
        except WireError as exc:
            raise malformed(exc) from None
        checked(scan, self.cap)
        return scan

    async def offload(self, fn: Callable[[bytes], T], data: bytes) -> T:
        """`fn(data)` for other pure work on a request's or an answer's bytes (a CSV answer written): in place
        when `data` is small, in a worker when it is over `INLINE_BYTES`."""
        if len(data) <= INLINE_BYTES:
            return fn(data)
        return await self._run(fn, data)

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        pool = self._executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            log.warning("request_check.worker_died", extra={"check": fn.__name__})
            raise RequestCheckFailed("the request could not be checked (the checking process stopped); "
                                     "retry, and if it happens again, send a smaller request") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
