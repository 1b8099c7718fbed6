import json

from gateway.api.forward import restore_model_name
from gateway.proxy import Forwarded


def test_json_answers_get_the_target_model_back() -> None:
    body = b'{"model_name":"Houston_TX-1a2b3c4d","model_version":"1","outputs":[]}'
    out, headers = restore_model_name(Forwarded(200, {"content-type": "application/json"}, body),
                                      "Houston_TX-1a2b3c4d", 'cities/"Houston".tar.gz')
    assert json.loads(out)["model_name"] == 'cities/"Houston".tar.gz'
    assert headers == {"content-type": "application/json"}


def test_binary_answers_keep_their_tensors_and_get_a_new_header_length() -> None:
    header = b'{"model_name":"m-1","outputs":[{"name":"y","parameters":{"binary_data_size":4}}]}'
    tensor = b"\x00\x01\x02\x03"
    answer = Forwarded(200, {"inference-header-content-length": str(len(header))}, header + tensor)
    out, headers = restore_model_name(answer, "m-1", "a/b.tar.gz")
    n = int(headers["inference-header-content-length"])
    assert json.loads(out[:n])["model_name"] == "a/b.tar.gz"
    assert out[n:] == tensor


def test_compressed_answers_pass_through() -> None:
    answer = Forwarded(200, {"content-encoding": "gzip"}, b"\x1f\x8b...")
    assert restore_model_name(answer, "m-1", "k") == (answer.body, answer.headers)
