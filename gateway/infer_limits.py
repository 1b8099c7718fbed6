"""KServe v2 inference requests checked before they reach Triton, so a small request cannot cost gigabytes.

Triton sizes its buffers from the shapes a request declares before it compares them with the data: a
120-byte JSON body declaring shape [3e8, 6] made it allocate 7 GB and stalled every other model for
seconds. So each input's declared size (elements x the datatype's width) is checked here against what
the body actually carries and against `--max-request-bytes`, and a compressed body is inflated here under
the same cap (Triton would inflate it without one). Only the JSON part is parsed: binary tensor bytes are
counted, never read. Every refusal is a 400 (malformed or inconsistent), 413 (too large) or 415 (an
encoding the gateway does not inflate), naming the TargetModel and the input.

Every check is linear in the bytes the client sent, with small constants, because it runs on the event loop:
shapes have at most `MAX_DIMS` dimensions of at most int64 each (a million-dimension shape made the product a
big integer, quadratic to compute: 18 s of a frozen gateway), and client text quoted in a message is cut to
`SHOWN` characters. What is checked is what Triton reads: a JSON object with a key twice is refused (Python
keeps the last `"shape"`, Triton's parser the first: `{"shape":[25000000,6],"shape":[1,6]}` passed the check
and made Triton allocate the first), and the Inference-Header-Content-Length forwarded is the number checked.
"""

from __future__ import annotations

import json
import math
import re
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
MAX_DIMS = 32  # dimensions of one tensor; models take a handful, and Triton's own limit is not lower in practice
MAX_DIM = (1 << 63) - 1  # Triton reads each dimension as an int64
SHOWN = 80  # characters of client text (names, datatypes, shapes) quoted back in an error message
_LENGTH = re.compile(r"[0-9]{1,19}")  # ASCII digits only: str.isdigit() takes '²', which int() refuses
MAX_TENSORS = 1024  # inputs, or outputs, of one request: Triton crashed (SIGSEGV) on 80,000 inputs
MAX_NAME = 1024  # characters of a tensor's name or a request's id: Triton quotes names whole in its errors
_INT_RANGES = {"INT8": (-(1 << 7), (1 << 7) - 1), "INT16": (-(1 << 15), (1 << 15) - 1),
               "INT32": (-(1 << 31), (1 << 31) - 1), "INT64": (-(1 << 63), (1 << 63) - 1), "UINT8": (0, (1 << 8) - 1),
               "UINT16": (0, (1 << 16) - 1), "UINT32": (0, (1 << 32) - 1), "UINT64": (0, (1 << 64) - 1)}
_FLOATS = ("FP16", "BF16", "FP32", "FP64")
# Parameters Triton reads with a type of its own; any other parameter is a string, a boolean or a number.
_UINT_PARAMETERS = frozenset(("priority", "timeout", "classification", "binary_data_size"))
_BOOL_PARAMETERS = frozenset(("binary_data_output", "binary_data"))


