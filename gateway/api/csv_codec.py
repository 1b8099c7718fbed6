"""`text/csv` for the SageMaker edges: CSV rows in, KServe v2 to Triton, CSV rows out. Pure logic, no I/O.

In: one row per line, comma-separated numbers, no header, for a model with exactly one two-dimensional FP32
input (`[-1, k]`, as Triton's model metadata reports it). The rows become that input's `[n, k]` tensor, sent
to Triton as a binary tensor (exact float32 bytes, no decimal round trip).

Out: one CSV line per row of the answer. Every output's leading dimension is the row count; an output's
remaining dimensions are flattened, and the outputs are concatenated in the order the answer lists them
(the request built here asks for them in the model's metadata order). A one-output model such as the
house-price demo answers one value per line. Floats are written in the shortest form that reads back to
the same value of their datatype.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

CSV_MEDIA_TYPE = "text/csv"
_FP32_MAX = float(np.finfo(np.float32).max)


class CsvError(ValueError):
    """The CSV body, or the model it was sent to, cannot be used; the message says why (a client error)."""


@dataclass(frozen=True)
class CsvInput:
    """The model input CSV rows are written to: its name and fixed sizes (None where the model says -1)."""

    name: str
    columns: int | None
    rows: int | None = None
    outputs: tuple[str, ...] = ()


def csv_input(metadata: Mapping[str, Any]) -> CsvInput:
    """The single two-dimensional FP32 input of a model, from Triton's `GET /v2/models/{name}` answer."""
    inputs = metadata.get("inputs") or []
    described = ", ".join(
        f"{i.get('name')} {i.get('datatype')} {list(i.get('shape') or [])}" for i in inputs
    ) or "none"
    if len(inputs) != 1:
        raise CsvError(
            f"text/csv needs a model with exactly one input (a two-dimensional FP32 tensor); this model has "
            f"{len(inputs)}: {described}. Send a KServe v2 JSON body (ContentType application/json) instead"
        )
    spec = inputs[0]
    shape = [int(d) for d in spec.get("shape") or []]
    if spec.get("datatype") != "FP32" or len(shape) != 2:
        raise CsvError(
            f"text/csv needs a model whose input is a two-dimensional FP32 tensor; this model's input is "
            f"{described}. Send a KServe v2 JSON body (ContentType application/json) instead"
        )
    outputs = tuple(str(o["name"]) for o in metadata.get("outputs") or [] if o.get("name"))
    return CsvInput(
        name=str(spec["name"]),
        columns=shape[1] if shape[1] >= 0 else None,
        rows=shape[0] if shape[0] >= 0 else None,
        outputs=outputs,
    )


CSV_BLOCK_BYTES = 1 << 14  # text parsed in one go (under 1 ms; 2 ms line by line): a caller yields between


def row_blocks(body: bytes) -> Iterator[np.ndarray]:
    """The rows of a CSV body as float32 `[n, k]` blocks, about `CSV_BLOCK_BYTES` of text each, in order.

    Each block is read by numpy's C parser (about a tenth of the time and memory of Python lists of floats,
    which made a body about 20 times its size in objects); a block numpy refuses, or reads as something the
    rules below refuse, is read again line by line, to say which line and why (or to accept what only the
    line reader takes, such as a blank line of spaces). Work and memory are linear in the body, block by
    block, so a caller can parse a large body without holding its event loop for all of it.
    """
    start = len(codecs.BOM_UTF8) if body.startswith(codecs.BOM_UTF8) else 0
    line_no, width = 1, None
    while start < len(body):
        end = body.find(b"\n", start + CSV_BLOCK_BYTES)
        end = len(body) if end < 0 else end + 1
        chunk = body[start:end]
        block = _block(chunk, line_no, width)
        if block.shape[0]:
            width = block.shape[1] if width is None else width
            yield block
        line_no += chunk.count(b"\n")
        start = end


def rows_of(blocks: Sequence[np.ndarray], columns: int | None = None, rows: int | None = None) -> np.ndarray:
    """The blocks of `row_blocks` as one `[n, k]` tensor, checked against the model's fixed sizes."""
    if not blocks:
        raise CsvError("the CSV body holds no rows")
    table = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    width = table.shape[1]
    if columns is not None and width != columns:
        raise CsvError(f"the model takes {columns} values per row but the CSV rows have {width}")
    if rows is not None and table.shape[0] != rows:
        raise CsvError(f"the model takes exactly {rows} rows but the CSV body has {table.shape[0]}")
    return table


def parse_rows(body: bytes, columns: int | None = None, rows: int | None = None) -> np.ndarray:
    """CSV numbers -> float32 `[n, k]`. Blank lines are skipped; every row must have the same length."""
    return rows_of(list(row_blocks(body)), columns, rows)


def _block(chunk: bytes, line_no: int, width: int | None) -> np.ndarray:
    """One block of whole lines; `line_no` is its first line's number, `width` the first row's (if seen)."""
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CsvError(f"the CSV body is not UTF-8 text: {exc}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "input contained no data": a block of blank lines
        try:
            # no quotechar: numpy joins a quoted field across lines differently from the csv module, so quoted
            # cells (rare in numeric CSV) go to the line reader
            block = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.float32, ndmin=2, comments=None)
        except ValueError:
            block = None
    if (block is None or not np.isfinite(block).all()
            or (width is not None and block.shape[0] and block.shape[1] != width)):
        return _read_lines(text, line_no, width)
    return block


