"""The benchmark toolkit's synthetic models include XGBoost and LightGBM city models: about the requested
size, readable by their library, and mixed into a store as the config's `frameworks` cycle says."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import lightgbm
import numpy as np
import pytest
import xgboost

from gateway.demo import synthetic_houses
from mme_bench.config import BenchConfigError, SyntheticModelsConfig
from mme_bench.models import TREE_SIZE_TOLERANCE, build_synthetic_store, synthetic_tree_artifact


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _predict(files: dict[str, bytes], rows: np.ndarray) -> np.ndarray:
    if "xgboost.json" in files:
        booster = xgboost.Booster()
        booster.load_model(bytearray(files["xgboost.json"]))
        return booster.predict(xgboost.DMatrix(rows))
    return lightgbm.Booster(model_str=files["model.txt"].decode()).predict(rows)


@pytest.mark.parametrize("framework, file_name", [("xgboost", "xgboost.json"), ("lightgbm", "model.txt")])
@pytest.mark.parametrize("size", [30_000, 150_000])
def test_a_tree_artifact_is_about_the_size_and_predicts_house_prices(framework: str, file_name: str,
                                                                     size: int) -> None:
    data = synthetic_tree_artifact("synthetic-0003", framework, size)
    assert abs(len(data) - size) <= TREE_SIZE_TOLERANCE * size
    files = _members(data)
    assert list(files) == [file_name]
    houses, prices = synthetic_houses("synthetic-0003", 200)
    assert np.corrcoef(_predict(files, houses.astype(np.float32)), prices)[0, 1] > 0.9


def test_the_store_cycles_frameworks(tmp_path: Path) -> None:
    cfg = SyntheticModelsConfig(count=3, sizes_bytes=(20_000,), prefix="t-", frameworks=("onnx", "xgboost", "lightgbm"))
    models = build_synthetic_store(tmp_path, cfg)
    assert [sorted(_members((tmp_path / m.key).read_bytes())) for m in models] == [
        ["model.onnx"], ["xgboost.json"], ["model.txt"]]
    mtime = (tmp_path / "t-0001.tar.gz").stat().st_mtime_ns
    build_synthetic_store(tmp_path, cfg)  # kept: a running gateway keeps its ETags
    assert (tmp_path / "t-0001.tar.gz").stat().st_mtime_ns == mtime


def test_an_unknown_framework_is_a_config_error() -> None:
    with pytest.raises(BenchConfigError, match="frameworks"):
        SyntheticModelsConfig(frameworks=("tensorflow",))
