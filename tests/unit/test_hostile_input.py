"""Requests shaped to cost the gateway more than their bytes: each refused by a check whose work is linear,
with a message of bounded length, and what is checked is what is forwarded (issue 19, items 1-3, 6, 9, 11).

The event loop's lag under these requests, against a running gateway, is in tests/e2e/test_loop_lag.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from gateway.api.csv_codec import CSV_BLOCK_BYTES, CsvError, parse_rows
from gateway.api.kserve_grpc import _Held
from gateway.dataplane import model_path
from gateway.errors import GatewayError, InvalidRequest, RequestCheckFailed, RequestTooLarge, Throttled
from gateway.grpc_wire import OverBudget, renamed, scan_request, stream_response_model
from gateway.infer_limits import MAX_DIMS, SHOWN, check_grpc_request, check_http_request
from gateway.request_checks import INLINE_BYTES, RequestChecker

CAP = 64 << 20


def request(**tensor: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6],
                        **tensor}]}


def refusal(body: bytes, headers: dict[str, str] | None = None) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        check_http_request("m", body, headers or {}, CAP)
    assert len(err.value.message) < 400, "a message quotes client text unbounded"
    return err.value


# -- shapes, names, numbers ----------------------------------------------------------------------------------


def test_a_shape_of_a_million_dimensions_is_refused_by_its_length_not_its_product() -> None:
    err = refusal(json.dumps(request(shape=[2] * 1_000_000)).encode())
    assert isinstance(err, InvalidRequest) and "1000000 dimensions" in err.message and f"at most {MAX_DIMS}" in err.message


@pytest.mark.parametrize("dim", [2 ** 63, 10 ** 30, -1, 1.0, True, "1"])
def test_dimensions_are_non_negative_int64s(dim: Any) -> None:
    assert isinstance(refusal(json.dumps(request(shape=[1, dim])).encode()), InvalidRequest)


def test_the_largest_int64_dimension_is_read_and_then_refused_as_too_large() -> None:
    assert isinstance(refusal(json.dumps(request(shape=[2 ** 63 - 1, 1])).encode()), RequestTooLarge)


def test_long_names_and_datatypes_are_cut_in_the_message() -> None:
    err = refusal(json.dumps(request(name="n" * 150_000, datatype="X" * 150_000)).encode())
    assert "n" * (SHOWN - 1) in err.message and "n" * SHOWN not in err.message and "..." in err.message


def test_grpc_shapes_are_counted_before_they_are_read() -> None:
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="x", datatype="FP32")
    tensor.shape.extend([2] * 1_000_000)
    with pytest.raises(InvalidRequest, match="1000000 dimensions"):
        check_grpc_request(scan_request(message.SerializeToString()), CAP)


# -- one reading of the bytes: duplicate keys, nesting, lengths ----------------------------------------------


@pytest.mark.parametrize("body", [
    b'{"inputs":[{"name":"features","shape":[20000000,4],"shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}',
    b'{"inputs":[],"inputs":[{"name":"features","shape":[1],"datatype":"FP32","data":[1]}]}',
    b'{"inputs":[{"name":"a","name":"features","shape":[1],"datatype":"FP32","data":[1]}]}',
    b'{"inputs":[{"name":"f","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4,'
    b'"binary_data_size":0}}]}',
    b'{"inputs":[{"name":"f","shape":[1],"datatype":"FP32","data":[1]}],"parameters":{"x":{"y":1,"y":2}}}',
    b'{"inputs":[{"name":"f","shape":[1],"datatype":"FP32","data":[1]}],"outputs":[{"name":"p","name":"q"}]}',
    b'{"inputs":[{"name":"f","shape":[1],"datatype":"FP32","data":[1]}],"\\u0069d":"1","id":"2"}',
])
def test_a_key_twice_in_any_object_is_refused(body: bytes) -> None:
    err = refusal(body)
    assert isinstance(err, InvalidRequest) and "twice" in err.message


def test_the_same_request_without_the_repeat_passes() -> None:
    body = b'{"inputs":[{"name":"f","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}],"parameters":{"x":1}}'
    assert check_http_request("m", body, {}, CAP)[0] == body


@pytest.mark.parametrize("change, why", [
    ({"datatype": "FP32", "data": ["1", 2, 3, 4, 5, 6]}, "finite numbers"),
    ({"datatype": "INT8", "data": [1, 2, 3, 4, 5, 1000]}, "integers from -128 to 127"),
    ({"datatype": "INT32", "data": [1, 2, 3, 4, 5, 1.5]}, "integers"),
    ({"datatype": "UINT8", "data": [1, 2, 3, 4, 5, -1]}, "integers from 0"),
    ({"datatype": "BOOL", "data": [True, False, 1, 0, True, True]}, "true or false"),
    ({"datatype": "BYTES", "data": ["a", "b", "c", "d", "e", 6]}, "strings"),
    ({"data": [[1, 2, 3], [4, 5, 1e400]]}, "finite numbers"),
    ({"data": [1, 2, 3, 4, 5]}, "declares 6 elements but its data holds 5"),
    ({"name": "n" * 1025}, "1 to 1024 characters"),
    ({"parameters": {"binary_data_size": -1}}, "binary_data_size"),
    ({"parameters": {"x": {"nested": 1}}}, "parameter 'x'"),
])
def test_data_and_parameters_are_what_triton_s_parser_takes(change: dict[str, Any], why: str) -> None:
    err = refusal(json.dumps(request(**change)).encode())
    assert isinstance(err, InvalidRequest) and why in err.message


@pytest.mark.parametrize("top, why", [
    ({"id": 12}, "\"id\" must be a string"),
    ({"id": "i" * 1025}, "\"id\" must be a string"),
    ({"parameters": {"priority": -1}}, "parameter 'priority'"),
    ({"parameters": {"timeout": "1"}}, "parameter 'timeout'"),
    ({"parameters": {"binary_data_output": 1}}, "parameter 'binary_data_output'"),
    ({"outputs": [{"name": "price", "parameters": {"binary_data": "yes"}}]}, "parameter 'binary_data'"),
    ({"outputs": [{"name": "price", "parameters": {"classification": -2}}]}, "parameter 'classification'"),
    ({"outputs": [{"name": "price", "parameters": {"shared_memory_region": "r"}}]}, "shared memory"),
    ({"outputs": [{"name": 5}]}, "every output needs"),
    ({"outputs": {"name": "price"}}, "must be a list"),
    ({"inputs": [request()["inputs"][0]] * 1025}, "at most 1024 inputs"),
])
def test_the_rest_of_the_request_is_what_triton_s_parser_takes(top: dict[str, Any], why: str) -> None:
    err = refusal(json.dumps({**request(), **top}).encode())
    assert isinstance(err, InvalidRequest) and why in err.message


def test_a_request_with_every_field_triton_reads_passes() -> None:
    body = json.dumps({"id": "r-1", "parameters": {"priority": 1, "timeout": 100, "binary_data_output": True,
                                                    "custom": "x", "ratio": 0.5},
                       "inputs": [{"name": "features", "shape": [2, 3], "datatype": "FP32",
                                   "data": [[1, 2.5, 3], [4, 5, 6]], "parameters": {"note": "n"}},
                                  {"name": "flags", "shape": [2], "datatype": "BOOL", "data": [True, False]},
                                  {"name": "ids", "shape": [2], "datatype": "UINT64", "data": [0, 2 ** 64 - 1]},
                                  {"name": "words", "shape": [1], "datatype": "BYTES", "data": ["hello"]}],
                       "outputs": [{"name": "price", "parameters": {"binary_data": False, "classification": 2}}]})
    assert check_http_request("m", body.encode(), {}, CAP)[0] == body.encode()


@pytest.mark.parametrize("body", [b"[" * 200_000 + b"]" * 200_000,
                                  b'{"inputs":[{"name":"f","shape":[1],"datatype":"FP32","data":' + b"[" * 100_000
                                  + b"1" + b"]" * 100_000 + b"}]}",
                                  b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_deep_nesting_is_a_400(body: bytes) -> None:
    assert isinstance(refusal(body), InvalidRequest)


@pytest.mark.parametrize("length", ["\u00b2", "\u0661\u0662", "1e2", "-1", "0x10", "1" * 25, ""])
def test_the_header_length_is_ascii_digits(length: str) -> None:
    body = json.dumps(request()).encode()
    assert isinstance(refusal(body, {"Inference-Header-Content-Length": length}), InvalidRequest)


def test_the_header_length_forwarded_is_the_number_checked_and_accept_encoding_is_not_forwarded() -> None:
    header = json.dumps(request(data=None, parameters={"binary_data_size": 24})).replace(', "data": null', "")
    body = header.encode() + bytes(24)
    _, forwarded = check_http_request("m", body, {"Inference-Header-Content-Length": f" 0{len(header)} ",
                                                 "Accept-Encoding": "gzip", "Content-Type": "application/json"}, CAP)
    assert forwarded == {"inference-header-content-length": str(len(header)), "content-type": "application/json"}


@pytest.mark.parametrize("version", ["1\r\nX-Evil: 1", "1 HTTP/1.1", "abc", "-1", "1" * 20, "", "\u0661"])
def test_versions_that_are_not_numbers_never_reach_a_request_line(version: str) -> None:
    with pytest.raises(InvalidRequest, match="version"):
        model_path("m-0123", version, "/infer")


def test_numeric_versions_make_triton_paths() -> None:
    assert model_path("m-0123", None, "/infer") == "/v2/models/m-0123/infer"
    assert model_path("m-0123", "3", "/config") == "/v2/models/m-0123/versions/3/config"


# -- CSV ---------------------------------------------------------------------------------------------------


def test_csv_over_many_blocks_reads_as_one_table_with_the_right_line_numbers() -> None:
    rows = np.arange(6 * 40_000, dtype=np.float32).reshape(-1, 6) / 8
    text = "\n".join(",".join(repr(float(v)) for v in row) for row in rows) + "\n"
    assert len(text) > 10 * CSV_BLOCK_BYTES
    np.testing.assert_array_equal(parse_rows(text.encode(), columns=6), rows)
    bad = text + "1,2,3,4,5\n"
    with pytest.raises(CsvError, match=f"CSV line {len(rows) + 1} has 5 values but the first row has 6"):
        parse_rows(bad.encode())
    lines = text.splitlines()
    lines[30_000] = lines[30_000].replace(",", ",x", 1)
    with pytest.raises(CsvError, match="CSV line 30001, column 2: 'x"):
        parse_rows("\n".join(lines).encode())


def test_a_huge_csv_cell_is_a_client_error_quoted_short() -> None:
    with pytest.raises(CsvError) as err:
        parse_rows(b"1,2\n" + b"9" * 1_000_000 + b"x,1\n")
    assert len(str(err.value)) < 200


# -- big requests are checked in a worker process, with the same answers -------------------------------------


def test_big_json_headers_are_checked_in_a_worker_with_the_same_verdicts() -> None:
    big = json.dumps(request(shape=[1, 200_000], data=[0.5] * 200_000)).encode()
    wrong = json.dumps(request(shape=[1, 200_001], data=[0.5] * 200_000)).encode()
    assert len(big) > INLINE_BYTES

    async def main() -> None:
        checker = RequestChecker(CAP, workers=1)
        try:
            body, _ = await checker.http("m", big, {"content-type": "application/json"})
            assert body == big
            with pytest.raises(InvalidRequest) as remote:
                await checker.http("m", wrong, {})
            with pytest.raises(InvalidRequest) as local:
                check_http_request("m", wrong, {}, CAP)
            assert remote.value.message == local.value.message
        finally:
            checker.close()
    asyncio.run(main())


def test_a_worker_that_dies_is_a_503_for_its_request_and_replaced_for_the_next() -> None:
    big = json.dumps(request(shape=[1, 200_000], data=[0.5] * 200_000)).encode()

    async def main() -> None:
        checker = RequestChecker(CAP, workers=1)
        try:
            await checker.http("m", big, {})
            assert checker._pool is not None
            for pid in list(checker._pool._processes):  # what an OOM kill does to it
                os.kill(pid, signal.SIGKILL)
            with pytest.raises(RequestCheckFailed):
                for _ in range(50):  # the pool notices the death on its next use
                    await checker.http("m", big, {})
                    await asyncio.sleep(0.05)
            assert (await checker.http("m", big, {}))[0] == big
        finally:
            checker.close()
    asyncio.run(main())


def test_a_grpc_request_over_the_budget_is_scanned_in_a_worker_and_renamed_the_same() -> None:
    message = pb.ModelInferRequest(model_name="cities/Houston_TX.tar.gz", id="r1")
    tensor = message.inputs.add(name="x", datatype="INT32", shape=[1, 40_000])
    tensor.contents.int_contents.extend(range(40_000))
    raw = message.SerializeToString()
    with pytest.raises(OverBudget):
        scan_request(raw, INLINE_BYTES)

    async def main() -> None:
        checker = RequestChecker(CAP, workers=1)
        try:
            scan = await checker.grpc(raw)
            assert (scan.model_name, scan.id) == ("cities/Houston_TX.tar.gz", "r1")
            out = pb.ModelInferRequest.FromString(renamed(raw, scan, "houston-0123"))
            assert out.model_name == "houston-0123" and list(out.inputs[0].contents.int_contents) == list(range(40_000))
            tensor.shape[:] = [1, 40_001]
            with pytest.raises(InvalidRequest) as err:
                await checker.grpc(message.SerializeToString())
            assert (err.value.model_name, err.value.request_id) == ("cities/Houston_TX.tar.gz", "r1")  # type: ignore[attr-defined]
        finally:
            checker.close()
    asyncio.run(main())


def test_a_grpc_message_of_countless_tiny_fields_stops_at_the_field_cap() -> None:
    raw = pb.ModelInferRequest(model_name="m").SerializeToString() + b"\x40\x01" * 100_000  # field 8, varints
    from gateway.grpc_wire import WireError
    with pytest.raises(WireError, match="fields"):
        scan_request(raw)


# -- streams -------------------------------------------------------------------------------------------------


class Holding:
    """A stand-in for DataPlane.holding: counts what is held."""

    held = 0

    def __init__(self, name: str) -> None:
        self.name = name

    async def __aenter__(self) -> Any:
        Holding.held += 1
        return type("Rec", (), {"name": self.name, "model": type("K", (), {"key": "key-" + self.name})})()

    async def __aexit__(self, *exc: object) -> None:
        Holding.held -= 1


def test_a_stream_holds_each_request_until_its_answer_and_nothing_when_idle() -> None:
    async def main() -> None:
        Holding.held = 0
        held = _Held(window=3)
        for name in ("a", "b", "a"):
            await held.take(Holding(name))
        assert Holding.held == 3 and held.names == {"a": "key-a", "b": "key-b"}
        blocked = asyncio.create_task(held.take(Holding("c")))
        await asyncio.sleep(0.01)
        assert not blocked.done(), "a fourth request waits for the window"
        await held.answered("b")
        await blocked
        await held.answered("")  # an answer naming no model releases the oldest
        await held.answered("a")
        await held.answered("c")
        assert Holding.held == 0
        await held.answered("a")  # an extra answer (a decoupled model) releases nothing it does not hold
        await held.take(Holding("d"))
        await held.close()
        assert Holding.held == 0
        with pytest.raises(Throttled):
            await held.take(Holding("e"))
        assert Holding.held == 0
    asyncio.run(main())


def test_a_stream_answer_names_its_model() -> None:
    answer = pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(model_name="m-01", id="7"))
    assert stream_response_model(answer.SerializeToString()) == "m-01"
    assert stream_response_model(pb.ModelStreamInferResponse(error_message="x").SerializeToString()) == ""


@pytest.mark.parametrize("path, headers", [("/v2/models/m/versions/1\r\nX-Evil: 1/infer", {}),
                                           ("/v2/models/m/versions/1 HTTP/1.1/infer", {}),
                                           ("/v2/models/m/infer", {"content-type": "a\r\nX-Evil: 1"})])
def test_the_triton_client_refuses_to_write_a_head_that_could_be_split(path: str, headers: dict[str, str]) -> None:
    from gateway.triton.http import TritonHttp

    client = TritonHttp("http://127.0.0.1:9")
    with pytest.raises(InvalidRequest):
        client._head("POST", path, 0, headers)
    assert b"\r\n\r\n" in client._head("POST", "/v2/models/m/infer", 0, {"content-type": "application/json"})


def test_redaction_is_bounded_and_keeps_a_long_traceback_s_exception_line() -> None:
    from gateway import redact

    echoed = "unexpected inference input '" + "n" * 8_000_000 + "' for model 'x'"
    shown = redact.public(echoed)
    assert len(shown) <= redact.MAX_CHARS + 10 and shown.endswith("[...]")
    frames = "".join(f'  File "/srv/model.py", line {i}, in f\n    g()\n' for i in range(5_000))
    text = "load failed: Traceback (most recent call last):\n" + frames + "ValueError: bad weights\n"
    assert redact.public(text) == "load failed:\nValueError: bad weights"


def test_a_large_csv_answer_is_written_in_a_worker_the_same_as_in_place() -> None:
    from gateway.api.csv_codec import csv_answer

    prices = [float(i) + 0.5 for i in range(20_000)]
    answer = json.dumps({"outputs": [{"name": "price", "datatype": "FP32", "shape": [20_000, 1],
                                      "data": prices}]}).encode()
    assert len(answer) > INLINE_BYTES

    async def main() -> bytes:
        checker = RequestChecker(CAP, workers=1)
        try:
            with pytest.raises(CsvError):
                await checker.offload(csv_answer, b"[" + b" " * INLINE_BYTES + b"]")
            return await checker.offload(csv_answer, answer)
        finally:
            checker.close()
    assert asyncio.run(main()) == csv_answer(answer)
    assert csv_answer(answer).splitlines()[:2] == [b"0.5", b"1.5"]


def test_check_workers_are_as_unreadable_as_the_gateway() -> None:
    from gateway.isolation import is_dumpable

    async def main() -> bool | None:
        checker = RequestChecker(CAP, workers=1)
        try:
            return await checker._run(is_dumpable)
        finally:
            checker.close()
    assert asyncio.run(main()) is False  # a spawned worker starts with the gateway's environment
