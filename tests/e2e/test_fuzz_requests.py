"""Seeded fuzzing of every inference edge: no 5xx, every answer within a second, the event loop never late.

A generator seeded with `SEED` builds requests of up to 8 MiB for a real gateway (real Triton, moto S3):
KServe v2 HTTP infer bodies (JSON and binary tensors, gzip and deflate, mutations of a valid request:
duplicate keys at every level, deep nesting, huge and odd numbers, shapes of many dimensions, wrong
datatypes, binary sizes that disagree, odd Inference-Header-Content-Length values, truncation, NaN, very
long strings, many inputs), SageMaker `/invocations` bodies (JSON, binary, CSV), paths with odd versions and
names, and gRPC ModelInferRequest messages mutated at the wire level (unknown fields of every wire type,
truncation, a repeated model_name, many dimensions packed and unpacked, raw contents that disagree, groups
nested deep). Each class also runs once at full size (8 MiB), the classes issue 19 found among them.

Cases go in batches of `BATCH` over `WORKERS` threads, at most one body over 1 MiB in flight (eight at once
is test_loop_lag's part); after each batch a valid request must still be answered over HTTP and gRPC (the
second request after a failure). Asserted: no HTTP 5xx, no gRPC INTERNAL, UNKNOWN, UNAVAILABLE,
DEADLINE_EXCEEDED, DATA_LOSS or UNIMPLEMENTED, an answer within `ANSWER_BOUND_S` for every request, a gRPC
answer only for the model the message names (protobuf's last `model_name`), no observation of
`mme_event_loop_lag_seconds` over 50 ms across the run, and the run within `DEADLINE_S`. The seed, the
counts and a summary by status are printed; every failing case is listed with its class, size and answer.
`FUZZ_SEED` replays another seed.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import random
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from tests.helpers import (GatewayProcess, exchange, http, http_bytes, late_ticks, loop_lag_buckets, polled,
                           v2_request)

SEED = int(os.environ.get("FUZZ_SEED", "1919"))
RANDOM_CASES = 1200  # plus one full-size case per class (`FULL_SIZE_CASES`)
BATCH = 16
WORKERS = 4
MIB = 1 << 20
MAX_BODY = 8 * MIB
FULL_SIZE = MAX_BODY - 8192  # what a generator aims at, below the cap by what a mutation may add
# Sizes: most requests small, a few large, so the run takes about half a minute on a 2-core machine.
SIZE_CLASSES = ((0.88, 64, 4096), (0.09, 4096, MIB), (0.03, MIB, MAX_BODY))  # (share, smallest, largest)
ANSWER_BOUND_S = 1.0  # issue 19: every refusal within a second
DEADLINE_S = 90.0  # the whole run, the gateway's start excluded (it takes ~25 s when all is well)
SOCKET_TIMEOUT_S = 10.0  # a request hanging this long has failed the bound already: stop waiting
MODEL = "Houston_TX.tar.gz"  # input "features", FP32 [-1, 6]; output "price"
MISSING = "missing/Nowhere_XX.tar.gz"
HOUSE = [1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0]
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
BAD_GRPC = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
                      grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED})


@dataclass
class Case:
    """One generated request: HTTP wire bytes or a serialized ModelInferRequest, and what made it."""

    protocol: str  # "http" or "grpc"
    label: str  # the class (generator) and mutation
    payload: bytes
    answer: object = None  # HTTP status (None: reset before any answer) or gRPC status code
    elapsed: float = 0.0
    detail: str = ""  # the start of the answer's body or error message
    wrong: str = ""  # an answer that is not a refusal but is still wrong

    @property
    def large(self) -> bool:
        return len(self.payload) > MIB


# -- JSON that may name a key twice --------------------------------------------------------------------------


class Obj(list):
    """A JSON object as (key, value) pairs, so a key can be written twice."""


class Raw(str):
    """JSON text written as it is (big arrays built once, hostile literals, nesting)."""


def dump(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        return "{" + ",".join(json.dumps(k) + ":" + dump(v) for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


ODD_NUMBERS = ["1" + "0" * 30, str(2**63), str(2**64), str(-(2**63) - 1), "-1", "1e308", "1e999999", "-0",
                "1.5", '"1"', "NaN", "Infinity", "-Infinity", "true", "null", "[]", "{}", "0", "9" * 5000,
                "0." + "1" * 5000, "1E400", str(2**63 - 1), "4294967296"]
DATATYPES = ["FP33", "fp32", "", "BYTES", "FP16", "BF16", "INT64", "UINT8", "BOOL", "STRING", "FP32\u0000",
             "\uff26\uff30\uff13\uff12", "FP32 ", 7, None, ["FP32"]]
LENGTH_SPELLINGS = ["{n}", "{m}", "{k}", "0", "-{n}", "+{n}", " {n} ", "{n}.0", "0x{n:x}", "1e2", "", "abc",
                    "\u0661\u0662", "\u00b2", "\uff11\uff12", "9" * 40, str(2**64), "{n},{n}"]


def rows_for(size: int, per_row: int) -> int:
    return max(1, size // per_row)


def text_rows(rng: random.Random, size: int, decimals: int) -> list[str]:
    """Rows of six numbers as text, about `size` bytes with their separators (eight distinct rows repeated:
    cheap at 8 MiB)."""
    distinct = [",".join(f"{v * rng.uniform(0.5, 1.5):.{decimals}f}" for v in HOUSE) for _ in range(8)]
    rows = rows_for(size, max(map(len, distinct)) + 1)
    return [distinct[i % 8] for i in range(rows)]


def within_cap(body: bytes) -> bytes:
    """`body`, which a generator sized to at most 8 MiB: one cut short by accident would test something else."""
    assert len(body) <= MAX_BODY, f"the generator made a body of {len(body)} bytes"
    return body


def valid_document(rng: random.Random, size: int) -> Obj:
    """A valid KServe v2 JSON request of at most about `size` bytes, with optional fields."""
    rows = text_rows(rng, size - 200, 3)
    tensor = Obj([("name", "features"), ("shape", [len(rows), 6]), ("datatype", "FP32"),
                  ("data", Raw("[" + ",".join(rows) + "]"))])
    document = Obj([("inputs", [tensor])])
    if rng.random() < 0.3:
        document.insert(0, ("id", f"req-{rng.randrange(10**6)}"))
    if rng.random() < 0.3:
        document.append(("outputs", [Obj([("name", "price")])]))
    if rng.random() < 0.2:
        document.append(("parameters", Obj([("priority", 0)])))
    return document


def objects(value: Any) -> list[Obj]:
    """Every JSON object in a document, outermost first."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Obj):
            found.append(item)
            stack.extend(v for _, v in item)
        elif isinstance(item, list) and not isinstance(item, Raw):
            stack.extend(item)
    return found


