"""What the router reads from requests and instances: TargetModels from paths, headers and protobuf bytes,
instance lists, listings and free memory, and its settings."""

from __future__ import annotations

import argparse

import pytest
from tritonclient.grpc import service_pb2 as pb

from gateway.api.fastpath import parse_infer_path
from gateway.router.discovery import Endpoint, parse_static
from gateway.router.grpc import model_field
from gateway.router.health import free_memory, held_models
from gateway.router.http import target_model
from gateway.router.settings import add_router_arguments, router_settings_from_args


@pytest.mark.parametrize(("path", "model", "verb"), [
    ("/v2/models/cities/Houston_TX.tar.gz/infer", "cities/Houston_TX.tar.gz", "/infer"),
    ("/v2/models/m.tar.gz/versions/1/infer", "m.tar.gz", "/infer"),
    ("/v2/models/m.tar.gz", "m.tar.gz", ""),
    ("/v2/models/a/b.tar.gz/config", "a/b.tar.gz", "/config"),
    ("/v2/repository/models/m.tar.gz/unload", "m.tar.gz", "/unload"),
    ("/v2/repository/index", None, ""),
    ("/v2", None, ""),
])
def test_target_model_from_the_path(path: str, model: str | None, verb: str) -> None:
    assert target_model(path, []) == (model, verb)


def test_target_model_from_sagemakers_header() -> None:
    headers = [(b"content-type", b"text/csv"), (b"X-Amzn-SageMaker-Target-Model", b"cities/Chicago_IL.tar.gz")]
    assert target_model("/endpoints/demo/invocations", headers) == ("cities/Chicago_IL.tar.gz", "/invocations")
    assert target_model("/invocations", headers[:1]) == (None, "/invocations")


def test_model_field_reads_the_name_without_parsing_tensors() -> None:
    req = pb.ModelInferRequest(model_name="cities/Houston_TX.tar.gz", model_version="1", id="x")
    req.raw_input_contents.append(b"\x00" * 10_000)
    req.inputs.add(name="features", datatype="FP32", shape=[1, 6])
    assert model_field(req.SerializeToString(), 1) == "cities/Houston_TX.tar.gz"
    load = pb.RepositoryModelLoadRequest(repository_name="r", model_name="m.tar.gz")
    assert model_field(load.SerializeToString(), 2) == "m.tar.gz"
    assert model_field(pb.ModelStatisticsRequest().SerializeToString(), 1) is None
    assert model_field(b"\x0a\xff\xff", 1) is None  # truncated: no name, no exception


def test_static_instances() -> None:
    assert parse_static("b:8080, a:9000:9001", 8081) == [Endpoint("a", 9000, 9001), Endpoint("b", 8080, 8081)]
    for bad in ("", "a", "a:x", "a:1:2:3"):
        with pytest.raises(ValueError):
            parse_static(bad, 8081)


def test_listing_and_free_memory() -> None:
    index = [{"name": "a", "state": "READY"}, {"name": "b", "state": "LOADING"},
             {"name": "c", "state": "UNAVAILABLE", "reason": "evicted"}]
    assert held_models(index) == {"a", "b"}
    with pytest.raises(ValueError):
        held_models({"error": "forbidden"})
    text = "# TYPE mme_memory_budget_bytes gauge\nmme_memory_budget_bytes 1000.0\n" \
           "# TYPE mme_memory_used_bytes gauge\nmme_memory_used_bytes 250.0\n"
    assert free_memory(text) == 750.0
    assert free_memory("") is None


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_router_arguments(parser)
    return parser.parse_args(argv)


def test_settings_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MME_UPSTREAM_API_KEY", "k")
    monkeypatch.setenv("MME_ROUTING_STRATEGY", "random")
    s = router_settings_from_args(parse(["--instances", "a:1", "--health-interval", "0.5"]))
    assert (s.upstream_api_key, s.routing_strategy, s.health_interval_s) == ("k", "random", 0.5)
    monkeypatch.setenv("MME_ROUTING_STRATEGY", "round-robin")
    with pytest.raises(SystemExit):
        router_settings_from_args(parse(["--instances", "a:1"]))


def test_settings_need_exactly_one_source_of_instances() -> None:
    with pytest.raises(SystemExit):
        router_settings_from_args(parse([]))
    with pytest.raises(SystemExit):
        router_settings_from_args(parse(["--instances", "a:1", "--dns-name", "gw"]))


def test_the_upstream_key_from_a_mounted_secret(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "upstream-api-key"
    secret.write_text("mme_abc123\n")
    monkeypatch.delenv("MME_UPSTREAM_API_KEY", raising=False)
    s = router_settings_from_args(parse(["--instances", "a:1", "--upstream-api-key-file", str(secret)]))
    assert s.upstream_api_key == "mme_abc123"
    with pytest.raises(SystemExit):
        router_settings_from_args(parse(["--instances", "a:1", "--upstream-api-key-file", str(tmp_path / "none")]))


def test_model_field_reads_the_name_the_gateway_reads_when_it_repeats() -> None:
    """A parser keeps the last occurrence of a field: routing by the first would send the request to an
    instance chosen for a model it does not name."""
    first = pb.ModelInferRequest(model_name="first.tar.gz").SerializeToString()
    last = pb.ModelInferRequest(model_name="last.tar.gz").SerializeToString()
    assert pb.ModelInferRequest.FromString(first + last).model_name == "last.tar.gz"
    assert model_field(first + last, 1) == "last.tar.gz"


@pytest.mark.parametrize("path", [
    "/v2/models/a/b.tar.gz/infer", "/v2/models/m/versions/1/infer", "/v2/models/m/versions//infer",
    "/v2/models/m/versions/1/2/infer", "/v2/models/versions/1/infer", "/v2/models//versions/1/infer",
    "/v2/models/m/infer/infer", "/v2/models/m/versions/x y/infer", "/v2/models/m%2Fn/infer",
])
def test_the_router_reads_an_infer_paths_model_as_the_gateway_does(path: str) -> None:
    """Routing by another name than the gateway serves would load the model where its requests do not go."""
    served = parse_infer_path(path)
    assert target_model(path, []) == ((served[0] if served else None), "/infer")
