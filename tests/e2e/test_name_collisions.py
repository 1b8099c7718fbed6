"""Two keys never answer with one model: not two keys whose names collided under the old 32-bit naming, and
not after an upgrade from it, with a cache directory the old naming left behind.

The keys share a 60-character prefix, longer than the readable part of a Triton name, so only the hash
tells their names apart; the pair is found by brute force against the naming as it was (8 hex digits).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from gateway.demo import onnx_model, predict
from gateway.store.factory import open_store
from tests.helpers import GatewayProcess, city_artifact, http, v2_request

HOUSE = [1990.0, 3047.0, 5.0, 1.0, 1.11, 2.0]
PREFIX = "x" * 60
OLD_SLUG = "x" * 48  # the readable part, cut at 48 characters, the same for every key under PREFIX


def old_name(key: str, namespace: str) -> str:
    """The Triton name the gateway gave `key` before names kept 64 bits or more of hash."""
    return OLD_SLUG + "-" + hashlib.sha256(f"{namespace}\0{key}".encode()).hexdigest()[:8]


def old_colliding_pair(namespace: str) -> tuple[str, str]:
    """Two keys under PREFIX that shared one Triton name under the old naming (about 80,000 tries)."""
    seen: dict[str, str] = {}
    i = 0
    while True:
        key = f"{PREFIX}{i}.tar.gz"
        first = seen.setdefault(old_name(key, namespace), key)
        if first != key:
            return first, key
        i += 1


def _price(gw: GatewayProcess, key: str) -> float:
    status, body, _ = http("POST", f"{gw.url}/v2/models/{key}/infer", v2_request([HOUSE]))
    assert status == 200, body
    return json.loads(body)["outputs"][0]["data"][0]


def _expected(city: str) -> float:
    return float(predict(city, np.array([HOUSE])).ravel()[0])


def _store_with_pair(tmp_path: Path) -> tuple[Path, str, str]:
    store = tmp_path / "store"
    store.mkdir()
    first, second = old_colliding_pair(open_store(str(store)).url)
    (store / first).write_bytes(city_artifact("Houston_TX"))
    (store / second).write_bytes(city_artifact("Seattle_WA"))
    assert _expected("Houston_TX") != _expected("Seattle_WA")
    return store, first, second


def test_keys_whose_old_names_collided_answer_with_their_own_models(tmp_path: Path) -> None:
    store, first, second = _store_with_pair(tmp_path)
    gw = GatewayProcess(["--store", str(store)], tmp_path / "gw").wait_ready()
    try:
        for _ in range(2):  # cold, then warm: both loaded at once
            assert abs(_price(gw, first) - _expected("Houston_TX")) < 1e-2
            assert abs(_price(gw, second) - _expected("Seattle_WA")) < 1e-2
        names = {e["model"]: e["triton_name"] for e in gw.events("model.loaded")}
        assert names[first] != names[second]
    finally:
        gw.stop()


def _write_old_layout(cache: Path, name: str, key: str, city: str) -> None:
    """A staged model as the old gateway left it: `repo/<name>/` with its config, `meta/<name>.json`
    without the namespace that metadata now records."""
    model_dir = cache / "repo" / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(onnx_model(city).SerializeToString())
    (model_dir / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n')
    (cache / "meta").mkdir(parents=True, exist_ok=True)
    (cache / "meta" / f"{name}.json").write_text(json.dumps({
        "key": key, "triton_name": name, "etag": "old-etag", "artifact_bytes": 1, "disk_bytes": 1,
        "framework": "onnx", "backend": "onnxruntime", "instance_count": 1, "staged_at": time.time(),
        "download_s": 0.0, "instance_kind": "KIND_CPU"}))


def test_a_cache_left_by_the_old_naming_is_cleaned_and_never_answers(tmp_path: Path) -> None:
    """The old gateway staged the first key under the name both keys shared; after the upgrade neither key
    is answered from that directory (it is removed at start) and each gets its own model."""
    store, first, second = _store_with_pair(tmp_path)
    shared = old_name(first, open_store(str(store)).url)
    cache = tmp_path / "gw" / "cache"
    _write_old_layout(cache, shared, first, "Houston_TX")
    _write_old_layout(cache, old_name("Seattle_WA.tar.gz", "file:///elsewhere"), "Seattle_WA.tar.gz", "Seattle_WA")
    gw = GatewayProcess(["--store", str(store)], tmp_path / "gw").wait_ready()
    try:
        assert sorted(p.name for p in (cache / "repo").iterdir()) == []
        assert sorted(p.name for p in (cache / "meta").iterdir()) == []
        assert abs(_price(gw, second) - _expected("Seattle_WA")) < 1e-2
        assert abs(_price(gw, first) - _expected("Houston_TX")) < 1e-2
        removed = {name for e in gw.events("staging.stale_removed") for name in e["triton_names"]}
        assert shared in removed
    finally:
        gw.stop()
