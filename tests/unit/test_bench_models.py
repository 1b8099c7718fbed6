"""Synthetic models: about the requested artifact size, and still the demo's answer."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mme_bench.config import SyntheticModelsConfig
from mme_bench.models import SIZE_TOLERANCE, build_synthetic_store, synthetic_artifact
from gateway.demo import predict

HOUSES = np.array([[1994, 3188, 5, 1.5, 1.62, 3], [1990, 3047, 5, 1.0, 1.11, 2]], dtype=np.float32)


@pytest.mark.parametrize("size", [20_000, 300_000])
def test_artifact_is_about_the_requested_size_and_answers_like_the_demo(size: int) -> None:
    data = synthetic_artifact("synthetic-0001", size, seed=1)
    assert abs(len(data) - size) <= SIZE_TOLERANCE * size
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert tar.getnames() == ["model.onnx"]
        model = tar.extractfile("model.onnx").read()  # type: ignore[union-attr]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (price,) = session.run(["price"], {"features": HOUSES})
    np.testing.assert_allclose(price, predict("synthetic-0001", HOUSES), rtol=1e-4)


def test_store_cycles_sizes_and_keeps_good_artifacts(tmp_path: Path) -> None:
    cfg = SyntheticModelsConfig(count=3, sizes_bytes=(10_000, 40_000), prefix="m-")
    models = build_synthetic_store(tmp_path, cfg)
    assert [m.key for m in models] == ["m-0000.tar.gz", "m-0001.tar.gz", "m-0002.tar.gz"]
    assert [m.requested_bytes for m in models] == [10_000, 40_000, 10_000]
    assert all(abs(m.size_bytes - m.requested_bytes) <= SIZE_TOLERANCE * m.requested_bytes for m in models)
    mtime = (tmp_path / "m-0001.tar.gz").stat().st_mtime_ns
    build_synthetic_store(tmp_path, cfg)  # a second run reuses them (a running gateway keeps its ETags)
    assert (tmp_path / "m-0001.tar.gz").stat().st_mtime_ns == mtime