def nested(rng: random.Random, depth: int) -> Raw:
    if rng.random() < 0.5:
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


def set_field(target: Obj, key: str, value: Any) -> None:
    """`key`'s first occurrence in `target` set to `value` (appended when absent)."""
    for i, (name, _) in enumerate(target):
        if name == key:
            target[i] = (key, value)
            return
    target.append((key, value))


def the_tensor(document: Obj) -> Obj:
    """The document's first input object (a detached one when an earlier mutation replaced the inputs)."""
    inputs = dict(document).get("inputs")
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], Obj):
        return inputs[0]
    return Obj([("name", "features")])


MUTATIONS = ["duplicate_key", "duplicate_shape", "huge_number", "many_dims", "datatype", "deep_nesting",
             "long_string", "many_inputs", "nan", "shared_memory", "outputs", "drop_field", "shape_type"]
SCALING = {"many_dims", "deep_nesting", "long_string", "many_inputs"}  # their size is the mutation's own


def mutate_json(rng: random.Random, document: Obj, size: int, kind: str) -> str:
    """Apply one hostile change `kind` to a valid document (in place); a name for it, with its parameters."""
    tensor = the_tensor(document)
    if kind == "duplicate_key":
        target = rng.choice(objects(document))
        key, value = rng.choice(list(target))
        twin = rng.choice([Raw(rng.choice(ODD_NUMBERS)), "x"] + ([value] if size < 4 * MIB else []))  # fits the cap
        target.insert(rng.randrange(len(target) + 1), (key, twin))
        return f"{kind}:{key}"
    if kind == "duplicate_shape":  # issue 19: Python kept the last "shape", Triton the first
        shape = dict(tensor).get("shape")
        tensor.insert(0, ("shape", [20_000_000, 6] if rng.random() < 0.5 else [2**62, 6]))
        if rng.random() < 0.3:
            tensor.append(("shape", shape))
        return kind
    if kind == "huge_number":
        where = rng.choice(["shape0", "shape1", "data", "id", "priority", "binary_size"])
        number = Raw(rng.choice(ODD_NUMBERS))
        if where.startswith("shape"):
            shape = dict(tensor).get("shape")
            shape = list(shape) if isinstance(shape, list) and not isinstance(shape, Raw) else [1, 6]
            shape[int(where[-1])] = number
            set_field(tensor, "shape", shape)
        elif where == "data":
            set_field(tensor, "data", Raw("[" + ",".join([number] + ["1"] * 5) + "]"))
        elif where == "binary_size":
            set_field(tensor, "parameters", Obj([("binary_data_size", number)]))
        elif where == "id":
            set_field(document, "id", number)
        else:
            set_field(document, "parameters", Obj([("priority", number)]))
        return f"{kind}:{where}={number[:20]}"
    if kind == "many_dims":
        count = max(33, size // 2) if size >= MIB else rng.choice([33, 64, 1000, max(33, size // 2)])
        set_field(tensor, "shape", Raw("[" + ",".join([rng.choice(["1", "2", "0"])] * count) + "]"))
        return f"{kind}:{count}"
    if kind == "datatype":
        set_field(tensor, "datatype", rng.choice(DATATYPES))
        return kind
    if kind == "deep_nesting":
        arrays = rng.random() < 0.5
        depth = max(50, size // (2 if arrays else 6))
        depth = depth if size >= MIB else rng.choice([50, 1000, depth])
        nesting = Raw("[" * depth + "]" * depth) if arrays else Raw('{"a":' * depth + "1" + "}" * depth)
        target = rng.choice(["data", "shape", "parameters", "top"])
        set_field(document if target == "top" else tensor, target, nesting)
        return f"{kind}:{target}:{depth}"
    if kind == "long_string":
        where = rng.choice(["name", "datatype", "id", "key"])
        text = rng.choice("a-_.0f") * max(1, size)
        if where == "key":
            tensor.append((text, 1))
        else:
            set_field(document if where == "id" else tensor, where, text)
        return f"{kind}:{where}:{len(text)}"
    if kind == "many_inputs":
        count = max(2, size // 61)  # 60 bytes each with six digits and the comma
        one = '{"name":"i%d","shape":[1],"datatype":"FP32","data":[1]}'
        set_field(document, "inputs", Raw("[" + ",".join(one % i for i in range(count)) + "]"))
        return f"{kind}:{count}"
    if kind == "nan":
        set_field(tensor, "shape", [1, 6])
        set_field(tensor, "data", Raw("[" + ",".join(rng.choice(["NaN", "Infinity", "-Infinity", "1"])
                                                      for _ in range(6)) + "]"))
        return kind
    if kind == "shared_memory":
        set_field(tensor, "parameters", Obj([("shared_memory_region", "r"), ("shared_memory_byte_size", 24)]))
        return kind
    if kind == "outputs":
        parameter = rng.choice(["binary_data", "classification", "shared_memory_region"])
        set_field(document, "outputs", [Obj([("name", rng.choice(["price", "nope", "a" * 1000])),
                                             ("parameters", Obj([(parameter, Raw(rng.choice(ODD_NUMBERS)))]))])])
        return f"{kind}:{parameter}"
    if kind == "drop_field" and tensor:
        victim = rng.randrange(len(tensor))
        name = tensor[victim][0]
        del tensor[victim]
        return f"{kind}:{name}"
    shape = rng.choice(['"1x6"', "{}", "[1.0,6]", "[true,6]", "[[1],[6]]", "[-1,6]", "[]", "null"])
    set_field(tensor, "shape", Raw(shape))
    return f"shape_type:{shape}"


def json_body(rng: random.Random, size: int, force: str | None = None) -> tuple[str, bytes]:
    """A KServe v2 JSON body of about `size` bytes: valid, mutated (one or two changes), cut short, or not
    UTF-8. `force`: that one mutation (the full-size cases)."""
    roll = rng.random()
    if force is None and roll < 0.1:
        return "json:valid", dump(valid_document(rng, size)).encode()
    if force is None and roll < 0.17:
        text = dump(valid_document(rng, size)).encode()
        return "json:truncated", text[: rng.randrange(len(text))]
    if force is None and roll < 0.22:
        text = dump(valid_document(rng, size // 2))  # UTF-16 doubles it
        return "json:encoding", rng.choice([b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16"),
                                            text.encode()[:10] + b"\xff\xfe\x00" + text.encode()[10:]])
    kinds = [force] if force else [rng.choice(MUTATIONS) for _ in range(1 if rng.random() < 0.7 else 2)]
    scaling = [kind for kind in kinds if kind in SCALING]
    document = valid_document(rng, 400 if scaling else size)
    share = (size - 1024) // len(scaling) if scaling else size  # what each mutation that grows may take
    names = [mutate_json(rng, document, share, kind) for kind in kinds]
    return "json:" + "+".join(names), dump(document).encode()


def binary_body(rng: random.Random, size: int) -> tuple[str, bytes, dict[str, str]]:
    """A JSON header and raw FP32 rows, with binary_data_size and Inference-Header-Content-Length, some wrong."""
    rows = rows_for(size, 24)
    tensors = np.tile(np.array(HOUSE, dtype=np.float32), rows).tobytes()
    binary_size: Any = len(tensors)
    mutation = rng.choice(["valid", "size_off", "size_type", "length", "length", "tail", "bytes_type"])
    if mutation == "size_off":
        binary_size += rng.choice([-1, 1, -len(tensors), 2**40, 4])
    elif mutation == "size_type":
        binary_size = Raw(rng.choice(ODD_NUMBERS))
    datatype = "BYTES" if mutation == "bytes_type" else "FP32"
    header = dump(Obj([("inputs", [Obj([("name", "features"), ("shape", [rows, 6]), ("datatype", datatype),
                                        ("parameters", Obj([("binary_data_size", binary_size)]))])])])).encode()
    body = header + tensors
    if mutation == "tail":
        body += bytes(rng.choice([1, 7, 4096]))
    n, length = len(header), str(len(header))
    if mutation == "length":
        length = rng.choice(LENGTH_SPELLINGS).format(n=n, m=n + rng.choice([-1, 1]), k=len(body) + 1)
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": length}
    return f"binary:{mutation}", body, headers


def compressed(rng: random.Random, body: bytes, headers: dict[str, str]) -> tuple[str, bytes, dict[str, str]]:
    """`body` gzip- or deflate-compressed, sometimes labelled wrong or corrupted."""
    kind = rng.choice(["gzip", "deflate", "x-gzip", "GZIP", "br", "gzip, gzip", "identity", "corrupt", "truncated",
                       "mislabelled"])
    packed = zlib.compress(body, 1) if kind in ("deflate", "mislabelled") else gzip.compress(body, 1)
    label = {"corrupt": "gzip", "truncated": "gzip", "mislabelled": "gzip"}.get(kind, kind)
    if kind == "corrupt":
        at = rng.randrange(10, max(11, len(packed)))
        packed = packed[:at] + bytes([packed[at % len(packed)] ^ 0xFF]) + packed[at + 1:]
    elif kind == "truncated":
        packed = packed[: rng.randrange(1, len(packed))]
    elif kind == "identity":
        packed = body
    return f"+{kind}", packed, {**headers, "Content-Encoding": label}


def kserve_case(rng: random.Random, size: int, force: str | None = None) -> Case:
    infer = f"/v2/models/{MODEL}/infer"
    if force is None and rng.random() < 0.25:
        label, body, headers = binary_body(rng, size)
    else:
        label, body = json_body(rng, size, force)
        headers = {"Content-Type": "application/json"}
    if force is None and rng.random() < 0.15:
        extra, body, headers = compressed(rng, body, headers)
        label += extra
    return Case("http", "kserve:" + label, http_bytes("POST", infer, within_cap(body), headers))


def csv_text(rng: random.Random, size: int, force: bool = False) -> tuple[str, bytes]:
    lines = text_rows(rng, int(size * 0.95), 2)  # room for blank lines and the like
    rows = len(lines)
    kind = "bad_last_cell" if force else rng.choice(
        ["valid", "bad_last_cell", "bad_cell", "columns", "blank_lines", "quotes", "huge_field", "nul", "not_utf8",
         "special_numbers", "many_columns", "crlf", "header_row", "empty"])
    if kind == "bad_last_cell":
        lines[-1] = lines[-1].rsplit(",", 1)[0] + ",x"
    elif kind == "bad_cell":
        i = rng.randrange(rows)
        cells = lines[i].split(",")
        cells[rng.randrange(6)] = rng.choice(["abc", "", "1,5", "--1", "0x10", "1e999", "١"])
        lines[i] = ",".join(cells)
    elif kind == "columns":
        lines[rng.randrange(rows)] += ",1"
    elif kind == "blank_lines":
        lines = [line + "\n" if rng.random() < 0.3 else line for line in lines]
    elif kind == "quotes":
        lines[rng.randrange(rows)] = '"1994,"3188",5,1.5,1.62,3'
    elif kind == "huge_field":
        lines = lines[: len(lines) // 2 + 1]
        lines[rng.randrange(len(lines))] = "1" * max(200_000, size // 3)
    elif kind == "nul":
        lines[rng.randrange(rows)] = "1994,\x00,5,1.5,1.62,3"
    elif kind == "special_numbers":
        lines[rng.randrange(rows)] = ",".join(rng.choice(["nan", "inf", "-inf", "NaN", "1e308", "1e-320"])
                                              for _ in range(6))
    elif kind == "many_columns":
        lines = [",".join(["1.0"] * max(7, size // 4))]
    elif kind == "header_row":
        lines.insert(0, "year,sqft,beds,baths,lot,garage")
    elif kind == "empty":
        lines = []
    text = ("\r\n" if kind == "crlf" else "\n").join(lines).encode()
    if kind == "not_utf8":
        text = b"\xff\xfe" + text
    return kind, text


def sagemaker_case(rng: random.Random, size: int, force: bool = False) -> Case:
    path = rng.choice(["/invocations", "/invocations", "/endpoints/mme/invocations"])
    target = MODEL if force or rng.random() < 0.85 else rng.choice([MISSING, "../etc/passwd", "x" * 300, "", "%00"])
    headers = {"X-Amzn-SageMaker-Target-Model": target}
    if force or rng.random() < 0.5:
        label, body = csv_text(rng, size, force)
        headers["Content-Type"] = rng.choice(["text/csv"] * 6 + ["text/csv; charset=utf-16", "text/csv;;;"])
        if not force and rng.random() < 0.05:
            headers["Content-Encoding"] = "gzip"
            body = gzip.compress(body, 1)
        label = "csv:" + label
    elif rng.random() < 0.7:
        label, body = json_body(rng, size)
        headers["Content-Type"] = "application/json"
    else:
        label, body, binary_headers = binary_body(rng, size)
        spelled = binary_headers["Inference-Header-Content-Length"]
        headers["Content-Type"] = f"application/vnd.sagemaker-triton.binary+json;json-header-size={spelled}"
    if not force and rng.random() < 0.2:
        headers["Accept"] = rng.choice(["text/csv", "application/json", "*/*", "text/html", "text/csv;q=abc", ""])
    return Case("http", "sagemaker:" + label, http_bytes("POST", path, within_cap(body), headers))


VERSIONS = ["1%0D%0AX-Evil:%201", "abc", "-1", "99999999999999999999", "1", "01", "%31", "1%20", "%00", "+1",
            "%D9%A1", "1.0", "0", "1%0A", "%2e%2e", "1;x", "9" * 300]
NAMES = [MODEL, "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "a" * 300, "%00", "%C0%AE%C0%AE", "Houston_TX.tar.gz%0D%0AX:1",
         "Houston_TX.tar.gz/../Houston_TX.tar.gz", MISSING]


def path_case(rng: random.Random, size: int) -> Case:
    """Odd versions and names on the infer, metadata, ready, config and stats routes."""
    name = rng.choice(NAMES) if rng.random() < 0.4 else MODEL
    version = rng.choice(VERSIONS)
    suffix = rng.choice(["/infer", "/infer", "", "/ready", "/config", "/stats"])
    path = f"/v2/models/{name}/versions/{version}{suffix}"
    version = version if len(version) < 24 else f"{version[:8]}...({len(version)})"
    if suffix == "/infer":
        label, body = json_body(rng, min(size, 4096)) if rng.random() < 0.3 else ("valid", v2_request([HOUSE]))
        return Case("http", f"path:{version}{suffix}:{label}", http_bytes("POST", path, body,
                                                                          {"Content-Type": "application/json"}))
    return Case("http", f"path:{version}{suffix or '/'}", http_bytes("GET", path))


# -- gRPC at the wire level ----------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def ld(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def input_tensor(name: bytes, datatype: bytes, shape: list[int], packed: bool = True, extra: bytes = b"") -> bytes:
    if packed:
        dims = ld(3, b"".join(varint(d) for d in shape))
    else:
        dims = b"".join(tag(3, 0) + varint(d) for d in shape)
    return ld(1, name) + ld(2, datatype) + dims + extra


def grpc_valid(rng: random.Random, size: int) -> tuple[bytes, int]:
    rows = rows_for(size, 24)
    raw = np.tile(np.array(HOUSE, dtype=np.float32), rows).tobytes()
    return ld(1, MODEL.encode()) + ld(5, input_tensor(b"features", b"FP32", [rows, 6])) + ld(7, raw), rows


def random_field(rng: random.Random, size: int) -> bytes:
    number = rng.choice([rng.randrange(1, 8), rng.randrange(8, 1 << 29), 0, (1 << 29) - 1, 1 << 29])
    wire = rng.randrange(8)
    if wire == 0:
        payload = varint(rng.getrandbits(64)) if rng.random() < 0.9 else b"\xff" * 11
    elif wire == 1:
        payload = rng.randbytes(8)
    elif wire == 2:
        body = rng.randbytes(rng.randrange(0, min(size, 2048) + 1))
        payload = varint(len(body) + rng.choice([0, 0, 0, 1, -1 if body else 0, 2**40])) + body
    elif wire == 5:
        payload = rng.randbytes(4)
    else:
        payload = rng.randbytes(rng.randrange(0, 5))
    return tag(number, wire) + payload


def grpc_case(rng: random.Random, size: int, force: str | None = None) -> Case:
    message, rows = grpc_valid(rng, size)
    kind = force or rng.choice(["valid", "random_field", "random_field", "truncated", "repeated_name", "many_dims",
                                "unpacked_dims", "negative_dim", "huge_dim", "long_varint", "raw_mismatch",
                                "raw_count", "datatype", "typed_contents", "parameters", "nested_groups",
                                "many_inputs", "bad_name", "version"])
    if kind == "random_field":
        for _ in range(rng.randrange(1, 4)):
            at = rng.choice([0, len(message)])
            message = message[:at] + random_field(rng, size) + message[at:]
    elif kind == "truncated":
        message = message[: rng.randrange(len(message))]
    elif kind == "repeated_name":
        other = rng.choice([MISSING.encode(), MODEL.encode(), b"\xff\xfe", b"", b"x" * 300])
        message = message + ld(1, other) if rng.random() < 0.5 else ld(1, other) + message
    elif kind in ("many_dims", "unpacked_dims"):
        count = max(33, min(size, MAX_BODY) // (1 if kind == "many_dims" else 2))
        count = count if size >= MIB else rng.choice([33, 1000, count])
        tensor = input_tensor(b"features", b"FP32", [rng.choice([1, 2])] * count, packed=kind == "many_dims")
        message = ld(1, MODEL.encode()) + ld(5, tensor) + ld(7, bytes(24))
        kind += f":{count}"
    elif kind in ("negative_dim", "huge_dim"):
        dim = rng.choice([-1, -(2**63)]) if kind == "negative_dim" else rng.choice([2**63 - 1, 2**62, 2**40])
        message = ld(1, MODEL.encode()) + ld(5, input_tensor(b"features", b"FP32", [dim, 6])) + ld(7, bytes(24))
    elif kind == "long_varint":
        message = ld(1, MODEL.encode()) + ld(5, ld(1, b"features") + ld(2, b"FP32") + tag(3, 0) + b"\xff" * 12 +
                                             b"\x01") + ld(7, bytes(24))
    elif kind == "raw_mismatch":
        raw_len = rows * 24 + rng.choice([-1, 1, 4, -24, -rows * 12])
        message = ld(1, MODEL.encode()) + ld(5, input_tensor(b"features", b"FP32", [rows, 6])) + ld(7, bytes(
            max(0, raw_len)))
    elif kind == "raw_count":
        message += ld(7, bytes(24))
    elif kind == "datatype":
        datatype = rng.choice([b"FP33", b"fp32", b"", b"BYTES", b"FP16", b"\xff", b"A" * 4000])
        message = ld(1, MODEL.encode()) + ld(5, input_tensor(b"features", datatype, [rows, 6])) + ld(7, bytes(
            rows * 24))
    elif kind == "typed_contents":
        count = rng.choice([rows * 6, rows * 6 + 1, 0, 1])
        contents = ld(6, struct.pack(f"<{count}f", *([1.0] * count)))
        message = ld(1, MODEL.encode()) + ld(5, input_tensor(b"features", b"FP32", [rows, 6], extra=ld(5, contents)))
    elif kind == "parameters":
        key = rng.choice([b"shared_memory_region", b"sequence_id", b"priority", b"timeout", b"k" * 4000])
        value = rng.choice([ld(3, b"r"), tag(2, 0) + varint(2**63), tag(4, 1) + struct.pack("<d", float("nan"))])
        entry = ld(4, ld(1, key) + ld(2, value))
        message = message + entry if rng.random() < 0.5 else ld(1, MODEL.encode()) + ld(5, input_tensor(
            b"features", b"FP32", [rows, 6], extra=entry)) + ld(7, bytes(rows * 24))
    elif kind == "nested_groups":
        depth = max(10, size // 4) if size >= MIB else rng.choice([10, 200, max(10, size // 4)])
        message = grpc_valid(rng, 24)[0] + tag(99, 3) * depth + tag(99, 4) * depth
        kind += f":{depth}"
    elif kind == "many_inputs":
        count = max(2, size // 48)  # 47 bytes each: the declaration and its raw contents
        message = ld(1, MODEL.encode()) + b"".join(ld(5, input_tensor(b"i%d" % i, b"FP32", [1, 6]))
                                                   for i in range(count)) + ld(7, bytes(24)) * count
        kind += f":{count}"
    elif kind == "bad_name":
        name = rng.choice([b"\xff\xfe", b"", b"x" * 300, b"../etc", MISSING.encode(), b"a\x00b", b"%2e%2e"])
        message = ld(1, name) + message[len(ld(1, MODEL.encode())):]
    elif kind == "version":
        message += ld(2, rng.choice([b"1", b"abc", b"-1", b"99999999999999999999", b"1\r\nX: 1", b"\xff"]))
    return Case("grpc", f"grpc:{kind}", within_cap(message))


GENERATORS: dict[str, tuple[float, Callable[..., Case]]] = {
    "kserve": (0.5, kserve_case), "sagemaker": (0.15, sagemaker_case), "path": (0.07, path_case),
    "grpc": (0.28, grpc_case),
}
# Each class once at 8 MiB: issue 19's among them (a shape of a million dimensions, a long name with a bad
# datatype, CSV with a bad last cell, duplicate "shape", deep nesting, gRPC dimensions and inputs, many inputs).
FULL_SIZE_CASES: list[tuple[str, Callable[[random.Random], Case]]] = [
    *((f"kserve:{kind}", lambda rng, kind=kind: kserve_case(rng, FULL_SIZE, force=kind)) for kind in
      ("duplicate_shape", "duplicate_key", "many_dims", "deep_nesting", "long_string", "many_inputs",
       "huge_number", "datatype")),
    ("sagemaker:csv:bad_last_cell", lambda rng: sagemaker_case(rng, FULL_SIZE, force=True)),
    *((f"grpc:{kind}", lambda rng, kind=kind: grpc_case(rng, FULL_SIZE, force=kind)) for kind in
      ("many_dims", "unpacked_dims", "many_inputs", "nested_groups", "raw_mismatch", "random_field", "valid")),
]


def size_for(rng: random.Random) -> int:
    roll = rng.random()
    for share, low, high in SIZE_CLASSES:
        if roll < share:
            return min(FULL_SIZE, int(low * (high / low) ** rng.random()))  # log-uniform within the class
        roll -= share
    return SIZE_CLASSES[-1][2]


def random_case(rng: random.Random) -> Case:
    roll, size = rng.random(), size_for(rng)
    for share, make in GENERATORS.values():
        if roll < share:
            return make(rng, size)
        roll -= share
    return grpc_case(rng, size)


# -- sending ------------------------------------------------------------------------------------------------


def grpc_model_named(message: bytes) -> str | None:
    """The model a protobuf parser reads from the message (the last model_name), None if it is not one."""
    try:
        return pb.ModelInferRequest.FromString(message).model_name
    except (DecodeError, ValueError):
        return None


class Sender:
    """Sends cases with the answer and time of each; at most one body over 1 MiB in flight."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.channel = grpc.insecure_channel(gw.grpc_url, options=[("grpc.max_send_message_length", -1),
                                                                   ("grpc.max_receive_message_length", -1)])
        self.infer = self.channel.unary_unary(MODEL_INFER)  # bytes each way: the mutated message as built
        self.large = threading.Semaphore(1)

    def send(self, case: Case) -> None:
        if case.large:
            with self.large:
                self._send(case)
        else:
            self._send(case)

    def _send(self, case: Case) -> None:
        if case.protocol == "http":
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.gw.port), timeout=SOCKET_TIMEOUT_S) as sock:
                    case.answer, body, case.elapsed = exchange(sock, case.payload)
                case.detail = body[:240].decode(errors="replace")
            except OSError as exc:  # a timeout above all: no answer within SOCKET_TIMEOUT_S
                case.answer, case.elapsed, case.detail = type(exc).__name__, time.monotonic() - started, str(exc)
            return
        started = time.monotonic()
        try:
            answer = self.infer(case.payload, timeout=SOCKET_TIMEOUT_S)
            case.answer = grpc.StatusCode.OK
            named, asked = pb.ModelInferResponse.FromString(answer).model_name, grpc_model_named(case.payload)
            if named != asked:
                case.wrong = f"answered for {named!r}, the message names {asked!r}"
        except grpc.RpcError as exc:
            case.answer, case.detail = exc.code(), (exc.details() or "")[:240]
        case.elapsed = time.monotonic() - started

    def still_serving(self) -> list[str]:
        """A valid request over HTTP and over gRPC, each answered: nothing a batch did broke the model."""
        problems = []
        try:
            status, answer, _ = http("POST", f"{self.gw.url}/v2/models/{MODEL}/infer", v2_request([HOUSE]),
                                     timeout=SOCKET_TIMEOUT_S * 3)
        except OSError as exc:
            status, answer = type(exc).__name__, str(exc).encode()
        if status != 200:
            problems.append(f"valid HTTP request after the batch: {status} {answer[:200]!r}")
        message = grpc_valid(random.Random(0), 24)[0]
        try:
            self.infer(message, timeout=SOCKET_TIMEOUT_S * 3)
        except grpc.RpcError as exc:
            problems.append(f"valid gRPC request after the batch: {exc.code()} {exc.details()!r}")
        return problems


def failure(case: Case) -> str | None:
    """Why an answered case breaks the rules, or None."""
    if case.protocol == "http":
        if not isinstance(case.answer, int):
            return f"no answer ({case.answer})"
        if case.answer >= 500:
            return f"HTTP {case.answer}"
    elif case.answer in BAD_GRPC:
        return f"gRPC {case.answer.name}"
    elif case.wrong:
        return case.wrong
    if case.elapsed >= ANSWER_BOUND_S:
        return f"answered after {case.elapsed:.2f} s"
    return None


def test_fuzzed_requests_are_answered_quickly_without_server_errors(s3_gateway: GatewayProcess) -> None:
    gw = s3_gateway
    sender = Sender(gw)
    # the model loaded before the clock starts (waited for, if an earlier test cost the gateway its Triton)
    assert not polled(sender.still_serving, lambda problems: not problems, timeout_s=180)
    rng = random.Random(SEED)
    plan: list[Callable[[random.Random], Case]] = [make for _, make in FULL_SIZE_CASES]
    plan += [random_case] * RANDOM_CASES
    random.Random(SEED).shuffle(plan)
    header = (f"seed {SEED} (FUZZ_SEED replays another): {RANDOM_CASES} random cases + {len(FULL_SIZE_CASES)} "
              f"at 8 MiB, sizes {SIZE_CLASSES}, batches of {BATCH} on {WORKERS} threads")
    print(header)
    done: list[Case] = []
    problems: list[str] = []
    late_batches: list[str] = []  # which batches the loop was late in, with their cases over 64 KiB
    started = time.monotonic()
    before = last = loop_lag_buckets(gw)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        for first in range(0, len(plan), BATCH):
            if time.monotonic() - started > DEADLINE_S:
                break
            batch = [make(rng) for make in plan[first:first + BATCH]]  # built before any is sent
            list(pool.map(sender.send, batch))
            done += batch
            problems += [f"after case {len(done)}: {p}" for p in sender.still_serving()]
            try:
                now = loop_lag_buckets(gw)
            except OSError as exc:  # the loop held past the read's timeout
                problems.append(f"after case {len(done)}: /metrics unanswered ({exc})")
                continue
            if late := late_ticks(last, now):
                big = [f"#{len(done) - len(batch) + i} {c.label[:60]} ({len(c.payload)} B, {c.elapsed:.2f} s)"
                       for i, c in enumerate(batch) if len(c.payload) > 64 << 10]
                late_batches.append(f"  cases {len(done) - len(batch)}-{len(done) - 1}: {late}; over 64 KiB: {big}")
            last = now
    elapsed = time.monotonic() - started
    time.sleep(0.1)
    try:
        last = loop_lag_buckets(gw)
    except OSError as exc:
        problems.append(f"at the end: /metrics unanswered ({exc})")
    late = late_ticks(before, last)
    sender.channel.close()

    by_answer = collections.Counter(
        (c.protocol, c.answer.name if isinstance(c.answer, grpc.StatusCode) else c.answer) for c in done)
    by_class = collections.Counter(c.label.split(":")[0] for c in done)
    sizes = sorted(len(c.payload) for c in done)
    summary = (f"{header}\nsent {len(done)} of {len(plan)} cases in {elapsed:.1f} s (deadline {DEADLINE_S} s); "
               f"by generator {dict(by_class)}; sizes: median {sizes[len(sizes) // 2]} B, "
               f"{sum(s > MIB for s in sizes)} over 1 MiB, largest {sizes[-1]} B; slowest answer "
               f"{max(c.elapsed for c in done):.3f} s\nanswers: {dict(sorted(by_answer.items(), key=str))}\n"
               f"lag observations over 50 ms by bucket: {late}, in batches:\n" + "\n".join(late_batches))
    print(summary)
    bad = [(i, case, why) for i, case in enumerate(done) if (why := failure(case))]
    listed = "\n".join(f"  #{i} {c.label} ({len(c.payload)} B): {why}; answer {c.answer} after {c.elapsed:.3f} s "
                       f"{c.detail[:160]!r}" for i, c, why in bad[:40])
    assert not bad and not problems, (f"{summary}\n{len(bad)} cases failed (first 40):\n{listed}\n"
                                      + "\n".join(problems[:20]))
    assert len(done) == len(plan), f"{summary}\nthe run passed its deadline"
    assert not late, summary
