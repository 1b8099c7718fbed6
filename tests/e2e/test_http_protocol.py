"""The HTTP edge on the wire, through raw sockets: large binary tensors sent in odd chunks arrive whole and are
held once, HEAD and pipelined requests get whole answers in order, and `Expect: 100-continue` is honoured."""

from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from gateway.demo import predict
from tests.helpers import GatewayProcess, city_artifact

CITY = "Wire_WA"
KEY = f"wire/{CITY}.tar.gz"


def _connect(gw: GatewayProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=60)


def _read_answer(sock: socket.socket, buffered: bytes = b"", head_only: bool = False) -> tuple[bytes, dict[str, str],
                                                                                            bytes, bytes]:
    """One HTTP/1.1 answer (status line, headers, body by Content-Length) and whatever followed it."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        assert chunk, f"connection closed mid-answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.strip().lower().decode(): v.strip().decode() for k, v in (line.split(b":", 1) for line in lines)}
    length = 0 if head_only else int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(1 << 20)
        assert chunk, "connection closed mid-body"
        rest += chunk
    return status, headers, rest[:length], rest[length:]


def _binary_request(houses: np.ndarray) -> tuple[bytes, bytes]:
    """A KServe binary-tensor request: its JSON header and the tensor bytes after it."""
    header = json.dumps({
        "inputs": [{"name": "features", "shape": list(houses.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": houses.nbytes}}],
        "outputs": [{"name": "price", "parameters": {"binary_data": True}}],
    }).encode()
    return header, houses.tobytes()


def _peak_rss_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def wire_model(s3_gateway: GatewayProcess, put_s3) -> str:  # type: ignore[no-untyped-def]
    put_s3(KEY, city_artifact(CITY))
    return KEY


def test_a_16_mib_tensor_in_odd_chunks_arrives_whole_and_is_held_once(s3_gateway: GatewayProcess,
                                                                     wire_model: str) -> None:
    rng = np.random.default_rng(7)
    rows = (16 << 20) // 24  # 6 FP32 features a row: 16 MiB of tensor
    houses = np.column_stack([rng.uniform(1900, 2020, rows), rng.uniform(500, 5000, rows), rng.integers(1, 6, rows),
                              rng.uniform(1, 4, rows), rng.uniform(0.1, 3, rows),
                              rng.integers(0, 4, rows)]).astype(np.float32)
    header, tensor = _binary_request(houses)
    body = header + tensor
    head = (f"POST /v2/models/{wire_model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    small_header, small_tensor = _binary_request(houses[:1])
    small = (f"POST /v2/models/{wire_model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
             f"Inference-Header-Content-Length: {len(small_header)}\r\n"
             f"Content-Length: {len(small_header) + len(small_tensor)}\r\n\r\n").encode() + small_header + small_tensor
    with _connect(s3_gateway) as sock:  # loaded first, with one row: the load's memory is not measured here
        sock.sendall(small)
        status, _, _, _ = _read_answer(sock)
        assert status.startswith(b"HTTP/1.1 200"), status
        pid = s3_gateway.proc.pid
        _peak_rss_reset(pid)
        before = _peak_rss(pid)
        chunks, sent, pick = [head], 0, random.Random(3)
        while sent < len(body):  # uneven pieces, from a few bytes to 300 KB, some split inside the JSON header
            size = pick.choice((7, 1000, 65535, 65537, 300_000))
            chunks.append(body[sent:sent + size])
            sent += size
        for chunk in chunks:
            sock.sendall(chunk)
        status, headers, answer, extra = _read_answer(sock)
        peak = _peak_rss(pid) - before
    assert status.startswith(b"HTTP/1.1 200"), (status, answer[:300])
    assert extra == b""
    n = int(headers["inference-header-content-length"])
    meta = json.loads(answer[:n])
    assert meta["model_name"] == wire_model
    prices = np.frombuffer(answer[n:], dtype=np.float32).reshape(rows, 1)
    np.testing.assert_allclose(prices, predict(CITY, houses), rtol=1e-4)
    # One copy of the 16 MiB body (the parser's chunks) and the 2.7 MiB answer; a second copy of the body
    # (a bytearray gathered and copied again, or the chunks joined) would pass 2x the body.
    assert peak < 2 * len(body), f"the gateway's peak RSS grew {peak / 2**20:.1f} MiB for a {len(body) / 2**20:.1f} MiB body"


def test_head_and_pipelined_requests_get_whole_answers_in_order(s3_gateway: GatewayProcess) -> None:
    with _connect(s3_gateway) as sock:
        sock.sendall(b"HEAD /v2 HTTP/1.1\r\nHost: x\r\n\r\nGET /v2 HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body, rest = _read_answer(sock, head_only=True)
        assert status.startswith(b"HTTP/1.1 200") and int(headers["content-length"]) > 0 and body == b""
        status, _, body, rest = _read_answer(sock, rest)
        assert status.startswith(b"HTTP/1.1 200") and json.loads(body)["name"] == "mme-gateway"
        status, _, body, rest = _read_answer(sock, rest)
        assert status.startswith(b"HTTP/1.1 200") and rest == b""
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body, rest = _read_answer(sock)
    assert b"\nmme_requests_in_flight 0.0\n" in body  # every lease taken by the module's requests was returned


def test_expect_100_continue_is_answered_before_the_body(s3_gateway: GatewayProcess, wire_model: str) -> None:
    houses = np.array([[1994, 3188, 5, 1.5, 1.62, 3]], dtype=np.float32)
    body = json.dumps({"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32",
                                   "data": houses.ravel().tolist()}]}).encode()
    with _connect(s3_gateway) as sock:
        sock.sendall((f"POST /v2/models/{wire_model}/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode())
        interim = b""
        deadline = time.monotonic() + 30
        while b"\r\n\r\n" not in interim and time.monotonic() < deadline:
            interim += sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        sock.sendall(body)
        status, _, answer, _ = _read_answer(sock, interim.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert status.startswith(b"HTTP/1.1 200"), answer
    price = json.loads(answer)["outputs"][0]["data"][0]
    assert price == pytest.approx(float(predict(CITY, houses)[0, 0]), rel=1e-4)