def shown(value: Any) -> str:
    """`repr(value)` cut to `SHOWN` characters: messages echo client text, which may be megabytes."""
    text = repr(value) if not isinstance(value, (list, tuple)) or len(value) <= MAX_DIMS else (
        f"[{len(value)} dimensions]")
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` refusing an object that names a key twice, at any depth."""
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _DuplicateKey(name)
            seen.add(name)
    return document


def inflate(key: str, body: bytes, encoding: str, cap: int) -> bytes:
    """`body` decoded from gzip or deflate, never past `cap` bytes (a 1 MB bomb stops at the cap)."""
    wbits = _INFLATE.get(encoding.strip().lower())
    if wbits is None:
        raise UnsupportedEncoding(f"TargetModel {key!r}: Content-Encoding {shown(encoding)} is not supported: send the "
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


def _scalars(data: Any) -> list[Any]:
    """The scalars of a (possibly nested) JSON array in row-major order, without recursion."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _check_data(key: str, name: str, datatype: str, data: Any, count: int) -> None:
    """`data` holds `count` scalars of `datatype`'s JSON type, in its range: what Triton's parser takes (it
    answered a 500 for a string in FP32 data, 1E400 or an INT8 of 1000). Type checks run in C (map, set, min)."""
    flat = _scalars(data)
    if len(flat) != count:
        raise InvalidRequest(f"TargetModel {key!r}: input {shown(name)} declares {count} elements but its data "
                             f"holds {len(flat)}")
    if not flat:
        return
    types = set(map(type, flat))
    if datatype == BYTES:
        ok = types <= {str}
    elif datatype == "BOOL":
        ok = types <= {bool}
    elif datatype in _FLOATS:
        ok = types <= {int, float} and (float not in types or all(map(math.isfinite, flat)))
        ok = ok and (int not in types or max(map(abs, flat)) < 1 << 64)
    else:
        low, high = _INT_RANGES[datatype]
        ok = types <= {int} and low <= min(flat) and max(flat) <= high
    if not ok:
        raise InvalidRequest(f"TargetModel {key!r}: input {shown(name)}: its data must be {_JSON_TYPE[datatype]} "
                             f"(datatype {datatype})")


_JSON_TYPE = {BYTES: "strings", "BOOL": "true or false", **{t: "finite numbers" for t in _FLOATS},
              **{t: f"integers from {low} to {high}" for t, (low, high) in _INT_RANGES.items()}}


def _check_parameters(key: str, where: str, parameters: Any) -> dict[str, Any]:
    """A `parameters` object: values Triton can read (its own names with their types; others scalars)."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"TargetModel {key!r}: {where}: \"parameters\" must be an object")
    if any(p in parameters for p in _SHARED_MEMORY):
        raise InvalidRequest(f"TargetModel {key!r}: {where}: shared memory is not available through the gateway")
    for name, value in parameters.items():
        if name in _UINT_PARAMETERS:
            ok = type(value) is int and 0 <= value < 1 << 64
        elif name in _BOOL_PARAMETERS:
            ok = type(value) is bool
        else:
            ok = type(value) in (str, bool, int) or (type(value) is float and math.isfinite(value))
            ok = ok and (type(value) is not int or -(1 << 63) <= value < 1 << 64)
        if not ok:
            raise InvalidRequest(f"TargetModel {key!r}: {where}: parameter {shown(name)} has value {shown(value)}, "
                                 "which Triton cannot read")
    return parameters


def _check_name(key: str, what: str, name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise InvalidRequest(f"TargetModel {key!r}: every {what} needs a \"name\", a string of 1 to {MAX_NAME} "
                             f"characters (got {shown(name)})")
    return name


def elements(key: str, name: str, shape: Any) -> int:
    """The element count of a declared shape: at most `MAX_DIMS` non-negative int64 dimensions."""
    if not isinstance(shape, (list, tuple)):
        raise InvalidRequest(f"TargetModel {key!r}: input {shown(name)} has shape {shown(shape)}; expected a list "
                             "of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise InvalidRequest(f"TargetModel {key!r}: input {shown(name)} has a shape of {len(shape)} dimensions; "
                             f"the gateway takes at most {MAX_DIMS}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape):
        raise InvalidRequest(f"TargetModel {key!r}: input {shown(name)} has shape {shown(shape)}; expected a list "
                             "of non-negative integers (int64)")
    return math.prod(shape)


def declared_bytes(key: str, name: str, datatype: Any, count: int) -> int:
    """Bytes `count` elements of `datatype` take at least (BYTES: their length prefixes)."""
    if datatype == BYTES:
        return 4 * count
    width = WIDTHS.get(datatype) if isinstance(datatype, str) else None
    if width is None:
        raise InvalidRequest(f"TargetModel {key!r}: input {shown(name)} has datatype {shown(datatype)}; expected "
                             f"one of {', '.join([*WIDTHS, BYTES])}")
    return width * count


def _parse_header(key: str, text: bytes) -> dict[str, Any]:
    try:
        # decoded here: json's own encoding sniffing costs more
        request = json.loads(text.decode(), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise InvalidRequest(f"TargetModel {key!r}: the request names {shown(exc.args[0])} twice in one object; "
                             "each key may appear once") from None
    except RecursionError:
        raise InvalidRequest(f"TargetModel {key!r}: the request's JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"TargetModel {key!r}: the request is not valid JSON ({shown(str(exc))})") from None
    if not isinstance(request, dict):
        raise InvalidRequest(f"TargetModel {key!r}: the request must be a JSON object with \"inputs\"")
    inputs, outputs = request.get("inputs"), request.get("outputs", [])
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise InvalidRequest(f"TargetModel {key!r}: \"inputs\" must be a non-empty list of input objects")
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidRequest(f"TargetModel {key!r}: \"outputs\" must be a list of output objects")
    if len(inputs) > MAX_TENSORS or len(outputs) > MAX_TENSORS:
        raise InvalidRequest(f"TargetModel {key!r}: a request may name at most {MAX_TENSORS} inputs and "
                             f"{MAX_TENSORS} outputs (it names {len(inputs)} and {len(outputs)})")
    ident = request.get("id", "")
    if not isinstance(ident, str) or len(ident) > MAX_NAME:
        raise InvalidRequest(f"TargetModel {key!r}: \"id\" must be a string of at most {MAX_NAME} characters")
    _check_parameters(key, "the request", request.get("parameters"))
    for output in outputs:
        name = _check_name(key, "output", output.get("name"))
        _check_parameters(key, f"output {shown(name)}", output.get("parameters"))
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


class HttpParts:
    """A KServe v2 HTTP infer request taken apart without parsing: what to forward, and what to check."""

    __slots__ = ("body", "forward", "header", "binary_length")

    def __init__(self, body: Body, forward: dict[str, str], header: bytes, binary_length: int) -> None:
        self.body, self.forward, self.header, self.binary_length = body, forward, header, binary_length


def split_http_request(key: str, body: Body, headers: Mapping[str, str], cap: int) -> HttpParts:
    """The body to forward and the headers to forward with it (inflated: no Content-Encoding), with its JSON
    header and the byte count after it, for `check_header`; `headers` have lower-case names. A body may come as
    the parts it arrived in: only its JSON header is copied out, and the tensor bytes after it are forwarded as
    they came, never joined. Cheap but for inflating a compressed body (see `gateway.request_checks` for doing
    that off the loop)."""
    # No Accept-Encoding: a compressed answer could not have Triton's internal name taken out of it.
    fwd = {k: v for k, v in headers.items() if k in ("content-type", _HEADER_LENGTH)}
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
        if not _LENGTH.fullmatch(length_text.strip()) or int(length_text) > total:
            raise InvalidRequest(f"TargetModel {key!r}: Inference-Header-Content-Length {shown(length_text)} is not "
                                 f"a length within the {total}-byte body")
        header_length = int(length_text)
        fwd[_HEADER_LENGTH] = str(header_length)  # the number checked, not the client's spelling of it
    return HttpParts(body, fwd, _prefix(parts, header_length), total - header_length)


def check_header(key: str, header: bytes, binary_length: int, cap: int) -> None:
    """The JSON header's inputs checked against each other, the cap and the `binary_length` bytes after it.
    Linear in the header's bytes; a plain function of bytes, so it can run in another process."""
    request = _parse_header(key, header)
    binary_total, declared_total = 0, 0
    for tensor in request["inputs"]:
        name = _check_name(key, "input", tensor.get("name"))
        count = elements(key, name, tensor.get("shape"))
        size = declared_bytes(key, name, tensor.get("datatype"), count)
        declared_total += size
        if declared_total > cap:
            raise RequestTooLarge(f"TargetModel {key!r}: the inputs declare more than the gateway's limit of {cap} "
                                  f"bytes (input {shown(name)}: shape {shown(tensor['shape'])})")
        parameters = _check_parameters(key, f"input {shown(name)}", tensor.get("parameters"))
        binary = parameters.get("binary_data_size")
        if binary is not None:
            exact = tensor["datatype"] != BYTES
            if not isinstance(binary, int) or isinstance(binary, bool) or binary < 0 or (
                    binary != size if exact else binary < size):
                raise InvalidRequest(f"TargetModel {key!r}: input {shown(name)}: binary_data_size {shown(binary)} does "
                                     f"not match shape {tensor['shape']} of {tensor['datatype']} ({size} bytes)")
            binary_total += binary
        elif "data" in tensor:
            _check_data(key, name, tensor["datatype"], tensor["data"], count)
        else:
            raise InvalidRequest(f"TargetModel {key!r}: input {shown(name)} has neither \"data\" nor binary data")
    if binary_total != binary_length:
        raise InvalidRequest(f"TargetModel {key!r}: the inputs' binary_data_size add up to {binary_total} bytes "
                             f"but {binary_length} follow the JSON header")


def check_http_request(key: str, body: Body, headers: Mapping[str, str], cap: int) -> tuple[Body, dict[str, str]]:
    """`split_http_request` and `check_header` in one call, on this thread: the body and headers to forward."""
    parts = split_http_request(key, body, {k.lower(): v for k, v in headers.items()}, cap)
    check_header(key, parts.header, parts.binary_length, cap)
    return parts.body, parts.forward


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
    if len(inputs) > MAX_TENSORS or request.outputs > MAX_TENSORS:
        raise InvalidRequest(f"TargetModel {key!r}: a request may name at most {MAX_TENSORS} inputs and "
                             f"{MAX_TENSORS} outputs (it names {len(inputs)} and {request.outputs})")
    if len(request.id) > MAX_NAME:
        raise InvalidRequest(f"TargetModel {key!r}: the request's id is longer than {MAX_NAME} characters")
    raw = request.raw_lengths
    if raw and len(raw) != len(inputs):
        raise InvalidRequest(f"TargetModel {key!r}: {len(raw)} raw_input_contents for {len(inputs)} inputs")
    declared_total = 0
    for position, tensor in enumerate(inputs):
        name, datatype = _check_name(key, "input", tensor.name), tensor.datatype
        if len(tensor.shape) > MAX_DIMS:  # counted before it is copied: it may hold millions
            raise InvalidRequest(f"TargetModel {key!r}: input {shown(name)} has a shape of {len(tensor.shape)} "
                                 f"dimensions; the gateway takes at most {MAX_DIMS}")
        shape = tensor.shape[:]  # a list; twice as fast as list()
        # protobuf dims are int64 already: only a negative one needs `elements` (which says what is wrong)
        count = math.prod(shape) if not shape or min(shape) >= 0 else elements(key, name, shape)
        size = declared_bytes(key, name, datatype, count)
        declared_total += size
        if declared_total > cap:
            raise RequestTooLarge(f"TargetModel {key!r}: the inputs declare more than the gateway's limit of {cap} "
                                  f"bytes (input {shown(name)}: shape {shape})")
        if tensor.parameters and any(p in tensor.parameters for p in _SHARED_MEMORY):
            raise InvalidRequest(f"TargetModel {key!r}: input {shown(name)}: shared memory is not available through "
                                 "the gateway")
        if raw:
            got = raw[position]
            if got != size if datatype != BYTES else got < size:
                raise InvalidRequest(f"TargetModel {key!r}: input {shown(name)} declares shape {shape} of "
                                     f"{datatype} ({size} bytes) but carries {got}")
            continue
        field = _CONTENTS.get(datatype)
        found = len(getattr(tensor.contents, field)) if field else 0
        if found != count:
            raise InvalidRequest(f"TargetModel {key!r}: input {shown(name)} declares shape {shape} "
                                 f"({count} elements) but its contents hold {found}")
