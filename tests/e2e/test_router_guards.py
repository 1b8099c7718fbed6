"""The router's HTTP edge under the same guards as a gateway's, tried from raw sockets against a real router in
front of a real gateway (with its embedded Triton).

Adversarial cases first: headers that never finish and a body that stops are answered 408 and the connection
closed; eight uploads that stop half-way leave the router's memory where it was (their bodies went on to the
gateway as they came, not into the router); a repeated `X-Amzn-SageMaker-Target-Model` is a 400, not routed
by one value and forwarded with another; a chunked body past the cap is a 413. Then what must still work: a
chunked body under the cap, and an 8 MiB binary tensor.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient

from gateway.demo import predict
from tests.helpers import GatewayProcess, RouterProcess, city_artifact, http, v2_request

CITY = "Guard_GA"
KEY = f"{CITY}.tar.gz"
HOUSE = [1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0]
UPLOAD = 32 << 20  # the Content-Length of each stalled upload
SENT = 16 << 20  # how much of it is sent before the stall
ROUTER_CAP = 36 << 20  # above the uploads and the 8 MiB tensor
SMALL_CAP = 1 << 20  # the second router's, for the chunked-body case
TARGET = "X-Amzn-SageMaker-Target-Model"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    store = tmp_path_factory.mktemp("guard-store")
    (store / KEY).write_bytes(city_artifact(CITY))
    gw = GatewayProcess(["--store", str(store), "--remeasure-interval", "0"], tmp_path_factory.mktemp("guard-gw"))
    try:
        yield gw.wait_ready()
    finally:
        gw.stop()


def _router(gateway: GatewayProcess, workdir: Path, cap: int) -> RouterProcess:
    return RouterProcess([gateway], workdir, ["--health-interval", "0.5", "--header-timeout", "1",
                                              "--body-timeout", "2", "--max-request-bytes", str(cap)])


@pytest.fixture(scope="module")
def router(gateway: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    r = _router(gateway, tmp_path_factory.mktemp("guard-router"), ROUTER_CAP)
    try:
        yield r.wait_healthy()
    finally:
        r.stop()


def _connect(router: RouterProcess) -> socket.socket:
    # The bound on every read: a router that never answers fails the test here instead of hanging it.
    return socket.create_connection(("127.0.0.1", router.port), timeout=20)


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of one answer (by Content-Length), read from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines[1:])}
    length = int(headers.get(b"content-length", b"0"))
    while len(rest) < length:
        chunk = sock.recv(1 << 16)
        assert chunk, "connection closed mid-answer"
        rest += chunk
    return int(lines[0].split()[1]), rest[:length]


def _closed(sock: socket.socket) -> bool:
    """Whether the router closed the connection after its answer: reads end (or are reset, the rest of our
    body refused) before the socket's timeout, instead of the connection waiting for more."""
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def _infer_head(length: int, extra: bytes = b"") -> bytes:
    return (b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (KEY.encode(), length, extra))


# -- stalled requests ----------------------------------------------------------------------------------------


