"""A model's record and its staged directory are found by Triton name; one made for another model under the
same name is refused (ModelNameCollision), never served, and a cache left by an older naming is cleaned.

The collisions are injected: two ModelKeys sharing one name by hand, driven through the real ModelManager
with the cache benchmark's stand-ins for the store, the NVMe tier and Triton's control API (the gateway's
own interfaces, no Triton involved). The staging tests use the real StagingArea on a local store.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from benchmarks.cache_policies import ModelSpec, NoProbe, TimingMeter, TimingStaging, TimingStore, TimingTriton
from gateway.budget import BudgetConfig
from gateway.config import Settings
from gateway.errors import ModelNameCollision
from gateway.extract import ExtractLimits
from gateway.ledger import FootprintLedger
from gateway.manager import ManagerConfig, ModelManager
from gateway.metrics import Metrics
from gateway.naming import ModelKey, model_key
from gateway.policy import make_policy
from gateway.records import State
from gateway.render import RenderOptions
from gateway.staging import StagedArtifact, StagingArea
from gateway.store.factory import open_store
from gateway.triton.control import IndexEntry
from tests.helpers import city_artifact

MB = 1_000_000
NS = TimingStore.url
SHARED = "shared-name"
A = ModelKey("a.tar.gz", SHARED, NS)
B = ModelKey("b.tar.gz", SHARED, NS)


class IndexedTriton(TimingTriton):
    """The timing model's Triton with a repository index given up front, remembering what it was told to unload."""

    def __init__(self, specs_by_name: dict[str, ModelSpec], index: list[IndexEntry]) -> None:
        super().__init__(specs_by_name, time_scale=0.0)
        self.entries, self.unloaded = index, []

    async def index(self) -> list[IndexEntry]:
        return self.entries

    async def unload(self, name: str) -> None:
        self.unloaded.append(name)
        await super().unload(name)


def _manager(tmp_path: Path, names: dict[str, str], index: tuple[IndexEntry, ...] = ()
             ) -> tuple[ModelManager, TimingStaging, IndexedTriton]:
    """`names`: Triton name -> the key Triton loads under it; the store holds a.tar.gz and b.tar.gz."""
    specs = {key: ModelSpec(key, 10 * MB, 0.0) for key in ("a.tar.gz", "b.tar.gz")}
    store = TimingStore(specs)
    staging = TimingStaging(store)
    triton = IndexedTriton({name: specs[key] for name, key in names.items()}, list(index))
    manager = ModelManager(store, staging, triton, Metrics(), policy=make_policy("lru"), probe=NoProbe(),
                           meter=TimingMeter(triton), ledger=FootprintLedger(tmp_path / "footprints.json"),
                           config=ManagerConfig(etag_ttl_s=1e9, wait_timeout_s=30),
                           budget=BudgetConfig.from_settings(Settings(store=store.url), memory_budget_bytes=1000 * MB,
                                                             device_check=False))
    return manager, staging, triton


def _artifact(model: ModelKey) -> StagedArtifact:
    return StagedArtifact(key=model.key, triton_name=model.triton_name, namespace=model.namespace,
                          etag=f"etag-{model.key}", artifact_bytes=1, disk_bytes=1, framework="onnx",
                          backend="python", instance_count=1, staged_at=time.time(), download_s=0.0)


def test_a_record_made_for_another_key_under_the_same_name_is_refused(tmp_path: Path) -> None:
    manager, _, triton = _manager(tmp_path, {SHARED: "a.tar.gz"})

    async def run() -> None:
        async with manager.lease(A) as rec:
            assert rec.model == A
        with pytest.raises(ModelNameCollision) as refused:
            async with manager.lease(B):
                pytest.fail("b.tar.gz was answered with a.tar.gz's model")
        assert refused.value.status == 500 and "'b.tar.gz'" in refused.value.message
        assert "a.tar.gz" not in refused.value.message  # the other key may be another tenant's
        with pytest.raises(ModelNameCollision):
            manager.record(B)  # type: ignore[arg-type]  # the metadata routes' lookup refuses it too
        async with manager.lease(A) as rec:  # the first key is untouched
            assert rec.model == A and rec.state is State.READY

    asyncio.run(run())
    assert [r.model for r in manager.records()] == [A] and triton.resident == {SHARED}


def test_the_same_key_of_another_namespace_is_another_model(tmp_path: Path) -> None:
    """A registered model and a store key of the same spelling are different models, even under one name."""
    manager, _, _ = _manager(tmp_path, {SHARED: "a.tar.gz"})
    registered = ModelKey("a.tar.gz", SHARED, f"registered:{NS}")

    async def run() -> None:
        async with manager.lease(A):
            pass
        with pytest.raises(ModelNameCollision):
            async with manager.lease(registered):
                pytest.fail("a registered model was answered with the store key's model")

    asyncio.run(run())


