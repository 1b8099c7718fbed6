"""KServe v2 gRPC messages read and edited in the protobuf wire format, so tensors pass through as bytes.

The gateway needs three things from a ModelInfer message: the model name (to lease the model and to put the
client's TargetModel back in the answer), the declared inputs and the raw tensor lengths (to refuse a request
that would make Triton allocate gigabytes, `gateway.infer_limits`). Parsing the whole message with upb and
serializing it again for that copied every tensor twice each way and cost microseconds per request; here the
top-level fields are walked by offset instead: a tensor (`raw_input_contents`, `raw_output_contents`) is
skipped by its length and never sliced, and a renamed message is built by one `b"".join` of untouched spans
of the original around the new `model_name` field.

The edits are exact under protobuf semantics, which a parser applies to the whole message:

- fields may come in any order and a string field may repeat (the last one wins): a rename drops every
  `model_name` field and writes exactly one holding the new name, where the first one was (at the front
  when there was none);
- unknown fields are forwarded byte for byte, and so is a field 1 of another wire type, which a parser
  keeps as an unknown field too;
- an embedded message that repeats is merged by a parser, so in a ModelStreamInferResponse each
  `infer_response` is renamed in place: the merged message gets the last name renamed, as a parsed rename
  would.

What a parser would refuse is refused here with `WireError` (a truncated varint or field, a length past the
end, field number 0, a tag past 32 bits, wire types 3/4 (groups, never in KServe messages) and 6/7, a
name that is not UTF-8); the edge answers INVALID_ARGUMENT "malformed ModelInferRequest: ...". Nested
messages other than the inputs are not validated: Triton parses them and answers for them.

Field numbers (`grpc_service.proto`): ModelInferRequest model_name=1, model_version=2, id=3, parameters=4,
inputs=5, outputs=6, raw_input_contents=7; ModelInferResponse model_name=1, ..., raw_output_contents=6;
ModelStreamInferResponse error_message=1, infer_response=2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeAlias

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

Buffer: TypeAlias = bytes | bytearray | memoryview  # a memoryview must be of bytes (format "B", one dimension)
InferInput: TypeAlias = pb.ModelInferRequest.InferInputTensor  # one input's declaration, parsed by upb
_OUTPUT = pb.ModelInferRequest.InferRequestedOutputTensor
_PARAMETER = pb.ModelInferRequest.ParametersEntry

# Tags (field number << 3 | 2, the length-delimited wire type) of the fields read here; each is one byte.
# The loops that run on every message compare with the literals: a module global costs a lookup per field.
MODEL_NAME = 0x0A  # ModelInferRequest and ModelInferResponse field 1
MODEL_VERSION = 0x12  # field 2
ID = 0x1A  # field 3
INPUTS = 0x2A  # ModelInferRequest field 5
RAW_INPUT_CONTENTS = 0x3A  # ModelInferRequest field 7
ERROR_MESSAGE = 0x0A  # ModelStreamInferResponse field 1
INFER_RESPONSE = 0x12  # ModelStreamInferResponse field 2
_MAX_TAG = 0xFFFFFFFF  # field numbers are at most 2**29 - 1: a tag fits in 32 bits


MAX_FIELDS = 1 << 16  # top-level fields of one request: far more than any model's inputs, outputs, parameters


class WireError(ValueError):
    """The bytes are not a message a protobuf parser would accept."""


class OverBudget(Exception):
    """Reading this message would take more than the caller's budget: read it where time is not shared."""


# -- reading ------------------------------------------------------------------------------------------------


