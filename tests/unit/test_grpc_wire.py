"""`gateway.grpc_wire` against upb, the parser Triton's clients use: a renamed message parses to the original
with only `model_name` changed, whatever the field order, repeats and unknown fields; every other field is
forwarded byte for byte; the scan reads what upb reads without copying tensors; what upb refuses is refused."""

from __future__ import annotations

import random
import tracemalloc
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from gateway.grpc_wire import (
    WireError,
    fields,
    name_field,
    rename,
    rename_stream_response,
    renamed,
    scan_request,
    varint,
)

SEED = 20240614
DATATYPES = ["BOOL", "UINT8", "INT8", "UINT16", "INT16", "FP16", "BF16", "UINT32", "INT32", "FP32", "UINT64",
             "INT64", "FP64", "BYTES"]
# Some of every UTF-8 width: ASCII, Latin-1, CJK, outside the BMP; '/' and '.' as in store keys.
ALPHABET = "abcXYZ019_-./ ~éßøЖ中文字🙂𝄞"


def text(rng: random.Random, longest: int = 40) -> str:
    # Lengths past 127 bytes take a two-byte length prefix: both encodings are exercised.
    n = rng.choice([0, 1, rng.randint(2, longest), rng.randint(100, 300)]) if longest > 1 else 0
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def fill_parameters(rng: random.Random, parameters: Any) -> None:
    """A map<string, InferParameter> with each oneof kind (and sometimes none: an empty parameter)."""
    for _ in range(rng.randint(0, 5)):
        param = parameters[text(rng, 12)]
        kind = rng.randrange(6)
        if kind == 0:
            param.bool_param = rng.random() < 0.5
        elif kind == 1:
            param.int64_param = rng.randint(-(1 << 63), (1 << 63) - 1)
        elif kind == 2:
            param.string_param = text(rng)
        elif kind == 3:
            param.double_param = rng.uniform(-1e300, 1e300)
        elif kind == 4:
            param.uint64_param = rng.randint(0, (1 << 64) - 1)


def fill_contents(rng: random.Random, contents: Any) -> None:
    """Typed contents of every kind (a real request would use one; the wire does not care)."""
    n = rng.randint(0, 6)
    contents.bool_contents.extend(rng.random() < 0.5 for _ in range(n))
    contents.int_contents.extend(rng.randint(-(1 << 31), (1 << 31) - 1) for _ in range(n))
    contents.int64_contents.extend(rng.randint(-(1 << 63), (1 << 63) - 1) for _ in range(n))
    contents.uint_contents.extend(rng.randint(0, (1 << 32) - 1) for _ in range(n))
    contents.uint64_contents.extend(rng.randint(0, (1 << 64) - 1) for _ in range(n))
    contents.fp32_contents.extend(float(rng.randint(-1000, 1000)) / 8 for _ in range(n))
    contents.fp64_contents.extend(rng.uniform(-1e10, 1e10) for _ in range(n))
    contents.bytes_contents.extend(rng.randbytes(rng.randint(0, 20)) for _ in range(n))


def random_request(rng: random.Random) -> pb.ModelInferRequest:
    """A ModelInferRequest with every field populated (strings may come out empty: proto3 then omits them)."""
    request = pb.ModelInferRequest(model_name=text(rng), model_version=text(rng, 4), id=text(rng))
    fill_parameters(rng, request.parameters)
    for _ in range(rng.randint(1, 4)):
        tensor = request.inputs.add(name=text(rng, 16), datatype=rng.choice(DATATYPES),
                                    shape=[rng.randint(-1, 1 << 40) for _ in range(rng.randint(0, 4))])
        fill_parameters(rng, tensor.parameters)
        fill_contents(rng, tensor.contents)
        request.raw_input_contents.append(rng.randbytes(rng.choice([0, 1, 24, 127, 128, rng.randint(0, 70_000)])))
    for _ in range(rng.randint(0, 3)):
        fill_parameters(rng, request.outputs.add(name=text(rng, 16)).parameters)
    return request


def random_response(rng: random.Random) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=text(rng), model_version=text(rng, 4), id=text(rng))
    fill_parameters(rng, response.parameters)
    for _ in range(rng.randint(0, 3)):
        tensor = response.outputs.add(name=text(rng, 16), datatype=rng.choice(DATATYPES),
                                      shape=[rng.randint(0, 1 << 20) for _ in range(rng.randint(0, 3))])
        fill_parameters(rng, tensor.parameters)
        fill_contents(rng, tensor.contents)
        response.raw_output_contents.append(rng.randbytes(rng.choice([0, 4, rng.randint(0, 50_000)])))
    return response


