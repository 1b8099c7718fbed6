"""The text/csv codec of the SageMaker edge: CSV rows -> KServe v2 binary request, v2 JSON answer -> CSV."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gateway.api.csv_codec import CsvError, CsvInput, csv_input, encode_answer, encode_request, parse_rows

DEMO_METADATA = {
    "name": "Houston_TX-1a2b3c4d",
    "versions": ["1"],
    "platform": "onnxruntime_onnx",
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 6]}],
    "outputs": [{"name": "price", "datatype": "FP32", "shape": [-1, 1]}],
}


def test_demo_metadata_gives_the_single_fp32_matrix_input_and_output_order() -> None:
    spec = csv_input(DEMO_METADATA)
    assert spec == CsvInput(name="features", columns=6, rows=None, outputs=("price",))


def test_fixed_batch_dimension_is_kept() -> None:
    spec = csv_input({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4, -1]}], "outputs": []})
    assert spec.rows == 4 and spec.columns is None and spec.outputs == ()


@pytest.mark.parametrize(
    "inputs, reason",
    [
        ([], "exactly one input"),
        ([{"name": "a", "datatype": "FP32", "shape": [-1, 6]}, {"name": "b", "datatype": "FP32", "shape": [-1, 6]}],
         "has 2: a FP32 [-1, 6], b FP32 [-1, 6]"),
        ([{"name": "x", "datatype": "INT64", "shape": [-1, 6]}], "x INT64 [-1, 6]"),
        ([{"name": "x", "datatype": "FP32", "shape": [-1]}], "x FP32 [-1]"),
        ([{"name": "x", "datatype": "FP32", "shape": [-1, 2, 3]}], "x FP32 [-1, 2, 3]"),
    ],
)
def test_models_csv_cannot_feed_are_refused_with_their_inputs_described(inputs, reason) -> None:
    with pytest.raises(CsvError) as err:
        csv_input({"inputs": inputs, "outputs": []})
    assert reason in str(err.value)
    assert "application/json" in str(err.value)


def test_rows_parse_as_float32_with_crlf_blank_lines_spaces_quotes_and_a_bom() -> None:
    body = "\ufeff1994,3188,5,1.5,1.62,3\r\n\r\n 1978 , 2973,2,1.5,\"0.99\",1e0\n\n".encode()
    rows = parse_rows(body, columns=6)
    assert rows.dtype == np.float32 and rows.shape == (2, 6)
    np.testing.assert_array_equal(rows, np.array([[1994, 3188, 5, 1.5, 1.62, 3], [1978, 2973, 2, 1.5, 0.99, 1]],
                                                 dtype=np.float32))


@pytest.mark.parametrize(
    "body, columns, rows, reason",
    [
        (b"", None, None, "no rows"),
        (b"\n\n", None, None, "no rows"),
        (b"year,sqft\n1,2\n", None, None, "line 1, column 1: 'year' is not a number (CSV bodies have no header row)"),
        (b"1,2,3\n4,5\n", None, None, "line 2 has 2 values but the first row has 3"),
        (b"1,,3\n", None, None, "line 1, column 2: '' is not a number"),
        (b"1,2\n3,abc\n", None, None, "line 2, column 2: 'abc' is not a number"),
        (b"1,nan\n", None, None, "not a finite FP32 number"),
        (b"1,1e39\n", None, None, "not a finite FP32 number"),
        (b"1,2,3,4,5\n", 6, None, "takes 6 values per row but the CSV rows have 5"),
        (b"1\n2\n3\n", None, 2, "takes exactly 2 rows but the CSV body has 3"),
        (b"\xff\xfe1,2\n", None, None, "not UTF-8"),
    ],
)
def test_bad_csv_is_refused_with_the_place_and_reason(body, columns, rows, reason) -> None:
    with pytest.raises(CsvError) as err:
        parse_rows(body, columns, rows)
    assert reason in str(err.value)


def test_request_is_a_binary_tensor_with_exact_float32_bytes_and_outputs_in_model_order() -> None:
    spec = CsvInput(name="features", columns=3, outputs=("price", "band"))
    rows = np.array([[1.62, 2.0, 3.0], [4.0, 5.0, 0.1]], dtype=np.float32)
    body, headers = encode_request(spec, rows)
    assert headers["Content-Type"] == "application/octet-stream"
    size = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:size])
    assert header["inputs"] == [{"name": "features", "shape": [2, 3], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 24}}]
    assert [o["name"] for o in header["outputs"]] == ["price", "band"]
    assert all(o["parameters"]["binary_data"] is False for o in header["outputs"])
    np.testing.assert_array_equal(np.frombuffer(body[size:], dtype="<f4").reshape(2, 3), rows)


def test_request_without_known_outputs_lets_triton_answer_all() -> None:
    body, headers = encode_request(CsvInput(name="x", columns=None), np.zeros((1, 2), dtype=np.float32))
    assert "outputs" not in json.loads(body[: int(headers["Inference-Header-Content-Length"])])


def test_answer_is_one_line_per_row_in_shortest_float32_form() -> None:
    price = np.array([[251234.56], [1.62]], dtype=np.float32)
    answer = {"model_name": "m", "outputs": [{"name": "price", "datatype": "FP32", "shape": [2, 1],
                                              "data": [float(v) for v in price.ravel()]}]}
    text = encode_answer(answer).decode()
    assert text == "251234.56\n1.62\n"
    np.testing.assert_array_equal(np.loadtxt(text.splitlines(), dtype=np.float32).reshape(2, 1), price)


def test_answer_concatenates_every_output_per_row_and_flattens_trailing_dimensions() -> None:
    answer = {"outputs": [
        {"name": "probs", "datatype": "FP64", "shape": [2, 2], "data": [0.25, 0.75, 0.5, 0.5]},
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]},
        {"name": "grid", "datatype": "FP32", "shape": [2, 1, 2], "data": [[[1.0, 2.0]], [[3.0, 4.0]]]},
        {"name": "ok", "datatype": "BOOL", "shape": [2, 1], "data": [True, False]},
        {"name": "tag", "datatype": "BYTES", "shape": [2, 1], "data": ["a,b", "c"]},
    ]}
    assert encode_answer(answer).decode() == '0.25,0.75,1,1.0,2.0,1,"a,b"\n0.5,0.5,0,3.0,4.0,0,c\n'


@pytest.mark.parametrize(
    "outputs, reason",
    [
        ([], "no outputs"),
        ([{"name": "y", "datatype": "FP32", "shape": [], "data": [1.0]}], "scalar"),
        ([{"name": "y", "datatype": "FP32", "shape": [2, 1], "parameters": {"binary_data_size": 8}}], "binary"),
        ([{"name": "a", "datatype": "FP32", "shape": [2, 1], "data": [1.0, 2.0]},
          {"name": "b", "datatype": "FP32", "shape": [3, 1], "data": [1.0, 2.0, 3.0]}], "do not share a row count"),
        ([{"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 3.0]}], "not a multiple"),
    ],
)
def test_answers_that_are_not_tables_are_refused(outputs, reason) -> None:
    with pytest.raises(CsvError) as err:
        encode_answer({"outputs": outputs})
    assert reason in str(err.value)


def test_round_trip_of_the_demo_model_in_numpy() -> None:
    from gateway.demo import predict

    body = b"1994,3188,5,1.5,1.62,3\n1978,2973,2,1.5,0.99,1\n"
    rows = parse_rows(body, columns=6)
    expected = predict("Houston_TX", rows)
    answer = {"outputs": [{"name": "price", "datatype": "FP32", "shape": list(expected.shape),
                           "data": expected.ravel().tolist()}]}
    got = np.array([float(line) for line in encode_answer(answer).decode().splitlines()], dtype=np.float32)
    np.testing.assert_array_equal(got, expected.ravel())
