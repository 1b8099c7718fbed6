"""Clients know models by TargetModel, Triton by its internal names: every answer is renamed on the way out."""

import json

from gateway.dataplane import rename_json, rename_text, restore_model_name
from gateway.triton.http import Forwarded


def test_json_answers_get_the_target_model_back() -> None:
    body = b'{"model_name":"Houston_TX-1a2b3c4d","model_version":"1","outputs":[]}'
    out = restore_model_name(Forwarded(200, {"content-type": "application/json"}, body),
                             "Houston_TX-1a2b3c4d", 'cities/"Houston".tar.gz')
    assert json.loads(out.body)["model_name"] == 'cities/"Houston".tar.gz'
    assert out.headers == {"content-type": "application/json"}


def test_binary_answers_keep_their_tensors_and_get_a_new_header_length() -> None:
    header = b'{"model_name":"m-1","outputs":[{"name":"y","parameters":{"binary_data_size":4}}]}'
    tensor = b"\x00\x01\x02\x03"
    answer = Forwarded(200, {"inference-header-content-length": str(len(header))}, header + tensor)
    out = restore_model_name(answer, "m-1", "a/b.tar.gz")
    n = int(out.headers["inference-header-content-length"])
    assert json.loads(out.body[:n])["model_name"] == "a/b.tar.gz"
    assert out.body[n:] == tensor


def test_compressed_answers_pass_through() -> None:
    answer = Forwarded(200, {"content-encoding": "gzip"}, b"\x1f\x8b...")
    assert restore_model_name(answer, "m-1", "k") is answer


def test_error_answers_name_the_target_model_everywhere() -> None:
    body = b'{"error":"unexpected inference input \'x\' for model \'cities--houston-1a2b\'"}'
    out = restore_model_name(Forwarded(400, {"content-type": "application/json"}, body), "cities--houston-1a2b",
                             "cities/Houston_TX.tar.gz")
    assert b"cities--houston-1a2b" not in out.body and b"cities/Houston_TX.tar.gz" in out.body


def test_resources_and_messages_are_renamed() -> None:
    config = {"name": "m-1", "input": [{"name": "features"}], "ensemble": {"step": [{"model_name": "m-1"}]}}
    assert rename_json(config, "m-1", "k.tar.gz")["name"] == "k.tar.gz"
    assert rename_json(config, "m-1", "k.tar.gz")["input"][0]["name"] == "features"
    assert rename_text("model 'm-1' and 'm-2' failed", {"m-1": "a", "m-2": "b"}) == "model 'a' and 'b' failed"


def test_protobuf_answers_are_renamed_in_every_string_field() -> None:
    from tritonclient.grpc import service_pb2 as pb

    from gateway.dataplane import rename_message

    answer = pb.ModelConfigResponse()
    answer.config.name = "m-1"
    answer.config.instance_group.add(name="m-1_0", count=1)
    answer.config.input.add(name="features")
    answer.config.parameters["note"].string_value = "served by m-1"
    rename_message(answer, "m-1", "a/b.tar.gz")
    assert answer.config.name == "a/b.tar.gz" and answer.config.instance_group[0].name == "a/b.tar.gz_0"
    assert answer.config.input[0].name == "features"
    assert answer.config.parameters["note"].string_value == "served by a/b.tar.gz"
