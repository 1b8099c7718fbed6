"""Workload generation: Zipf popularity, open-loop arrivals, invocation payloads."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mme_bench.config import BenchConfigError, PayloadConfig, WorkloadConfig
from mme_bench.workload import (
    ModelChooser, PayloadCycle, arrival_schedule, csv_to_v2, load_payloads, make_payload, zipf_weights,
)


def test_zipf_weights_by_hand() -> None:
    # alpha 1 over 3 models: 1, 1/2, 1/3 normalised by 11/6 -> 6/11, 3/11, 2/11
    assert zipf_weights(3, 1.0) == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    assert zipf_weights(4, 0.0) == pytest.approx([0.25] * 4)  # alpha 0 is uniform
    assert zipf_weights(2, 2.0) == pytest.approx([0.8, 0.2])  # 1 and 1/4
    with pytest.raises(ValueError):
        zipf_weights(0, 1.0)


def test_chooser_follows_the_weights_and_is_reproducible() -> None:
    keys = ["a", "b", "c"]
    draws = ModelChooser(keys, 1.0, seed=1).sample(30_000)
    counts = Counter(draws)
    assert counts["a"] / 30_000 == pytest.approx(6 / 11, abs=0.015)
    assert counts["c"] / 30_000 == pytest.approx(2 / 11, abs=0.015)
    assert ModelChooser(keys, 1.0, seed=1).sample(50) == ModelChooser(keys, 1.0, seed=1).sample(50)


def test_poisson_arrivals_have_the_configured_rate() -> None:
    cfg = WorkloadConfig(arrival="poisson", rate_per_s=50.0)
    times = arrival_schedule(cfg, duration_s=200.0, count=None, seed=3)
    assert len(times) / 200.0 == pytest.approx(50.0, rel=0.05)
    assert times.max() < 200.0 and np.all(np.diff(times) >= 0)
    gaps = np.diff(times)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV 1


def test_gamma_arrivals_keep_the_mean_and_change_the_burstiness() -> None:
    cfg = WorkloadConfig(arrival="gamma", rate_per_s=20.0, gamma_shape=0.25)  # CV = 1/sqrt(0.25) = 2
    times = arrival_schedule(cfg, duration_s=None, count=20_000, seed=4)
    assert len(times) == 20_000
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.08)


def test_csv_bodies_become_v2_tensors() -> None:
    body = json.loads(csv_to_v2("1994,3188,5,1.5,1.62,3\n1990,3047,5,1.0,1.11,2\n", "features", "FP32"))
    assert body == {"inputs": [{"name": "features", "shape": [2, 6], "datatype": "FP32",
                                "data": [1994, 3188, 5, 1.5, 1.62, 3, 1990, 3047, 5, 1.0, 1.11, 2]}]}
    with pytest.raises(ValueError, match="different numbers of columns"):
        csv_to_v2("1,2\n3", "x", "FP32")
    with pytest.raises(ValueError, match="non-numeric"):
        csv_to_v2("1,abc", "x", "FP32")


def test_payload_examples_in_the_serverless_toolkit_shape(tmp_path: Path) -> None:
    lines = [{"Body": "1,2,3,4,5,6", "ContentType": "text/csv"},
             {"Body": json.dumps({"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32",
                                              "data": [1, 2, 3, 4, 5, 6]}]}), "ContentType": "application/json"}]
    path = tmp_path / "examples.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    payloads = load_payloads(PayloadConfig(file=str(path)))
    assert [p.is_csv for p in payloads] == [True, False]
    assert payloads[0].body == b"1,2,3,4,5,6"
    assert json.loads(payloads[0].v2_body)["inputs"][0]["shape"] == [1, 6]
    assert json.loads(payloads[1].v2_body) == json.loads(lines[1]["Body"])
    cycle = PayloadCycle(payloads)
    assert [cycle.next().index for _ in range(5)] == [0, 1, 0, 1, 0]


def test_bad_payloads_are_config_errors(tmp_path: Path) -> None:
    cfg = PayloadConfig(examples=({"Body": "x"},))
    with pytest.raises(BenchConfigError, match=r"payloads\[0\]"):
        make_payload(0, {"Body": "1,x", "ContentType": "text/csv"}, cfg)
    with pytest.raises(BenchConfigError, match="KServe v2 request"):
        make_payload(1, {"Body": '{"instances": [1]}', "ContentType": "application/json"}, cfg)
    with pytest.raises(BenchConfigError, match="'Body'"):
        make_payload(2, {"body": "1"}, cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"Body": "1"}\nnot json\n')
    with pytest.raises(BenchConfigError, match="bad.jsonl:2"):
        load_payloads(PayloadConfig(file=str(bad)))