def test_a_directory_staged_for_another_key_is_never_loaded_for_this_one(tmp_path: Path) -> None:
    """After a restart the disk holds the first key's model under the shared name and no record: the second
    key must not load it."""
    manager, staging, triton = _manager(tmp_path, {SHARED: "a.tar.gz"})
    staging.staged_names[SHARED] = _artifact(A)

    async def run() -> None:
        with pytest.raises(ModelNameCollision):
            async with manager.lease(B):
                pytest.fail("b.tar.gz was answered with a.tar.gz's staged model")

    asyncio.run(run())
    assert triton.loaded_bytes == 0 and triton.resident == set()  # nothing was loaded
    assert staging.staged(SHARED).key == "a.tar.gz"  # type: ignore[union-attr]  # left as it was
    assert manager.records() == []  # the refused key leaves nothing behind


def test_reconcile_unloads_what_no_record_answers_for(tmp_path: Path) -> None:
    """An external Triton that outlived the gateway still has a model loaded under an older name: nothing
    can reach it, so it is unloaded; the current one is adopted as loaded."""
    current = model_key("a.tar.gz", NS)
    old = "a-0123abcd"
    index = [IndexEntry(current.triton_name, "1", "READY", ""), IndexEntry(old, "1", "READY", ""),
             IndexEntry("never-loaded", "1", "UNAVAILABLE", "")]
    manager, staging, triton = _manager(tmp_path, {current.triton_name: "a.tar.gz"}, tuple(index))
    staging.staged_names[current.triton_name] = _artifact(current)
    asyncio.run(manager.reconcile())
    assert triton.unloaded == [old]
    assert [(r.model, r.state) for r in manager.records()] == [(current, State.READY)]


def _staging(cache: Path, store: Path) -> StagingArea:
    return StagingArea(cache, open_store(str(store)), RenderOptions(), ExtractLimits(max_total_bytes=100 * MB, max_files=100))


def _write_meta(cache: Path, name: str, fields: dict[str, object]) -> None:
    (cache / "repo" / name / "1").mkdir(parents=True)
    (cache / "repo" / name / "config.pbtxt").write_text(f'name: "{name}"\n')
    (cache / "meta").mkdir(parents=True, exist_ok=True)
    (cache / "meta" / f"{name}.json").write_text(json.dumps({
        "etag": "e", "artifact_bytes": 1, "disk_bytes": 1, "framework": "onnx", "backend": "python",
        "instance_count": 1, "staged_at": time.time(), "download_s": 0.0, **fields}))


def test_a_cache_from_the_older_naming_is_cleaned_at_start_and_current_entries_kept(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "Houston_TX.tar.gz").write_bytes(city_artifact("Houston_TX"))
    cache = tmp_path / "cache"
    area = _staging(cache, store)
    ns = area.store.url
    current = model_key("Houston_TX.tar.gz", ns)
    area.stage(current, area.store.head(current.key))  # a real staged model under today's name
    registered = model_key("mine", f"registered:file://{tmp_path}/models/mine")
    _write_meta(cache, registered.triton_name, {"key": "mine", "triton_name": registered.triton_name,
                                                "namespace": registered.namespace})
    # What the older naming left: 8 hex digits and no namespace in the metadata.
    _write_meta(cache, "Houston_TX-1a2b3c4d", {"key": "Houston_TX.tar.gz", "triton_name": "Houston_TX-1a2b3c4d"})
    # Metadata that claims a key whose name is not the one it sits under.
    other = model_key("Seattle_WA.tar.gz", ns)
    _write_meta(cache, other.triton_name, {"key": "Houston_TX.tar.gz", "triton_name": other.triton_name,
                                           "namespace": ns})
    (cache / "repo" / "no-metadata-0123").mkdir()  # a crash between the directory and its metadata
    (cache / "meta" / "half-written.json.tmp").write_text("{")

    area = _staging(cache, store)  # the restart

    kept = {current.triton_name, registered.triton_name}
    assert {p.name for p in (cache / "repo").iterdir()} == kept
    assert {p.name for p in (cache / "meta").iterdir()} == {f"{name}.json" for name in kept}
    assert {a.triton_name for a in area.all_staged()} == kept
    assert area.staged(current.triton_name).key == current.key  # type: ignore[union-attr]
    assert area.used_bytes() == sum(a.disk_bytes for a in area.all_staged())
