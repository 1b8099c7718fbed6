"""Benchmark configs: the shipped demo loads, and bad configs fail before anything starts, naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mme_bench.config import BenchConfigError, config_from_dict, load_config
from tests.helpers import REPO_ROOT

MINIMAL = {
    "targets": [{"name": "gw", "url": "http://127.0.0.1:8080", "instance_type": "ml.g5.xlarge"}],
    "models": {"source": "keys", "keys": ["a.tar.gz"]},
    "payloads": {"examples": [{"Body": "1,2,3,4,5,6", "ContentType": "text/csv"}]},
}


def with_(**changes: object) -> dict:
    cfg = json.loads(json.dumps(MINIMAL))
    for dotted, value in changes.items():
        node = cfg
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return cfg


def test_the_demo_config_loads_with_two_launched_profiles() -> None:
    cfg = load_config(REPO_ROOT / "benchmarks" / "bench-demo.yaml")
    assert [t.instance_type for t in cfg.targets] == ["ml.c5.large", "ml.r5.2xlarge"]
    assert all(t.launched for t in cfg.targets)
    assert cfg.launcher.store == ".demo/store"
    assert cfg.targets[0].memory_budget_bytes == 350_000_000
    assert cfg.targets[1].extra_args == ("--queue-timeout", "0.5")
    assert cfg.perf_analyzer.enabled and cfg.cost.hours_per_month == 720
    assert [t.name for t in cfg.targets_for("concurrency")] == ["r5-2xlarge"]
    assert [t.name for t in cfg.targets_for("stability")] == ["c5-large-350MB", "r5-2xlarge"]


def test_a_json_config_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(MINIMAL))
    cfg = load_config(path)
    assert cfg.targets[0].url == "http://127.0.0.1:8080"
    assert cfg.workload.zipf_alpha == 1.0 and cfg.workload.arrival == "closed"
    assert cfg.concurrency.max_concurrency == (2, 4) and cfg.concurrency.client_multipliers == (1.0, 2.0)
    assert cfg.request.route == "auto" and cfg.stability.invocations == 40


def test_targets_as_a_mapping_and_numbers_in_extra_args() -> None:
    cfg = config_from_dict(with_(targets={"a": {"url": "http://h:1", "extra_args": ["--max-concurrency", 4]}}))
    assert cfg.targets[0].name == "a" and cfg.targets[0].extra_args == ("--max-concurrency", "4")


@pytest.mark.parametrize("changes, message", [
    ({"stabilty": {}}, "unknown key(s) ['stabilty']"),
    ({"workload__zipf_alpha": -1}, "workload.zipf_alpha"),
    ({"workload__zipf_alpha": "high"}, "workload.zipf_alpha: expected a number"),
    ({"workload__arrival": "poisson"}, "workload.rate_per_s"),
    ({"workload__arrival": "weibull"}, "expected one of ['closed', 'poisson', 'gamma']"),
    ({"concurrency__max_concurrency": [2, "x"]}, "concurrency.max_concurrency[1]: expected an integer"),
    ({"concurrency__max_concurrency": [0]}, "concurrency.max_concurrency"),
    ({"concurrency__duration_s": 5, "concurrency__invocations": 10}, "exactly one of duration_s and invocations"),
    ({"concurrency__targets": ["nope"]}, "concurrency.targets: unknown target(s) ['nope']"),
    ({"targets": []}, "name at least one gateway"),
    ({"targets": [{"name": "a"}]}, "launcher.store"),
    ({"targets": [{"name": "a", "url": "h:1"}, {"name": "a", "url": "http://h:1"}]}, "expected http(s)://"),
    ({"targets": [{"name": "a", "url": "http://h:1"}, {"name": "a", "url": "http://h:2"}]}, "must be unique"),
    ({"targets": [{"name": "a", "url": "http://h:1", "ports": 1}]}, "targets[0]: unknown key(s) ['ports']"),
    ({"payloads": {}}, "payloads: give a JSON-lines `file` or inline `examples`"),
    ({"models": {"source": "synthetic"}}, "models.synthetic.dir"),
    ({"models": {"source": "store"}}, "models.source 'store'"),
    ({"perf_analyzer__concurrency_range": "1-4"}, "perf_analyzer.concurrency_range"),
    ({"cost__max_error_rate": 2}, "max_error_rate"),
    ({"stability__enabled": "yes"}, "stability.enabled: expected true or false"),
])
def test_bad_configs_name_the_problem(changes: dict, message: str) -> None:
    data = with_(**changes)
    with pytest.raises(BenchConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(BenchConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets: [unclosed\n")
    with pytest.raises(BenchConfigError, match="not valid YAML"):
        load_config(bad)