def test_headers_that_never_finish_and_a_stalled_body_get_408_and_the_connection_closes(
        router: RouterProcess) -> None:
    with _connect(router) as sock:
        sock.sendall(b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: router\r\n" % KEY.encode())  # no blank line
        status, body = _answer(sock)
        assert status == 408 and json.loads(body)["code"] == "RequestTimeout"
        assert _closed(sock)
    with _connect(router) as sock:
        sock.sendall(_infer_head(1000) + b'{"inputs": [')  # 12 of 1000 bytes, then silence
        status, body = _answer(sock)
        assert status == 408 and "body" in json.loads(body)["error"]
        assert _closed(sock)
    status, body = http("POST", f"{router.url}/v2/models/{KEY}/infer", v2_request([HOUSE]))[:2]
    assert status == 200, body  # and everyone else is served


def test_eight_stalled_32_mib_uploads_do_not_sit_in_the_routers_memory(router: RouterProcess) -> None:
    """Each sends half its declared body and stops; the router passes what came on to the gateway instead of
    holding it (before: 8 x 16 MiB in the router until the client went away, which it never had to)."""
    pid = router.proc.pid
    assert http("POST", f"{router.url}/v2/models/{KEY}/infer", v2_request([HOUSE]))[0] == 200  # warm: pool, caches
    before = _rss(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from here on: the peak during the uploads
    payload = b"[" * SENT
    socks = [_connect(router) for _ in range(8)]
    errors: list[BaseException] = []

    def upload(sock: socket.socket) -> None:
        try:
            sock.sendall(_infer_head(UPLOAD) + payload)
        except OSError as exc:
            errors.append(exc)

    try:
        senders = [threading.Thread(target=upload, args=(sock,)) for sock in socks]
        for t in senders:
            t.start()
        for t in senders:
            t.join(timeout=60)
        assert not errors, errors
        answers = [_answer(sock) for sock in socks]  # 408 once each stalls past --body-timeout
        peak = _rss(pid, "VmHWM")
    finally:
        for sock in socks:
            sock.close()
    assert [status for status, _ in answers] == [408] * 8, answers
    grown = peak - before
    assert grown < 16 << 20, f"the router's RSS grew {grown >> 20} MiB for 8 x {SENT >> 20} MiB sent"
    assert http("POST", f"{router.url}/v2/models/{KEY}/infer", v2_request([HOUSE]))[0] == 200


# -- routing headers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/invocations", "/endpoints/houses/invocations"])
def test_a_repeated_target_model_header_is_a_400_naming_it(router: RouterProcess, path: str) -> None:
    """Routed by the first value and forwarded with the last before: the gateway answered for a model the
    router had not chosen the instance for."""
    csv = b"1994,3188,5,1.5,1.62,3"
    with _connect(router) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: router\r\nContent-Type: text/csv\r\nContent-Length: %d\r\n"
                     b"%s: missing/Nowhere.tar.gz\r\n%s: %s\r\n\r\n%s"
                     % (path.encode(), len(csv), TARGET.encode(), TARGET.lower().encode(), KEY.encode(), csv))
        status, body = _answer(sock)
    assert status == 400, body
    assert TARGET in json.loads(body)["error"]
    status, body, _ = http("POST", router.url + path, csv, {TARGET: KEY, "Content-Type": "text/csv"})
    assert status == 200, body  # once, it is routed and answered


# -- the size cap, and bodies that must still pass ------------------------------------------------------------


def _chunked(body: bytes, piece: int) -> bytes:
    out = [b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece]) for i in range(0, len(body), piece)]
    return b"".join(out) + b"0\r\n\r\n"


def test_a_chunked_body_is_cut_at_the_cap_and_one_under_it_passes(gateway: GatewayProcess, tmp_path: Path) -> None:
    small = _router(gateway, tmp_path, SMALL_CAP)
    try:
        small.wait_healthy()
        head = (b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" % KEY.encode())
        with _connect(small) as sock:
            over = _chunked(b" " * (3 * SMALL_CAP), 64 << 10)

            def send() -> None:
                try:
                    sock.sendall(head + over)
                except OSError:
                    pass  # the router stopped reading once it had answered

            sender = threading.Thread(target=send)
            sender.start()
            status, body = _answer(sock)
            sender.join(timeout=30)
            assert status == 413 and json.loads(body)["code"] == "RequestTooLarge", body
            assert _closed(sock)
        rows = [HOUSE] * 6000  # about 200 KB of JSON, sent in 16 KiB chunks: streamed, not buffered
        under = v2_request(rows)
        assert 64 << 10 < len(under) < SMALL_CAP
        with _connect(small) as sock:
            sock.sendall(head + _chunked(under, 16 << 10))
            status, body = _answer(sock)
        assert status == 200, body
        expected = predict(CITY, np.array(rows, dtype=np.float32)).ravel()
        np.testing.assert_allclose(json.loads(body)["outputs"][0]["data"], expected, rtol=1e-4)
    finally:
        small.stop()


def test_an_8_mib_binary_tensor_goes_through_the_router(router: RouterProcess) -> None:
    rng = np.random.default_rng(3)
    rows = (8 << 20) // 24  # 6 FP32 features a row
    houses = np.column_stack([rng.uniform(1900, 2020, rows), rng.uniform(500, 5000, rows), rng.integers(1, 6, rows),
                              rng.uniform(1, 4, rows), rng.uniform(0.1, 3, rows),
                              rng.integers(0, 4, rows)]).astype(np.float32)
    client = httpclient.InferenceServerClient(router.url.removeprefix("http://"), network_timeout=120)
    inp = httpclient.InferInput("features", list(houses.shape), "FP32")
    inp.set_data_from_numpy(houses, binary_data=True)
    out = httpclient.InferRequestedOutput("price", binary_data=True)
    answer = client.infer(KEY, [inp], outputs=[out]).as_numpy("price")
    np.testing.assert_allclose(answer.ravel(), predict(CITY, houses).ravel(), rtol=1e-4)
