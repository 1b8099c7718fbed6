"""Eight hostile requests at once never make the gateway's event loop late: issue 19's event-loop items.

Each class is a request of a few megabytes that once held the loop for seconds to minutes (a shape of a
million dimensions, a 150,000-character name through the error redaction, a CSV body, duplicate "shape"
keys, deep nesting, the same over gRPC, and requests with a huge number of inputs). Eight of a class are
sent at once, over HTTP or gRPC, while `/v2/health/live` is polled; the gateway's own lag histogram
(`mme_event_loop_lag_seconds`, a 20 ms timer on its loop) must show no observation over 50 ms meanwhile,
every request must be refused with its 4xx within `ANSWER_BOUND_S`, health must answer throughout, and
the model must answer a valid request afterwards. A control case sends eight valid requests the same way.

The bodies are built before the clock starts and sent from threads over connections opened beforehand, so
the test client's own work is not what is measured.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from tests.helpers import (GatewayProcess, exchange, http, http_bytes, late_ticks, loop_lag_buckets, polled,
                           v2_request)

MODEL = "Houston_TX.tar.gz"  # a seeded city: input "features", FP32 [-1, 6]
HOUSE = [1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0]
AT_ONCE = 8
MIB = 1 << 20
# A refusal's bound with eight at once on a 2-core machine, where each request's work is linear in its bytes:
# reading and scanning 8 MB is a few hundred ms of one core, so the eighth waits for seven others (eight
# 8 MB gRPC messages took up to 3 s on a loaded machine); one such request took 18 s to minutes before.
ANSWER_BOUND_S = 5.0
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Hostile:
    """One class of request: an HTTP request as wire bytes, or a serialized gRPC ModelInferRequest."""

    protocol: str  # "http" or "grpc"
    payload: bytes
    refused: frozenset[object]  # the answers that count as a refusal: HTTP statuses or gRPC status codes


def _json(body: str | bytes) -> bytes:
    data = body.encode() if isinstance(body, str) else body
    return http_bytes("POST", f"/v2/models/{MODEL}/infer", data, {"Content-Type": "application/json"})


HTTP_REFUSED = frozenset({400, 413})
HTTP_OK = frozenset({200})
GRPC_REFUSED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})


def valid_requests() -> Hostile:
    """The control: eight ordinary requests at once. Should this case report lag, the machine itself cannot
    keep a 20 ms timer within 50 ms under this load, and the hostile cases' lag says nothing about them."""
    return Hostile("http", _json(v2_request([HOUSE])), HTTP_OK)


def million_dimensions() -> Hostile:
    """A shape of 1,000,000 dimensions of 2 (~3 MB): the product was a big integer, quadratic to compute."""
    shape = ",".join(["2"] * 1_000_000)
    return Hostile("http", _json(f'{{"inputs":[{{"name":"features","shape":[{shape}],"datatype":"FP32",'
                                 f'"data":{json.dumps(HOUSE)}}}]}}'), HTTP_REFUSED)


def long_name_bad_datatype() -> Hostile:
    """An input named with 150,000 characters and a datatype that does not exist: the error message quotes
    client text, and the redaction of internal names backtracked quadratically on it."""
    body = json.dumps({"inputs": [{"name": "a" * 150_000, "shape": [1, 6], "datatype": "FLOAT32" + "a" * 150_000,
                                   "data": HOUSE}]})
    return Hostile("http", _json(body), HTTP_REFUSED)


def long_name_echoed() -> Hostile:
    """An 8 MB input name of '-' with a valid datatype: the gateway passes it, Triton's error quotes it whole,
    and that message goes through the redaction of internal names on its way back (issue 19, item 2, by way
    of Triton)."""
    body = json.dumps({"inputs": [{"name": "-" * (8 * MIB), "shape": [1, 6], "datatype": "FP32", "data": HOUSE}]})
    return Hostile("http", _json(body), HTTP_REFUSED)