def varint(buf: Buffer, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it (at most 10 bytes, as protobuf allows)."""
    value = shift = 0
    end = len(buf)
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")
    raise WireError("truncated varint")


def _tag(buf: Buffer, pos: int) -> tuple[int, int]:
    """A tag of more than one byte (field number 16 and up, or an overlong encoding), checked."""
    tag, pos = varint(buf, pos)
    if tag > _MAX_TAG:
        raise WireError(f"tag {tag} is past 32 bits")
    if tag < 8:
        raise WireError("field number 0")
    return tag, pos


def _skip(buf: Buffer, pos: int, end: int, tag: int) -> int:
    """The position after the value of a field that is not length-delimited (whose tag ended at `pos`)."""
    wire = tag & 7
    if wire == 0:
        return varint(buf, pos)[1]
    if wire == 1:
        pos += 8
    elif wire == 5:
        pos += 4
    else:
        raise WireError(f"field {tag >> 3} has wire type {wire}, which KServe messages never use")
    if pos > end:
        raise WireError(f"field {tag >> 3} is truncated")
    return pos


def fields(buf: Buffer) -> Iterator[tuple[int, int, int, int]]:
    """Each top-level field as (tag, start, value start, end): `buf[start:end]` is the whole field, and for a
    length-delimited one `buf[value start:end]` is its payload (for others, its encoded value). Offsets only:
    nothing is copied. The one walk of a message: the scan, the renames and the router read through it."""
    pos, end = 0, len(buf)
    try:
        while pos < end:
            start = pos
            tag = buf[pos]
            pos += 1
            if tag >= 0x80:
                tag, pos = _tag(buf, start)
            elif tag < 8:
                raise WireError("field number 0")
            if tag & 7 == 2:  # length-delimited
                size = buf[pos]
                pos += 1
                if size >= 0x80:
                    size, pos = varint(buf, pos - 1)
                stop = pos + size
                if stop > end:
                    raise WireError(f"field {tag >> 3} is {size} bytes long, past the end of the message")
            else:
                stop = _skip(buf, pos, end, tag)
            yield tag, start, pos, stop
            pos = stop
    except IndexError:  # a tag or length byte past the end
        raise WireError("truncated message") from None


def _text(buf: Buffer, start: int, stop: int, what: str) -> str:
    try:
        return str(buf[start:stop], "utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def string_field(buf: Buffer, number: int) -> str:
    """The string a parser reads from field `number` of a message: the last occurrence wins, "" when absent.
    For the router, which routes by the model a request names without parsing it."""
    found = ""
    for tag, _, start, stop in fields(buf):
        if tag == (number << 3) | 2:
            found = _text(buf, start, stop, f"field {number}")
    return found


def _name_fields(buf: Buffer) -> tuple[list[int], int, int]:
    """Every field 1 (length-delimited) as flat [start, end, start, end, ...], and the value span of the
    last one (the one a parser keeps)."""
    spans: list[int] = []
    value_start = value_stop = 0
    for tag, start, value_start_, stop in fields(buf):
        if tag == 0x0A:  # MODEL_NAME
            spans += (start, stop)
            value_start, value_stop = value_start_, stop
    return spans, value_start, value_stop


class RequestScan:
    """What one pass over a ModelInferRequest found: the strings the gateway reads, the inputs (parsed: they
    are small), the length of each raw input (never the bytes), and where `model_name` sits for `renamed`."""

    __slots__ = ("model_name", "model_version", "id", "inputs", "raw_lengths", "name_spans", "outputs")

    def __init__(self, model_name: str, model_version: str, id: str, inputs: list[InferInput],
                 raw_lengths: list[int], name_spans: list[int], outputs: int = 0) -> None:
        self.outputs = outputs  # how many requested outputs it names
        self.model_name = model_name
        self.model_version = model_version
        self.id = id
        self.inputs = inputs
        self.raw_lengths = raw_lengths
        self.name_spans = name_spans


def scan_request(buf: Buffer, budget: int | None = None) -> RequestScan:
    """Read a serialized ModelInferRequest in one pass without copying its tensors (see `RequestScan`).

    Work is linear in the bytes read: at most `MAX_FIELDS` fields (WireError past it), each parsed field's
    bytes (everything but raw tensors, which are only measured). With a `budget`, OverBudget is raised as
    soon as those bytes plus 64 per field pass it, so an event loop reads only small messages itself."""
    spans: list[int] = []
    inputs: list[InferInput] = []
    lengths: list[int] = []
    name = version = ident = ""
    tag = count = cost = outputs = 0
    try:
        for tag, start, pos, stop in fields(buf):
            count += 1
            cost += 64 if tag == 0x3A else 64 + stop - pos
            if budget is not None and cost > budget:
                raise OverBudget()
            if count > MAX_FIELDS:
                raise WireError(f"more than {MAX_FIELDS} fields")
            if tag == 0x3A:  # RAW_INPUT_CONTENTS: measured, never sliced
                lengths.append(stop - pos)
            elif tag == 0x2A:  # INPUTS
                try:
                    inputs.append(InferInput.FromString(buf[pos:stop]))
                except DecodeError:
                    raise WireError(f"input {len(inputs)} is not an InferInputTensor") from None
            elif tag == 0x32 or tag == 0x22:  # OUTPUTS, PARAMETERS: parsed (small) only to be refused here if
                try:                            # malformed: Triton answered INTERNAL for what a client sent
                    (_OUTPUT if tag == 0x32 else _PARAMETER).FromString(buf[pos:stop])
                except DecodeError:
                    raise WireError(f"field {tag >> 3} is not a valid "
                                    f"{'InferRequestedOutputTensor' if tag == 0x32 else 'parameter'}") from None
                outputs += tag == 0x32
            elif tag == 0x0A:  # MODEL_NAME
                spans += (start, stop)
                name = str(buf[pos:stop], "utf-8")
            elif tag == 0x12:  # MODEL_VERSION
                version = str(buf[pos:stop], "utf-8")
            elif tag == 0x1A:  # ID
                ident = str(buf[pos:stop], "utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"field {tag >> 3} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return RequestScan(name, version, ident, inputs, lengths, spans, outputs)


# -- editing ------------------------------------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SHORT = [bytes((0x0A, n)) for n in range(0x80)]  # tag and length of a field 1 under 128 bytes


def name_field(text: str) -> bytes:
    """Field 1 (`model_name`, or `error_message` in a ModelStreamInferResponse) holding `text`. Written even
    for "": the message then has exactly one field 1, whatever it held before."""
    data = text.encode()
    if len(data) < 0x80:
        return _SHORT[len(data)] + data
    return b"\x0a" + encode_varint(len(data)) + data


def _replaced(buf: Buffer, spans: list[int], field: bytes) -> list[Buffer]:
    """The pieces of `buf` with the fields at `spans` dropped and `field` where the first one was (at the
    front when there was none): slices of a memoryview, so joining them is the only copy."""
    if not spans:
        return [field, buf]
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    first = spans[0]
    pieces: list[Buffer] = [view[:first], field] if first else [field]
    for i in range(1, len(spans) - 1, 2):
        if spans[i] != spans[i + 1]:
            pieces.append(view[spans[i]:spans[i + 1]])
    if spans[-1] != len(buf):
        pieces.append(view[spans[-1]:])
    return pieces


def _with_name(buf: Buffer, spans: list[int], new_name: str) -> bytes:
    field = name_field(new_name)
    if len(spans) == 2 and not spans[0]:  # what tritonclient and Triton send: one name, first
        return b"".join((field, memoryview(buf)[spans[1]:]))
    return b"".join(_replaced(buf, spans, field))


def renamed(buf: Buffer, scan: RequestScan, new_name: str) -> bytes:
    """The request `scan` was made of, with `model_name` set to `new_name` (no second walk)."""
    return _with_name(buf, scan.name_spans, new_name)


def rename(buf: Buffer, new_name: str) -> tuple[str, bytes]:
    """The `model_name` of a serialized ModelInferRequest or ModelInferResponse ("" when absent) and the
    message with it set to `new_name`; every other byte is forwarded as it was, copied once."""
    spans, start, stop = _name_fields(buf)
    return _text(buf, start, stop, "model_name"), _with_name(buf, spans, new_name)


def stream_response_model(buf: Buffer) -> str:
    """The `infer_response.model_name` of a serialized ModelStreamInferResponse ("" when it has none)."""
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    name = ""
    for tag, _, value, stop in fields(view):
        if tag == INFER_RESPONSE:  # the last one wins, as for a parser (repeated ones are merged)
            inner = view[value:stop]
            spans, name_start, name_stop = _name_fields(inner)
            if spans:
                name = _text(inner, name_start, name_stop, "model_name")
    return name


def rename_stream_response(buf: Buffer, names: Mapping[str, str], error: Callable[[str], str]) -> bytes:
    """A serialized ModelStreamInferResponse with its `infer_response.model_name` mapped through `names` (a
    name not in it is kept) and its `error_message`, when there is one, replaced by `error(message)`: the
    caller renames and redacts it. Decoded only when present; copied once."""
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    pieces: list[Buffer] = []
    message: tuple[int, int] | None = None
    kept = 0  # where the part of `buf` not yet in `pieces` starts
    for tag, start, value, stop in fields(view):
        if tag == ERROR_MESSAGE:  # dropped here, written once at the front
            message = (value, stop)
            pieces.append(view[kept:start])
            kept = stop
        elif tag == INFER_RESPONSE:  # renamed where it is (a repeated one is merged by a parser)
            inner = view[value:stop]
            spans, name_start, name_stop = _name_fields(inner)
            if not spans:
                continue
            old = _text(inner, name_start, name_stop, "model_name")
            inner_pieces = _replaced(inner, spans, name_field(names.get(old, old)))
            size = sum(len(p) for p in inner_pieces)
            pieces += (view[kept:start], bytes((INFER_RESPONSE,)), encode_varint(size), *inner_pieces)
            kept = stop
    pieces.append(view[kept:])
    head = b""
    if message is not None:
        text = _text(view, *message, "error_message")
        if text:  # "" is proto3's absent: nothing to write
            head = name_field(error(text))
    return b"".join([head, *pieces])