def _read_lines(text: str, line_no: int, width: int | None) -> np.ndarray:
    """The line reader: Python's csv module, one float at a time, with the line and column of a refusal."""
    table: list[list[float]] = []
    n = line_no
    try:
        for n, cells in enumerate(csv.reader(io.StringIO(text, newline="")), start=line_no):
            if not cells or all(not c.strip() for c in cells) and len(cells) == 1:
                continue  # a blank line
            if width is None:
                width = len(cells)
            elif len(cells) != width:
                raise CsvError(f"CSV line {n} has {len(cells)} values but the first row has {width}")
            table.append([_number(cell, n, col) for col, cell in enumerate(cells, start=1)])
    except csv.Error as exc:  # a field over the csv module's limit, a NUL byte, ...
        raise CsvError(f"CSV near line {n}: {exc}") from None
    return np.asarray(table, dtype=np.float32).reshape(len(table), width or 0)


def _number(cell: str, line_no: int, col: int) -> float:
    text = cell.strip()
    shown = repr(text) if len(text) <= 40 else repr(text[:40]) + "..."  # a cell may be megabytes long
    try:
        value = float(text)
    except ValueError:
        hint = " (CSV bodies have no header row)" if line_no == 1 else ""
        raise CsvError(f"CSV line {line_no}, column {col}: {shown} is not a number{hint}") from None
    if not math.isfinite(value) or abs(value) > _FP32_MAX:
        raise CsvError(f"CSV line {line_no}, column {col}: {shown} is not a finite FP32 number")
    return value


def encode_request(spec: CsvInput, rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 binary-tensor request (body and headers) carrying `rows` as the model's input; outputs
    are asked for as JSON, in the model's order."""
    data = np.ascontiguousarray(rows, dtype="<f4").tobytes()
    header: dict[str, Any] = {
        "inputs": [{
            "name": spec.name,
            "shape": [int(d) for d in rows.shape],
            "datatype": "FP32",
            "parameters": {"binary_data_size": len(data)},
        }],
    }
    if spec.outputs:
        header["outputs"] = [{"name": name, "parameters": {"binary_data": False}} for name in spec.outputs]
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return head + data, headers


def csv_answer(body: bytes) -> bytes:
    """Triton's KServe v2 JSON answer, as bytes, written as CSV (`encode_answer`): a plain function of bytes, so
    a large answer can be written in another process."""
    try:
        answer = json.loads(body)
    except ValueError as exc:
        raise CsvError(f"the model's answer is not JSON ({exc})") from None
    if not isinstance(answer, dict):
        raise CsvError("the model's answer is not a JSON object")
    return encode_answer(answer)


def encode_answer(answer: Mapping[str, Any]) -> bytes:
    """A KServe v2 JSON answer -> CSV: one line per row, the outputs' values concatenated."""
    outputs: Sequence[Mapping[str, Any]] = answer.get("outputs") or []
    if not outputs:
        raise CsvError("the model answered no outputs to write as CSV")
    columns: list[list[list[str]]] = []
    n: int | None = None
    for out in outputs:
        name, shape = out.get("name"), [int(d) for d in out.get("shape") or []]
        if "data" not in out:
            raise CsvError(f"output {name!r} came back as binary data; ask for application/json to get it")
        if not shape:
            raise CsvError(f"output {name!r} is a scalar with no row dimension; ask for application/json")
        if n is None:
            n = shape[0]
        elif shape[0] != n:
            raise CsvError(
                f"outputs do not share a row count ({outputs[0].get('name')!r} has {n} rows, {name!r} has "
                f"{shape[0]}); ask for application/json"
            )
        cells = _format(out.get("datatype", ""), _flatten(out["data"]))
        per_row = len(cells) // n if n else 0
        if n and per_row * n != len(cells):
            raise CsvError(f"output {name!r} has {len(cells)} values, not a multiple of its {n} rows")
        columns.append([cells[i * per_row:(i + 1) * per_row] for i in range(n)])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for i in range(n or 0):
        writer.writerow([cell for col in columns for cell in col[i]])
    return buf.getvalue().encode()


def _flatten(data: Any) -> list[Any]:
    """KServe v2 JSON data may be flat (the usual) or nested row-major lists."""
    if isinstance(data, list) and any(isinstance(v, list) for v in data):
        return [x for v in data for x in (_flatten(v) if isinstance(v, list) else [v])]
    return list(data) if isinstance(data, list) else [data]


def _format(datatype: str, values: list[Any]) -> list[str]:
    if datatype in ("FP32", "FP16", "BF16"):
        return [str(v) for v in np.asarray(values, dtype=np.float32)]  # shortest float32 repr: 1.62, not 1.6200000047
    if datatype == "FP64":
        return [repr(float(v)) for v in values]
    if datatype == "BOOL":
        return ["1" if v else "0" for v in values]
    if datatype.startswith(("INT", "UINT")):
        return [str(int(v)) for v in values]
    return [str(v) for v in values]