def csv_bad_last_cell() -> Hostile:
    """~8 MB of CSV rows through the SageMaker route whose very last cell is not a number."""
    row = "1994,3188,5,1.5,1.62,3\n"
    text = row * (8 * MIB // len(row) - 1) + "1994,3188,5,1.5,1.62,x\n"
    return Hostile("http", http_bytes("POST", "/invocations", text.encode(), {
        "Content-Type": "text/csv", "X-Amzn-SageMaker-Target-Model": MODEL}), HTTP_REFUSED)


def duplicate_shape() -> Hostile:
    """8 MB of data whose input names "shape" twice: Python kept the last (consistent with the data), Triton
    the first (20,000,000 rows to allocate)."""
    rows = 8 * MIB // (6 * 4)
    data = ",".join(["0.5"] * (rows * 6))
    body = (f'{{"inputs":[{{"name":"features","shape":[20000000,6],"shape":[{rows},6],"datatype":"FP32",'
            f'"data":[{data}]}}]}}')
    return Hostile("http", _json(body), HTTP_REFUSED)


def deep_nesting() -> Hostile:
    """8 MB of `[[[[...]]]]` as an input's data."""
    depth = 4 * MIB
    body = b'{"inputs":[{"name":"features","shape":[1,6],"datatype":"FP32","data":' + b"[" * depth + b"]" * depth + (
        b"}]}")
    return Hostile("http", _json(body), HTTP_REFUSED)


def many_json_inputs() -> Hostile:
    """An 8 MB body of 150,000 small input objects, each consistent on its own."""
    one = '{"name":"i%d","shape":[1],"datatype":"FP32","data":[1]}'
    body = '{"inputs":[' + ",".join(one % i for i in range(150_000)) + "]}"
    return Hostile("http", _json(body), HTTP_REFUSED)


def grpc_million_dimensions() -> Hostile:
    """A ~8 MB ModelInferRequest whose one input has 8,000,000 dimensions (one byte each on the wire)."""
    message = pb.ModelInferRequest(model_name=MODEL)
    message.inputs.add(name="features", datatype="FP32", shape=[2] * 8_000_000)
    message.raw_input_contents.append(np.array([HOUSE], dtype=np.float32).tobytes())
    return Hostile("grpc", message.SerializeToString(), GRPC_REFUSED)


def grpc_many_inputs() -> Hostile:
    """A ModelInferRequest with 100,000 tiny inputs, each consistent with its raw contents."""
    message = pb.ModelInferRequest(model_name=MODEL)
    raw = np.array([HOUSE], dtype=np.float32).tobytes()
    for i in range(100_000):
        message.inputs.add(name=f"i{i}", datatype="FP32", shape=[1, 6])
        message.raw_input_contents.append(raw)
    return Hostile("grpc", message.SerializeToString(), GRPC_REFUSED)


CLASSES: dict[str, Callable[[], Hostile]] = {
    "control_valid_requests": valid_requests,
    "json_million_dimensions": million_dimensions,
    "json_long_name_bad_datatype": long_name_bad_datatype,
    "json_8mb_name_echoed_by_triton": long_name_echoed,
    "csv_8mb_bad_last_cell": csv_bad_last_cell,
    "json_8mb_duplicate_shape": duplicate_shape,
    "json_8mb_deep_nesting": deep_nesting,
    "json_150000_inputs": many_json_inputs,
    "grpc_8m_dimensions": grpc_million_dimensions,
    "grpc_100000_inputs": grpc_many_inputs,
}


@pytest.fixture
def warm(s3_gateway: GatewayProcess) -> GatewayProcess:
    """The gateway with the model loaded: again, and waited for, if an earlier case cost it the model (or
    its Triton), so that each case measures its own class."""
    status, answer, _ = polled(lambda: http("POST", f"{s3_gateway.url}/v2/models/{MODEL}/infer", v2_request([HOUSE])),
                               lambda got: got[0] == 200, timeout_s=180)
    assert status == 200, answer
    return s3_gateway


def _http_senders(gw: GatewayProcess, payload: bytes, start: threading.Barrier,
                  results: list[tuple[object, float, bytes]]) -> list[Callable[[], None]]:
    """One sender per connection, each connected before the barrier and sending once it opens."""
    def sender(slot: int) -> Callable[[], None]:
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=120)

        def send() -> None:
            with sock:
                start.wait()
                status, body, elapsed = exchange(sock, payload)
                results[slot] = (status, elapsed, body[:300])
        return send
    return [sender(i) for i in range(AT_ONCE)]


def _grpc_senders(gw: GatewayProcess, payload: bytes, start: threading.Barrier,
                  results: list[tuple[object, float, bytes]]) -> list[Callable[[], None]]:
    """One channel per sender, connected before the barrier; the message goes as the bytes built for it."""
    def sender(slot: int) -> Callable[[], None]:
        channel = grpc.insecure_channel(gw.grpc_url, options=[("grpc.max_send_message_length", -1)])
        grpc.channel_ready_future(channel).result(timeout=30)
        infer = channel.unary_unary(MODEL_INFER)  # no (de)serializers: bytes each way

        def send() -> None:
            with channel:
                start.wait()
                started = time.monotonic()
                try:
                    infer(payload, timeout=120)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                results[slot] = (code, time.monotonic() - started, details[:300].encode())
        return send
    return [sender(i) for i in range(AT_ONCE)]


def _poll_health(gw: GatewayProcess, stop: threading.Event, seen: list[tuple[int, float]]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            status = http("GET", gw.url + "/v2/health/live", timeout=30)[0]
        except OSError:
            status = 0
        seen.append((status, time.monotonic() - started))
        time.sleep(0.01)


@pytest.mark.parametrize("name", list(CLASSES))
def test_eight_hostile_requests_at_once_leave_the_loop_on_time(warm: GatewayProcess, name: str) -> None:
    hostile = CLASSES[name]()
    results: list[tuple[object, float, bytes]] = [(None, 0.0, b"")] * AT_ONCE
    start = threading.Barrier(AT_ONCE + 1)
    make = _http_senders if hostile.protocol == "http" else _grpc_senders
    threads = [threading.Thread(target=send) for send in make(warm, hostile.payload, start, results)]
    health: list[tuple[int, float]] = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll_health, args=(warm, stop, health))
    before = loop_lag_buckets(warm)
    for thread in threads:
        thread.start()
    poller.start()
    start.wait()
    for thread in threads:
        thread.join(timeout=300)
    stop.set()
    poller.join(timeout=60)
    time.sleep(0.1)  # a stall that ended with the last answer is observed when the timer next fires
    late = late_ticks(before, loop_lag_buckets(warm))

    summary = (f"{name}: {len(hostile.payload)} bytes x {AT_ONCE}; answers (status, seconds): "
               f"{[(r[0], round(r[1], 3)) for r in results]}; health probes {len(health)}, slowest "
               f"{max((s for _, s in health), default=0):.3f} s; lag observations over 50 ms by bucket: {late}")
    print(summary)
    for status, elapsed, body in results:
        assert status in hostile.refused, f"{summary}\nanswer: {status} {body!r}"
        assert elapsed < ANSWER_BOUND_S, summary
    assert health and all(status == 200 for status, _ in health), summary
    assert not late, summary
    status, answer, _ = http("POST", f"{warm.url}/v2/models/{MODEL}/infer", v2_request([HOUSE]))
    assert status == 200, answer  # and the model still answers afterwards
