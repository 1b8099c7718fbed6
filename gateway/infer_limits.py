"""KServe v2 inference requests checked before they reach Triton, so a small request cannot cost gigabytes.

Triton sizes its buffers from the shapes a request declares before it compares them with the data: a
120-byte JSON body declaring shape [3e8, 6] made it allocate 7 GB and stalled every other model for
seconds. So each input's declared size (elements x the datatype's width) is checked here against what
the body actually carries and against `--max-request-bytes`, and a compressed body is inflated here under
the same cap (Triton would inflate it without one). Only the JSON part is parsed: binary tensor bytes are
counted, never read. Every refusal is a 400 (malformed or inconsistent), 413 (too large) or 415 (an
encoding the gateway does not inflate), naming the TargetModel and the input.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gateway.errors import InvalidRequest, RequestTooLarge, UnsupportedEncoding
from gateway.triton.http import Body

if TYPE_CHECKING:
    from gateway.grpc_wire import RequestScan

WIDTHS = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
          "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
BYTES = "BYTES"  # variable width: at least its 4-byte length prefix per element in binary form
_HEADER_LENGTH = "inference-header-content-length"
_INFLATE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def inflate(key: str, body: bytes, encoding: str, cap: int) -> bytes:
    """`body` decoded from gzip or deflate, never past `cap` bytes (a 1 MB bomb stops at the cap)."""
    wbits = _INFLATE.get(encoding.strip().lower())
    if wbits is None:
        raise UnsupportedEncoding(f"TargetModel {key!r}: Content-Encoding {encoding!r} is not supported: send the "
                                  "body as it is, or gzip or deflate")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, cap + 1)
    except zlib.error as exc:
        raise InvalidRequest(f"TargetModel {key!r}: the {encoding} body is corrupt ({exc})") from None
    if len(out) > cap or inflater.unconsumed_tail:
        raise RequestTooLarge(f"TargetModel {key!r}: the {encoding} body inflates to more than the gateway's limit "
                              f"of {cap} bytes")
    if not inflater.eof:
        raise InvalidRequest(f"TargetModel {key!r}: the {encoding} body is truncated")
    return out


def _count(data: Any) -> int:
    """Scalars in a (possibly nested) JSON array, without recursion."""
    if not isinstance(data, list):
        return 1
    total, stack = 0, [data]
    while stack:
        for item in stack.pop():
            if isinstance(item, list):
                stack.append(item)
            else:
                total += 1
    return total


def elements(key: str, name: str, shape: Any) -> int:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in shape):
        raise InvalidRequest(f"TargetModel {key!r}: input {name!r} has shape {shape!r}; expected a list of "
                             "non-negative integers")
    return math.prod(shape)


def declared_bytes(key: str, name: str, datatype: Any, count: int) -> int:
    """Bytes `count` elements of `datatype` take at least (BYTES: their length prefixes)."""
    if datatype == BYTES:
        return 4 * count
    width = WIDTHS.get(datatype) if isinstance(datatype, str) else None
    if width is None:
        raise InvalidRequest(f"TargetModel {key!r}: input {name!r} has datatype {datatype!r}; expected one of "
                             f"{', '.join([*WIDTHS, BYTES])}")
    return width * count


def _parse_header(key: str, text: bytes) -> dict[str, Any]:
    try:
        request = json.loads(text.decode())  # decoded here: json's own encoding sniffing costs more
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"TargetModel {key!r}: the request is not valid JSON ({exc})") from None
    if not isinstance(request, dict):
        raise InvalidRequest(f"TargetModel {key!r}: the request must be a JSON object with \"inputs\"")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise InvalidRequest(f"TargetModel {key!r}: \"inputs\" must be a non-empty list of input objects")
    return request


def _prefix(parts: Sequence[bytes], n: int) -> bytes:
    """The first `n` bytes of a body that arrived in parts (a copy of those bytes only)."""
    first = parts[0]
    if len(first) >= n:
        return first if len(first) == n else first[:n]
    taken, need = [], n
    for part in parts:
        taken.append(part[:need])
        need -= len(taken[-1])
        if need <= 0:
            break
    return b"".join(taken)


def check_http_request(key: str, body: Body, headers: Mapping[str, str], cap: int) -> tuple[Body, dict[str, str]]:
    """The body to forward and the headers to forward with it (inflated: no Content-Encoding), or an error.
    A body may come as the parts it arrived in: only its JSON header is read, and the tensor bytes after it
    are forwarded as they came, never joined."""
    headers = {k.lower(): v for k, v in headers.items()}
    fwd = {k: v for k, v in headers.items() if k in ("content-type", _HEADER_LENGTH, "accept-encoding")}
    parts: Sequence[bytes] = (body,) if isinstance(body, bytes) else body or (b"",)
    encoding = headers.get("content-encoding")
    if encoding and encoding.strip().lower() != "identity":
        body = inflate(key, b"".join(parts), encoding, cap)
        parts = (body,)
    total = sum(map(len, parts))
    length_text = headers.get(_HEADER_LENGTH)
    if length_text is None:
        if len(parts) > 1:  # all of it is JSON, read whole: forward the joined copy, not the parts
            body = b"".join(parts)
            parts = (body,)
        header_length = total
    else:
        if not length_text.strip().isdigit() or int(length_text) > total:
            raise InvalidRequest(f"TargetModel {key!r}: Inference-Header-Content-Length {length_text!r} is not a "
                                 f"length within the {total}-byte body")
        header_length = int(length_text)
    request = _parse_header(key, _prefix(parts, header_length))
    binary_total, declared_total = 0, 0
    for tensor in request["inputs"]:
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"TargetModel {key!r}: every input needs a \"name\"")
        count = elements(key, name, tensor.get("shape"))
        size = declared_bytes(key, name, tensor.get("datatype"), count)
        declared_total += size
        if declared_total > cap:
            raise RequestTooLarge(f"TargetModel {key!r}: the inputs declare more than the gateway's limit of {cap} "
                                  f"bytes (input {name!r}: shape {tensor['shape']})")
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"TargetModel {key!r}: input {name!r}: \"parameters\" must be an object")
        if any(p in parameters for p in _SHARED_MEMORY):
            raise InvalidRequest(f"TargetModel {key!r}: input {name!r}: shared memory is not available through "
                                 "the gateway")
        binary = parameters.get("binary_data_size")
        if binary is not None:
            exact = tensor["datatype"] != BYTES
            if not isinstance(binary, int) or isinstance(binary, bool) or binary < 0 or (
                    binary != size if exact else binary < size):
                raise InvalidRequest(f"TargetModel {key!r}: input {name!r}: binary_data_size {binary!r} does not "
                                     f"match shape {tensor['shape']} of {tensor['datatype']} ({size} bytes)")
            binary_total += binary
        elif "data" in tensor:
            found = _count(tensor["data"])
            if found != count:
                raise InvalidRequest(f"TargetModel {key!r}: input {name!r} declares shape {tensor['shape']} "
                                     f"({count} elements) but its data holds {found}")
        else:
            raise InvalidRequest(f"TargetModel {key!r}: input {name!r} has neither \"data\" nor binary data")
    if binary_total != total - header_length:
        raise InvalidRequest(f"TargetModel {key!r}: the inputs' binary_data_size add up to {binary_total} bytes "
                             f"but {total - header_length} follow the JSON header")
    return body, fwd


_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", BYTES: "bytes_contents"}  # FP16 and BF16 travel only as raw bytes


def check_grpc_request(request: RequestScan, cap: int) -> None:
    """The same checks for a gRPC ModelInferRequest (tensors in `raw_input_contents` or typed contents), read
    from its scan (`gateway.grpc_wire.scan_request`): the raw tensors are measured, never copied."""
    key = request.model_name
    inputs = request.inputs
    if not inputs:
        raise InvalidRequest(f"TargetModel {key!r}: the request has no inputs")
    raw = request.raw_lengths
    if raw and len(raw) != len(inputs):
        raise InvalidRequest(f"TargetModel {key!r}: {len(raw)} raw_input_contents for {len(inputs)} inputs")
    declared_total = 0
    for position, tensor in enumerate(inputs):
        name, datatype, shape = tensor.name, tensor.datatype, tensor.shape[:]  # a list; twice as fast as list()
        # protobuf dims are ints already: only a negative one needs `elements` (which says what is wrong)
        count = math.prod(shape) if not shape or min(shape) >= 0 else elements(key, name, shape)
        size = declared_bytes(key, name, datatype, count)
        declared_total += size
        if declared_total > cap:
            raise RequestTooLarge(f"TargetModel {key!r}: the inputs declare more than the gateway's limit of {cap} "
                                  f"bytes (input {name!r}: shape {shape})")
        if tensor.parameters and any(p in tensor.parameters for p in _SHARED_MEMORY):
            raise InvalidRequest(f"TargetModel {key!r}: input {name!r}: shared memory is not available through "
                                 "the gateway")
        if raw:
            got = raw[position]
            if got != size if datatype != BYTES else got < size:
                raise InvalidRequest(f"TargetModel {key!r}: input {name!r} declares shape {shape} of "
                                     f"{datatype} ({size} bytes) but carries {got}")
            continue
        field = _CONTENTS.get(datatype)
        found = len(getattr(tensor.contents, field)) if field else 0
        if found != count:
            raise InvalidRequest(f"TargetModel {key!r}: input {name!r} declares shape {shape} "
                                 f"({count} elements) but its contents hold {found}")
