"""The footprint ledger: measurements per artifact version across restarts, and estimates learned per class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.ledger import Estimate, FootprintLedger, nearest_rank

MIB = 1 << 20
PY = "python/python/KIND_CPU"
ONNX = "python/onnx/KIND_CPU"


def test_round_trip_across_restart_keeps_the_largest_measurement(tmp_path: Path) -> None:
    path = tmp_path / "state" / "footprints.json"  # parent does not exist yet
    ledger = FootprintLedger(path)
    assert ledger.get('"etag-1"') is None and len(ledger) == 0
    assert ledger.record('"etag-1"', 300 * MIB, PY)
    assert ledger.record("etag-2", 5 * MIB, ONNX, instances=2)
    assert ledger.record("etag-2", 7 * MIB, ONNX, instances=2)  # it grew: the larger number counts
    assert not ledger.record("etag-2", 6 * MIB, ONNX, instances=2)  # a smaller reading is noise, not news

    reopened = FootprintLedger(path)  # a gateway restart
    assert reopened.get('"etag-1"') == 300 * MIB
    assert reopened.get("etag-2") == 7 * MIB
    assert reopened.learned(ONNX) == 7 * MIB // 2  # per instance
    assert len(reopened) == 2
    doc = json.loads(path.read_text())
    assert doc["version"] == 2
    assert doc["footprints"]["etag-2"] == {"bytes": 7 * MIB, "loaded": None, "class": ONNX, "instances": 2}
    assert [p.name for p in path.parent.iterdir()] == ["footprints.json"]  # no temp files left behind


def test_version_one_files_still_read(tmp_path: Path) -> None:
    path = tmp_path / "footprints.json"
    path.write_text(json.dumps({"version": 1, "footprints": {"old": 10 * MIB, "neg": -1, "str": "x", "b": True}}))
    ledger = FootprintLedger(path)
    assert ledger.get("old") == 10 * MIB and len(ledger) == 1  # bad entries dropped, good ones kept
    assert not ledger.knows_class(PY)  # a version-1 measurement has no class to teach
    assert ledger.record("old", 10 * MIB, PY)  # learning its class is news even at the same size
    assert ledger.knows_class(PY)


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2, 3]", '{"version": 1, "footprints": [1]}', "\x00garbage"])
def test_corrupt_file_is_ignored_and_healed(tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "footprints.json"
    path.write_text(content)
    ledger = FootprintLedger(path)
    assert len(ledger) == 0
    assert "ledger.unreadable" in caplog.text
    ledger.record("e", 2 * MIB)  # the next write replaces the corrupt file
    assert FootprintLedger(path).get("e") == 2 * MIB


def test_write_failure_is_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    ledger = FootprintLedger(blocker / "footprints.json")  # parent is a file: every write fails
    ledger.record("e", 3 * MIB)
    assert ledger.get("e") == 3 * MIB
    assert "ledger.not_saved" in caplog.text
    with pytest.raises(ValueError):
        ledger.record("x", -5)


def test_estimate_prefers_the_artifacts_own_measurement(tmp_path: Path) -> None:
    ledger = FootprintLedger(tmp_path / "f.json")
    ledger.record("known", 123 * MIB, PY)
    ledger.record("other", 900 * MIB, PY)
    assert ledger.estimate("known", PY, instances=4, fallback_per_instance=96 * MIB) == Estimate(123 * MIB, "ledger")


def test_estimate_for_a_new_artifact_learns_from_its_class(tmp_path: Path) -> None:
    """The case that broke the budget: 1 KB artifacts that hold 250 MB once loaded. After one measurement
    of the class, a new artifact of it is no longer admitted on the 96 MiB guess."""
    ledger = FootprintLedger(tmp_path / "f.json")
    fallback = 96 * MIB + 2 * 1024
    assert ledger.estimate("new", PY, 1, fallback) == Estimate(fallback, "size_x_factor")
    ledger.record("first", 250 * MIB, PY)
    assert ledger.estimate("new", PY, 1, fallback) == Estimate(250 * MIB, "learned")
    assert ledger.estimate("new", PY, 2, fallback) == Estimate(500 * MIB, "learned")
    assert ledger.estimate("new", ONNX, 1, fallback) == Estimate(fallback, "size_x_factor")  # other class
    # A big artifact whose size says more than its class: the fallback wins when it is larger.
    assert ledger.estimate("huge", PY, 1, 4096 * MIB) == Estimate(4096 * MIB, "size_x_factor")


def test_learned_estimate_is_a_high_percentile_not_the_mean(tmp_path: Path) -> None:
    ledger = FootprintLedger(tmp_path / "f.json")
    for i in range(19):
        ledger.record(f"small-{i}", 40 * MIB, ONNX)
    ledger.record("big", 2000 * MIB, ONNX)  # one outlier among twenty: the 90th percentile ignores it
    assert ledger.learned(ONNX) == 40 * MIB
    for i in range(3):
        ledger.record(f"big-{i}", 2000 * MIB, ONNX)  # four of twenty-three are big: now it does not
    assert ledger.learned(ONNX) == 2000 * MIB
    ledger.record("small-0", 3000 * MIB, ONNX)  # an entry that grows is re-indexed, not counted twice
    assert len(ledger) == 23


def test_a_model_too_large_to_serve_does_not_make_its_class_look_too_large(tmp_path: Path) -> None:
    """A 750 MB model refused under a 600 MB budget stays in the ledger (so it is refused again at once), but
    the next 1 KB artifact of its class is estimated from the models that can be served."""
    ledger = FootprintLedger(tmp_path / "f.json")
    budget = 600 * MIB
    ledger.record("too-big", 750 * MIB, PY)
    assert ledger.estimate("too-big", PY, 1, 96 * MIB, ceiling=budget) == Estimate(750 * MIB, "ledger")
    assert ledger.estimate("new", PY, 1, 96 * MIB, ceiling=budget) == Estimate(96 * MIB, "size_x_factor")
    ledger.record("small", 150 * MIB, PY)
    assert ledger.estimate("new", PY, 1, 96 * MIB, ceiling=budget) == Estimate(150 * MIB, "learned")
    ledger.record("large", 400 * MIB, PY)  # fits alone; two instances of it would not: capped, not refused
    assert ledger.estimate("new", PY, 2, 96 * MIB, ceiling=budget) == Estimate(budget, "learned")


def test_growth_once_serving_is_learned_per_class(tmp_path: Path) -> None:
    """onnxruntime grows its arena on the first requests: a model measured just after its load is not yet
    what it will hold. The ratio of in-use to just-loaded, learned per class, says how much to expect."""
    path = tmp_path / "f.json"
    ledger = FootprintLedger(path)
    assert ledger.growth(ONNX) == 1.0  # nothing learned: no growth assumed
    assert ledger.record("a", 100 * MIB, ONNX, just_loaded=True)
    assert ledger.growth(ONNX) == 1.0
    assert ledger.record("a", 110 * MIB, ONNX)  # after its first requests
    assert not ledger.record("a", 90 * MIB, ONNX, just_loaded=True)  # a later reload: the first one stays
    assert ledger.growth(ONNX) == pytest.approx(1.1)
    assert ledger.get("a") == 110 * MIB
    reopened = FootprintLedger(path)
    assert reopened.growth(ONNX) == pytest.approx(1.1) and reopened.growth(PY) == 1.0
    reopened.record("b", 50 * MIB, ONNX, just_loaded=True)  # a model that never grows pulls no ratio below 1
    assert reopened.growth(ONNX) == pytest.approx(1.1)
    reopened.record("leak", 10 * MIB, PY, just_loaded=True)
    reopened.record("leak", 400 * MIB, PY)  # a leak is not a growth to expect of every model: capped
    assert reopened.growth(PY) == 2.0


def test_nearest_rank() -> None:
    assert nearest_rank([5], 0.9) == 5
    assert nearest_rank([1, 2, 3], 0.9) == 3  # fewer than ten values: the largest
    assert nearest_rank(list(range(1, 11)), 0.9) == 9
    assert nearest_rank(list(range(1, 101)), 0.9) == 90