def encoded_fields(message: Any) -> list[tuple[int, bytes]]:
    """Each field (each element of a repeated field, each map entry) of `message` encoded alone, in order,
    with its field number: the pieces a hand-made message is concatenated from."""
    out: list[tuple[int, bytes]] = []
    cls = type(message)
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key in value:
                single = cls()
                getattr(single, field.name)[key].CopyFrom(value[key])
                out.append((field.number, single.SerializeToString()))
        elif field.label == field.LABEL_REPEATED:
            for item in value:
                single = cls()
                if field.message_type is not None:
                    getattr(single, field.name).add().CopyFrom(item)
                else:
                    getattr(single, field.name).append(item)
                out.append((field.number, single.SerializeToString()))
        else:
            single = cls()
            if field.message_type is not None:
                getattr(single, field.name).CopyFrom(value)
            else:
                setattr(single, field.name, value)
            out.append((field.number, single.SerializeToString()))
    return out


def interleaved(rng: random.Random, pieces: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The pieces in a random order that keeps each field's own elements in order (the order of a repeated
    field is part of the message; the order between fields is not)."""
    queues: dict[int, list[tuple[int, bytes]]] = {}
    for piece in pieces:
        queues.setdefault(piece[0], []).append(piece)
    out = []
    while queues:
        number = rng.choice(sorted(queues))
        out.append(queues[number].pop(0))
        if not queues[number]:
            del queues[number]
    return out


def others(raw: bytes) -> list[bytes]:
    """Every field but field 1 (length-delimited), as the bytes on the wire, in order."""
    return [bytes(raw[start:stop]) for tag, start, _, stop in fields(raw) if tag != 0x0A]


def name_count(raw: bytes) -> int:
    return sum(1 for tag, *_ in fields(raw) if tag == 0x0A)


def assert_renamed(raw: bytes, cls: Any, new_name: str) -> bytes:
    """Rename `raw` and check it against upb: the old name is the one a parser reads, the new message parses
    to the old one with only the name changed, it has exactly one name field, and every other field is
    forwarded byte for byte in its order."""
    original = cls.FromString(raw)
    old, out = rename(raw, new_name)
    assert old == original.model_name
    parsed = cls.FromString(out)
    assert parsed.model_name == new_name
    parsed.model_name = original.model_name
    assert parsed == original
    assert name_count(out) == 1
    assert others(out) == others(raw)
    view_old, view_out = rename(memoryview(raw), new_name)
    assert (view_old, view_out) == (old, out)
    return out


# -- renaming ---------------------------------------------------------------------------------------------


def test_random_requests_with_every_field_rename_exactly_and_scan_as_upb_reads() -> None:
    rng = random.Random(SEED)
    for _ in range(300):
        request = random_request(rng)
        raw = request.SerializeToString()
        new_name = text(rng)
        out = assert_renamed(raw, pb.ModelInferRequest, new_name)
        scan = scan_request(raw)
        assert (scan.model_name, scan.model_version, scan.id) == (request.model_name, request.model_version,
                                                                   request.id)
        assert list(scan.inputs) == list(request.inputs)
        assert [(t.name, t.datatype, list(t.shape)) for t in scan.inputs] == \
            [(t.name, t.datatype, list(t.shape)) for t in request.inputs]
        assert scan.raw_lengths == [len(r) for r in request.raw_input_contents]
        assert renamed(raw, scan, new_name) == out
        assert renamed(memoryview(raw), scan_request(memoryview(raw)), new_name) == out


def test_fields_in_any_order_rename_and_scan_alike() -> None:
    rng = random.Random(SEED + 1)
    for _ in range(200):
        request = random_request(rng)
        raw = b"".join(piece for _, piece in interleaved(rng, encoded_fields(request)))
        assert pb.ModelInferRequest.FromString(raw) == request  # the hand-made message is the same message
        assert_renamed(raw, pb.ModelInferRequest, text(rng))
        scan = scan_request(raw)
        assert scan.model_name == request.model_name and list(scan.inputs) == list(request.inputs)
        assert scan.raw_lengths == [len(r) for r in request.raw_input_contents]


def test_a_repeated_name_keeps_the_last_and_comes_out_once() -> None:
    request = pb.ModelInferRequest(model_name="first", id="x")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 6])
    request.raw_input_contents.append(bytes(24))
    raw = request.SerializeToString() + name_field("second") + pb.ModelInferRequest(id="y").SerializeToString() \
        + name_field("third")
    assert pb.ModelInferRequest.FromString(raw).model_name == "third"
    assert scan_request(raw).model_name == "third"
    out = assert_renamed(raw, pb.ModelInferRequest, "internal_name")
    assert out.startswith(name_field("internal_name"))  # where the first one was
    assert scan_request(raw).name_spans[::2] == [0, len(request.SerializeToString()),
                                                 len(raw) - len(name_field("third"))]


def test_an_absent_name_is_empty_and_the_new_one_goes_first() -> None:
    request = pb.ModelInferRequest(id="no name")
    request.inputs.add(name="x", datatype="INT32", shape=[2]).contents.int_contents.extend([1, 2])
    raw = request.SerializeToString()
    assert name_count(raw) == 0
    out = assert_renamed(raw, pb.ModelInferRequest, "m")
    assert out == name_field("m") + raw
    assert scan_request(raw).model_name == "" and renamed(raw, scan_request(raw), "m") == out


def test_an_empty_new_name_parses_as_empty() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    raw = request.SerializeToString()
    out = assert_renamed(raw, pb.ModelInferRequest, "")
    assert out.startswith(b"\x0a\x00")
    assert rename(b"", "")[1] == b"\x0a\x00" and rename(b"", "n") == ("", b"\x0a\x01n")


def test_unknown_fields_are_kept_byte_for_byte() -> None:
    unknown = [
        b"\x78\x96\x01",  # field 15, varint 150
        b"\x81\x01" + bytes(range(8)),  # field 16 (a two-byte tag), fixed64
        b"\xa2\x06\x03abc",  # field 100, length-delimited
        b"\x08\xff\xff\xff\xff\x0f",  # field 1 as a varint: not model_name, an unknown field to a parser
        b"\x15\x01\x02\x03\x04",  # field 2 as fixed32: likewise
        b"\x8a\x00\x02zz",  # field 1 with an overlong tag: model_name all the same
    ]
    request = pb.ModelInferRequest(model_name="orig", model_version="1")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(bytes(4))
    raw = unknown[0] + request.SerializeToString() + b"".join(unknown[1:])
    parsed = pb.ModelInferRequest.FromString(raw)
    assert parsed.model_name == "zz"  # the overlong tag is field 1, and the last one
    out = assert_renamed(raw, pb.ModelInferRequest, "renamed")
    for piece in unknown[:-1]:
        assert piece in out
    assert b"\x8a\x00" not in out
    assert scan_request(raw).model_name == "zz" and scan_request(raw).model_version == "1"
    assert renamed(raw, scan_request(raw), "renamed") == out


def test_responses_with_raw_outputs_rename_exactly() -> None:
    rng = random.Random(SEED + 2)
    for _ in range(200):
        response = random_response(rng)
        raw = response.SerializeToString()
        assert_renamed(raw, pb.ModelInferResponse, text(rng))
        shuffled = b"".join(piece for _, piece in interleaved(rng, encoded_fields(response)))
        assert_renamed(shuffled, pb.ModelInferResponse, text(rng))


# -- streams ----------------------------------------------------------------------------------------------


def test_stream_answers_are_renamed_inside_and_errors_given_to_the_caller() -> None:
    names = {"m_123": "cities/Houston_TX.tar.gz"}
    seen: list[str] = []

    def error(message: str) -> str:
        seen.append(message)
        return message.replace("m_123", names["m_123"])

    inner = pb.ModelInferResponse(model_name="m_123", id="7")
    inner.outputs.add(name="price", datatype="FP32", shape=[1, 1])
    inner.raw_output_contents.append(bytes(range(4)))
    ok = pb.ModelStreamInferResponse(infer_response=inner)
    out = pb.ModelStreamInferResponse.FromString(rename_stream_response(ok.SerializeToString(), names, error))
    expected = pb.ModelStreamInferResponse()
    expected.CopyFrom(ok)
    expected.infer_response.model_name = "cities/Houston_TX.tar.gz"
    assert out == expected and seen == []  # no error message: the callback is not called

    failed = pb.ModelStreamInferResponse(error_message="model m_123 failed", infer_response=inner)
    raw = rename_stream_response(failed.SerializeToString(), names, error)
    out = pb.ModelStreamInferResponse.FromString(raw)
    assert out.error_message == "model cities/Houston_TX.tar.gz failed" and seen == ["model m_123 failed"]
    assert out.infer_response == expected.infer_response
    assert sum(1 for tag, *_ in fields(raw) if tag == 0x0A) == 1

    unknown = pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(model_name="other", id="1"))
    out = pb.ModelStreamInferResponse.FromString(rename_stream_response(unknown.SerializeToString(), names, error))
    assert out == unknown  # a name the stream did not lease is kept

    only_error = pb.ModelStreamInferResponse(error_message="m_123 went away")
    raw = rename_stream_response(memoryview(only_error.SerializeToString()), names, error)
    assert pb.ModelStreamInferResponse.FromString(raw) == pb.ModelStreamInferResponse(
        error_message="cities/Houston_TX.tar.gz went away")
    assert rename_stream_response(b"", names, error) == b""


def test_stream_answers_keep_protobuf_semantics_for_repeats() -> None:
    names = {"a": "A", "b": "B"}
    first = pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(model_name="a", id="1"))
    second = pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(model_name="b"))
    second.infer_response.raw_output_contents.append(b"\x01\x02")
    errors = pb.ModelStreamInferResponse(error_message="e1").SerializeToString() + b"\x0a\x00"  # last one: ""
    raw = first.SerializeToString() + errors + second.SerializeToString() + b"\x78\x05"  # and an unknown field
    original = pb.ModelStreamInferResponse.FromString(raw)  # merged: id "1", name "b", one raw output
    assert original.error_message == "" and original.infer_response.model_name == "b"
    out = pb.ModelStreamInferResponse.FromString(rename_stream_response(raw, names, lambda m: pytest.fail(m)))
    original.infer_response.model_name = "B"
    assert out == original


# -- scanning without copying -----------------------------------------------------------------------------


def test_a_large_raw_input_is_measured_not_copied_and_forwarded_whole() -> None:
    tensor = random.Random(SEED).randbytes(16 << 20)
    request = pb.ModelInferRequest(model_name="cities/Houston_TX.tar.gz", id="big")
    request.inputs.add(name="features", datatype="FP32", shape=[4096, 1024])
    request.outputs.add(name="price")
    request.raw_input_contents.append(tensor)
    raw = request.SerializeToString()
    del request
    view = memoryview(raw)

    tracemalloc.start()
    try:
        scan = scan_request(view)
        _, scan_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = renamed(view, scan, "m_internal")
        _, rename_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scan.raw_lengths == [16 << 20] and scan.id == "big"
    assert not any(isinstance(getattr(scan, slot), (bytes, bytearray, memoryview)) for slot in scan.__slots__)
    assert scan_peak < 64 << 10, scan_peak  # the scan held no tensor bytes
    assert rename_peak < len(raw) + (1 << 20), rename_peak  # one copy: the output itself
    assert out[-len(tensor):] == tensor
    parsed = pb.ModelInferRequest.FromString(out)
    assert parsed.model_name == "m_internal" and parsed.raw_input_contents[0] == tensor


def test_varints_and_fields_give_offsets() -> None:
    assert varint(b"\x96\x01", 0) == (150, 2)
    assert varint(b"\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 1) == ((1 << 64) - 1, 11)
    raw = b"\x0a\x01m" + b"\x3a\x80\x01" + bytes(128) + b"\x09" + bytes(8)
    assert list(fields(raw)) == [(0x0A, 0, 2, 3), (0x3A, 3, 6, 134), (0x09, 134, 135, 143)]


# -- malformed messages -----------------------------------------------------------------------------------

MALFORMED = {
    "truncated varint": b"\x0a\xff",
    "truncated tag": b"\x0a\x01m\x80",
    "length past the end": b"\x0a\x05ab",
    "huge length": b"\x3a\xff\xff\xff\xff\x0f",
    "start group": b"\x0b",
    "end group": b"\x0c",
    "wire type 6": b"\x0e",
    "wire type 7": b"\x0f",
    "field number 0": b"\x02\x00",
    "field 0 varint": b"\x00",
    "truncated fixed64": b"\x09\x00\x00",
    "truncated fixed32": b"\x0a\x00\x15\x00",
    "varint over 10 bytes": b"\x08" + b"\xff" * 10 + b"\x01",
    "tag past 32 bits": b"\xff\xff\xff\xff\x7f\x00",
    "name not UTF-8": b"\x0a\x01\xff",
}
SCAN_ONLY = {  # the scan reads these fields too; a rename forwards them for Triton to judge
    "input not a message": b"\x2a\x02\x0a\x05",
    "version not UTF-8": b"\x12\x01\xff",
    "id not UTF-8": b"\x1a\x02\xc3\x28",
}


@pytest.mark.parametrize("raw", [*MALFORMED.values(), *SCAN_ONLY.values()], ids=[*MALFORMED, *SCAN_ONLY])
def test_what_upb_refuses_is_refused(raw: bytes) -> None:
    with pytest.raises(DecodeError):  # the parser Triton's clients use agrees: it is malformed
        pb.ModelInferRequest.FromString(raw)
    with pytest.raises(WireError):
        scan_request(raw)
    if raw in SCAN_ONLY.values():
        assert rename(raw, "x") == ("", name_field("x") + raw)
        return
    with pytest.raises(WireError):
        rename(raw, "x")
    with pytest.raises(WireError):
        rename_stream_response(raw, {}, str)


def test_a_malformed_nested_answer_is_refused() -> None:
    with pytest.raises(WireError):
        rename_stream_response(b"\x12\x02\x0a\x05", {}, str)  # infer_response whose name runs past its end
